"""Partitioner: split a model's layers over heterogeneous devices to minimise the slowest stage.

Pure code (numpy, no torch, no MQTT). ``partition(problem)`` is the exact min-max DP over cuts,
device order and per-link bit widths (``dp.py``); ``evaluate`` scores any assignment under the
same cost model (``cost.py``); the baselines beside it use the same result type. See
``docs/partitioner.md``.
"""

from .baselines import dp_flops, equal_split, flops_split, proportional_cuts
from .cost import evaluate, ideal_bound_ms
from .dp import EXACT_MAX_DEVICES, OBJECTIVES, partition, raise_bits
from .memory import (
    deepest,
    first_unfit,
    in_flight,
    stage_footprint,
    stage_memory_bytes,
    stage_needs,
)
from .problem import (
    DEFAULT_CODEC,
    CodecCost,
    Device,
    InfeasiblePlanError,
    PartitionProblem,
    PartitionResult,
    problem_from_profiles,
    replace_problem,
)

__all__ = [
    "DEFAULT_CODEC",
    "EXACT_MAX_DEVICES",
    "CodecCost",
    "Device",
    "InfeasiblePlanError",
    "OBJECTIVES",
    "PartitionProblem",
    "PartitionResult",
    "deepest",
    "dp_flops",
    "equal_split",
    "evaluate",
    "first_unfit",
    "flops_split",
    "ideal_bound_ms",
    "in_flight",
    "partition",
    "problem_from_profiles",
    "proportional_cuts",
    "raise_bits",
    "replace_problem",
    "stage_footprint",
    "stage_memory_bytes",
    "stage_needs",
]
