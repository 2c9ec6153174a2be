"""The agent's uplink: order kept, several frames in flight, bounded by the window."""

from __future__ import annotations

import asyncio

import pytest

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
