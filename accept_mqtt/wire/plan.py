"""The partition plan: which device runs which consecutive layers, with which link bit widths.

A ``Plan`` is what the coordinator publishes (retained, JSON) on ``{root}/jobs/{job}/plan``
and what every agent builds its stage from. It carries everything an agent needs to rebuild
its slice with the same initial weights as a one-process run (model name, arguments, seed),
so no weights travel at job start, and a fingerprint of every unit so an agent whose build
of the model differs can tell, and refuse the plan.

Guarantee: ``Plan.from_json(p.to_json()) == p``, and ``from_json`` rejects a plan whose
stages do not tile ``[0, num_layers)`` in order, with a message that says which stage.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import msgspec

from .codec import BITS_TEXT, MINMAX_BITS, VALID_BITS

MIN_MESSAGE_BYTES = 1024  # the smallest max_message_bytes a chunk's header leaves room in

SCHEDULES = ("gpipe", "1f1b")
GRAD_SCHEMES = ("minmax", "minmax0")  # codec schemes for k-bit gradients (docs/codec.md)


class PlanError(ValueError):
    pass


@dataclass(frozen=True)
class Stage:
    index: int
    device: str
    start: int  # first layer (inclusive)
    end: int  # last layer (exclusive)
    act_bits: int = 32  # bits of the activations this stage sends to stage index+1
    grad_bits: int = 32  # bits of the gradients this stage sends to stage index-1
    predicted_ms: float | None = None  # predicted fwd+bwd+send per micro-batch
    measured_ms: float | None = None
    # the activations this stage sends are delta-coded per training sample (wire/delta.py)
    act_delta: bool = False
    # the gradients this stage sends carry each step's quantisation residual into the next
    grad_feedback: bool = False


@dataclass(frozen=True)
class Plan:
    job: str
    version: int
    model: str
    num_layers: int
    stages: tuple[Stage, ...]
    seed: int = 0
    model_args: dict[str, Any] = field(default_factory=dict)
    micro_batches: int = 4
    schedule: str = "1f1b"
    # 1F1B: the most training micro-batches stage 0 has forwarded and not yet finished the
    # backward of; stage s keeps at most ``in_flight - s``, the last stage 1. At least the
    # stage count (textbook 1F1B); above it, stages forward ahead while gradients are on their
    # way (model/footprint.py counts the stash). None: the stage count (plans before it)
    in_flight: int | None = None
    optimizer: dict[str, Any] = field(default_factory=lambda: {"name": "sgd", "lr": 0.05})
    method: str = "flops"
    stochastic_grad_rounding: bool = True
    grad_scheme: str = "minmax0"  # k-bit gradients keep exact zeros exact (codec.minmax0)
    act_per_channel: bool = True  # k-bit feature maps get one scale per channel (codec)
    predicted_bottleneck_ms: float | None = None
    start_step: int = 0  # the optimizer step the stages start at (non-zero on resume)
    batch_size: int | None = None  # mini-batch size: what an agent sizes its memory by
    # one digest per unit of the model the coordinator built (model/fingerprint.py): an agent
    # whose own build differs refuses the plan; empty: not checked
    fingerprint: tuple[str, ...] = ()
    # the largest payload the job's peers publish: weights travel in chunks of at most this
    # (wire/chunks.py); None: the receiver's default (plans of earlier versions)
    max_message_bytes: int | None = None
    # the coordinator process that published it (``wire.liveness.instance_id``): a plan is
    # the one an agent runs only if version *and* owner match, so a resumed coordinator's
    # plan is taken even when its version equals the one a dead coordinator left behind
    owner: str | None = None
    # training samples in the data set: the most a delta-coded link's history holds (what an
    # agent sizes its memory by); None when no link is delta-coded
    train_samples: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not self.stages:
            raise PlanError("a plan needs at least one stage")
        if self.schedule not in SCHEDULES:
            raise PlanError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.grad_scheme not in GRAD_SCHEMES:
            raise PlanError(f"grad_scheme must be one of {GRAD_SCHEMES}, got "
                            f"{self.grad_scheme!r}")
        if self.micro_batches < 1:
            raise PlanError(f"micro_batches must be >= 1, got {self.micro_batches}")
        if self.in_flight is not None and (self.schedule != "1f1b"
                                           or self.in_flight < len(self.stages)):
            raise PlanError(f"in_flight must be None or, under 1f1b, at least the "
                            f"{len(self.stages)} stages; got {self.in_flight} under "
                            f"{self.schedule}")
        expect = 0
        devices = set()
        for i, s in enumerate(self.stages):
            if s.index != i:
                raise PlanError(f"stage {i} carries index {s.index}")
            if s.start != expect or s.end <= s.start:
                raise PlanError(
                    f"stage {i} covers layers [{s.start}, {s.end}) but must start at {expect} "
                    "and hold at least one layer"
                )
            if s.device in devices:
                raise PlanError(f"device {s.device!r} holds two stages")
            devices.add(s.device)
            for name in ("act_bits", "grad_bits"):
                b = getattr(s, name)
                if b not in VALID_BITS:
                    raise PlanError(f"stage {i} {name} must be {BITS_TEXT}, got {b}")
            why = link_option_refusal(s)
            if why is not None:
                raise PlanError(f"stage {i} {why}")
            expect = s.end
        if expect != self.num_layers:
            raise PlanError(f"stages end at layer {expect} but the model has {self.num_layers}")
        if self.max_message_bytes is not None and self.max_message_bytes < MIN_MESSAGE_BYTES:
            raise PlanError(f"max_message_bytes must be >= {MIN_MESSAGE_BYTES}, got "
                            f"{self.max_message_bytes}")
        if any(s.act_delta for s in self.stages[:-1]) and not self.train_samples:
            raise PlanError("a delta-coded link needs train_samples (the size of its history)")
        if self.fingerprint and len(self.fingerprint) != self.num_layers:
            raise PlanError(f"fingerprint has {len(self.fingerprint)} digests for "
                            f"{self.num_layers} layers")

    def layout(self, bits: bool = True) -> list[tuple[Any, ...]]:
        """Who holds which layers (with the link widths when ``bits``): what two plans are
        compared by to tell whether a re-plan moves anything."""
        return [(s.device, s.start, s.end,
                 *((s.act_bits, s.grad_bits, s.act_delta, s.grad_feedback) if bits else ()))
                for s in self.stages]

    def stage_of(self, device: str) -> Stage | None:
        for s in self.stages:
            if s.device == device:
                return s
        return None

    def deeper(self) -> int:
        """How far ``in_flight`` is above the stage count (0: textbook 1F1B, or GPipe)."""
        return 0 if self.in_flight is None else self.in_flight - len(self.stages)

    @property
    def devices(self) -> list[str]:
        return [s.device for s in self.stages]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["v"] = 1
        d["stages"] = [asdict(s) for s in self.stages]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        try:
            return msgspec.convert(d, cls)
        except msgspec.ValidationError as e:
            raise PlanError(f"bad plan: {e}") from None

    @classmethod
    def from_json(cls, text: str | bytes) -> Plan:
        """Parse and validate (field types, then how the stages tile the model) in one go:
        msgspec checks each field's type and runs ``validate`` through ``__post_init__``, so
        every rejection is one ``PlanError`` whose reason names the field or the stage."""
        try:
            return msgspec.json.decode(text, type=cls)
        except msgspec.ValidationError as e:
            raise PlanError(f"bad plan: {e}") from None
        except msgspec.DecodeError as e:
            raise PlanError(f"plan is not JSON: {e}") from None


def link_option_refusal(links: Any) -> str | None:
    """Why ``links`` (a ``Stage``, or anything with the same four attributes: the coordinator's
    settings) cannot carry its options, or None: delta coding (``act_delta``) and error
    feedback (``grad_feedback``) need their direction's width k-bit (1..8)."""
    for flag, name in (("act_delta", "act_bits"), ("grad_feedback", "grad_bits")):
        if getattr(links, flag) and getattr(links, name) not in MINMAX_BITS:
            return (f"{flag} needs {name} 1..8, got {getattr(links, name)}: a raw link "
                    "keeps no history or residual")
    return None


def cuts_to_stages(cuts: list[int], devices: list[str], act_bits: list[int] | None = None,
                   grad_bits: list[int] | None = None,
                   predicted_ms: list[float] | None = None,
                   act_delta: list[bool] | None = None,
                   grad_feedback: list[bool] | None = None) -> tuple[Stage, ...]:
    """Stages from cut points ``[0, c1, ..., L]`` and the device of each stage, in order."""
    k = len(devices)
    if len(cuts) != k + 1:
        raise PlanError(f"{k} devices need {k + 1} cut points, got {len(cuts)}")
    ab = act_bits or [32] * k
    gb = grad_bits or [32] * k
    ad = act_delta or [False] * k
    gf = grad_feedback or [False] * k
    return tuple(
        Stage(i, devices[i], cuts[i], cuts[i + 1], ab[i], gb[i],
              None if predicted_ms is None else float(predicted_ms[i]),
              act_delta=ad[i], grad_feedback=gf[i])
        for i in range(k)
    )
