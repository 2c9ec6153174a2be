"""Shared fixtures: a real Mosquitto on a free port, in-process agents, a coordinator runner.

Every test that touches MQTT gets its own broker process (its own config and directory,
torn down after), never a mock.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiomqtt
import pytest

from accept_mqtt.wire.aio import cancel_and_wait
from accept_mqtt.wire.broker_url import parse_broker_url
from broker import MosquittoBroker, MosquittoNotFound, find_mosquitto


def _have_mosquitto() -> bool:
    try:
        find_mosquitto()
        return True
    except MosquittoNotFound:
        return False


@pytest.fixture
def broker() -> Iterator[MosquittoBroker]:
    if not _have_mosquitto():
        pytest.fail("mosquitto is not installed: run 'make test' (it installs it) or "
                    "'apt-get install mosquitto'")
    b = MosquittoBroker()
    b.start()
    try:
        yield b
    finally:
        b.cleanup()


SMALL_MESSAGE_LIMIT = 131072  # bytes: what small_broker accepts in one publish


@pytest.fixture
def small_broker() -> Iterator[MosquittoBroker]:
    """A broker with a small ``message_size_limit``, as fleets set one: above it Mosquitto
    acknowledges a publish and delivers it to nobody (the last setting in the config wins)."""
    if not _have_mosquitto():
        pytest.fail("mosquitto is not installed: run 'make test' (it installs it) or "
                    "'apt-get install mosquitto'")
    b = MosquittoBroker(extra_config=f"message_size_limit {SMALL_MESSAGE_LIMIT}\n")
    b.start()
    try:
        yield b
    finally:
        b.cleanup()


@contextlib.asynccontextmanager
async def running_agents(url: str | Callable[[str], str], ids: list[str],
                         **kw: Any) -> AsyncIterator[list[Any]]:
    """Agents as tasks in this event loop (fast start; same code as the process agent).

    ``url`` is the broker URL, or a function of the device id giving each its own (e.g. its
    credentials). They compute in worker threads (``compute_thread``): agents sharing one
    event loop would otherwise compute in turn with the coordinator, and a hung one would
    stop them all. Agents started as processes (``harness.local``) compute inline."""
    kw.setdefault("compute_thread", True)
    from device_agent.agent import Agent, AgentConfig

    agents: list[Agent] = []
    tasks: list[asyncio.Task[None]] = []
    stack = contextlib.AsyncExitStack()
    async with stack:
        for dev in ids:
            dev_url = url(dev) if callable(url) else url
            a = await stack.enter_async_context(Agent(AgentConfig(dev_url, dev, **kw)))
            agents.append(a)
            tasks.append(asyncio.create_task(a.run()))
        try:
            yield agents
        finally:
            for a in agents:
                a.stop()
            await cancel_and_wait(*tasks)


async def wait_retained(url: str, topic: str, predicate: Any, timeout: float) -> dict[str, Any]:
    """The first JSON payload on ``topic`` (retained or live) that satisfies ``predicate``."""
    u = parse_broker_url(url)
    async with aiomqtt.Client(u.host, u.port) as c:
        await c.subscribe(topic, qos=1)
        async with asyncio.timeout(timeout):
            async for msg in c.messages:
                body = json.loads(bytes(msg.payload or b"{}"))
                if predicate(body):
                    return body
    raise AssertionError("unreachable")


def mosquitto_pub(broker: MosquittoBroker, topic: str, body: str) -> None:
    """Publish like a user's shell does (QoS 1), with the real ``mosquitto_pub``."""
    import shutil
    import subprocess

    pub = shutil.which("mosquitto_pub")
    assert pub, "mosquitto_pub missing: 'make test' installs mosquitto-clients"
    subprocess.run([pub, "-h", broker.host, "-p", str(broker.port), "-q", "1", "-t", topic,
                    "-m", body], check=True, timeout=10)


async def collect_json(broker: MosquittoBroker, topic: str, into: list[dict[str, Any]]) -> None:
    """Append every JSON payload on ``topic`` to ``into`` until cancelled (a watching user)."""
    async with aiomqtt.Client(broker.host, broker.port) as c:
        await c.subscribe(topic)
        async for msg in c.messages:
            into.append(json.loads(bytes(msg.payload or b"{}")))
