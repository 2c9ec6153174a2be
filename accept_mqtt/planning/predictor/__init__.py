"""Adaptive latency predictor: per-layer forward/backward ms of any device, learnt online.

Imports no MQTT library: the coordinator feeds it timing samples it received, and tests and
benchmarks use it offline. Start from ``CostModel.seeded()``; see docs/predictor.md.
"""

from .costs import CostModel
from .drift import DeviceState, DriftEvent, SpeedDrift
from .features import features, layer_features, prior_ms, sample_features
from .latency import FlopsBaseline, LatencyPredictor, ResidualMemory, RunMemory, make_regressor
from .store import SEED_SAMPLES, PredictorStateError, read_samples

__all__ = [
    "SEED_SAMPLES", "CostModel", "DeviceState", "DriftEvent", "FlopsBaseline",
    "LatencyPredictor", "PredictorStateError", "ResidualMemory", "RunMemory", "SpeedDrift",
    "features", "layer_features", "make_regressor", "prior_ms", "read_samples",
    "sample_features",
]
