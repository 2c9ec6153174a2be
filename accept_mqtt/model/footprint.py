"""Training memory of one pipeline stage: what a device must hold to run layers ``[a, b)``.

Model (float32 everywhere, bytes; element counts are per micro-batch):

* weights and gradients: ``4 * P`` each, ``P`` the stage's parameter count;
* optimizer state: ``4 * P * slots`` (SGD with momentum: 1, plain SGD: 0, Adam: 2);
* snapshots: the agent keeps the stage's weights and optimizer state at the start of the
  current and the previous step, for rewinds (``device_agent.agent``): ``copies * 4 * P *
  (1 + slots)``, ``copies = 2`` (0 in a bare partition problem);
* stash: per micro-batch in flight, the stage input and every layer's output (what
  ``stage.StageRunner`` keeps for the backward), times ``activation_overhead``; micro-batches
  in flight: GPipe all ``M``; 1F1B ``min(stages_after + 1 + deeper, M)``, where ``deeper``
  is how far the plan's ``in_flight`` (stage 0's bound) is above the number of stages (0 is
  textbook 1F1B), except the last stage, which runs each micro-batch's
  backward right after its forward and so holds 1 (``device_agent.agent`` enforces every
  stage's bound);
* codec buffers, counted at 32 bits (an upper bound for every width, so the choice of widths
  never changes whether a stage fits): a step's ``M`` activation frames in and its ``M`` out
  (not on the last stage), which may all be queued at once, and one gradient frame each way
  (in: not on the last stage; out: not on the first), decoded or encoded one at a time;
* delta history (``wire.delta.ActHistory``, float16): a delta-coded activation link keeps,
  at *both* its ends, the last decoded activation of every training sample, so a stage counts
  ``2 * train_samples * e`` bytes for each delta-coded link it is an end of (its incoming one:
  not on the first stage; its outgoing one: not on the last), ``e`` the elements of one
  sample's activation at that cut. After one epoch every sample is held: the figure is what
  ``ActHistory.nbytes`` reaches, not a bound that grows;
* error feedback (``wire.delta.ErrorFeedback``, float32): the sender of error-feedback
  gradients (not the first stage) keeps one residual per micro-batch slot, the size of that
  micro-batch's gradient frame: ``4 * micro_batches * in_elems`` (the largest micro-batch's
  size for each slot: a bound when the last micro-batch is smaller).

Counted: tensor data only, so that the model is exact and the same on every machine. Not
counted (left to the runtime's own share, ``RESERVED_MB``): Python objects and allocator
slack. For a delta history that is ``ActHistory``'s dict entry, tuple and tensor object per
sample: measured about 730 bytes per sample beyond the data (process RSS over 50,000 rows of
4 elements, CPython 3.11, torch 2.13 CPU), i.e. some 44 MB for 60,000 samples at each end of
each delta-coded link, whatever the cut's size; the error-feedback residuals are one tensor
per micro-batch (negligible overhead).

Guarantees: pure arithmetic (no torch); ``stage_footprint(...).total`` is the number the
planner's tables (``planning.partition.memory``) hold for the same stage, bit for bit, so a
plan the planner made fits the agent's check and vice versa. ``parse_bytes`` reads
``--memory-limit`` values and names what it cannot read.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

HISTORY_BYTES = 2  # per element of a delta link's history: float16 (ActHistory's default)
FEEDBACK_BYTES = 4  # per element of an error-feedback residual: float32
SNAPSHOT_COPIES = 2  # start of the current and of the previous step (device_agent.agent)
MIB = float(2**20)
# what a stage may use of a device by default: the rest is the runtime's own (OS, Python,
# torch, the MQTT client); the agent's default limit and the planner's fallback both use it
MEMORY_FRACTION, RESERVED_MB = 0.8, 300.0


def optimizer_slots(cfg: Mapping[str, Any]) -> int:
    """float32 tensors of optimizer state per parameter for the plan's ``optimizer`` dict."""
    if cfg.get("name", "sgd") == "adam":
        return 2
    return 1 if float(cfg.get("momentum", 0.9)) != 0.0 else 0


def in_flight(schedule: str, micro_batches: int, stages_after: int, deeper: int = 0) -> int:
    """Micro-batches whose activations a stage with ``stages_after`` later stages stashes;
    under 1F1B ``deeper`` is how far the plan's ``in_flight`` is above its stage count."""
    if schedule == "gpipe":
        return micro_batches
    if stages_after == 0:
        return 1
    return min(stages_after + 1 + deeper, micro_batches)


def static_factor(slots: int, snapshot_copies: int) -> float:
    """Bytes per parameter: weights, gradients, optimizer state and snapshots."""
    return 4.0 * (2 + slots + snapshot_copies * (1 + slots))


def codec_elems(in_elems: float, out_elems: float, micro_batches: int, first: bool,
                last: bool) -> float:
    """Elements of the frames a stage may hold at once, in and out (module docstring)."""
    return in_elems * (micro_batches + (not first)) + out_elems * ((micro_batches + 1)
                                                                   * (not last))


@dataclass(frozen=True)
class StageFootprint:
    """Bytes one stage needs, by part; ``total`` is what is compared with the limit."""

    params: float  # weights + gradients + optimizer state + snapshots
    stash: float
    codec: float
    per_layer: tuple[float, ...]  # each layer's parameters and stashed output (+ input)
    history: float = 0.0  # delta history of the delta-coded links this stage is an end of
    feedback: float = 0.0  # error-feedback residuals of the gradients it sends

    @property
    def total(self) -> float:
        return self.params + self.stash + self.codec + self.history + self.feedback

    def largest_layer(self) -> int:
        """Offset in the stage of the layer that holds the most."""
        return max(range(len(self.per_layer)), key=self.per_layer.__getitem__)

    def text(self) -> str:
        return (f"{self.total / MIB:.3f} MiB ({self.total:.0f} bytes: parameters, gradients, "
                f"optimizer state and snapshots {self.params:.0f}, stashed activations "
                f"{self.stash:.0f}, codec buffers {self.codec:.0f}"
                + (f", delta history {self.history:.0f}" if self.history else "")
                + (f", error feedback {self.feedback:.0f}" if self.feedback else "") + ")")


def history_bytes(train_samples: int, delta_in_elems: float, delta_out_elems: float) -> float:
    """Bytes of delta history at one stage: ``delta_in_elems`` / ``delta_out_elems`` are the
    elements of one sample's activation on its delta-coded incoming / outgoing link (0: that
    link is not delta-coded, or there is none)."""
    return HISTORY_BYTES * float(train_samples) * (float(delta_in_elems)
                                                   + float(delta_out_elems))


def feedback_bytes(micro_batches: int, in_elems: float) -> float:
    """Bytes of the error-feedback residuals of a stage whose input (and so the gradient it
    sends back) has ``in_elems`` elements per micro-batch."""
    return FEEDBACK_BYTES * float(micro_batches) * float(in_elems)


def stage_footprint(params: Sequence[float], in_elems: float, out_elems: Sequence[float], *,
                    in_flight: int, micro_batches: int, optimizer_slots: int, first: bool,
                    last: bool, snapshot_copies: int = SNAPSHOT_COPIES,
                    activation_overhead: float = 1.0, codec: bool = True,
                    train_samples: int = 0, delta_in_elems: float = 0.0,
                    delta_out_elems: float = 0.0,
                    grad_feedback: bool = False) -> StageFootprint:
    """The footprint of a stage whose layers have ``params`` and ``out_elems`` (per
    micro-batch) and whose input has ``in_elems`` (see the module docstring).

    ``delta_in_elems`` / ``delta_out_elems``: elements of *one sample's* activation on the
    stage's incoming / outgoing link when that link is delta-coded (0 otherwise; ignored on
    the first / last stage, which has no such link); ``train_samples``: the history's rows.
    ``grad_feedback``: the gradients this stage sends carry error feedback."""
    if len(params) != len(out_elems) or not params:
        raise ValueError("a stage needs one params and one out_elems entry per layer, >= 1")
    k = static_factor(optimizer_slots, snapshot_copies)
    static = k * float(sum(params))
    act = 4.0 * activation_overhead * (float(in_elems) + float(sum(out_elems)))
    frames = 4.0 * codec_elems(in_elems, out_elems[-1], micro_batches, first, last) \
        if codec else 0.0
    per = [k * p + in_flight * 4.0 * activation_overhead * o
           for p, o in zip(params, out_elems, strict=True)]
    per[0] += in_flight * 4.0 * activation_overhead * in_elems
    hist = history_bytes(train_samples, 0.0 if first else delta_in_elems,
                         0.0 if last else delta_out_elems)
    fb = feedback_bytes(micro_batches, in_elems) if grad_feedback and not first else 0.0
    return StageFootprint(static, in_flight * act, frames, tuple(per), hist, fb)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """``512MB``, ``1.5G``, ``300KiB``, ``1048576``: bytes (K, M, G, T are powers of 1024,
    as memory sizes usually are). ``ValueError`` naming the text otherwise."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"cannot read memory size {text!r}: use e.g. 512MB, 1.5GB, 300KiB")
    power = " KMGT".index(m.group(2).upper() or " ")
    value = float(m.group(1)) * 1024**power
    if not math.isfinite(value) or value < 1:
        raise ValueError(f"memory size {text!r} must be at least 1 byte")
    return int(value)
