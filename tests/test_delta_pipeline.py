"""Delta-coded activations and error-feedback gradients on the pipeline's real links.

A tiny synthetic set (a few mini-batches per epoch) makes samples cross the links again
within a few dozen steps, so the run shows plain frames with ``ids`` first, then delta frames;
a history mismatch is recovered by a rewind at once, after which the frames are plain again.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import torch

from accept_mqtt.coordinator import Coordinator
from accept_mqtt.coordinator.config import ConfigError, TrainConfig
from accept_mqtt.coordinator.planner import Planner
from accept_mqtt.coordinator.record import RunState
from accept_mqtt.model.data import load_dataset
from accept_mqtt.model.microbatch import epoch_batches, split
from accept_mqtt.wire import codec, delta
from accept_mqtt.wire.plan import Plan
from broker import MosquittoBroker
from device_agent.agent import _frame_seed, _Job

from .conftest import running_agents

DEVICES = ["dev-a", "dev-b", "dev-c"]
PER_EPOCH = 4  # 128 training samples in mini-batches of 32


def _cfg(tmp_path: Path, **kw: object) -> TrainConfig:
    base = dict(model="cnn", dataset="synthetic-digits", synthetic_size=160, epochs=50,
                batch_size=32, micro_batches=2, max_steps=24, seed=3, runs_dir=str(tmp_path),
                device_timeout=20, step_timeout=60, partition="flops", checkpoint_every=0,
                act_bits=2, act_delta=True, grad_bits=4, grad_feedback=True)
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


@dataclass
class Seen:
    """One frame on a stage topic, as a test subscriber decodes it (header only)."""

    topic: str
    step: int
    mb: int
    bits: int
    train: bool
    ids: bool
    delta: bool
    gen: int
    at: float


async def _watch(url_host: str, port: int, job: str, frames: list[Seen],
                 metrics: list[dict[str, Any]], ready: asyncio.Event) -> None:
    async with aiomqtt.Client(url_host, port) as c:
        await c.subscribe(f"accept/jobs/{job}/stage/+/+", qos=1)
        await c.subscribe(f"accept/jobs/{job}/metrics", qos=1)
        ready.set()
        async for msg in c.messages:
            topic, body = msg.topic.value, bytes(msg.payload or b"")
            now = time.monotonic()
            if topic.endswith("/metrics"):
                metrics.append({**json.loads(body), "_at": now})
                continue
            if not (topic.endswith("/fwd") or topic.endswith("/bwd")):
                continue
            f = codec.from_bytes(body, topic)
            frames.append(Seen(topic.split("/", 3)[-1], f.step, f.mb, f.bits,
                               bool(f.extra.get("train", True)), delta.IDS_KEY in f.extra,
                               bool(f.extra.get(delta.DELTA_KEY, False)),
                               int(f.extra.get("gen", 0)), now))


def _one_process(plan: Plan, cfg: TrainConfig, steps: int,
                 rewound: tuple[int, ...] = ()) -> dict[str, torch.Tensor]:
    """The pipeline's arithmetic in one process, compression included: every stage's
    runner, and at every cut what the link does -- the sender's ``ActHistory`` /
    ``ErrorFeedback`` encode with the frame's stochastic-rounding seed (``_frame_seed``), a
    trip through the wire format, the receiver's decode. Per stage, forwards and backwards
    go in micro-batch order as under 1F1B; evaluation changes no state and is left out.
    ``rewound``: steps the pipeline was rewound to: every link starts them afresh."""
    data = load_dataset(cfg.dataset, seed=cfg.seed, synthetic_size=cfg.synthetic_size)
    jobs = [_Job(plan, s.device, 1, 1.0) for s in plan.stages]
    n, last = len(data.train_x), len(jobs) - 1

    def cross(t: torch.Tensor, k: int, to: int, step: int, mb: int,
              ids: torch.Tensor) -> torch.Tensor:
        grad = to < k
        bits = plan.stages[k].grad_bits if grad else plan.stages[k].act_bits
        kw: dict[str, Any] = dict(
            bits=bits, job=plan.job, step=step, mb=mb, kind="grad" if grad else "act",
            stochastic=grad and plan.stochastic_grad_rounding,
            seed=_frame_seed(plan.seed, step, mb, k), zero=grad and plan.grad_scheme == "minmax0",
            axis=None if grad else codec.channel_axis(t.shape, bits, plan.act_per_channel))
        ef, tx, rx = jobs[k].grad_ef, jobs[k].act_tx, jobs[to].act_rx
        if grad:
            f = ef.encode(t, slot=mb, **kw) if ef is not None else codec.encode(t, **kw)
        else:
            f = tx.encode(t, ids, **kw) if tx is not None else codec.encode(t, **kw)
        f = codec.from_bytes(codec.to_bytes(f))
        return rx.decode(f) if rx is not None and not grad else codec.decode(f)

    torch.set_num_threads(1)  # as the agents compute
    per_epoch = len(epoch_batches(n, cfg.batch_size, cfg.seed, 0))
    for step in range(steps):
        epoch, i = divmod(step, per_epoch)
        if step in rewound:
            for job in jobs:
                job.reset(step, job.gen + 1)  # what a rewind does to a stage's links
        idx = epoch_batches(n, cfg.batch_size, cfg.seed, epoch)[i]
        x, y = data.train_x[idx], data.train_y[idx]
        mbs = split(len(idx), plan.micro_batches)
        for mb, (a, b) in enumerate(mbs):
            h = x[a:b]
            for k, job in enumerate(jobs):
                out = job.runner.forward((step, mb), h, y[a:b], 1.0 / len(idx)).out
                if k < last:
                    assert out is not None
                    h = cross(out, k, k + 1, step, mb, idx[a:b])
        for mb, (a, b) in enumerate(mbs):
            g = None
            for k in range(last, -1, -1):
                gin = jobs[k].runner.backward((step, mb), g)
                if k > 0:
                    assert gin is not None
                    g = cross(gin, k, k - 1, step, mb, idx[a:b])
        for job in jobs:
            job.runner.step(step)
    return {name: t for job in jobs
            for name, t in job.runner.state_dict(job.stage.start).items()}


def _run(broker: MosquittoBroker, cfg: TrainConfig, job: str, frames: list[Seen],
         metrics: list[dict[str, Any]], meddle: Any = None) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        ready = asyncio.Event()
        watcher = asyncio.create_task(_watch(broker.host, broker.port, job, frames, metrics,
                                             ready))
        await ready.wait()
        async with running_agents(broker.url, DEVICES) as agents:
            async with Coordinator(broker.url, cfg, job=job) as coord:
                run = asyncio.create_task(coord.run())
                if meddle is not None:
                    await meddle(coord, agents)
                record = await run
        await asyncio.sleep(0.3)  # the last frames reach the watcher
        watcher.cancel()
        return record

    return asyncio.run(main())


def test_delta_links_and_error_feedback_train_end_to_end(broker: MosquittoBroker,
                                                         tmp_path: Path) -> None:
    """2-bit delta-coded activations and 4-bit error-feedback gradients train; the wire shows
    plain frames with ``ids`` in the first epoch, delta frames once samples repeat, and
    evaluation frames without either."""
    cfg = _cfg(tmp_path)
    frames: list[Seen] = []
    metrics: list[dict[str, Any]] = []
    record = _run(broker, cfg, "delta", frames, metrics)
    assert record["steps"] == 24
    stages = record["plan"]["stages"]
    assert [s["act_delta"] for s in stages] == [True, True, False]
    assert [s["grad_feedback"] for s in stages] == [False, True, True]
    assert record["plan"]["train_samples"] == 128
    losses = [m["loss"] for m in sorted((m for m in metrics if m.get("type") == "step"),
                                        key=lambda m: m["step"])]
    assert len(losses) == 24
    assert sum(losses[-4:]) < 0.9 * sum(losses[:4]), losses  # 2.31 -> 1.93 measured

    train = [f for f in frames if f.train and f.topic.endswith("fwd")]
    for link in ("stage/1/fwd", "stage/2/fwd"):
        mine = [f for f in train if f.topic == link]
        assert mine and all(f.ids for f in mine), link
        first_epoch = [f for f in mine if f.step < PER_EPOCH]
        later = [f for f in mine if f.step >= PER_EPOCH]
        # no history yet: plain, at delta.PLAIN_BITS (a 2-bit activation itself is too coarse)
        assert first_epoch and not any(f.delta for f in first_epoch), "no history yet: plain"
        assert {f.bits for f in first_epoch} == {delta.PLAIN_BITS}
        assert later and all(f.delta and f.bits == 2 for f in later), "every sample crossed"
    # the coordinator's inputs carry the ids (raw), and so does nothing of evaluation
    assert all(f.ids and not f.delta for f in train if f.topic == "stage/0/fwd")
    evals = [f for f in frames if not f.train]
    assert {f.topic for f in evals} == {"stage/0/fwd", "stage/1/fwd", "stage/2/fwd"}
    assert not any(f.ids or f.delta for f in evals)
    # over the 2-bit delta links they go plain at delta.PLAIN_BITS: no history to change
    assert {f.bits for f in evals if f.topic != "stage/0/fwd"} == {delta.PLAIN_BITS}
    grads = [f for f in frames if f.topic.endswith("bwd")]
    assert {f.topic for f in grads} == {"stage/0/bwd", "stage/1/bwd"}
    assert all(f.bits == 4 and not f.ids for f in grads)
    assert record["errors"] == []
    # the strongest check: exactly the parameters of the same arithmetic in one process
    got = torch.load(Path(record["model_path"]))
    want = _one_process(Plan.from_dict(record["plan"]), cfg, 24)
    assert set(got) == set(want)
    differ = [name for name in want if not torch.equal(got[name], want[name])]
    assert not differ, f"differ from the one-process run: {differ}"


def test_a_history_mismatch_is_rewound_at_once_and_the_frames_start_plain(
        broker: MosquittoBroker, tmp_path: Path) -> None:
    """A receiver that lost its history (a test hook clears it) reports the delta frame it
    cannot decode, naming the sample, with ``resync``; the coordinator rewinds the step at
    once (well before its 60 s step_timeout), the rewind resets every history, so that
    step's frames go plain again, and training ends."""
    cfg = _cfg(tmp_path, max_steps=16)
    frames: list[Seen] = []
    metrics: list[dict[str, Any]] = []
    hit: dict[str, Any] = {}

    async def meddle(coord: Coordinator, agents: list[Any]) -> None:
        while coord.state.step < PER_EPOCH + 2:  # delta frames are flowing
            await asyncio.sleep(0.005)
        stage1 = next(a for a in agents if a.job is not None and a.job.k == 1)
        assert stage1.job.act_rx is not None and len(stage1.job.act_rx) > 0
        stage1.job.act_rx.reset()  # as if this end had lost its history
        hit["step"], hit["at"] = coord.state.step, time.monotonic()

    record = _run(broker, cfg, "mismatch", frames, metrics, meddle)
    assert record["steps"] == 16 and record["final_accuracy"] is not None
    errors = [e for e in metrics if e.get("type") == "error"]
    assert errors and all(e["resync"] and e["device"] == "dev-b" for e in errors), errors
    assert "history mismatch" in errors[0]["reason"] and "for sample " in errors[0]["reason"]
    assert errors[0]["pv"] == 1 and errors[0]["gen"] == 0
    rewinds = [r for r in record["recoveries"] if r.get("action") == "rewind"]
    assert len(rewinds) == 1 and "history mismatch" in rewinds[0]["reason"], record["recoveries"]
    recovered = next(m for m in metrics if m.get("type") == "recovered")
    assert recovered["_at"] - errors[0]["_at"] < 10.0, "rewound at once, not after a timeout"
    # after the rewind (generation 1) every link starts afresh: its first frames are plain
    for link in ("stage/1/fwd", "stage/2/fwd"):
        after = [f for f in frames if f.topic == link and f.train and f.gen == 1]
        assert after, link
        first = min(f.step for f in after)
        assert first == rewinds[0]["at_step"]
        assert not any(f.delta for f in after if f.step == first), link
        assert any(f.delta for f in after), "and delta again once the samples repeat"
    # and the parameters are exactly those of one process whose links restart at that step
    got = torch.load(Path(record["model_path"]))
    want = _one_process(Plan.from_dict(record["plan"]), cfg, 16, (rewinds[0]["at_step"],))
    assert not [name for name in want if not torch.equal(got[name], want[name])]
    unreset = _one_process(Plan.from_dict(record["plan"]), cfg, 16)
    assert any(not torch.equal(got[name], unreset[name]) for name in want), \
        "the reset at the rewound step made a difference"


@pytest.mark.parametrize("kw,named", [
    (dict(act_delta=True, act_bits=32), "act_delta needs act_bits 1..8"),
    (dict(act_delta=True, act_bits=16), "act_delta needs act_bits 1..8"),
    (dict(grad_feedback=True, grad_bits=32), "grad_feedback needs grad_bits 1..8"),
])
def test_a_delta_setting_a_raw_link_cannot_honour_is_refused(kw: dict[str, Any],
                                                              named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        TrainConfig(**kw).validate()  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=named):
        TrainConfig.from_dict(dict(kw))


def test_a_set_that_makes_a_delta_link_raw_is_refused_and_changes_nothing() -> None:
    cfg = TrainConfig(act_bits=2, act_delta=True, grad_bits=4, grad_feedback=True).validate()
    planner = Planner("j", cfg, RunState(), current=lambda: None, emit=lambda d: None)
    for changes, named in (({"act_bits": 32}, "act_delta needs act_bits 1..8, got 32"),
                           ({"grad_bits": 16}, "grad_feedback needs grad_bits 1..8, got 16")):
        with pytest.raises(ValueError, match=named):
            planner.set_widths(changes)
        assert planner.cfg == cfg and not planner.replan_requested
    planner.set_widths({"act_bits": 3})  # a k-bit width keeps the delta link
    assert planner.cfg.act_bits == 3 and planner.replan_requested
    assert planner.cfg.act_delta and planner.cfg.grad_feedback  # the re-plan keeps them


@pytest.mark.parametrize("method", ["equal", "flops", "dp"])
def test_every_partition_method_puts_the_flags_on_every_link(method: str) -> None:
    from accept_mqtt.coordinator.planner import (
        DeviceInfo,
        PlanningError,
        build_plan,
        make_partition,
    )
    from accept_mqtt.model.descriptors import describe
    from accept_mqtt.model.zoo import build_model

    cfg = TrainConfig(model="cnn", devices=3, act_bits=2, act_delta=True, grad_bits=4,
                      grad_feedback=True)
    descs = describe(build_model("cnn", seed=0))
    devs = [DeviceInfo(f"d{i}", {"bench_gflops": g, "memory_mb": 4096})
            for i, g in enumerate([10.0, 5.0, 2.5])]
    res = make_partition(descs, devs, cfg, method=method, train_samples=1000)
    order = [d for i in res.devices for d in devs if d.id == i]
    kw: dict[str, Any] = dict(method=method, optimizer=cfg.optimizer_cfg(10),
                              act_bits=list(res.act_bits), grad_bits=list(res.grad_bits))
    plan = build_plan("j", cfg, len(descs), order, list(res.cuts), train_samples=1000, **kw)
    assert [s.act_delta for s in plan.stages] == [True, True, False]
    assert [s.grad_feedback for s in plan.stages] == [False, True, True]
    assert plan.train_samples == 1000
    with pytest.raises(PlanningError, match="act_delta needs the training set's size"):
        build_plan("j", cfg, len(descs), order, list(res.cuts), **kw)
    plain = build_plan("j", TrainConfig(model="cnn", devices=3), len(descs), order,
                       list(res.cuts), method=method, optimizer=cfg.optimizer_cfg(10),
                       train_samples=1000)
    assert plain.train_samples is None and not any(s.act_delta or s.grad_feedback
                                                   for s in plain.stages)


def test_cli_flags_and_config_keys_set_delta_links_or_are_refused(tmp_path: Path) -> None:
    import argparse

    from accept_mqtt.cli.train import add_arguments, resolve_config

    from .test_cli import _cli

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = resolve_config(parser.parse_args(["--act-delta", "--act-bits", "2", "--grad-feedback",
                                            "--grad-bits", "4"]))
    assert (cfg.act_delta, cfg.grad_feedback, cfg.act_bits, cfg.grad_bits) == (True, True, 2, 4)
    off = resolve_config(parser.parse_args([]))
    assert not off.act_delta and not off.grad_feedback
    conf = tmp_path / "c.json"
    conf.write_text('{"act_delta": true, "act_bits": 3, "grad_feedback": true, "grad_bits": 8}')
    cfg = resolve_config(parser.parse_args(["--config", str(conf)]))
    assert (cfg.act_delta, cfg.grad_feedback, cfg.act_bits, cfg.grad_bits) == (True, True, 3, 8)
    p = _cli("train", "--act-delta", "--act-bits", "32", "--runs-dir", str(tmp_path), timeout=60)
    assert p.returncode == 2 and "act_delta needs act_bits 1..8, got 32" in p.stderr, p.stderr
    conf.write_text('{"grad_feedback": true, "grad_bits": 16}')
    p = _cli("train", "--config", str(conf), "--runs-dir", str(tmp_path), timeout=60)
    assert p.returncode == 2 and "grad_feedback needs grad_bits 1..8, got 16" in p.stderr
    p = _cli("train", "--help", timeout=60)
    assert "--act-delta" in p.stdout and "--grad-feedback" in p.stdout
