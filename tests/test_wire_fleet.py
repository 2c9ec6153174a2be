"""What a real fleet's broker does to the wire (issue 14): settings reach the frames, large
state crosses a broker with a small ``message_size_limit``, control replies find their sender.

Every test runs a real Mosquitto (tests/conftest.py), real agents and a real coordinator.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiomqtt
import msgspec
import pytest
import torch

from accept_mqtt.coordinator import Coordinator
from accept_mqtt.coordinator.config import TrainConfig
from accept_mqtt.wire import codec
from accept_mqtt.wire.messages import ControlCommand
from broker import MosquittoBroker

from .conftest import SMALL_MESSAGE_LIMIT, running_agents
from .test_faults import _cfg as faults_cfg

DEVICES = ["w-a", "w-b", "w-c"]


def _cfg(tmp_path: Path, **kw: Any) -> TrainConfig:
    """test_faults' small job, shorter and without checkpoints unless asked."""
    return faults_cfg(tmp_path, **{"micro_batches": 2, "max_steps": 3, "seed": 3,
                                   "checkpoint_every": 0, **kw})


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


async def _replies(broker: MosquittoBroker, job: str, into: list[tuple[int, dict[str, Any]]],
                   subscribed: asyncio.Event) -> None:
    """(QoS as delivered, body) of every status and error on the job's metrics topic, seen
    by a QoS 1 subscriber: a reply published at QoS 0 arrives at QoS 0."""
    async with aiomqtt.Client(broker.host, broker.port) as c:
        await c.subscribe(f"accept/jobs/{job}/metrics", qos=1)
        subscribed.set()
        async for msg in c.messages:
            body = json.loads(bytes(msg.payload or b"{}"))
            if body.get("type") in ("status", "error"):
                into.append((msg.qos, body))


def test_control_replies_carry_the_request_id_at_qos_1(broker: MosquittoBroker,
                                                       tmp_path: Path) -> None:
    """Two users at once: each ``accept-mqtt control`` takes only its own reply (an error
    from the other's bad command is not it); a command without a request id (an older
    client, mosquitto_pub) is answered as before; replies go out at QoS 1."""
    from accept_mqtt.cli.control import command, send

    job = "replies"
    cfg = _cfg(tmp_path, max_steps=20)
    seen: list[tuple[int, dict[str, Any]]] = []

    async def main() -> tuple[Any, Any, dict[str, Any]]:
        ready = asyncio.Event()
        watcher = asyncio.create_task(_replies(broker, job, seen, ready))
        await asyncio.wait_for(ready.wait(), 10)
        async with running_agents(broker.url, DEVICES):
            async with Coordinator(broker.url, cfg, job=job) as coord:
                run = asyncio.create_task(coord.run())
                while coord.state.step < 1 and not run.done():
                    await asyncio.sleep(0.02)
                coord._running.clear()  # hold training: the commands meet a quiet job
                # two users at once: a bad set (``accept-mqtt control`` would refuse it before
                # sending, so it goes out raw) and a status
                bad_body = b'{"cmd": "set", "colour": 1, "request_id": "user-1"}'
                async with aiomqtt.Client(broker.host, broker.port) as u1:
                    status, _ = await asyncio.gather(
                        send(broker.url, "accept", job, command("status", [], "user-2"), 10),
                        u1.publish(f"accept/jobs/{job}/control", bad_body, qos=1))
                    # an older client: no request id
                    await u1.publish(f"accept/jobs/{job}/control", b'{"cmd": "status"}', qos=1)
                stop = await send(broker.url, "accept", job, command("stop", [], "user-3"), 10)
                coord._running.set()
                record = await asyncio.wait_for(run, 60)
        await asyncio.sleep(0.2)
        watcher.cancel()
        return status, stop, record

    status, stop, record = asyncio.run(main())
    assert status is not None and status.request_id == "user-2" and status.command == "status"
    assert stop is not None and stop.request_id == "user-3" and stop.stopping
    assert record["steps"] < 20
    by_id = {b.get("request_id"): (q, b) for q, b in seen}
    q, err = by_id["user-1"]
    assert err["type"] == "error" and "colour" in err["reason"] and q == 1
    assert {k for k in by_id} >= {"user-1", "user-2", "user-3", None}
    old = by_id[None][1]
    assert old["type"] == "status" and old["command"] == "status"
    assert all(q == 1 for q, _ in seen), seen


def test_a_reply_is_taken_only_with_its_request_id() -> None:
    from accept_mqtt.cli.control import _OLD, _reply, command
    from accept_mqtt.wire.messages import Error, JobStatus, encode

    topic = "accept/jobs/j/control"
    cmd = command("status", [], "r1")
    mine = JobStatus(command="status", request_id="r1", step=1, epoch=0, paused=False,
                     stopping=False)
    assert _reply(encode(mine), cmd, topic) == mine
    other = [JobStatus(command="status", request_id="r2", step=1, epoch=0, paused=False,
                       stopping=False),
             JobStatus(command="status", step=1, epoch=0, paused=False, stopping=False),
             Error(device="coordinator", topic=topic, reason="unknown command 'x'",
                   request_id="r2"),
             Error(device="pi-a", topic="accept/jobs/j/stage/1/fwd", reason="bad frame")]
    assert [_reply(encode(m), cmd, topic) for m in other] == [None] * 4
    # a coordinator from before request ids refuses the key: send() retries the old way
    old = Error(device="coordinator", topic=topic,
                reason="malformed control message: Object contains unknown field "
                       "`request_id`")
    assert _reply(encode(old), cmd, topic) is _OLD
    legacy = command("status", [])
    assert legacy.request_id is None and _reply(encode(other[1]), legacy, topic) == other[1]


# -- weights in chunks (point 4) ------------------------------------------------------------
def _body(n: int = 40_000, purpose: str = "checkpoint") -> Any:
    from accept_mqtt.model.checkpoint import pack
    from accept_mqtt.wire.messages import Weights

    g = torch.Generator().manual_seed(0)
    state = {"0.weight": torch.randn(n, generator=g), "0.bias": torch.randn(7, generator=g)}
    return Weights(job="j", stage=1, step=4, purpose=purpose, version=2,  # type: ignore[arg-type]
                   tensors=pack(state),
                   optim=pack({"0.weight::momentum_buffer": state["0.weight"]}))


def test_weights_split_below_the_limit_and_reassemble_checked() -> None:
    import random

    from accept_mqtt.wire.chunks import ChunkError, Reassembler, split
    from accept_mqtt.wire.messages import WeightsChunk, decode, encode

    body = _body()
    pieces = split(body, 4096)
    assert len(pieces) > 40 and max(len(p) for p in pieces) <= 4096
    chunks = [decode(WeightsChunk, p) for p in pieces]
    assert {c.transfer for c in chunks} == {chunks[0].transfer}
    assert chunks[0].size == len(encode(body)) and (chunks[0].stage, chunks[0].purpose) == (
        1, "checkpoint")
    # any order, a chunk twice (QoS 1): the same message, once
    shuffled = chunks + [chunks[3]]
    random.Random(1).shuffle(shuffled)
    r = Reassembler()
    got = [w for c in shuffled if (w := r.add(c)) is not None]
    assert got == [body] and r.pending_bytes == 0
    assert len(split(body, 10**7)) == 1
    # an altered chunk: the digest says so, and the transfer is dropped
    r = Reassembler()
    bad = list(chunks)
    bad[5] = msgspec.structs.replace(bad[5], data=bytes(len(bad[5].data)))
    with pytest.raises(ChunkError, match="another SHA-256 than announced"):
        for c in bad:
            r.add(c, "t")
    assert r.pending_bytes == 0
    # a chunk that contradicts its transfer's first chunk
    r = Reassembler()
    r.add(chunks[0])
    with pytest.raises(ChunkError, match="its first chunk said"):
        r.add(msgspec.structs.replace(chunks[1], count=chunks[1].count + 1))
    with pytest.raises(ChunkError, match="out of range"):
        r.add(msgspec.structs.replace(chunks[0], seq=chunks[0].count))
    with pytest.raises(ChunkError, match="announces"):
        Reassembler(max_bytes=1000).add(chunks[0])
    # a newer transfer of the same stage and purpose replaces an unfinished one
    r = Reassembler()
    r.add(chunks[0])
    newer = [decode(WeightsChunk, p) for p in split(body, 4096)]
    assert [w for c in newer if (w := r.add(c)) is not None] == [body]
    assert r.pending_bytes == 0
    with pytest.raises(ValueError, match="max_message_bytes must be an int >= 1024"):
        split(body, 1000)


def test_weights_cross_a_broker_with_a_small_message_size_limit(
        small_broker: MosquittoBroker, tmp_path: Path) -> None:
    """Checkpoints, a restore after a live re-plan and the final weights all cross a broker
    that drops anything above 128 KiB: a stage's weights and momentum (up to ~280 KB for this
    model) go in chunks of at most ``max_message_bytes`` (32 KiB)."""
    from accept_mqtt.wire.messages import WeightsChunk, decode

    broker = small_broker
    job = "small"
    limit = 32768
    cfg = _cfg(tmp_path, max_steps=6, checkpoint_every=2, eval_batch=8,
               max_message_bytes=limit, micro_batches=4)
    seen: list[tuple[int, WeightsChunk]] = []

    async def watch(ready: asyncio.Event) -> None:
        async with aiomqtt.Client(broker.host, broker.port) as c:
            await c.subscribe(f"accept/jobs/{job}/weights/+", qos=1)
            await c.subscribe("probe", qos=1)
            ready.set()
            async for msg in c.messages:
                raw = bytes(msg.payload or b"")
                if msg.topic.value == "probe":
                    seen.append((len(raw), None))  # type: ignore[arg-type]
                else:
                    seen.append((len(raw), decode(WeightsChunk, raw)))

    async def main() -> dict[str, Any]:
        ready = asyncio.Event()
        watcher = asyncio.create_task(watch(ready))
        await asyncio.wait_for(ready.wait(), 10)
        async with aiomqtt.Client(broker.host, broker.port) as c:  # the broker's limit bites
            await c.publish("probe", b"x" * (SMALL_MESSAGE_LIMIT + 1), qos=1)
            await c.publish("probe", b"x" * 10, qos=1)
        async with running_agents(broker.url, DEVICES):
            async with Coordinator(broker.url, cfg, job=job) as coord:
                run = asyncio.create_task(coord.run())
                while coord.state.step < 3 and not run.done():
                    await asyncio.sleep(0.02)
                coord.control.on_command(ControlCommand(cmd="set", act_bits=16))
                record = await asyncio.wait_for(run, 120)
        await asyncio.sleep(0.2)
        watcher.cancel()
        return record

    record = asyncio.run(main())
    probes = [n for n, c in seen if c is None]
    assert probes == [10], "the broker delivers nothing above its message_size_limit"
    assert record["steps"] == 6 and record["checkpoints"][:1] == [2]
    assert [r["changed"] for r in record["replans"]] == [True]
    assert record["plan"]["version"] == 2
    assert record["final_accuracy"] is not None
    chunks = [c for _, c in seen if c is not None]
    assert max(n for n, c in seen if c is not None) <= limit
    sizes = {c.transfer: c.size for c in chunks}
    assert max(sizes.values()) > SMALL_MESSAGE_LIMIT  # whole, it would have been dropped
    assert {c.purpose for c in chunks} == {"checkpoint", "restore"}


def test_other_messages_that_grow_with_the_model_fit_the_limit() -> None:
    """Timing samples are split into lists below the limit; a plan above it is refused
    before it is published (the broker would drop it: agents would never get ready); a
    limit no chunk fits is a configuration error."""
    from accept_mqtt.coordinator.config import ConfigError
    from accept_mqtt.coordinator.errors import CoordinatorError
    from accept_mqtt.coordinator.steps import plan_payload
    from accept_mqtt.wire.messages import LayerInfo, TimingSample, encode
    from accept_mqtt.wire.plan import Plan, cuts_to_stages
    from device_agent.agent import _fitting

    layer = LayerInfo(index=0, type="conv2d", flops=1, params=1, in_elems=1, out_elems=1,
                      kernel=3, stride=1, in_channels=1, out_channels=1)
    samples = [TimingSample(layer=msgspec.structs.replace(layer, index=i), dir="fwd", batch=8,
                            ms=1.5, threads=1) for i in range(300)]
    parts = _fitting(samples, 4096)
    assert len(parts) > 1 and all(len(encode(p)) <= 4096 for p in parts)
    assert [s for p in parts for s in p] == samples
    plan = Plan(job="j", version=1, model="cnn", num_layers=200,
                stages=cuts_to_stages([0, 100, 200], ["a", "b"]),
                fingerprint=tuple(f"{i:016x}" for i in range(200)), max_message_bytes=2048)
    with pytest.raises(CoordinatorError, match=r"plan v1 is \d+ bytes, above "
                                               r"max_message_bytes 2048"):
        plan_payload(plan)
    from dataclasses import replace

    assert json.loads(plan_payload(replace(plan, max_message_bytes=65536)))[
        "max_message_bytes"] == 65536
    with pytest.raises(ConfigError, match="max_message_bytes must be an int >= 1024"):
        TrainConfig(max_message_bytes=512).validate()
