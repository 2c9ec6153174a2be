"""Tensor frames on the wire (PROTOCOL.md, "Tensor frame"): msgpack maps of packed codes.

Guarantees:

* ``to_bytes(encode(x, bits=32, ...))`` decodes to exactly ``x`` (float32, little-endian).
* ``from_bytes`` validates every field before any tensor is built and raises ``FrameError``
  naming the topic and the reason; it never returns a frame that would decode to garbage.

NOTE: this first version carries ``raw`` 32/16-bit frames only; the ``minmax`` k-bit scheme
lands with the codec issue behind the same functions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import torch

VERSION = 1
KINDS = ("act", "grad")
RAW_BITS = (16, 32)
MINMAX_BITS = tuple(range(1, 9))


class FrameError(ValueError):
    """A frame that breaks the wire contract; ``topic`` and ``reason`` say where and why."""

    def __init__(self, topic: str, reason: str) -> None:
        super().__init__(f"bad frame on {topic or '<no topic>'}: {reason}")
        self.topic = topic
        self.reason = reason


@dataclass(frozen=True)
class TensorFrame:
    job: str
    step: int
    mb: int
    kind: str
    shape: tuple[int, ...]
    bits: int
    scheme: str
    axis: int | None
    lo: float | list[float]
    scale: float | list[float]
    data: bytes
    labels: bytes | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # extension keys (e.g. "nmb", "train")

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def labels_tensor(self) -> torch.Tensor | None:
        if self.labels is None:
            return None
        return torch.from_numpy(np.frombuffer(self.labels, dtype="<i8").copy())


_CORE_KEYS = ("v", "job", "step", "mb", "kind", "shape", "bits", "scheme", "axis", "lo",
              "scale", "data", "labels")


def encode(
    x: torch.Tensor,
    *,
    bits: int,
    job: str,
    step: int,
    mb: int,
    kind: str,
    labels: torch.Tensor | None = None,
    axis: int | None = None,
    stochastic: bool = False,
    seed: int = 0,
    extra: dict[str, Any] | None = None,
) -> TensorFrame:
    """Encode ``x`` as a frame with ``bits`` per element (32/16 raw, 1..8 minmax)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    arr = x.detach().to(torch.float32).contiguous().numpy()
    if not np.isfinite(arr).all():
        raise ValueError(f"cannot encode a {kind} tensor with inf or NaN values")
    if bits == 32:
        data = arr.astype("<f4", copy=False).tobytes()
    elif bits == 16:
        data = arr.astype("<f2").tobytes()
    else:
        raise ValueError(f"bits must be one of {RAW_BITS} in this version, got {bits}")
    lab = None
    if labels is not None:
        lab = labels.detach().to(torch.int64).contiguous().numpy().astype("<i8").tobytes()
    return TensorFrame(job, step, mb, kind, tuple(arr.shape), bits, "raw", None, 0.0, 0.0,
                       data, lab, dict(extra or {}))


def decode(frame: TensorFrame) -> torch.Tensor:
    """The float32 tensor a (validated) frame carries."""
    dtype = "<f4" if frame.bits == 32 else "<f2"
    arr = np.frombuffer(frame.data, dtype=dtype).astype(np.float32).reshape(frame.shape)
    return torch.from_numpy(arr.copy())


def to_bytes(frame: TensorFrame) -> bytes:
    d: dict[str, Any] = dict(frame.extra)
    d.update(
        v=VERSION, job=frame.job, step=frame.step, mb=frame.mb, kind=frame.kind,
        shape=list(frame.shape), bits=frame.bits, scheme=frame.scheme, axis=frame.axis,
        lo=frame.lo, scale=frame.scale, data=frame.data, labels=frame.labels,
    )
    return msgpack.packb(d, use_bin_type=True)


def from_bytes(payload: bytes, topic: str = "") -> TensorFrame:
    """Parse and validate a frame; ``FrameError`` names ``topic`` and the reason."""
    try:
        d = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types for garbage
        raise FrameError(topic, f"not a msgpack map ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise FrameError(topic, f"not a msgpack map (got {type(d).__name__})")
    missing = [k for k in _CORE_KEYS if k not in d]
    if missing:
        raise FrameError(topic, f"missing keys {missing}")
    if d["v"] != VERSION:
        raise FrameError(topic, f"unknown version v={d['v']!r} (this receiver speaks v=1)")
    if d["kind"] not in KINDS:
        raise FrameError(topic, f"kind {d['kind']!r} is not 'act' or 'grad'")
    for k in ("step", "mb"):
        if not isinstance(d[k], int) or d[k] < 0:
            raise FrameError(topic, f"{k} must be a non-negative int, got {d[k]!r}")
    shape = d["shape"]
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise FrameError(topic, f"shape must be a list of non-negative ints, got {shape!r}")
    if not isinstance(d["data"], bytes):
        raise FrameError(topic, "data must be bin")
    bits = d["bits"]
    if d["scheme"] != "raw" or bits not in RAW_BITS:
        raise FrameError(topic, f"unsupported scheme/bits {d['scheme']!r}/{bits!r}")
    n = 1
    for s in shape:
        n *= s
    want = n * bits // 8
    if len(d["data"]) != want:
        raise FrameError(
            topic, f"data has {len(d['data'])} bytes but shape {shape} at {bits} bits needs {want}"
        )
    labels = d["labels"]
    if labels is not None and (not isinstance(labels, bytes) or len(labels) % 8):
        raise FrameError(topic, "labels must be bin of int64 little-endian values")
    extra = {k: v for k, v in d.items() if k not in _CORE_KEYS}
    return TensorFrame(d["job"], d["step"], d["mb"], d["kind"], tuple(shape), bits,
                       d["scheme"], d["axis"], d["lo"], d["scale"], d["data"], labels, extra)
