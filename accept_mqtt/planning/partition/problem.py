"""What the partitioner is asked and what it answers: ``PartitionProblem`` -> ``PartitionResult``.

A problem is pure data (numpy arrays, no torch, no MQTT): per-device per-layer compute cost,
the size of the tensor after each layer, each device's memory and uplink, the bit widths the
accuracy policy allows, a codec cost model and the schedule. ``problem_from_profiles`` builds
one from what the coordinator has (cost-model fwd/bwd times, layer descriptors, device
profiles).

Guarantees:

* A constructed ``PartitionProblem`` is valid: shapes agree, costs are finite and >= 0, every
  bit width is 1..8, 16 or 32, and at least one act and one grad width meets the minimum.
* ``PartitionResult.stages()`` is a tuple of ``accept_mqtt.plan.Stage`` that a ``Plan``
  accepts (bit widths unused at the ends of the pipeline are 32).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

from accept_mqtt.model.footprint import MEMORY_FRACTION, RESERVED_MB
from accept_mqtt.wire.codec import BITS_TEXT, MINMAX_BITS, VALID_BITS
from accept_mqtt.wire.plan import Stage, cuts_to_stages

SCHEDULES = ("1f1b", "gpipe")


class InfeasiblePlanError(ValueError):
    """No assignment of layers to devices fits in memory; the message names the layer."""

    def __init__(self, message: str, layer: int | None = None) -> None:
        super().__init__(message)
        self.layer = layer


def _check_bits(bits: int, what: str) -> int:
    if bits not in VALID_BITS:
        raise ValueError(f"{what} must be {BITS_TEXT}, got {bits!r}")
    return int(bits)


@dataclass(frozen=True)
class Device:
    """One device: memory available to its stage (bytes) and its uplink (bits/s).

    ``None`` means unlimited. ``codec_scale`` multiplies the reference codec cost (2.0: this
    device encodes and decodes twice as slowly as the device the codec was timed on).
    """

    id: str
    memory_bytes: float | None = None
    bandwidth_bps: float | None = None
    codec_scale: float = 1.0


@dataclass(frozen=True)
class CodecCost:
    """ms per element to encode (on the sender) and decode (on the receiver), per bit width.

    Costs are for the reference device; ``Device.codec_scale`` scales them per device.
    """

    encode_ms_per_elem: Mapping[int, float]
    decode_ms_per_elem: Mapping[int, float]

    @classmethod
    def minmax(cls, encode_ms: float, decode_ms: float, raw16_ms: float = 0.0) -> CodecCost:
        """Same cost for every k-bit width 1..8, ``raw16_ms`` each way for 16, free for 32."""
        enc = {b: encode_ms for b in range(1, 9)} | {16: raw16_ms, 32: 0.0}
        dec = {b: decode_ms for b in range(1, 9)} | {16: raw16_ms, 32: 0.0}
        return cls(enc, dec)

    @classmethod
    def free(cls) -> CodecCost:
        return cls.minmax(0.0, 0.0, 0.0)

    def encode(self, bits: int) -> float:
        return self._get(self.encode_ms_per_elem, bits, "encode")

    def decode(self, bits: int) -> float:
        return self._get(self.decode_ms_per_elem, bits, "decode")

    @staticmethod
    def _get(table: Mapping[int, float], bits: int, what: str) -> float:
        if bits in table:
            return float(table[bits])
        if bits == 32:
            return 0.0
        raise ValueError(f"codec cost model has no {what} cost for {bits} bits")


# Rough defaults (ns per element on a laptop core for min-max quantise + bit-pack, and for
# unpack + affine); the bench calibrates its own. Compression is never free.
DEFAULT_CODEC = CodecCost.minmax(encode_ms=8e-6, decode_ms=4e-6, raw16_ms=1e-6)


@dataclass(frozen=True)
class PartitionProblem:
    """Everything the partitioner needs, per micro-batch.

    * ``compute_ms[d, l]``: forward + backward ms of layer ``l`` on device ``d`` for one
      micro-batch (row order = ``devices`` order).
    * ``out_elems[l]``: elements of the tensor after layer ``l`` for one micro-batch; the
      tensor crossing a cut after layer ``l`` (float32 in memory). The model input sent by the
      coordinator to stage 0 is not a partitioning decision and is not modelled as traffic;
      ``input_elems`` (per micro-batch) is only used for stage 0's stashed input in memory.
    * ``params[l]``: parameter count of layer ``l`` (float32).
    * ``act_bits`` / ``grad_bits``: candidate widths; only those ``>= min_act_bits`` /
      ``>= min_grad_bits`` are used (the accuracy policy).
    * ``optimizer_slots``: float32 tensors of optimizer state per parameter (SGD momentum: 1,
      Adam: 2, plain SGD: 0). Memory per stage = params x 4 B x (2 + slots) + stash.
    * ``fixed_order``: stages must follow ``devices`` order (any subsequence of it).
    * ``use_all_devices``: every device gets a stage (else the planner may leave some idle).
    * ``act_delta`` / ``grad_feedback``: every link's activations are delta-coded / its
      gradients carry error feedback (``wire/delta.py``): job-wide options, honoured on every
      link. They restrict the candidate widths of their direction to the k-bit ones (1..8: a
      raw link has nothing to code a change in or to feed back) and add their memory
      (``model/footprint.py``: history of ``train_samples`` rows at both ends, residuals at
      the gradient's sender) and codec work (``cost.py``). ``micro_batch_size``: samples per
      micro-batch, so ``out_elems / micro_batch_size`` is one sample's activation.
    """

    devices: tuple[Device, ...]
    compute_ms: np.ndarray
    out_elems: np.ndarray
    params: np.ndarray | None = None
    flops: np.ndarray | None = None
    layer_types: tuple[str, ...] | None = None
    input_elems: int = 0
    act_bits: tuple[int, ...] = (32,)
    grad_bits: tuple[int, ...] = (32,)
    min_act_bits: int = 1
    min_grad_bits: int = 1
    codec: CodecCost = field(default_factory=lambda: DEFAULT_CODEC)
    micro_batches: int = 4
    schedule: str = "1f1b"
    # 1F1B only: how far stage 0's in-flight bound is above the stage count (model/footprint)
    deeper: int = 0
    optimizer_slots: int = 1
    activation_overhead: float = 1.0
    snapshot_copies: int = 0  # copies of weights + optimizer state kept for rewinds
    codec_buffers: bool = False  # count one step's frames in and out (model/footprint.py)
    frame_overhead_bytes: int = 64
    # CPU ms to send or to receive one frame, whatever its size (serialising, the MQTT
    # client, system calls): what makes many small micro-batches dear. 0: not modelled.
    frame_cpu_ms: float = 0.0
    fixed_order: bool = False
    use_all_devices: bool = False
    act_delta: bool = False
    grad_feedback: bool = False
    train_samples: int = 0  # rows of a delta history: the training set's size
    micro_batch_size: int = 1

    def __post_init__(self) -> None:
        s = lambda k, v: object.__setattr__(self, k, v)
        s("devices", tuple(self.devices))
        ids = [d.id for d in self.devices]
        if not ids:
            raise ValueError("a partition problem needs at least one device")
        if len(set(ids)) != len(ids):
            raise ValueError(f"device ids must be unique, got {ids}")
        c = np.asarray(self.compute_ms, dtype=np.float64)
        if c.ndim != 2 or c.shape[0] != len(ids) or c.shape[1] < 1:
            raise ValueError(
                f"compute_ms must be (devices={len(ids)}, layers) ms, got shape {c.shape}")
        if not np.all(np.isfinite(c)) or np.any(c < 0):
            raise ValueError("compute_ms must be finite and >= 0")
        s("compute_ms", c)
        n = c.shape[1]
        for name in ("out_elems", "params", "flops"):
            v = getattr(self, name)
            if v is None:
                if name != "flops":
                    s(name, np.zeros(n, dtype=np.float64))
                continue
            a = np.asarray(v, dtype=np.float64)
            if a.shape != (n,) or np.any(a < 0) or not np.all(np.isfinite(a)):
                raise ValueError(f"{name} must be {n} finite values >= 0, got shape {a.shape}")
            s(name, a)
        if self.layer_types is not None:
            if len(self.layer_types) != n:
                raise ValueError(f"layer_types has {len(self.layer_types)} names for {n} layers")
            s("layer_types", tuple(self.layer_types))
        for name in ("act_bits", "grad_bits"):
            s(name, tuple(_check_bits(b, name) for b in getattr(self, name)))
        for name, flag in (("act", "act_delta"), ("grad", "grad_feedback")):
            if not getattr(self, f"allowed_{name}_bits"):
                k = " k-bit (1..8, for " + flag + ")" if getattr(self, flag) else ""
                raise ValueError(f"no{k} {name} bit width in {getattr(self, name + '_bits')} "
                                 f"is >= {getattr(self, 'min_' + name + '_bits')}")
        if self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {self.micro_batch_size}")
        if self.act_delta and self.train_samples < 1:
            raise ValueError("act_delta needs train_samples >= 1 (the rows of each link's "
                             f"delta history), got {self.train_samples}")
        for b in (*self.allowed_act_bits, *self.allowed_grad_bits):
            self.codec.encode(b), self.codec.decode(b)  # fail now, not mid-plan
        if self.micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {self.micro_batches}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.deeper < 0 or (self.deeper and self.schedule != "1f1b"):
            raise ValueError(f"deeper must be >= 0, and 0 unless the schedule is 1f1b, got "
                             f"{self.deeper} under {self.schedule}")
        if self.optimizer_slots < 0 or self.activation_overhead < 0 or self.snapshot_copies < 0:
            raise ValueError("optimizer_slots, activation_overhead and snapshot_copies must "
                             "be >= 0")

    @property
    def num_layers(self) -> int:
        return int(self.compute_ms.shape[1])

    @property
    def device_ids(self) -> list[str]:
        return [d.id for d in self.devices]

    @property
    def allowed_act_bits(self) -> tuple[int, ...]:
        """Candidate act widths meeting the policy (k-bit only with ``act_delta``), most bits
        first."""
        return _allowed(self.act_bits, self.min_act_bits, self.act_delta)

    @property
    def allowed_grad_bits(self) -> tuple[int, ...]:
        return _allowed(self.grad_bits, self.min_grad_bits, self.grad_feedback)

    def layer_name(self, layer: int) -> str:
        t = self.layer_types[layer] if self.layer_types is not None else None
        return f"layer {layer} ({t})" if t else f"layer {layer}"

    def index_of(self, device: str) -> int:
        try:
            return self.device_ids.index(device)
        except ValueError:
            raise ValueError(f"unknown device {device!r}; the problem has {self.device_ids}")\
                from None

    def subset(self, indices: Sequence[int]) -> PartitionProblem:
        """The same problem over ``devices[i] for i in indices`` (in that order)."""
        idx = list(indices)
        return _replace(self, devices=tuple(self.devices[i] for i in idx),
                        compute_ms=self.compute_ms[idx])


def _allowed(bits: tuple[int, ...], floor: int, kbit_only: bool) -> tuple[int, ...]:
    return tuple(sorted({b for b in bits if b >= floor and (b in MINMAX_BITS or not kbit_only)},
                        reverse=True))


def _replace(p: PartitionProblem, **changes: Any) -> PartitionProblem:
    kw = {f: getattr(p, f) for f in p.__dataclass_fields__}
    kw.update(changes)
    return PartitionProblem(**kw)


replace_problem = _replace


@dataclass(frozen=True)
class PartitionResult:
    """An assignment and its predicted steady-state cost (ms per micro-batch).

    ``stage_ms[i] = max(compute_ms[i], uplink_ms[i])``: stage ``i``'s compute (fwd+bwd plus
    codec work) and its uplink (activations out + gradients out) run concurrently, so the
    slower of the two paces the pipeline. ``bottleneck_ms = max(stage_ms)``.
    """

    devices: list[str]
    cuts: list[int]
    act_bits: list[int]
    grad_bits: list[int]
    stage_ms: list[float]
    bottleneck_ms: float
    method: str
    compute_ms: list[float] = field(default_factory=list)
    uplink_ms: list[float] = field(default_factory=list)
    memory_bytes: list[float] = field(default_factory=list)
    feasible: bool = True  # every stage fits its device's memory
    plan_seconds: float = 0.0
    act_delta: list[bool] = field(default_factory=list)  # per stage: its activations out
    grad_feedback: list[bool] = field(default_factory=list)  # per stage: its gradients out
    # 1F1B: how far stage 0's in-flight bound is above the stage count (memory.deepest);
    # ``memory_bytes`` counts the stash it allows
    deeper: int = 0

    @property
    def num_stages(self) -> int:
        return len(self.devices)

    def stages(self) -> tuple[Stage, ...]:
        return cuts_to_stages(list(self.cuts), list(self.devices), list(self.act_bits),
                              list(self.grad_bits), list(self.stage_ms),
                              list(self.act_delta) or None, list(self.grad_feedback) or None)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bottleneck_ms"] = float(self.bottleneck_ms) if math.isfinite(
            self.bottleneck_ms) else None
        return d


class LayerLike(Protocol):
    """What ``problem_from_profiles`` reads from a ``model.descriptors.LayerDescriptor``."""

    type: str
    flops: int
    params: int
    in_elems: int
    out_elems: int


def problem_from_profiles(
    device_ids: Sequence[str],
    fwd_ms: Sequence[Sequence[float]],
    bwd_ms: Sequence[Sequence[float]],
    descriptors: Sequence[LayerLike],
    micro_batch_size: int,
    profiles: Mapping[str, Mapping[str, Any]],
    *,
    act_bits: Sequence[int] = (32, 8, 4),
    grad_bits: Sequence[int] = (32, 8),
    min_act_bits: int = 8,
    min_grad_bits: int = 8,
    micro_batches: int = 4,
    schedule: str = "1f1b",
    optimizer_slots: int = 1,
    memory_fraction: float = MEMORY_FRACTION,
    reserved_mb: float = RESERVED_MB,
    codec: CodecCost = DEFAULT_CODEC,
    reference_gflops: float | None = None,
    **options: Any,
) -> PartitionProblem:
    """A problem from the coordinator's inputs.

    ``fwd_ms[d][l]``/``bwd_ms[d][l]``: predicted ms per micro-batch of layer ``l`` on device
    ``device_ids[d]``; ``descriptors``: per-sample layer descriptors (``describe(model)``);
    ``profiles[id]``: the device profile (``memory_mb``, ``memory_limit_mb``,
    ``bandwidth_bps``, ``bench_gflops``). Memory for a stage: the agent's advertised
    ``memory_limit_mb`` (``--memory-limit``, or what it has less a margin); from a profile
    without one, ``memory_mb * memory_fraction - reserved_mb`` (the runtime's own share).
    The codec scale of a device is ``reference_gflops / bench_gflops`` when both are
    known (else 1). ``options`` go to ``PartitionProblem`` (e.g. ``fixed_order=True``).
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    devs = []
    for i in device_ids:
        prof = profiles.get(i, {})
        mem, limit = prof.get("memory_mb"), prof.get("memory_limit_mb")
        mem_b = None if mem is None else max(0.0, (mem * memory_fraction - reserved_mb) * 2**20)
        if limit is not None:
            mem_b = float(limit) * 2**20
        bw = prof.get("bandwidth_bps") or None
        g = prof.get("bench_gflops")
        scale = reference_gflops / g if reference_gflops and g else 1.0
        devs.append(Device(i, mem_b, bw, scale))
    compute = np.asarray(fwd_ms, dtype=np.float64) + np.asarray(bwd_ms, dtype=np.float64)
    return PartitionProblem(
        devices=tuple(devs),
        compute_ms=compute,
        out_elems=np.array([d.out_elems * micro_batch_size for d in descriptors], np.float64),
        params=np.array([d.params for d in descriptors], np.float64),
        flops=np.array([d.flops * micro_batch_size for d in descriptors], np.float64),
        layer_types=tuple(d.type for d in descriptors),
        input_elems=int(descriptors[0].in_elems * micro_batch_size) if descriptors else 0,
        micro_batch_size=micro_batch_size,
        act_bits=tuple(act_bits), grad_bits=tuple(grad_bits),
        min_act_bits=min_act_bits, min_grad_bits=min_grad_bits,
        codec=codec, micro_batches=micro_batches, schedule=schedule,
        optimizer_slots=optimizer_slots, **options,
    )
