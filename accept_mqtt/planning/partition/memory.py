"""Memory a stage needs on its device: weights, gradients, optimizer state and stashed activations.

Model (float32 everywhere, bytes):

* weights + gradients + optimizer state: ``4 * params * (2 + optimizer_slots)``;
* stash: the stage keeps, per micro-batch in flight, its input and every layer's output until
  that micro-batch's backward (``accept_mqtt.stage`` stashes exactly these), times
  ``activation_overhead`` for what autograd keeps beyond them. Micro-batches in flight: GPipe
  holds all ``M``; 1F1B holds ``min(K - k, M)`` at stage ``k`` of ``K``, i.e. ``min(r + 1, M)``
  where ``r = K - 1 - k`` is the number of stages after it.

Guarantee: ``stage_memory_bytes(p, a, b, r)`` equals ``memory_table(p, r)[a, b]`` bit for bit
for every ``0 <= a < b <= L`` (counts are integers, so prefix sums are exact below 2**53);
the table costs O(L^2) numpy work.
"""

from __future__ import annotations

import numpy as np

from .problem import PartitionProblem


def in_flight(p: PartitionProblem, stages_after: int) -> int:
    """Micro-batches whose activations a stage with ``stages_after`` later stages stashes."""
    if p.schedule == "gpipe":
        return p.micro_batches
    return min(stages_after + 1, p.micro_batches)


def _input_elems(p: PartitionProblem) -> np.ndarray:
    """Elements entering each cut position a = 0..L-1 (a stage starting at a stashes these)."""
    return np.concatenate([[float(p.input_elems)], p.out_elems[:-1]])


def memory_parts(p: PartitionProblem) -> tuple[np.ndarray, np.ndarray]:
    """``(static[a, b], per_microbatch[a, b])`` in bytes, (L+1) x (L+1), valid for a < b."""
    pp = np.concatenate([[0.0], np.cumsum(p.params)])
    po = np.concatenate([[0.0], np.cumsum(p.out_elems)])
    static = 4.0 * (2 + p.optimizer_slots) * (pp[None, :] - pp[:, None])
    inp = np.concatenate([_input_elems(p), [0.0]])
    act = 4.0 * p.activation_overhead * (inp[:, None] + po[None, :] - po[:, None])
    return static, act


def memory_table(p: PartitionProblem, stages_after: int) -> np.ndarray:
    static, act = memory_parts(p)
    return static + in_flight(p, stages_after) * act


def stage_memory_bytes(p: PartitionProblem, start: int, end: int, stages_after: int) -> float:
    """Bytes a stage holding layers ``[start, end)`` needs with ``stages_after`` stages after."""
    params = float(p.params[start:end].sum())
    inp = float(p.input_elems) if start == 0 else float(p.out_elems[start - 1])
    act = 4.0 * p.activation_overhead * (inp + float(p.out_elems[start:end].sum()))
    return 4.0 * (2 + p.optimizer_slots) * params + in_flight(p, stages_after) * act


def fits(p: PartitionProblem, device: int, need_bytes: float) -> bool:
    limit = p.devices[device].memory_bytes
    return limit is None or need_bytes <= limit
