"""Latency predictor: features, online learning, unseen devices, persistence, drift, imports.

No broker needed: the predictor package is pure computation. Kept under ~30 s (the seeded
model is built once per process and copied).
"""

from __future__ import annotations

import gzip
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

from accept_mqtt.model.descriptors import LAYER_TYPES, describe
from accept_mqtt.model.zoo import ZOO, build_model
from accept_mqtt.planning.predictor import (
    SEED_SAMPLES,
    CostModel,
    FlopsBaseline,
    LatencyPredictor,
    PredictorStateError,
    SpeedDrift,
    features,
    prior_ms,
    read_samples,
)

PROFILE = {"device": "dev-a", "cores": 4, "threads": 2, "memory_mb": 4096.0,
           "clock_mhz": 1800.0, "bench_gflops": 20.0}


def _descs(name: str = "cnn", width: float = 1.0) -> list:
    return describe(build_model(name, seed=0, width=width))


def _sample(desc, direction: str, batch: int, ms: float, threads: int = 2) -> dict:
    return {"layer": desc.to_dict(), "dir": direction, "batch": batch, "ms": ms,
            "threads": threads}


def _mape(pairs: list[tuple[float, float]]) -> float:
    return sum(abs(p - m) / m for p, m in pairs) / len(pairs)


# -- features ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(ZOO))
def test_features_come_from_descriptors(name: str) -> None:
    for d in _descs(name):
        x = features(d.to_dict(), PROFILE, 16, "fwd")
        assert all(isinstance(v, float) and math.isfinite(v) for v in x.values())
        assert x[f"t_{d.type}"] == 1.0
        assert sum(x[f"t_{t}"] for t in LAYER_TYPES) == 1.0
        assert x["log_flops"] == pytest.approx(math.log1p(d.flops))
        assert x["log_params"] == pytest.approx(math.log1p(d.params))
        assert x["log_in"] == pytest.approx(math.log1p(d.in_elems))
        assert x["kernel"] == d.kernel and x["stride"] == d.stride
        assert x["log_work"] == pytest.approx(math.log1p(d.flops) + math.log(16))
        assert x["log_gflops"] == pytest.approx(math.log(20.0))
        assert x["threads"] == 2.0 and x["cores"] == 4.0 and x["bwd"] == 0.0
        assert x["log_prior_ms"] == pytest.approx(math.log(prior_ms(d.to_dict(), PROFILE, 16,
                                                                     "fwd")))


def test_features_tolerate_sparse_profiles_and_reject_bad_input() -> None:
    d = _descs()[0].to_dict()
    x = features(d, {"bench_gflops": None, "clock_mhz": None}, 1, "bwd")
    assert x["gflops_known"] == 0.0 and x["clock_known"] == 0.0 and x["bwd"] == 1.0
    with pytest.raises(ValueError, match="direction"):
        features(d, PROFILE, 4, "sideways")
    with pytest.raises(ValueError, match="batch"):
        features(d, PROFILE, 0, "fwd")
    # a faster device, a bigger batch, the backward: the prior moves the right way
    slow = prior_ms(d, {"bench_gflops": 5.0}, 16, "fwd")
    assert prior_ms(d, {"bench_gflops": 50.0}, 16, "fwd") < slow
    assert prior_ms(d, {"bench_gflops": 5.0}, 64, "fwd") > slow
    assert prior_ms(d, {"bench_gflops": 5.0}, 16, "bwd") > slow


# -- learning ------------------------------------------------------------------------------
def _true_ms(d, profile: dict, batch: int, direction: str) -> float:
    """A synthetic device: its own per-type efficiency and a fixed per-layer overhead."""
    eff = {"conv2d": 0.25, "linear": 0.6, "batchnorm": 0.05, "relu": 0.08}.get(d.type, 0.1)
    work = d.flops * batch * (2.2 if direction == "bwd" else 1.0)
    return 0.02 + 1e3 * work / (eff * profile["bench_gflops"] * 1e9)


def test_learning_improves_on_a_synthetic_stream() -> None:
    rng = random.Random(0)
    stream = []
    for name in ("cnn", "mlp", "har1d"):
        for d in _descs(name):
            for batch in (4, 16, 64):
                for direction in ("fwd", "bwd"):
                    stream.append((d, batch, direction))
    model = LatencyPredictor()
    baseline = FlopsBaseline()
    errors = []
    for epoch in range(4):
        rng.shuffle(stream)
        for d, batch, direction in stream:
            x = features(d.to_dict(), PROFILE, batch, direction)
            ms = _true_ms(d, PROFILE, batch, direction) * math.exp(rng.gauss(0, 0.05))
            errors.append((epoch, model.predict_one(x), baseline.predict_one(x), ms))
            model.learn_one(x, ms)
            baseline.learn_one(x, ms)
    first = _mape([(p, m) for e, p, _, m in errors if e == 0])
    last = _mape([(p, m) for e, p, _, m in errors if e == 3])
    base_last = _mape([(b, m) for e, _, b, m in errors if e == 3])
    assert last < first / 3
    assert last < 0.15
    assert last < base_last / 2


@pytest.fixture(scope="module")
def seeded() -> CostModel:
    return CostModel.seeded()


def test_seed_file_is_small_and_agent_shaped() -> None:
    assert SEED_SAMPLES.stat().st_size < 2 * 2**20
    first = next(read_samples(SEED_SAMPLES))
    assert {"layer", "dir", "batch", "ms", "threads", "profile"} <= set(first)
    assert first["profile"]["bench_gflops"] > 0


def test_seeded_model_predicts_every_zoo_layer(seeded: CostModel) -> None:
    for name in sorted(ZOO):
        descs = _descs(name)
        costs = seeded.layer_costs(descs, PROFILE, 16)
        assert len(costs) == len(descs)
        assert all(0 < f < 1e5 and 0 < b < 1e5 for f, b in costs)
    # a 10x faster micro-benchmark means clearly faster predictions for the big layers
    fast = seeded.layer_costs(_descs("vgg"), dict(PROFILE, bench_gflops=200.0), 16)
    slow = seeded.layer_costs(_descs("vgg"), PROFILE, 16)
    assert sum(f for f, _ in fast) < sum(f for f, _ in slow) / 3


def test_unseen_device_learning_curve_decreases(seeded: CostModel) -> None:
    # a device the seed never saw (4 threads, 6 GFLOP/s) that is also 2.5x slower than its
    # micro-benchmark suggests, with its own efficiency per layer type
    profile = {"device": "pi-9", "cores": 4, "threads": 4, "memory_mb": 2048.0,
               "clock_mhz": 1500.0, "bench_gflops": 6.0}
    reference = dict(profile, device="reference")
    type_factor = {"conv2d": 1.5, "conv1d": 1.3, "linear": 0.8, "batchnorm": 1.2}
    runs = [(d, b, di) for name in ("cnn", "har1d", "mlp") for d in _descs(name)
            for b in (8, 32) for di in ("fwd", "bwd")]
    truth = {(d.index, d.flops, d.in_elems, b, di): 2.5 * type_factor.get(d.type, 1.0)
             * seeded.predict_ms(d, reference, b, di) for d, b, di in runs}
    true_ms = lambda d, b, di: truth[(d.index, d.flops, d.in_elems, b, di)]
    rng = random.Random(1)
    held = runs[::3]
    curve, fed = [], 0
    for n in (0, 10, 50, 200):
        while fed < n:
            d, b, di = rng.choice(runs)
            ms = true_ms(d, b, di) * math.exp(rng.gauss(0, 0.05))
            seeded.observe(profile, _sample(d, di, b, ms, 4))
            fed += 1
        curve.append(_mape([(seeded.predict_ms(d, profile, b, di), true_ms(d, b, di))
                            for d, b, di in held]))
    assert curve[0] > 0.5, curve  # the seed alone cannot know the device is slower
    assert curve[1] < curve[0] and curve[2] < curve[1] and curve[3] <= curve[2] * 1.05, curve
    assert curve[2] < 0.25 and curve[3] < 0.1, curve
    assert seeded.device_error("pi-9") is not None
    assert seeded.device_error("never-seen") is None


def test_observe_ignores_zero_and_rejects_malformed(seeded: CostModel) -> None:
    d = _descs()[2]
    before = seeded.n_observed
    seeded.observe(PROFILE, _sample(d, "bwd", 8, 0.0))
    assert seeded.n_observed == before
    with pytest.raises(ValueError, match="malformed"):
        seeded.observe(PROFILE, {"dir": "fwd", "batch": 8, "ms": 1.0})
    with pytest.raises(ValueError, match="malformed"):
        seeded.observe(PROFILE, _sample(d, "up", 8, 1.0))
    assert seeded.observe_many(PROFILE, [_sample(d, "fwd", 8, 1.0), {"ms": 2}]) == 1


# -- persistence ---------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path: Path) -> None:
    model = CostModel()
    descs = _descs()
    for d in descs:
        for di in ("fwd", "bwd"):
            model.observe(PROFILE, _sample(d, di, 16, _true_ms(d, PROFILE, 16, di)))
    path = tmp_path / "sub" / "predictor.state"
    model.save(path)
    assert not [p for p in path.parent.iterdir() if p.name != path.name]  # no temp left
    loaded = CostModel.load(path)
    assert loaded.layer_costs(descs, PROFILE, 16) == model.layer_costs(descs, PROFILE, 16)
    assert loaded.device_factor("dev-a") == model.device_factor("dev-a")
    assert loaded.device_error("dev-a") == model.device_error("dev-a")
    # it keeps learning after a reload
    loaded.observe(PROFILE, _sample(descs[0], "fwd", 16, 5.0))
    assert loaded.n_observed == model.n_observed + 1


@pytest.mark.parametrize("damage", ["garbage", "truncated", "flipped", "version", "kind",
                                    "missing", "empty"])
def test_unusable_state_file_raises_specific_error(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "p.state"
    CostModel().save(path)
    data = path.read_bytes()
    header, _, payload = data.partition(b"\n")
    if damage == "garbage":
        path.write_bytes(b"\x00\x01 not a state file at all")
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flipped":
        path.write_bytes(header + b"\n" + payload[:-10] + bytes(10))
    elif damage in ("version", "kind"):
        h = json.loads(header)
        h["version" if damage == "version" else "kind"] = 99 if damage == "version" else "X"
        path.write_bytes(json.dumps(h).encode() + b"\n" + payload)
    elif damage == "missing":
        path.unlink()
    else:
        path.write_bytes(b"")
    with pytest.raises(PredictorStateError, match=str(path)):
        CostModel.load(path)


def test_load_or_seed_falls_back_on_a_bad_file(tmp_path: Path, seeded: CostModel,
                                                caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "p.state"
    path.write_bytes(b"junk")
    model = CostModel.load_or_seed(path)
    assert model.n_seed == seeded.n_seed > 1000
    assert "not an accept-mqtt predictor state file" in caplog.text


# -- drift ---------------------------------------------------------------------------------
def _drift_run(model: CostModel, jump_at: int | None, n: int, seed: int = 0,
               switch_at: int | None = None) -> list[int]:
    """Feed a device's steps (all layers of har1d, fwd+bwd; from ``switch_at`` on those of
    cnn, as after a re-plan); returns the steps where drift was reported."""
    rng = random.Random(seed)
    profile = dict(PROFILE, device="dev-d")
    fired = []
    for step in range(n):
        descs = _descs("cnn" if switch_at is not None and step >= switch_at else "har1d")
        factor = 3.0 if jump_at is not None and step >= jump_at else 1.0
        for d in descs:
            for di in ("fwd", "bwd"):
                ms = _true_ms(d, profile, 16, di) * factor * math.exp(rng.gauss(0, 0.15))
                model.observe(profile, _sample(d, di, 16, ms))
        if model.drift("dev-d"):
            fired.append(step)
    return fired


def test_drift_fires_on_a_3x_jump_and_not_when_stationary() -> None:
    model = CostModel()
    assert _drift_run(model, None, 150) == []
    # a new workload (other layers, which the model predicts less well) is not a drift
    assert _drift_run(CostModel(), None, 80, seed=3, switch_at=40) == []
    model = CostModel()
    fired = _drift_run(model, 60, 90, seed=1)
    assert fired and 60 <= fired[0] <= 63, fired
    assert not model.drift("dev-d")  # reading the flag clears it
    (event,) = [e for e in model.drift_events("dev-d") if e.factor > 1]
    assert 2.2 < event.factor < 4.0
    # predictions follow the device within a few steps of the change
    assert _mape([(model.predict_ms(d, PROFILE, 16, di, device="dev-d"),
                   3 * _true_ms(d, PROFILE, 16, di))
                  for d in _descs("har1d") for di in ("fwd", "bwd")]) < 0.12
    assert model.device_error("dev-d") < 0.2


def test_speed_drift_ignores_small_changes() -> None:
    rng = random.Random(2)
    d = SpeedDrift(min_factor=1.3)
    values = [rng.gauss(0, 0.1) for _ in range(400)] + [rng.gauss(0.1, 0.1) for _ in range(400)]
    assert all(d.update(v) is None for v in values)


# -- profiling -----------------------------------------------------------------------------
def test_profiling_measures_agent_shaped_samples(tmp_path: Path) -> None:
    from accept_mqtt.planning.profiling import emulate, measure, median_samples, write_jsonl

    its = list(measure("cnn", 0.5, threads=1, batch=2, reps=2, warmup=0))
    assert len(its) == 2
    samples = [s for it in its for s in it]
    assert {s["dir"] for s in samples} == {"fwd", "bwd"}
    assert all(s["ms"] > 0 and s["threads"] == 1 and s["batch"] == 2 for s in samples)
    med = median_samples(samples)
    assert len(med) == len(samples) // 2
    slow = emulate(med, {"bench_gflops": 100.0, "threads": 1}, 4.0, "x-s4")
    assert slow[0]["ms"] == pytest.approx(med[0]["ms"] * 4, rel=1e-3)
    assert slow[0]["profile"]["bench_gflops"] == 25.0 and slow[0]["device"] == "x-s4"
    path = tmp_path / "s.jsonl.gz"
    assert write_jsonl(path, slow) == len(slow)
    with gzip.open(path, "rt") as f:
        assert json.loads(f.readline())["device"] == "x-s4"
    assert list(read_samples(path)) == json.loads(json.dumps(slow))


# -- imports -------------------------------------------------------------------------------
def test_predictor_imports_no_mqtt_library() -> None:
    code = ("import sys, accept_mqtt.planning.predictor\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('paho', 'aiomqtt'))\n"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == ""
