"""Checkpoints, restores, re-plans and fault recovery (docs/faults.md).

``Recovery`` works through four neighbours, each seen through a small interface: the session
(``Link``: publish, reconnect), the fleet (``Devices``: who is online), the planner (``Plans``:
the next plan, the job's config) and the step driver (``Pipeline``: the current plan, its
generation, its events). What it guarantees, tested in ``tests/test_faults.py`` by comparing
final parameters with a one-process run, and in ``tests/test_recovery.py`` against fakes:

* ``checkpoint`` collects every stage's weights, buffers and optimizer state between steps,
  checks that all stages are at the same step (the coordinator's), and saves them atomically
  to ``runs/<job>/checkpoint.pt`` (every ``checkpoint_every`` steps, by the coordinator).
  A device lost or the broker connection dropped while it collects (a checkpoint, a live
  re-plan's, the final weights) raises ``DeviceLost``/``BrokerLost`` within half a second,
  as during a step, and is recovered the same way (``recover``).
* ``replan`` publishes a new plan version and ``restore`` gives each new stage its slice of a
  checkpoint by whole-model names: weights migrate to whichever device now holds them.
* ``recover`` brings training back after a fault losing as little as possible. A lost broker
  connection is retried; when every plan device is back within ``rejoin_grace`` (broker
  restart, connection blip), every stage is rewound to the start of the step in flight
  (agents keep the start-of-step state), so no step is lost or applied twice. Otherwise (a
  device went offline, or a stage cannot rewind) it re-plans over the devices still online
  (newly joined ones included), restores every stage from the last checkpoint and replays
  from there: at most ``checkpoint_every`` steps are redone (the steps since the last
  checkpoint, fewer than ``checkpoint_every``, unless the device was lost while the
  checkpoint due at this step was being collected: then the one before it is the last, and
  exactly ``checkpoint_every`` steps are redone), none is skipped, and with compression off
  the final parameters are those of an undisturbed run.
* ``live_replan`` (``repartition``, ``set``, drift that moves the partition) checkpoints first,
  so it loses nothing; if the partition comes out the same, nothing moves.
* ``resume`` restarts a job from its checkpoint after a coordinator restart (``load_resume``
  refuses a missing, unreadable or foreign checkpoint with ``CoordinatorError``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, cast

import torch

from accept_mqtt.model.checkpoint import Checkpoint, CheckpointError, pack, unpack
from accept_mqtt.wire import chunks
from accept_mqtt.wire.messages import (
    Checkpointed,
    Event,
    Metric,
    PackedTensor,
    Recovered,
    Replan,
    Restored,
    Rewound,
    SyncRewind,
    SyncWeights,
    Weights,
    encode,
)
from accept_mqtt.wire.plan import Plan
from accept_mqtt.wire.topics import Topics

from .config import TrainConfig
from .errors import BrokerLost, CoordinatorError, DeviceLost, StepTimeout
from .planner import DeviceInfo
from .record import RunState, as_metric

log = logging.getLogger("accept_mqtt.coordinator")


class Link(Protocol):
    """The session, as recovery uses it."""

    @property
    def alive(self) -> bool: ...

    @property
    def trusted(self) -> bool: ...

    async def reconnect(self) -> None: ...

    async def publish(self, topic: str, payload: bytes | str, qos: int = 1,
                      retain: bool = False) -> None: ...

    async def metric(self, msg: Metric) -> None: ...


class Devices(Protocol):
    """The fleet, as recovery uses it."""

    def device_state(self, device: str) -> str: ...

    def online_devices(self, exclude: set[str] | frozenset[str] = frozenset()
                       ) -> list[DeviceInfo]: ...

    async def wait_for_devices(self, n: int, timeout: float,
                               exclude: set[str] | frozenset[str] = frozenset(),
                               at_least: int | None = None) -> list[DeviceInfo]: ...

    async def wait_changed(self, timeout: float) -> None: ...


class Plans(Protocol):
    """The planner, as recovery uses it."""

    cfg: TrainConfig

    def make_plan(self, devices: list[DeviceInfo], version: int = 1,
                  start_step: int = 0) -> Plan: ...

    def next_plan(self, devices: list[DeviceInfo], start_step: int) -> Plan: ...

    def device_info(self, device: str) -> DeviceInfo: ...

    def replanned(self, step: int) -> None: ...


class Pipeline(Protocol):
    """The step driver, as recovery uses it."""

    plan: Plan | None
    gen: int

    async def publish_plan(self, plan: Plan, timeout: float = 60.0) -> None: ...

    async def republish_plan(self) -> None: ...

    async def next_event(self, timeout: float, waiting_for: str) -> Event: ...

    def new_generation(self) -> int: ...


class Recovery:
    """Fault handling of one job (see the module docstring)."""

    def __init__(self, job: str, topics: Topics, state: RunState, *, session: Link,
                 fleet: Devices, planner: Plans, steps: Pipeline,
                 say: Callable[[str, dict[str, Any]], None] = lambda kind, info: None) -> None:
        self.job = job
        self.topics = topics
        self.state = state
        self.session = session
        self.fleet = fleet
        self.planner = planner
        self.steps = steps
        self.say = say
        self.last_ckpt: Checkpoint | None = None
        # a restore is under way: the stages may hold freshly built weights, not the state of
        # ``state.step``, so a rewind cannot bring them back (``recover`` restores instead)
        self.restoring = False
        self._weights: asyncio.Queue[Weights] = asyncio.Queue()

    @property
    def cfg(self) -> TrainConfig:
        return self.planner.cfg

    def _plan(self) -> Plan:
        plan = self.steps.plan
        assert plan is not None, "no plan yet"
        return plan

    # -- state of the stages ---------------------------------------------------------------
    def on_weights(self, w: Weights) -> None:
        """A stage's tensors (``purpose: checkpoint``); our own restore echo is ignored."""
        if w.purpose != "restore":
            self._weights.put_nowait(w)

    async def collect_state(self, optim: bool = True,
                            timeout: float = 60.0) -> tuple[dict[str, torch.Tensor],
                                                            dict[str, torch.Tensor], int]:
        """Every stage's tensors (whole-model names), its optimizer state and their step.

        Called between steps, so every stage reports the same step; a stage that does not
        is an error rather than a silently inconsistent checkpoint. A fault while waiting is
        raised as during a step, so that it is recovered the same way: ``DeviceLost`` as soon
        as the device of a stage still missing is offline, ``BrokerLost`` when the connection
        drops; ``CoordinatorError`` after ``timeout`` seconds without them.
        """
        plan = self._plan()
        while not self._weights.empty():
            self._weights.get_nowait()
        await self.session.publish(self.topics.sync(self.job), encode(SyncWeights(optim=optim)))
        weights: dict[str, torch.Tensor] = {}
        opt: dict[str, torch.Tensor] = {}
        steps: dict[int, int] = {}
        deadline = time.monotonic() + timeout
        while len(steps) < len(plan.stages):
            missing = sorted(set(range(len(plan.stages))) - set(steps))
            left = deadline - time.monotonic()
            if left <= 0:
                raise CoordinatorError(f"no weights from stages {missing}")
            try:
                # short waits: a device lost meanwhile is noticed within one
                w = await asyncio.wait_for(self._weights.get(), min(left, 0.5))
            except TimeoutError:
                self._check_alive(plan, missing)
                continue
            if w.version != plan.version:
                continue
            steps[w.stage] = w.step
            weights.update(unpack(dict(w.tensors)))
            opt.update(unpack(dict(w.optim or {})))
        if len(set(steps.values())) != 1:
            raise CoordinatorError(f"stages report different steps {steps}")
        return weights, opt, next(iter(steps.values()))

    def _check_alive(self, plan: Plan, stages: list[int]) -> None:
        """``BrokerLost`` without a connection; ``DeviceLost`` for the first of ``stages``
        whose device is offline now."""
        if not self.session.alive:
            raise BrokerLost("connection lost while collecting the stages' weights")
        for k in stages:
            device = plan.stages[k].device
            if self.fleet.device_state(device) == "offline":
                raise DeviceLost(device)

    async def collect_weights(self, timeout: float = 60.0) -> dict[str, torch.Tensor]:
        """Every stage's parameters and buffers, named as in the whole model."""
        return (await self.collect_state(optim=False, timeout=timeout))[0]

    def checkpoint_path(self) -> Path:
        return Path(self.cfg.runs_dir) / self.job / "checkpoint.pt"

    async def checkpoint(self) -> Checkpoint:
        """Collect every stage's state now (between steps) and save it atomically."""
        plan = self._plan()
        weights, opt, step = await self.collect_state(optim=True)
        if step != self.state.step:
            raise CoordinatorError(f"stages are at step {step}, the coordinator at "
                                   f"{self.state.step}")
        ck = Checkpoint(self.job, step, weights, opt, plan.version,
                        meta={**self.state.counters(), "config": self.cfg.to_dict()})
        await asyncio.to_thread(ck.save, self.checkpoint_path())
        self.last_ckpt = ck
        self.state.checkpoints.append(step)
        self.say("checkpoint", {"step": step})
        await self.session.metric(Checkpointed(step=step, path=str(self.checkpoint_path())))
        return ck

    async def restore(self, ck: Checkpoint, timeout: float = 60.0) -> None:
        """Send each stage of the current plan its slice of ``ck``; wait until all load it."""
        plan = self._plan()
        self.restoring = True
        for s in plan.stages:
            w, o = ck.stage(s.start, s.end)
            body = Weights(job=self.job, stage=s.index, step=ck.step, purpose="restore",
                           version=plan.version, gen=self.steps.gen, tensors=_packed(w),
                           optim=_packed(o))
            topic = self.topics.weights(self.job, s.index)
            # in chunks below the broker's size limit, all in flight at once (wire/chunks.py)
            await asyncio.gather(*(self.session.publish(topic, c) for c in
                                   chunks.split(body, self.cfg.max_message_bytes)))
        done: set[int] = set()
        deadline = time.monotonic() + timeout
        while len(done) < len(plan.stages):
            ev = await self.steps.next_event(max(0.1, deadline - time.monotonic()),
                                             f"stages to restore step {ck.step}")
            if isinstance(ev, Restored) and ev.version == plan.version:
                done.add(ev.stage)
        self.state.step = ck.step
        self.state.epoch = int(ck.meta.get("epoch", self.state.epoch))
        self.state.history = list(ck.meta.get("history", self.state.history))
        self.restoring = False

    # -- plans -----------------------------------------------------------------------------
    async def replan(self, devices: list[DeviceInfo], reason: str,
                     ck: Checkpoint | None, plan: Plan | None = None) -> Plan:
        """Adopt ``plan`` (default: the next plan over ``devices``), starting at ``ck``'s step
        (0 without one).

        Every stage is rebuilt by its agent from the model's seed, then given its slice of
        ``ck``: weights move to whichever device now holds their layers.
        """
        if plan is None:
            plan = self.planner.next_plan(devices, ck.step if ck is not None else 0)
        log.info("re-plan v%d (%s): %s", plan.version, reason, plan.layout(bits=False))
        await self.steps.publish_plan(plan)
        if ck is not None:
            await self.restore(ck)
        else:
            self.state.step, self.state.history = 0, []
        self.planner.replanned(self.state.step)
        return plan

    async def live_replan(self, reason: str) -> None:
        """Between steps: checkpoint, plan again with what is known now, restore if it moved."""
        plan = self._plan()
        ck = await self.checkpoint()
        current = {d: self.planner.device_info(d) for d in plan.devices}
        extra = [d for d in self.fleet.online_devices() if d.id not in current]
        devices = sorted([*current.values(), *extra],
                         key=lambda d: (-d.speed, d.id))[: self.cfg.devices]
        fresh = self.planner.next_plan(devices, ck.step)
        self.planner.replanned(self.state.step)
        if fresh.layout() == plan.layout():
            log.info("re-plan (%s): the partition is unchanged", reason)
            ev: dict[str, Any] = {"type": "replan", "reason": reason, "changed": False,
                                  "step": ck.step}
            self.state.replans.append(ev)
            await self.session.metric(as_metric(Replan, ev))
            return
        plan = await self.replan(devices, reason, ck, fresh)
        ev = {"type": "replan", "reason": reason, "changed": True, "step": ck.step,
              "plan_version": plan.version, "stages": plan.to_dict()["stages"]}
        self.state.replans.append(ev)
        await self.session.metric(as_metric(Replan, ev))
        self.say("replan", {"reason": f"{reason}: now {', '.join(plan.devices)}"})

    # -- faults ----------------------------------------------------------------------------
    async def recover(self, why: str) -> None:
        """Bring training back after a fault, losing as little as possible.

        1. Reconnect if the broker connection is gone; re-publish the plan.
        2. Give the plan's devices ``rejoin_grace`` seconds to be back in this job (a broker
           restart fires every device's Will, and the devices reconnect by themselves).
        3. All back: rewind every stage to the start of the step in flight (no step lost).
        4. Otherwise (or a stage cannot rewind, or a restore was under way): re-plan over the
           devices still here plus idle ones, restore the last checkpoint, replay the steps
           since it.
        """
        plan = self._plan()
        st = self.state
        at = st.step
        self.say("status", {"msg": f"{why} at step {at}; recovering"})
        if not self.session.trusted:
            await self.session.reconnect()
            await self.steps.republish_plan()
        missing = await self.wait_back(self.cfg.rejoin_grace)
        # the re-plan leaves out only devices that are not there: one still loading the plan
        # (idle, or busy with this job: a fault at start-up) or back as a fresh process is kept
        lost = {d for d in missing if self.fleet.device_state(d) not in ("online", "busy")}
        if not missing and not self.restoring:
            failed = await self.rewind_all(at)
            if not failed:
                rec: dict[str, Any] = {
                    "type": "recovered", "reason": why, "at_step": at, "restored_step": at,
                    "redo_steps": 0, "action": "rewind", "plan_version": plan.version}
                st.recoveries.append(rec)
                self.say("replan", {"reason": f"{why}; all stages back, step {at} redone"})
                await self.session.metric(as_metric(Recovered, rec))
                return
            lost = failed
        ck = self.last_ckpt
        back_to = ck.step if ck is not None else 0
        devices = await self.fleet.wait_for_devices(
            self.cfg.devices, min(self.cfg.device_timeout, 5.0), exclude=lost, at_least=1)
        plan = await self.replan(devices, why, ck)
        st.replayed_steps += at - back_to
        rec = {"type": "recovered", "reason": why, "lost": sorted(lost),
               "device": min(lost, default=None), "at_step": at, "restored_step": back_to,
               "redo_steps": at - back_to, "action": "re-plan from checkpoint",
               "plan_version": plan.version, "devices": plan.devices}
        st.recoveries.append(rec)
        log.warning("recovered (%s): plan v%d on %s, back to step %d", why, plan.version,
                    plan.devices, back_to)
        self.say("replan", {"reason": f"{why}; now on {', '.join(plan.devices)}, back "
                                      f"to step {back_to}"})
        await self.session.metric(as_metric(Recovered, rec))

    async def wait_back(self, grace: float) -> set[str]:
        """Plan devices not back in this job after ``grace`` seconds (empty: all are)."""
        plan = self._plan()
        deadline = time.monotonic() + grace
        while True:
            if not self.session.alive:
                raise BrokerLost("connection lost again while recovering")
            missing = {d for d in plan.devices if self.fleet.device_state(d) != "busy"}
            left = deadline - time.monotonic()
            if not missing or left <= 0:
                return missing
            await self.fleet.wait_changed(min(left, 0.5))

    async def rewind_all(self, step: int) -> set[str]:
        """Rewind every stage to the start of ``step``; the devices that could not."""
        plan = self._plan()
        gen = self.steps.new_generation()
        ok: dict[int, bool] = {}
        deadline = time.monotonic() + min(self.cfg.step_timeout, 15.0)
        while len(ok) < len(plan.stages) and time.monotonic() < deadline:
            # repeated until all answer: agents may still be re-subscribing
            await self.session.publish(self.topics.sync(self.job),
                                       encode(SyncRewind(step=step, gen=gen)))
            until = min(deadline, time.monotonic() + 1.0)
            while len(ok) < len(plan.stages) and time.monotonic() < until:
                try:
                    ev = await self.steps.next_event(until - time.monotonic(), "rewind")
                except StepTimeout:
                    break
                if isinstance(ev, Rewound) and ev.step == step:
                    ok[ev.stage] = ev.ok
                    if not ev.ok:
                        log.warning("stage %s cannot rewind: %s", ev.stage, ev.reason)
        return {s.device for s in plan.stages if not ok.get(s.index, False)}

    # -- resume ----------------------------------------------------------------------------
    def load_resume(self) -> Checkpoint | None:
        """The checkpoint to resume from (``resume`` set), else None."""
        if not self.cfg.resume:
            return None
        try:
            ck = Checkpoint.load(self.checkpoint_path())
        except CheckpointError as e:
            raise CoordinatorError(f"cannot resume job {self.job}: {e}") from None
        if ck.job != self.job:
            raise CoordinatorError(f"{self.checkpoint_path()} belongs to job {ck.job!r}")
        return ck

    async def resume(self, ck: Checkpoint, devices: list[DeviceInfo]) -> None:
        """Continue the job from ``ck`` over ``devices``: a new plan version, restored."""
        plan = self.planner.make_plan(devices, version=ck.plan_version + 1, start_step=ck.step)
        # a fault before the restore is done re-plans from ``ck`` (``recover``), at its step
        self.last_ckpt, self.state.step, self.restoring = ck, ck.step, True
        await self.steps.publish_plan(plan)
        await self.restore(ck)
        self.state.recoveries.append({"type": "resumed", "restored_step": ck.step,
                                      "plan_version": plan.version})
        self.say("status", {"msg": f"resumed job {self.job} at step {ck.step}"})


def _packed(state: dict[str, torch.Tensor]) -> dict[str, PackedTensor]:
    return cast(dict[str, PackedTensor], pack(state))
