"""Tensor frames on the wire (PROTOCOL.md, "Tensor frame"): msgpack maps of packed codes.

Guarantees:

* ``raw``: ``decode(encode(x, bits=32, ...))`` is exactly ``x`` as float32; ``bits=16`` is
  ``x`` rounded to IEEE half (values beyond +-65504 are refused, not sent as inf).
* ``minmax`` (bits 1..8, per tensor or per channel): every element decodes to
  ``float32(float64(lo) + float64(code) * float64(scale))`` with the ``lo``/``scale`` that are
  on the wire (docs/codec.md), and is within ``scale / 2`` of the input for nearest rounding,
  below ``scale`` for stochastic rounding (both up to float32 rounding of the input's magnitude).
  ``lo`` and ``scale`` are float32-representable, so any decoder that follows that formula in
  IEEE double gets the same bits as this one. Stochastic rounding is ``floor(v + u)`` with
  ``u ~ U[0, 1)`` from ``numpy.random.default_rng(seed)``: unbiased, and the same seed gives
  the same frame.
* ``data`` is exactly ``ceil(n * bits / 8)`` bytes, codes packed LSB-first in C order.
* ``from_bytes`` validates every field before any tensor is built and raises ``FrameError``
  naming the topic and one specific reason; it never returns a frame that decodes to garbage.
  Unknown keys are extensions: kept in ``frame.extra`` and sent again by ``to_bytes``. One
  is read here: a frame whose tensor is a 2-D view of a batch (a delta frame) names the
  batch's shape in ``act_shape``, and its ``labels`` count one per sample of that batch.
* Inputs with inf or NaN raise ``ValueError``; nothing non-finite is ever put on the wire.

Work is vectorised numpy (no per-element Python), one thread; see docs/codec.md for the
measured throughput.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import torch

from .topics import ID_PATTERN

VERSION = 1
KINDS = ("act", "grad")
RAW_BITS = (16, 32)
MINMAX_BITS = tuple(range(1, 9))
# every width a link can carry: the one list plan, config and partitioner check against
VALID_BITS: tuple[int, ...] = (*MINMAX_BITS, *RAW_BITS)
BITS_TEXT = "1..8, 16 or 32"
# "minmax0" is an extension scheme (docs/protocol.md): the min-max grid shifted and widened
# so that 0 is exactly a code wherever a range straddles 0; decoded exactly like "minmax".
SCHEMES = ("raw", "minmax", "minmax0")
# the extension key of a frame whose tensor is a 2-D view of a batch (a delta frame,
# wire/delta.py): the batch's own shape, which its labels are counted against
BATCH_SHAPE_KEY = "act_shape"
_ZERO_SCALE_BITS = 16  # significant bits of a minmax0 scale: z * scale is then exact (z <= 255)
_F32_MAX = float(np.finfo(np.float32).max)
_F32_TINY = float(np.finfo(np.float32).tiny)  # smallest normal float32, 2**-126
_F16_MAX = float(np.finfo(np.float16).max)
# Below this scale 1/scale overflows float32, and above this range x - lo can overflow it:
# such tensors take the float64 path (rare, slower, same result format).
_F32_SAFE_SCALE = 2.0**-100
_F32_SAFE_RANGE = 2.0**126


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
        return math.prod(self.shape)

    def labels_tensor(self) -> torch.Tensor | None:
        if self.labels is None:
            return None
        return torch.from_numpy(np.frombuffer(self.labels, dtype="<i8").copy())


_CORE_KEYS = ("v", "job", "step", "mb", "kind", "shape", "bits", "scheme", "axis", "lo",
              "scale", "data", "labels")


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes of ``data`` for ``n`` elements at ``bits`` per element: ``ceil(n * bits / 8)``."""
    return (n * bits + 7) // 8


# --- bit packing ------------------------------------------------------------------------
#
# Codes live one per byte in a uint8 buffer whose length is a multiple of 8 (zero tail), so
# every width can be handled as groups of 8 codes = `bits` packed bytes. Widths 1, 2, 4 and 8
# have short special cases; 3, 5, 6 and 7 use SWAR on uint64 lanes: three merge steps turn
# 8 bytes holding one code each into the low 8*bits bits of the lane, in stream order.


def _lanes(width: int, nbits: int) -> np.uint64:
    """A uint64 with the low ``nbits`` of every ``width``-bit lane set."""
    lane = (1 << nbits) - 1
    return np.uint64(sum(lane << (width * i) for i in range(64 // width)))


# Merge steps (shift, mask that stays, mask that moves) for packing, lane widths 16, 32, 64:
# each step joins the two halves of a lane, each holding k bits, into 2k low bits.
_PACK_STEPS = {
    b: [(np.uint64(w // 2 - k), _lanes(w, k), np.uint64(int(_lanes(w, 2 * k)) ^ int(_lanes(w, k))))
        for w, k in ((16, b), (32, 2 * b), (64, 4 * b))]
    for b in (3, 5, 6, 7)
}
# The inverse, widest lane first: the upper k bits go back up to the lane's upper half.
_UNPACK_STEPS = {
    b: [(np.uint64(w // 2 - k), _lanes(w, k), np.uint64(int(_lanes(w, k)) << (w // 2)))
        for w, k in ((64, 4 * b), (32, 2 * b), (16, b))]
    for b in (3, 5, 6, 7)
}
_U16, _U32, _U64 = np.dtype("<u2"), np.dtype("<u4"), np.dtype("<u8")


def _padded_len(n: int) -> int:
    return (n + 7) // 8 * 8


def pack_codes(codes: np.ndarray, bits: int) -> bytes:
    """Pack ``bits``-bit codes (values < 2**bits) into the wire's LSB-first bit stream.

    The result has exactly ``packed_nbytes(len(codes), bits)`` bytes, last one zero-padded.
    """
    n = len(codes)
    if n and (int(np.min(codes)) < 0 or int(np.max(codes)) >= 2**bits):
        raise ValueError(f"codes must be in 0..{2**bits - 1} for {bits} bits")
    buf = np.zeros(_padded_len(n), np.uint8)
    buf[:n] = codes
    return _pack(buf, n, bits).tobytes()


def _pack(buf: np.ndarray, n: int, bits: int) -> np.ndarray:
    """Pack the first ``n`` codes of ``buf`` (uint8, length a multiple of 8, zero tail).

    ``buf`` is used as scratch space and must not be read afterwards.
    """
    need = packed_nbytes(n, bits)
    if bits == 8:
        return buf[:need]
    if bits == 4:
        v = buf.view(_U16)
        return (v | (v >> np.uint16(4))).astype(np.uint8)[:need]  # low byte of each pair
    if bits == 2:
        v = buf.view(_U32)
        v |= v >> np.uint32(6)
        v &= np.uint32(0x000F000F)
        v |= v >> np.uint32(12)
        return v.astype(np.uint8)[:need]
    if bits == 1:
        return np.packbits(buf, bitorder="little")[:need]
    v = buf.view(_U64)
    moved = np.empty_like(v)
    for shift, keep, move in _PACK_STEPS[bits]:
        np.right_shift(v, shift, out=moved)
        moved &= move
        v &= keep
        v |= moved
    # each 8-byte group now holds its `bits` packed bytes first
    return buf.reshape(-1, 8)[:, :bits].reshape(-1)[:need]


def unpack_codes(data: bytes | np.ndarray, n: int, bits: int) -> np.ndarray:
    """The first ``n`` codes (uint8) of a packed bit stream (inverse of ``pack_codes``).

    ``data`` must hold at least ``packed_nbytes(n, bits)`` bytes.
    """
    raw = np.frombuffer(data, np.uint8) if isinstance(data, bytes | bytearray) else data
    if bits == 8:
        return raw[:n]
    if bits == 4:
        v = raw.astype(_U16)
        v |= v << np.uint16(4)
        v &= np.uint16(0x0F0F)
        return v.view(np.uint8)[:n]
    if bits == 2:
        v = raw.astype(_U32)
        v |= v << np.uint32(12)
        v &= np.uint32(0x000F000F)
        v |= v << np.uint32(6)
        v &= np.uint32(0x03030303)
        return v.view(np.uint8)[:n]
    if bits == 1:
        return np.unpackbits(raw, bitorder="little")[:n]
    groups = _padded_len(n) // 8
    if groups == 0:
        return np.zeros(0, np.uint8)
    # Spread the packed bytes into the first `bits` bytes of each 8-byte group, zero above.
    buf = np.zeros((groups, 8), np.uint8)
    whole = groups - 1  # the last group may be short on the wire
    buf[:whole, :bits] = raw[: whole * bits].reshape(whole, bits)
    tail = raw[whole * bits : packed_nbytes(n, bits)]
    buf[whole, : len(tail)] = tail
    v = buf.reshape(-1).view(_U64)
    moved = np.empty_like(v)
    for shift, keep, move in _UNPACK_STEPS[bits]:
        np.left_shift(v, shift, out=moved)
        moved &= move
        v &= keep
        v |= moved
    return buf.reshape(-1)[:n]


# --- min-max quantisation ---------------------------------------------------------------


def wire_scales(lo: np.ndarray, hi: np.ndarray, bits: int) -> np.ndarray:
    """float32 ``scale`` per channel for ranges ``[lo, hi]`` (float64 arrays) at ``bits``.

    ``(hi - lo) / (2**bits - 1)`` rounded to float32 *towards zero* for normal values, so
    ``lo + (2**bits - 1) * scale`` never overshoots ``hi`` (and never overflows float32), and
    *away from zero* in the subnormal range, so the top code still reaches ``hi`` where float32
    steps are coarse. Exactly 0 where ``hi == lo``.
    """
    s64 = (hi - lo) / (2**bits - 1)
    if s64.size and float(s64.max()) > _F32_MAX:
        raise ValueError(
            f"tensor range {float((hi - lo).max()):.3g} is too wide for a float32 scale at "
            f"{bits} bits"
        )
    s32 = s64.astype(np.float32)
    normal = s32 >= _F32_TINY
    wrong_way = np.where(normal, s32 > s64, s32 < s64)
    if wrong_way.any():
        toward = np.where(normal, np.float32(0), np.float32(np.inf))
        s32 = np.where(wrong_way, np.nextafter(s32, toward), s32)
    return s32


def channel_axis(shape: tuple[int, ...] | list[int] | torch.Size, bits: int,
                 per_channel: bool = True) -> int | None:
    """The ``axis`` to quantise an activation with: 1 (its channels) for a k-bit feature map
    (3 or more dims: ``[batch, channels, ...]``), else None (one scale for the tensor).

    Why: post-ReLU channels have very different ranges; one scale per channel keeps 4-bit
    activations within a point of fp32 on the digits CNN where one per tensor costs 1-3 points
    (docs/codec.md, measured). Two floats per channel are negligible next to a feature map's
    codes, but not next to a 2-D ``[batch, features]`` tensor's, so those stay per tensor.
    """
    return 1 if per_channel and bits <= 8 and len(shape) >= 3 else None


def zero_aligned_grid(lo: np.ndarray, hi: np.ndarray,
                      bits: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 ``(lo, scale)`` per channel whose grid ``lo + c * scale`` has 0 as a code.

    Where ``lo < 0 < hi`` (and ``bits >= 2``): ``lo = -z * scale`` for the integer ``z`` in
    ``[1, 2**bits - 2]`` that needs the smallest ``scale`` covering ``[lo, hi]``, with
    ``scale`` rounded *up* to 16 significant bits, so ``z * scale`` is exact in float32 and
    code ``z`` decodes to exactly 0.0 by the wire's formula. Elsewhere (a range that does not
    straddle 0 has no zero to keep, or 1 bit, or a scale too small for 16 significant bits)
    the plain min-max grid of ``wire_scales``. The grid always covers ``[lo, hi]``.

    Why: gradients behind a ReLU are mostly exact zeros; on the plain grid 0 falls between
    two codes and stochastic rounding turns each zero into noise as large as the gradient
    (docs/codec.md, measured), which stops 4-bit gradients from training at all.
    """
    scale = wire_scales(lo, hi, bits)
    lo_out = lo.astype(np.float32)
    top = 2**bits - 1
    straddle = (lo < 0) & (hi > 0)
    if top < 3 or not straddle.any():
        return lo_out, scale
    span = np.where(straddle, hi - lo, 1.0)
    z0 = np.floor(top * -lo / span)
    best = np.full(lo.shape, np.inf)
    best_z = np.ones(lo.shape)
    # the needed scale max(-lo/z, hi/(top-z)) falls then rises in z: the optimum is next to
    # the real-valued crossing z0 (floor or ceil)
    for dz in (0.0, 1.0):
        z = np.clip(z0 + dz, 1, top - 1)
        need = np.maximum(-lo / z, hi / (top - z))
        better = need < best
        best = np.where(better, need, best)
        best_z = np.where(better, z, best_z)
    mant, exp = np.frexp(np.where(straddle, best, 1.0))
    rounded = np.ldexp(np.ceil(mant * 2.0**_ZERO_SCALE_BITS) / 2.0**_ZERO_SCALE_BITS, exp)
    ok = straddle & (rounded >= _F32_TINY * 2.0**_ZERO_SCALE_BITS) & (rounded * top <= _F32_MAX)
    scale = np.where(ok, rounded.astype(np.float32), scale)
    lo_out = np.where(ok, (-best_z * rounded).astype(np.float32), lo_out)
    return lo_out, scale


def _as_float32(x: torch.Tensor) -> np.ndarray:
    """``x`` as a C-contiguous float32 numpy array, sharing memory when it already is one."""
    return x.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()


def _channel_view(arr: np.ndarray, axis: int) -> np.ndarray:
    """``arr`` as (outer, channels, inner) without copying (``arr`` is C-contiguous)."""
    c = arr.shape[axis]
    return arr.reshape(math.prod(arr.shape[:axis]), c, math.prod(arr.shape[axis + 1 :]))


def _ranges(arr: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(min, max) per tensor (shape (1,)) or per channel, as float64; raises on inf/NaN."""
    if axis is None:
        if arr.size == 0:
            return np.zeros(1), np.zeros(1)
        # min/max propagate NaN, and an inf is its own min or max: no separate isfinite pass
        lo, hi = np.array([arr.min()], np.float64), np.array([arr.max()], np.float64)
    else:
        a3 = _channel_view(arr, axis)
        if a3.shape[0] * a3.shape[2] == 0:
            return np.zeros(a3.shape[1]), np.zeros(a3.shape[1])
        # numpy, not torch.amin: torch's intra-op threads stall for a scheduler tick when
        # another process holds a core (16 ms instead of 0.2 ms on a loaded 2-core box)
        lo = a3.min(axis=(0, 2)).astype(np.float64)
        hi = a3.max(axis=(0, 2)).astype(np.float64)
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        raise ValueError("cannot encode a tensor with inf or NaN values")
    return lo, hi


def quantize(
    arr: np.ndarray, bits: int, axis: int | None = None, *, stochastic: bool = False,
    seed: int = 0, zero: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Min-max quantise a C-contiguous float32 array: (packed data, lo, scale).

    ``lo`` and ``scale`` are float32 arrays of one value (``axis`` None) or one per channel on
    ``axis`` (non-negative). ``data`` is a uint8 array of ``packed_nbytes(arr.size, bits)``.
    ``zero`` uses ``zero_aligned_grid`` (scheme ``minmax0``): exact zeros stay exact zeros.
    """
    if bits not in MINMAX_BITS:
        raise ValueError(f"minmax bits must be 1..8, got {bits}")
    n = arr.size
    lo, hi = _ranges(arr, axis)
    if zero:
        lo32, scale = zero_aligned_grid(lo, hi, bits)
        lo = lo32.astype(np.float64)  # the grid may start below the minimum
    else:
        scale = wire_scales(lo, hi, bits)
        lo32 = lo.astype(np.float32)  # exact: lo is an element of arr
    top = 2**bits - 1
    codes = np.zeros(_padded_len(n), np.uint8)
    if n == 0:
        return codes[:0], lo32, scale
    # float32 arithmetic is safe when 1/scale and x - lo both fit; otherwise use float64
    fast = bool(((scale == 0) | (scale >= _F32_SAFE_SCALE)).all()) and float(
        (hi - lo).max()) < _F32_SAFE_RANGE
    dt = np.float32 if fast else np.float64
    # in float64: 1/scale of a subnormal scale overflows float32
    inv = np.divide(1.0, scale.astype(np.float64), out=np.zeros(scale.shape),
                    where=scale > 0).astype(dt)
    if axis is None:
        src, lo_b, inv_b = arr.reshape(-1), dt(lo32[0]), dt(inv[0])
    else:
        src, lo_b, inv_b = _channel_view(arr, axis), lo32.astype(dt)[:, None], inv[:, None]
    v = np.subtract(src, lo_b, dtype=dt)  # >= 0: lo is at most the minimum
    if zero:
        # a true division, so that an exact 0 lands exactly on its code z = -lo/scale
        # (times 1/scale can miss it by an ulp, and then stochastic rounding can move it);
        # the grid's scale was rounded up, so v stays in [0, top] but for float rounding
        s_b = scale.astype(dt) if axis is None else scale.astype(dt)[:, None]
        np.divide(v, np.where(s_b > 0, s_b, dt(1)), out=v)
        np.minimum(v, top, out=v)
    else:
        v *= inv_b  # v in [0, top] up to float rounding
    if stochastic:
        # floor(v + u), u ~ U[0, 1): E[code] = v, so gradients stay unbiased on average
        v += np.random.default_rng(seed).random(v.shape, dtype=np.float32)
        np.minimum(v, top, out=v)  # v + u can reach top + 1 when v rounds to just above top
    else:
        v += dt(0.5)  # truncation below is then round-half-up
        if not fast:
            np.minimum(v, top + 0.5, out=v)
    # Truncating cast: v >= 0, and the bound above (or float32 error analysis in
    # docs/codec.md) keeps it below top + 1.
    np.copyto(codes[:n], v.reshape(-1), casting="unsafe")
    return _pack(codes, n, bits), lo32, scale


def _value_table(lo: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray:
    """float32 value of every code, (channels, 2**bits): the decode arithmetic of the wire.

    Product and sum are separate float64 operations, then one rounding to float32 (with
    float32-representable lo/scale the product is exact, so a fused multiply-add agrees).
    """
    codes = np.arange(2**bits, dtype=np.float64)
    prod = codes[None, :] * scale.astype(np.float64)[:, None]
    return (lo.astype(np.float64)[:, None] + prod).astype(np.float32)


# Per-tensor decode of widths that divide 8 looks up whole packed bytes: one gather gives
# 8/bits floats, stored as one wide item (void for 16 and 32 bytes, exact byte copies).
_BYTE_ITEM = {8: np.dtype("<f4"), 4: _U64, 2: np.dtype("V16"), 1: np.dtype("V32")}
# _BYTE_CODES[bits][byte] = the 8/bits codes in that byte, first code first.
_BYTE_CODES = {
    b: (np.arange(256)[:, None] >> (np.arange(8 // b) * b)) & (2**b - 1) for b in _BYTE_ITEM
}


def dequantize(
    data: bytes | np.ndarray, shape: tuple[int, ...], bits: int, axis: int | None,
    lo: np.ndarray, scale: np.ndarray,
) -> np.ndarray:
    """float32 array of ``shape`` from packed codes and float64 ``lo``/``scale`` arrays."""
    n = math.prod(shape)
    if n == 0:
        return np.zeros(shape, np.float32)
    table = _value_table(lo, scale, bits)
    raw = np.frombuffer(data, np.uint8) if isinstance(data, bytes | bytearray) else data
    raw = raw[: packed_nbytes(n, bits)]
    if axis is None and bits in _BYTE_ITEM:
        by_byte = table[0][_BYTE_CODES[bits]].view(_BYTE_ITEM[bits]).reshape(-1)
        out = by_byte.take(raw).view(np.float32)[:n]
    elif axis is None:
        out = table[0].take(unpack_codes(raw, n, bits))
    else:
        channels = shape[axis]
        idx = unpack_codes(raw, n, bits).astype(np.intp)
        idx3 = idx.reshape(math.prod(shape[:axis]), channels, -1)
        idx3 += (np.arange(channels, dtype=np.intp) * 2**bits)[:, None]
        out = table.reshape(-1).take(idx)
    return out.reshape(shape)


# --- frames -----------------------------------------------------------------------------


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
    zero: bool = False,
    extra: dict[str, Any] | None = None,
) -> TensorFrame:
    """Encode ``x`` as a frame with ``bits`` per element (32/16 raw, 1..8 minmax).

    ``axis`` (minmax only) gives per-channel ``lo``/``scale`` along that axis; ``stochastic``
    rounds codes stochastically with ``seed``; ``zero`` (bits 1..8) keeps exact zeros exact
    (scheme ``minmax0``, see ``zero_aligned_grid``). Raises ``ValueError`` for inf/NaN input
    and for arguments the wire cannot carry.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not _is_int(bits):
        raise ValueError(f"bits must be an int, got {bits!r}")
    if not isinstance(job, str) or not ID_PATTERN.match(job):
        raise ValueError(f"job id {job!r} must match [A-Za-z0-9_-]{{1,64}}")
    for name, val in (("step", step), ("mb", mb)):
        if not _is_int(val) or val < 0:
            raise ValueError(f"{name} must be a non-negative int, got {val!r}")
    clash = sorted(set(extra or {}) & set(_CORE_KEYS))
    if clash:
        raise ValueError(f"extra keys {clash} would overwrite frame fields")
    arr = _as_float32(x)
    if axis is not None:
        if bits not in MINMAX_BITS:
            raise ValueError(f"per-channel axis needs minmax bits 1..8, got bits={bits}")
        if not -arr.ndim <= axis < arr.ndim:
            raise ValueError(f"axis {axis} out of range for a {arr.ndim}-d tensor")
        axis %= arr.ndim
    lo: float | list[float]
    scale: float | list[float]
    if bits in RAW_BITS:
        scheme, lo, scale = "raw", 0.0, 0.0
        if bits == 16:
            if float(np.abs(np.concatenate(_ranges(arr, None))).max()) > _F16_MAX:
                raise ValueError(f"a raw 16-bit frame cannot carry |x| > {_F16_MAX:g}")
        elif not np.isfinite(arr).all():  # a third of the time of a min and a max
            raise ValueError("cannot encode a tensor with inf or NaN values")
        if bits == 32:
            data = arr.astype("<f4", copy=False).tobytes()
        else:  # torch's float16 conversion is ~100x numpy's (F16C), same IEEE rounding
            data = torch.from_numpy(arr).to(torch.float16).numpy().astype("<f2").tobytes()
    elif bits in MINMAX_BITS:
        scheme = "minmax0" if zero else "minmax"
        packed, lo32, s32 = quantize(arr, bits, axis, stochastic=stochastic, seed=seed,
                                     zero=zero)
        data = packed.tobytes()
        lo, scale = (float(lo32[0]), float(s32[0])) if axis is None else (
            lo32.tolist(), s32.tolist())
    else:
        raise ValueError(f"bits must be 1..8 (minmax) or 16/32 (raw), got {bits}")
    lab = None
    if labels is not None:
        lab = labels.detach().to(device="cpu", dtype=torch.int64).contiguous().numpy()
        lab = lab.astype("<i8", copy=False).tobytes()
    return TensorFrame(job, step, mb, kind, tuple(arr.shape), bits, scheme, axis, lo, scale,
                       data, lab, dict(extra or {}))


def decode(frame: TensorFrame) -> torch.Tensor:
    """The float32 tensor a frame carries (the frame is validated first)."""
    validate(frame)
    if frame.scheme == "raw":
        if frame.bits == 32:
            # astype makes the writable copy torch wants (the frame's bytes are immutable)
            arr = np.frombuffer(frame.data, dtype="<f4").astype(np.float32)
            return torch.from_numpy(arr.reshape(frame.shape))
        half = np.frombuffer(frame.data, dtype="<f2").astype(np.float16)  # writable copy
        return torch.from_numpy(half).to(torch.float32).reshape(frame.shape)
    lo = np.atleast_1d(np.asarray(frame.lo, np.float64))
    scale = np.atleast_1d(np.asarray(frame.scale, np.float64))
    return torch.from_numpy(
        dequantize(frame.data, frame.shape, frame.bits, frame.axis, lo, scale))


def _bin_header(n: int) -> bytes:
    if n < 2**8:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 2**16:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


def _f32_exact(v: float | list[float]) -> bool:
    if not isinstance(v, list):
        try:
            return struct.unpack("<f", struct.pack("<f", v))[0] == v
        except (OverflowError, struct.error, TypeError):
            return False
    a = np.asarray(v, np.float64)
    with np.errstate(over="ignore"):
        return bool((a.astype(np.float32).astype(np.float64) == a).all())


def to_bytes(frame: TensorFrame) -> bytes:
    """The msgpack payload of ``frame``.

    ``lo``/``scale`` go as msgpack float32 when that is exact (always, for frames from
    ``encode``): 5 bytes instead of 9 per channel. ``data`` is appended last without an
    intermediate copy.
    """
    body: dict[str, Any] = {k: v for k, v in frame.extra.items() if k not in _CORE_KEYS}
    body.update(
        v=VERSION, job=frame.job, step=frame.step, mb=frame.mb, kind=frame.kind,
        shape=list(frame.shape), bits=frame.bits, scheme=frame.scheme, axis=frame.axis,
        labels=frame.labels,
    )
    p64 = msgpack.Packer(use_bin_type=True)
    single = _f32_exact(frame.lo) and _f32_exact(frame.scale)
    floats = msgpack.Packer(use_bin_type=True, use_single_float=single)
    parts = [p64.pack_map_header(len(body) + 3)]
    for k, val in body.items():
        parts += (p64.pack(k), p64.pack(val))
    parts += (p64.pack("lo"), floats.pack(frame.lo), p64.pack("scale"), floats.pack(frame.scale))
    parts += (p64.pack("data"), _bin_header(len(frame.data)), frame.data)
    return b"".join(parts)


def from_bytes(payload: bytes, topic: str = "") -> TensorFrame:
    """Parse and validate a frame; ``FrameError`` names ``topic`` and the reason."""
    try:
        d = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several unrelated types for garbage
        raise FrameError(topic, f"payload is not msgpack ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise FrameError(topic, f"payload is not a msgpack map (got {type(d).__name__})")
    bad_keys = [k for k in d if not isinstance(k, str)]
    if bad_keys:
        raise FrameError(topic, f"map keys must be strings, got {bad_keys[:3]!r}")
    missing = [k for k in _CORE_KEYS if k not in d]
    if missing:
        raise FrameError(topic, f"missing keys {missing}")
    if not _is_int(d["v"]) or d["v"] != VERSION:
        raise FrameError(topic, f"unknown version v={d['v']!r} (this receiver speaks v=1)")
    shape = d["shape"]
    if not isinstance(shape, list):
        raise FrameError(topic, f"shape must be a list of non-negative ints, got {shape!r}")
    extra = {k: v for k, v in d.items() if k not in _CORE_KEYS}
    frame = TensorFrame(d["job"], d["step"], d["mb"], d["kind"], tuple(shape), d["bits"],
                        d["scheme"], d["axis"], d["lo"], d["scale"], d["data"], d["labels"],
                        extra)
    validate(frame, topic)
    return frame


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _check_floats(topic: str, name: str, v: object, count: int | None, axis: int | None) -> \
        float:
    """Check ``lo``/``scale``: one number (``count`` None) or ``count`` of them; their min."""
    if count is None:
        if not isinstance(v, int | float) or isinstance(v, bool):
            raise FrameError(topic, f"{name} must be a number when axis is nil, got {v!r:.60}")
        if not math.isfinite(v):
            raise FrameError(topic, f"{name} has NaN or inf")
        return float(v)
    if not isinstance(v, list) or not all(_is_number(e) for e in v):
        raise FrameError(topic, f"{name} must be a list of numbers (per channel on axis "
                         f"{axis}), got {type(v).__name__}")
    if len(v) != count:
        raise FrameError(topic, f"{name} has {len(v)} values but axis {axis} has {count} "
                         f"channels")
    arr = np.asarray(v, np.float64)
    if not np.isfinite(arr).all():
        raise FrameError(topic, f"{name} has NaN or inf")
    return float(arr.min()) if arr.size else 0.0


def validate(frame: TensorFrame, topic: str = "") -> None:
    """Raise ``FrameError`` (naming ``topic``) if ``frame`` breaks the wire contract."""
    f = frame
    if not isinstance(f.job, str) or not ID_PATTERN.match(f.job):
        raise FrameError(topic, f"job id {f.job!r:.80} must match [A-Za-z0-9_-]{{1,64}}")
    if f.kind not in KINDS:
        raise FrameError(topic, f"kind {f.kind!r:.40} is not 'act' or 'grad'")
    for name, val in (("step", f.step), ("mb", f.mb)):
        if not _is_int(val) or val < 0:
            raise FrameError(topic, f"{name} must be a non-negative int, got {val!r:.40}")
    if not all(_is_int(s) and s >= 0 for s in f.shape):
        raise FrameError(topic, f"shape must be a list of non-negative ints, got "
                         f"{list(f.shape)!r:.80}")
    if f.scheme not in SCHEMES:
        raise FrameError(topic, f"unknown scheme {f.scheme!r:.40} (known: raw, minmax, "
                         "minmax0)")
    allowed = RAW_BITS if f.scheme == "raw" else MINMAX_BITS
    if not _is_int(f.bits) or f.bits not in allowed:
        want = "16 or 32" if f.scheme == "raw" else "1..8"
        raise FrameError(topic, f"bits {f.bits!r:.20} out of range for scheme {f.scheme!r} "
                         f"({want})")
    ndim = len(f.shape)
    if f.scheme == "raw":
        if f.axis is not None:
            raise FrameError(topic, f"axis must be nil for scheme 'raw', got {f.axis!r:.20}")
    else:
        if f.axis is not None and not _is_int(f.axis):
            raise FrameError(topic, f"axis must be nil or an int, got {f.axis!r:.20}")
        if f.axis is not None and not 0 <= f.axis < ndim:
            raise FrameError(topic, f"axis {f.axis} out of range for shape {list(f.shape)}")
        count = None if f.axis is None else f.shape[f.axis]
        _check_floats(topic, "lo", f.lo, count, f.axis)
        if _check_floats(topic, "scale", f.scale, count, f.axis) < 0:
            raise FrameError(topic, "negative scale")
    if not isinstance(f.data, bytes):
        raise FrameError(topic, f"data must be bin, got {type(f.data).__name__}")
    n = math.prod(f.shape)
    need = packed_nbytes(n, f.bits)
    if len(f.data) != need:
        raise FrameError(topic, f"data length mismatch: got {len(f.data)} bytes, need {need} "
                         f"for shape {list(f.shape)} at {f.bits} bits")
    spare = need * 8 - n * f.bits
    if spare and f.data[-1] >> (8 - spare):
        raise FrameError(topic, "padding bits of the last data byte are not zero")
    if f.labels is not None:
        if not isinstance(f.labels, bytes):
            raise FrameError(topic, f"labels must be bin or nil, got {type(f.labels).__name__}")
        if len(f.labels) % 8:
            raise FrameError(topic, f"labels length {len(f.labels)} is not a multiple of 8 "
                             f"(int64 values)")
        # a frame that carries a 2-D view of a batch (a delta frame, wire/delta.py) names the
        # batch's own shape in ``act_shape``: its labels are one per sample, not per row
        view = f.extra.get(BATCH_SHAPE_KEY)
        samples = view[0] if isinstance(view, list) and view and _is_int(view[0]) else (
            f.shape[0] if ndim else None)
        if samples is None or len(f.labels) // 8 != samples:
            batch = samples if samples is not None else "none (0-d tensor)"
            raise FrameError(topic, f"labels count {len(f.labels) // 8} does not match the "
                             f"batch size {batch}")
