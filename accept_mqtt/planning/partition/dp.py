"""The planner: exact min-max dynamic programming over cuts, device order and bit widths.

Why a DP over device *subsets* is exact: under the cost model (``cost.py``) a stage's time
depends only on its device, its layers ``[a, b)``, the bit choices at its two cuts and — for
1F1B memory — how many stages come after it. None of these depend on *which* devices are its
neighbours. So, with ``F[S][a, c]`` the best bottleneck of running layers ``[a, L)`` on exactly
the device set ``S`` (in the best order) when cut ``a`` carries choice ``c`` (act, grad bits):

    F[{}][L, c] = 0
    F[S][a, c]  = min over d in S, b > a, c' of max(cost_d(a, c, b, c'), F[S - d][b, c'])

with ``cost_d = inf`` where ``[a, b)`` does not fit ``d`` with ``|S| - 1`` stages after it.
The answer is ``min_S F[S][0, .]`` (or ``F[all]`` with ``use_all_devices``; with the
mini-batch objective ``min_S (M + |S| - 1) F[S][0, .]``). This covers
every ordered subset of devices, every cut and every per-cut (act, grad) choice, exactly like
brute force over permutations x cuts x bits, in ``O(2^N * N * L^2 * C^2)`` numpy work
(C = allowed act widths x allowed grad widths) instead of ``O(N! * L^(N-1) * C^(N-1))``.

Guarantees:

* ``partition`` returns an assignment that fits memory and whose ``evaluate`` bottleneck is
  the optimum over all assignments (up to ``exact_max_devices`` devices); its bit widths are
  then raised greedily (cut by cut, act then grad) to the largest allowed ones that keep that
  bottleneck, so accuracy is not given away for nothing.
* With no feasible assignment it raises ``InfeasiblePlanError`` naming a layer.
* Beyond ``exact_max_devices`` it is a documented heuristic (``method="dp-heuristic"``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from .cost import Choice, choices, device_tables, evaluate, memory_mask, stage_cost_array
from .memory import fits, in_flight, stage_footprint, stage_memory_bytes
from .problem import InfeasiblePlanError, PartitionProblem, PartitionResult

EXACT_MAX_DEVICES = 10
OBJECTIVES = ("steady", "minibatch")


@dataclass
class _Solution:
    value: float  # objective value (steady: bottleneck ms; minibatch: (M + K - 1) x that)
    order: list[int]  # device indices, pipeline order
    cuts: list[int]
    cut_choice: list[Choice]  # choice at cut s+1 for stage s (last entry unused)
    suffix_ok: np.ndarray  # suffix [a, L) placeable on some set


def _popcount(x: int) -> int:
    return bin(x).count("1")


class _Costs:
    """Stage cost arrays per device (cached within a memory budget) and memory masks per
    (device, micro-batches in flight)."""

    BUDGET_BYTES = 256 * 2**20

    def __init__(self, p: PartitionProblem, cand: Sequence[Choice]) -> None:
        self.p = p
        self.cand = cand
        n1, c = p.num_layers + 1, len(cand)
        self.cache_base = len(p.devices) * (n1 * c) ** 2 * 8 <= self.BUDGET_BYTES
        self._base: dict[int, np.ndarray] = {}
        self._masks: dict[tuple[int, int], np.ndarray | None] = {}

    def base(self, d: int) -> np.ndarray:
        if d in self._base:
            return self._base[d]
        arr = stage_cost_array(device_tables(self.p, d, self.cand))
        if self.cache_base:
            self._base[d] = arr
        return arr

    def mask(self, d: int, stages_after: int) -> np.ndarray | None:
        """(L+1, 1, L+1, 1) True where the stage does *not* fit, None when everything fits."""
        key = (d, in_flight(self.p, stages_after))
        if key not in self._masks:
            m = memory_mask(self.p, d, stages_after)
            self._masks[key] = None if m is None else ~m[:, None, :, None]
        return self._masks[key]


def objective_weight(p: PartitionProblem, stages: int, objective: str) -> float:
    """Multiplier of the bottleneck: 1 (steady state) or ``M + K - 1`` micro-batch slots per
    mini-batch with a flush (fill and drain, GPipe/1F1B synchronous)."""
    return 1.0 if objective == "steady" else float(p.micro_batches + stages - 1)


def _solve(p: PartitionProblem, masks: Iterable[int] | None = None,
           objective: str = "steady") -> _Solution:
    """The subset DP over ``masks`` (all subsets by default; each mask minus its chosen
    device must come earlier in the iteration). ``value`` is inf when nothing fits."""
    n, L = len(p.devices), p.num_layers
    cand = choices(p)
    c = len(cand)
    costs = _Costs(p, cand)
    size = 1 << n
    dp = np.full((size, L + 1, c), np.inf)
    dp[0, L, :] = 0.0
    arg_d = np.full((size, L + 1, c), -1, dtype=np.int32)
    arg_j = np.zeros((size, L + 1, c), dtype=np.int64)
    done = np.zeros(size, dtype=bool)
    done[0] = True
    for s in masks if masks is not None else range(1, size):
        k = _popcount(s)
        if k > L:
            continue
        bits = [d for d in range(n) if s >> d & 1]
        for d in bits[:1] if p.fixed_order else bits:
            rest = s ^ (1 << d)
            if not done[rest]:
                continue
            prev = dp[rest]
            if not np.isfinite(prev).any():
                continue
            cand_v = np.maximum(costs.base(d), prev[None, None])
            bad = costs.mask(d, k - 1)
            if bad is not None:
                np.copyto(cand_v, np.inf, where=bad)
            cand_v = cand_v.reshape(L + 1, c, -1)
            j = cand_v.argmin(axis=2)
            v = np.take_along_axis(cand_v, j[..., None], axis=2)[..., 0]
            better = v < dp[s]
            dp[s][better] = v[better]
            arg_d[s][better] = d
            arg_j[s][better] = j[better]
        done[s] = True
    suffix_ok = np.isfinite(dp[1:]).any(axis=(0, 2)) if size > 1 else np.zeros(L + 1, bool)
    if p.use_all_devices:
        best = size - 1
    else:
        vals = dp[:, 0, 0].copy()
        if objective != "steady":  # exact: for a fixed K the best bottleneck is best
            vals[1:] *= [objective_weight(p, _popcount(s), objective) for s in range(1, size)]
        vals[0] = np.inf
        lo = vals.min()
        tied = [s for s in range(1, size) if np.isfinite(lo) and vals[s] <= lo]
        best = min(tied, key=lambda s: (_popcount(s), s)) if tied else 1
    value = float(dp[best, 0, 0]) * objective_weight(p, _popcount(best), objective)
    if not np.isfinite(value):
        return _Solution(value, [], [], [], suffix_ok)
    order, cuts, chosen = [], [0], []
    s, a, ka = best, 0, 0
    while a < L:
        d = int(arg_d[s, a, ka])
        b, kb = divmod(int(arg_j[s, a, ka]), c)
        order.append(d)
        cuts.append(b)
        chosen.append(cand[kb])
        s, a, ka = s ^ (1 << d), b, kb
    return _Solution(value, order, cuts, chosen, suffix_ok)


def _suffix_masks(n: int) -> list[int]:
    """Sets {n-k, ..., n-1}: with fixed order and all devices, the only ones reachable."""
    return [((1 << k) - 1) << (n - k) for k in range(1, n + 1)]


def _to_result(p: PartitionProblem, sol: _Solution, method: str) -> PartitionResult:
    k = len(sol.order)
    act = [sol.cut_choice[s][0] for s in range(k - 1)] + [32]
    grad = [32] + [sol.cut_choice[s - 1][1] for s in range(1, k)]
    ids = [p.devices[d].id for d in sol.order]
    return evaluate(p, ids, sol.cuts, act, grad, method=method)


def raise_bits(p: PartitionProblem, res: PartitionResult) -> PartitionResult:
    """Raise each link's act then grad width to the largest allowed one that keeps the
    bottleneck (and memory feasibility), cut by cut from the front: no accuracy lost for
    nothing."""
    act, grad = list(res.act_bits), list(res.grad_bits)
    limit = res.bottleneck_ms
    for s in range(res.num_stages - 1):
        for widths, pos, allowed in ((act, s, p.allowed_act_bits),
                                     (grad, s + 1, p.allowed_grad_bits)):
            for b in allowed:  # most bits first
                if b <= widths[pos]:
                    break
                old, widths[pos] = widths[pos], b
                r = evaluate(p, res.devices, res.cuts, act, grad)
                if r.bottleneck_ms <= limit:  # bits do not change memory (stash is fp32)
                    break
                widths[pos] = old
    return evaluate(p, res.devices, res.cuts, act, grad, method=res.method)


def _options_note(p: PartitionProblem) -> str:
    """What the link options add to every stage they touch, for an infeasible plan's error."""
    parts = []
    if p.act_delta:
        parts.append(f"delta history: {p.train_samples} samples x 2 bytes per activation "
                     f"value at both ends of every cut (act_delta)")
    if p.grad_feedback:
        parts.append(f"error feedback: {p.micro_batches} micro-batches x 4 bytes per gradient "
                     f"value at each gradient's sender (grad_feedback)")
    return f"; the link options add {' and '.join(parts)}" if parts else ""


def _diagnose(p: PartitionProblem, suffix_ok: np.ndarray) -> InfeasiblePlanError:
    L = p.num_layers
    mib = 2.0**20
    biggest = max(range(len(p.devices)),
                  key=lambda d: np.inf if p.devices[d].memory_bytes is None
                  else p.devices[d].memory_bytes)
    cap = p.devices[biggest].memory_bytes
    for layer in range(L):
        # what any stage holding this layer needs for it (its own share, a lower bound)
        need = stage_footprint(p, layer, layer + 1, 0).per_layer[0]
        if not any(fits(p, d, need) for d in range(len(p.devices))):
            return InfeasiblePlanError(
                f"{p.layer_name(layer)} cannot be placed: it alone needs {need / mib:.3f} MiB "
                f"({need:.0f} bytes: weights, gradients, optimizer state, snapshots, "
                f"{in_flight(p, 0)} stashed micro-batch(es) of its output) but the largest "
                f"device memory is {(cap or 0) / mib:.3f} MiB ({cap or 0:.0f} bytes, "
                f"{p.devices[biggest].id})" + _options_note(p), layer=layer)
    fit_from = [a for a in range(1, L + 1) if suffix_ok[a]]
    first = min(fit_from) if fit_from else L
    layer = first - 1
    extra = " with every device in use" if p.use_all_devices else ""
    return InfeasiblePlanError(
        f"{p.layer_name(layer)} cannot be placed{extra}: layers {first}..{L - 1} fit on the "
        f"devices but no device has memory left for layer {layer} and the layers before it "
        f"(the whole model needs {stage_memory_bytes(p, 0, L, 0):.0f} bytes on one device; "
        f"total memory {sum(d.memory_bytes or 0 for d in p.devices) / mib:.3f} MiB)"
        + _options_note(p), layer=layer)


def _heuristic_sets(p: PartitionProblem, m: int) -> list[list[int]]:
    """Candidate device subsets of size ``m``: the fastest, the best-connected, the largest
    memory, and the best by speed rank + bandwidth rank (given order kept within each)."""
    n = len(p.devices)
    total = p.compute_ms.sum(axis=1)
    bw = np.array([d.bandwidth_bps or np.inf for d in p.devices])
    mem = np.array([np.inf if d.memory_bytes is None else d.memory_bytes for d in p.devices])
    r_speed = np.argsort(np.argsort(total, kind="stable"), kind="stable")
    r_bw = np.argsort(np.argsort(-bw, kind="stable"), kind="stable")
    keys = [total, -bw, -mem, r_speed + r_bw]
    sets: list[list[int]] = []
    for key in keys:
        pick = sorted(np.argsort(key, kind="stable")[:m].tolist())
        if pick not in sets:
            sets.append(pick)
    return [s for s in sets if len(s) <= n]


def _heuristic(p: PartitionProblem, m: int,
               objective: str) -> tuple[_Solution, PartitionProblem]:
    best: tuple[_Solution, PartitionProblem] | None = None
    ok = np.zeros(p.num_layers + 1, dtype=bool)
    for pick in _heuristic_sets(p, m):
        sub = p.subset(pick)
        sol = _solve(sub, objective=objective)
        ok |= sol.suffix_ok
        if best is None or sol.value < best[0].value:
            best = (sol, sub)
    assert best is not None
    best[0].suffix_ok = ok
    return best


def partition(p: PartitionProblem, *, exact_max_devices: int = EXACT_MAX_DEVICES,
              objective: str = "steady", method: str = "dp") -> PartitionResult:
    """The best assignment of ``p`` (see the module docstring); ``method`` names it.

    ``objective="steady"`` minimises the bottleneck (steady-state ms per micro-batch, the
    PipeDream objective). ``"minibatch"`` minimises ``(M + K - 1) x bottleneck``, the time of
    a synchronous mini-batch of ``M`` micro-batches with fill and drain over ``K`` stages, so
    a stage is only added when it pays for its bubble; it is exact too (for each ``K`` the
    best bottleneck is the best choice).

    Up to ``exact_max_devices`` devices the result is optimal. Beyond: with
    ``use_all_devices`` and ``fixed_order`` still exact (only suffixes of the order are
    states); otherwise the exact DP is run on a few candidate subsets of
    ``exact_max_devices`` devices (fastest, best uplink, most memory, speed+uplink rank) and
    the best is kept (``method + "-heuristic"``); ``use_all_devices`` without
    ``fixed_order`` is then refused.
    """
    t0 = time.perf_counter()
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    n = len(p.devices)
    if p.use_all_devices and n > p.num_layers:
        raise ValueError(f"{n} devices cannot all get a stage of a {p.num_layers}-layer model")
    sub = p
    if n <= exact_max_devices:
        sol = _solve(p, objective=objective)
    elif p.use_all_devices and p.fixed_order:
        sol = _solve(p, _suffix_masks(n), objective)
    elif p.use_all_devices:
        raise ValueError(f"use_all_devices without fixed_order is exact only up to "
                         f"{exact_max_devices} devices, got {n}")
    else:
        sol, sub = _heuristic(p, exact_max_devices, objective)
        method = f"{method}-heuristic"
    if not np.isfinite(sol.value):
        raise _diagnose(p, sol.suffix_ok)
    res = raise_bits(sub, _to_result(sub, sol, method))
    if sub is not p:
        res = evaluate(p, res.devices, res.cuts, res.act_bits, res.grad_bits, method=method)
    return replace(res, plan_seconds=time.perf_counter() - t0)
