"""Per-device adaptation: speed offset, per-layer corrections, drift detection, rolling error.

Guarantees:

* ``SpeedDrift`` runs ``river.drift.ADWIN`` on a device's log ratio measured / predicted (the
  device-independent prediction, so the signal keeps its level until the device changes) and
  reports a change only when ADWIN finds one *and* the speed moved by at least
  ``min_factor`` (either way); ``factor`` says by how much.
* ``DeviceState`` keeps a robust (median) speed offset of the device relative to the shared
  model and per-layer residuals of its own; on a reported drift both restart from the
  samples after the change, so predictions follow a device that slowed down within a step.
* ``error()`` is the mean absolute percentage error of the last ``window`` predictions made
  for the device *before* it learnt from each sample (prequential), so it is honest.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass

from river import drift

from .features import Features, run_key
from .latency import ResidualMemory

CLIP = 3.0  # a single sample moves a log-ratio statistic by at most e^3


@dataclass(frozen=True)
class DriftEvent:
    """A detected change of a device's speed: measured times are now ``factor`` x before."""

    device: str
    factor: float
    samples: int  # samples the device had reported when it was detected


class SpeedDrift:
    """ADWIN on the log of measured / predicted time, with the size of the change.

    >>> import random
    >>> rng = random.Random(0)
    >>> d = SpeedDrift()
    >>> fired = [d.update(rng.gauss(0.0, 0.2)) for _ in range(500)]
    >>> any(f is not None for f in fired)
    False
    >>> fired = [d.update(rng.gauss(math.log(3), 0.2)) for _ in range(200)]
    >>> factor = next(f for f in fired if f is not None)
    >>> 2.0 < factor < 4.0
    True
    """

    def __init__(self, delta: float = 0.002, min_factor: float = 1.3, clock: int = 8,
                 recent: int = 9) -> None:
        self.delta = delta
        self.min_factor = min_factor
        self.clock = clock
        self.n_recent = recent
        self.reset()

    def reset(self) -> None:
        self.adwin = drift.ADWIN(delta=self.delta, clock=self.clock)
        self.recent: deque[float] = deque(maxlen=self.n_recent)

    @property
    def level(self) -> float:
        """Mean log ratio over the current window (0 when empty)."""
        return float(self.adwin.estimation) if self.adwin.width else 0.0

    def update(self, log_ratio: float) -> float | None:
        """Feed one log ratio; returns the speed factor new/old when a change is reported."""
        x = max(-CLIP, min(CLIP, log_ratio))
        self.recent.append(x)
        w0, t0 = self.adwin.width, self.adwin.total
        self.adwin.update(x)
        if not self.adwin.drift_detected:
            return None
        # ADWIN drops the older part of its window; compare that part's mean with the median
        # of the latest samples (ADWIN keeps some old ones, so its own mean understates it)
        dropped = w0 + 1 - self.adwin.width
        if dropped <= 0:
            return None
        change = statistics.median(self.recent) - (t0 + x - self.adwin.total) / dropped
        if abs(change) < math.log(self.min_factor):
            return None
        return math.exp(change)


class DeviceState:
    """What the cost model knows about one device beyond the shared latency model."""

    def __init__(self, device: str, *, offset_window: int = 31, error_window: int = 200,
                 min_drift_ms: float = 0.05, min_factor: float = 1.3,
                 drift_delta: float = 0.002) -> None:
        self.device = device
        self.offsets: deque[float] = deque(maxlen=offset_window)
        self.memory = ResidualMemory(window=5, prior_count=0.1, key=run_key)
        self.drift = SpeedDrift(delta=drift_delta, min_factor=min_factor)
        self.min_drift_ms = min_drift_ms
        self.errors: deque[tuple[float, float, float]] = deque(maxlen=error_window)
        self.samples = 0
        self.events: list[DriftEvent] = []
        self.pending_drift = False
        self.signature: tuple[float, float] | None = None  # (bench_gflops, threads)

    @property
    def offset(self) -> float:
        """Median log ratio of this device's times to the shared model's (0 if unknown)."""
        return statistics.median(self.offsets) if self.offsets else 0.0

    def correction(self, x: Features) -> float:
        """Log correction for ``x`` on this device: speed offset plus the layer's residual."""
        return self.offset + self.memory.predict_one(x)

    def learn(self, x: Features, ms: float, shared_log: float, predicted_ms: float) -> None:
        """One measured sample; ``shared_log`` is the shared model's log prediction for it
        and ``predicted_ms`` what the full model predicted (for the rolling error)."""
        self.samples += 1
        self.errors.append((abs(predicted_ms - ms) / ms, abs(predicted_ms - ms), ms))
        e1 = max(-CLIP, min(CLIP, math.log(ms) - shared_log))
        watched = math.exp(shared_log) >= self.min_drift_ms
        if watched:
            factor = self.drift.update(e1)
            if factor is not None:
                self.events.append(DriftEvent(self.device, factor, self.samples))
                self.pending_drift = True
                # restart from the latest samples (they include this one, appended below)
                self.offsets.clear()
                self.offsets.extend(list(self.drift.recent)[:-1])
                self.memory.clear()
        self.memory.learn_one(x, e1 - self.offset)
        self.offsets.append(e1)

    def error(self) -> float | None:
        """Rolling MAPE (a fraction) of the last predictions, None before any sample."""
        if not self.errors:
            return None
        return sum(e[0] for e in self.errors) / len(self.errors)

    def weighted_error(self) -> float | None:
        """Rolling time-weighted error: sum |error| / sum measured (a stage-level view)."""
        total = sum(e[2] for e in self.errors)
        return sum(e[1] for e in self.errors) / total if total > 0 else None

    def reset(self) -> None:
        """Forget everything learnt about this device (its profile changed)."""
        self.offsets.clear()
        self.memory.clear()
        self.drift.reset()
