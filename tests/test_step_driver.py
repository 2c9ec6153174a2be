"""The step driver against a fake pipeline: no broker, no agents, each test well under 1 s.

The fake stands in for the agents: it decodes every stage-0 input frame the driver publishes
and, once a step's micro-batches are all there, answers as stage 0 and the last stage would
(``stepped``, the last stage's with the step's loss and accuracy).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import torch

from accept_mqtt.coordinator.errors import DeviceLost, StepTimeout
from accept_mqtt.coordinator.record import RunState
from accept_mqtt.coordinator.steps import StepDriver
from accept_mqtt.wire import codec
from accept_mqtt.wire.messages import Eval, Ready, Stepped
from accept_mqtt.wire.plan import Plan, cuts_to_stages
from accept_mqtt.wire.topics import Topics

JOB = "unit"
DEVICES = ["a", "b", "c"]


def _plan(schedule: str = "1f1b", micro_batches: int = 8, version: int = 1) -> Plan:
    return Plan(job=JOB, version=version, model="cnn", num_layers=3,
                stages=cuts_to_stages([0, 1, 2, 3], DEVICES), micro_batches=micro_batches,
                schedule=schedule)


class FakeFleet:
    def __init__(self) -> None:
        self.states = dict.fromkeys(DEVICES, "busy")

    def device_state(self, device: str) -> str:
        return self.states.get(device, "unknown")


class FakePipeline:
    """Publisher for the driver; plays the agents of the current plan."""

    def __init__(self, *, answer: bool = True, stale: bool = False) -> None:
        self.driver: StepDriver | None = None
        self.answer = answer
        self.stale = stale  # also send events of another plan version / generation
        self.frames: list[codec.TensorFrame] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.plans: list[str] = []
        self.step_frames: list[codec.TensorFrame] = []

    def _later(self, ev: Any) -> None:
        assert self.driver is not None
        asyncio.get_running_loop().call_soon(self.driver.on_event, ev)

    async def publish(self, topic: str, payload: bytes | str, qos: int = 1,
                      retain: bool = False) -> None:
        assert self.driver is not None
        if topic.endswith("/plan"):
            self.plans.append(str(payload))
            plan = self.driver.plan
            assert plan is not None
            for s in plan.stages:
                self._later(Ready(device=s.device, time=0.0, version=plan.version,
                                  stage=s.index))
            return
        assert topic == f"accept/jobs/{JOB}/stage/0/fwd", topic
        f = codec.from_bytes(bytes(payload))
        self.frames.append(f)
        if not self.answer:
            return
        pv, gen = f.extra["pv"], f.extra["gen"]
        labels = f.labels_tensor()
        assert labels is not None
        if f.extra["train"] is False:
            self._later(Eval(device="c", time=0.0, pv=pv, gen=gen, step=f.step, mb=f.mb,
                             correct=int((labels == 0).sum()), n=len(labels),
                             loss_sum=float(len(labels))))
            return
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.step_frames.append(f)
        if len(self.step_frames) < f.extra["nmb"]:
            return
        frames, self.step_frames, self.in_flight = self.step_frames, [], 0
        loss = sum(0.5 * (g.mb + 1) for g in frames)
        correct = sum(int((g.labels_tensor() == 0).sum()) for g in frames)  # type: ignore[union-attr]
        n = sum(len(g.labels_tensor()) for g in frames)  # type: ignore[arg-type]
        if self.stale:  # would end the step early with wrong numbers if they counted
            self._later(_stepped(0, f.step, pv + 7, gen))
            self._later(_stepped(2, f.step, pv, gen + 1, loss=1000.0, correct=0, n=1))
        self._later(_stepped(2, f.step, pv, gen, loss=loss, correct=correct, n=n))
        self._later(_stepped(0, f.step, pv, gen))


def _stepped(stage: int, step: int, pv: int, gen: int, **result: Any) -> Stepped:
    return Stepped(device=DEVICES[stage], time=0.0, pv=pv, gen=gen, step=step, stage=stage,
                   busy_ms=1.0, send_ms=0.0, bytes_act=0, bytes_grad=0, mbs=8, **result)


def _driver(pipe: FakePipeline, fleet: FakeFleet | None = None,
            step_timeout: float = 5.0) -> StepDriver:
    d = StepDriver(JOB, Topics(), RunState(), pipe, fleet or FakeFleet(),
                   step_timeout=step_timeout, eval_batch=10)
    pipe.driver = d
    return d


def _batch(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_train_step_sends_the_step_at_once_and_sums_the_losses(schedule: str) -> None:
    x, y = _batch()

    async def main() -> tuple[dict[str, float], FakePipeline, StepDriver]:
        pipe = FakePipeline()
        d = _driver(pipe)
        await d.publish_plan(_plan(schedule))
        assert len(pipe.plans) == 1
        res = await d.train_step(x, y)
        return res, pipe, d

    res, pipe, d = asyncio.run(main())
    assert res["loss"] == pytest.approx(sum(0.5 * (mb + 1) for mb in range(8)))
    assert res["train_acc"] == pytest.approx(float((y == 0).sum()) / 32)
    assert [f.mb for f in pipe.frames] == list(range(8))
    assert all(f.step == 0 and f.extra["nmb"] == 8 and f.extra["bsz"] == 32 for f in pipe.frames)
    torch.testing.assert_close(torch.cat([codec.decode(f) for f in pipe.frames]), x)
    # the whole mini-batch is sent before any stage answers (stage 0 keeps the 1F1B bound)
    assert pipe.max_in_flight == 8
    assert d.state.step == 1 and d.state.microbatches == 8


def test_stale_events_are_ignored_and_stepped_counts() -> None:
    x, y = _batch()

    async def main() -> tuple[dict[str, float], StepDriver]:
        pipe = FakePipeline(stale=True)
        d = _driver(pipe)
        await d.publish_plan(_plan())
        d.on_event(Stepped(device="b", time=0.0, pv=1, gen=0, step=0, stage=1, busy_ms=4.0,
                           send_ms=1.0, bytes_act=10, bytes_grad=20, mbs=8))
        d.on_event(Stepped(device="b", time=0.0, pv=2, gen=0, step=0, stage=1, busy_ms=99.0,
                           send_ms=1.0, bytes_act=10, bytes_grad=20, mbs=8))  # another plan: stale
        return await d.train_step(x, y), d

    res, d = asyncio.run(main())
    assert res["loss"] == pytest.approx(sum(0.5 * (mb + 1) for mb in range(8)))
    assert d.state.stages[1].busy_ms == 4.0 and d.state.stages[1].steps == 1


def test_a_plan_device_going_offline_raises_device_lost() -> None:
    x, y = _batch()

    async def main() -> None:
        fleet = FakeFleet()
        pipe = FakePipeline()
        d = _driver(pipe, fleet)
        await d.publish_plan(_plan())
        d.device_offline("b")  # a Will, but the device is back already: not a loss
        d.device_offline("zz")  # not in the plan
        await d.train_step(x, y)
        pipe.answer = False

        def gone() -> None:
            fleet.states["b"] = "offline"
            d.device_offline("b")

        asyncio.get_running_loop().call_later(0.05, gone)
        with pytest.raises(DeviceLost) as e:
            await asyncio.wait_for(d.train_step(x, y), 1.0)
        assert e.value.device == "b"

    asyncio.run(main())


def test_a_silent_pipeline_times_out() -> None:
    x, y = _batch()

    async def main() -> float:
        pipe = FakePipeline()
        d = _driver(pipe, step_timeout=0.2)
        await d.publish_plan(_plan())
        pipe.answer = False
        t0 = time.monotonic()
        with pytest.raises(StepTimeout, match="step 0"):
            await d.train_step(x, y)
        return time.monotonic() - t0

    took = asyncio.run(main())
    assert 0.15 < took < 0.6


def test_evaluate_aggregates_eval_events() -> None:
    x, y = _batch(25)

    async def main() -> tuple[dict[str, float], FakePipeline]:
        pipe = FakePipeline()
        d = _driver(pipe)
        await d.publish_plan(_plan())
        return await d.evaluate(x, y), pipe

    res, pipe = asyncio.run(main())
    assert [len(f.labels_tensor()) for f in pipe.frames] == [10, 10, 5]  # eval_batch chunks
    assert all(f.extra["train"] is False for f in pipe.frames)
    assert res["accuracy"] == pytest.approx(float((y == 0).sum()) / 25)
    assert res["loss"] == pytest.approx(1.0)


def test_a_new_plan_version_starts_a_new_generation_and_waits_for_its_ready() -> None:
    async def main() -> StepDriver:
        pipe = FakePipeline()
        d = _driver(pipe)
        await d.publish_plan(_plan())
        assert d.new_generation() == 1
        d.on_event(Ready(device="a", time=0.0, version=2, stage=0, gen=0))  # stale (gen)
        await d.publish_plan(_plan(version=2))
        return d

    d = asyncio.run(main())
    assert d.gen == 0 and d.plan is not None and d.plan.version == 2


def test_sample_ids_go_only_with_delta_links_and_a_current_resync_ends_the_wait() -> None:
    """Without a delta-coded link the input frames carry no ``ids`` (they stay as they were);
    with one, every frame carries its samples' indices, and a plan that needs them refuses a
    step without them. A ``resync`` of the current plan and generation ends the step's wait
    at once (``DeltaMismatch``); one of another generation is stale."""
    from accept_mqtt.coordinator.errors import CoordinatorError, DeltaMismatch
    from accept_mqtt.wire.delta import unpack_ids

    x, y = _batch()
    ids = torch.arange(100, 132)
    delta_plan = Plan(job=JOB, version=2, model="cnn", num_layers=3, micro_batches=8,
                      stages=cuts_to_stages([0, 1, 2, 3], DEVICES, act_bits=[2, 2, 32],
                                            act_delta=[True, True, False]), train_samples=200)

    async def main() -> tuple[FakePipeline, float]:
        pipe = FakePipeline()
        d = _driver(pipe)
        await d.publish_plan(_plan())
        await d.train_step(x, y, ids=ids)
        assert not any("ids" in f.extra for f in pipe.frames)
        await d.publish_plan(delta_plan)
        pipe.frames.clear()
        with pytest.raises(CoordinatorError, match="needs the dataset index"):
            await d.train_step(x, y)
        d.resync("b", "stale", pv=2, gen=3)  # another generation: ignored
        await d.train_step(x, y, ids=ids)
        got = torch.cat([torch.from_numpy(unpack_ids(f)) for f in pipe.frames])
        assert torch.equal(got, ids)
        pipe.answer = False
        asyncio.get_running_loop().call_later(0.05, d.resync, "b", "history mismatch", 2, 0)
        t0 = time.monotonic()
        with pytest.raises(DeltaMismatch, match="device b: history mismatch"):
            await d.train_step(x, y, ids=ids)
        return pipe, time.monotonic() - t0

    _, took = asyncio.run(main())
    assert took < 1.0
