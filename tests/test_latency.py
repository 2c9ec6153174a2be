"""Emulated link latency through the whole pipeline (agents ``--latency`` and the
coordinator's ``emulate_latency_ms``), against a real Mosquitto: every hop of a step pays it,
nothing waits for it more than once, and the arithmetic stays exact."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from accept_mqtt.coordinator import Coordinator
from accept_mqtt.coordinator.config import TrainConfig
from accept_mqtt.model.data import load_dataset
from accept_mqtt.model.reference import train_reference
from accept_mqtt.model.zoo import build_model
from broker import MosquittoBroker

from .conftest import running_agents

DEVICES = ["lat-a", "lat-b", "lat-c"]


@pytest.mark.parametrize("in_flight", [3, "auto"])
def test_every_hop_pays_the_latency_once_and_training_stays_exact(
        broker: MosquittoBroker, tmp_path: Path, in_flight: int | str) -> None:
    d = 0.04  # one way
    cfg = TrainConfig(model="cnn", dataset="digits", epochs=1, batch_size=32, micro_batches=4,
                      max_steps=4, seed=7, runs_dir=str(tmp_path), device_timeout=20,
                      step_timeout=30, partition="flops", emulate_latency_ms=d * 1e3,
                      checkpoint_every=0, in_flight=in_flight)  # type: ignore[arg-type]
    steps: list[dict[str, Any]] = []

    async def main() -> dict[str, Any]:
        async with running_agents(broker.url, DEVICES, latency_s=d):
            async with Coordinator(broker.url, cfg, job="latency",
                                   progress=lambda k, i: steps.append(i) if k == "step"
                                   else None) as coord:
                return await coord.run()

    record = asyncio.run(main())
    assert record["steps"] == 4
    step_ms = [float(s["step_ms"]) for s in steps]
    # auto: memory allows every stage all 4 (stage s holds in_flight - s: 3 + 4 - 2)
    assert record["plan"]["in_flight"] == (3 if in_flight == 3 else 5)
    # Textbook 1F1B, 3 stages, 4 micro-batches: micro-batch 3 leaves stage 0 only after
    # micro-batch 0's gradient is back (4 hops), then crosses 4 more: at least 8 one-way
    # latencies per step. (The coordinator's own hops do not add to it: a step's inputs went
    # out with the step before, and the "stepped" event that ends a step also delays the
    # start of the coordinator's clock for the next.) The critical path pays each hop once:
    # the fastest step stays well under 12 latencies, compute included.
    # With every stage free to hold all 4 (the planner's "auto" when memory allows) micro-batch
    # 3 leaves at once: its 2 hops out and 2 back are the whole critical path, under 8.
    if in_flight == 3:
        assert all(ms >= 8 * d * 1e3 for ms in step_ms), step_ms
        assert min(step_ms) < 12 * d * 1e3, step_ms
    else:
        assert all(ms >= 4 * d * 1e3 for ms in step_ms), step_ms
        assert max(step_ms) < 8 * d * 1e3, step_ms

    got = torch.load(Path(record["model_path"]))
    data = load_dataset("digits", seed=cfg.seed)
    ref = train_reference(build_model("cnn", seed=cfg.seed), data, batch_size=32,
                          micro_batches=4, optimizer=cfg.optimizer_cfg(4, "digits"),
                          seed=cfg.seed, max_steps=4)
    for name, want in ref.items():
        torch.testing.assert_close(got[name].to(want.dtype), want, rtol=1e-5, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")
