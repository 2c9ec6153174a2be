"""How many of the coordinator's rejections of bad input reach the job's metrics topic.

Every payload the coordinator cannot decode is logged and kept in the run record; it is
also published as an ``error`` on the job's metrics topic, but a flood of garbage must not
become a flood of metrics. ``RejectLimiter`` admits at most ``per_window`` rejections per
``window_s`` seconds (fixed windows) and counts the rest, which the coordinator then
publishes as one summary ``error`` (``suppressed``: how many, ``suppressed_topics``: on which
topics) when the window ends.

Guarantees: ``admit`` is true for the first ``per_window`` calls of each window and false
after; ``drain`` returns the number refused since the last ``drain`` and their distinct
topics in order of arrival (at most ``max_topics``: a flood over many topics stays one
bounded summary), and resets both. Pure: no I/O, the clock is injected.

>>> t = [0.0]
>>> lim = RejectLimiter(per_window=2, window_s=1.0, clock=lambda: t[0])
>>> [lim.admit(x) for x in "aabcb"], lim.drain(), lim.drain()
([True, True, False, False, False], (3, ['b', 'c']), (0, []))
>>> t[0] = 1.0
>>> lim.admit("a"), round(lim.window_left(), 3)
(True, 1.0)
"""

from __future__ import annotations

import time
from collections.abc import Callable


class RejectLimiter:
    """At most ``per_window`` admitted per ``window_s``; the refused ones are counted."""

    def __init__(self, per_window: int = 5, window_s: float = 1.0, max_topics: int = 10,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.per_window = per_window
        self.window_s = window_s
        self.max_topics = max_topics
        self.clock = clock
        self._topics: dict[str, None] = {}  # distinct suppressed topics, in arrival order
        self._start = -float("inf")
        self._admitted = 0
        self._suppressed = 0

    def admit(self, topic: str) -> bool:
        """One more rejection (of a message on ``topic``): publish it (true) or count it?"""
        now = self.clock()
        if now - self._start >= self.window_s:
            self._start, self._admitted = now, 0
        if self._admitted < self.per_window:
            self._admitted += 1
            return True
        self._suppressed += 1
        if len(self._topics) < self.max_topics:
            self._topics[topic] = None
        return False

    def window_left(self) -> float:
        """Seconds until the current window ends (when the summary is due)."""
        return max(0.0, self._start + self.window_s - self.clock())

    def drain(self) -> tuple[int, list[str]]:
        """How many were refused since the last call, and on which topics (then forget)."""
        n, topics = self._suppressed, list(self._topics)
        self._suppressed, self._topics = 0, {}
        return n, topics
