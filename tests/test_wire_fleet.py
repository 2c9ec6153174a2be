"""What a real fleet's broker does to the wire (issue 14): settings reach the frames, large
state crosses a broker with a small ``message_size_limit``, control replies find their sender.

Every test runs a real Mosquitto (tests/conftest.py), real agents and a real coordinator.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from accept_mqtt.coordinator import Coordinator
from accept_mqtt.coordinator.config import TrainConfig
from accept_mqtt.wire import codec
from broker import MosquittoBroker

from .conftest import running_agents

DEVICES = ["w-a", "w-b", "w-c"]


def _cfg(tmp_path: Path, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = dict(model="cnn", dataset="digits", epochs=1, batch_size=32,
                                micro_batches=2, max_steps=3, seed=3, runs_dir=str(tmp_path),
                                device_timeout=30, step_timeout=30, partition="flops",
                                checkpoint_every=0)
    base.update(kw)
    return TrainConfig(**base)


async def _frames(broker: MosquittoBroker, job: str, into: list[tuple[str, codec.TensorFrame]],
                  subscribed: asyncio.Event) -> None:
    """Every tensor frame of ``job`` on the wire, decoded, until cancelled."""
    async with aiomqtt.Client(broker.host, broker.port) as c:
        await c.subscribe(f"accept/jobs/{job}/stage/+/+", qos=1)
        subscribed.set()
        async for msg in c.messages:
            into.append((msg.topic.value, codec.from_bytes(bytes(msg.payload or b""))))


@pytest.mark.parametrize("partition", ["equal", "flops"])
def test_equal_and_flops_splits_send_gradients_at_grad_bits(
        broker: MosquittoBroker, tmp_path: Path, partition: str) -> None:
    """``--partition equal --act-bits 4 --grad-bits 8``: 4-bit activations, 8-bit gradients
    (these splits used to take the activation width for both)."""
    cfg = _cfg(tmp_path, partition=partition, act_bits=4, grad_bits=8, max_steps=2)
    job = f"widths-{partition}"
    seen: list[tuple[str, codec.TensorFrame]] = []

    async def main() -> dict[str, Any]:
        ready = asyncio.Event()
        watcher = asyncio.create_task(_frames(broker, job, seen, ready))
        await asyncio.wait_for(ready.wait(), 10)
        async with running_agents(broker.url, DEVICES):
            async with Coordinator(broker.url, cfg, job=job) as coord:
                record = await asyncio.wait_for(coord.run(), 120)
        watcher.cancel()
        return record

    record = asyncio.run(main())
    stages = record["plan"]["stages"]
    assert [s["act_bits"] for s in stages[:-1]] == [4, 4]
    assert [s["grad_bits"] for s in stages[1:]] == [8, 8]
    grads = {f.bits for t, f in seen if t.endswith("/bwd")}
    acts = {f.bits for t, f in seen if t.endswith("/fwd") and "/stage/0/" not in t}
    assert grads == {8}, grads
    assert acts == {4}, acts
