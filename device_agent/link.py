"""The agent's uplink: one ordered send queue, optionally paced to emulate a slower link.

Guarantees:

* Sends leave in the order they were queued, as on a real single uplink. Up to ``window``
  publishes are in flight at once (handed to the MQTT client, PUBACK not yet back): a link
  with a round trip carries ``window`` frames per round trip, not one. The client takes each
  publish synchronously when it is started, so starting them in queue order keeps the order
  on the wire.
* With ``bandwidth_bps`` set, a payload of ``n`` bytes occupies the link for ``8n/bandwidth``
  seconds before it is published (serialisation delay), measured with ``asyncio.sleep`` so a
  slow link costs no CPU. The compute loop never waits for the link unless it must.
* With ``delay_s`` set (an emulated one-way latency), a frame is published ``delay_s`` after
  it left the (paced) link, through a delay line (``wire.aio.DelayLine``): frames in flight
  keep their order and overlap, so ``n`` frames queued at once arrive about ``delay_s`` later,
  not ``n * delay_s``. A frame in the delay line holds its window slot, as a frame crossing a
  real link does until its PUBACK is back; ``busy_ms`` and the observers' spans include it.
* ``bytes_sent``, ``busy_ms`` (the time the link was pacing or had a publish outstanding)
  and per-topic-kind byte counters say what crossed the link.
* Observers (``add_observer``) are called, in the event loop and in registration order,
  after each successful publish with the payload's kind, the ``tag`` given to ``send``, its
  size and the ``time.time()`` span it occupied the link (pacing plus publish);
  ``device_agent.trace`` uses them. An observer's error is logged and ignored: the other
  observers are still called and the uplink keeps sending.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

from accept_mqtt.wire.aio import DelayLine

log = logging.getLogger(__name__)

Publish = Callable[[str, bytes], Awaitable[None]]
Observer = Callable[[str, Any, int, float, float], None]  # kind, tag, bytes, t0, t1


class Link:
    def __init__(self, publish: Publish, bandwidth_bps: float | None = None,
                 window: int = 16, delay_s: float = 0.0) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self._publish = publish
        self.bandwidth_bps = bandwidth_bps
        self.window = window
        self.delay = DelayLine(delay_s)  # refuses a negative delay; the agent's events use it too
        self._queue: asyncio.Queue[tuple[str, bytes, str, Any]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._slots = asyncio.Semaphore(window)
        self._inflight: set[asyncio.Task[None]] = set()
        self._active = 0  # pacing or publishes outstanding
        self._active_since = 0.0
        self.bytes_sent = 0
        self.busy_ms = 0.0
        self.bytes_by_kind: dict[str, int] = defaultdict(int)
        self.errors = 0
        self._observers: list[Observer] = []

    def add_observer(self, fn: Observer) -> None:
        """Call ``fn(kind, tag, nbytes, t0, t1)`` after every later successful publish."""
        self._observers.append(fn)

    def remove_observer(self, fn: Observer) -> None:
        """Stop calling ``fn`` (no error if it was not added)."""
        with contextlib.suppress(ValueError):
            self._observers.remove(fn)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="link")

    async def close(self) -> None:
        self.delay.cancel()
        tasks = [t for t in (self._task, *self._inflight) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._task = None
        self._inflight.clear()

    def send(self, topic: str, payload: bytes, kind: str = "other", tag: Any = None) -> None:
        """Queue ``payload`` for ``topic``; returns at once. ``tag`` goes to the observers."""
        self._queue.put_nowait((topic, payload, kind, tag))

    async def drain(self) -> None:
        """Wait until everything queued so far has been published."""
        await self._queue.join()

    def _enter(self) -> None:
        if self._active == 0:
            self._active_since = time.perf_counter()
        self._active += 1

    def _leave(self) -> None:
        self._active -= 1
        if self._active == 0:
            self.busy_ms += (time.perf_counter() - self._active_since) * 1e3

    async def _run(self) -> None:
        while True:
            item = await self._queue.get()
            await self._slots.acquire()
            w0 = time.time()
            self._enter()
            try:
                if self.bandwidth_bps:
                    await asyncio.sleep(len(item[1]) * 8 / self.bandwidth_bps)
            except BaseException:
                self._leave()
                self._slots.release()
                self._queue.task_done()
                raise
            self.delay.call(functools.partial(self._start, item, w0))
            # let the task hand its publish to the client before the next one is started
            await asyncio.sleep(0)

    def _start(self, item: tuple[str, bytes, str, Any], w0: float) -> None:
        task = asyncio.create_task(self._send_one(item, w0))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _send_one(self, item: tuple[str, bytes, str, Any], w0: float) -> None:
        topic, payload, kind, tag = item
        try:
            await self._publish(topic, payload)
            self.bytes_sent += len(payload)
            self.bytes_by_kind[kind] += len(payload)
            if self._observers:
                w1 = time.time()
                for fn in tuple(self._observers):  # a copy: an observer may remove itself
                    try:
                        fn(kind, tag, len(payload), w0, w1)
                    except Exception as e:
                        log.warning("link observer %r failed: %s", fn, e)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a failed publish must not kill the uplink
            self.errors += 1
            log.error("publish to %s failed: %s", topic, e)
        finally:
            self._leave()
            self._slots.release()
            self._queue.task_done()
