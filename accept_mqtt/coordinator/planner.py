"""From devices and a model to a ``Plan``: the glue between cost estimates and the partitioner.

Guarantee: ``plan_job`` is deterministic for the same inputs (device order ties broken by id)
and always returns a valid ``Plan`` or raises ``PlanningError`` naming what does not fit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from accept_mqtt.model.descriptors import LayerDescriptor
from accept_mqtt.planning.partition import (
    PartitionResult,
    equal_split,
    flops_split,
    partition,
    problem_from_profiles,
)
from accept_mqtt.wire.plan import Plan, cuts_to_stages

from .config import TrainConfig


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


CostFn = Callable[[list[LayerDescriptor], dict[str, Any], int], list[tuple[float, float]]]


def prior_costs(descs: list[LayerDescriptor], profile: dict[str, Any],
                batch: int) -> list[tuple[float, float]]:
    """FLOPs prior: (fwd_ms, bwd_ms) per layer at the device's benchmark GFLOP/s.

    Backward is taken as twice the forward (weights and inputs gradients), the usual rule.
    """
    gflops = float(profile.get("bench_gflops") or 1.0)
    out = []
    for d in descs:
        fwd = max(d.flops, d.out_elems) * batch / (gflops * 1e9) * 1e3
        out.append((fwd, 2.0 * fwd))
    return out


def make_partition(
    descs: list[LayerDescriptor],
    devices: list[DeviceInfo],
    cfg: TrainConfig,
    *,
    method: str,
    costs: CostFn = prior_costs,
) -> PartitionResult:
    """Cut points, device order and link bits by ``method``: dp | flops | equal.

    Every requested device gets a stage (the user asked for ``--devices N``); the bit widths
    are the configured ones. ``dp`` minimises the time per mini-batch (fill and drain
    included, ``objective="minibatch"``) under ``costs``.
    """
    mb = max(1, -(-cfg.batch_size // cfg.micro_batches))  # micro-batch size (ceil)
    order = sorted(devices, key=lambda d: d.id)
    per_dev = [costs(descs, d.profile, mb) for d in order]
    problem = problem_from_profiles(
        [d.id for d in order], [[f for f, _ in c] for c in per_dev],
        [[b for _, b in c] for c in per_dev], descs, mb, {d.id: d.profile for d in order},
        act_bits=(cfg.act_bits,), grad_bits=(cfg.grad_bits,), min_act_bits=cfg.act_bits,
        min_grad_bits=cfg.grad_bits, micro_batches=cfg.micro_batches, schedule=cfg.schedule,
        use_all_devices=True, fixed_order=method != "dp",
    )
    if len(order) > len(descs):
        raise PlanningError(f"{len(order)} stages need at least {len(order)} layers, "
                            f"the model has {len(descs)}")
    if method == "equal":
        return equal_split(problem, bits=cfg.act_bits)
    if method == "flops":
        return flops_split(problem, bits=cfg.act_bits)
    return partition(problem, objective="minibatch")


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
        grad_scheme=cfg.grad_scheme, act_per_channel=cfg.act_per_channel,
        predicted_bottleneck_ms=bottleneck_ms, start_step=start_step,
    )
