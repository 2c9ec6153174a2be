"""From devices and a model to a ``Plan``: the glue between cost estimates and the partitioner.

Guarantee: ``plan_job`` is deterministic for the same inputs (device order ties broken by id)
and always returns a valid ``Plan`` or raises ``PlanningError`` naming what does not fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import TrainConfig
from .descriptors import LayerDescriptor
from .plan import Plan, cuts_to_stages


class PlanningError(ValueError):
    pass


@dataclass
class DeviceInfo:
    id: str
    profile: dict[str, Any]

    @property
    def speed(self) -> float:
        """Relative compute speed: the profile's micro-benchmark score (GFLOP/s)."""
        return float(self.profile.get("bench_gflops") or 1.0)


def proportional_cuts(work: list[float], shares: list[float]) -> list[int]:
    """Cut points giving stage ``i`` about ``shares[i]`` of the total ``work``, >= 1 layer each.

    >>> proportional_cuts([1, 1, 1, 1], [1, 1])
    [0, 2, 4]
    """
    n, k = len(work), len(shares)
    if k > n:
        raise PlanningError(f"{k} stages need at least {k} layers, the model has {n}")
    total, share_total = sum(work), sum(shares)
    cuts, acc, target = [0], 0.0, 0.0
    for i in range(k - 1):
        target += total * shares[i] / share_total
        j = cuts[-1] + 1  # at least one layer in this stage
        acc = sum(work[: j])
        while j < n - (k - 1 - i) and acc + work[j] / 2 <= target:
            acc += work[j]
            j += 1
        cuts.append(j)
    cuts.append(n)
    return cuts


def equal_cuts(n: int, k: int) -> list[int]:
    if k > n:
        raise PlanningError(f"{k} stages need at least {k} layers, the model has {n}")
    return [round(i * n / k) for i in range(k + 1)]


def flops_plan(descs: list[LayerDescriptor], devices: list[DeviceInfo],
               equal_devices: bool = False) -> tuple[list[DeviceInfo], list[int]]:
    """FLOPs-proportional split: stage work proportional to each device's benchmark score."""
    order = sorted(devices, key=lambda d: d.id)
    shares = [1.0] * len(order) if equal_devices else [d.speed for d in order]
    work = [3.0 * max(d.flops, 1) for d in descs]  # backward ~ 2x forward
    return order, proportional_cuts(work, shares)


def build_plan(job: str, cfg: TrainConfig, num_layers: int, order: list[DeviceInfo],
               cuts: list[int], *, method: str, version: int = 1,
               act_bits: list[int] | None = None, grad_bits: list[int] | None = None,
               predicted_ms: list[float] | None = None, bottleneck_ms: float | None = None,
               start_step: int = 0) -> Plan:
    k = len(order)
    return Plan(
        job=job, version=version, model=cfg.model, num_layers=num_layers,
        stages=cuts_to_stages(cuts, [d.id for d in order],
                              act_bits or [cfg.act_bits] * k, grad_bits or [cfg.grad_bits] * k,
                              predicted_ms),
        seed=cfg.seed, model_args={"width": cfg.width} if cfg.width != 1.0 else {},
        micro_batches=cfg.micro_batches, schedule=cfg.schedule, optimizer=cfg.optimizer_cfg(),
        method=method, stochastic_grad_rounding=cfg.stochastic_grad_rounding,
        predicted_bottleneck_ms=bottleneck_ms, start_step=start_step,
    )
