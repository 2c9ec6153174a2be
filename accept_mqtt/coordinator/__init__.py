"""The coordinator: discovers agents, plans, drives synchronous micro-batched training.

Use::

    async with Coordinator(broker_url, config, job="j1") as coord:
        record = await coord.run()

``Coordinator`` wires a few collaborators, each a module with its own guarantees:

* ``session.Session``: the MQTT connection, reconnects, and the only place payloads are
  parsed (into ``wire.messages``), handed to the coordinator as an ``Inbox``;
* ``fleet.Fleet``: devices' statuses and profiles, who is free for this job;
* ``planner.Planner``: the latency predictor, plans, and when to plan again (drift);
* ``steps.StepDriver``: the synchronous pipeline protocol of one step or evaluation;
* ``recovery.Recovery``: checkpoints, restores, rewinds and re-plans (docs/faults.md);
* ``control.Control``: pause/resume/stop/set/repartition commands;
* ``record``: the run's counters and ``runs/<job>/record.json``.

What the coordinator itself guarantees:

* One optimizer step per mini-batch on every stage, in the order the seed fixes; with
  compression off the arithmetic is the one-process reference's (``reference.train_reference``).
* Pause, checkpoints (every ``checkpoint_every`` steps) and live re-plans (``repartition``,
  ``set``, drift that moves the partition) happen between steps, never with a step in flight.
* A fault during training, during its recovery, or while a checkpoint or the final weights
  are collected is recovered (``Recovery.recover``) and training goes on (after a loss during
  the final collection: from the last checkpoint to the end again); the same step timing
  out twice ends the job with ``StepTimeout``. A stage's report that a delta-coded link's
  histories are out of step (``Error.resync``) is a fault of the step too: rewound at once.
  The run ends with the held-out evaluation of its last step, also when a fault during that
  evaluation was recovered.
* So is a fault during start-up: a lost broker while waiting for devices is reconnected and
  the wait goes on; a device lost or a broker restart while the first plan loads, or while
  ``--resume`` restores its checkpoint, goes through the same ``Recovery.recover`` as a fault
  in a step (the plan's devices get ``rejoin_grace`` to come back, else a re-plan over those
  here, restored from the resumed checkpoint if there is one).
* Every error an agent reports, and every message the coordinator cannot decode, is logged
  and kept in the run record; a bad message never stops training. The coordinator's own
  rejections are also published on the job's metrics topic (``device: "coordinator"``), at
  most ``REJECTS_PER_SECOND`` a second, the rest as one summary with their count. Only an
  agent's refusal of *this* plan (its version and owner) stops the job (``PlanRefused``).
* On exit (normal, error or cancel) the retained plan is cleared, so agents go back to idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from accept_mqtt.model.data import Dataset, load_dataset, reshape_inputs
from accept_mqtt.model.microbatch import epoch_batches
from accept_mqtt.model.zoo import ZOO
from accept_mqtt.wire.broker_url import parse_broker_url
from accept_mqtt.wire.messages import (
    ControlCommand,
    DeviceProfile,
    DeviceStatus,
    DoneMetric,
    Epoch,
    Error,
    Event,
    MessageError,
    StepMetric,
    TimingSample,
    Weights,
    to_builtins,
)
from accept_mqtt.wire.plan import Plan
from accept_mqtt.wire.topics import Topics, check_id

from .config import TrainConfig
from .control import Control
from .errors import (
    BrokerLost,
    CoordinatorError,
    DeltaMismatch,
    DeviceLost,
    DevicesTimeout,
    PlanRefused,
    StepTimeout,
)
from .fleet import Fleet
from .planner import DeviceInfo, Planner
from .ratelimit import RejectLimiter
from .record import RunState, as_metric, make_record, stage_counters, write_run
from .recovery import Recovery
from .session import Session
from .steps import StepDriver

__all__ = ["BrokerLost", "Coordinator", "CoordinatorError", "DeviceLost", "DevicesTimeout",
           "PlanRefused", "StepTimeout", "new_job_id"]

log = logging.getLogger("accept_mqtt.coordinator")


def new_job_id() -> str:
    return "job-" + uuid.uuid4().hex[:8]


# the coordinator's rejections of bad input published per second (docs/protocol.md)
REJECTS_PER_SECOND = 5

Progress = Callable[[str, dict[str, Any]], None]


class Coordinator:
    """One training job (see the module docstring); also the session's ``Inbox``."""

    def __init__(
        self,
        broker: str,
        config: TrainConfig,
        *,
        job: str | None = None,
        root: str = "accept",
        progress: Progress | None = None,
    ) -> None:
        cfg = config.validate()
        self.job = check_id("job", job or new_job_id())
        self.topics = Topics(root)
        self.url = parse_broker_url(broker)
        self.progress = progress or (lambda kind, info: log.debug("%s %s", kind, info))
        say = self.progress
        self.state = RunState()
        self.session = Session(self.url, self.topics, self.job, self,
                               reconnect_timeout=cfg.reconnect_timeout, lease=cfg.lease,
                               say=lambda msg: say("status", {"msg": msg}),
                               delay_s=cfg.emulate_latency_ms / 1e3)
        self.fleet = Fleet(self.job, str(self.url), say,
                           connected=lambda: self.session.alive)
        self.steps = StepDriver(self.job, self.topics, self.state, self.session, self.fleet,
                                step_timeout=cfg.step_timeout, eval_batch=cfg.eval_batch,
                                hang_timeout=cfg.hang_timeout, say=say,
                                owner=self.session.owner)
        self.planner = Planner(self.job, cfg, self.state, current=lambda: self.steps.plan,
                               emit=self.session.emit, say=say)
        self.recovery = Recovery(self.job, self.topics, self.state, session=self.session,
                                 fleet=self.fleet, planner=self.planner, steps=self.steps,
                                 say=say)
        self._rejects = RejectLimiter(per_window=REJECTS_PER_SECOND, window_s=1.0)
        self._rejects_summary: asyncio.TimerHandle | None = None
        self.control = Control(self.topics.control(self.job), self.state, self.planner,
                               current=lambda: self.steps.plan, reply=self.session.reply,
                               say=say)

    # -- what tests, tools and benchmarks look at --------------------------------------------
    @property
    def cfg(self) -> TrainConfig:
        """The job's configuration (``set`` changes its bit widths)."""
        return self.planner.cfg

    @property
    def plan(self) -> Plan | None:
        return self.steps.plan

    @property
    def devices(self) -> dict[str, dict[str, Any]]:
        """``{device: {"status": {...}, "profile": {...}}}`` of every device seen."""
        return self.fleet.snapshot()

    @property
    def profiles(self) -> dict[str, dict[str, Any]]:
        return self.planner.profiles

    @property
    def costs(self) -> Any:
        return self.planner.costs

    @costs.setter
    def costs(self, model: Any) -> None:
        self.planner.costs = model

    @property
    def timing_samples(self) -> Sequence[dict[str, Any]]:
        """The latest timing samples (bounded: ``planner.TIMING_SAMPLES_KEPT``)."""
        return self.planner.timing_samples

    @property
    def _running(self) -> asyncio.Event:
        """Cleared by ``pause`` (tests hold training with it)."""
        return self.control.running

    def learn_pending(self) -> int:
        return self.planner.learn_pending()

    async def publish_plan(self, plan: Plan, timeout: float = 60.0) -> None:
        await self.steps.publish_plan(plan, timeout)

    # -- connection ----------------------------------------------------------------------
    async def __aenter__(self) -> Coordinator:
        await self.session.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._rejects_summary is not None:  # what the rate limit held back goes out now
            self._rejects_summary.cancel()
            self._rejects_summary = None
            summary = self._held_back()
            if summary is not None:
                with contextlib.suppress(Exception):  # the broker may be gone: logged anyway
                    await self.session.metric(summary)
        await self.planner.close()
        await self.session.close()

    # -- Inbox: what the session delivers ------------------------------------------------
    def on_status(self, device: str, status: DeviceStatus | None) -> None:
        self.fleet.update_status(device, status)
        if status is None or status.state == "offline":
            self.steps.device_offline(device)

    def on_profile(self, device: str, profile: DeviceProfile | None) -> None:
        self.fleet.update_profile(device, profile)

    def on_event(self, event: Event) -> None:
        self.steps.on_event(event)

    def on_error_metric(self, error: Error) -> None:
        if error.device == "coordinator":
            return  # our own, back from the broker: recorded when it was sent
        body = to_builtins(error)
        self.state.add_error(body)
        log.warning("device %s rejected %s: %s", error.device, error.topic, error.reason)
        self.progress("error", body)
        if error.topic == self.topics.plan(self.job) and error.plan_version is not None:
            # a refusal of a plan the device could read (an error without a version is
            # about a payload that was no plan at all: bad input, training goes on)
            self.steps.plan_refused(error.device, error.reason, error.plan_version,
                                    error.plan_owner)
        if error.resync:  # a delta link out of step: the step in flight is rewound at once
            self.steps.resync(error.device, error.reason, error.pv, error.gen)

    def on_control(self, command: ControlCommand | MessageError,
                   request_id: str | None = None) -> None:
        self.control.on_command(command, request_id)

    def on_timing(self, device: str,
                  samples: Sequence[TimingSample] | Sequence[Mapping[str, Any]]) -> None:
        """Timing samples of one device (as decoded, or as dicts): see ``Planner.on_timing``."""
        dicts = [dict(s) if isinstance(s, Mapping) else to_builtins(s) for s in samples]
        self.planner.on_timing(device, dicts, self.fleet.profile(device))

    def on_weights(self, weights: Weights) -> None:
        self.recovery.on_weights(weights)

    def on_bad_message(self, error: MessageError) -> None:
        """Logged (by the session), recorded, and published on the job's metrics topic,
        rate-limited (``ratelimit``): the ones over the limit go out as one summary."""
        err = {"type": "error", "device": "coordinator", "topic": error.topic,
               "reason": error.reason}
        self.state.add_error(err)
        self.progress("error", err)
        if self._rejects.admit(error.topic):
            self.session.emit(Error(device="coordinator", topic=error.topic,
                                    reason=error.reason))
        elif self._rejects_summary is None:  # the first one over the limit in this window
            self._rejects_summary = asyncio.get_running_loop().call_later(
                self._rejects.window_left(), self._publish_rejects_summary)

    def _publish_rejects_summary(self) -> None:
        self._rejects_summary = None
        summary = self._held_back()
        if summary is not None:
            self.session.emit(summary)

    def _held_back(self) -> Error | None:
        """The summary of the rejections the rate limit held back (None: there were none)."""
        n, topics = self._rejects.drain()
        if not n:
            return None
        lim = self._rejects
        return Error(device="coordinator", topic=topics[0], suppressed=n,
                     suppressed_topics=topics,
                     reason=f"{n} more rejected messages not published one by one (at most "
                            f"{lim.per_window} per {lim.window_s:g} s), on {', '.join(topics)}"
                            f"{' and more' if len(topics) == lim.max_topics else ''}; the "
                            "coordinator's log and the run record have each")

    def on_disconnected(self, reason: str) -> None:
        self.steps.disconnected(reason)

    # -- the job -------------------------------------------------------------------------
    async def run(self) -> dict[str, Any]:
        """Discover, plan, train, evaluate; returns (and writes) the run record."""
        cfg = self.cfg
        dataset = cfg.dataset or ZOO[cfg.model].default_dataset
        # in a thread: the loop keeps answering the broker meanwhile (measured: 13.5 s to
        # make a 50,000-sample synthetic CIFAR on a busy machine, which let the broker drop
        # the coordinator's connection at 1.5x its 10 s keepalive)
        data = await asyncio.to_thread(load_dataset, dataset, path=cfg.data_path,
                                       seed=cfg.seed, synthetic_size=cfg.synthetic_size)
        if cfg.input_shape is not None:
            data = reshape_inputs(data, tuple(cfg.input_shape))
        # the model is built and checked here, before any device is touched
        self.planner.use_model(data.input_shape, data.num_classes)
        self.planner.set_run(self._total_steps(len(data.train_x))[1], dataset,
                             train_samples=len(data.train_x))
        resume = self.recovery.load_resume()
        # in a thread: seeding the predictor takes seconds (15 s on a loaded 2-core machine);
        # on the event loop it would starve the MQTT keep-alive and the broker would drop us
        await asyncio.to_thread(self.planner.load_costs)
        self.progress("status", {"msg": f"waiting for {cfg.devices} device agents"})
        devices = await self._discover()
        self.planner.start_with(devices)
        try:
            if resume is None:
                await self.steps.publish_plan(self.planner.make_plan(devices))
            else:
                await self.recovery.resume(resume, devices)
        except (DeviceLost, BrokerLost) as e:  # before step 0: recovered like a step's fault
            await self._recover(self._fault(e))
        t_start = time.time()
        # the coordinator's own torch work (slicing batches) is tiny: more intra-op threads
        # only spin against the agents on a small machine (measured: 15.6 -> 5.7 ms of CPU
        # per digits step with one thread)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            weights = await self._train_and_collect(data)
        finally:
            torch.set_num_threads(threads)
        self.learn_pending()  # the record and the saved predictor include every sample
        plan = self.steps.plan
        assert plan is not None
        record = make_record(job=self.job, dataset=dataset, cfg=self.cfg, plan=plan,
                             profiles=self.profiles, state=self.state,
                             timing_samples=self.planner.timing_samples_total,
                             predictor_error=self.planner.predictor_error(plan.devices),
                             started=t_start)
        self.planner.save_costs()
        write_run(Path(self.cfg.runs_dir) / self.job, record, weights)
        await self.session.metric(DoneMetric(final_accuracy=record["final_accuracy"],
                                             samples_per_s=record["samples_per_s"]))
        return record

    def _total_steps(self, n: int) -> tuple[int, int]:
        cfg = self.cfg
        per_epoch = len(epoch_batches(n, cfg.batch_size, cfg.seed, 0))
        total = per_epoch * cfg.epochs
        if cfg.max_steps is not None:
            total = min(total, cfg.max_steps)
        return per_epoch, total

    async def _train_and_collect(self, data: Dataset) -> dict[str, torch.Tensor]:
        """Train to the end and collect the final weights. A fault while they are collected
        is recovered as one during a step (back to the last checkpoint), and training goes
        on from there to the end again."""
        while True:
            await self._train(data)
            try:
                return await self.recovery.collect_weights()
            except (DeviceLost, BrokerLost) as e:
                await self._recover(self._fault(e))

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
            except DeltaMismatch as e:
                # a rewind resets every delta history: the step's frames go again, plain
                # ones first (not after step_timeout); a rewind that fails re-plans
                why = f"{e}; rewinding"
            except StepTimeout as e:
                # a stage that hangs but keeps its connection fires no Will: the rewind
                # finds it (it cannot answer) and the re-plan leaves it out. The same step
                # timing out again after that is not a fault we can route around.
                if timed_out_at == self.state.step:
                    raise
                timed_out_at = self.state.step
                why = str(e)
            await self._recover(why)

    async def _discover(self) -> list[DeviceInfo]:
        """The job's first devices; a broker lost meanwhile is reconnected and the wait
        starts again (statuses and profiles are retained: they come again)."""
        cfg = self.cfg
        while True:
            try:
                return await self.fleet.wait_for_devices(cfg.devices, cfg.device_timeout)
            except BrokerLost as e:
                self.progress("status", {"msg": f"{e} while waiting for devices; reconnecting"})
                await self.session.reconnect()

    async def _recover(self, why: str) -> None:
        """``Recovery.recover``; a fault during recovery starts the recovery again."""
        while True:
            try:
                await self.recovery.recover(why)
                return
            except (DeviceLost, BrokerLost) as e:
                why = self._fault(e)
                await asyncio.sleep(0.2)  # let the reader see what happened

    def _fault(self, e: DeviceLost | BrokerLost) -> str:
        """What to say about a fault; a lost broker means: reconnect before anything else."""
        if isinstance(e, DeviceLost):
            return f"device {e.device} {e.why}"
        self.session.distrust()
        return f"broker connection lost ({e})"

    async def _between_steps(self) -> None:
        """Pause, checkpoints and live re-plans happen here, when no step is in flight."""
        st, cfg, control = self.state, self.cfg, self.control
        if not control.running.is_set():
            self.progress("status", {"msg": f"paused at step {st.step}"})
            await control.running.wait()
        if not control.stop_requested and (reason := self.planner.take_replan_request()):
            await self.recovery.live_replan(reason)
        due = cfg.checkpoint_every and st.step % cfg.checkpoint_every == 0
        if due and st.step > 0 and st.step not in st.checkpoints[-1:]:
            await self.recovery.checkpoint()

    async def _train_steps(self, data: Dataset, per_epoch: int, total: int) -> None:
        cfg, st = self.cfg, self.state
        n = len(data.train_x)
        order: dict[int, list[Any]] = {}
        while st.step < total:
            if self.steps.sent_ahead != st.step:  # else the devices are on this step already
                await self._between_steps()
                if self.control.stop_requested:
                    break
            epoch, i = divmod(st.step, per_epoch)
            if epoch not in order:  # the batches of an epoch are fixed by the seed
                order = {epoch: epoch_batches(n, cfg.batch_size, cfg.seed, epoch)}
            idx = order[epoch][i]
            ahead, nxt = None, None
            if self._plain_boundary(st.step + 1, per_epoch, total):
                nxt = order[epoch][i + 1]
                ahead = (data.train_x[nxt], data.train_y[nxt])
            st.epoch = epoch
            t0 = time.perf_counter()
            res = await self.steps.train_step(data.train_x[idx], data.train_y[idx], ahead,
                                              ids=idx, ahead_ids=nxt)
            dt = time.perf_counter() - t0
            st.train_s += dt
            st.samples += len(idx)
            plan = self.steps.plan
            assert plan is not None
            metric = StepMetric(
                step=st.step, epoch=epoch, loss=res["loss"], train_acc=res["train_acc"],
                samples_per_s=len(idx) / dt, step_ms=round(dt * 1e3, 3), total_steps=total,
                plan_version=plan.version, stages=stage_counters(plan, st),
                stage_busy_ms={k: round(v.busy_ms, 1) for k, v in sorted(st.stages.items())})
            self.session.emit(metric)  # nothing waits for a metric's delivery
            self.progress("step", {k: v for k, v in to_builtins(metric).items()
                                   if k not in ("job", "time")})
            if st.step % per_epoch == 0 or st.step == total:
                await self._end_of_epoch(data, epoch)
        # the held-out evaluation of the last step, unless done: a stop ends training early,
        # and a fault during that evaluation, recovered by a rewind to this very step, left
        # the loop above with nothing to run
        unevaluated = not st.history or st.history[-1]["step"] != st.step
        if unevaluated and (self.control.stop_requested or st.step >= total):
            await self._end_of_epoch(data, st.epoch)

    def _plain_boundary(self, step: int, per_epoch: int, total: int) -> bool:
        """Nothing is due before ``step`` (no evaluation, checkpoint, pause, stop or re-plan
        asked for): its inputs may go out with the step before (``StepDriver``)."""
        every = self.cfg.checkpoint_every
        return (step < total and step % per_epoch != 0 and not (every and step % every == 0)
                and self.control.running.is_set() and not self.control.stop_requested
                and not self.planner.replan_requested)

    async def _end_of_epoch(self, data: Dataset, epoch: int) -> None:
        st = self.state
        ev = await self.steps.evaluate(data.test_x, data.test_y)
        ep = {"type": "epoch", "epoch": epoch, "step": st.step, "test_accuracy":
              ev["accuracy"], "test_loss": ev["loss"],
              "samples_per_s": st.samples / max(st.train_s, 1e-9)}
        st.history.append(ep)
        await self.session.metric(as_metric(Epoch, ep))
        self.progress("epoch", ep)
