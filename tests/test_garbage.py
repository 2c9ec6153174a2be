"""Bad input on a job's topics never stops training (issue 14, found by ``bench chaos``).

* A payload on the plan topic that is no plan, and a well-formed plan someone else published,
  are refused by the agents (an ``error`` on the metrics topic; only a refusal naming the
  coordinator's own plan version and owner stops the job), and training goes on.
* What the coordinator itself cannot decode reaches the metrics topic too, rate-limited: the
  ones over the limit as one summary with their count.
* A coordinator resumed after a crash is obeyed even when the plan version it publishes is the
  one a dead coordinator left the agents running (its live re-plan came after the checkpoint).
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import aiomqtt

from accept_mqtt.coordinator import Coordinator
from accept_mqtt.coordinator.config import TrainConfig
from accept_mqtt.model.checkpoint import Checkpoint
from broker import MosquittoBroker

from .conftest import collect_json, running_agents
from .test_faults import _assert_same_as_reference
from .test_faults import _cfg as _faults_cfg

DEVICES = ["g-a", "g-b", "g-c"]
GARBAGE = 30  # undecodable events: more than REJECTS_PER_SECOND, in well under a second
LATE = 10  # more of them while the last steps run


def _cfg(tmp_path: Path, **kw: Any) -> TrainConfig:
    return _faults_cfg(tmp_path, **{"max_steps": 6, "checkpoint_every": 0, **kw})


async def _eventually(cond: Any, timeout: float, what: str) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.05)
    assert cond(), what


def test_garbage_on_job_topics_is_reported_and_training_goes_on(broker: MosquittoBroker,
                                                                 tmp_path: Path) -> None:
    job = "junkyard"
    jt = f"accept/jobs/{job}"
    cfg = _cfg(tmp_path)
    metrics: list[dict[str, Any]] = []
    kept: dict[str, Any] = {}

    def errors() -> list[dict[str, Any]]:
        return [m for m in metrics if m.get("type") == "error"]

    def from_coordinator() -> list[dict[str, Any]]:
        return [e for e in errors() if e["device"] == "coordinator"]

    def on_plan() -> list[dict[str, Any]]:
        return [e for e in errors() if e["topic"] == f"{jt}/plan"]

    async def attack(coord: Coordinator, agents: list[Any]) -> None:
        while coord.state.step < 2:
            await asyncio.sleep(0.01)
        coord._running.clear()  # hold training so every answer is in before it ends
        plan = coord.plan
        assert plan is not None
        forged = dataclasses.replace(plan, version=plan.version + 1, owner="forger")
        async with aiomqtt.Client(broker.host, broker.port) as c:
            await c.publish(f"{jt}/plan", b'{"job": 42, "stages": "all"}', qos=1)
            await c.publish(f"{jt}/plan", forged.to_json(), qos=1)
            await c.publish(f"{jt}/timing/g-b", b"not json", qos=1)  # first: not suppressed
            for i in range(GARBAGE):
                await c.publish(f"{jt}/events/g-a", b'{"op": "stepped", "device": %d}' % i,
                                qos=1)
        # every agent refuses both plans; the coordinator's rejections are all accounted for
        await _eventually(lambda: len(on_plan()) == 2 * len(DEVICES), 15, "plan refusals")
        await _eventually(lambda: len(from_coordinator()) - len(_summaries(errors()))
                          + sum(s["suppressed"] for s in _summaries(errors())) == GARBAGE + 1,
                          15, "coordinator rejections on the metrics topic")
        kept["plans"] = [(a.job.plan.version, a.job.plan.owner) for a in agents]
        kept["owner"] = coord.session.owner
        coord._running.set()
        async with aiomqtt.Client(broker.host, broker.port) as c:  # more as training ends:
            for i in range(LATE):  # what the limit holds back goes out even if it ends first
                await c.publish(f"{jt}/events/g-c", b'{"op": %d}' % i, qos=1)

    async def main() -> dict[str, Any]:
        watcher = asyncio.create_task(collect_json(broker, f"{jt}/metrics", metrics))
        await asyncio.sleep(0.2)
        async with running_agents(broker.url, DEVICES) as agents:
            async with Coordinator(broker.url, cfg, job=job) as coord:
                attacker = asyncio.create_task(attack(coord, agents))
                record = await asyncio.wait_for(coord.run(), 90)
                await attacker
            await asyncio.sleep(0.5)  # the last metrics reach the watcher
        watcher.cancel()
        return record

    record = asyncio.run(main())
    assert record["steps"] == 6, "bad input must never stop training"
    assert kept["plans"] == [(1, kept["owner"])] * 3, "agents kept the coordinator's plan"
    garbage = [e for e in on_plan() if e["plan_version"] is None]
    assert {e["device"] for e in garbage} == set(DEVICES)
    assert all("$.job" in e["reason"] for e in garbage), garbage
    forged = [e for e in on_plan() if e["plan_version"] is not None]
    assert {e["device"] for e in forged} == set(DEVICES)
    assert all(e["plan_version"] == 2 and e["plan_owner"] == "forger"
               and "comes from forger" in e["reason"] for e in forged), forged
    mine = from_coordinator()
    assert any(e["topic"] == f"{jt}/timing/g-b" and "malformed" in e["reason"].lower()
               for e in mine), mine
    events = [e for e in mine if e["topic"] == f"{jt}/events/g-a" and not e.get("suppressed")]
    assert events and all("Expected `str`, got `int` - at `$.device`" in e["reason"]
                          for e in events), events
    assert len(events) < GARBAGE, "a flood is rate-limited"
    summaries = _summaries(errors())
    assert summaries, "the suppressed ones are counted in a summary"
    assert summaries[0]["suppressed_topics"] == [f"{jt}/events/g-a"], summaries
    assert all("more rejected messages" in s["reason"] and set(s["suppressed_topics"])
               <= {f"{jt}/events/g-a", f"{jt}/events/g-c"} for s in summaries), summaries
    # every rejection is on the metrics topic, one by one or counted in a summary
    total = GARBAGE + 1 + LATE
    assert len(mine) - len(summaries) + sum(s["suppressed"] for s in summaries) == total
    # the run record keeps every one of them
    assert sum(e["device"] == "coordinator" for e in record["errors"]) == total


def _summaries(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in errors if e.get("suppressed")]


def test_resume_is_obeyed_when_agents_run_its_plan_version(broker: MosquittoBroker,
                                                           tmp_path: Path) -> None:
    """The chaos bench's hang: a drift re-plan checkpointed at v and moved the agents to v+1,
    then the coordinator died. Here the dead coordinator's v+1 is left retained by hand (its
    crash left it so), the agents run it, and ``--resume`` publishes v+1 again: it must be
    taken (another owner), restored from the checkpoint, and trained to the end."""
    job = "lazarus"
    cfg = _cfg(tmp_path, checkpoint_every=4)
    left: dict[str, Any] = {}

    async def main() -> dict[str, Any]:
        async with running_agents(broker.url, DEVICES) as agents:
            async with Coordinator(broker.url, cfg, job=job) as coord:
                await coord.run()
                plan = coord.plan
            assert plan is not None
            ck = Checkpoint.load(tmp_path / job / "checkpoint.pt")
            assert ck.step == 4 and ck.plan_version == plan.version == 1
            dead = dataclasses.replace(plan, version=ck.plan_version + 1, owner="dead",
                                       start_step=ck.step)
            async with aiomqtt.Client(broker.host, broker.port) as c:
                await c.publish(f"accept/jobs/{job}/plan", dead.to_json(), qos=1, retain=True)
            await _eventually(lambda: all(a.job is not None and a.job.plan.owner == "dead"
                                          for a in agents), 20, "agents run the dead plan")
            resumed = TrainConfig(**{**cfg.to_dict(), "resume": True})
            async with Coordinator(broker.url, resumed, job=job) as coord:
                record = await asyncio.wait_for(coord.run(), 40)
                left["owners"] = {a.job.plan.owner for a in agents if a.job is not None}
                left["owner"] = coord.session.owner
            return record

    record = asyncio.run(main())
    assert left["owners"] == {left["owner"]}, "the agents took the resumed coordinator's plan"
    assert record["recoveries"][0] == {"type": "resumed", "restored_step": 4,
                                       "plan_version": 2}
    assert record["steps"] == 6
    _assert_same_as_reference(record["model_path"], cfg, 6)


def test_reject_limiter_doctests() -> None:
    """The rate limit's rule (admit the first N of each window, count and name the rest)."""
    import doctest

    from accept_mqtt.coordinator import ratelimit

    res = doctest.testmod(ratelimit)
    assert res.attempted >= 4 and res.failed == 0
