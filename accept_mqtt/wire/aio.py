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
                on_retry: Callable[[BaseException, float], None] | None = None) -> None:
    """Await ``connect()`` until it succeeds, backing off 0.2 s .. 2 s between tries; after
    ``timeout`` seconds the last ``retry_on`` error propagates. Other errors propagate at once.
    """
    deadline = time.monotonic() + timeout
    delay = 0.2
    while True:
        try:
            await connect()
            return
        except retry_on as e:
            if time.monotonic() + delay > deadline:
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
