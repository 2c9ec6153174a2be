"""Per-device adaptation: speed offset, per-layer corrections, drift detection, rolling error.

Guarantees:

* ``SpeedDrift`` runs ``river.drift.ADWIN`` on a device's log ratio of measured time to a
  slow reference of the same layer run on the same device (the median of its last 31 times),
  only on layer runs the device has already timed at least three times, so a new workload is
  not mistaken for a slower device. The reference is slow on purpose: the prediction itself
  follows a change within three samples (median of 5), which used to end the error before
  ADWIN had seen enough of it, so a 6x slowdown went unreported about one run in three. It
  reports a change only when ADWIN finds one *and* the latest samples are off by at least
  ``min_factor`` (either way) *and* differ from the older window by as much, so noise, a
  one-off spike and the model catching up after a change are not reported; ``factor`` is
  measured / predicted at detection. It restarts after each report. Slow changes (a device
  warming up) raise no report: the per-layer memory follows them.
* ``DeviceState`` keeps three robust (median) levels for the device: a speed offset relative
  to the shared model, a correction per layer type and direction, and the recent times of
  each layer run on it (``RunMemory``). Each level defers to the one above until it has
  samples, so ten samples already fix the speed and the per-layer memory wins where it has
  data. On a reported drift the offset and the remembered times move by the reported
  factor at once, so predictions follow a device that slowed down within a step.
* ``error()`` is the mean absolute percentage error of the last ``window`` predictions made
  for the device *before* it learnt from each sample (prequential), so it is honest.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass

from river import drift

from .features import Features, type_key
from .latency import ResidualMemory, RunMemory

CLIP = 3.0  # one sample moves the drift statistic by at most e^3
OFFSET_CLIP = 6.0  # ... and the speed offset by e^6 (a micro-benchmark can be 50x off)


@dataclass(frozen=True)
class DriftEvent:
    """A detected change of a device's speed: measured times are now ``factor`` x before."""

    device: str
    factor: float
    samples: int  # samples the device had reported when it was detected


class SpeedDrift:
    """ADWIN on the log of measured / predicted time, with the size of the change.

    ``update`` returns None, or the factor measured / predicted when a change is reported.

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

    def update(self, log_ratio: float) -> float | None:
        """Feed one log ratio; returns measured / predicted when a change is reported."""
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
        level = statistics.median(self.recent)
        change = level - (t0 + x - self.adwin.total) / dropped
        if min(abs(level), abs(change)) < math.log(self.min_factor):
            return None
        self.reset()
        return math.exp(level)


class DeviceState:
    """What the cost model knows about one device beyond the shared latency model."""

    def __init__(self, device: str, *, offset_window: int = 31, error_window: int = 200,
                 min_drift_ms: float = 0.02, min_factor: float = 1.3,
                 drift_delta: float = 0.002) -> None:
        self.device = device
        self.offsets: deque[float] = deque(maxlen=offset_window)
        self.by_type = ResidualMemory(window=15, prior_count=2.0, key=type_key)
        self.memory = RunMemory(window=5, prior_count=0.1)
        # the drift detector's yardstick: slow, so a sudden change stays visible to ADWIN
        self.reference = RunMemory(window=31, prior_count=0.1)
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

    def predict_log(self, x: Features, shared_log: float) -> float:
        """Log ms of ``x`` here: the layer's own recent times on this device where it has
        them, else the shared model's ``shared_log`` scaled by the device's speed offset and
        corrected by what it does differently for the layer's type and direction."""
        fallback = shared_log + self.offset + self.by_type.predict_one(x)
        return self.memory.blend(x, fallback)

    def learn(self, x: Features, ms: float, shared_log: float, predicted_log: float) -> None:
        """One measured sample; ``shared_log`` is the shared model's log prediction for it
        and ``predicted_log`` this device's (``predict_log``), both made before learning."""
        self.samples += 1
        predicted = math.exp(predicted_log)
        self.errors.append((abs(predicted - ms) / ms, abs(predicted - ms), ms))
        # Only layer runs this device has timed before feed the detector: their error is
        # measurement noise until the device itself changes, whereas a new workload (a
        # re-plan gives the device other layers) has the model's generalisation error, which
        # is no reason to re-plan again.
        ref = self.reference.lookup(x) if self.reference.count(x) >= 3 else None
        if ref is not None and math.exp(ref[0]) >= self.min_drift_ms:
            factor = self.drift.update(math.log(ms) - ref[0])
            if factor is not None:
                self.events.append(DriftEvent(self.device, factor, self.samples))
                self.pending_drift = True
                shift = math.log(factor)
                shifted = [o + shift for o in self.offsets]
                self.offsets.clear()
                self.offsets.extend(shifted)
                self.memory.shift(shift)
                self.reference.shift(shift)
        e1 = max(-OFFSET_CLIP, min(OFFSET_CLIP, math.log(ms) - shared_log))
        self.by_type.learn_one(x, e1 - self.offset)
        self.memory.learn_one(x, math.log(ms))
        self.reference.learn_one(x, math.log(ms))
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
        self.by_type.clear()
        self.memory.clear()
        self.reference.clear()
        self.drift.reset()
