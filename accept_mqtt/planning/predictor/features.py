"""Features of a (layer, device, batch, direction) quadruple, from descriptor and profile dicts.

Guarantees:

* ``features`` depends only on a layer descriptor dict (``LayerDescriptor.to_dict()``), a
  device profile dict (what an agent retains on its profile topic) and the batch size and
  direction, so the coordinator can compute it for a device it has only heard of.
* Every feature is a finite float; missing or ``None`` profile fields map to a neutral value
  plus a ``*_known`` flag, and an unknown layer type sets ``t_other``.
* ``log_prior_ms`` is the natural log of :func:`prior_ms`, a FLOPs-and-bytes roofline estimate
  scaled by the device's micro-benchmark score: the predictor learns only what it gets wrong.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from accept_mqtt.model.descriptors import LAYER_TYPES

Features = dict[str, float]

# The prior's constants, fitted once (log-space least squares) on the shipped seed samples; the
# learned residual corrects them per layer type and device, so they only need the right scale.
BWD_FLOPS_FACTOR = 2.0  # backward computes input and weight gradients: about 2x the forward
ELEM_FLOPS = 20.0  # memory traffic: one element in or out costs like this many FLOPs
OVERHEAD_FLOPS = 1.5e6  # fixed per-layer dispatch cost, in FLOPs of the device's matmul
EFFICIENCY = 0.4  # layers reach this fraction of the micro-benchmark's matmul GFLOP/s
DEFAULT_GFLOPS = 10.0  # a device whose profile carries no micro-benchmark score


def _num(v: Any, default: float = 0.0) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return default
    return f if math.isfinite(f) else default


def device_gflops(profile: Mapping[str, Any]) -> float:
    g = _num(profile.get("bench_gflops"))
    return g if g > 0 else DEFAULT_GFLOPS


def prior_ms(layer: Mapping[str, Any], profile: Mapping[str, Any], batch: int,
             direction: str) -> float:
    """Roofline-style estimate in ms: (FLOPs + element traffic + overhead) / micro-benchmark.

    >>> layer = {"flops": 1_000_000, "in_elems": 1000, "out_elems": 1000}
    >>> round(prior_ms(layer, {"bench_gflops": 100.0}, 10, "fwd"), 4)
    0.2975
    """
    work = _num(layer.get("flops")) * batch
    if direction == "bwd":
        work *= BWD_FLOPS_FACTOR
    elems = (_num(layer.get("in_elems")) + _num(layer.get("out_elems"))) * batch
    gflops = EFFICIENCY * device_gflops(profile)
    return 1e3 * (work + ELEM_FLOPS * elems + OVERHEAD_FLOPS) / (gflops * 1e9)


def layer_features(layer: Mapping[str, Any]) -> Features:
    """Per-sample layer shape: type one-hot and log-scaled sizes.

    >>> f = layer_features({"type": "conv2d", "flops": 9216, "params": 80, "in_elems": 64,
    ...                     "out_elems": 512, "kernel": 3, "stride": 1, "in_channels": 1,
    ...                     "out_channels": 8})
    >>> f["t_conv2d"], f["t_linear"], f["kernel"], round(f["log_flops"], 3)
    (1.0, 0.0, 3.0, 9.129)
    """
    ltype = str(layer.get("type", ""))
    out = {f"t_{t}": float(ltype == t) for t in LAYER_TYPES}
    out["t_other"] = float(ltype not in LAYER_TYPES)
    out["log_flops"] = math.log1p(max(_num(layer.get("flops")), 0.0))
    out["log_params"] = math.log1p(max(_num(layer.get("params")), 0.0))
    out["log_in"] = math.log1p(max(_num(layer.get("in_elems")), 0.0))
    out["log_out"] = math.log1p(max(_num(layer.get("out_elems")), 0.0))
    out["kernel"] = _num(layer.get("kernel"))
    out["stride"] = _num(layer.get("stride"))
    out["log_cin"] = math.log1p(max(_num(layer.get("in_channels")), 0.0))
    out["log_cout"] = math.log1p(max(_num(layer.get("out_channels")), 0.0))
    return out


def device_features(profile: Mapping[str, Any], threads: int | None = None) -> Features:
    """What the profile says about the device's compute (threads override the profile's)."""
    clock = _num(profile.get("clock_mhz"))
    mem = _num(profile.get("memory_mb"))
    return {
        "cores": _num(profile.get("cores"), 1.0),
        "threads": float(threads) if threads else _num(profile.get("threads"), 1.0),
        "log_clock": math.log(clock) if clock > 0 else 0.0,
        "clock_known": float(clock > 0),
        "log_mem": math.log1p(mem) if mem > 0 else 0.0,
        "log_gflops": math.log(device_gflops(profile)),
        "gflops_known": float(_num(profile.get("bench_gflops")) > 0),
    }


def features(layer: Mapping[str, Any], profile: Mapping[str, Any], batch: int,
             direction: str, threads: int | None = None) -> Features:
    """All features of one layer run on one device with one micro-batch size.

    >>> from accept_mqtt.model.descriptors import describe
    >>> from accept_mqtt.model.zoo import build_model
    >>> d = describe(build_model("cnn", seed=0))[0].to_dict()
    >>> x = features(d, {"bench_gflops": 50.0, "threads": 2, "cores": 4}, 16, "bwd")
    >>> x["bwd"], x["batch"], x["threads"], x["log_prior_ms"] < 0
    (1.0, 16.0, 2.0, True)
    """
    if direction not in ("fwd", "bwd"):
        raise ValueError(f"direction must be 'fwd' or 'bwd', got {direction!r}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    x = layer_features(layer)
    x.update(device_features(profile, threads))
    x["bwd"] = float(direction == "bwd")
    x["batch"] = float(batch)
    x["log_batch"] = math.log(batch)
    x["log_work"] = x["log_flops"] + x["log_batch"]
    x["log_elems"] = math.log1p((_num(layer.get("in_elems")) + _num(layer.get("out_elems")))
                                * batch)
    x["log_prior_ms"] = math.log(prior_ms(layer, profile, batch, direction))
    return x


def sample_features(profile: Mapping[str, Any], sample: Mapping[str, Any]) -> Features:
    """Features of one agent timing sample (``{"layer", "dir", "batch", "ms", "threads"}``)."""
    return features(sample["layer"], profile, int(sample["batch"]), str(sample["dir"]),
                    int(sample["threads"]) if sample.get("threads") else None)


_KEY_FEATURES: tuple[str, ...] = (
    *(f"t_{t}" for t in LAYER_TYPES), "t_other", "log_flops", "log_params", "log_in",
    "log_out", "kernel", "stride", "log_cin", "log_cout", "bwd", "threads",
)


def run_key(x: Features) -> tuple[float, ...]:
    """What identifies one layer run on any device of one kind, batch size aside: layer
    shape, direction and threads, but not the device's speed (so slowed-down copies of a
    device share it)."""
    return tuple(round(x.get(k, 0.0), 6) for k in _KEY_FEATURES)


def type_key(x: Features) -> tuple[str, float]:
    """Layer type and direction of a feature dict."""
    t = next((t for t in LAYER_TYPES if x.get(f"t_{t}")), "other")
    return t, x.get("bwd", 0.0)
