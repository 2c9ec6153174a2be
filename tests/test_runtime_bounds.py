"""Hung devices and bounded evaluation in the step driver, against fakes (no broker).

The end-to-end checks with real agents and Mosquitto are in tests/test_faults.py
(``test_a_hung_agent_process_is_found_by_its_heartbeat``) and ``accept-mqtt bench memory``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from accept_mqtt.coordinator.errors import DeviceLost, StepTimeout
from accept_mqtt.coordinator.record import RunState
from accept_mqtt.coordinator.steps import EVAL_AHEAD, StepDriver
from accept_mqtt.wire import codec
from accept_mqtt.wire.messages import Eval, Progress
from accept_mqtt.wire.topics import Topics

from .test_step_driver import JOB, FakeFleet, FakePipeline, _batch, _plan


class HungFleet(FakeFleet):
    def __init__(self) -> None:
        super().__init__()
        self.hung: list[str] = []

    def mark_hung(self, device: str) -> None:
        self.hung.append(device)

    def clear_hung(self, device: str) -> None:
        if device in self.hung:
            self.hung.remove(device)


def _beat(device: str, every: float = 0.05, pv: int = 1) -> Progress:
    return Progress(device=device, time=0.0, pv=pv, gen=0, stage=0, step=0, ticks=1,
                    every=every)


def _driver(pipe: Any, fleet: FakeFleet, *, hang: float, step_timeout: float = 5.0) -> StepDriver:
    d = StepDriver(JOB, Topics(), RunState(), pipe, fleet, step_timeout=step_timeout,
                   eval_batch=10, hang_timeout=hang)
    pipe.driver = d
    return d


async def _beating(d: StepDriver, devices: list[str], stop: asyncio.Event) -> None:
    while not stop.is_set():
        for dev in devices:
            d.on_event(_beat(dev))
        await asyncio.sleep(0.05)


def test_a_device_that_falls_silent_is_hung_and_the_others_are_not() -> None:
    """b beats, then stops (its compute stalled); a and c keep beating (idle, waiting)."""
    x, y = _batch()

    async def main() -> tuple[DeviceLost, float, HungFleet]:
        fleet, pipe = HungFleet(), FakePipeline(answer=False)
        d = _driver(pipe, fleet, hang=0.4)
        await d.publish_plan(_plan())
        stop_b, stop_rest = asyncio.Event(), asyncio.Event()
        beats = [asyncio.create_task(_beating(d, ["b"], stop_b)),
                 asyncio.create_task(_beating(d, ["a", "c"], stop_rest))]
        asyncio.get_running_loop().call_later(0.3, stop_b.set)
        t0 = time.monotonic()
        with pytest.raises(DeviceLost) as e:
            await d.train_step(x, y)
        took = time.monotonic() - t0
        stop_rest.set()
        await asyncio.gather(*beats)
        return e.value, took, fleet

    err, took, fleet = asyncio.run(main())
    assert err.device == "b" and "hung" in str(err)
    assert fleet.hung == ["b"]
    # silent from ~0.3 s; declared after 0.4 s of silence, checked every HANG_CHECK_S
    assert 0.65 < took < 1.4, took


def test_a_slow_device_that_beats_and_one_that_never_beat_are_not_hung() -> None:
    """A step far longer than hang_timeout is not a hang while heartbeats come; a device
    that never sent one (an older agent, --heartbeat 0) is left to step_timeout."""
    x, y = _batch()

    async def main() -> tuple[HungFleet, type[BaseException]]:
        fleet, pipe = HungFleet(), FakePipeline(answer=False)
        d = _driver(pipe, fleet, hang=0.2, step_timeout=1.2)
        await d.publish_plan(_plan())
        stop = asyncio.Event()
        beat = asyncio.create_task(_beating(d, ["a", "b"], stop))  # c never beats
        try:
            await d.train_step(x, y)
        except (StepTimeout, DeviceLost) as e:
            raised = type(e)
        stop.set()
        await beat
        return fleet, raised

    fleet, raised = asyncio.run(main())
    assert raised is StepTimeout and fleet.hung == []


def test_a_heartbeat_of_another_plan_does_not_count() -> None:
    x, y = _batch()

    async def main() -> HungFleet:
        fleet, pipe = HungFleet(), FakePipeline(answer=False)
        d = _driver(pipe, fleet, hang=0.2, step_timeout=0.8)
        await d.publish_plan(_plan())
        d.on_event(_beat("b", pv=7))  # stale: b is not watched, so not declared hung
        with pytest.raises(StepTimeout):
            await d.train_step(x, y)
        return fleet

    assert asyncio.run(main()).hung == []


class SlowLastStage(FakePipeline):
    """Answers each evaluation chunk 5 ms after it arrives; counts chunks in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.outstanding = 0
        self.max_outstanding = 0

    async def publish(self, topic: str, payload: bytes | str, qos: int = 1,
                      retain: bool = False) -> None:
        if topic.endswith("/plan"):
            await super().publish(topic, payload, qos, retain)
            return
        assert self.driver is not None
        f = codec.from_bytes(bytes(payload))
        self.frames.append(f)
        self.outstanding += 1
        self.max_outstanding = max(self.max_outstanding, self.outstanding)
        labels = f.labels_tensor()
        assert labels is not None
        ev = Eval(device="c", time=0.0, pv=f.extra["pv"], gen=f.extra["gen"], step=f.step,
                  mb=f.mb, correct=int((labels == 0).sum()), n=len(labels),
                  loss_sum=float(len(labels)))

        def answer() -> None:
            self.outstanding -= 1
            assert self.driver is not None
            self.driver.on_event(ev)
            if f.mb == 0:
                self.driver.on_event(ev)  # a second copy (QoS 1): counted once

        asyncio.get_running_loop().call_later(0.005, answer)


def test_evaluation_keeps_a_bounded_window_of_chunks_in_flight() -> None:
    x, y = _batch(205)

    async def main() -> tuple[dict[str, float], SlowLastStage]:
        pipe = SlowLastStage()
        d = _driver(pipe, FakeFleet(), hang=0.0)
        await d.publish_plan(_plan())
        return await d.evaluate(x, y), pipe

    res, pipe = asyncio.run(main())
    assert [f.mb for f in pipe.frames] == list(range(21))  # every chunk once, in order
    assert pipe.max_outstanding == 3 + EVAL_AHEAD  # three stages
    assert res["accuracy"] == pytest.approx(float((y == 0).sum()) / 205)
    assert res["loss"] == pytest.approx(1.0)
