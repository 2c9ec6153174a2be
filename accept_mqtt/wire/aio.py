"""Small asyncio helpers shared by the agent and the coordinator (no MQTT here).

``cancel_and_wait`` exists because on Python 3.11 ``asyncio.wait_for`` (used inside aiomqtt
for every subscribe/unsubscribe/publish with a timeout) can swallow a cancellation that
lands while its inner future completes; a single ``task.cancel()`` then leaves the task
running for ever. Re-cancelling until the task is really done makes shutdown certain.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable


async def cancel_and_wait(*tasks: asyncio.Task[object] | None, retry: float = 0.5) -> None:
    """Cancel ``tasks`` and wait until each is done, cancelling again if one ignores it."""
    pending = {t for t in tasks if t is not None and not t.done()}
    while pending:
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=retry)
    for t in tasks:
        if t is not None and t.done() and not t.cancelled():
            with contextlib.suppress(BaseException):
                t.exception()  # retrieved, so asyncio does not log "never retrieved"


async def retry(connect: Callable[[], Awaitable[None]], timeout: float,
                retry_on: type[BaseException] | tuple[type[BaseException], ...],
                on_retry: Callable[[BaseException, float], None] | None = None, *,
                final: type[BaseException] | tuple[type[BaseException], ...] = ()) -> None:
    """Await ``connect()`` until it succeeds, backing off 0.2 s .. 2 s between tries; after
    ``timeout`` seconds the last ``retry_on`` error propagates. Other errors, and ``final``
    ones (e.g. a refusal among connection errors), propagate at once.
    """
    deadline = time.monotonic() + timeout
    delay = 0.2
    while True:
        try:
            await connect()
            return
        except retry_on as e:
            if isinstance(e, final) or time.monotonic() + delay > deadline:
                raise
            if on_retry is not None:
                on_retry(e, delay)
            await asyncio.sleep(delay)
            delay = min(2 * delay, 2.0)


# Socket buffers for tensor frames. The agent computes on its event loop's thread, so the part
# of a frame the kernel does not take in one write waits for the loop's next turn, i.e. until
# the current work item is computed. Asking for 4 MiB lets one write take a whole frame (a
# VGG width 0.25 activation of 8 samples is 262 KB; Linux's default is 208 KiB). The kernel
# caps the request at net.core.wmem_max/rmem_max (4 MiB here, 208 KiB on a stock Raspberry
# Pi OS). On this machine's loopback the effect on digits steps was within run-to-run noise.
FRAME_SOCKET_BUFFER = 4 * 1024 * 1024


def widen_socket_buffers(sock: socket.socket | None, nbytes: int = FRAME_SOCKET_BUFFER) -> None:
    """Ask for ``nbytes`` of send and receive buffer on ``sock`` (best effort, never raises)."""
    if sock is None:
        return
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, nbytes)


class DelayLine:
    """A one-way link latency that keeps everything in flight: a delay line, not a sleep.

    ``call(fn)`` runs ``fn()`` ``delay_s`` after the call, on the running event loop, and
    calls run in the order they were made, however many are waiting: ``n`` calls made at
    once all run about ``delay_s`` later, not ``n * delay_s``. ``wait()`` is the awaitable
    form (returns ``delay_s`` after it was called, in call order). ``delay_s == 0`` runs
    ``fn`` at once.

    Order under equal deadlines: each call schedules one loop timer, and whichever timer
    fires runs the *oldest* waiting callable. Deadlines never decrease (the loop's monotonic
    clock), so the ``i``-th timer to fire fires no earlier than the ``i``-th oldest deadline:
    nothing runs early and nothing overtakes, even if the loop orders equal timers its own way.
    """

    def __init__(self, delay_s: float) -> None:
        if not delay_s >= 0.0:  # also refuses NaN
            raise ValueError(f"a link delay must be >= 0 seconds, got {delay_s}")
        self.delay_s = float(delay_s)
        self._fifo: deque[Callable[[], object]] = deque()
        self._timers: set[asyncio.TimerHandle] = set()

    def __len__(self) -> int:
        """Calls still waiting for their deadline."""
        return len(self._fifo)

    def call(self, fn: Callable[[], object]) -> None:
        if self.delay_s == 0.0:
            fn()
            return
        loop = asyncio.get_running_loop()
        self._fifo.append(fn)
        handle: asyncio.TimerHandle

        def fire() -> None:
            self._timers.discard(handle)
            self._fifo.popleft()()

        handle = loop.call_at(loop.time() + self.delay_s, fire)
        self._timers.add(handle)

    async def wait(self) -> None:
        if self.delay_s == 0.0:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def done() -> None:
            if not fut.done():
                fut.set_result(None)

        self.call(done)
        await fut

    def cancel(self) -> None:
        """Drop everything still waiting (on shutdown)."""
        for h in self._timers:
            h.cancel()
        self._timers.clear()
        self._fifo.clear()
