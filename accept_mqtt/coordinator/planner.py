"""From devices and a model to a ``Plan``, and when to plan again.

The pure glue (``make_partition``, ``build_plan``, ``prior_costs``) is deterministic for the
same inputs (device order ties broken by id) and always returns a valid ``Plan`` or raises
``PlanningError`` naming what does not fit.

``Planner`` is the coordinator's planning collaborator. Guarantees:

* Plans are made with the adaptive latency predictor (``partition`` auto/predictor: loaded
  from ``predictor_state`` or seeded) or the FLOPs prior, over the devices it was told of;
  every timing sample queued so far is learnt before a re-plan (``next_plan``).
* The latency predictor learns every timing sample the agents send, in arrival order, in
  the gaps of the event loop rather than when the sample arrives (``on_timing``), so learning
  never holds up a step's events; ``learn_pending`` learns the rest at once. Once learnt, a
  sample is not kept: ``timing_samples`` holds the latest ``TIMING_SAMPLES_KEPT``, and
  ``timing_samples_total`` counts them all (memory stays flat over a long run).
* A speed change the predictor detects is recorded and published as ``drift``; when planning
  now would move the partition (and ``auto_replan``) it becomes a re-plan request, as
  ``repartition`` and ``set`` commands do. Within ``replan_min_steps`` steps of the last
  re-plan it waits instead, and is taken once they have passed if planning then still moves
  the partition: a real slowdown right after a re-plan (for noise, or for another device) is
  acted on late, never dropped. Requests are taken (``take_replan_request``) at a step
  boundary; any re-plan, which plans with every sample learnt so far, settles a waiting one.
* ``set_widths`` changes the link widths only if the whole config stays valid.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from accept_mqtt.model.descriptors import LayerDescriptor, describe
from accept_mqtt.model.fingerprint import unit_fingerprints
from accept_mqtt.model.footprint import SNAPSHOT_COPIES, optimizer_slots
from accept_mqtt.model.user import is_user_model
from accept_mqtt.model.zoo import build_model
from accept_mqtt.planning.partition import (
    PartitionProblem,
    PartitionResult,
    deepest,
    equal_split,
    first_unfit,
    flops_split,
    partition,
    problem_from_profiles,
    stage_footprint,
    stage_needs,
)
from accept_mqtt.wire.aio import cancel_and_wait
from accept_mqtt.wire.messages import Drift
from accept_mqtt.wire.plan import Plan, cuts_to_stages

from .config import ConfigError, TrainConfig
from .record import RunState, as_metric

log = logging.getLogger("accept_mqtt.coordinator")


class PlanningError(ValueError):
    pass


@dataclass
class DeviceInfo:
    id: str
    profile: dict[str, Any]

    @property
    def speed(self) -> float:
        """Relative compute speed: the profile's micro-benchmark score (GFLOP/s)."""
        return float(self.profile.get("bench_gflops") or 1.0)


CostFn = Callable[[list[LayerDescriptor], dict[str, Any], int], list[tuple[float, float]]]


def prior_costs(descs: list[LayerDescriptor], profile: dict[str, Any],
                batch: int) -> list[tuple[float, float]]:
    """FLOPs prior: (fwd_ms, bwd_ms) per layer at the device's benchmark GFLOP/s.

    Backward is taken as twice the forward (weights and inputs gradients), the usual rule.
    """
    gflops = float(profile.get("bench_gflops") or 1.0)
    out = []
    for d in descs:
        fwd = max(d.flops, d.out_elems) * batch / (gflops * 1e9) * 1e3
        out.append((fwd, 2.0 * fwd))
    return out


# Measured on this project's machine (digits CNN over loopback, py-spy and /proc): a stage
# spends about 0.3 ms of CPU per frame it sends or receives beyond the tensor's own bytes.
FRAME_CPU_MS = 0.3
MICRO_BATCH_CHOICES = (1, 2, 3, 4, 6, 8, 12, 16)  # what ``micro_batches="auto"`` tries
TIMING_SAMPLES_KEPT = 2000  # the latest timing samples the planner keeps (``timing_samples``)


def make_partition(
    descs: list[LayerDescriptor],
    devices: list[DeviceInfo],
    cfg: TrainConfig,
    *,
    method: str,
    costs: CostFn = prior_costs,
    micro_batches: int | None = None,
    train_samples: int = 0,
) -> PartitionResult:
    """Cut points, device order and link bits by ``method``: dp | flops | equal.

    Every requested device gets a stage (the user asked for ``--devices N``); the bit widths
    and link options (``act_delta``, ``grad_feedback``) are the configured ones, their memory
    counted (a delta history has ``train_samples`` rows: the training set's size). ``dp``
    minimises the time per mini-batch (fill and drain included, ``objective="minibatch"``)
    under ``costs``. ``micro_batches``: the count to plan
    for (default: the configured one, which must then be a number).
    """
    m = micro_batches if micro_batches is not None else cfg.micro_batches
    if not isinstance(m, int):
        raise PlanningError(f"make_partition needs a micro-batch count, got {m!r}")
    mb = max(1, -(-cfg.batch_size // m))  # micro-batch size (ceil)
    order = sorted(devices, key=lambda d: d.id)
    per_dev = [costs(descs, d.profile, mb) for d in order]
    problem = problem_from_profiles(
        [d.id for d in order], [[f for f, _ in c] for c in per_dev],
        [[b for _, b in c] for c in per_dev], descs, mb, {d.id: d.profile for d in order},
        act_bits=(cfg.act_bits,), grad_bits=(cfg.grad_bits,), min_act_bits=cfg.act_bits,
        min_grad_bits=cfg.grad_bits, micro_batches=m, schedule=cfg.schedule,
        use_all_devices=True, fixed_order=method != "dp", frame_cpu_ms=FRAME_CPU_MS,
        optimizer_slots=optimizer_slots({"name": cfg.optimizer, "momentum": cfg.momentum}),
        snapshot_copies=SNAPSHOT_COPIES, codec_buffers=True,  # what the agents hold
        act_delta=cfg.act_delta, grad_feedback=cfg.grad_feedback,
        train_samples=train_samples,
    )
    if len(order) > len(descs):
        raise PlanningError(f"{len(order)} stages need at least {len(order)} layers, "
                            f"the model has {len(descs)}")
    if method in ("equal", "flops"):
        split = equal_split if method == "equal" else flops_split
        res = split(problem, bits=cfg.act_bits, grad_bits=cfg.grad_bits)

        def parts(i: int) -> Any:
            return stage_footprint(problem, res.cuts[i], res.cuts[i + 1], res.num_stages - 1 - i)

        i = first_unfit(problem, res.devices, res.memory_bytes)
        if i is not None:
            dev = res.devices[i]
            raise PlanningError(
                f"the {method} split does not fit: stage {i} (layers [{res.cuts[i]}, "
                f"{res.cuts[i + 1]})) needs {res.memory_bytes[i]:.0f} bytes but {dev} has "
                f"{problem.devices[problem.index_of(dev)].memory_bytes:.0f} (by part: "
                f"{parts(i).text()}); --partition auto places layers by memory")
        return with_depth(problem, honoured_widths(res, cfg, method), cfg)
    return with_depth(problem, honoured_widths(partition(problem, objective="minibatch"), cfg,
                                               method), cfg)


def with_depth(problem: PartitionProblem, res: PartitionResult,
               cfg: TrainConfig) -> PartitionResult:
    """``res`` with its 1F1B depth: how many micro-batches stage 0 may have in flight (stage
    ``s`` that many minus ``s`` and never more than ``M``, the last stage 1), ``cfg.in_flight``
    or, for ``"auto"``, the most that every device's memory holds (``memory.deepest``: at
    most ``k + M - 2``, where every stage but the last may hold all ``M``). Textbook 1F1B is
    ``k``; deeper lets a stage forward while a gradient is still on its way back, which hides
    hops' latency (docs/partitioner.md) and never changes the arithmetic: every stage still
    runs its backwards in micro-batch order. A number below the
    stage count (1F1B could not fill the pipeline) or one that does not fit is refused."""
    if cfg.schedule != "1f1b" or not res.feasible:
        return res
    k = res.num_stages
    if cfg.in_flight == "auto":
        deeper = deepest(problem, res.cuts, res.devices)
    else:
        if cfg.in_flight < k:
            raise PlanningError(f"in_flight {cfg.in_flight} is below the {k} stages: 1F1B "
                                f"keeps at least one micro-batch in flight per stage")
        deeper = cfg.in_flight - k
    q = replace(problem, deeper=deeper)
    need = stage_needs(q, res.cuts)
    i = first_unfit(q, res.devices, need)
    if i is not None:
        dev = res.devices[i]
        raise PlanningError(
            f"in_flight {cfg.in_flight} does not fit: stage {i} (layers [{res.cuts[i]}, "
            f"{res.cuts[i + 1]})) would need {need[i]:.0f} bytes but {dev} has "
            f"{q.devices[q.index_of(dev)].memory_bytes:.0f}; a smaller in_flight or 'auto' "
            f"stashes less")
    return replace(res, deeper=deeper, memory_bytes=need)


def honoured_widths(res: PartitionResult, cfg: TrainConfig, method: str) -> PartitionResult:
    """``res`` if every link carries the configured widths (activations ``act_bits`` from
    stage i to i+1, gradients ``grad_bits`` back) and options (``act_delta``,
    ``grad_feedback``), else ``PlanningError``: a width or option the plan would not honour
    is refused, never replaced by another one."""
    k = res.num_stages
    act, grad = list(res.act_bits[: k - 1]), list(res.grad_bits[1:])
    delta = list(res.act_delta[: k - 1]) if res.act_delta else [False] * (k - 1)
    fed = list(res.grad_feedback[1:]) if res.grad_feedback else [False] * (k - 1)
    for name, want, got in (("act_bits", cfg.act_bits, act), ("grad_bits", cfg.grad_bits, grad),
                            ("act_delta", cfg.act_delta, delta),
                            ("grad_feedback", cfg.grad_feedback, fed)):
        if any(b != want for b in got):
            raise PlanningError(f"the {method} partition put {name} {got} on the links, not the "
                                f"configured {want}; refusing a plan that does not honour it")
    return res


def predicted_step_ms(res: PartitionResult, micro_batches: int) -> float:
    """A synchronous mini-batch: ``M + K - 1`` micro-batch slots of the bottleneck."""
    return (micro_batches + res.num_stages - 1) * res.bottleneck_ms


def choose_micro_batches(descs: list[LayerDescriptor], devices: list[DeviceInfo],
                         cfg: TrainConfig, *, method: str, costs: CostFn = prior_costs,
                         train_samples: int = 0) -> tuple[PartitionResult, int]:
    """The partition and micro-batch count with the lowest predicted mini-batch time.

    Tries each of ``MICRO_BATCH_CHOICES`` up to the batch size: fewer micro-batches mean a
    longer fill and drain, more mean smaller, less efficient layers and more frames (each
    costing ``FRAME_CPU_MS``); a count whose stash does not fit a device's memory is skipped.
    Ties go to fewer micro-batches. ``PlanningError`` if no count fits.
    """
    best: tuple[float, int, PartitionResult] | None = None
    errors: list[str] = []
    for m in (c for c in MICRO_BATCH_CHOICES if c <= cfg.batch_size):
        try:
            res = make_partition(descs, devices, cfg, method=method, costs=costs,
                                 micro_batches=m, train_samples=train_samples)
        except ValueError as e:  # PlanningError, InfeasiblePlanError and the problem's own
            errors.append(f"{m}: {e}")
            continue
        if not res.feasible:
            errors.append(f"{m}: does not fit the devices' memory")
            continue
        t = predicted_step_ms(res, m)
        if best is None or t < best[0] - 1e-9:
            best = (t, m, res)
    if best is None:
        raise PlanningError("no micro-batch count fits: " + "; ".join(errors))
    return best[2], best[1]


def build_plan(job: str, cfg: TrainConfig, num_layers: int, order: list[DeviceInfo],
               cuts: list[int], *, method: str, version: int = 1,
               micro_batches: int | None = None,
               act_bits: list[int] | None = None, grad_bits: list[int] | None = None,
               predicted_ms: list[float] | None = None, bottleneck_ms: float | None = None,
               start_step: int = 0, model_args: dict[str, Any] | None = None,
               fingerprint: tuple[str, ...] = (), optimizer: dict[str, Any],
               train_samples: int | None = None, deeper: int = 0) -> Plan:
    """``optimizer``: the plan's optimizer dict, lr schedule included (``cfg.optimizer_cfg``).
    ``cfg.act_delta``/``grad_feedback`` apply to every link (stage i's activations to i+1 for
    i < k-1, its gradients to i-1 for i > 0); ``train_samples`` (the training set's size) is
    what a delta link's history holds at most, and is needed with ``act_delta``. ``deeper``
    (``PartitionResult.deeper``): under 1F1B the plan's ``in_flight`` is ``k + deeper``."""
    k = len(order)
    delta = cfg.act_delta and k > 1
    if delta and train_samples is None:
        raise PlanningError("act_delta needs the training set's size (train_samples): a "
                            "delta link's history holds one activation per sample")
    return Plan(
        job=job, version=version, model=cfg.model, num_layers=num_layers,
        stages=cuts_to_stages(cuts, [d.id for d in order],
                              act_bits or [cfg.act_bits] * k, grad_bits or [cfg.grad_bits] * k,
                              predicted_ms, act_delta=[delta and i < k - 1 for i in range(k)],
                              grad_feedback=[cfg.grad_feedback and i > 0 for i in range(k)]),
        train_samples=train_samples if delta else None,
        seed=cfg.seed, model_args=model_args_for(cfg) if model_args is None else model_args,
        micro_batches=micro_batches if micro_batches is not None else int(cfg.micro_batches),
        schedule=cfg.schedule, optimizer=optimizer, batch_size=cfg.batch_size,
        in_flight=k + deeper if cfg.schedule == "1f1b" else None, method=method,
        stochastic_grad_rounding=cfg.stochastic_grad_rounding,
        grad_scheme=cfg.grad_scheme, act_per_channel=cfg.act_per_channel,
        predicted_bottleneck_ms=bottleneck_ms, start_step=start_step, fingerprint=fingerprint,
        max_message_bytes=cfg.max_message_bytes,
    )


def model_args_for(cfg: TrainConfig, input_shape: tuple[int, ...] | None = None,
                   num_classes: int | None = None) -> dict[str, Any]:
    """What the plan tells agents to build the model with, besides its name and seed.

    A zoo model keeps its own input shape and class count unless ``cfg.input_shape`` is set;
    the user's own model takes them from the data set (it has no defaults)."""
    args: dict[str, Any] = {"width": cfg.width} if cfg.width != 1.0 else {}
    if cfg.input_shape is not None:
        args["input_shape"] = list(cfg.input_shape)
    if is_user_model(cfg.model):
        if input_shape is not None:
            args.setdefault("input_shape", list(input_shape))
        if num_classes is not None:
            args["num_classes"] = num_classes
    return args


Progress = Callable[[str, dict[str, Any]], None]


class Planner:
    """Cost model, plans and re-plan requests of one job (see the module docstring).

    ``current`` gives the plan the pipeline runs now (None before the first); ``emit``
    publishes a metrics message in the background.
    """

    def __init__(self, job: str, cfg: TrainConfig, state: RunState, *,
                 current: Callable[[], Plan | None], emit: Callable[[Drift], None],
                 say: Progress = lambda kind, info: None) -> None:
        self.job = job
        self.cfg = cfg  # replaced by ``set_widths``; read by whoever needs the job's config
        self.state = state
        self.current = current
        self.emit = emit
        self.say = say
        self.costs: Any = None  # predictor.CostModel when planning by prediction
        self.optimizer: dict[str, Any] | None = None  # the plans' optimizer dict (set_run)
        self.train_samples: int | None = None  # the training set's size (set_run)
        self.profiles: dict[str, dict[str, Any]] = {}  # devices planned with (the record's)
        # the latest timing samples, for tools and tests: bounded, as a long run sends some
        # 30 per device per step; the predictor learns every one (``_to_learn``) and the
        # record keeps the count
        self.timing_samples: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=TIMING_SAMPLES_KEPT)
        self.timing_samples_total = 0
        self._info: dict[str, DeviceInfo] = {}
        self._replan_request: str | None = None
        self._deferred_replan: str | None = None  # a drift's re-plan waiting for min_steps
        self._last_replan_step = -(10**9)
        # timing samples waiting for the predictor: (device, profile, sample), oldest first
        self._to_learn: collections.deque[tuple[str, dict[str, Any], dict[str, Any]]] = (
            collections.deque())
        self._learn_wake = asyncio.Event()
        self._learner: asyncio.Task[None] | None = None
        self.model_args = model_args_for(cfg)  # ``use_model`` adds the data set's shape
        self._model_facts: tuple[list[LayerDescriptor], tuple[str, ...]] | None = None

    # -- devices -------------------------------------------------------------------------
    def start_with(self, devices: list[DeviceInfo]) -> None:
        """The devices the job starts on (their profiles go into the record)."""
        self.profiles = {d.id: d.profile for d in devices}
        self._info = {d.id: d for d in devices}

    def know(self, devices: list[DeviceInfo]) -> None:
        """Devices a later plan may use (a profile first seen is kept for the record)."""
        for d in devices:
            self._info[d.id] = d
            self.profiles.setdefault(d.id, d.profile)

    def device_info(self, device: str) -> DeviceInfo:
        return self._info[device]

    def set_run(self, total_steps: int, dataset: str, train_samples: int | None = None) -> None:
        """The run's length and data set: they fix the lr schedule every plan carries;
        ``train_samples``: the training set's size (a delta-coded link's history)."""
        self.optimizer = self.cfg.optimizer_cfg(total_steps, dataset)
        self.train_samples = train_samples

    # -- cost model ----------------------------------------------------------------------
    def load_costs(self) -> None:
        """The online latency predictor (River), seeded, or restored from ``predictor_state``."""
        if self.cfg.partition not in ("auto", "predictor") or self.costs is not None:
            return
        from accept_mqtt.planning.predictor import CostModel

        self.say("status", {"msg": "loading the latency predictor"})
        self.costs = CostModel.load_or_seed(self.cfg.predictor_state)

    def save_costs(self) -> None:
        if self.costs is not None and self.cfg.predictor_state:
            self.costs.save(self.cfg.predictor_state)

    @property
    def cost_source(self) -> str:
        return "predictor" if self.costs is not None else "flops-prior"

    def layer_costs(self, descs: list[Any], profile: dict[str, Any],
                    batch: int) -> list[tuple[float, float]]:
        """(fwd_ms, bwd_ms) per layer on the device with ``profile``: the adaptive predictor
        when planning uses it, else the FLOPs prior."""
        if self.costs is not None:
            return self.costs.layer_costs(descs, profile, batch, device=profile.get("device"))
        return prior_costs(descs, profile, batch)

    def predictor_error(self, devices: list[str]) -> dict[str, Any] | None:
        """The predictor's rolling error per device (None without a predictor)."""
        if self.costs is None:
            return None
        return {d: self.costs.device_error(d) for d in devices}

    # -- the model -----------------------------------------------------------------------
    def use_model(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        """Build the job's model for data of this shape and class count, once, before any
        device is touched: a model that cannot be built (``user.UserModelError``) fails here."""
        self.model_args = model_args_for(self.cfg, input_shape, num_classes)
        self._model_facts = None
        self.model_facts()

    def model_facts(self) -> tuple[list[LayerDescriptor], tuple[str, ...]]:
        """Descriptors and unit fingerprints of the job's model. Built once: its name, seed
        and arguments do not change during a job (``set`` changes only link widths)."""
        if self._model_facts is None:
            cfg = self.cfg
            model = build_model(cfg.model, seed=cfg.seed, **self.model_args)
            self._model_facts = describe(model), unit_fingerprints(model.layers)
        return self._model_facts

    # -- plans ---------------------------------------------------------------------------
    def make_plan(self, devices: list[DeviceInfo], version: int = 1,
                  start_step: int = 0) -> Plan:
        cfg = self.cfg
        if self.optimizer is None:
            raise PlanningError("the run's length is not known yet (Planner.set_run): the lr "
                                "schedule depends on it")
        descs, fingerprint = self.model_facts()
        method = {"auto": "dp", "predictor": "dp"}.get(cfg.partition, cfg.partition)
        if cfg.micro_batches == "auto":
            res, m = choose_micro_batches(descs, devices, cfg, method=method,
                                          costs=self.layer_costs,
                                          train_samples=self.train_samples or 0)
        else:
            m = int(cfg.micro_batches)
            res = make_partition(descs, devices, cfg, method=method, costs=self.layer_costs,
                                 train_samples=self.train_samples or 0)
        name = {"dp": f"dp+{self.cost_source}"}.get(method, method)
        return build_plan(self.job, cfg, len(descs), [self._info[d] for d in res.devices],
                          list(res.cuts), method=name, version=version, micro_batches=m,
                          act_bits=list(res.act_bits), grad_bits=list(res.grad_bits),
                          predicted_ms=list(res.stage_ms), bottleneck_ms=res.bottleneck_ms,
                          start_step=start_step, model_args=self.model_args,
                          fingerprint=fingerprint, optimizer=self.optimizer,
                          train_samples=self.train_samples, deeper=res.deeper)

    def next_plan(self, devices: list[DeviceInfo], start_step: int) -> Plan:
        """The next plan version over ``devices`` (now known to the planner), made with every
        timing sample received so far."""
        plan = self.current()
        assert plan is not None
        self.know(devices)
        self.learn_pending()
        return self.make_plan(devices, version=plan.version + 1, start_step=start_step)

    def partition_would_move(self) -> bool:
        """Whether planning now, with what the predictor has learnt, gives other cuts/order
        over the devices the current plan runs on. Not over every device ever known: one
        lost earlier (or a spare seen once) would make any plan look different from the
        current one and turn every drift into a needless re-plan (``live_replan`` then
        considers idle devices itself)."""
        plan = self.current()
        if plan is None or not all(d in self._info for d in plan.devices):
            return False
        try:
            fresh = self.make_plan([self._info[d] for d in plan.devices],
                                   version=plan.version + 1)
        except Exception as e:  # planning trouble must not stop training
            log.warning("re-planning check failed: %s", e)
            return False
        return fresh.layout(bits=False) != plan.layout(bits=False)

    # -- re-plan requests ----------------------------------------------------------------
    def request_replan(self, reason: str) -> None:
        self._replan_request = reason

    @property
    def replan_requested(self) -> bool:
        """A re-plan may be taken at the coming step boundary (a waiting drift's counts from
        one step early: its inputs then wait for the boundary once, nothing else)."""
        return self._replan_request is not None or (
            self._deferred_replan is not None and self._replan_allowed_at(self.state.step + 1))

    def take_replan_request(self) -> str | None:
        """The pending re-plan request's reason (and forget it), else a waiting drift's once
        ``replan_min_steps`` have passed and planning still moves the partition, else None."""
        reason, self._replan_request = self._replan_request, None
        if (reason is None and self._deferred_replan is not None
                and self._replan_allowed_at(self.state.step)):
            waiting, self._deferred_replan = self._deferred_replan, None
            if self.partition_would_move():
                reason = f"{waiting} (held back {self.cfg.replan_min_steps} steps after the " \
                         f"last re-plan)"
        return reason

    def _replan_allowed_at(self, step: int) -> bool:
        """``replan_min_steps`` have passed since the last re-plan by ``step``."""
        return step - self._last_replan_step >= self.cfg.replan_min_steps

    def replanned(self, step: int) -> None:
        """A re-plan happened at ``step`` (drift re-plans keep ``replan_min_steps`` apart); it
        planned with every sample learnt so far, which settles a waiting drift."""
        self._last_replan_step = step
        self._deferred_replan = None

    def set_widths(self, changes: dict[str, int]) -> None:
        """New ``act_bits``/``grad_bits``, applied by a re-plan at the next step boundary;
        ``ValueError`` (and nothing changed) if the config would not be valid."""
        try:
            self.cfg = replace(self.cfg, **changes).validate()
        except ConfigError as e:
            raise ValueError(str(e)) from None
        self.request_replan("set " + ", ".join(f"{k}={v}" for k, v in changes.items()))

    # -- learning ------------------------------------------------------------------------
    def on_timing(self, device: str, samples: list[dict[str, Any]],
                  fallback_profile: dict[str, Any] | None = None) -> None:
        """Timing samples of one device: kept, and queued for the predictor.

        Learning costs about 0.1-0.3 ms per sample (River), some 30 samples per step, so it
        is not done here, in the reader that also delivers the step's events: the background
        learner (``_learn_loop``) learns the queue one sample at a time in the gaps of the
        event loop, and ``learn_pending`` empties it before any re-plan and before the record
        is written. Every sample is learnt, in arrival order; a speed change the predictor
        detects is reported as ``drift`` (``_on_drift``) when its sample is learnt, in
        practice within the step that follows. ``fallback_profile``: the device's profile
        if it is not (yet) one the planner knows.
        """
        for s in samples:
            s["device"] = device
        self.timing_samples.extend(samples)
        self.timing_samples_total += len(samples)
        profile = self.profiles.get(device) or fallback_profile
        if self.costs is None or profile is None:
            return
        self._to_learn.extend((device, profile, s) for s in samples)
        self._learn_wake.set()
        if self._learner is None or self._learner.done():
            self._learner = asyncio.get_running_loop().create_task(self._learn_loop(),
                                                                   name="predictor-learner")

    async def _learn_loop(self) -> None:
        """Learn queued timing samples, yielding to the event loop after each one, so an
        event waits at most one sample's learning (< 1 ms) instead of a whole batch."""
        while True:
            await self._learn_wake.wait()
            self._learn_wake.clear()
            while self._to_learn:
                self._learn_one()
                await asyncio.sleep(0)

    def learn_pending(self) -> int:
        """Learn every queued timing sample now; returns how many there were."""
        n = 0
        while self._to_learn:
            self._learn_one()
            n += 1
        return n

    def _learn_one(self) -> None:
        device, profile, sample = self._to_learn.popleft()
        self.costs.observe_many(profile, [sample])  # a malformed sample is logged, skipped
        if self.costs.drift(device):
            self._on_drift(device)

    def _on_drift(self, device: str) -> None:
        """``device``'s speed changed: record it, and ask for a re-plan if that moves cuts."""
        moved = self.partition_would_move()
        step = self.state.step
        replan = moved and self.cfg.auto_replan and self._replan_allowed_at(step)
        if replan:
            self.request_replan(f"{device} changed speed")
        elif moved and self.cfg.auto_replan:
            self._deferred_replan = f"{device} changed speed"
        events = self.costs.drift_events(device)
        # the size of this change (measured / its own earlier times), not the device's
        # offset against the shared model, which also holds its profile's error
        change = events[-1].factor if events else self.costs.device_factor(device)
        ev = {"type": "drift", "device": device, "step": step,
              "speed_factor": round(change, 3),
              "vs_model": round(self.costs.device_factor(device), 3),
              "error": self.costs.device_error(device), "partition_moves": moved,
              "action": ("re-plan at the next step" if replan else
                         f"re-plan once {self.cfg.replan_min_steps} steps have passed since "
                         "the last, if it still moves the partition"
                         if moved and self.cfg.auto_replan else
                         "re-plan advised (auto_replan off)" if moved else
                         "none: the current partition is still the best")}
        self.state.drifts.append(ev)
        log.warning("device %s changed speed: %.2fx its own earlier times", device,
                    ev["speed_factor"])
        self.say("replan", {"reason": f"{device} now takes {ev['speed_factor']}x "
                                      "its earlier time"})
        self.emit(as_metric(Drift, ev))

    async def close(self) -> None:
        """Stop the background learner (queued samples stay queued)."""
        await cancel_and_wait(self._learner)
