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


def make_regressor(kind: str = "hat", seed: int = 0) -> base.Regressor:
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
            n_models=5, grace_period=50, leaf_prediction="adaptive", model_selector_decay=0.3,
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


class LatencyPredictor:
    """Latency of one layer on one device: a River regressor on log milliseconds.

    ``x`` is a dict from ``features.features``; with ``use_prior`` the regressor learns the
    log ratio of the measured time to the features' ``log_prior_ms``, and with ``memory`` a
    ``ResidualMemory`` keyed by ``features.run_key`` remembers that ratio per layer run and
    overrides the regressor where it has seen the run.

    >>> from accept_mqtt.predictor.features import features
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

    def __init__(self, regressor: base.Regressor | str = "hat", *, use_prior: bool = True,
                 memory: bool = True, seed: int = 0) -> None:
        self.regressor = make_regressor(regressor, seed) if isinstance(regressor, str) \
            else regressor
        self.use_prior = use_prior
        self.memory = ResidualMemory(key=run_key) if memory else None
        self.n_learned = 0

    def _offset(self, x: Features) -> float:
        return x["log_prior_ms"] if self.use_prior else 0.0

    def learn_one(self, x: Features, ms: float) -> None:
        if not (ms > 0 and math.isfinite(ms)):
            return
        y = math.log(ms) - self._offset(x)
        if self.memory is not None:
            self.memory.learn_one(x, y)
        self.regressor.learn_one(x, y)
        self.n_learned += 1

    def _model_residual(self, x: Features) -> float:
        r = self.regressor.predict_one(x)
        r = float(r) if r is not None and math.isfinite(r) else 0.0
        return max(-MAX_LOG_RESIDUAL, min(MAX_LOG_RESIDUAL, r))

    def predict_log(self, x: Features) -> float:
        """Predicted natural log of the time in ms."""
        r = self._model_residual(x)
        if self.memory is not None:
            r = self.memory.blend(x, r)
        return self._offset(x) + max(-MAX_LOG_RESIDUAL, min(MAX_LOG_RESIDUAL, r))

    def predict_one(self, x: Features) -> float:
        return math.exp(self.predict_log(x))


class FlopsBaseline:
    """``ms = k * FLOPs * batch / (bench_gflops * 1e9) * 1e3``, one constant ``k`` learnt online.

    ``k`` is total measured time over total FLOPs-time (backward counted at twice the forward
    FLOPs), i.e. what a FLOPs-proportional partitioner assumes; layers without FLOPs (flatten,
    dropout) are predicted at 0 ms.

    >>> from accept_mqtt.predictor.features import features
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
