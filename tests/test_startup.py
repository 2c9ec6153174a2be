"""Faults before step 0, against a real Mosquitto: start-up survives them like a step does.

Discovery, loading the first plan and the first restore after ``--resume`` each meet a lost
device or a broker restart here (issue 14, point 1). As in ``test_faults``, with compression
off the final parameters must equal a one-process run of the same steps: a fault at start-up
that re-planned from the wrong state (seed weights where a checkpoint was due, a step skipped)
would show up as a difference.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from accept_mqtt.coordinator import Coordinator
from accept_mqtt.coordinator.config import TrainConfig
from accept_mqtt.harness.local import AgentSpec, LocalCluster
from accept_mqtt.wire.aio import cancel_and_wait
from broker import MosquittoBroker

from .conftest import running_agents
from .test_faults import DEVICES, _assert_same_as_reference, _cfg, _until_step


@pytest.mark.parametrize("when", ["before-the-plan", "while-it-loads"])
def test_agent_killed_at_start_up(tmp_path: Path, when: str) -> None:
    """The issue's run: three agents, one SIGKILLed after discovery, before step 0: its Will
    arrives before the plan goes out, or while the agents load it. The job gives it
    ``rejoin_grace`` to come back, then re-plans over the two that are left."""
    specs = [AgentSpec(f"s-{i}", keepalive=2) for i in range(3)]
    cfg = _cfg(tmp_path, max_steps=6, checkpoint_every=0, rejoin_grace=2.0, device_timeout=60)
    victims: list[str] = []
    with LocalCluster(specs, workdir=tmp_path) as cluster:

        async def main() -> dict[str, Any]:
            async with Coordinator(cluster.url, cfg, job="early-kill") as coord:
                publish = coord.steps.publish_plan

                async def kill_and_publish(plan: Any, timeout: float = 60.0) -> None:
                    if victims:  # the re-plan
                        return await publish(plan, timeout)
                    victims.append(plan.devices[1])
                    if when == "before-the-plan":
                        cluster.kill_agent(victims[0])
                        while coord.fleet.device_state(victims[0]) != "offline":
                            await asyncio.sleep(0.01)
                        return await publish(plan, timeout)
                    loading = asyncio.create_task(publish(plan, timeout))
                    await asyncio.sleep(0.05)  # the plan is out, the agents build their stages
                    cluster.kill_agent(victims[0])
                    return await loading

                coord.steps.publish_plan = kill_and_publish  # type: ignore[method-assign]
                return await asyncio.wait_for(coord.run(), 120)

        record = asyncio.run(main())
    (victim,) = victims
    assert record["steps"] == 6
    (rec,) = record["recoveries"]
    assert rec["at_step"] == 0 and rec["lost"] == [victim], rec
    assert rec["action"] == "re-plan from checkpoint" and rec["redo_steps"] == 0
    devices = [s["device"] for s in record["plan"]["stages"]]
    assert victim not in devices and len(devices) == 2
    assert record["plan"]["version"] == 2
    _assert_same_as_reference(record["model_path"], cfg, 6)


def test_broker_restart_while_a_resumed_job_restores(tmp_path: Path) -> None:
    """``--resume`` after a coordinator crash; the broker restarts (keeping its retained
    messages) after discovery, while the new plan loads and the checkpoint is restored. The
    re-plan must restore the resumed checkpoint, not start the stages from their seed."""
    b = MosquittoBroker(persistence=True)
    b.start()
    cfg = _cfg(tmp_path, checkpoint_every=3, max_steps=12, rejoin_grace=30.0)
    seen: dict[str, int] = {}
    try:
        async def main() -> dict[str, Any]:
            async with running_agents(b.url, DEVICES):
                async with Coordinator(b.url, cfg, job="early-bounce") as coord:
                    run = asyncio.create_task(coord.run())
                    await _until_step(coord, run, 5)
                    await cancel_and_wait(run)
                    seen["checkpoint"] = coord.state.checkpoints[-1]
                resumed = TrainConfig(**{**cfg.to_dict(), "resume": True})
                async with Coordinator(b.url, resumed, job="early-bounce") as coord:
                    start_with = coord.planner.start_with

                    def found_then_restart(devices: list[Any]) -> None:
                        start_with(devices)
                        b.restart()  # every connection drops before the plan goes out

                    coord.planner.start_with = found_then_restart  # type: ignore[method-assign]
                    return await asyncio.wait_for(coord.run(), 120)

        record = asyncio.run(main())
    finally:
        b.cleanup()
    assert record["steps"] == 12
    (rec,) = record["recoveries"]  # no "resumed": the resume's restore never finished
    assert "broker connection lost" in rec["reason"], rec
    assert rec["at_step"] == rec["restored_step"] == seen["checkpoint"] >= 3, rec
    assert rec["redo_steps"] == 0, rec
    assert rec["action"] == "re-plan from checkpoint", "no rewind of stages never restored"
    _assert_same_as_reference(record["model_path"], cfg, 12)


def test_broker_restart_while_waiting_for_devices(broker: MosquittoBroker,
                                                  tmp_path: Path) -> None:
    """The coordinator reconnects and goes on waiting; agents that start later are found."""
    cfg = _cfg(tmp_path, max_steps=3, checkpoint_every=0, device_timeout=30)

    async def main() -> dict[str, Any]:
        async with Coordinator(broker.url, cfg, job="early-wait") as coord:
            run = asyncio.create_task(coord.run())
            await asyncio.sleep(1.0)  # waiting for devices: there are none yet
            await asyncio.to_thread(broker.restart)
            async with running_agents(broker.url, DEVICES):
                return await asyncio.wait_for(run, 60)

    record = asyncio.run(main())
    assert record["steps"] == 3 and record["recoveries"] == []
    _assert_same_as_reference(record["model_path"], cfg, 3)


def test_an_agent_started_before_its_broker_connects_once_it_is_up(tmp_path: Path) -> None:
    """A device may boot before its broker (or meet one too busy to answer a CONNECT in
    time): the agent process keeps trying instead of exiting, and comes online when the
    broker does. (An agent refused by the broker is not retried: test_security.)"""
    import subprocess
    import sys
    import time

    from broker import free_port

    from .conftest import wait_retained

    port = free_port()
    log = (tmp_path / "agent.log").open("w")
    agent = subprocess.Popen([sys.executable, "-m", "device_agent", "--broker",
                              f"mqtt://127.0.0.1:{port}", "--device-id", "early-bird"],
                             stdout=log, stderr=subprocess.STDOUT)
    try:
        time.sleep(2.0)
        assert agent.poll() is None, (tmp_path / "agent.log").read_text()
        with MosquittoBroker(port=port, workdir=tmp_path / "broker") as b:
            status = asyncio.run(wait_retained(b.url, "accept/devices/early-bird/status",
                                               lambda s: s.get("state") == "online", 30))
            assert status["state"] == "online"
            agent.terminate()  # while its broker is up: a clean goodbye
            assert agent.wait(20) == 0
        assert "unreachable" in (tmp_path / "agent.log").read_text()  # it said why it waited
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(5)
        log.close()
