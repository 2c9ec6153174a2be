"""Recovery against fakes of its neighbours (session, fleet, planner, step driver): no broker.

``FakeAgents`` plays the stages behind the fake session: it answers ``sync`` (weights,
rewind) and restore messages the way docs/protocol.md says agents do.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from accept_mqtt.coordinator.config import TrainConfig
from accept_mqtt.coordinator.errors import BrokerLost, CoordinatorError, DeviceLost, StepTimeout
from accept_mqtt.coordinator.planner import DeviceInfo
from accept_mqtt.coordinator.record import RunState
from accept_mqtt.coordinator.recovery import Recovery
from accept_mqtt.model.checkpoint import Checkpoint, pack, stage_slice, unpack
from accept_mqtt.wire.chunks import Reassembler
from accept_mqtt.wire.messages import (
    Event,
    Metric,
    Recovered,
    Restored,
    Rewound,
    SyncOp,
    SyncRewind,
    SyncWeights,
    Weights,
    WeightsChunk,
    decode,
)
from accept_mqtt.wire.plan import Plan, cuts_to_stages
from accept_mqtt.wire.topics import Topics

JOB = "rec"
TOPICS = Topics()


def _weights() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    w = {f"{i}.{p}": torch.randn(3, generator=g) for i in range(4) for p in ("weight", "bias")}
    o = {f"{i}.weight::momentum_buffer": torch.randn(3, generator=g) for i in range(4)}
    return w, o


def _plan(devices: list[str], version: int = 1, start_step: int = 0) -> Plan:
    cuts = {1: [0, 4], 2: [0, 1, 4], 3: [0, 1, 3, 4]}[len(devices)]
    return Plan(job=JOB, version=version, model="cnn", num_layers=4,
                stages=cuts_to_stages(cuts, devices), start_step=start_step)


class FakeSteps:
    """The step driver: the current plan, its generation, its event queue."""

    def __init__(self, plan: Plan) -> None:
        self.plan: Plan | None = plan
        self.gen = 0
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.published: list[Plan] = []
        self.republished = 0

    async def publish_plan(self, plan: Plan, timeout: float = 60.0) -> None:
        if self.plan is None or plan.version != self.plan.version:
            self.gen = 0
        self.plan = plan
        self.published.append(plan)

    async def republish_plan(self) -> None:
        self.republished += 1

    async def next_event(self, timeout: float, waiting_for: str) -> Event:
        try:
            return await asyncio.wait_for(self.events.get(), timeout)
        except TimeoutError:
            raise StepTimeout(f"waited for {waiting_for}") from None

    def new_generation(self) -> int:
        self.gen += 1
        return self.gen


class FakeAgents:
    """The stages: their step, their tensors, whether they can rewind."""

    def __init__(self, steps: FakeSteps, step: int) -> None:
        self.steps = steps
        self.step_of: dict[str, int] = {}
        self.step = step
        self.weights, self.optim = _weights()
        self.can_rewind: dict[str, bool] = {}
        self.gone: set[str] = set()  # devices that answer nothing
        self.recovery: Recovery | None = None
        self.restored: dict[int, Weights] = {}
        self.chunks = Reassembler()

    def on_publish(self, topic: str, payload: bytes | str) -> None:
        plan = self.steps.plan
        assert plan is not None and self.recovery is not None
        raw = payload.encode() if isinstance(payload, str) else payload
        if topic == TOPICS.sync(JOB):
            cmd = decode(SyncOp, raw)
            for s in plan.stages:
                if s.device in self.gone:
                    continue
                if isinstance(cmd, SyncWeights):
                    self.recovery.on_weights(Weights(
                        job=JOB, stage=s.index, step=self.step_of.get(s.device, self.step),
                        purpose="checkpoint", version=plan.version,
                        tensors=pack(stage_slice(self.weights, s.start, s.end)),
                        optim=pack(stage_slice(self.optim, s.start, s.end))
                        if cmd.optim else None))
                elif isinstance(cmd, SyncRewind):
                    ok = self.can_rewind.get(s.device, True)
                    self.steps.events.put_nowait(Rewound(
                        device=s.device, time=0.0, stage=s.index, step=cmd.step, ok=ok,
                        rewind_gen=cmd.gen, reason=None if ok else "no saved state"))
        elif topic.startswith(f"accept/jobs/{JOB}/weights/"):
            got = self.chunks.add(decode(WeightsChunk, raw), topic)
            if got is None:
                return  # more chunks to come
            w = got
            self.restored[w.stage] = w
            self.recovery.on_weights(w)  # the coordinator's own echo: must be ignored
            self.steps.events.put_nowait(Restored(device=plan.stages[w.stage].device, time=0.0,
                                                  stage=w.stage, step=w.step,
                                                  version=w.version))


class FakeSession:
    def __init__(self, agents: FakeAgents) -> None:
        self.agents = agents
        self.alive = True
        self.trusted = True
        self.reconnects = 0
        self.published: list[tuple[str, bytes | str]] = []
        self.metrics: list[Metric] = []

    async def reconnect(self) -> None:
        self.reconnects += 1
        self.alive = self.trusted = True

    async def publish(self, topic: str, payload: bytes | str, qos: int = 1,
                      retain: bool = False) -> None:
        self.published.append((topic, payload))
        self.agents.on_publish(topic, payload)

    async def metric(self, msg: Metric) -> None:
        self.metrics.append(msg)


class FakeFleet:
    def __init__(self, states: dict[str, str]) -> None:
        self.states = states

    def device_state(self, device: str) -> str:
        return self.states.get(device, "unknown")

    def online_devices(self, exclude: set[str] | frozenset[str] = frozenset()
                       ) -> list[DeviceInfo]:
        return [DeviceInfo(d, {"bench_gflops": 1.0}) for d, st in sorted(self.states.items())
                if st in ("online", "busy") and d not in exclude]

    async def wait_for_devices(self, n: int, timeout: float,
                               exclude: set[str] | frozenset[str] = frozenset(),
                               at_least: int | None = None) -> list[DeviceInfo]:
        return self.online_devices(exclude)[:n]

    async def wait_changed(self, timeout: float) -> None:
        await asyncio.sleep(min(timeout, 0.01))


class FakePlanner:
    def __init__(self, cfg: TrainConfig, steps: FakeSteps) -> None:
        self.cfg = cfg
        self.steps = steps
        self.replanned_at: list[int] = []

    def make_plan(self, devices: list[DeviceInfo], version: int = 1,
                  start_step: int = 0) -> Plan:
        return _plan([d.id for d in devices], version, start_step)

    def next_plan(self, devices: list[DeviceInfo], start_step: int) -> Plan:
        assert self.steps.plan is not None
        return self.make_plan(devices, self.steps.plan.version + 1, start_step)

    def device_info(self, device: str) -> DeviceInfo:
        return DeviceInfo(device, {"bench_gflops": 1.0})

    def replanned(self, step: int) -> None:
        self.replanned_at.append(step)


class Rig:
    def __init__(self, tmp_path: Path, *, step: int, states: dict[str, str]) -> None:
        cfg = TrainConfig(runs_dir=str(tmp_path), rejoin_grace=0.05, step_timeout=2.0,
                          devices=3)
        self.state = RunState(step=step)
        self.steps = FakeSteps(_plan(["a", "b", "c"]))
        self.agents = FakeAgents(self.steps, step)
        self.session = FakeSession(self.agents)
        self.fleet = FakeFleet(states)
        self.planner = FakePlanner(cfg, self.steps)
        self.recovery = Recovery(JOB, TOPICS, self.state, session=self.session,
                                 fleet=self.fleet, planner=self.planner, steps=self.steps)
        self.agents.recovery = self.recovery


ALL_BACK = {"a": "busy", "b": "busy", "c": "busy"}


def test_broker_blip_with_every_device_back_is_a_rewind(tmp_path: Path) -> None:
    async def main() -> Rig:
        rig = Rig(tmp_path, step=5, states=dict(ALL_BACK))
        rig.session.alive = rig.session.trusted = False  # the reader saw the connection drop
        await rig.recovery.recover("broker connection lost (test)")
        return rig

    rig = asyncio.run(main())
    assert rig.session.reconnects == 1 and rig.steps.republished == 1
    (rec,) = rig.state.recoveries
    assert rec["action"] == "rewind" and rec["redo_steps"] == 0
    assert rec["at_step"] == rec["restored_step"] == 5 and rec["plan_version"] == 1
    assert rig.steps.gen == 1, "a new generation: everything sent before is stale"
    rewinds = [decode(SyncOp, p) for t, p in rig.session.published if t == TOPICS.sync(JOB)]
    assert rewinds == [SyncRewind(step=5, gen=1)]
    assert rig.steps.published == [], "no re-plan"
    assert rig.state.step == 5 and rig.state.replayed_steps == 0
    assert isinstance(rig.session.metrics[-1], Recovered)
    assert rig.session.metrics[-1].action == "rewind"


def test_a_device_missing_after_the_grace_means_a_replan_from_the_checkpoint(
        tmp_path: Path) -> None:
    async def main() -> Rig:
        rig = Rig(tmp_path, step=3, states=dict(ALL_BACK))
        await rig.recovery.checkpoint()
        rig.state.step = rig.agents.step = 5  # two more steps, then b dies
        rig.fleet.states.update(b="offline", d="online")  # d joined meanwhile
        rig.agents.gone.add("b")
        await rig.recovery.recover("device b went offline")
        return rig

    rig = asyncio.run(main())
    assert rig.state.checkpoints == [3]
    assert Checkpoint.load(tmp_path / JOB / "checkpoint.pt").step == 3
    (rec,) = rig.state.recoveries
    assert rec["action"] == "re-plan from checkpoint" and rec["lost"] == ["b"]
    assert rec["at_step"] == 5 and rec["restored_step"] == 3 and rec["redo_steps"] == 2
    assert rig.state.replayed_steps == 2
    (plan,) = rig.steps.published
    assert plan.version == 2 and plan.devices == ["a", "c", "d"] and plan.start_step == 3
    assert rec["devices"] == ["a", "c", "d"] and rec["plan_version"] == 2
    assert rig.state.step == 3, "training goes on from the checkpoint"
    assert sorted(rig.agents.restored) == [0, 1, 2]
    assert rig.planner.replanned_at == [3]


def test_a_stage_that_cannot_rewind_falls_back_to_the_checkpoint(tmp_path: Path) -> None:
    async def main() -> Rig:
        rig = Rig(tmp_path, step=4, states={**ALL_BACK, "d": "online"})
        rig.agents.can_rewind["c"] = False  # e.g. a fresh process
        await rig.recovery.recover("no progress for 3s while waiting for step 4")
        return rig

    rig = asyncio.run(main())
    (rec,) = rig.state.recoveries
    assert rec["lost"] == ["c"] and rec["restored_step"] == 0 and rec["redo_steps"] == 4
    assert rig.state.step == 0 and rig.state.history == []  # no checkpoint: from the start
    assert rig.steps.published[-1].devices == ["a", "b", "d"]


def test_a_device_lost_while_weights_are_collected_is_a_device_loss(tmp_path: Path) -> None:
    """Not a 60 s wait ending in "no weights": the loss is raised at once, as during a step,
    so that the coordinator recovers it; the checkpoint being taken is not written."""
    async def main(collect: str) -> float:
        rig = Rig(tmp_path, step=6, states=dict(ALL_BACK))
        rig.agents.gone.add("b")  # killed: it answers nothing ...
        rig.fleet.states["b"] = "offline"  # ... and its Last Will says so
        t0 = time.monotonic()
        with pytest.raises(DeviceLost) as e:
            await (rig.recovery.checkpoint() if collect == "checkpoint"
                   else rig.recovery.collect_weights())
        assert e.value.device == "b"
        assert rig.state.checkpoints == [] and rig.recovery.last_ckpt is None
        return time.monotonic() - t0

    for collect in ("checkpoint", "final"):
        assert asyncio.run(main(collect)) < 2.0
    assert not (tmp_path / JOB / "checkpoint.pt").exists()

    async def broker_gone() -> None:
        rig = Rig(tmp_path, step=6, states=dict(ALL_BACK))
        rig.agents.gone.add("b")
        rig.session.alive = False
        await rig.recovery.collect_weights()

    with pytest.raises(BrokerLost):
        asyncio.run(broker_gone())


def test_checkpoint_refuses_stages_at_different_steps(tmp_path: Path) -> None:
    async def main(step_of: dict[str, int], coordinator_step: int) -> None:
        rig = Rig(tmp_path, step=coordinator_step, states=dict(ALL_BACK))
        rig.agents.step_of = step_of
        await rig.recovery.checkpoint()

    with pytest.raises(CoordinatorError, match="different steps"):
        asyncio.run(main({"a": 3, "b": 4, "c": 3}, 3))
    with pytest.raises(CoordinatorError, match="stages are at step 4, the coordinator at 3"):
        asyncio.run(main({"a": 4, "b": 4, "c": 4}, 3))
    assert not (tmp_path / JOB / "checkpoint.pt").exists()


def test_restore_sends_each_stage_its_slice_by_whole_model_names(tmp_path: Path) -> None:
    w, o = _weights()
    ck = Checkpoint(JOB, 7, w, o, plan_version=1, meta={"epoch": 2, "history": [{"step": 5}]})

    async def main() -> Rig:
        rig = Rig(tmp_path, step=0, states=dict(ALL_BACK))
        rig.steps.plan = _plan(["c", "a"], version=3)  # other cuts, other devices
        rig.steps.gen = 2
        await rig.recovery.restore(ck)
        return rig

    rig = asyncio.run(main())
    got = rig.agents.restored
    assert sorted(got) == [0, 1]
    assert set(got[0].tensors) == {"0.weight", "0.bias"}
    assert set(got[1].tensors) == {f"{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias")}
    assert set(got[1].optim or {}) == {f"{i}.weight::momentum_buffer" for i in (1, 2, 3)}
    for k, body in got.items():
        assert body.purpose == "restore" and body.version == 3 and body.gen == 2
        assert body.step == 7 and body.stage == k
        for name, t in unpack(dict(body.tensors)).items():
            torch.testing.assert_close(t, w[name])
        for name, t in unpack(dict(body.optim or {})).items():
            torch.testing.assert_close(t, o[name])
    assert rig.state.step == 7 and rig.state.epoch == 2 and rig.state.history == [{"step": 5}]


def test_load_resume_refuses_another_jobs_checkpoint(tmp_path: Path) -> None:
    w, o = _weights()
    Checkpoint("other", 4, w, o).save(tmp_path / JOB / "checkpoint.pt")

    async def main() -> Any:
        rig = Rig(tmp_path, step=0, states=dict(ALL_BACK))
        rig.planner.cfg = TrainConfig(runs_dir=str(tmp_path), resume=True)
        return rig.recovery.load_resume()

    with pytest.raises(CoordinatorError, match="belongs to job 'other'"):
        asyncio.run(main())
