"""Delta-coded activations and error-feedback gradients on one link (AQ-SGD; docs/codec.md).

Below 4 bits a link cannot carry an activation itself, but it can carry how much a training
sample's activation *changed* since that sample last crossed (Wang et al., AQ-SGD, NeurIPS
2022): the change shrinks as training converges, and so does its quantisation error. For
gradients the standard cure is error feedback: what one step's quantisation lost is added to
the next step's gradient before it is quantised.

Guarantees:

* ``ActHistory`` is one end of a delta-coded activation link; the sender calls ``encode``, the
  receiver ``decode``. Both ends store the *decoded* value of every frame (rounded to the
  history's dtype, float16 by default, clamped to its finite range), never the sender's own
  input, so two histories that saw the same frames are bit-identical: the decode is the
  codec's exact formula, the sum and the rounding are IEEE operations.
* A frame is delta-coded only when the sender holds history for every sample in it; otherwise
  it goes as a plain k-bit frame of the activation, and both ends (re)start that sample's
  history from it. ``reset`` forgets everything: the next frame of every sample is plain.
* A delta frame names, per sample, the step its history was set at (``base``). A receiver
  whose history is missing or from another step raises ``HistoryMismatch`` (a
  ``codec.FrameError``) naming the sample, forgets those samples and decodes nothing: a
  history mismatch never yields a wrong activation.
* ``ErrorFeedback`` is the sender of k-bit gradients on one link: slot ``s`` (the micro-batch
  index) carries the residual of its last frame into its next one of the same shape; a frame
  of another shape starts the slot afresh. ``reset`` drops every residual.
* A delta-coded link's plain frames (a sample's first crossing, its first after a reset,
  and every evaluation frame, which never carries history) go at ``PLAIN_BITS`` (8) bits
  when the link's width is lower: at 2 bits only a change survives quantisation, not the
  activation itself (docs/codec.md, measured).
* A delta frame's tensor is the change viewed as ``[samples x channels, rest]`` (as
  ``[samples, everything else]`` where a channel's codes would be fewer than ``ROW_BITS``
  bits, and for a 2-D activation; ``change_view``), quantised with one ``lo``/``scale`` per
  row (``axis`` 0): one scale per sample and channel, since how much an activation changed
  differs far more between samples than its range does (fashion-cnn, 2 bits: 90.8 % against
  89.6 % with one scale per channel; fp32 91.4 %). Its ``act_shape`` extension is the activation's
  shape, and ``frame_shape`` the one to check a frame against.
* Extension keys on the wire (docs/protocol.md, "Delta frames"): ``ids`` (uint32 LE, one per
  sample), ``delta`` (true on a delta frame), ``base`` (uint32 LE, one per sample), ``act_shape``
  (a delta frame's activation shape). A plain frame of a delta link is a v1 frame with
  ``ids``; any v1 decoder reads it, and reads a delta frame's change (not the activation).

Pure: numpy, torch and the codec; no MQTT.

>>> import torch
>>> send, recv = ActHistory(), ActHistory()
>>> kw = dict(bits=2, job="j", mb=0, kind="act")
>>> x = torch.linspace(-1, 1, 8).reshape(2, 4)
>>> ids = [7, 9]
>>> f0 = codec.from_bytes(codec.to_bytes(send.encode(x, ids, step=0, **kw)))
>>> f0.extra.get("delta", False), recv.decode(f0).shape
(False, torch.Size([2, 4]))
>>> f1 = codec.from_bytes(codec.to_bytes(send.encode(x + 0.01, ids, step=1, **kw)))
>>> f1.extra["delta"], bool(torch.equal(send.history(ids), (recv.decode(f1), recv.history(ids))[1]))
(True, True)
>>> round(float((recv.history(ids).float() - (x + 0.01)).abs().max()), 3) < 0.34
True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from . import codec

IDS_KEY, DELTA_KEY, BASE_KEY = "ids", "delta", "base"
SHAPE_KEY = codec.BATCH_SHAPE_KEY  # the codec counts a delta frame's labels against it
PLAIN_BITS = 8  # the least width of a delta-coded link's plain frames (no history to change)
ROW_BITS = 256  # code bits a delta frame's row holds at least when it is one sample's channel
_ID_MAX = 2**32 - 1


def pack_ids(ids: Sequence[int] | np.ndarray | torch.Tensor) -> bytes:
    """Sample ids as the wire carries them: uint32 little-endian, one per sample."""
    arr = np.asarray(ids.numpy() if isinstance(ids, torch.Tensor) else ids, dtype=np.int64)
    if arr.ndim != 1 or (arr.size and (arr.min() < 0 or arr.max() > _ID_MAX)):
        raise ValueError(f"sample ids must be a flat list of ints in [0, {_ID_MAX}]")
    return arr.astype("<u4").tobytes()


def change_view(shape: Sequence[int], bits: int) -> tuple[int, int]:
    """The 2-D view a delta frame carries an activation's change in, scaled per row (``axis``
    0): one row per sample and channel where a channel's ``rest`` holds at least
    ``ROW_BITS`` bits of codes (so its 8 bytes of ``lo``/``scale`` add at most a quarter),
    else one row per sample.

    >>> change_view((32, 16, 14, 14), 2), change_view((32, 64, 4, 4), 2)
    ((512, 196), (32, 1024))
    >>> change_view((32, 64, 4, 4), 8), change_view((32, 10), 2), change_view((5,), 2)
    ((32, 1024), (32, 10), (5, 1))
    """
    n = shape[0]
    per_channel = len(shape) >= 3 and math.prod(shape[2:]) * bits >= ROW_BITS
    rows = n * shape[1] if per_channel else n
    return rows, (math.prod(shape) // rows if rows else 0)


def frame_shape(frame: codec.TensorFrame, topic: str = "") -> tuple[int, ...]:
    """The shape of the activation ``frame`` carries: its own, or a delta frame's ``act_shape``
    extension, checked against the view the frame holds (``codec.FrameError`` if it lies)."""
    if not frame.extra.get(DELTA_KEY, False):
        return tuple(frame.shape)
    shape = frame.extra.get(SHAPE_KEY)
    if (not isinstance(shape, list | tuple) or not shape
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                       for d in shape)
            or change_view(shape, frame.bits) != tuple(frame.shape)):
        raise codec.FrameError(topic, f"a delta frame's '{SHAPE_KEY}' must be the activation "
                               f"shape whose change view is {list(frame.shape)}, got {shape!r}")
    return tuple(shape)


def unpack_ids(frame: codec.TensorFrame, key: str = IDS_KEY, topic: str = "") -> np.ndarray:
    """The per-sample uint32 extension ``key`` of ``frame``, checked against its batch size."""
    raw = frame.extra.get(key)
    shape = frame_shape(frame, topic)
    n = shape[0] if shape else 0
    if not isinstance(raw, bytes | bytearray) or len(raw) != 4 * n:
        raise codec.FrameError(topic, f"'{key}' must be {n} uint32 (4 * {n} bytes), one per "
                               f"sample of the frame")
    return np.frombuffer(raw, dtype="<u4").astype(np.int64)


class HistoryMismatch(codec.FrameError):
    """A delta frame whose history this end does not hold (``sample``: the first such one):
    the two ends are out of step until both reset."""

    def __init__(self, topic: str, reason: str, sample: int) -> None:
        super().__init__(topic, reason)
        self.sample = sample


class ActHistory:
    """One end of a delta-coded activation link: the last decoded activation of each sample.

    ``dtype``: what the history is kept in (float16 halves its memory; the quantisation step
    of a 2-8-bit delta is far coarser than float16's rounding).
    """

    def __init__(self, dtype: torch.dtype = torch.float16) -> None:
        self.dtype = dtype
        self._limit = float(torch.finfo(dtype).max)
        self._rows: dict[int, tuple[int, torch.Tensor]] = {}  # id -> (step set at, value)

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def nbytes(self) -> int:
        """Bytes the stored activations take (what the planner's memory model counts)."""
        return sum(v.numel() * v.element_size() for _, v in self._rows.values())

    def reset(self) -> None:
        """Forget every sample: the next frame of each is a plain one."""
        self._rows.clear()

    def history(self, ids: Sequence[int] | np.ndarray) -> torch.Tensor:
        """The stored activations of ``ids``, stacked (raises ``KeyError`` for one not held)."""
        return torch.stack([self._rows[int(i)][1] for i in ids])

    def _holds_all(self, ids: np.ndarray, shape: tuple[int, ...]) -> bool:
        rows = self._rows
        return len(ids) > 0 and all(
            (r := rows.get(int(i))) is not None and tuple(r[1].shape) == shape for i in ids)

    def _store(self, ids: np.ndarray, step: int, value: torch.Tensor) -> None:
        kept = value.clamp(-self._limit, self._limit).to(self.dtype)
        for i, row in zip(ids.tolist(), kept, strict=True):
            self._rows[i] = (step, row.clone())  # a clone: a view would pin the whole batch

    def encode(self, x: torch.Tensor, ids: Sequence[int] | np.ndarray | torch.Tensor, *,
               step: int, extra: dict[str, Any] | None = None,
               **kw: Any) -> codec.TensorFrame:
        """The frame for ``x`` (one row per id): a delta frame when every sample has history,
        else a plain one of at least ``PLAIN_BITS``; ``kw`` as ``codec.encode`` (``bits``,
        ``job``, ``mb``, ``kind``...).
        Updates this end's history with what the receiver will decode."""
        arr = np.asarray(ids.numpy() if isinstance(ids, torch.Tensor) else ids, np.int64)
        if len(arr) != x.shape[0]:
            raise ValueError(f"{len(arr)} sample ids for a batch of {x.shape[0]}")
        ext = dict(extra or {})
        ext[IDS_KEY] = pack_ids(arr)
        if self._holds_all(arr, tuple(x.shape[1:])):
            base = self.history(arr).to(torch.float32)
            ext[DELTA_KEY] = True
            ext[BASE_KEY] = pack_ids([self._rows[int(i)][0] for i in arr])
            ext[SHAPE_KEY] = list(x.shape)
            change = x.detach().to(torch.float32) - base
            # the caller's grid (a zero-aligned one, minmax0, measured worse: its widened grid
            # costs more than exact zeros save), one scale per sample and channel
            frame = codec.encode(change.reshape(change_view(x.shape, kw["bits"])), step=step,
                                 extra=ext,
                                 **{**kw, "axis": 0})
            self._store(arr, step, base + codec.decode(frame).reshape(x.shape))
        else:
            bits = max(kw.pop("bits"), PLAIN_BITS)
            frame = codec.encode(x, step=step, extra=ext, bits=bits, **kw)
            self._store(arr, step, codec.decode(frame))
        return frame

    def decode(self, frame: codec.TensorFrame, topic: str = "") -> torch.Tensor:
        """The activation ``frame`` carries (history plus change for a delta frame); updates
        this end's history. ``codec.FrameError`` for missing ids or a history mismatch."""
        ids = unpack_ids(frame, IDS_KEY, topic)
        value = codec.decode(frame)
        if not frame.extra.get(DELTA_KEY, False):
            self._store(ids, frame.step, value)
            return value
        bases = unpack_ids(frame, BASE_KEY, topic)
        full = frame_shape(frame, topic)
        value = value.reshape(full)
        shape = full[1:]
        for i, b in zip(ids.tolist(), bases.tolist(), strict=True):
            row = self._rows.get(i)
            if row is None or row[0] != b or tuple(row[1].shape) != shape:
                held = "none" if row is None else f"step {row[0]}"
                for j in ids.tolist():  # the sender must start these samples afresh
                    self._rows.pop(j, None)
                raise HistoryMismatch(
                    topic, f"delta frame for sample {i} against its history of step {b}, but "
                           f"this end holds {held}: history mismatch, frame dropped", i)
        out = self.history(ids).to(torch.float32) + value
        self._store(ids, frame.step, out)
        return out


class ErrorFeedback:
    """The sender of one link's k-bit gradients, with each slot's residual carried forward.

    >>> import torch
    >>> ef = ErrorFeedback()
    >>> g = torch.full((2, 3), 0.3)
    >>> f = ef.encode(g, slot=0, bits=2, job="j", step=0, mb=0, kind="grad")
    >>> r = ef.residual(0)
    >>> bool(torch.allclose(codec.decode(f) + r, g))  # what was lost is kept, not dropped
    True
    """

    def __init__(self) -> None:
        self._residual: dict[int, torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        return sum(r.numel() * r.element_size() for r in self._residual.values())

    def reset(self) -> None:
        """Drop every residual (a re-plan or a rewind: the next frames start afresh)."""
        self._residual.clear()

    def residual(self, slot: int) -> torch.Tensor | None:
        return self._residual.get(slot)

    def encode(self, g: torch.Tensor, *, slot: int, **kw: Any) -> codec.TensorFrame:
        """The frame for ``g`` plus slot ``slot``'s residual; ``kw`` as ``codec.encode``."""
        g = g.detach().to(torch.float32)
        r = self._residual.get(slot)
        if r is not None and r.shape == g.shape:
            g = g + r
        frame = codec.encode(g, **kw)
        self._residual[slot] = g - codec.decode(frame)
        return frame
