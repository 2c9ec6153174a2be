"""The cost model the coordinator plans with: per-layer forward/backward ms on each device.

``CostModel`` stacks three estimates of ``log(ms)`` (docs/predictor.md has the reasoning and
the measurements):

1. the roofline prior from the layer's FLOPs and elements and the device's micro-benchmark;
2. a shared ``LatencyPredictor`` (a River regressor on the prior's residual, plus a memory of
   each recently seen layer run), learnt from the shipped seed samples and, online, from
   what the device levels below fail to explain on every device;
3. per device (``drift.DeviceState``): a median speed offset, a correction per layer type
   and the device's own recent time of each layer run, with an ADWIN detector that reports
   when the device's speed changes.

Guarantees:

* ``observe`` never raises for a valid sample and ignores 0 ms samples; a malformed sample
  raises ``ValueError`` naming what is missing, and changes nothing.
* ``layer_costs`` works for any device, including one never observed: it then falls back on
  the shared model and the device's profile (its micro-benchmark score).
* ``save``/``load`` round-trip the whole model (see ``store``); ``load_or_seed`` turns an
  unusable state file into a logged warning and a freshly seeded model.
* ``CostModel.seeded()`` costs a few seconds the first time in a process and a copy after.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .drift import DeviceState, DriftEvent
from .features import Features, features, sample_features
from .latency import FlopsBaseline, LatencyPredictor
from .store import SEED_SAMPLES, PredictorStateError, load_state, read_samples, save_state

log = logging.getLogger(__name__)

Profile = Mapping[str, Any]
Progress = Callable[[int, int], None]

_SEEDED: dict[tuple[str, float, str], CostModel] = {}  # built once per process, then copied


def _as_dict(layer: Any) -> Mapping[str, Any]:
    return layer.to_dict() if hasattr(layer, "to_dict") else layer


class CostModel:
    """Per-layer latency of any device, learnt online from agents' timing samples.

    >>> from accept_mqtt.model.descriptors import describe
    >>> from accept_mqtt.model.zoo import build_model
    >>> descs = describe(build_model("cnn", seed=0))
    >>> profile = {"device": "pi-1", "bench_gflops": 8.0, "threads": 4, "cores": 4}
    >>> cm = CostModel()  # unseeded: the FLOPs prior only; CostModel.seeded() in practice
    >>> before = cm.layer_costs(descs, profile, batch=16)
    >>> for _ in range(5):  # the device turns out 3x slower than its profile says
    ...     for d, (f, b) in zip(descs, before):
    ...         for direction, ms in (("fwd", 3 * f), ("bwd", 3 * b)):
    ...             cm.observe(profile, {"layer": d.to_dict(), "dir": direction,
    ...                                  "batch": 16, "ms": ms, "threads": 4})
    >>> after = cm.layer_costs(descs, profile, batch=16)
    >>> all(2.7 < a / b < 3.3 for x, y in zip(after, before) for a, b in zip(x, y))
    True
    >>> round(cm.device_factor("pi-1"), 1)
    3.0
    """

    KIND = "CostModel"

    def __init__(self, predictor: LatencyPredictor | None = None, *, min_factor: float = 1.3,
                 drift_delta: float = 0.002, profile_tolerance: float = 0.25,
                 online_regressor: bool = False) -> None:
        self.predictor = predictor if predictor is not None else LatencyPredictor()
        self.online_regressor = online_regressor
        self.baseline = FlopsBaseline()
        self.devices: dict[str, DeviceState] = {}
        self.min_factor = min_factor
        self.drift_delta = drift_delta
        self.profile_tolerance = profile_tolerance
        self.n_seed = 0
        self.n_observed = 0

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def seeded(cls, path: str | Path | None = None, *, regressor: str = "arf",
               progress: Progress | None = None, **kwargs: Any) -> CostModel:
        """A model pre-trained on seed samples (default: the ones shipped with the package);
        ``kwargs`` go to the constructor."""
        path = Path(path) if path is not None else SEED_SAMPLES
        try:
            key = (str(path.resolve()), path.stat().st_mtime, regressor)
        except OSError as e:
            raise FileNotFoundError(f"seed samples {path}: {e.strerror}") from e
        if key not in _SEEDED:
            model = cls(LatencyPredictor(regressor))
            model.learn_seed(read_samples(path), progress=progress)
            _SEEDED[key] = model
        model = copy.deepcopy(_SEEDED[key])
        for name, value in kwargs.items():
            if not hasattr(model, name) or name in ("predictor", "baseline", "devices"):
                raise TypeError(f"CostModel.seeded() got an unexpected argument {name!r}")
            setattr(model, name, value)
        return model

    def learn_seed(self, samples: Iterable[Mapping[str, Any]],
                   progress: Progress | None = None) -> int:
        """Train the shared model (not any device's state) on samples carrying a ``profile``."""
        items = list(samples)
        n = 0
        for i, s in enumerate(items):
            x = sample_features(s["profile"], s)
            ms = float(s["ms"])
            self.predictor.learn_one(x, ms)
            self.baseline.learn_one(x, ms)
            n += 1
            if progress is not None and (i % 500 == 0 or i == len(items) - 1):
                progress(i + 1, len(items))
        self.n_seed += n
        return n

    # -- learning ------------------------------------------------------------------------
    def _state(self, device: str, profile: Profile) -> DeviceState:
        st = self.devices.get(device)
        sig = (float(profile.get("bench_gflops") or 0.0), float(profile.get("threads") or 0))
        if st is None:
            st = self.devices[device] = DeviceState(device, min_factor=self.min_factor,
                                                    drift_delta=self.drift_delta)
        elif st.signature is not None and self._profile_changed(st.signature, sig):
            log.info("device %s has a new profile (bench %.3g -> %.3g GFLOP/s, threads %g -> "
                     "%g): forgetting what was learnt about it", device, st.signature[0],
                     sig[0], st.signature[1], sig[1])
            st.reset()
        st.signature = sig
        return st

    def _profile_changed(self, old: tuple[float, float], new: tuple[float, float]) -> bool:
        if old[1] != new[1]:
            return True
        if old[0] <= 0 or new[0] <= 0:
            return old[0] != new[0]
        return abs(math.log(new[0] / old[0])) > math.log1p(self.profile_tolerance)

    def observe(self, profile: Profile, sample: Mapping[str, Any]) -> None:
        """Learn one agent timing sample (``{"layer", "dir", "batch", "ms", "threads"}``).

        The device is ``sample["device"]`` if set (the coordinator adds it), else
        ``profile["device"]``.
        """
        try:
            x = sample_features(profile, sample)
            ms = float(sample["ms"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed timing sample ({type(e).__name__}: {e}): "
                             f"{dict(sample)!r:.200}") from e
        if not (ms > 0 and math.isfinite(ms)):
            return
        device = str(sample.get("device") or profile.get("device") or "unknown")
        st = self._state(device, profile)
        shared = self.predictor.predict_log(x)
        full = st.predict_log(x, shared)
        st.learn(x, ms, shared, full)
        # The shared model learns only what this device's own levels did not explain (its
        # prediction error, added to its own prediction): device-specific speed stays with
        # the device, and levels that both learnt the same residual would double-count it.
        # By default only its per-run memory learns online; its regressor keeps what the seed
        # taught it (measured: updating it online made predictions swing, docs/predictor.md).
        self.predictor.learn_one(x, ms * math.exp(shared - full),
                                 regressor=self.online_regressor)
        self.baseline.learn_one(x, ms)
        self.n_observed += 1

    def observe_many(self, profile: Profile, samples: Iterable[Mapping[str, Any]]) -> int:
        """``observe`` each sample; returns how many were learnt (malformed ones are logged)."""
        n = 0
        for s in samples:
            try:
                self.observe(profile, s)
                n += 1
            except ValueError as e:
                log.warning("%s", e)
        return n

    # -- prediction ----------------------------------------------------------------------
    def predict_features(self, x: Features, device: str | None = None) -> float:
        """Predicted ms for a feature dict, with ``device``'s corrections when it is known."""
        log_ms = self.predictor.predict_log(x)
        st = self.devices.get(device) if device else None
        if st is not None:
            log_ms = st.predict_log(x, log_ms)
        return math.exp(log_ms)

    def predict_ms(self, layer: Any, profile: Profile, batch: int, direction: str, *,
                   device: str | None = None, threads: int | None = None) -> float:
        """Predicted ms of one layer (descriptor or its dict) on a device, one micro-batch."""
        x = features(_as_dict(layer), profile, batch, direction, threads)
        return self.predict_features(x, device or profile.get("device"))

    def layer_costs(self, descs: Sequence[Any], profile: Profile, batch: int, *,
                    device: str | None = None) -> list[tuple[float, float]]:
        """``(fwd_ms, bwd_ms)`` of every layer for one micro-batch of ``batch`` samples."""
        return [(self.predict_ms(d, profile, batch, "fwd", device=device),
                 self.predict_ms(d, profile, batch, "bwd", device=device)) for d in descs]

    def baseline_costs(self, descs: Sequence[Any], profile: Profile,
                       batch: int) -> list[tuple[float, float]]:
        """The FLOPs-proportional baseline's ``(fwd_ms, bwd_ms)`` per layer (for comparison)."""
        out = []
        for d in descs:
            layer = _as_dict(d)
            out.append(tuple(self.baseline.predict_one(features(layer, profile, batch, di))
                             for di in ("fwd", "bwd")))
        return out  # type: ignore[return-value]

    # -- per-device state ----------------------------------------------------------------
    def drift(self, device: str) -> bool:
        """True once per detected change of ``device``'s speed (reading clears the flag)."""
        st = self.devices.get(device)
        if st is None or not st.pending_drift:
            return False
        st.pending_drift = False
        return True

    def drift_events(self, device: str | None = None) -> list[DriftEvent]:
        """All speed changes detected so far (of one device, or of all)."""
        states = [self.devices[device]] if device in self.devices else (
            [] if device else list(self.devices.values()))
        return [e for st in states for e in st.events]

    def device_error(self, device: str) -> float | None:
        """Rolling MAPE (a fraction, e.g. 0.08) of predictions for ``device``; None if unseen."""
        st = self.devices.get(device)
        return st.error() if st else None

    def device_weighted_error(self, device: str) -> float | None:
        """Rolling time-weighted error (sum |err| / sum ms) for ``device``; None if unseen."""
        st = self.devices.get(device)
        return st.weighted_error() if st else None

    def device_factor(self, device: str) -> float:
        """How much slower (>1) or faster (<1) ``device`` runs than the shared model predicts
        from its profile (its whole offset; a drift event's ``factor`` is the change)."""
        st = self.devices.get(device)
        return math.exp(st.offset) if st else 1.0

    def forget(self, device: str) -> None:
        """Drop everything learnt about one device (e.g. it left for good)."""
        self.devices.pop(device, None)

    # -- persistence ---------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        save_state(self, path, self.KIND)

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        """Load a saved model; ``PredictorStateError`` if the file is unusable."""
        obj = load_state(path, cls.KIND)
        if not isinstance(obj, cls):
            raise PredictorStateError(f"{path} does not hold a {cls.__name__}")
        return obj

    @classmethod
    def load_or_seed(cls, path: str | Path | None) -> CostModel:
        """The model saved at ``path`` if usable, else a seeded one (and a warning why)."""
        if path is not None and Path(path).exists():
            try:
                return cls.load(path)
            except PredictorStateError as e:
                log.warning("%s; starting from the seeded model instead", e)
        return cls.seeded()
