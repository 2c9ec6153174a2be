"""The coordinator: discovers agents, plans, drives synchronous micro-batched training.

Use::

    async with Coordinator(broker_url, config, job="j1") as coord:
        record = await coord.run()

Guarantees:

* One optimizer step per mini-batch on every stage; with compression off the arithmetic is the
  one-process reference's (``reference.train_reference``).
* The coordinator is the data source: it publishes each micro-batch (inputs + labels) to
  ``stage/0/fwd`` and, under 1F1B, keeps at most as many micro-batches in flight as there are
  stages; under GPipe it injects the whole mini-batch at once.
* Every error an agent reports, and every event the coordinator cannot use, is logged and
  kept in the run record; a bad message never stops training.
* On exit (normal, error or cancel) the retained plan is cleared, so agents go back to idle.
* Faults (docs/faults.md): every ``checkpoint_every`` steps the state of every stage
  (weights, buffers, optimizer state) is collected and saved atomically to
  ``runs/<job>/checkpoint.pt``. A device that goes offline (Last Will) makes the coordinator
  re-plan over the devices still online (newly joined ones included), restore every stage
  from the last checkpoint and replay from there: at most the steps since that checkpoint are
  redone, none is skipped, and with compression off the final parameters are those of an
  undisturbed run. A lost broker connection is retried; then every stage is rewound to the
  start of the step in flight (agents keep the start-of-step state), so no step is lost or
  applied twice. ``resume`` restarts a job from its checkpoint after a coordinator restart.
* ``repartition``, ``set`` (bit widths) and drift that moves the partition re-plan live at a
  step boundary: checkpoint, new plan, restore; nothing is lost.
* The latency predictor learns every timing sample the agents send, in arrival order, in
  the gaps of the event loop rather than when the sample arrives (``on_timing``), so learning
  never holds up a step's events; every queued sample is learnt before any re-plan.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import msgpack
import torch

from accept_mqtt.model.checkpoint import Checkpoint
from accept_mqtt.model.data import Dataset, load_dataset
from accept_mqtt.model.descriptors import describe
from accept_mqtt.model.microbatch import epoch_batches, split
from accept_mqtt.model.zoo import ZOO, build_model
from accept_mqtt.wire import codec
from accept_mqtt.wire.aio import cancel_and_wait, retry
from accept_mqtt.wire.broker_url import parse_broker_url
from accept_mqtt.wire.plan import Plan
from accept_mqtt.wire.topics import Topics, check_id

from .config import TrainConfig
from .errors import BrokerLost, CoordinatorError, DeviceLost, DevicesTimeout, StepTimeout
from .planner import DeviceInfo, build_plan, make_partition, prior_costs
from .recovery import Recovery

__all__ = ["BrokerLost", "Coordinator", "CoordinatorError", "DeviceLost", "DevicesTimeout",
           "StepTimeout", "new_job_id"]

log = logging.getLogger("accept_mqtt.coordinator")


def new_job_id() -> str:
    return "job-" + uuid.uuid4().hex[:8]


Progress = Callable[[str, dict[str, Any]], None]

CONTROL_COMMANDS = ("start", "pause", "resume", "stop", "status", "repartition", "set")


@dataclass
class StageTotals:
    busy_ms: float = 0.0
    send_ms: float = 0.0
    bytes_act: int = 0
    bytes_grad: int = 0
    steps: int = 0


@dataclass
class RunState:
    step: int = 0
    epoch: int = 0
    samples: int = 0
    microbatches: int = 0
    train_s: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    drifts: list[dict[str, Any]] = field(default_factory=list)
    stages: dict[int, StageTotals] = field(default_factory=dict)
    recoveries: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: list[int] = field(default_factory=list)  # steps checkpointed
    replans: list[dict[str, Any]] = field(default_factory=list)  # live re-plans
    replayed_steps: int = 0

    def counters(self) -> dict[str, Any]:
        """What a checkpoint keeps of the run, so a resumed record reads as one run."""
        return {"step": self.step, "epoch": self.epoch, "history": list(self.history)}


class Coordinator(Recovery):
    def __init__(
        self,
        broker: str,
        config: TrainConfig,
        *,
        job: str | None = None,
        root: str = "accept",
        progress: Progress | None = None,
    ) -> None:
        self.cfg = config.validate()
        self.job = check_id("job", job or new_job_id())
        self.topics = Topics(root)
        self.url = parse_broker_url(broker)
        self.progress = progress or (lambda kind, info: log.debug("%s %s", kind, info))
        self.devices: dict[str, dict[str, Any]] = {}  # id -> {"status": {...}, "profile": {...}}
        self.state = RunState()
        self.plan: Plan | None = None
        self._client: aiomqtt.Client | None = None
        self._reader: asyncio.Task[None] | None = None
        self._events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._weights: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._device_change = asyncio.Event()
        self._running = asyncio.Event()  # cleared by the 'pause' control command
        self._running.set()
        self.stop_requested = False
        self.timing_samples: list[dict[str, Any]] = []
        self.profiles: dict[str, dict[str, Any]] = {}
        self._info: dict[str, DeviceInfo] = {}
        self.costs: Any = None  # predictor.CostModel when planning by prediction
        self.gen = 0  # rewind generation of the current plan (frames and events carry it)
        self.last_ckpt: Checkpoint | None = None
        self._replan_request: str | None = None
        self._last_replan_step = -(10**9)
        self._bg: set[asyncio.Task[Any]] = set()
        self._need_reconnect = False  # a publish failed: the connection is not to be trusted
        # timing samples waiting for the predictor: (device, profile, sample), oldest first
        self._to_learn: collections.deque[tuple[str, dict[str, Any], dict[str, Any]]] = (
            collections.deque())
        self._learn_wake = asyncio.Event()
        self._learner: asyncio.Task[None] | None = None

    # -- connection ----------------------------------------------------------------------
    async def __aenter__(self) -> Coordinator:
        await self._connect()
        return self

    async def _connect(self) -> None:
        """Connect, subscribe and start the reader (first time and after a lost broker).

        A clean session: what matters after a reconnect is re-synchronised explicitly (plan
        re-published, stages rewound), so nothing depends on the broker having kept queues.
        """
        client = aiomqtt.Client(**self.url.client_kwargs(),
                                identifier=f"accept-coord-{self.job}",
                                keepalive=10, max_inflight_messages=100)
        await client.__aenter__()
        self._client = client
        t = self.topics
        for topic in (t.all_status, t.all_profiles, f"{t.job(self.job)}/events/+",
                      t.metrics(self.job), t.control(self.job), f"{t.job(self.job)}/timing/+",
                      f"{t.job(self.job)}/weights/+"):
            await client.subscribe(topic, qos=1)
        self._reader = asyncio.create_task(self._read(), name="coordinator-reader")

    async def _reconnect(self) -> None:
        """Retry the broker for ``reconnect_timeout`` seconds."""
        await cancel_and_wait(self._reader)
        old, self._client = self._client, None
        if old is not None:
            with contextlib.suppress(Exception):
                await old.__aexit__(None, None, None)
        def say(e: BaseException, delay: float) -> None:
            self.progress("status", {"msg": f"broker unreachable ({e}); retrying"})

        try:
            await retry(self._connect, self.cfg.reconnect_timeout, aiomqtt.MqttError, say)
        except aiomqtt.MqttError as e:
            raise CoordinatorError(f"broker {self.url} unreachable for "
                                   f"{self.cfg.reconnect_timeout:.0f}s: {e}") from None

    def _soon(self, coro: Any) -> None:
        """Run a publish in the background; a broker hiccup there is not an error."""
        async def guarded() -> None:
            with contextlib.suppress(aiomqtt.MqttError):
                await coro
        task = asyncio.get_running_loop().create_task(guarded())
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    async def __aexit__(self, *exc: object) -> None:
        await cancel_and_wait(self._learner, *self._bg)
        if self._client is not None:
            with contextlib.suppress(Exception):
                # clearing the retained plan tells every agent that the job is over
                await self._client.publish(self.topics.plan(self.job), b"", qos=1, retain=True,
                                           timeout=5)
        await cancel_and_wait(self._reader)
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.__aexit__(None, None, None)
        self._client = None

    async def _publish(self, topic: str, payload: bytes | str, qos: int = 1,
                       retain: bool = False) -> None:
        if self._client is None:
            raise BrokerLost("not connected to the broker")
        try:
            await self._client.publish(topic, payload, qos=qos, retain=retain)
        except aiomqtt.MqttError as e:
            raise BrokerLost(f"publish to {topic} failed: {e}") from e

    async def _metric(self, body: dict[str, Any]) -> None:
        body = {"job": self.job, "time": time.time(), **body}
        await self._publish(self.topics.metrics(self.job), json.dumps(body), qos=0)

    # -- incoming ------------------------------------------------------------------------
    async def _read(self) -> None:
        assert self._client is not None
        try:
            async for msg in self._client.messages:
                topic = msg.topic.value
                payload = bytes(msg.payload or b"")
                try:
                    self._route(topic, payload)
                except Exception as e:  # never let one message kill the reader
                    log.warning("ignored message on %s: %s", topic, e)
        except aiomqtt.MqttError as e:
            log.warning("connection to %s lost: %s", self.url, e)
            self._events.put_nowait({"op": "disconnected", "reason": str(e)})

    def _route(self, topic: str, payload: bytes) -> None:
        dev = self.topics.parse_device(topic)
        if dev is not None:
            kind = topic.rsplit("/", 1)[1]
            if kind in ("status", "profile"):
                body = json.loads(payload) if payload else {"state": "offline"}
                self.devices.setdefault(dev, {})[kind] = body
                if kind == "status" and body.get("state") == "offline" and self.plan and (
                        dev in self.plan.devices):
                    self._events.put_nowait({"op": "lost", "device": dev})
                self._device_change.set()
            return
        tail = self.topics.parse_tail(topic, self.job)
        if not tail:
            return
        if tail[0] == "events":
            ev = json.loads(payload)
            if self._stale_event(ev):
                return
            if ev.get("op") == "stepped":
                self._on_stepped(ev)
            else:
                self._events.put_nowait(ev)
        elif tail[0] == "metrics":
            body = json.loads(payload)
            if isinstance(body, dict) and body.get("type") == "error":
                self.state.errors.append(body)
                log.warning("device %s rejected %s: %s", body.get("device"), body.get("topic"),
                            body.get("reason"))
                self.progress("error", body)
        elif tail[0] == "control":
            self._on_control(payload)
        elif tail[0] == "timing":
            samples = json.loads(payload)
            if isinstance(samples, list):
                self.on_timing(tail[1], samples)
        elif tail[0] == "weights":
            body = msgpack.unpackb(payload, raw=False)
            if isinstance(body, dict) and body.get("purpose") != "restore":  # not our echo
                self._weights.put_nowait(body)

    def _stale_event(self, ev: dict[str, Any]) -> bool:
        """An event of an earlier plan version or rewind generation (absent keys: current)."""
        pv = ev.get("pv")
        if self.plan is not None and pv is not None and pv != self.plan.version:
            return True
        if ev.get("op") == "rewound":
            return ev.get("rewind_gen") != self.gen
        return ev.get("gen") is not None and ev.get("gen") != self.gen

    def _on_control(self, payload: bytes) -> None:
        """A user's command on ``{root}/jobs/{job}/control``; a bad one changes nothing."""
        topic = self.topics.control(self.job)
        try:
            cmd = json.loads(payload)
            if not isinstance(cmd, dict) or not isinstance(cmd.get("cmd"), str):
                raise ValueError("expected a JSON object with a string 'cmd'")
        except ValueError as e:
            self._control_error(topic, f"malformed control message: {e}")
            return
        name = cmd["cmd"]
        if name not in CONTROL_COMMANDS:
            self._control_error(topic, f"unknown command {name!r}; known: "
                                f"{', '.join(CONTROL_COMMANDS)}")
            return
        log.info("control: %s", cmd)
        if name == "pause":
            self._running.clear()
        elif name in ("resume", "start"):
            self._running.set()
        elif name == "stop":
            self.stop_requested = True
            self._running.set()
        elif name == "repartition":
            self._replan_request = "repartition command"
        elif name == "set":
            try:
                self._apply_set(cmd)
            except (ValueError, TypeError) as e:
                self._control_error(topic, f"set: {e}; nothing changed")
                return
        self._soon(self._metric({"type": "status", "command": name, **self.status()}))

    def _apply_set(self, cmd: dict[str, Any]) -> None:
        """``{"cmd": "set", "act_bits": 8, "grad_bits": 8}``: new widths, applied by a re-plan."""
        from dataclasses import replace

        from .config import ConfigError

        keys = sorted(set(cmd) - {"cmd"})
        if not keys or set(keys) - {"act_bits", "grad_bits"}:
            raise ValueError(f"expected act_bits and/or grad_bits, got keys {keys}")
        changes = {}
        for k in keys:
            v = cmd[k]
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"{k} must be an int, got {v!r}")
            changes[k] = v
        try:
            self.cfg = replace(self.cfg, **changes).validate()
        except ConfigError as e:
            raise ValueError(str(e)) from None
        self._replan_request = "set " + ", ".join(f"{k}={v}" for k, v in changes.items())

    def _partition_would_move(self) -> bool:
        """Whether planning now, with what the predictor has learnt, gives other cuts/order."""
        if self.plan is None or not self._info:
            return False
        try:
            fresh = self.make_plan(list(self._info.values()), version=self.plan.version + 1)
        except Exception as e:  # planning trouble must not stop training
            log.warning("re-planning check failed: %s", e)
            return False
        return fresh.layout(bits=False) != self.plan.layout(bits=False)

    def _control_error(self, topic: str, reason: str) -> None:
        log.warning("control message rejected: %s", reason)
        err = {"type": "error", "device": "coordinator", "topic": topic, "reason": reason}
        self.state.errors.append(err)
        self.progress("error", err)
        self._soon(self._metric(err))

    def status(self) -> dict[str, Any]:
        return {"step": self.state.step, "epoch": self.state.epoch,
                "paused": not self._running.is_set(), "stopping": self.stop_requested,
                "plan_version": self.plan.version if self.plan else None,
                "devices": self.plan.devices if self.plan else []}

    def on_timing(self, device: str, samples: list[dict[str, Any]]) -> None:
        """Timing samples of one device: kept, and queued for the predictor.

        Learning costs about 0.1-0.3 ms per sample (River), some 30 samples per step, so it
        is not done here, in the reader that also delivers the step's events: the background
        learner (``_learn_loop``) learns the queue one sample at a time in the gaps of the
        event loop, and ``learn_pending`` empties it before any re-plan and before the record
        is written. Every sample is learnt, in arrival order; a speed change the predictor
        detects is reported as ``drift`` (``_on_drift``) when its sample is learnt, in
        practice within the step that follows.
        """
        for s in samples:
            s["device"] = device
        self.timing_samples.extend(samples)
        profile = self.profiles.get(device) or self.devices.get(device, {}).get("profile")
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
        moved = self._partition_would_move()
        replan = moved and self.cfg.auto_replan and (
            self.state.step - self._last_replan_step >= self.cfg.replan_min_steps)
        if replan:
            self._replan_request = f"{device} changed speed"
        events = self.costs.drift_events(device)
        # the size of this change (measured / its own earlier times), not the device's
        # offset against the shared model, which also holds its profile's error
        change = events[-1].factor if events else self.costs.device_factor(device)
        ev = {"type": "drift", "device": device, "step": self.state.step,
              "speed_factor": round(change, 3),
              "vs_model": round(self.costs.device_factor(device), 3),
              "error": self.costs.device_error(device), "partition_moves": moved,
              "action": ("re-plan at the next step" if replan else
                         "re-plan advised (auto_replan off or a re-plan was recent)"
                         if moved else "none: the current partition is still the best")}
        self.state.drifts.append(ev)
        log.warning("device %s changed speed: %.2fx its own earlier times", device,
                    ev["speed_factor"])
        self.progress("replan", {"reason": f"{device} now takes {ev['speed_factor']}x "
                                           "its earlier time"})
        self._soon(self._metric(ev))

    def _stage_totals(self) -> list[dict[str, Any]]:
        """Cumulative per-stage counters of this plan's agents (for the metrics topic)."""
        assert self.plan is not None
        out = []
        for s in self.plan.stages:
            tot = self.state.stages.get(s.index, StageTotals())
            out.append({"stage": s.index, "device": s.device, "busy_ms": round(tot.busy_ms, 3),
                        "send_ms": round(tot.send_ms, 3), "bytes_act": tot.bytes_act,
                        "bytes_grad": tot.bytes_grad})
        return out

    def _on_stepped(self, ev: dict[str, Any]) -> None:
        k = int(ev["stage"])
        tot = self.state.stages.setdefault(k, StageTotals())
        tot.busy_ms = float(ev["busy_ms"])
        tot.send_ms = float(ev["send_ms"])
        tot.bytes_act = int(ev["bytes_act"])
        tot.bytes_grad = int(ev["bytes_grad"])
        tot.steps += 1

    async def _next_event(self, timeout: float, waiting_for: str) -> dict[str, Any]:
        """The next agent event; raises ``DeviceLost`` for a plan device that is offline *now*
        (a Will followed by the device's return is not a loss) and ``BrokerLost``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                ev = await asyncio.wait_for(self._events.get(),
                                            max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise StepTimeout(f"no progress for {timeout:.0f}s while waiting for "
                                  f"{waiting_for}") from None
            if ev.get("op") == "lost":
                dev = ev["device"]
                if self.plan is not None and dev in self.plan.devices and (
                        self._device_state(dev) == "offline"):
                    raise DeviceLost(dev)
                continue
            if ev.get("op") == "disconnected":
                raise BrokerLost(ev.get("reason", "connection lost"))
            return ev

    def _device_state(self, dev: str) -> str:
        st = self.devices.get(dev, {}).get("status", {})
        if st.get("state") == "busy" and st.get("job") != self.job:
            return "elsewhere"
        return str(st.get("state", "unknown"))

    # -- discovery and planning ----------------------------------------------------------
    def online_devices(self, exclude: set[str] | frozenset[str] = frozenset()) -> list[DeviceInfo]:
        """Devices free for this job: idle ones, and those already busy with this job."""
        out = []
        for dev, d in self.devices.items():
            st = d.get("status", {})
            free = st.get("state") == "online" or (st.get("state") == "busy"
                                                   and st.get("job") == self.job)
            if free and "profile" in d and dev not in exclude:
                out.append(DeviceInfo(dev, d["profile"]))
        return out

    async def wait_for_devices(self, n: int, timeout: float,
                               exclude: set[str] | frozenset[str] = frozenset(),
                               at_least: int | None = None) -> list[DeviceInfo]:
        """The ``n`` fastest free devices (fastest first, ties by id: reproducible).

        Waits up to ``timeout``; then ``at_least`` devices will do (a re-plan after a loss
        takes what is there), fewer raise ``DevicesTimeout`` with what was seen.
        """
        deadline = time.monotonic() + timeout
        while True:
            online = self.online_devices(exclude)
            self.progress("devices", {"online": len(online), "wanted": n})
            left = deadline - time.monotonic()
            if len(online) >= n or (left <= 0 and len(online) >= (at_least or n)):
                return sorted(online, key=lambda d: (-d.speed, d.id))[:n]
            if left <= 0:
                seen = ", ".join(f"{k}={v.get('status', {}).get('state', '?')}"
                                 for k, v in sorted(self.devices.items())) or "none"
                raise DevicesTimeout(
                    f"waited {timeout:.0f}s for {at_least or n} idle device agents on "
                    f"{self.url}, found {len(online)} (seen: {seen}); start agents with "
                    f"'python -m device_agent --broker {self.url} --device-id NAME'"
                )
            self._device_change.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._device_change.wait(), min(left, 1.0))

    def make_plan(self, devices: list[DeviceInfo], version: int = 1,
                  start_step: int = 0) -> Plan:
        model = build_model(self.cfg.model, seed=self.cfg.seed, width=self.cfg.width)
        descs = describe(model)
        method = {"auto": "dp", "predictor": "dp"}.get(self.cfg.partition, self.cfg.partition)
        res = make_partition(descs, devices, self.cfg, method=method, costs=self.layer_costs)
        name = {"dp": f"dp+{self.cost_source}"}.get(method, method)
        return build_plan(self.job, self.cfg, len(descs), [self._info[d] for d in res.devices],
                          list(res.cuts), method=name, version=version,
                          act_bits=list(res.act_bits), grad_bits=list(res.grad_bits),
                          predicted_ms=list(res.stage_ms), bottleneck_ms=res.bottleneck_ms,
                          start_step=start_step)

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

    def _load_costs(self) -> None:
        """The online latency predictor (River), seeded, or restored from ``predictor_state``."""
        if self.cfg.partition not in ("auto", "predictor") or self.costs is not None:
            return
        from accept_mqtt.planning.predictor import CostModel

        self.progress("status", {"msg": "loading the latency predictor"})
        self.costs = CostModel.load_or_seed(self.cfg.predictor_state)

    async def publish_plan(self, plan: Plan, timeout: float = 60.0) -> None:
        """Publish ``plan`` retained and wait until every stage's agent says it is ready."""
        if self.plan is None or self.plan.version != plan.version:
            self.gen = 0
            self.state.stages = {}  # the new stages count from zero
            self._drain_events()
        self.plan = plan
        await self._publish(self.topics.plan(self.job), plan.to_json(), retain=True)
        ready: set[int] = set()
        deadline = time.monotonic() + timeout
        while len(ready) < len(plan.stages):
            ev = await self._next_event(max(0.1, deadline - time.monotonic()),
                                        f"agents to load plan v{plan.version}")
            if ev.get("op") == "ready" and ev.get("version") == plan.version:
                ready.add(int(ev["stage"]))
        self.progress("plan", {"plan": plan.to_dict()})

    # -- training ------------------------------------------------------------------------
    def _input_frame(self, x: torch.Tensor, y: torch.Tensor, step: int, mb: int,
                     extra: dict[str, Any]) -> bytes:
        assert self.plan is not None
        f = codec.encode(x, bits=32, job=self.job, step=step, mb=mb, kind="act", labels=y,
                         extra={**extra, "pv": self.plan.version, "gen": self.gen})
        return codec.to_bytes(f)

    async def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        """One mini-batch through the pipeline; returns loss and accuracy of the batch."""
        assert self.plan is not None
        step, bsz = self.state.step, len(x)
        mbs = split(bsz, self.plan.micro_batches)
        nmb, k = len(mbs), len(self.plan.stages)
        window = nmb if self.plan.schedule == "gpipe" else k
        extra = {"nmb": nmb, "bsz": bsz, "train": True}
        fwd0 = self.topics.fwd(self.job, 0)
        sent = done = 0
        losses: dict[int, dict[str, Any]] = {}
        while done < nmb or len(losses) < nmb:
            while sent < nmb and sent - done < window:
                a, b = mbs[sent]
                await self._publish(fwd0, self._input_frame(x[a:b], y[a:b], step, sent, extra))
                sent += 1
            ev = await self._next_event(self.cfg.step_timeout, f"step {step}")
            if ev.get("step") != step:
                continue  # a late event of an earlier step or an eval: nothing to do
            if ev.get("op") == "done":
                done += 1
            elif ev.get("op") == "loss":
                losses[int(ev["mb"])] = ev
        self.state.step += 1
        self.state.microbatches += nmb
        loss = sum(e["loss"] for e in losses.values())
        correct = sum(e["correct"] for e in losses.values())
        return {"loss": loss, "train_acc": correct / bsz}

    async def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """Held-out accuracy through the pipeline in eval mode (no stash, no step)."""
        assert self.plan is not None
        fwd0 = self.topics.fwd(self.job, 0)
        chunks = [(i, min(i + self.cfg.eval_batch, len(x)))
                  for i in range(0, len(x), self.cfg.eval_batch)]
        for mb, (a, b) in enumerate(chunks):
            await self._publish(fwd0, self._input_frame(x[a:b], y[a:b], self.state.step, mb,
                                                        {"train": False}))
        got: dict[int, dict[str, Any]] = {}
        while len(got) < len(chunks):
            ev = await self._next_event(self.cfg.step_timeout, "evaluation results")
            if ev.get("op") == "eval" and ev.get("step") == self.state.step:
                got[int(ev["mb"])] = ev
        n = sum(e["n"] for e in got.values())
        return {"accuracy": sum(e["correct"] for e in got.values()) / max(n, 1),
                "loss": sum(e["loss_sum"] for e in got.values()) / max(n, 1)}

    async def run(self) -> dict[str, Any]:
        """Discover, plan, train, evaluate; returns (and writes) the run record."""
        cfg = self.cfg
        dataset = cfg.dataset or ZOO[cfg.model].default_dataset
        data = load_dataset(dataset, path=cfg.data_path, seed=cfg.seed,
                            synthetic_size=cfg.synthetic_size)
        resume = self._load_resume()
        self._load_costs()
        self.progress("status", {"msg": f"waiting for {cfg.devices} device agents"})
        devices = await self.wait_for_devices(cfg.devices, cfg.device_timeout)
        self.profiles = {d.id: d.profile for d in devices}
        self._info = {d.id: d for d in devices}
        if resume is None:
            await self.publish_plan(self.make_plan(devices))
        else:
            plan = self.make_plan(devices, version=resume.plan_version + 1,
                                  start_step=resume.step)
            await self.publish_plan(plan)
            await self.restore(resume)
            self.last_ckpt = resume
            self.state.recoveries.append({"type": "resumed", "restored_step": resume.step,
                                          "plan_version": plan.version})
            self.progress("status", {"msg": f"resumed job {self.job} at step {resume.step}"})
        t_start = time.time()
        await self._train(data)
        weights = await self.collect_weights()
        self.learn_pending()  # the record and the saved predictor include every sample
        record = self._record(data, dataset, t_start)
        if self.costs is not None and cfg.predictor_state:
            self.costs.save(cfg.predictor_state)
        self._write(record, weights)
        await self._metric({"type": "done", "final_accuracy": record["final_accuracy"],
                            "samples_per_s": record["samples_per_s"]})
        return record

    def _total_steps(self, n: int) -> tuple[int, int]:
        cfg = self.cfg
        per_epoch = len(epoch_batches(n, cfg.batch_size, cfg.seed, 0))
        total = per_epoch * cfg.epochs
        if cfg.max_steps is not None:
            total = min(total, cfg.max_steps)
        return per_epoch, total

    async def _train(self, data: Dataset) -> None:
        """Steps until done; faults are recovered here and training goes on."""
        per_epoch, total = self._total_steps(len(data.train_x))
        self.progress("start", {"total_steps": total, "job": self.job,
                                "first_step": self.state.step})
        timed_out_at: int | None = None
        while True:
            try:
                await self._train_steps(data, per_epoch, total)
                return
            except (DeviceLost, BrokerLost) as e:
                why = self._fault(e)
            except StepTimeout as e:
                # a stage that hangs but keeps its connection fires no Will: the rewind
                # finds it (it cannot answer) and the re-plan leaves it out. The same step
                # timing out again after that is not a fault we can route around.
                if timed_out_at == self.state.step:
                    raise
                timed_out_at = self.state.step
                why = str(e)
            while True:  # a fault during recovery starts the recovery again
                try:
                    await self._recover(why)
                    break
                except (DeviceLost, BrokerLost) as e:
                    why = self._fault(e)
                    await asyncio.sleep(0.2)  # let the reader see what happened

    def _fault(self, e: DeviceLost | BrokerLost) -> str:
        """What to say about a fault; a lost broker means: reconnect before anything else
        (a publish on a dead connection fails without yielding, before the reader notices)."""
        if isinstance(e, DeviceLost):
            return f"device {e.device} went offline"
        self._need_reconnect = True
        return f"broker connection lost ({e})"

    async def _between_steps(self) -> None:
        """Pause, checkpoints and live re-plans happen here, when no step is in flight."""
        st, cfg = self.state, self.cfg
        if not self._running.is_set():
            self.progress("status", {"msg": f"paused at step {st.step}"})
            await self._running.wait()
        if self._replan_request is not None and not self.stop_requested:
            reason, self._replan_request = self._replan_request, None
            await self._live_replan(reason)
        due = cfg.checkpoint_every and st.step % cfg.checkpoint_every == 0
        if due and st.step > 0 and st.step not in st.checkpoints[-1:]:
            await self.checkpoint()

    async def _train_steps(self, data: Dataset, per_epoch: int, total: int) -> None:
        cfg, st = self.cfg, self.state
        n = len(data.train_x)
        order: dict[int, list[Any]] = {}
        while st.step < total:
            await self._between_steps()
            if self.stop_requested:
                break
            epoch, i = divmod(st.step, per_epoch)
            if epoch not in order:  # the batches of an epoch are fixed by the seed
                order = {epoch: epoch_batches(n, cfg.batch_size, cfg.seed, epoch)}
            idx = order[epoch][i]
            st.epoch = epoch
            t0 = time.perf_counter()
            res = await self.train_step(data.train_x[idx], data.train_y[idx])
            dt = time.perf_counter() - t0
            st.train_s += dt
            st.samples += len(idx)
            info = {"type": "step", "step": st.step, "epoch": epoch, "loss": res["loss"],
                    "train_acc": res["train_acc"], "samples_per_s": len(idx) / dt,
                    "step_ms": round(dt * 1e3, 3), "total_steps": total,
                    "plan_version": self.plan.version if self.plan else None,
                    "stage_busy_ms": {k: round(v.busy_ms, 1)
                                      for k, v in sorted(st.stages.items())},
                    "stages": self._stage_totals()}
            await self._metric(info)
            self.progress("step", info)
            if st.step % per_epoch == 0 or st.step == total:
                await self._end_of_epoch(data, epoch)
        if self.stop_requested and (not st.history or st.history[-1]["step"] != st.step):
            await self._end_of_epoch(data, st.epoch)

    async def _end_of_epoch(self, data: Dataset, epoch: int) -> None:
        st = self.state
        ev = await self.evaluate(data.test_x, data.test_y)
        ep = {"type": "epoch", "epoch": epoch, "step": st.step, "test_accuracy":
              ev["accuracy"], "test_loss": ev["loss"],
              "samples_per_s": st.samples / max(st.train_s, 1e-9)}
        st.history.append(ep)
        await self._metric(ep)
        self.progress("epoch", ep)

    def _record(self, data: Dataset, dataset: str, t_start: float) -> dict[str, Any]:
        assert self.plan is not None
        st = self.state
        nmb_total = max(1, st.microbatches)
        stages = []
        for s in self.plan.stages:
            tot = st.stages.get(s.index, StageTotals())
            stages.append({
                "stage": s.index, "device": s.device, "layers": [s.start, s.end],
                "busy_ms": round(tot.busy_ms, 2), "send_ms": round(tot.send_ms, 2),
                "busy_fraction": round(tot.busy_ms / max(st.train_s * 1e3, 1e-9), 4),
                "predicted_ms": s.predicted_ms,
                "measured_ms_per_microbatch": round(tot.busy_ms / nmb_total, 4),
                "bytes_act_sent": tot.bytes_act, "bytes_grad_sent": tot.bytes_grad,
            })
        links = [{"link": f"{a['stage']}->{b['stage']}", "act_bytes": a["bytes_act_sent"],
                  "grad_bytes": b["bytes_grad_sent"]} for a, b in itertools.pairwise(stages)]
        return {
            "v": 1, "job": self.job, "dataset": dataset, "config": self.cfg.to_dict(),
            "plan": self.plan.to_dict(), "devices": self.profiles,
            "steps": st.step, "samples": st.samples, "train_seconds": round(st.train_s, 3),
            "samples_per_s": round(st.samples / max(st.train_s, 1e-9), 2),
            "final_accuracy": st.history[-1]["test_accuracy"] if st.history else None,
            "epochs": st.history, "stages": stages, "links": links, "errors": st.errors,
            "drifts": st.drifts, "timing_samples": len(self.timing_samples),
            "recoveries": st.recoveries, "checkpoints": st.checkpoints, "replans": st.replans,
            "replayed_steps": st.replayed_steps,
            "predictor_error": None if self.costs is None else {
                d: self.costs.device_error(d) for d in self.plan.devices},
            "started": t_start, "finished": time.time(), "torch": torch.__version__,
        }

    def _write(self, record: dict[str, Any], weights: dict[str, torch.Tensor]) -> None:
        out = Path(self.cfg.runs_dir) / self.job
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "record.json.tmp"
        tmp.write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
        tmp.replace(out / "record.json")
        torch.save(weights, out / "model.pt")
        record["record_path"] = str(out / "record.json")
        record["model_path"] = str(out / "model.pt")
