"""Memory budgets: a model too big for any one device is refused there, by the planner and by
an agent before it builds anything, and trains over three (tiny budgets, real Mosquitto)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from accept_mqtt.coordinator import Coordinator, PlanRefused
from accept_mqtt.coordinator.config import TrainConfig
from accept_mqtt.coordinator.planner import (
    DeviceInfo,
    PlanningError,
    build_plan,
    make_partition,
)
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
                      method="dp", optimizer=cfg.optimizer_cfg(10), deeper=res.deeper)
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
    cfg = _cfg(Path("."), 3)
    descs = describe(build_model("cnn", seed=cfg.seed))
    devs = [DeviceInfo(d, {"bench_gflops": 1.0, "memory_limit_mb": 0.9}) for d in DEVICES]
    with pytest.raises(PlanningError, match=r"the equal split does not fit: stage 0 \(layers "
                                            r"\[0, 5\)\) needs 1167232 bytes but mem-a has 943718"):
        make_partition(descs, devs, cfg, method="equal")


# -- how deep 1F1B runs (--in-flight) ---------------------------------------------------------
def _plan_at(cfg: TrainConfig, limit_mb: float | None) -> tuple[Any, Any, list[DeviceInfo]]:
    descs = describe(build_model("cnn", seed=cfg.seed))
    prof: dict[str, Any] = {"bench_gflops": 1.0}
    if limit_mb is not None:
        prof["memory_limit_mb"] = limit_mb
    devs = [DeviceInfo(d, dict(prof)) for d in DEVICES]
    res = make_partition(descs, devs, cfg, method="equal")
    plan = build_plan("j", cfg, len(descs), [next(d for d in devs if d.id == i)
                                             for i in res.devices], list(res.cuts),
                      method="equal", optimizer=cfg.optimizer_cfg(10), deeper=res.deeper)
    return res, plan, devs


def test_stash_per_stage_follows_the_depth() -> None:
    from accept_mqtt.model.footprint import in_flight

    # textbook 1F1B, 3 stages of 4 micro-batches: 3, 2, 1; two deeper: every stage but the
    # last holds all 4; GPipe holds all 4 everywhere
    assert [in_flight("1f1b", 4, r) for r in (2, 1, 0)] == [3, 2, 1]
    assert [in_flight("1f1b", 4, r, 1) for r in (2, 1, 0)] == [4, 3, 1]
    assert [in_flight("1f1b", 4, r, 2) for r in (2, 1, 0)] == [4, 4, 1]
    assert [in_flight("gpipe", 4, r) for r in (2, 1, 0)] == [4, 4, 4]


def test_in_flight_auto_goes_as_deep_as_every_device_holds_and_the_agents_agree() -> None:
    cfg = _cfg(Path("."), 3)
    res, plan, _ = _plan_at(cfg, None)  # no limit: every stage but the last holds all M
    assert res.deeper == cfg.micro_batches - 2 and plan.in_flight == 3 + 2
    textbook = replace(cfg, in_flight=3)
    res0, plan0, _ = _plan_at(textbook, None)
    assert res0.deeper == 0 and plan0.in_flight == 3
    # a limit between the two: the depth is the largest that fits, and the agents' own
    # check (which sizes by the plan's in_flight) agrees with the planner's bytes
    lo, hi = max(res0.memory_bytes), max(res.memory_bytes)
    assert lo < hi
    mid = (lo + hi) / 2 / 2**20
    res_mid, plan_mid, _ = _plan_at(cfg, mid)
    assert 0 <= res_mid.deeper < 2 and max(res_mid.memory_bytes) <= mid * 2**20
    deeper_one = replace(cfg, in_flight=plan_mid.in_flight + 1)
    with pytest.raises(PlanningError, match=f"in_flight {plan_mid.in_flight + 1} does not "
                                            f"fit: stage"):
        _plan_at(deeper_one, mid)
    for stage, need in zip(plan_mid.stages, res_mid.memory_bytes, strict=True):
        assert memory_refusal(plan_mid, stage.device, mid) is None
        assert memory_refusal(plan_mid, stage.device, (need - 1) / 2**20) is not None


def test_in_flight_below_the_stage_count_or_under_gpipe_is_refused() -> None:
    from accept_mqtt.coordinator.config import ConfigError
    from accept_mqtt.wire.plan import Plan, PlanError

    with pytest.raises(PlanningError, match="in_flight 2 is below the 3 stages"):
        _plan_at(replace(_cfg(Path("."), 3), in_flight=2), None)
    with pytest.raises(ConfigError, match="applies to the 1f1b schedule only"):
        TrainConfig(schedule="gpipe", in_flight=4).validate()
    for bad in (0, True, "deep"):
        with pytest.raises(ConfigError, match="in_flight must be an int >= 1 or 'auto'"):
            TrainConfig(in_flight=bad).validate()  # type: ignore[arg-type]
    assert TrainConfig.from_dict({"in_flight": 6}).in_flight == 6
    assert TrainConfig.from_dict({"in_flight": "auto"}).in_flight == "auto"
    _, plan, _ = _plan_at(_cfg(Path("."), 3), None)
    d = plan.to_dict()
    for bad_plan in ({**d, "in_flight": 2}, {**d, "in_flight": 5, "schedule": "gpipe"}):
        with pytest.raises(PlanError, match="in_flight must be None or, under 1f1b, at least"):
            Plan.from_dict(bad_plan)
    assert Plan.from_json(plan.to_json()) == plan
