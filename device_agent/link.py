"""The agent's uplink: one ordered send queue, optionally paced to emulate a slower link.

Guarantees:

* Sends leave in the order they were queued, as on a real single uplink. Up to ``window``
  publishes are in flight at once (handed to the MQTT client, PUBACK not yet back): a link
  with a round trip carries ``window`` frames per round trip, not one. The client takes each
  publish synchronously when it is started, so starting them in queue order keeps the order
  on the wire.
* Without pacing or delay, a send that finds nothing queued before it and a free window slot
  starts its publish at once (it runs on the loop's next turn) instead of going through the
  queue's task, which would cost the frame two more turns of the loop the stage's compute
  shares (docs/benchmarks.md).
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
        self._free = window  # window slots not held by a publish (or its pacing/delay)
        self._slot_freed = asyncio.Event()
        self._queued = 0  # sends in the queue or held by ``_run``, not yet started
        self._unsent = 0  # sends not yet done (published or failed): what ``drain`` waits for
        self._all_sent = asyncio.Event()
        self._all_sent.set()
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
        item = (topic, payload, kind, tag)
        self._unsent += 1
        self._all_sent.clear()
        if (not self.bandwidth_bps and self.delay.delay_s == 0.0 and self._queued == 0
                and self._free > 0 and self._task is not None):
            self._free -= 1  # what ``_run`` would do, without its turns of the loop
            self._enter()
            self._start(item, time.time())
            return
        self._queued += 1
        self._queue.put_nowait(item)

    async def drain(self) -> None:
        """Wait until everything queued so far has been published (or has failed)."""
        await self._all_sent.wait()

    def _done(self) -> None:
        """A send is over: its window slot is free again."""
        self._free += 1
        self._slot_freed.set()
        self._unsent -= 1
        if self._unsent == 0:
            self._all_sent.set()

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
            while self._free == 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
            self._free -= 1
            self._queued -= 1
            w0 = time.time()
            self._enter()
            try:
                if self.bandwidth_bps:
                    await asyncio.sleep(len(item[1]) * 8 / self.bandwidth_bps)
            except BaseException:
                self._leave()
                self._done()
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
            self._done()
