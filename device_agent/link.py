"""The agent's uplink: one ordered send queue, optionally paced to emulate a slower link.

Guarantees:

* Sends leave in the order they were queued, one at a time, as on a real single uplink.
* With ``bandwidth_bps`` set, a payload of ``n`` bytes occupies the link for ``8n/bandwidth``
  seconds before it is published (serialisation delay), measured with ``asyncio.sleep`` so a
  slow link costs no CPU. The compute loop never waits for the link unless it must.
* ``bytes_sent``, ``busy_ms`` and per-topic-kind byte counters say what crossed the link.
* Observers (``add_observer``) are called, in the event loop and in registration order,
  after each successful publish with the payload's kind, the ``tag`` given to ``send``, its
  size and the ``time.time()`` span it occupied the link (pacing plus publish);
  ``device_agent.trace`` uses them. An observer's error is logged and ignored: the other
  observers are still called and the uplink keeps sending.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)

Publish = Callable[[str, bytes], Awaitable[None]]
Observer = Callable[[str, Any, int, float, float], None]  # kind, tag, bytes, t0, t1


class Link:
    def __init__(self, publish: Publish, bandwidth_bps: float | None = None) -> None:
        self._publish = publish
        self.bandwidth_bps = bandwidth_bps
        self._queue: asyncio.Queue[tuple[str, bytes, str, Any]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
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
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def send(self, topic: str, payload: bytes, kind: str = "other", tag: Any = None) -> None:
        """Queue ``payload`` for ``topic``; returns at once. ``tag`` goes to the observers."""
        self._queue.put_nowait((topic, payload, kind, tag))

    async def drain(self) -> None:
        """Wait until everything queued so far has been published."""
        await self._queue.join()

    async def _run(self) -> None:
        while True:
            topic, payload, kind, tag = await self._queue.get()
            try:
                t0, w0 = time.perf_counter(), time.time()
                if self.bandwidth_bps:
                    await asyncio.sleep(len(payload) * 8 / self.bandwidth_bps)
                await self._publish(topic, payload)
                self.busy_ms += (time.perf_counter() - t0) * 1e3
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
                self._queue.task_done()
