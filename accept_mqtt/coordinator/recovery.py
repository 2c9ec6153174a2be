"""Checkpoints, restores, re-plans and fault recovery: the coordinator's fault-handling half.

``Recovery`` is a mixin of ``coordinator.Coordinator`` (it uses the coordinator's connection,
state and planner; it is not used alone). What it guarantees, tested in
``tests/test_faults.py`` by comparing final parameters with a one-process run:

* ``checkpoint`` collects every stage's weights, buffers and optimizer state between steps,
  checks that all stages are at the same step, and saves them atomically.
* ``replan`` publishes a new plan version and ``restore`` gives each new stage its slice of a
  checkpoint by whole-model names: weights migrate to whichever device now holds them.
* ``_recover`` brings training back after a fault losing as little as possible: a rewind of
  the step in flight when every device is back (broker restart, connection blip), else a
  re-plan over the devices still here from the last checkpoint (docs/faults.md).
* ``_live_replan`` (commands, drift) checkpoints first, so it loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack
import torch

from accept_mqtt.model.checkpoint import Checkpoint, CheckpointError, pack, unpack

from .errors import BrokerLost, CoordinatorError, StepTimeout
from .planner import DeviceInfo

if TYPE_CHECKING:
    from accept_mqtt.wire.plan import Plan

    from .config import TrainConfig

log = logging.getLogger("accept_mqtt.coordinator")


class Recovery:
    """Fault handling for ``Coordinator`` (see the module docstring)."""

    # set by Coordinator.__init__ (declared here for readers and type checkers)
    cfg: TrainConfig
    job: str
    plan: Plan | None
    state: Any  # coordinator.RunState
    gen: int
    last_ckpt: Checkpoint | None

    def _drain_events(self) -> None:
        """Forget queued events (a new plan or a rewind makes them meaningless)."""
        keep = []
        while not self._events.empty():
            ev = self._events.get_nowait()
            if ev.get("op") in ("lost", "disconnected"):  # faults are never dropped
                keep.append(ev)
        for ev in keep:
            self._events.put_nowait(ev)

    async def collect_state(self, optim: bool = True,
                            timeout: float = 60.0) -> tuple[dict[str, torch.Tensor],
                                                            dict[str, torch.Tensor], int]:
        """Every stage's tensors (whole-model names), its optimizer state and their step.

        Called between steps, so every stage reports the same step; a stage that does not
        is an error rather than a silently inconsistent checkpoint.
        """
        assert self.plan is not None
        while not self._weights.empty():
            self._weights.get_nowait()
        await self._publish(self.topics.sync(self.job),
                            json.dumps({"op": "weights", "optim": optim}))
        weights: dict[str, torch.Tensor] = {}
        opt: dict[str, torch.Tensor] = {}
        steps: dict[int, int] = {}
        deadline = time.monotonic() + timeout
        while len(steps) < len(self.plan.stages):
            try:
                body = await asyncio.wait_for(self._weights.get(),
                                              max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                missing = sorted(set(range(len(self.plan.stages))) - set(steps))
                raise CoordinatorError(f"no weights from stages {missing}") from None
            if body.get("version", self.plan.version) != self.plan.version:
                continue
            steps[int(body["stage"])] = int(body["step"])
            weights.update(unpack(body["tensors"]))
            opt.update(unpack(body.get("optim") or {}))
        if len(set(steps.values())) != 1:
            raise CoordinatorError(f"stages report different steps {steps}")
        return weights, opt, next(iter(steps.values()))

    async def collect_weights(self, timeout: float = 60.0) -> dict[str, torch.Tensor]:
        """Every stage's parameters and buffers, named as in the whole model."""
        return (await self.collect_state(optim=False, timeout=timeout))[0]

    def checkpoint_path(self) -> Path:
        return Path(self.cfg.runs_dir) / self.job / "checkpoint.pt"

    async def checkpoint(self) -> Checkpoint:
        """Collect every stage's state now (between steps) and save it atomically."""
        assert self.plan is not None
        weights, opt, step = await self.collect_state(optim=True)
        if step != self.state.step:
            raise CoordinatorError(f"stages are at step {step}, the coordinator at "
                                   f"{self.state.step}")
        ck = Checkpoint(self.job, step, weights, opt, self.plan.version,
                        meta={**self.state.counters(), "config": self.cfg.to_dict()})
        await asyncio.to_thread(ck.save, self.checkpoint_path())
        self.last_ckpt = ck
        self.state.checkpoints.append(step)
        self.progress("checkpoint", {"step": step})
        await self._metric({"type": "checkpoint", "step": step,
                            "path": str(self.checkpoint_path())})
        return ck

    async def restore(self, ck: Checkpoint, timeout: float = 60.0) -> None:
        """Send each stage of the current plan its slice of ``ck``; wait until all load it."""
        assert self.plan is not None
        plan = self.plan
        for s in plan.stages:
            w, o = ck.stage(s.start, s.end)
            body = {"v": 1, "job": self.job, "stage": s.index, "step": ck.step,
                    "purpose": "restore", "version": plan.version, "gen": self.gen,
                    "tensors": pack(w), "optim": pack(o)}
            await self._publish(self.topics.weights(self.job, s.index),
                                msgpack.packb(body, use_bin_type=True))
        done: set[int] = set()
        deadline = time.monotonic() + timeout
        while len(done) < len(plan.stages):
            ev = await self._next_event(max(0.1, deadline - time.monotonic()),
                                        f"stages to restore step {ck.step}")
            if ev.get("op") == "restored" and ev.get("version") == plan.version:
                done.add(int(ev["stage"]))
        self.state.step = ck.step
        self.state.epoch = int(ck.meta.get("epoch", self.state.epoch))
        self.state.history = list(ck.meta.get("history", self.state.history))

    def _next_plan(self, devices: list[DeviceInfo], start_step: int) -> Plan:
        """The next plan version over ``devices`` (now known to the planner), made with every
        timing sample received so far."""
        assert self.plan is not None
        for d in devices:
            self._info[d.id] = d
            self.profiles.setdefault(d.id, d.profile)
        self.learn_pending()
        return self.make_plan(devices, version=self.plan.version + 1, start_step=start_step)

    async def replan(self, devices: list[DeviceInfo], reason: str,
                     ck: Checkpoint | None, plan: Plan | None = None) -> Plan:
        """Adopt ``plan`` (default: the next plan over ``devices``), starting at ``ck``'s step
        (0 without one).

        Every stage is rebuilt by its agent from the model's seed, then given its slice of
        ``ck``: weights move to whichever device now holds their layers.
        """
        if plan is None:
            plan = self._next_plan(devices, ck.step if ck is not None else 0)
        log.info("re-plan v%d (%s): %s", plan.version, reason, plan.layout(bits=False))
        await self.publish_plan(plan)
        if ck is not None:
            await self.restore(ck)
        else:
            self.state.step, self.state.history = 0, []
        self._last_replan_step = self.state.step
        return plan

    async def _recover(self, why: str) -> None:
        """Bring training back after a fault, losing as little as possible.

        1. Reconnect if the broker connection is gone; re-publish the plan.
        2. Give the plan's devices ``rejoin_grace`` seconds to be back in this job (a broker
           restart fires every device's Will, and the devices reconnect by themselves).
        3. All back: rewind every stage to the start of the step in flight (no step lost).
        4. Otherwise (or a stage cannot rewind): re-plan over the devices still here plus
           idle ones, restore the last checkpoint, replay the steps since it.
        """
        assert self.plan is not None
        st = self.state
        at = st.step
        self.progress("status", {"msg": f"{why} at step {at}; recovering"})
        if (self._need_reconnect or self._reader is None or self._reader.done()
                or self._client is None):
            await self._reconnect()
            self._need_reconnect = False
            await self._publish(self.topics.plan(self.job), self.plan.to_json(), retain=True)
        missing = await self._wait_back(self.cfg.rejoin_grace)
        if not missing:
            failed = await self._rewind_all(at)
            if not failed:
                rec = {"type": "recovered", "reason": why, "at_step": at, "restored_step": at,
                       "redo_steps": 0, "action": "rewind", "plan_version": self.plan.version}
                st.recoveries.append(rec)
                self.progress("replan", {"reason": f"{why}; all stages back, step {at} redone"})
                await self._metric(rec)
                return
            missing = failed
        ck = self.last_ckpt
        back_to = ck.step if ck is not None else 0
        devices = await self.wait_for_devices(
            self.cfg.devices, min(self.cfg.device_timeout, 5.0), exclude=missing, at_least=1)
        plan = await self.replan(devices, why, ck)
        st.replayed_steps += at - back_to
        rec = {"type": "recovered", "reason": why, "lost": sorted(missing),
               "device": sorted(missing)[0], "at_step": at, "restored_step": back_to,
               "redo_steps": at - back_to, "action": "re-plan from checkpoint",
               "plan_version": plan.version, "devices": plan.devices}
        st.recoveries.append(rec)
        log.warning("recovered (%s): plan v%d on %s, back to step %d", why, plan.version,
                    plan.devices, back_to)
        self.progress("replan", {"reason": f"{why}; now on {', '.join(plan.devices)}, back "
                                           f"to step {back_to}"})
        await self._metric(rec)

    async def _wait_back(self, grace: float) -> set[str]:
        """Plan devices not back in this job after ``grace`` seconds (empty: all are)."""
        assert self.plan is not None
        deadline = time.monotonic() + grace
        while True:
            if self._reader is None or self._reader.done():
                raise BrokerLost("connection lost again while recovering")
            missing = {d for d in self.plan.devices if self._device_state(d) != "busy"}
            left = deadline - time.monotonic()
            if not missing or left <= 0:
                return missing
            self._device_change.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._device_change.wait(), min(left, 0.5))

    async def _rewind_all(self, step: int) -> set[str]:
        """Rewind every stage to the start of ``step``; the devices that could not."""
        assert self.plan is not None
        self.gen += 1
        self._drain_events()
        ok: dict[int, bool] = {}
        deadline = time.monotonic() + min(self.cfg.step_timeout, 15.0)
        while len(ok) < len(self.plan.stages) and time.monotonic() < deadline:
            # repeated until all answer: agents may still be re-subscribing
            await self._publish(self.topics.sync(self.job), json.dumps(
                {"op": "rewind", "step": step, "gen": self.gen}))
            until = min(deadline, time.monotonic() + 1.0)
            while len(ok) < len(self.plan.stages) and time.monotonic() < until:
                try:
                    ev = await self._next_event(until - time.monotonic(), "rewind")
                except StepTimeout:
                    break
                if ev.get("op") == "rewound" and ev.get("step") == step:
                    ok[int(ev["stage"])] = bool(ev.get("ok"))
                    if not ev.get("ok"):
                        log.warning("stage %s cannot rewind: %s", ev["stage"], ev.get("reason"))
        return {s.device for s in self.plan.stages if not ok.get(s.index, False)}

    async def _live_replan(self, reason: str) -> None:
        """Between steps: checkpoint, plan again with what is known now, restore if it moved."""
        assert self.plan is not None
        ck = await self.checkpoint()
        current = {d: self._info[d] for d in self.plan.devices}
        extra = [d for d in self.online_devices() if d.id not in current]
        devices = sorted([*current.values(), *extra],
                         key=lambda d: (-d.speed, d.id))[: self.cfg.devices]
        fresh = self._next_plan(devices, ck.step)
        self._last_replan_step = self.state.step
        if fresh.layout() == self.plan.layout():
            log.info("re-plan (%s): the partition is unchanged", reason)
            ev = {"type": "replan", "reason": reason, "changed": False, "step": ck.step}
            self.state.replans.append(ev)
            await self._metric(ev)
            return
        await self.replan(devices, reason, ck, fresh)
        assert self.plan is not None
        ev = {"type": "replan", "reason": reason, "changed": True, "step": ck.step,
              "plan_version": self.plan.version, "stages": self.plan.to_dict()["stages"]}
        self.state.replans.append(ev)
        await self._metric(ev)
        self.progress("replan", {"reason": f"{reason}: now {', '.join(self.plan.devices)}"})

    def _load_resume(self) -> Checkpoint | None:
        if not self.cfg.resume:
            return None
        try:
            ck = Checkpoint.load(self.checkpoint_path())
        except CheckpointError as e:
            raise CoordinatorError(f"cannot resume job {self.job}: {e}") from None
        if ck.job != self.job:
            raise CoordinatorError(f"{self.checkpoint_path()} belongs to job {ck.job!r}")
        return ck
