"""Memory budgets: a model too big for any one device is refused there, by the planner and by
an agent before it builds anything, and trains over three (tiny budgets, real Mosquitto)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiomqtt
import pytest

from accept_mqtt.coordinator import Coordinator, PlanRefused
from accept_mqtt.coordinator.config import TrainConfig
from accept_mqtt.coordinator.planner import DeviceInfo, build_plan, make_partition
from accept_mqtt.model.descriptors import describe
from accept_mqtt.model.footprint import parse_bytes
from accept_mqtt.model.zoo import build_model
from accept_mqtt.planning.partition import InfeasiblePlanError
from broker import MosquittoBroker
from device_agent.agent import memory_refusal

from .conftest import running_agents

# the digits CNN at batch 32 in 4 micro-batches needs 1,541,592 bytes to train on one device
# (model/footprint.py); the best 3-way split at most 1,167,232 per stage
LIMIT = parse_bytes("1.25MiB")
DEVICES = ["mem-a", "mem-b", "mem-c"]


def _cfg(tmp_path: Path, devices: int) -> TrainConfig:
    return TrainConfig(model="cnn", dataset="digits", batch_size=32, micro_batches=4,
                       max_steps=4, seed=3, devices=devices, runs_dir=str(tmp_path),
                       device_timeout=20, step_timeout=30, partition="auto")


def test_memory_sizes_parse_and_bad_ones_are_named() -> None:
    assert parse_bytes("512MB") == 512 * 2**20 and parse_bytes("1.5 GiB") == 3 * 2**29
    assert parse_bytes("300k") == 300 * 1024 and parse_bytes("4096") == 4096
    for bad in ("lots", "12XB", "-5MB", "0"):
        with pytest.raises(ValueError, match="memory size"):
            parse_bytes(bad)


def test_the_agent_check_and_the_planner_agree_to_the_byte() -> None:
    """A plan the planner made fits every agent's check; one byte less and it is refused."""
    cfg = _cfg(Path("."), 3)
    descs = describe(build_model("cnn", seed=cfg.seed))
    devs = [DeviceInfo(d, {"bench_gflops": 1.0, "memory_limit_mb": LIMIT / 2**20})
            for d in DEVICES]
    res = make_partition(descs, devs, cfg, method="dp")
    plan = build_plan("j", cfg, len(descs), [next(d for d in devs if d.id == i)
                                             for i in res.devices], list(res.cuts),
                      method="dp", optimizer=cfg.optimizer_cfg(10))
    for stage, need in zip(plan.stages, res.memory_bytes, strict=True):
        assert need <= LIMIT
        assert memory_refusal(plan, stage.device, LIMIT / 2**20) is None
        assert memory_refusal(plan, stage.device, need / 2**20) is None
        why = memory_refusal(plan, stage.device, (need - 1) / 2**20)
        assert why is not None and f"needs {need / 2**20:.3f} MiB ({need:.0f} bytes" in why


def test_too_big_for_one_device_refused_there_and_trains_over_three(
        broker: MosquittoBroker, tmp_path: Path) -> None:
    errors_seen: list[dict] = []

    async def watch(job: str, ready: asyncio.Event) -> None:
        async with aiomqtt.Client(broker.host, broker.port) as c:
            await c.subscribe(f"accept/jobs/{job}/metrics")
            ready.set()
            async for msg in c.messages:
                body = json.loads(bytes(msg.payload or b"{}"))
                if body.get("type") == "error":
                    errors_seen.append(body)

    async def main() -> dict:
        ready = asyncio.Event()
        watcher = asyncio.create_task(watch("mem-one", ready))
        await ready.wait()
        async with running_agents(broker.url, DEVICES, memory_limit=LIMIT) as agents:
            assert all(a.profile.memory_limit_mb == LIMIT / 2**20 for a in agents)
            # 1. the planner will not put the whole model on one device
            with pytest.raises(InfeasiblePlanError) as planned:
                async with Coordinator(broker.url, _cfg(tmp_path, 1), job="mem-plan") as c:
                    await c.run()
            msg = str(planned.value)
            assert planned.value.layer is not None
            assert f"layer {planned.value.layer} (" in msg and "1541592 bytes" in msg, msg
            # 2. an agent handed that plan anyway refuses it before building the stage
            async with Coordinator(broker.url, _cfg(tmp_path, 1), job="mem-one") as c:
                c.planner.set_run(4, "digits")
                descs = describe(build_model("cnn", seed=3))
                plan = build_plan("mem-one", c.cfg, len(descs),
                                  [DeviceInfo("mem-a", {})], [0, len(descs)],
                                  method="by hand", optimizer=c.planner.optimizer or {})
                with pytest.raises(PlanRefused) as refused:
                    await c.publish_plan(plan, timeout=20)
            assert agents[0].job is None, "nothing of the stage was built"
            # 3. over three devices it fits and trains
            async with Coordinator(broker.url, _cfg(tmp_path, 3), job="mem-three") as c:
                record = await c.run()
        watcher.cancel()
        return {"record": record, "refused": str(refused.value)}

    out = asyncio.run(main())
    why = out["refused"]
    assert "device mem-a refused the plan: stage 0 (layers [0, 14) of cnn)" in why, why
    assert "does not fit this device's memory limit of 1310720 bytes" in why, why
    assert "needs 1.470 MiB (1541592 bytes" in why and "the largest part is layer " in why, why
    assert [e["device"] for e in errors_seen] == ["mem-a"], errors_seen
    assert errors_seen[0]["topic"] == "accept/jobs/mem-one/plan"
    record = out["record"]
    assert record["steps"] == 4 and len(record["plan"]["stages"]) == 3
    assert record["final_accuracy"] is not None


def test_baseline_splits_that_do_not_fit_are_refused_with_the_stage() -> None:
    from accept_mqtt.coordinator.planner import PlanningError

    cfg = _cfg(Path("."), 3)
    descs = describe(build_model("cnn", seed=cfg.seed))
    devs = [DeviceInfo(d, {"bench_gflops": 1.0, "memory_limit_mb": 0.9}) for d in DEVICES]
    with pytest.raises(PlanningError, match=r"the equal split does not fit: stage 0 \(layers "
                                            r"\[0, 5\)\) needs 1167232 bytes but mem-a has 943718"):
        make_partition(descs, devs, cfg, method="equal")
