"""Baselines the planner is compared with, scored by the same ``evaluate``.

* ``equal_split``: the same number of layers per stage, devices in the given order, all used.
* ``flops_split``: stage FLOPs as equal as possible, as if the devices were identical.
* ``dp_flops``: the exact DP fed only FLOPs (every device costs ``flops / const``, links free,
  fp32), the assignment then scored under the true costs — what a planner without a latency
  predictor or bandwidth knowledge would pick.
* ``ideal_bound_ms``: total work over total speed, no communication.

Guarantee: every baseline returns a ``PartitionResult`` whose numbers come from ``evaluate``
on the true problem (``feasible`` says whether it fits memory; baselines other than
``dp_flops`` do not look at memory). Its links carry exactly the widths asked for:
activations at ``bits``, gradients at ``grad_bits`` (default: ``bits``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from .cost import evaluate, ideal_bound_ms
from .dp import partition
from .problem import CodecCost, Device, PartitionProblem, PartitionResult, replace_problem

__all__ = ["dp_flops", "equal_split", "flops_split", "ideal_bound_ms", "proportional_cuts"]


def proportional_cuts(work: Sequence[float], shares: Sequence[float]) -> list[int]:
    """Cuts giving stage ``i`` the prefix of ``work`` closest to its share, >= 1 layer each.

    >>> proportional_cuts([1, 1, 1, 1], [1, 1])
    [0, 2, 4]
    """
    n, k = len(work), len(shares)
    if not 1 <= k <= n:
        raise ValueError(f"{k} stages need between 1 and {n} layers")
    pref = np.concatenate([[0.0], np.cumsum(np.asarray(work, dtype=np.float64))])
    sh = np.asarray(shares, dtype=np.float64)
    targets = np.cumsum(sh)[:-1] / sh.sum() * pref[-1]
    cuts = [0]
    for i, t in enumerate(targets):
        lo, hi = cuts[-1] + 1, n - (k - 1 - i)
        cuts.append(lo + int(np.argmin(np.abs(pref[lo:hi + 1] - t))))
    cuts.append(n)
    return cuts


def _fixed(p: PartitionProblem, cuts: list[int], bits: int, grad_bits: int | None,
           method: str, t0: float) -> PartitionResult:
    k = len(cuts) - 1
    ids = p.device_ids[:k]
    grad = bits if grad_bits is None else grad_bits
    return evaluate(p, ids, cuts, [bits] * k, [grad] * k, method=method,
                    plan_seconds=time.perf_counter() - t0)


def equal_split(p: PartitionProblem, bits: int = 32,
                grad_bits: int | None = None) -> PartitionResult:
    t0 = time.perf_counter()
    k = min(len(p.devices), p.num_layers)
    cuts = [round(i * p.num_layers / k) for i in range(k + 1)]
    return _fixed(p, cuts, bits, grad_bits, "equal", t0)


def flops_split(p: PartitionProblem, bits: int = 32,
                grad_bits: int | None = None) -> PartitionResult:
    if p.flops is None:
        raise ValueError("flops_split needs the problem's per-layer flops")
    t0 = time.perf_counter()
    k = min(len(p.devices), p.num_layers)
    return _fixed(p, proportional_cuts(p.flops, [1.0] * k), bits, grad_bits, "flops-equal",
                  t0)


def dp_flops(p: PartitionProblem, bits: int = 32) -> PartitionResult:
    if p.flops is None:
        raise ValueError("dp_flops needs the problem's per-layer flops")
    t0 = time.perf_counter()
    blind = replace_problem(
        p,
        devices=tuple(Device(d.id, d.memory_bytes, None, 0.0) for d in p.devices),
        compute_ms=np.tile(p.flops / 1e9, (len(p.devices), 1)),  # flops at 1 GFLOP/s, in s
        act_bits=(bits,), grad_bits=(bits,), min_act_bits=1, min_grad_bits=1,
        codec=CodecCost.free(),
    )
    r = partition(blind, method="dp-flops")
    out = evaluate(p, r.devices, r.cuts, [bits] * r.num_stages, [bits] * r.num_stages,
                   method="dp-flops")
    return replace(out, plan_seconds=time.perf_counter() - t0)
