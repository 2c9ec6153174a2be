"""MQTT 5: a message the broker refuses comes back as a reason code, not silence.

Under MQTT 3.1.1 a broker that drops a QoS 1 message (ACL, size limit) still acknowledges
it, and nobody learns why a frame never arrived. accept-mqtt speaks MQTT 5 unless the broker
URL says ``?protocol=3.1.1`` (``wire.broker_url``), and ``wire.mqtt.Client`` turns a PUBACK
reason code >= 0x80 into ``PublishRefused``. Against a real Mosquitto 2.0.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from accept_mqtt.coordinator import Coordinator, CoordinatorError
from accept_mqtt.coordinator.config import TrainConfig
from accept_mqtt.wire.aio import cancel_and_wait
from accept_mqtt.wire.broker_url import BrokerUrlError, parse_broker_url
from accept_mqtt.wire.mqtt import Client, PublishRefused
from broker import MosquittoBroker

from .conftest import collect_json, running_agents
from .test_security import Fleet, _make_fleet

DEVICES = ["dev-a", "dev-b"]


def _cfg(tmp_path: Path, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = dict(model="cnn", dataset="digits", epochs=1, batch_size=32,
                                micro_batches=4, max_steps=3, seed=7, devices=2,
                                runs_dir=str(tmp_path), device_timeout=20, step_timeout=30,
                                partition="flops")
    base.update(kw)
    return TrainConfig(**base)


def test_protocol_setting_in_the_url() -> None:
    assert parse_broker_url("mqtt://h").protocol == "5"
    u = parse_broker_url("mqtt://u@h:1884?protocol=3.1.1")
    assert u.protocol == "3.1.1" and str(u) == "mqtt://u@h:1884?protocol=3.1.1"
    assert u.client_kwargs({})["protocol"].value == 4  # paho's MQTTv311
    assert parse_broker_url("mqtt://h").client_kwargs({})["protocol"].value == 5
    for bad, why in (("mqtt://h?protocol=4", "not one of"), ("mqtt://h?qos=1", "unknown option")):
        with pytest.raises(BrokerUrlError, match=why):
            parse_broker_url(bad)


@pytest.fixture
def small_broker() -> Any:
    # log_type all: the log then names every message the limit dropped
    with MosquittoBroker(extra_config="message_size_limit 1000\nlog_type all\n") as b:
        yield b


def test_an_oversized_publish_is_refused_under_5_and_vanishes_under_311(
        small_broker: MosquittoBroker) -> None:
    async def main(query: str) -> list[Any]:
        u = parse_broker_url(small_broker.url + query)
        async with Client(**u.client_kwargs()) as c:
            # concurrent publishes: each verdict reaches the task that published
            return await asyncio.gather(
                *(c.publish("t/x", b"x" * (10 if i % 2 else 5000), qos=1) for i in range(6)),
                return_exceptions=True)

    v5 = asyncio.run(main(""))
    assert [type(r).__name__ for r in v5] == ["PublishRefused", "NoneType"] * 3
    refused = v5[0]
    assert isinstance(refused, PublishRefused) and refused.code == 0x95
    assert "t/x" in str(refused) and "Packet too large" in str(refused)
    assert asyncio.run(main("?protocol=3.1.1")) == [None] * 6  # dropped all the same, silently
    assert small_broker.log_path.read_text().count("Dropped too large PUBLISH") == 6


def test_a_publish_the_acl_forbids_is_refused_with_not_authorized(tmp_path: Path) -> None:
    fleet: Fleet = _make_fleet(tmp_path)
    try:
        async def main() -> None:
            url = parse_broker_url(fleet.url("pi-a"))
            async with Client(**url.client_kwargs()) as c:
                await c.publish("accept/devices/pi-a/status", b"{}", qos=1)  # its own: fine
                with pytest.raises(PublishRefused, match="accept/devices/pi-b/status") as e:
                    await c.publish("accept/devices/pi-b/status", b"{}", qos=1)
                assert e.value.code == 0x87 and "Not authorized" in str(e.value)

        asyncio.run(main())
        assert len(fleet.denied()) == 1
    finally:
        fleet.broker.cleanup()


def test_an_agent_reports_a_refused_frame_on_the_jobs_metrics(tmp_path: Path) -> None:
    """Stage 0's activations (8 samples x 16 x 8 x 8 fp32, 32 KB) are over the limit, the
    coordinator's inputs (2 KB) and the plan are not: the agent says which frame the broker
    refused, and why, where the coordinator and any monitor read."""
    with MosquittoBroker(extra_config="message_size_limit 16000\n") as b:
        metrics: list[dict[str, Any]] = []

        async def main() -> None:
            watcher = asyncio.create_task(collect_json(b, "accept/jobs/big/metrics", metrics))
            async with running_agents(b.url, DEVICES):
                async with Coordinator(b.url, _cfg(tmp_path), job="big") as coord:
                    run = asyncio.create_task(coord.run())
                    async with asyncio.timeout(30):
                        while not any(m.get("type") == "error" for m in metrics):
                            await asyncio.sleep(0.05)
                    await cancel_and_wait(run)
            await cancel_and_wait(watcher)

        asyncio.run(main())
    (err, *_) = [m for m in metrics if m.get("type") == "error"]
    assert err["device"] == "dev-a" and err["topic"] == "accept/jobs/big/stage/1/fwd"
    assert "refused" in err["reason"] and "0x95" in err["reason"]


def test_the_coordinator_stops_on_a_refused_publish(tmp_path: Path) -> None:
    """Inputs over the limit: retrying cannot help, so the run ends with the reason."""
    with MosquittoBroker(extra_config="message_size_limit 1500\n") as b:
        async def main() -> None:
            async with running_agents(b.url, DEVICES):
                async with Coordinator(b.url, _cfg(tmp_path), job="big") as coord:
                    await asyncio.wait_for(coord.run(), 30)

        with pytest.raises(CoordinatorError, match=r"refused the message on accept/jobs/big/"
                                                   r".*0x95"):
            asyncio.run(main())


def test_a_publish_leaves_when_it_is_made_and_an_idle_client_does_not_spin(
        broker: MosquittoBroker) -> None:
    """``Client`` writes a publish to the socket when it is made: a subscriber gets it while
    the publisher's loop is still blocked by a compute (aiomqtt alone writes on the loop's
    next turn, after the compute). And the writer aiomqtt registers afterwards finds nothing
    and goes: an idle client uses no CPU (calling paho's ``loop_write`` instead spun a core)."""
    import threading
    import time

    import paho.mqtt.client as paho

    got = threading.Event()
    arrived: list[float] = []
    sub = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    sub.on_message = lambda c, u, m: (arrived.append(time.monotonic()), got.set())
    sub.connect(broker.host, broker.port)
    sub.subscribe("eager/t", qos=1)
    sub.loop_start()
    try:
        time.sleep(0.3)  # the subscription is in place

        async def main() -> tuple[float, float]:
            async with Client(hostname=broker.host, port=broker.port) as c:
                task = asyncio.create_task(c.publish("eager/t", b"x" * 50_000, qos=1))
                await asyncio.sleep(0)  # the publish is made
                t_block = time.monotonic()
                time.sleep(1.0)  # a compute holding the loop
                t_free = time.monotonic()
                await asyncio.wait_for(task, 5)
                cpu0 = time.process_time()
                await asyncio.sleep(1.0)
                idle_cpu = time.process_time() - cpu0
                assert t_free - t_block >= 1.0
                return t_free, idle_cpu

        t_free, idle_cpu = asyncio.run(main())
        assert got.wait(5)
        assert arrived[0] < t_free - 0.5, "the publish waited for the loop"
        assert idle_cpu < 0.2, f"an idle client used {idle_cpu:.2f} s of CPU in 1 s"
    finally:
        sub.loop_stop()
        sub.disconnect()
