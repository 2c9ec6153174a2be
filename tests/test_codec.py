"""The tensor-frame codec against PROTOCOL.md: round trips, error bounds, bit order, rejects."""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from accept_mqtt.wire import codec
from accept_mqtt.wire.codec import FrameError

TOPIC = "accept/jobs/j1/stage/1/fwd"
FAST = settings(max_examples=120, deadline=None)

# Finite float32 values over (almost) the whole range, subnormals included, so the float64
# fallback and the scale rounding rules get exercised; 1e30 keeps 1-bit scales finite.
_BIG = float(np.float32(1e30))
_values = st.floats(min_value=-_BIG, max_value=_BIG, width=32, allow_nan=False,
                    allow_infinity=False)
_arrays = arrays(np.float32, array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6),
                 elements=_values)


def _frame(x: np.ndarray | torch.Tensor, bits: int, **kw: Any) -> codec.TensorFrame:
    t = torch.from_numpy(x) if isinstance(x, np.ndarray) else x
    return codec.encode(t, bits=bits, job="j1", step=3, mb=1, kind="act", **kw)


def _wire(frame: codec.TensorFrame) -> torch.Tensor:
    return codec.decode(codec.from_bytes(codec.to_bytes(frame), TOPIC))


def _per_element(v: float | list[float], shape: tuple[int, ...], axis: int | None) -> np.ndarray:
    """lo or scale broadcast against a tensor of ``shape``."""
    a = np.asarray(v, np.float64)
    if axis is None:
        return a
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return a.reshape(view)


def _reference_decode(frame: codec.TensorFrame) -> np.ndarray:
    """docs/codec.md's decode arithmetic, written out independently of codec.dequantize."""
    n = frame.numel
    stream = int.from_bytes(frame.data, "little")  # bit j of the stream = bit j of this int
    codes = np.array([(stream >> (i * frame.bits)) & (2**frame.bits - 1) for i in range(n)],
                     np.float64).reshape(frame.shape)
    lo = _per_element(frame.lo, frame.shape, frame.axis)
    scale = _per_element(frame.scale, frame.shape, frame.axis)
    return (lo + codes * scale).astype(np.float32)


# --- round trips --------------------------------------------------------------------------


@FAST
@given(x=_arrays, bits=st.integers(1, 8), per_channel=st.booleans(), stochastic=st.booleans(),
       seed=st.integers(0, 2**32 - 1), axis_pick=st.integers(0, 3))
def test_minmax_round_trip_error_is_within_half_a_step(
    x: np.ndarray, bits: int, per_channel: bool, stochastic: bool, seed: int, axis_pick: int
) -> None:
    axis = axis_pick % x.ndim if per_channel and x.ndim else None
    f = _frame(x, bits, axis=axis, stochastic=stochastic, seed=seed)
    y = _wire(f).numpy()
    assert y.shape == x.shape and y.dtype == np.float32
    assert len(f.data) == math.ceil(x.size * bits / 8)
    assert f.scheme == "minmax" and f.axis == axis
    if x.size == 0:
        return
    assert np.array_equal(y, _reference_decode(f))  # the documented arithmetic, bit for bit
    scale = _per_element(f.scale, x.shape, axis)
    lo = _per_element(f.lo, x.shape, axis)
    assert (scale >= 0).all() and np.array_equal(np.float32(scale), scale)  # f32 on the wire
    assert np.array_equal(np.float32(lo), lo)
    # float32 rounding of the result and of the arithmetic: a few ulps of the magnitude
    slack = 2.0**-23 * float(np.abs(x).max()) + 2.0**-149
    err = np.abs(y.astype(np.float64) - x.astype(np.float64))
    step_share = 1.0 if stochastic else 0.5
    assert (err <= scale * (step_share + 1e-4) + slack).all()


@FAST
@given(x=_arrays)
def test_raw32_is_exact_and_raw16_is_ieee_half(x: np.ndarray) -> None:
    assert np.array_equal(_wire(_frame(x, 32)).numpy(), x)
    small = np.asarray(np.clip(x, -60000, 60000), np.float32)
    want = torch.from_numpy(small).half().float().numpy()
    assert np.array_equal(_wire(_frame(small, 16)).numpy(), want)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("axis", [None, 1])
def test_constant_tensor_decodes_exactly(bits: int, axis: int | None) -> None:
    x = torch.full((3, 5, 7), -2.75)
    f = _frame(x, bits, axis=axis)
    assert f.scale == 0.0 or f.scale == [0.0] * 5
    assert set(f.data) <= {0}  # every code is 0
    assert torch.equal(_wire(f), x)


@pytest.mark.parametrize("bits", [1, 4, 8, 16, 32])
@pytest.mark.parametrize("shape", [(0,), (2, 0, 3), (0, 4)])
def test_empty_tensors(bits: int, shape: tuple[int, ...]) -> None:
    f = _frame(torch.zeros(shape), bits, axis=1 if bits <= 8 and len(shape) > 1 else None)
    assert f.data == b""
    y = _wire(f)
    assert tuple(y.shape) == shape


def test_zero_dim_tensor() -> None:
    x = torch.tensor(1.25)
    assert torch.equal(_wire(_frame(x, 4)), x)
    assert torch.equal(_wire(_frame(x, 32)), x)


@pytest.mark.parametrize("bits", [1, 3, 8, 16, 32])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_input_raises(bits: int, bad: float) -> None:
    x = torch.arange(12.0).reshape(3, 4)
    x[1, 2] = bad
    with pytest.raises(ValueError, match="inf or NaN"):
        _frame(x, bits)
    if bits <= 8:
        with pytest.raises(ValueError, match="inf or NaN"):
            _frame(x, bits, axis=1)


def test_extreme_ranges_take_the_float64_path() -> None:
    big = torch.tensor([-3e38, 0.0, 3e38])
    with pytest.raises(ValueError, match="too wide"):
        _frame(big, 1)
    y = _wire(_frame(big, 8))
    assert (y - big).abs().max() <= 6e38 / 255 / 2 * 1.001
    tiny = torch.tensor([0.0, 1e-45, 3e-45, 1e-44])  # subnormal float32 steps
    y = _wire(_frame(tiny, 8))
    assert torch.equal(y, tiny)  # 2**-149 steps resolve subnormals exactly
    near = torch.tensor(1000.0) + torch.arange(9) * 2.0**-14  # range << |x|: steps < ulp
    f = _frame(near, 3)
    assert (_wire(f) - near).abs().max() <= f.scale * 0.5 + 2.0**-23 * 1000
    with pytest.raises(ValueError, match="65504"):
        _frame(torch.tensor([7e4]), 16)


# --- bit order ----------------------------------------------------------------------------


def test_bit_order_hand_examples() -> None:
    # codes 1, 2, 3 at 2 bits: 01 | 10 << 2 | 11 << 4 = 0b00111001
    assert codec.pack_codes(np.array([1, 2, 3], np.uint8), 2) == bytes([0b00111001])
    # codes 5, 3, 7 at 3 bits: stream bits 1,0,1, 1,1,0, 1,1 | 1 -> 0b11011101, 0b00000001
    assert codec.pack_codes(np.array([5, 3, 7], np.uint8), 3) == bytes([0xDD, 0x01])
    # 4 bits: first code in the low nibble
    assert codec.pack_codes(np.array([0xA, 0x5, 0xF], np.uint8), 4) == bytes([0x5A, 0x0F])
    # 1 bit: element i is bit i of the byte
    assert codec.pack_codes(np.array([1, 0, 0, 0, 0, 0, 0, 1, 1], np.uint8), 1) == b"\x81\x01"
    with pytest.raises(ValueError, match="0..3"):
        codec.pack_codes(np.array([4], np.uint8), 2)


def test_frame_bit_order_end_to_end() -> None:
    f = _frame(torch.tensor([0.0, 1.0, 2.0, 3.0, 3.0]), 2)
    assert (f.lo, f.scale) == (0.0, 1.0)
    assert f.data == bytes([0b11100100, 0b00000011])  # codes 0,1,2,3 | 3, zero padding


def _reference_pack(codes: list[int], bits: int) -> bytes:
    stream = sum(c << (i * bits) for i, c in enumerate(codes))
    return stream.to_bytes(codec.packed_nbytes(len(codes), bits), "little")


@FAST
@given(bits=st.integers(1, 8), data=st.data())
def test_packing_matches_the_bit_stream_definition(bits: int, data: st.DataObject) -> None:
    codes = data.draw(st.lists(st.integers(0, 2**bits - 1), max_size=70))
    packed = codec.pack_codes(np.array(codes, np.uint8), bits)
    assert packed == _reference_pack(codes, bits)
    assert codec.unpack_codes(packed, len(codes), bits).tolist() == codes


# --- zero-aligned grid (scheme minmax0) -----------------------------------------------------


@FAST
@given(x=_arrays, bits=st.integers(1, 8), per_channel=st.booleans(), stochastic=st.booleans(),
       seed=st.integers(0, 2**32 - 1), axis_pick=st.integers(0, 3),
       zero_share=st.floats(0.0, 0.9))
def test_minmax0_keeps_zeros_exact_and_the_error_within_a_step(
    x: np.ndarray, bits: int, per_channel: bool, stochastic: bool, seed: int, axis_pick: int,
    zero_share: float,
) -> None:
    x = x.copy()
    x.reshape(-1)[: int(x.size * zero_share)] = 0.0  # gradients behind a ReLU: many zeros
    axis = axis_pick % x.ndim if per_channel and x.ndim else None
    f = _frame(x, bits, axis=axis, stochastic=stochastic, seed=seed, zero=True)
    y = _wire(f).numpy()
    assert f.scheme == "minmax0" and y.shape == x.shape
    assert len(f.data) == math.ceil(x.size * bits / 8)
    if x.size == 0:
        return
    assert np.array_equal(y, _reference_decode(f))  # decoded exactly like minmax
    lo = _per_element(f.lo, x.shape, axis)
    scale = _per_element(f.scale, x.shape, axis)
    assert np.array_equal(np.float32(lo), lo) and np.array_equal(np.float32(scale), scale)
    slack = 2.0**-23 * float(np.abs(x).max()) + 2.0**-149
    err = np.abs(y.astype(np.float64) - x.astype(np.float64))
    assert (err <= scale * ((1.0 if stochastic else 0.5) + 1e-4) + slack).all()
    # the grid covers the data, and where a range straddles 0 (and bits >= 2) 0 is a code
    los = np.broadcast_to(lo, x.shape)
    assert (x >= los).all()
    if bits >= 2:
        dims = tuple(d for d in range(x.ndim) if d != axis)
        straddles = (x.min(axis=dims, keepdims=True) < 0) & (x.max(axis=dims, keepdims=True) > 0)
        zeros = (x == 0) & np.broadcast_to(straddles, x.shape)
        assert (y[zeros] == 0).all(), "an exact zero must decode to exactly 0"


def test_minmax0_makes_sparse_gradients_exact_where_minmax_adds_noise() -> None:
    g = torch.randn(64, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    g *= torch.rand(g.shape, generator=torch.Generator().manual_seed(1)) > 0.78  # 78 % zeros
    zeros = g == 0
    plain = _wire(_frame(g, 4, stochastic=True, seed=5))
    aligned = _wire(_frame(g, 4, stochastic=True, seed=5, zero=True))
    assert (aligned[zeros] == 0).all()
    assert (plain[zeros] != 0).float().mean() > 0.5  # the failure minmax0 exists to fix
    # the zeros no longer carry noise: the total error drops (measured: 29 vs 48, |g| 120)
    assert float((aligned - g).norm()) < 0.7 * float((plain - g).norm())


def test_minmax0_is_unbiased_and_equals_minmax_where_no_range_straddles_zero() -> None:
    x = torch.linspace(-1.0, 3.0, 4001)
    x[::7] = 0.0
    mean = torch.stack([_wire(_frame(x, 3, stochastic=True, seed=s, zero=True))
                        for s in range(400)]).double().mean(0)
    f = _frame(x, 3, zero=True)
    # sd of a 400-draw mean is below scale/40; a biased rounding would be off by ~scale/2
    assert float((mean - x.double()).abs().max()) < float(np.float64(f.scale)) / 8
    positive = torch.rand(300, generator=torch.Generator().manual_seed(2)) + 5.0
    assert _frame(positive, 4, zero=True).data == _frame(positive, 4).data
    assert (_frame(positive, 4, zero=True).lo, _frame(positive, 4, zero=True).scale) == (
        _frame(positive, 4).lo, _frame(positive, 4).scale)


# --- stochastic rounding ------------------------------------------------------------------


@pytest.mark.parametrize("bits,value", [(1, 0.3), (2, 1.7), (4, 6.25), (8, 100.9)])
def test_stochastic_rounding_is_unbiased(bits: int, value: float) -> None:
    top = 2**bits - 1
    x = torch.full((200_000,), value)
    x[0], x[1] = 0.0, float(top)  # pins lo = 0, scale = 1
    f = _frame(x, bits, stochastic=True, seed=1234)
    assert (f.lo, f.scale) == (0.0, 1.0)
    mean = float(_wire(f)[2:].double().mean())
    # frac(value) * (1 - frac) / n variance: sd ~ 0.001; nearest rounding would be off by >= 0.1
    assert abs(mean - value) < 0.01


def test_stochastic_rounding_is_deterministic_per_seed() -> None:
    x = torch.randn(64, 33, generator=torch.Generator().manual_seed(0))
    a = codec.to_bytes(_frame(x, 3, stochastic=True, seed=7))
    assert a == codec.to_bytes(_frame(x, 3, stochastic=True, seed=7))
    assert a != codec.to_bytes(_frame(x, 3, stochastic=True, seed=8))
    # nearest rounding ignores the seed
    assert codec.to_bytes(_frame(x, 3, seed=1)) == codec.to_bytes(_frame(x, 3, seed=2))


# --- the wire -----------------------------------------------------------------------------


def test_extension_keys_and_labels_survive() -> None:
    x, y = torch.randn(4, 3), torch.tensor([0, 5, 2, 9])
    f = _frame(x, 4, labels=y, extra={"nmb": 2, "bsz": 8, "train": True, "note": 0.1})
    g = codec.from_bytes(codec.to_bytes(f), TOPIC)
    assert g.extra == {"nmb": 2, "bsz": 8, "train": True, "note": 0.1}
    assert torch.equal(g.labels_tensor(), y)
    assert (g.job, g.step, g.mb, g.kind, g.shape) == ("j1", 3, 1, "act", (4, 3))


def test_per_channel_scales_go_as_float32() -> None:
    x = torch.randn(8, 64, 5)
    f = _frame(x, 4, axis=1)
    payload = codec.to_bytes(f)
    g = codec.from_bytes(payload, TOPIC)
    assert (g.lo, g.scale) == (f.lo, f.scale)  # exact: the values are float32
    assert msgpack.packb(f.scale, use_single_float=True) in payload  # 5 bytes per value
    assert msgpack.packb(f.scale) not in payload  # not 9


def test_outside_encoder_float64_lo_scale_decode_by_the_formula() -> None:
    body = _good_body()
    # not float32-representable: a decoder still follows the documented arithmetic
    body.update(axis=None, lo=0.1, scale=0.3)
    f = codec.from_bytes(msgpack.packb(body, use_bin_type=True), TOPIC)
    assert np.array_equal(codec.decode(f).numpy(), _reference_decode(f))


def test_encode_argument_errors() -> None:
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="kind"):
        codec.encode(x, bits=4, job="j", step=0, mb=0, kind="weights")
    with pytest.raises(ValueError, match="job id"):
        codec.encode(x, bits=4, job="a/+", step=0, mb=0, kind="act")
    with pytest.raises(ValueError, match="bits"):
        codec.encode(x, bits=12, job="j", step=0, mb=0, kind="act")
    with pytest.raises(ValueError, match="bits must be an int"):
        codec.encode(x, bits=True, job="j", step=0, mb=0, kind="act")
    with pytest.raises(ValueError, match="axis 2 out of range"):
        codec.encode(x, bits=4, job="j", step=0, mb=0, kind="act", axis=2)
    with pytest.raises(ValueError, match="per-channel"):
        codec.encode(x, bits=32, job="j", step=0, mb=0, kind="act", axis=0)
    with pytest.raises(ValueError, match="overwrite"):
        codec.encode(x, bits=4, job="j", step=0, mb=0, kind="act", extra={"data": b""})
    assert codec.encode(x, bits=4, job="j", step=0, mb=0, kind="act", axis=-1).axis == 1


# --- rejections ---------------------------------------------------------------------------


def _good_body() -> dict[str, Any]:
    """A valid per-channel 3-bit frame of shape (3, 4, 3) with labels, as a plain map.

    36 codes * 3 bits = 108 bits: 14 bytes, the last with 4 padding bits.
    """
    f = _frame(_GOOD_X, 3, axis=1, labels=torch.tensor([1, 0, 2]))
    return msgpack.unpackb(codec.to_bytes(f), raw=False)


def _mutated(**changes: Any) -> bytes:
    body = _good_body()
    for k, v in changes.items():
        if v is _DROP:
            del body[k]
        else:
            body[k] = v
    return msgpack.packb(body, use_bin_type=True)


_DROP = object()
_GOOD_X = torch.arange(36.0).reshape(3, 4, 3)

REJECTS: list[tuple[str, bytes | dict[str, Any], str]] = [
    ("garbage", b"\xc1\x00", "not msgpack"),
    ("truncated", b"\x8d\xa1v", "not msgpack"),
    ("list", msgpack.packb([1, 2]), "not a msgpack map"),
    ("int keys", msgpack.packb({1: 2}), "keys must be strings"),
    ("no data", {"data": _DROP}, "missing keys ['data']"),
    ("version", {"v": 2}, "unknown version v=2"),
    ("bool version", {"v": True}, "unknown version"),
    ("job", {"job": "a/#"}, "job id"),
    ("kind", {"kind": "weights"}, "kind 'weights' is not"),
    ("step", {"step": -1}, "step must be a non-negative int"),
    ("mb", {"mb": "0"}, "mb must be a non-negative int"),
    ("shape type", {"shape": "2x4x3"}, "shape must be a list"),
    ("shape negative", {"shape": [3, -4, 3]}, "shape must be a list of non-negative ints"),
    ("shape float", {"shape": [3, 4.0, 3]}, "shape must be a list of non-negative ints"),
    ("scheme", {"scheme": "zstd"}, "unknown scheme 'zstd'"),
    ("bits minmax", {"bits": 9}, "bits 9 out of range for scheme 'minmax'"),
    ("bits zero", {"bits": 0}, "bits 0 out of range"),
    ("bits raw", {"scheme": "raw", "bits": 8, "axis": None}, "out of range for scheme 'raw'"),
    ("axis range", {"axis": 3}, "axis 3 out of range for shape [3, 4, 3]"),
    ("axis type", {"axis": "1"}, "axis must be nil or an int"),
    ("axis raw", {"scheme": "raw", "bits": 32}, "axis must be nil for scheme 'raw'"),
    ("lo count", {"lo": [0.0, 1.0, 2.0]}, "lo has 3 values but axis 1 has 4 channels"),
    ("scale count", {"scale": [1.0] * 5}, "scale has 5 values but axis 1 has 4 channels"),
    ("lo scalar per channel", {"lo": 0.0}, "lo must be a list of numbers"),
    ("scale list per tensor", {"axis": None}, "lo must be a number when axis is nil"),
    ("lo strings", {"lo": ["a"] * 4}, "lo must be a list of numbers"),
    ("scale nan", {"scale": [1.0, math.nan, 1.0, 1.0]}, "scale has NaN or inf"),
    ("lo inf", {"lo": [0.0, 0.0, math.inf, 0.0]}, "lo has NaN or inf"),
    ("scale negative", {"scale": [1.0, -1.0, 1.0, 1.0]}, "negative scale"),
    ("data type", {"data": "abc"}, "data must be bin"),
    ("data short", {"data": b"\x00" * 13}, "got 13 bytes, need 14"),
    ("data long", {"data": b"\x00" * 15}, "got 15 bytes, need 14"),
    ("raw length", {"scheme": "raw", "bits": 32, "axis": None}, "got 14 bytes, need 144"),
    ("padding", {"data": b"\x00" * 13 + b"\x80"}, "padding bits"),
    ("labels type", {"labels": [1, 0]}, "labels must be bin or nil"),
    ("labels length", {"labels": b"\x00" * 12}, "not a multiple of 8"),
    ("labels count", {"labels": b"\x00" * 16}, "labels count 2 does not match the batch size 3"),
]


@pytest.mark.parametrize("payload,phrase", [r[1:] for r in REJECTS], ids=[r[0] for r in REJECTS])
def test_from_bytes_rejects_with_topic_and_reason(payload: bytes | dict[str, Any],
                                                  phrase: str) -> None:
    raw = payload if isinstance(payload, bytes) else _mutated(**payload)
    with pytest.raises(FrameError) as e:
        codec.from_bytes(raw, TOPIC)
    assert e.value.topic == TOPIC
    assert phrase in e.value.reason
    assert TOPIC in str(e.value)


def test_good_body_is_accepted() -> None:
    f = codec.from_bytes(_mutated(), TOPIC)
    scale = torch.tensor(f.scale).reshape(1, 4, 1)
    assert ((codec.decode(f) - _GOOD_X).abs() <= scale * (0.5 + 1e-4)).all()


def test_decode_validates_hand_built_frames() -> None:
    bad = codec.TensorFrame("j1", 0, 0, "act", (4,), 4, "minmax", None, 0.0, 1.0, b"\x00")
    with pytest.raises(FrameError, match="need 2"):
        codec.decode(bad)


def test_channel_axis_is_per_channel_only_for_k_bit_feature_maps() -> None:
    assert codec.channel_axis((8, 16, 4, 4), 4) == 1
    assert codec.channel_axis((8, 9, 128), 8) == 1
    assert codec.channel_axis((8, 256), 4) is None  # two floats per feature would cost ~30 %
    assert codec.channel_axis((8, 16, 4, 4), 32) is None  # raw frames have no scales
    assert codec.channel_axis((8, 16, 4, 4), 4, per_channel=False) is None
