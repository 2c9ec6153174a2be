"""Online per-layer latency regressors: features -> milliseconds.

Guarantees:

* Targets live in log space, so a 0.01 ms ReLU and a 500 ms convolution weigh alike, and every
  prediction is a positive, finite number of milliseconds (the log residual is clipped).
* ``LatencyPredictor`` with ``use_prior=True`` (the default) predicts
  ``log(ms) = log_prior_ms + residual``: before it has learnt anything it returns the FLOPs
  prior, and on a device it has never seen it starts from that device's micro-benchmark.
* With ``memory`` (the default) a layer run seen before (same shape, batch, direction and
  threads) is predicted from the median of its own recent (prior-relative) times, blended
  with the regressor by how often it was seen: repeated layers converge to their measured
  time while new ones fall back on the regressor.
* ``learn_one`` ignores non-positive or non-finite times (a backward with nothing to compute
  reports 0 ms) instead of failing.
* ``FlopsBaseline`` is the comparison point: ``ms = k * FLOPs * batch / bench_gflops`` (backward
  at twice the forward FLOPs) with one constant ``k`` fitted online (ratio of totals).
"""

from __future__ import annotations

import math
import statistics
from collections import OrderedDict, deque
from typing import Any

from river import base, forest, linear_model, neighbors, optim, preprocessing, tree

from .features import BWD_FLOPS_FACTOR, Features, run_key

MAX_LOG_RESIDUAL = 6.0  # the learnt correction never moves the prior by more than e^6 (~400x)

REGRESSORS = ("linear", "hat", "arf", "knn")


def _linear() -> linear_model.LinearRegression:
    return linear_model.LinearRegression(optimizer=optim.SGD(0.01), intercept_lr=0.01,
                                         l2=1e-4, clip_gradient=1.0)


class Clip(base.Transformer):
    """Clip every (standardised) feature to ``[-bound, bound]``.

    A device unlike any seen (a Pi with 4 threads at 5 GFLOP/s after a seed of 1-2 thread
    x86 runs) then looks like the nearest one seen instead of sending linear leaf models
    into wild extrapolation.

    >>> Clip(3.0).transform_one({"a": -7.5, "b": 0.5})
    {'a': -3.0, 'b': 0.5}
    """

    def __init__(self, bound: float = 3.0) -> None:
        self.bound = bound

    def transform_one(self, x: dict[str, Any]) -> dict[str, Any]:
        b = self.bound
        return {k: max(-b, min(b, v)) for k, v in x.items()}


def _scaled(model: base.Regressor) -> base.Regressor:
    return preprocessing.StandardScaler() | Clip(3.0) | model


def make_regressor(kind: str = "arf", seed: int = 0) -> base.Regressor:
    """A fresh River regressor of one of the compared families (see docs/predictor.md).

    >>> type(make_regressor("hat")).__name__
    'Pipeline'
    """
    if kind == "linear":
        return _scaled(_linear())
    if kind == "hat":
        return _scaled(tree.HoeffdingAdaptiveTreeRegressor(
            grace_period=50, leaf_prediction="adaptive", model_selector_decay=0.3,
            leaf_model=_linear(), seed=seed))
    if kind == "arf":
        return _scaled(forest.ARFRegressor(
            n_models=3, grace_period=50, leaf_prediction="adaptive", model_selector_decay=0.3,
            aggregation_method="mean", leaf_model=_linear(), seed=seed))
    if kind == "knn":
        return _scaled(neighbors.KNNRegressor(
            n_neighbors=5, engine=neighbors.LazySearch(window_size=1000)))
    raise ValueError(f"unknown regressor {kind!r}; choose from {', '.join(REGRESSORS)}")


class ResidualMemory:
    """Per-key robust memory of a residual: median of the last ``window`` values.

    ``blend(x, fallback)`` weighs that median by ``n / (n + prior_count)`` for ``n`` values
    seen and ``fallback`` by the rest (so a key never seen gives ``fallback``);
    ``predict_one`` is ``blend(x, 0.0)``. The least recently used keys are forgotten beyond
    ``max_keys``.

    >>> m = ResidualMemory(window=3, prior_count=1.0)
    >>> x = {"k": 1.0}
    >>> for y in (0.1, 5.0, 0.3, 0.2):
    ...     m.learn_one(x, y)
    >>> m.count(x), round(m.predict_one(x), 3), m.blend(x, 1.5), m.blend({"k": 2.0}, 1.5)
    (3, 0.225, 0.6, 1.5)
    """

    def __init__(self, window: int = 7, prior_count: float = 0.1, max_keys: int = 100_000,
                 key: Any = None) -> None:
        self.window = window
        self.prior_count = prior_count
        self.max_keys = max_keys
        self.key = key if key is not None else (lambda x: tuple(sorted(x.items())))
        self._mem: OrderedDict[Any, deque[float]] = OrderedDict()

    def learn_one(self, x: Features, y: float) -> None:
        k = self.key(x)
        q = self._mem.get(k)
        if q is None:
            q = self._mem[k] = deque(maxlen=self.window)
            if len(self._mem) > self.max_keys:
                self._mem.popitem(last=False)
        else:
            self._mem.move_to_end(k)
        q.append(y)

    def count(self, x: Features) -> int:
        q = self._mem.get(self.key(x))
        return len(q) if q else 0

    def blend(self, x: Features, fallback: float) -> float:
        q = self._mem.get(self.key(x))
        if not q:
            return fallback
        w = len(q) / (len(q) + self.prior_count)
        return w * statistics.median(q) + (1.0 - w) * fallback

    def predict_one(self, x: Features) -> float:
        return self.blend(x, 0.0)

    def clear(self) -> None:
        self._mem.clear()

    def __len__(self) -> int:
        return len(self._mem)


class RunMemory:
    """Recent log-times of each layer run (``features.run_key``) per batch size.

    ``lookup(x)`` gives the median of the last ``window`` values stored for ``x``'s key and
    batch, weighted ``n / (n + prior_count)``; for a batch size not stored but with two others
    stored it interpolates (or extrapolates from the nearest two) linearly in *time* across
    batch sizes -- a layer's time is close to ``overhead + batch * per-sample cost`` -- with a
    lower weight. ``blend(x, fallback)`` mixes that with ``fallback`` by the weight. Values
    are natural logs of times (any fixed unit); least recently used keys are forgotten.

    >>> m = RunMemory(prior_count=0.0)
    >>> x = {"threads": 1.0, "batch": 16.0}
    >>> for batch, ms in ((16, 2.0), (64, 5.0)):
    ...     m.learn_one(dict(x, batch=float(batch)), math.log(ms))
    >>> v, w = m.lookup(dict(x, batch=32.0))
    >>> round(math.exp(v), 3), w
    (3.0, 0.7)
    >>> m.lookup(dict(x, threads=2.0)) is None
    True
    """

    INTERPOLATED = 0.7  # weight of an interpolated value relative to a stored one
    EXTRAPOLATED = 0.4

    def __init__(self, window: int = 7, prior_count: float = 0.1,
                 max_keys: int = 50_000) -> None:
        self.window = window
        self.prior_count = prior_count
        self.max_keys = max_keys
        self._mem: OrderedDict[tuple[float, ...], dict[int, deque[float]]] = OrderedDict()
        self._shift = 0.0

    def shift(self, delta: float) -> None:
        """Add ``delta`` to every value stored so far (not to later ones): a device that
        became ``e^delta`` times slower keeps its per-layer knowledge."""
        self._shift += delta

    def learn_one(self, x: Features, v: float) -> None:
        k = run_key(x)
        runs = self._mem.get(k)
        if runs is None:
            runs = self._mem[k] = {}
            if len(self._mem) > self.max_keys:
                self._mem.popitem(last=False)
        else:
            self._mem.move_to_end(k)
        runs.setdefault(int(x["batch"]), deque(maxlen=self.window)).append(v - self._shift)

    def count(self, x: Features) -> int:
        q = self._mem.get(run_key(x), {}).get(int(x["batch"]))
        return len(q) if q else 0

    def _weight(self, n: int) -> float:
        return n / (n + self.prior_count)

    def lookup(self, x: Features) -> tuple[float, float] | None:
        runs = self._mem.get(run_key(x))
        if not runs:
            return None
        b = int(x["batch"])
        q = runs.get(b)
        if q:
            return statistics.median(q) + self._shift, self._weight(len(q))
        known = sorted(runs)
        if len(known) < 2:
            return None
        if b < known[0]:
            (b1, b2), factor = known[:2], self.EXTRAPOLATED
        elif b > known[-1]:
            (b1, b2), factor = known[-2:], self.EXTRAPOLATED
        else:
            i = next(i for i, kb in enumerate(known) if kb > b)
            (b1, b2), factor = known[i - 1:i + 1], self.INTERPOLATED
        m1, m2 = (math.exp(statistics.median(runs[kb])) for kb in (b1, b2))
        m = m1 + (m2 - m1) * (b - b1) / (b2 - b1)
        # a layer never gets faster with more samples, nor more than proportionally slower
        if b < b1:
            m = min(max(m, m1 * b / b1), m1)
        elif b > b2:
            m = min(max(m, m2), m2 * b / b2)
        else:
            m = min(max(m, min(m1, m2)), max(m1, m2))
        w = factor * self._weight(min(len(runs[b1]), len(runs[b2])))
        return math.log(m) + self._shift, w

    def blend(self, x: Features, fallback: float) -> float:
        hit = self.lookup(x)
        if hit is None:
            return fallback
        v, w = hit
        return w * v + (1.0 - w) * fallback

    def clear(self) -> None:
        self._mem.clear()

    def __len__(self) -> int:
        return len(self._mem)


class LatencyPredictor:
    """Latency of one layer on one device: a River regressor on log milliseconds.

    ``x`` is a dict from ``features.features``; with ``use_prior`` the regressor learns the
    log ratio of the measured time to the features' ``log_prior_ms``, and with ``memory`` a
    ``RunMemory`` remembers each layer run's time scaled to a 1 GFLOP/s device (so slowed-down
    devices share it) and overrides the regressor where it has seen the run (at this or at
    two other batch sizes).

    >>> from accept_mqtt.planning.predictor.features import features
    >>> layer = {"type": "linear", "flops": 2_000_000, "params": 1_000_000, "in_elems": 1000,
    ...          "out_elems": 1000, "kernel": 1, "stride": 1, "in_channels": 1000,
    ...          "out_channels": 1000}
    >>> x = features(layer, {"bench_gflops": 50.0, "threads": 1}, 16, "fwd")
    >>> model = LatencyPredictor()
    >>> round(model.predict_one(x), 3)  # nothing learnt yet: the FLOPs prior
    1.707
    >>> for _ in range(100):
    ...     model.learn_one(x, 4.0)
    >>> round(model.predict_one(x), 3)
    4.0
    """

    def __init__(self, regressor: base.Regressor | str = "arf", *, use_prior: bool = True,
                 memory: bool = True, seed: int = 0) -> None:
        self.regressor = make_regressor(regressor, seed) if isinstance(regressor, str) \
            else regressor
        self.use_prior = use_prior
        self.memory = RunMemory() if memory else None
        self.n_learned = 0

    def _offset(self, x: Features) -> float:
        return x["log_prior_ms"] if self.use_prior else 0.0

    def learn_one(self, x: Features, ms: float, *, regressor: bool = True) -> None:
        """Learn one time; ``regressor=False`` updates the per-run memory only."""
        if not (ms > 0 and math.isfinite(ms)):
            return
        if self.memory is not None:
            self.memory.learn_one(x, math.log(ms) + x["log_gflops"])
        if regressor or self.memory is None:
            self.regressor.learn_one(x, math.log(ms) - self._offset(x))
        self.n_learned += 1

    def _model_residual(self, x: Features) -> float:
        r = self.regressor.predict_one(x)
        r = float(r) if r is not None and math.isfinite(r) else 0.0
        return max(-MAX_LOG_RESIDUAL, min(MAX_LOG_RESIDUAL, r))

    def predict_log(self, x: Features) -> float:
        """Predicted natural log of the time in ms."""
        r = self._model_residual(x)
        if self.memory is not None:
            hit = self.memory.lookup(x)
            if hit is not None:
                v, w = hit
                r = w * (v - x["log_gflops"] - self._offset(x)) + (1.0 - w) * r
        return self._offset(x) + max(-MAX_LOG_RESIDUAL, min(MAX_LOG_RESIDUAL, r))

    def predict_one(self, x: Features) -> float:
        return math.exp(self.predict_log(x))


class FlopsBaseline:
    """``ms = k * FLOPs * batch / (bench_gflops * 1e9) * 1e3``, one constant ``k`` learnt online.

    ``k`` is total measured time over total FLOPs-time (backward counted at twice the forward
    FLOPs), i.e. what a FLOPs-proportional partitioner assumes; layers without FLOPs (flatten,
    dropout) are predicted at 0 ms.

    >>> from accept_mqtt.planning.predictor.features import features
    >>> layer = {"type": "linear", "flops": 2_000_000, "in_elems": 1000, "out_elems": 1000}
    >>> x = features(layer, {"bench_gflops": 50.0}, 10, "fwd")
    >>> b = FlopsBaseline()
    >>> b.learn_one(x, 1.2)
    >>> round(b.predict_one(x), 3), round(b.k, 2)
    (1.2, 3.0)
    """

    def __init__(self) -> None:
        self._measured = 0.0
        self._flops_ms = 0.0

    @property
    def k(self) -> float:
        return self._measured / self._flops_ms if self._flops_ms > 0 else 1.0

    @staticmethod
    def _work_ms(x: Features) -> float:
        work = math.expm1(x["log_flops"]) * x["batch"]
        if x["bwd"]:
            work *= BWD_FLOPS_FACTOR
        return 1e3 * work / (math.exp(x["log_gflops"]) * 1e9)

    def learn_one(self, x: Features, ms: float) -> None:
        f = self._work_ms(x)
        if f > 0 and ms > 0 and math.isfinite(ms):
            self._measured += ms
            self._flops_ms += f

    def predict_one(self, x: Features) -> float:
        return self.k * self._work_ms(x)
