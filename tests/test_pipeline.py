"""The spine: a model trains cut over three agents that talk only through a real Mosquitto."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiomqtt
import msgpack
import pytest
import torch

from accept_mqtt.coordinator import Coordinator
from accept_mqtt.coordinator.config import TrainConfig
from accept_mqtt.model.data import load_dataset
from accept_mqtt.model.reference import train_reference
from accept_mqtt.model.zoo import build_model
from accept_mqtt.wire import codec
from broker import MosquittoBroker

from .conftest import any_broker, collect_json, mosquitto_pub, running_agents

DEVICES = ["dev-a", "dev-b", "dev-c"]


def _cfg(tmp_path: Path, **kw: object) -> TrainConfig:
    base = dict(model="cnn", dataset="digits", epochs=1, batch_size=32, micro_batches=4,
                max_steps=6, seed=7, runs_dir=str(tmp_path), device_timeout=20,
                step_timeout=30, partition="flops")
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


@any_broker
@pytest.mark.parametrize("schedule,lr_schedule,warmup", [("1f1b", "auto", None),
                                                         ("gpipe", "step", 2)])
def test_pipeline_matches_one_process_training(broker: MosquittoBroker, tmp_path: Path,
                                               schedule: str, lr_schedule: str,
                                               warmup: int | None) -> None:
    """Also with an lr schedule (the digits CNN's recipe: cosine; a step decay after a
    2-step warm-up): every stage applies the reference's lr at every step."""
    cfg = _cfg(tmp_path, schedule=schedule, lr_schedule=lr_schedule, warmup_steps=warmup)

    async def main() -> dict:
        async with running_agents(broker.url, DEVICES):
            async with Coordinator(broker.url, cfg, job="equiv") as coord:
                return await coord.run()

    record = asyncio.run(main())
    assert record["steps"] == 6
    assert [s["device"] for s in record["plan"]["stages"]] == DEVICES
    assert all(s["end"] > s["start"] for s in record["plan"]["stages"])
    optimizer = cfg.optimizer_cfg(6, "digits")
    assert record["plan"]["optimizer"] == optimizer
    assert optimizer["lr_schedule"] == ("cosine" if lr_schedule == "auto" else lr_schedule)
    got = torch.load(Path(record["model_path"]))

    data = load_dataset("digits", seed=cfg.seed)
    ref = train_reference(build_model("cnn", seed=cfg.seed), data, batch_size=32,
                          micro_batches=4, optimizer=optimizer, seed=cfg.seed,
                          max_steps=6)
    init = build_model("cnn", seed=cfg.seed).sequential().state_dict()
    assert set(got) == set(ref)
    moved = 0
    for name, want in ref.items():
        torch.testing.assert_close(got[name].to(want.dtype), want, rtol=1e-5, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")
        moved += int(not torch.equal(init[name], want))
    assert moved > 10, "training must actually have changed the parameters"
    # traffic really crossed both links, in both directions
    assert all(ln["act_bytes"] > 0 and ln["grad_bytes"] > 0 for ln in record["links"])


def test_bad_frames_are_rejected_and_training_finishes(broker: MosquittoBroker,
                                                       tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, max_steps=8)
    job = "robust"
    seen_on_metrics: list[dict] = []

    async def attack(coord: Coordinator) -> None:
        while coord.state.step < 2:
            await asyncio.sleep(0.01)
        wrong = codec.encode(torch.zeros(4, 3, 3), bits=32, job=job, step=coord.state.step,
                             mb=0, kind="act", extra={"nmb": 4, "bsz": 32, "train": True})
        good = codec.to_bytes(codec.encode(torch.zeros(8, 16, 8, 8), bits=32, job=job, step=0,
                                           mb=0, kind="act"))
        async with aiomqtt.Client(broker.host, broker.port) as c:
            await c.publish(f"accept/jobs/{job}/stage/1/fwd", b"\x00garbage\xff", qos=1)
            await c.publish(f"accept/jobs/{job}/stage/2/fwd", good[: len(good) // 2], qos=1)
            await c.publish(f"accept/jobs/{job}/stage/1/fwd", codec.to_bytes(wrong), qos=1)

    async def watch() -> None:
        async with aiomqtt.Client(broker.host, broker.port) as c:
            await c.subscribe(f"accept/jobs/{job}/metrics")
            async for msg in c.messages:
                body = json.loads(bytes(msg.payload or b"{}"))
                if body.get("type") == "error":
                    seen_on_metrics.append(body)

    async def main() -> dict:
        watcher = asyncio.create_task(watch())
        await asyncio.sleep(0.2)
        async with running_agents(broker.url, DEVICES) as agents:
            async with Coordinator(broker.url, cfg, job=job) as coord:
                attacker = asyncio.create_task(attack(coord))
                record = await coord.run()
                await attacker
            alive = all(not t.done() for t in asyncio.all_tasks() if t.get_name() == "worker")
            assert alive
            assert sum(len(a.errors) for a in agents) == 3
        watcher.cancel()
        return record

    record = asyncio.run(main())
    assert record["steps"] == 8, "training must finish despite the bad frames"
    assert record["final_accuracy"] is not None
    by_topic: dict[str, list[str]] = {}
    for e in record["errors"]:
        by_topic.setdefault(e["topic"].split("/", 3)[-1], []).append(e["reason"])
    assert len(by_topic["stage/1/fwd"]) == 2 and len(by_topic["stage/2/fwd"]) == 1, by_topic
    garbage, wrong_shape = by_topic["stage/1/fwd"]
    assert "not msgpack" in garbage or "not a msgpack map" in garbage, garbage
    assert "does not match this stage" in wrong_shape and "[4, 3, 3]" in wrong_shape
    (truncated,) = by_topic["stage/2/fwd"]
    assert any(w in truncated for w in ("truncated", "incomplete", "bytes but")), truncated
    assert {e["device"] for e in record["errors"]} == {"dev-b", "dev-c"}
    assert len(seen_on_metrics) == 3, "third-party subscribers see the errors on metrics"
    assert all(e["topic"].startswith(f"accept/jobs/{job}/stage/") for e in seen_on_metrics)


def test_weights_message_is_msgpack(broker: MosquittoBroker, tmp_path: Path) -> None:
    """Checkpoint/migration payloads on weights/{k} follow docs/protocol.md: msgpack chunks
    that an outside subscriber reassembles with msgpack and hashlib alone."""
    import hashlib

    cfg = _cfg(tmp_path, max_steps=1, max_message_bytes=8192)  # several chunks per stage
    transfers: dict[str, list[dict[str, Any]]] = {}

    def complete() -> int:
        return sum(len(cs) == cs[0]["count"] for cs in transfers.values())

    async def main() -> None:
        async with running_agents(broker.url, DEVICES):
            async with aiomqtt.Client(broker.host, broker.port) as c:
                await c.subscribe("accept/jobs/w/weights/+")
                async with Coordinator(broker.url, cfg, job="w") as coord:
                    await coord.run()
                async with asyncio.timeout(5):
                    async for msg in c.messages:
                        chunk = msgpack.unpackb(bytes(msg.payload or b""), raw=False)
                        transfers.setdefault(chunk["transfer"], []).append(chunk)
                        if complete() == 3:
                            break

    asyncio.run(main())
    bodies = []
    for cs in transfers.values():
        cs.sort(key=lambda c: c["seq"])
        assert [c["seq"] for c in cs] == list(range(cs[0]["count"]))
        whole = b"".join(c["data"] for c in cs)
        assert len(whole) == cs[0]["size"]
        assert hashlib.sha256(whole).hexdigest() == cs[0]["sha256"]
        body = msgpack.unpackb(whole, raw=False)
        assert (body["stage"], body["purpose"]) == (cs[0]["stage"], cs[0]["purpose"])
        bodies.append(body)
    bodies.sort(key=lambda b: b["stage"])
    assert [b["stage"] for b in bodies] == [0, 1, 2]
    assert bodies[0]["tensors"]["0.weight"]["shape"] == [16, 1, 3, 3]
    assert max(len(cs) for cs in transfers.values()) > 1


@any_broker
def test_control_from_mosquitto_pub(broker: MosquittoBroker, tmp_path: Path) -> None:
    """pause/resume/status/stop from a shell; unknown and malformed commands change nothing."""

    cfg = _cfg(tmp_path, max_steps=None, epochs=20)
    job = "ctl"
    replies: list[dict] = []  # everything on the metrics topic; the checks pick by type

    def shell(body: str) -> None:
        mosquitto_pub(broker, f"accept/jobs/{job}/control", body)

    async def main() -> dict:
        watcher = asyncio.create_task(collect_json(broker, f"accept/jobs/{job}/metrics",
                                                   replies))
        async with running_agents(broker.url, DEVICES):
            async with Coordinator(broker.url, cfg, job=job) as coord:
                run = asyncio.create_task(coord.run())
                while coord.state.step < 2:
                    await asyncio.sleep(0.02)
                await asyncio.to_thread(shell, '{"cmd": "pause"}')
                await asyncio.sleep(0.5)
                paused_at = coord.state.step
                await asyncio.sleep(0.7)
                assert coord.state.step == paused_at, "no step while paused"
                await asyncio.to_thread(shell, '{"cmd": "dance"}')
                await asyncio.to_thread(shell, "not json at all")
                await asyncio.to_thread(shell, '{"cmd": "status"}')
                await asyncio.sleep(0.3)
                assert coord.state.step == paused_at, "a bad command must not resume training"
                await asyncio.to_thread(shell, '{"cmd": "resume"}')
                while coord.state.step < paused_at + 2:
                    await asyncio.sleep(0.02)
                await asyncio.to_thread(shell, '{"cmd": "stop"}')
                record = await asyncio.wait_for(run, 30)
        watcher.cancel()
        return record

    record = asyncio.run(main())
    assert record["steps"] < 20 * 23, "stop ended the job early"
    assert record["final_accuracy"] is not None, "a stopped job is still evaluated and saved"
    errors = [r["reason"] for r in replies if r["type"] == "error"]
    assert any("unknown command 'dance'" in e for e in errors), errors
    assert any("malformed control message" in e for e in errors), errors
    statuses = [r for r in replies if r["type"] == "status"]
    assert any(s["paused"] for s in statuses) and any(s["stopping"] for s in statuses)


def test_seed_fixes_the_first_frames_on_the_wire(broker: MosquittoBroker, tmp_path: Path) -> None:
    """Same seed: same input frames whatever the bit width; same compressed frames per width."""

    async def first_frames(bits: int) -> dict[str, bytes]:
        cfg = _cfg(tmp_path, max_steps=1, act_bits=bits, grad_bits=bits)
        got: dict[str, bytes] = {}

        async def watch(ready: asyncio.Event) -> None:
            async with aiomqtt.Client(broker.host, broker.port) as c:
                await c.subscribe("accept/jobs/seeded/stage/+/+", qos=1)
                ready.set()
                async for msg in c.messages:
                    got.setdefault(msg.topic.value.split("/", 3)[-1], bytes(msg.payload or b""))

        ready = asyncio.Event()
        w = asyncio.create_task(watch(ready))
        await ready.wait()
        async with running_agents(broker.url, DEVICES):
            async with Coordinator(broker.url, cfg, job="seeded") as coord:
                await coord.run()
        w.cancel()
        return got

    a = asyncio.run(first_frames(32))
    b = asyncio.run(first_frames(4))
    c = asyncio.run(first_frames(4))
    assert a["stage/0/fwd"] == b["stage/0/fwd"], "the data frames do not depend on the width"
    assert b == c, "same seed and width: byte-identical first frames on every topic"
    assert codec.from_bytes(b["stage/1/fwd"]).bits == 4
    assert codec.from_bytes(b["stage/1/bwd"]).bits == 4
    act = codec.from_bytes(b["stage/1/fwd"])  # feature maps: one scale per channel
    assert act.axis == (1 if len(act.shape) >= 3 else None)
    assert codec.from_bytes(b["stage/1/bwd"]).scheme == "minmax0"
    assert len(b["stage/1/fwd"]) < len(a["stage/1/fwd"]) / 6


def test_timing_samples_are_learnt_off_the_reader_path_and_none_is_lost() -> None:
    """``on_timing`` only queues (it runs in the reader that delivers step events); the
    background learner then learns every sample, and ``learn_pending`` flushes the rest."""
    from accept_mqtt.model.descriptors import describe
    from accept_mqtt.planning.predictor import CostModel

    profile = {"device": "d", "cores": 2, "threads": 1, "bench_gflops": 10.0}
    samples = [{"layer": d.to_dict(), "dir": di, "batch": 16, "ms": 0.5, "threads": 1}
               for d in describe(build_model("cnn", seed=0)) for di in ("fwd", "bwd")]

    async def main() -> None:
        coord = Coordinator("mqtt://127.0.0.1:1", TrainConfig(partition="auto"), job="learn")
        coord.costs = CostModel()
        coord.profiles["d"] = profile
        coord.on_timing("d", [dict(s) for s in samples])
        assert coord.costs.n_observed == 0, "learning must not happen in the reader"
        for _ in range(3 * len(samples)):
            await asyncio.sleep(0)
        assert coord.costs.n_observed == len(samples)
        coord.on_timing("d", [dict(s) for s in samples])
        assert coord.learn_pending() == len(samples)
        assert coord.costs.n_observed == 2 * len(samples)
        assert len(coord.timing_samples) == 2 * len(samples)
        await coord.__aexit__(None, None, None)  # stops the learner

    asyncio.run(main())


def test_a_device_that_slows_down_is_noticed_and_work_moves_off_it(
        broker: MosquittoBroker, tmp_path: Path) -> None:
    """The coordinator learns from timing samples, flags a device whose speed changed and
    re-plans live so that the slowed device holds less of the model."""
    from accept_mqtt.model.descriptors import describe

    # two epochs, cut at 70 steps: 45 after the change, room for a re-plan held back by an
    # earlier one (noise on a loaded machine can move the partition before step 25)
    cfg = _cfg(tmp_path, epochs=2, max_steps=70, partition="auto")
    before: dict = {}

    async def main() -> dict:
        async with running_agents(broker.url, DEVICES) as agents:
            async with Coordinator(broker.url, cfg, job="drift") as coord:
                run = asyncio.create_task(coord.run())
                while coord.state.step < 25:
                    await asyncio.sleep(0.02)
                before["plan"] = coord.plan.to_dict()
                before["step"] = coord.state.step
                slow = next(a for a in agents if a.cfg.device_id == coord.plan.stages[0].device)
                # thermal throttling, emulated; kept across re-plans. 10x, not less: the
                # three in-process agents share 2 cores, so before the change every call
                # already waits for a core, and once stage 0 sleeps the others speed up;
                # 6x went unnoticed within 20 steps in one clean-clone CI run
                slow.cfg.slowdown = 10.0
                slow.job.runner.slowdown = 10.0
                return await asyncio.wait_for(run, 120)

    record = asyncio.run(main())
    slow_id = before["plan"]["stages"][0]["device"]
    assert record["timing_samples"] > 100
    # 10x the CPU time of each call; the factor the detector reports when it fires is the
    # mean of its newer window, which can still hold pre-change samples, and a layer's time
    # also holds what the slowdown does not stretch (the call's own overhead): 1.9x once in
    # a clean-clone CI run with a 6x slowdown. On an idle machine noise stays well under 1.5x;
    # on a loaded one it can flag any device, either way: the assertion is about this one.
    # A drift is stamped with the coordinator's step, which can still be the one before: the
    # agents already compute the next (its inputs went out early)
    drifted = [d for d in record["drifts"] if d["device"] == slow_id
               and d["step"] >= before["step"] - 1 and d["speed_factor"] > 1.5]
    assert drifted, (slow_id, before["step"], record["drifts"])
    assert record["plan"]["version"] >= 2, "the partition moved: a live re-plan"
    # 70 steps (the 1438 digits training samples at batch 32 are 45 an epoch), none replayed
    assert record["steps"] == 70 and record["replayed_steps"] == 0, "a re-plan loses nothing"
    flops = [d.flops for d in describe(build_model("cnn", seed=cfg.seed))]

    def load(plan: dict) -> float:
        return sum(sum(flops[s["start"]:s["end"]]) for s in plan["stages"]
                   if s["device"] == slow_id)

    assert load(record["plan"]) < load(before["plan"]), (before["plan"], record["plan"])
