"""Memory a stage needs on its device: the model of ``accept_mqtt.model.footprint``, as tables.

Parameters, gradients, optimizer state (``optimizer_slots``), the agent's snapshots
(``snapshot_copies``), the activations stashed for the schedule and micro-batch count
(GPipe holds all ``M``; 1F1B holds ``min(r + 1 + deeper, M)`` at a stage with ``r > 0``
stages after it and 1 at the last, times ``activation_overhead``), with ``codec_buffers``
the frames it may hold at once, with ``act_delta`` the delta history at both ends of every
link (``train_samples`` float16 rows) and with ``grad_feedback`` the error-feedback residuals
at each gradient's sender.
A bare ``PartitionProblem`` counts no snapshots and no frames; ``problem_from_profiles`` (what
the coordinator plans with) counts both, as the agent's own check does.

Guarantee: ``stage_memory_bytes(p, a, b, r)`` equals ``memory_table(p, r)[a, b]`` bit for bit
for every ``0 <= a < b <= L`` (counts are integers, so prefix sums are exact below 2**53), and
both equal ``model.footprint.stage_footprint(...).total`` for that stage; the table costs
O(L^2) numpy work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from accept_mqtt.model import footprint

from .problem import PartitionProblem


def in_flight(p: PartitionProblem, stages_after: int) -> int:
    """Micro-batches whose activations a stage with ``stages_after`` later stages stashes."""
    return footprint.in_flight(p.schedule, p.micro_batches, stages_after, p.deeper)


def _input_elems(p: PartitionProblem) -> np.ndarray:
    """Elements entering each cut position a = 0..L-1 (a stage starting at a stashes these)."""
    return np.concatenate([[float(p.input_elems)], p.out_elems[:-1]])


def memory_parts(p: PartitionProblem) -> tuple[np.ndarray, np.ndarray]:
    """``(static[a, b], per_microbatch[a, b])`` in bytes, (L+1) x (L+1), valid for a < b."""
    pp = np.concatenate([[0.0], np.cumsum(p.params)])
    po = np.concatenate([[0.0], np.cumsum(p.out_elems)])
    k = footprint.static_factor(p.optimizer_slots, p.snapshot_copies)
    static = k * (pp[None, :] - pp[:, None])
    inp = np.concatenate([_input_elems(p), [0.0]])
    act = 4.0 * p.activation_overhead * (inp[:, None] + po[None, :] - po[:, None])
    return static, act


def codec_table(p: PartitionProblem) -> np.ndarray:
    """Bytes of one step's frames through a stage ``[a, b)``, (L+1) x (L+1); 0 without
    ``codec_buffers``."""
    n = p.num_layers
    if not p.codec_buffers:
        return np.zeros((n + 1, n + 1))
    inp = np.concatenate([_input_elems(p), [0.0]])
    out = np.concatenate([[0.0], p.out_elems])  # out[b]: the tensor after layer b - 1
    m = p.micro_batches
    first = np.arange(n + 1) == 0
    last = np.arange(n + 1) == n
    return 4.0 * ((inp * (m + ~first))[:, None] + (out * ((m + 1) * ~last))[None, :])


def _delta_elems(p: PartitionProblem, start: int, end: int) -> tuple[float, float]:
    """One sample's elements on the stage's delta-coded incoming and outgoing links (0 where
    the link is not delta-coded or there is none: the first stage's input is the
    coordinator's, the last stage sends no activation)."""
    if not p.act_delta:
        return 0.0, 0.0
    n, m = p.num_layers, float(p.micro_batch_size)
    return (float(p.out_elems[start - 1]) / m if start > 0 else 0.0,
            float(p.out_elems[end - 1]) / m if end < n else 0.0)


def option_tables(p: PartitionProblem) -> tuple[np.ndarray, np.ndarray]:
    """``(history[a, b], feedback[a, b])``: bytes of the link options' state through a stage
    ``[a, b)``, (L+1) x (L+1): delta history (``act_delta``) and error-feedback residuals
    (``grad_feedback``); zeros without them."""
    n = p.num_layers
    zero = np.zeros(n + 1)
    # one sample's elements at inner cut c (cuts 0 and L carry no link between stages)
    d = np.concatenate([[0.0], p.out_elems[:-1] / float(p.micro_batch_size), [0.0]]) \
        if p.act_delta else zero
    hist = footprint.HISTORY_BYTES * float(p.train_samples) * (d[:, None] + d[None, :])
    inp = np.concatenate([_input_elems(p), [0.0]])
    fb = np.where(np.arange(n + 1) > 0,
                  footprint.FEEDBACK_BYTES * float(p.micro_batches) * inp, 0.0) \
        if p.grad_feedback else zero
    return hist, np.broadcast_to(fb[:, None], hist.shape)


def memory_table(p: PartitionProblem, stages_after: int) -> np.ndarray:
    static, act = memory_parts(p)
    hist, fb = option_tables(p)
    # summed in the order of ``StageFootprint.total``, so the two agree bit for bit
    return static + in_flight(p, stages_after) * act + codec_table(p) + hist + fb


def stage_footprint(p: PartitionProblem, start: int, end: int,
                    stages_after: int) -> footprint.StageFootprint:
    """The stage's footprint, by part (``model.footprint``)."""
    inp = float(p.input_elems) if start == 0 else float(p.out_elems[start - 1])
    din, dout = _delta_elems(p, start, end)
    return footprint.stage_footprint(
        [float(x) for x in p.params[start:end]], inp,
        [float(x) for x in p.out_elems[start:end]], in_flight=in_flight(p, stages_after),
        micro_batches=p.micro_batches, optimizer_slots=p.optimizer_slots, first=start == 0,
        last=end == p.num_layers, snapshot_copies=p.snapshot_copies,
        activation_overhead=p.activation_overhead, codec=p.codec_buffers,
        train_samples=p.train_samples, delta_in_elems=din, delta_out_elems=dout,
        grad_feedback=p.grad_feedback)


def stage_memory_bytes(p: PartitionProblem, start: int, end: int, stages_after: int) -> float:
    """Bytes a stage holding layers ``[start, end)`` needs with ``stages_after`` stages after."""
    return stage_footprint(p, start, end, stages_after).total


def stage_needs(p: PartitionProblem, cuts: Sequence[int]) -> list[float]:
    """Bytes each stage of the assignment with these cuts needs (``stage_memory_bytes``)."""
    k = len(cuts) - 1
    return [stage_memory_bytes(p, cuts[i], cuts[i + 1], k - 1 - i) for i in range(k)]


def first_unfit(p: PartitionProblem, devices: Sequence[str],
                need: Sequence[float]) -> int | None:
    """The first stage whose ``need`` is over its device's memory limit, or None."""
    return next((i for i, d in enumerate(devices) if not fits(p, p.index_of(d), need[i])),
                None)


def deepest(p: PartitionProblem, cuts: Sequence[int], devices: Sequence[str]) -> int:
    """The largest ``deeper`` (0 .. ``M - 2``) at which every stage of this assignment still
    fits its device: how far the stages may run ahead of textbook 1F1B. At ``M - 2`` every
    stage but the last may hold all ``M`` micro-batches (stage ``s`` holds ``min(M, stages -
    s + deeper)``), so more changes nothing. Deeper only adds stash, so this is the memory's
    whole say; 0 under GPipe (which holds all ``M`` already) or when even 0 does not fit (the
    caller's feasibility check reports that)."""
    if p.schedule != "1f1b":
        return 0
    for e in range(max(0, p.micro_batches - 2), 0, -1):
        q = replace(p, deeper=e)
        if first_unfit(q, devices, stage_needs(q, cuts)) is None:
            return e
    return 0


def fits(p: PartitionProblem, device: int, need_bytes: float) -> bool:
    limit = p.devices[device].memory_bytes
    return limit is None or need_bytes <= limit
