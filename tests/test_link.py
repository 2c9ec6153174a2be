"""The agent's uplink: order kept, several frames in flight, bounded by the window; its
delay line (emulated latency) keeps frames in flight too."""

from __future__ import annotations

import asyncio
import time

import aiomqtt
import pytest

from accept_mqtt.wire.aio import DelayLine
from broker import MosquittoBroker
from device_agent.link import Link


class SlowBroker:
    """A publish that takes until ``release`` (a PUBACK that has not come back yet)."""

    def __init__(self, fail: set[int] | None = None) -> None:
        self.started: list[bytes] = []
        self.outstanding = 0
        self.max_outstanding = 0
        self.release = asyncio.Event()
        self.fail = fail or set()

    async def publish(self, topic: str, payload: bytes) -> None:
        self.started.append(payload)  # the client takes the packet here, in call order
        self.outstanding += 1
        self.max_outstanding = max(self.max_outstanding, self.outstanding)
        try:
            await self.release.wait()
            if int(payload) in self.fail:
                raise ConnectionError("broker went away")
        finally:
            self.outstanding -= 1


async def _run(window: int, n: int, fail: set[int] | None = None) -> tuple[SlowBroker, Link]:
    broker = SlowBroker(fail)
    link = Link(broker.publish, window=window)
    link.start()
    for i in range(n):
        link.send("t", str(i).encode(), "act")
    for _ in range(50):  # let the link start what its window allows
        await asyncio.sleep(0)
    in_flight_before_ack = broker.outstanding
    broker.release.set()
    await asyncio.wait_for(link.drain(), 5)
    await link.close()
    assert in_flight_before_ack == min(window, n)
    return broker, link


def test_frames_in_flight_up_to_the_window_in_queue_order() -> None:
    broker, link = asyncio.run(_run(window=4, n=10))
    assert broker.started == [str(i).encode() for i in range(10)]
    assert broker.max_outstanding == 4
    assert link.bytes_by_kind["act"] == sum(len(str(i)) for i in range(10))
    assert link.errors == 0


def test_window_one_is_one_frame_per_round_trip() -> None:
    broker, _ = asyncio.run(_run(window=1, n=5))
    assert broker.max_outstanding == 1
    assert broker.started == [str(i).encode() for i in range(5)]


def test_a_failed_publish_is_counted_and_the_rest_still_go() -> None:
    broker, link = asyncio.run(_run(window=3, n=6, fail={2}))
    assert len(broker.started) == 6
    assert link.errors == 1
    assert link.bytes_sent == 5  # one byte each, the failed one not counted


def test_window_must_be_positive() -> None:
    with pytest.raises(ValueError, match="window must be >= 1"):
        Link(SlowBroker().publish, window=0)


# -- the delay line (emulated one-way latency) -----------------------------------------------
def test_delay_line_runs_every_call_after_the_delay_in_call_order() -> None:
    async def main() -> tuple[list[int], list[float]]:
        line = DelayLine(0.05)
        loop = asyncio.get_running_loop()
        order: list[int] = []
        late: list[float] = []
        for i in range(20):
            t0 = loop.time()
            line.call(lambda i=i, t0=t0: (order.append(i), late.append(loop.time() - t0)))
        assert len(line) == 20
        await asyncio.sleep(0.2)
        assert len(line) == 0
        return order, late

    order, late = asyncio.run(main())
    assert order == list(range(20))
    assert min(late) >= 0.05 - 1e-3  # never early
    assert max(late) < 0.05 + 0.1  # all together, not 20 x 50 ms


def test_delay_line_refuses_a_negative_delay() -> None:
    with pytest.raises(ValueError, match="must be >= 0"):
        DelayLine(-0.001)
    with pytest.raises(ValueError, match="must be >= 0"):
        Link(SlowBroker().publish, delay_s=float("nan"))


def test_delayed_frames_stay_in_flight_through_mosquitto(broker: MosquittoBroker) -> None:
    """N frames queued at once on a link with a 100 ms one-way delay arrive, through a real
    broker, in order and all about 100 ms after they were queued: not one delay per frame."""
    n, delay = 12, 0.1

    async def main() -> tuple[list[int], list[float], float]:
        got: list[tuple[int, float]] = []
        ready = asyncio.Event()
        async with aiomqtt.Client(broker.host, broker.port) as sub, \
                aiomqtt.Client(broker.host, broker.port) as pub:
            await sub.subscribe("delay/t", qos=1)

            async def read() -> None:
                ready.set()
                async for msg in sub.messages:
                    got.append((int(bytes(msg.payload or b"-1")), time.perf_counter()))
                    if len(got) == n:
                        return

            reader = asyncio.create_task(read())
            await ready.wait()

            async def publish(topic: str, payload: bytes) -> None:
                await pub.publish(topic, payload, qos=1)

            link = Link(publish, delay_s=delay)
            link.start()
            t0 = time.perf_counter()
            for i in range(n):
                link.send("delay/t", str(i).encode(), "act")
            await asyncio.wait_for(reader, 10)
            await link.close()
        return [i for i, _ in got], [t - t0 for _, t in got], link.busy_ms

    order, arrived, busy_ms = asyncio.run(main())
    assert order == list(range(n))
    assert min(arrived) >= delay - 1e-3  # nothing leaves before its delay
    # all within the delay plus broker time; one delay per frame would be n * delay = 1.2 s
    assert max(arrived) < delay + 0.15, arrived
    assert busy_ms >= delay * 1e3 * 0.9


def test_a_send_with_nothing_before_it_starts_on_the_next_turn_and_order_holds() -> None:
    """Without pacing or delay, a send that finds a free slot and nothing queued starts its
    publish on the loop's next turn (not two turns later through the queue's task); sends
    that find the window full wait in the queue, and the wire order is the call order."""

    async def main() -> tuple[SlowBroker, list[bytes]]:
        broker = SlowBroker()
        link = Link(broker.publish, window=2)
        link.start()
        await asyncio.sleep(0)  # the queue's task is waiting for work
        link.send("t", b"0", "act")
        await asyncio.sleep(0)
        after_one_turn = list(broker.started)
        for i in range(1, 6):  # 1 takes the second slot; 2..5 find the window full
            link.send("t", str(i).encode(), "act")
        for _ in range(20):
            await asyncio.sleep(0)
        assert broker.outstanding == 2
        broker.release.set()
        await asyncio.wait_for(link.drain(), 5)
        await link.close()
        return broker, after_one_turn

    broker, first = asyncio.run(main())
    assert first == [b"0"]
    assert broker.started == [str(i).encode() for i in range(6)]


def test_drain_waits_for_sends_started_at_once() -> None:
    async def main() -> bool:
        broker = SlowBroker()
        link = Link(broker.publish, window=4)
        link.start()
        await asyncio.sleep(0)
        link.send("t", b"0")
        drained = asyncio.create_task(link.drain())
        for _ in range(10):
            await asyncio.sleep(0)
        early = drained.done()
        broker.release.set()
        await asyncio.wait_for(drained, 5)
        await link.close()
        return early

    assert asyncio.run(main()) is False
