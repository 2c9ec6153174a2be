"""The coordinator's liveness and lease, and twins, against a real Mosquitto (issue 14, 2 and 3).

* A coordinator that crashes (SIGKILL: no goodbye) leaves its plan retained; its Will says
  ``gone``, and agents leave the job once they have not heard it alive for its lease; an agent
  that boots later does not join the dead job. ``--resume`` works after the lease (agents
  idle) and within it (agents still holding the job).
* A second coordinator for a running job, or a second agent with a live agent's device id,
  refuses to start, and the first one is not disturbed.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal

import aiomqtt
import pytest

from accept_mqtt.coordinator import Coordinator, CoordinatorError
from accept_mqtt.coordinator.config import TrainConfig
from accept_mqtt.harness.local import AgentSpec, LocalCluster
from accept_mqtt.wire.liveness import PROBE_WAIT
from broker import MosquittoBroker
from device_agent.agent import Agent, AgentConfig, DeviceIdTaken

from .conftest import running_agents, wait_retained
from .test_faults import DEVICES, _assert_same_as_reference, _cfg, _until_step


def _train_process(url: str, cfg: TrainConfig, job: str, lease: float, log: Path,
                   resume: bool = False) -> subprocess.Popen[bytes]:
    """``accept-mqtt train`` on the fleet broker, as a user starts it (so it can be killed)."""
    cmd = [sys.executable, "-m", "accept_mqtt.cli", "train", "--broker", url, "--job", job,
           "--devices", str(cfg.devices), "--model", cfg.model, "--dataset", str(cfg.dataset),
           "--epochs", str(cfg.epochs), "--batch-size", str(cfg.batch_size),
           "--micro-batches", str(cfg.micro_batches), "--max-steps", str(cfg.max_steps),
           "--seed", str(cfg.seed), "--runs-dir", cfg.runs_dir, "--partition", cfg.partition,
           "--checkpoint-every", str(cfg.checkpoint_every), "--lease", str(lease),
           "--no-progress"] + (["--resume"] if resume else [])
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)


def _checkpoint_after(url: str, job: str, step: int, proc: subprocess.Popen[bytes]) -> int:
    """Wait for a checkpoint of ``job`` at a step after ``step``; its step."""
    async def wait() -> int:
        body = await wait_retained(url, f"accept/jobs/{job}/metrics",
                                   lambda b: b.get("type") == "checkpoint" and b["step"] > step,
                                   120)
        return int(body["step"])
    try:
        return asyncio.run(wait())
    except TimeoutError:
        raise AssertionError(f"no checkpoint after step {step}; coordinator rc "
                             f"{proc.poll()}") from None


def _statuses(url: str, devices: list[str]) -> dict[str, dict[str, Any]]:
    async def read() -> dict[str, dict[str, Any]]:
        return {d: await wait_retained(url, f"accept/devices/{d}/status", lambda b: True, 5)
                for d in devices}
    return asyncio.run(read())


def test_a_crashed_coordinators_job_is_left_after_its_lease(broker: MosquittoBroker,
                                                           tmp_path: Path) -> None:
    lease, job = 5.0, "orphan"
    cfg = _cfg(tmp_path, max_steps=30, checkpoint_every=3)
    ids = [f"l-{i}" for i in range(3)]
    topic = f"accept/jobs/{job}/coordinator"
    with LocalCluster([AgentSpec(d, keepalive=2) for d in ids], broker=broker,
                      workdir=tmp_path) as cluster:
        # 1. a coordinator with a short lease crashes after its first checkpoint
        first = _train_process(broker.url, cfg, job, lease, tmp_path / "coord-1.log")
        _checkpoint_after(broker.url, job, 0, first)
        first.kill()
        first.wait()
        t_kill = time.monotonic()
        will = asyncio.run(wait_retained(broker.url, topic, lambda b: b["state"] == "gone", 10))
        assert will["reason"] == "connection lost" and will["lease_s"] == lease
        # ... its agents hold the job for the lease, then go back to idle
        time.sleep(max(0.0, t_kill + lease - 1.5 - time.monotonic()))
        busy = _statuses(broker.url, ids)
        assert all(s["state"] == "busy" and s["job"] == job for s in busy.values()), busy
        for d in ids:
            asyncio.run(wait_retained(broker.url, f"accept/devices/{d}/status",
                                      lambda b: b["state"] == "online", lease + 10))
        print(f"agents idle {time.monotonic() - t_kill:.1f}s after the kill (lease {lease}s)")
        assert time.monotonic() - t_kill <= lease + 8
        assert "its coordinator was not heard alive for the lease" in cluster.agent_log(ids[0])
        # an agent of the plan that boots now finds the plan retained, and does not join it
        cluster.kill_agent(ids[1])
        cluster.start_agent(AgentSpec(ids[1], keepalive=2))
        deadline = time.monotonic() + 60
        while "not joining plan" not in cluster.agent_log(ids[1]):
            assert time.monotonic() < deadline, cluster.agent_log(ids[1])
            time.sleep(0.2)
        assert _statuses(broker.url, [ids[1]])[ids[1]]["state"] == "online"

        # 2. --resume after the lease: the agents are idle and join again; it crashes too
        second = _train_process(broker.url, cfg, job, 60.0, tmp_path / "coord-2.log",
                                resume=True)
        _checkpoint_after(broker.url, job, 3, second)
        second.kill()
        second.wait()
        asyncio.run(wait_retained(broker.url, topic, lambda b: b["state"] == "gone", 10))

        # 3. --resume within that one's lease: the agents still hold the job
        busy = _statuses(broker.url, ids)
        assert all(s["state"] == "busy" and s["job"] == job for s in busy.values()), busy
        resumed = TrainConfig(**{**cfg.to_dict(), "resume": True})

        async def third() -> dict[str, Any]:
            async with Coordinator(broker.url, resumed, job=job) as coord:
                return await asyncio.wait_for(coord.run(), 120)

        record = asyncio.run(third())
    assert record["steps"] == 30
    assert record["recoveries"][0]["type"] == "resumed", record["recoveries"]
    _assert_same_as_reference(record["model_path"], cfg, 30)


def test_a_second_coordinator_for_a_running_job_refuses_to_start(broker: MosquittoBroker,
                                                                 tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, max_steps=6, checkpoint_every=0)

    async def main() -> dict[str, Any]:
        async with running_agents(broker.url, DEVICES):
            async with Coordinator(broker.url, cfg, job="twins") as coord:
                run = asyncio.create_task(coord.run())
                await _until_step(coord, run, 2)
                with pytest.raises(CoordinatorError, match="already has a live coordinator") as e:
                    async with Coordinator(broker.url, cfg, job="twins"):
                        pass
                assert coord.session.owner in str(e.value)  # it names the holder
                return await asyncio.wait_for(run, 60)

    record = asyncio.run(main())
    assert record["steps"] == 6
    assert record["recoveries"] == [] and record["errors"] == []  # the first never noticed
    _assert_same_as_reference(record["model_path"], cfg, 6)


def test_a_second_agent_with_a_live_agents_id_refuses_to_start(broker: MosquittoBroker) -> None:
    status_topic = "accept/devices/twin-a/status"

    async def main() -> None:
        async with running_agents(broker.url, ["twin-a"]) as (first,):
            with pytest.raises(DeviceIdTaken, match="held by a live agent") as e:
                async with Agent(AgentConfig(broker.url, "twin-a")):
                    pass
            assert first.instance in str(e.value)
            await asyncio.sleep(0.5)
            assert first.reconnects == 0 and first._client is not None
            status = await wait_retained(broker.url, status_topic, lambda b: True, 5)
            assert status["state"] == "online" and status["instance"] == first.instance
        # the first said goodbye: the id is free at once
        t0 = time.monotonic()
        async with Agent(AgentConfig(broker.url, "twin-a")):
            pass
        assert time.monotonic() - t0 < PROBE_WAIT
        # a status that names a holder that does not answer (it died, its Will has not fired
        # yet): the id is free after the probe's wait
        ghost = {"state": "busy", "device": "twin-a", "time": 0.0, "instance": "ghost:1:x"}
        async with aiomqtt.Client(broker.host, broker.port) as c:
            await c.publish(status_topic, json.dumps(ghost), qos=1, retain=True)
        t0 = time.monotonic()
        async with Agent(AgentConfig(broker.url, "twin-a")):
            pass
        assert time.monotonic() - t0 >= PROBE_WAIT - 0.1

    asyncio.run(main())


def test_twins_that_started_together_end_after_one_takeover(broker: MosquittoBroker,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """The remaining window (docs/faults.md): the second agent's check ran before the first had
    announced itself, so it takes the first one's session over. The one taken over checks
    again when it reconnects, finds the other, and stops: no takeover loop."""
    import device_agent.agent as agent_mod

    real = agent_mod.live_holder
    first = Agent(AgentConfig(broker.url, "loop", compute_thread=True))
    second = Agent(AgentConfig(broker.url, "loop", compute_thread=True))

    async def racing(*args: Any, **kw: Any) -> str | None:
        if kw["me"] == second.instance and not second.reconnects:
            return None  # its check "ran" before the first agent's status existed
        return await real(*args, **kw)

    monkeypatch.setattr(agent_mod, "live_holder", racing)

    async def main() -> None:
        async with first, second:  # the second CONNECT takes the first one's session over
            runs = {a: asyncio.create_task(a.run()) for a in (first, second)}
            done, _ = await asyncio.wait(runs.values(), timeout=30,
                                         return_when=asyncio.FIRST_COMPLETED)
            assert len(done) == 1, "one of the twins stops"
            (loser,) = [a for a, t in runs.items() if t in done]
            (winner,) = [a for a in runs if a is not loser]
            with pytest.raises(DeviceIdTaken, match="held by a live agent"):
                runs[loser].result()
            await asyncio.sleep(2.0)  # and the other one is left alone from then on
            assert not runs[winner].done() and winner.reconnects <= 1
            status = await wait_retained(broker.url, "accept/devices/loop/status",
                                         lambda b: True, 5)
            assert status["instance"] == winner.instance and status["state"] == "online"
            winner.stop()
            await runs[winner]

    asyncio.run(main())


def test_the_agents_lease_rules() -> None:
    """Which word of a coordinator keeps an agent in its job (no broker: the rules alone)."""
    from accept_mqtt.wire.liveness import allowed_silence
    from accept_mqtt.wire.messages import CoordinatorStatus, encode

    def word(state: Literal["alive", "gone"], lease: float = 6.0) -> bytes:
        return encode(CoordinatorStatus(state=state, job="j", owner="h:1:x", time=0.0,
                                        lease_s=lease))

    async def main() -> None:
        agent = Agent(AgentConfig("mqtt://127.0.0.1:1", "rules"))
        topic = "accept/jobs/j/coordinator"
        assert agent._coordinator_gone("j") is None  # never heard: no lease (older coordinator)
        await agent._on_coordinator("j", topic, word("alive"))
        assert agent._coordinator_gone("j") is None
        heard = agent._coordinators["j"]
        heard.heard -= allowed_silence(6.0, 6.0) - 0.5  # silent, but within lease + renewal
        assert agent._coordinator_gone("j") is None
        heard.heard -= 1.0
        assert "not heard alive" in (agent._coordinator_gone("j") or "")
        await agent._on_coordinator("j", topic, word("alive"))  # a renewal
        assert agent._coordinator_gone("j") is None
        await agent._on_coordinator("j", topic, word("gone"))  # the Will: no joining...
        assert "gone" in (agent._coordinator_gone("j") or "")
        assert not agent._expired(heard)  # ... but a job held is kept for the lease
        await agent._on_coordinator("j", topic, b'{"state": "alive"}')  # bad: what was heard stands
        assert agent.errors and "bad coordinator status" in agent.errors[-1].reason
        assert "gone" in (agent._coordinator_gone("j") or "")
        await agent._on_coordinator("j", topic, b"")  # cleared: the job ended cleanly
        assert "j" not in agent._coordinators
        # the agent's own --lease can only shorten the coordinator's
        short = Agent(AgentConfig("mqtt://127.0.0.1:1", "rules", lease=1.0))
        await short._on_coordinator("j", topic, word("alive", lease=60.0))
        short._coordinators["j"].heard -= allowed_silence(1.0, 60.0) + 0.1
        assert "lease 1s" in (short._coordinator_gone("j") or "")

    asyncio.run(main())
