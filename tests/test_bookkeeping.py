"""Bookkeeping after faults and re-plans (issue 14, point 7).

* the drift check plans over the devices the current plan runs on, not over a device lost
  earlier (which made every later drift look like a moved partition: a needless re-plan);
* a step's stage counters count each stage's step once, however often its ``stepped``
  event arrives (QoS 1 may deliver twice);
* an agent stamps an event with the plan of the compute that produced it, not with the plan
  of whatever job it holds when the event leaves (a real agent and Mosquitto).
"""

from __future__ import annotations

import asyncio
from typing import Any

from accept_mqtt.coordinator.config import TrainConfig
from accept_mqtt.coordinator.planner import DeviceInfo, Planner
from accept_mqtt.coordinator.record import RunState
from accept_mqtt.wire.plan import Plan


def _planner(current: list[Plan | None]) -> Planner:
    cfg = TrainConfig(model="cnn", dataset="digits", partition="auto", batch_size=32,
                      micro_batches=4, devices=3)
    p = Planner("bk", cfg, RunState(), current=lambda: current[0], emit=lambda m: None)
    p.use_model((1, 8, 8), 10)
    p.set_run(100, "digits")
    return p


def _dev(name: str, gflops: float = 5.0) -> DeviceInfo:
    return DeviceInfo(name, {"device": name, "bench_gflops": gflops, "cores": 1, "threads": 1})


def test_the_drift_check_plans_over_the_current_devices_not_a_lost_one() -> None:
    current: list[Plan | None] = [None]
    p = _planner(current)
    a, b, c, spare = _dev("a"), _dev("b"), _dev("c"), _dev("spare")
    p.start_with([a, b, c])
    current[0] = p.make_plan([a, b, c])
    assert not p.partition_would_move()
    # c is lost; the recovery re-plans over a, b and a spare
    current[0] = p.next_plan([a, b, spare], start_step=5)
    assert current[0].devices == ["a", "b", "spare"]
    # nothing changed since: the partition does not move (before the fix, the check planned
    # over a, b, c and spare, a four-stage plan, and asked for a re-plan at every drift)
    assert not p.partition_would_move()
    # a real change still shows: the spare now 20x slower moves the cuts (FLOPs prior)
    p.know([_dev("spare", 0.25)])
    assert p.partition_would_move()


def test_a_stepped_event_delivered_twice_counts_once() -> None:
    """QoS 1 is at-least-once: a second copy of a stage's ``stepped`` is not a second step."""
    from accept_mqtt.coordinator.steps import StepDriver
    from accept_mqtt.wire.messages import Stepped
    from accept_mqtt.wire.plan import cuts_to_stages
    from accept_mqtt.wire.topics import Topics

    class Fleet:
        def device_state(self, device: str) -> str:
            return "busy"

    class Publisher:
        async def publish(self, topic: str, payload: bytes | str, qos: int = 1,
                          retain: bool = False) -> None:
            pass

    state = RunState()
    d = StepDriver("bk", Topics(), state, Publisher(), Fleet(), step_timeout=1.0,
                   eval_batch=8)
    d.plan = Plan(job="bk", version=1, model="cnn", num_layers=3,
                  stages=cuts_to_stages([0, 1, 2, 3], ["a", "b", "c"]))

    def stepped(step: int, busy: float) -> Stepped:
        return Stepped(device="b", time=0.0, pv=1, gen=0, step=step, stage=1, busy_ms=busy,
                       send_ms=1.0, bytes_act=10, bytes_grad=20, mbs=4)

    for ev in (stepped(0, 4.0), stepped(0, 4.0), stepped(1, 9.0), stepped(0, 4.0)):
        d.on_event(ev)
    tot = state.stages[1]
    assert tot.steps == 2 and tot.busy_ms == 9.0  # an old copy does not roll counters back


def test_an_event_carries_the_plan_of_the_compute_that_made_it(tmp_path: Any) -> None:
    """A plan arrives while a stage's optimizer step computes (in a worker thread); the
    ``stepped`` of that step must say the old plan version, or the coordinator would take a
    step of the replaced plan as one of the new plan."""
    import json
    import threading

    import aiomqtt
    import torch

    from accept_mqtt.model.descriptors import describe
    from accept_mqtt.model.zoo import build_model
    from accept_mqtt.wire import codec
    from accept_mqtt.wire.messages import Event, decode
    from accept_mqtt.wire.plan import cuts_to_stages
    from accept_mqtt.wire.topics import Topics
    from broker import MosquittoBroker

    from .conftest import running_agents

    b = MosquittoBroker()
    b.start()
    t, job = Topics(), "stamp"
    n = len(describe(build_model("cnn", seed=0)))

    def plan(version: int) -> str:
        return Plan(job=job, version=version, model="cnn", num_layers=n,
                    stages=cuts_to_stages([0, n], ["s1"]), micro_batches=1).to_json()

    async def main() -> list[Any]:
        events: list[Any] = []
        async with running_agents(b.url, ["s1"]) as (agent,), aiomqtt.Client(
                b.host, b.port) as c:
            await c.subscribe(t.events(job, "s1"), qos=1)

            async def next_event(op: str) -> Any:
                async with asyncio.timeout(20):
                    async for msg in c.messages:
                        ev = decode(Event, bytes(msg.payload or b""))
                        events.append(ev)
                        if json.loads(bytes(msg.payload or b"{}"))["op"] == op:
                            return ev
                raise AssertionError("unreachable")

            await c.publish(t.plan(job), plan(1), qos=1, retain=True)
            assert (await next_event("ready")).pv == 1
            entered, release = threading.Event(), threading.Event()
            step = agent.job.runner.step

            def slow_step(*a: Any) -> Any:
                entered.set()
                release.wait(20)
                return step(*a)

            agent.job.runner.step = slow_step  # the optimizer step of plan 1 takes a while
            x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
            f = codec.encode(x, bits=32, job=job, step=0, mb=0, kind="act", labels=y,
                             extra={"nmb": 1, "bsz": 4, "train": True, "pv": 1, "gen": 0})
            await c.publish(t.fwd(job, 0), codec.to_bytes(f), qos=1)
            assert await asyncio.to_thread(entered.wait, 20)
            await c.publish(t.plan(job), plan(2), qos=1, retain=True)  # re-plan meanwhile
            assert (await next_event("ready")).pv == 2
            release.set()
            await next_event("stepped")
            await c.publish(t.plan(job), b"", qos=1, retain=True)
        return events

    try:
        events = asyncio.run(main())
    finally:
        b.cleanup()
    (stepped,) = [e for e in events if type(e).__name__ == "Stepped"]
    assert stepped.step == 0 and stepped.pv == 1, stepped


class _FakeCosts:
    """The predictor's interface as the planner's drift handling reads it (FLOPs prior costs,
    a reported change of 3x)."""

    def layer_costs(self, descs: Any, profile: Any, batch: int, device: Any = None) -> Any:
        from accept_mqtt.coordinator.planner import prior_costs

        return prior_costs(descs, profile, batch)

    def drift_events(self, device: str) -> list[Any]:
        return []

    def device_factor(self, device: str) -> float:
        return 3.0

    def device_error(self, device: str) -> float:
        return 0.1


def test_a_drift_right_after_a_replan_is_acted_on_once_the_interval_has_passed() -> None:
    """A drift that moves the partition within ``replan_min_steps`` of the last re-plan waits
    and is taken once they have passed (before, it was dropped: the slowed device kept its
    share until some later drift); if the partition no longer moves by then, nothing is."""
    current: list[Plan | None] = [None]
    p = _planner(current)
    p.costs = _FakeCosts()
    a, b, c = _dev("a"), _dev("b"), _dev("c")
    p.start_with([a, b, c])
    current[0] = p.make_plan([a, b, c])
    p.replanned(5)  # a re-plan at step 5 (for noise, or for another device)
    p.know([_dev("c", 0.25)])  # c is now 20x slower
    p.state.step = 8
    p._on_drift("c")
    assert p.state.drifts[-1]["action"].startswith("re-plan once 10 steps have passed")
    assert not p.replan_requested and p.take_replan_request() is None  # not yet
    p.state.step = 14
    assert p.replan_requested  # the boundary before step 15: its inputs wait for it
    assert p.take_replan_request() is None
    p.state.step = 15
    reason = p.take_replan_request()
    assert reason is not None and reason.startswith("c changed speed (held back 10 steps")
    assert p.take_replan_request() is None and not p.replan_requested  # taken once

    # waiting, but c is back to its speed by the time it is due: no re-plan
    p.replanned(20)
    p.state.step = 22
    p._on_drift("c")
    p.know([_dev("c", 5.0)])
    p.state.step = 30
    assert p.take_replan_request() is None
    # and any re-plan settles a waiting drift (it planned with everything learnt)
    p.know([_dev("c", 0.25)])
    p.replanned(31)
    p.state.step = 32
    p._on_drift("c")
    assert not p.replan_requested
    p.replanned(33)
    p.state.step = 50
    assert not p.replan_requested and p.take_replan_request() is None


def test_error_reports_kept_are_bounded_and_all_are_counted() -> None:
    """A flood of bad input must not grow a process's memory: the coordinator keeps the
    latest ``ERRORS_KEPT`` reports and counts them all; an agent keeps the latest too."""
    from accept_mqtt.wire.messages import ERRORS_KEPT
    from device_agent.agent import Agent, AgentConfig

    st = RunState()
    for i in range(ERRORS_KEPT + 5):
        st.add_error({"type": "error", "device": "x", "topic": "t", "reason": str(i)})
    assert len(st.errors) == ERRORS_KEPT and st.errors_total == ERRORS_KEPT + 5
    assert st.errors[0]["reason"] == "5" and st.errors[-1]["reason"] == str(ERRORS_KEPT + 4)
    agent = Agent(AgentConfig(device_id="bounded", broker="mqtt://127.0.0.1:1"))
    assert agent.errors.maxlen == ERRORS_KEPT
