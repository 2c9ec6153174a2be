"""``accept-mqtt bench predictor``: how well the latency predictor knows this machine's layers.

What it does (docs/predictor.md explains the choices):

1. Measures fresh timing samples here with the agent's own code (``profiling.measure``):
   zoo models including sizes the seed never saw, micro-batches 16 (seen) and 32 (unseen),
   1 and 2 threads, several repetitions; waits for / retries around other processes' load.
2. Emulates devices from them exactly as ``--slowdown`` agents report: seen devices
   (threads x slowdown 1, 2, 4 as in the seed) and held-out ones (threads 1, slowdown 3; and
   the same with a profile that claims twice the real speed).
3. Per device, the error of per-layer fwd+bwd latency for (a) the FLOPs-proportional
   baseline, (b) the seeded model alone, (c) the online model (prequential: each training
   iteration is predicted, then learnt), and a noise floor (the same layer's previous
   measurement on the same device), as MAPE, median APE, time-weighted error and per-stage
   error; for held-out devices the learning curve after 0, 10, 50 and 200 of their samples
   (per job: one model, width and batch, samples in the order an agent publishes them);
   the cost of ``learn_one``/``predict_one``. Prints tables, writes JSON (``--json``).
4. With ``--compare``: each River regressor (linear, Hoeffding adaptive tree, adaptive
   random forest, kNN) alone, on the prior's residual and inside the cost model, on the
   same streams.

Guarantee: the numbers are computed on samples measured in this run, never on the seed the
model was trained on; everything random is seeded.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Sample = dict[str, Any]
Iteration = list[Sample]

FULL_PLAN = "cnn,mlp,har1d,vgg,mobilenet,vgg:0.75,mobilenet:0.75"
QUICK_PLAN = "cnn,mlp,har1d,vgg:0.5,mobilenet:0.75"
SEEN_SLOWDOWNS = (1.0, 2.0, 4.0)
CURVE_POINTS = (0, 10, 50, 200)


@dataclass
class Device:
    name: str
    threads: int
    slowdown: float
    profile: dict[str, Any]
    iterations: list[Iteration] = field(default_factory=list)
    held_out: bool = False
    note: str = ""


# -- measuring ---------------------------------------------------------------------------
def measure_here(plan: list[tuple[str, float]], threads: Sequence[int], batches: Sequence[int],
                 reps: int, progress: bool) -> tuple[dict[int, list[Iteration]],
                                                     dict[int, dict[str, Any]], list[str]]:
    """Raw iterations (slowdown 1) per thread count, the profile per thread count, warnings."""
    from accept_mqtt.model.hardware import device_profile
    from accept_mqtt.planning.profiling import (
        Calibrator,
        measure_quietly,
        progress_bar,
        robust_bench,
    )

    out: dict[int, list[Iteration]] = {}
    profiles: dict[int, dict[str, Any]] = {}
    warnings: list[str] = []
    retried: list[int] = []
    with progress_bar(len(threads) * len(plan) * len(batches), progress, "measuring") as adv:
        for t in threads:
            prof = device_profile(f"bench-t{t}", threads=t, bench=False)
            bench = robust_bench(t)
            calibrator = Calibrator(t)
            calibrator.warm_up()
            out[t] = []
            for name, width in plan:
                for b in batches:
                    its, others, attempts = measure_quietly(
                        name, width, threads=t, batch=b, reps=reps, max_cores=0.2,
                        calibrator=calibrator)
                    label = f"threads={t} {name}x{width:g} batch={b}"
                    if others > 0.2:
                        warnings.append(f"{label}: measured on a busy CPU after {attempts} "
                                        f"attempts (other processes: {others:.1f} cores)")
                    retried.append(attempts - 1)
                    out[t].extend(its)
                    adv(label)
            prof["bench_gflops"] = max(bench, robust_bench(t))
            profiles[t] = prof
    if sum(retried):
        warnings.append(f"{sum(retried)} measurement(s) of {len(retried)} were repeated because "
                        f"the CPU was busy")
    return out, profiles, warnings


def make_devices(raw: dict[int, list[Iteration]], profiles: dict[int, dict[str, Any]]
                 ) -> list[Device]:
    def dev(name: str, t: int, s: float, claimed: float, held: bool, note: str) -> Device:
        prof = dict(profiles[t], device=name, slowdown=s,
                    bench_gflops=round(profiles[t]["bench_gflops"] / claimed, 3))
        its = [[dict(x, ms=x["ms"] * s, device=name) for x in it] for it in raw[t]]
        return Device(name, t, s, prof, its, held, note)

    devices = [dev(f"t{t}-s{s:g}", t, s, s, False, "seen kind") for t in sorted(raw)
               for s in SEEN_SLOWDOWNS]
    if 1 in raw:
        devices.append(dev("t1-s3", 1, 3.0, 3.0, True, "unseen slowdown"))
        devices.append(dev("t1-s3-misprofiled", 1, 3.0, 1.5, True,
                           "unseen; profile claims 2x its real speed"))
    return devices


# -- scoring -----------------------------------------------------------------------------
Predict = Callable[[Sample, dict[str, Any]], float]


def pairs(it: Iteration, preds: list[float]) -> list[tuple[int, float, float]]:
    """(layer index, predicted fwd+bwd, measured fwd+bwd) per layer of one iteration."""
    acc: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for s, p in zip(it, preds, strict=True):
        a = acc[s["layer"]["index"]]
        a[0] += p
        a[1] += s["ms"]
    return [(i, a[0], a[1]) for i, a in sorted(acc.items())]


@dataclass
class Score:
    ape: list[float] = field(default_factory=list)
    abs_err: float = 0.0
    total: float = 0.0
    stage_ape: list[float] = field(default_factory=list)

    def add(self, ps: list[tuple[int, float, float]], stages: int = 3) -> None:
        for _, p, m in ps:
            self.ape.append(abs(p - m) / m)
            self.abs_err += abs(p - m)
            self.total += m
        k = max(1, min(stages, len(ps)))
        bounds = [round(j * len(ps) / k) for j in range(k + 1)]
        for a, b in zip(bounds, bounds[1:], strict=False):
            p = sum(x[1] for x in ps[a:b])
            m = sum(x[2] for x in ps[a:b])
            if m > 0:
                self.stage_ape.append(abs(p - m) / m)

    def summary(self) -> dict[str, float | int | None]:
        def pct(v: float | None) -> float | None:
            return None if v is None else round(100 * v, 2)
        return {
            "n_layers": len(self.ape),
            "mape": pct(statistics.mean(self.ape)) if self.ape else None,
            "median_ape": pct(statistics.median(self.ape)) if self.ape else None,
            "wape": pct(self.abs_err / self.total) if self.total else None,
            "stage_mape": pct(statistics.mean(self.stage_ape)) if self.stage_ape else None,
        }


def evaluate_devices(seed_model: Any, devices: list[Device]) -> dict[str, dict[str, Any]]:
    """(a) baseline, (b) seed alone, (c) online prequential, and the noise floor, per device."""
    from accept_mqtt.planning.predictor import CostModel
    from accept_mqtt.planning.predictor.features import sample_features

    online: CostModel = copy.deepcopy(seed_model)
    scores: dict[str, dict[str, Score]] = {
        d.name: {m: Score() for m in ("baseline", "seed", "online", "floor")} for d in devices}
    last: dict[tuple[Any, ...], float] = {}
    n_max = max(len(d.iterations) for d in devices)
    for i in range(n_max):  # round robin: the devices run side by side
        for d in devices:
            if i >= len(d.iterations):
                continue
            it = d.iterations[i]
            xs = [sample_features(d.profile, s) for s in it]
            sc = scores[d.name]
            sc["baseline"].add(pairs(it, [seed_model.baseline.predict_one(x) for x in xs]))
            sc["seed"].add(pairs(it, [seed_model.predict_features(x, d.name) for x in xs]))
            sc["online"].add(pairs(it, [online.predict_features(x, d.name) for x in xs]))
            keys = [(d.name, s["model"], s["width"], s["batch"], s["layer"]["index"], s["dir"])
                    for s in it]
            if all(k in last for k in keys):
                sc["floor"].add(pairs(it, [last[k] for k in keys]))
            for k, s in zip(keys, it, strict=True):
                last[k] = s["ms"]
            for s in it:
                online.observe(d.profile, s)
    out: dict[str, dict[str, Any]] = {}
    for d in devices:
        out[d.name] = {m: s.summary() for m, s in scores[d.name].items()}
        out[d.name]["drift_events"] = [e.factor for e in online.drift_events(d.name)]
    return out


def learning_curve(seed_model: Any, d: Device, points: Sequence[int] = CURVE_POINTS
                   ) -> dict[str, Any]:
    """MAPE on a held-out device after its first n samples, once per job it could run.

    A job is one (model, width, batch) configuration: the device's samples arrive in the
    order an agent publishes them (step after step, forward then backward), the first n are
    learnt and the configuration's last measured step is predicted. Each job starts from the
    seeded model, so the spread over jobs is the spread over workloads.
    """
    from accept_mqtt.planning.predictor.features import sample_features

    jobs: dict[tuple[Any, ...], list[Iteration]] = defaultdict(list)
    for it in d.iterations:
        if it:
            jobs[(it[0]["model"], it[0]["width"], it[0]["batch"])].append(it)
    curves: dict[int, list[dict[str, Any]]] = {n: [] for n in points}
    for its in jobs.values():
        evals, stream = its[-1], [s for it in its[:-1] for s in it]
        xs = [sample_features(d.profile, s) for s in evals]
        model = copy.deepcopy(seed_model)
        fed = 0
        for n in points:
            for s in stream[fed:n]:
                model.observe(d.profile, s)
            fed = max(fed, n)
            sc = Score()
            sc.add(pairs(evals, [model.predict_features(x, d.name) for x in xs]))
            curves[n].append(sc.summary())
    return {"jobs": len(jobs), "points": {
        str(n): spread([c["mape"] for c in curves[n]]) | {
            "wape": spread([c["wape"] for c in curves[n]]),
            "stage": spread([c["stage_mape"] for c in curves[n]])} for n in points}}


def spread(values: Sequence[float | None]) -> dict[str, float | None]:
    v = [x for x in values if x is not None]
    if not v:
        return {"median": None, "min": None, "max": None}
    return {"median": round(statistics.median(v), 2), "min": round(min(v), 2),
            "max": round(max(v), 2)}


def call_costs(seed_model: Any, devices: list[Device], n: int = 2000) -> dict[str, Any]:
    """Per-call cost in microseconds of the shared predictor and of the cost model."""
    from accept_mqtt.planning.predictor.features import sample_features

    model = copy.deepcopy(seed_model)
    stream = [(d, s) for d in devices if not d.held_out for it in d.iterations for s in it]
    random.Random(0).shuffle(stream)
    stream = stream[:n]
    xs = [sample_features(d.profile, s) for d, s in stream]
    t: dict[str, list[float]] = defaultdict(list)
    for (d, s), x in zip(stream, xs, strict=True):
        t0 = time.perf_counter_ns()
        model.predictor.predict_one(x)
        t1 = time.perf_counter_ns()
        model.predictor.learn_one(x, s["ms"])
        t2 = time.perf_counter_ns()
        model.predict_ms(s["layer"], d.profile, s["batch"], s["dir"], device=d.name)
        t3 = time.perf_counter_ns()
        model.observe(d.profile, s)
        t4 = time.perf_counter_ns()
        sample_features(d.profile, s)
        t5 = time.perf_counter_ns()
        for k, v in (("predictor.predict_one", t1 - t0), ("predictor.learn_one", t2 - t1),
                     ("CostModel.predict_ms", t3 - t2), ("CostModel.observe", t4 - t3),
                     ("features", t5 - t4)):
            t[k].append(v / 1e3)
    return {k: {"median_us": round(statistics.median(v), 1),
                "p90_us": round(statistics.quantiles(v, n=10)[-1], 1), "calls": len(v)}
            for k, v in t.items()}


def compare_regressors(seed_path: Path, devices: list[Device]) -> list[dict[str, Any]]:
    """Each River candidate on the same streams: alone (no prior, no memory), on the prior's
    residual, and inside the full cost model with its regressor frozen after the seed or
    learning online too."""
    from accept_mqtt.planning.predictor import CostModel, LatencyPredictor
    from accept_mqtt.planning.predictor.features import sample_features
    from accept_mqtt.planning.predictor.latency import REGRESSORS
    from accept_mqtt.planning.predictor.store import read_samples

    seed = list(read_samples(seed_path))
    random.Random(0).shuffle(seed)
    seed_x = [(sample_features(s["profile"], s), s["ms"]) for s in seed]
    seen = [d for d in devices if not d.held_out]
    rows = []
    variants = [("alone", False, False, True), ("prior", True, False, True),
                ("full", True, True, False), ("full+online", True, True, True)]
    for name, prior, memory, online in variants:
        for kind in REGRESSORS:
            pred = LatencyPredictor(kind, use_prior=prior, memory=memory)
            ape, t_learn, t_pred = [], 0.0, 0.0
            for x, ms in seed_x:  # prequential on the (shuffled) seed stream
                t0 = time.perf_counter()
                p = pred.predict_one(x)
                t1 = time.perf_counter()
                pred.learn_one(x, ms)
                t_learn += time.perf_counter() - t1
                t_pred += t1 - t0
                ape.append(abs(p - ms) / ms)
            res = evaluate_devices(CostModel(pred, online_regressor=online), seen)
            rows.append({
                "variant": name, "regressor": kind, "prior": prior, "memory": memory,
                "online_regressor": online,
                "seed_prequential_mape": round(100 * statistics.mean(ape), 2),
                "measured_seed_only_mape": spread([r["seed"]["mape"] for r in res.values()]),
                "measured_online_mape": spread([r["online"]["mape"] for r in res.values()]),
                "measured_online_wape": spread([r["online"]["wape"] for r in res.values()]),
                "learn_one_us": round(1e6 * t_learn / len(seed_x), 1),
                "predict_one_us": round(1e6 * t_pred / len(seed_x), 1),
            })
            r = rows[-1]
            print(f"  {name:11s} {kind:6s} seed-stream MAPE {r['seed_prequential_mape']:7.1f}%"
                  f"  measured: seed-only {r['measured_seed_only_mape']['median']}%, online "
                  f"{r['measured_online_mape']['median']}%  learn {r['learn_one_us']:.0f}us "
                  f"predict {r['predict_one_us']:.0f}us", file=sys.stderr, flush=True)
    return rows


# -- output ------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    import river
    import torch

    from accept_mqtt.model.hardware import cpu_model

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "river": river.__version__,
            "loadavg": [round(v, 2) for v in os.getloadavg()]}


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.1f}"


def print_report(res: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=None if sys.stdout.isatty() else 120)
    m = res["machine"]
    con.print(f"[bold]predictor bench[/] on {m['cpu']} ({m['cores']} cores), torch {m['torch']}, "
              f"river {m['river']}; measured {res['config']['plan']} x batches "
              f"{res['config']['batches']} x threads {res['config']['threads']}, "
              f"{res['config']['reps']} reps after {res['config']['warmup']} warm-up; seed "
              f"{res['seed']['samples']} samples (trained in {res['seed']['train_s']:.1f}s); "
              f"load avg before/after {m['loadavg']} / {res['loadavg_after']}")
    names = {"baseline": "(a) FLOPs baseline", "seed": "(b) seed alone",
             "online": "(c) online", "floor": "noise floor"}
    tab = Table(title="per-layer fwd+bwd latency error, % (noise floor: the same layer's "
                      "previous measurement on the device)")
    for col in ("device", "layer runs", "predictor", "MAPE", "median APE", "time-weighted",
                "per-stage MAPE"):
        tab.add_column(col, justify="right" if col not in ("device", "predictor") else "left")
    for name, r in res["devices"].items():
        label = name + (" (held out)" if name in res["held_out"] else "")
        for i, meth in enumerate(("baseline", "seed", "online", "floor")):
            q = r[meth]
            tab.add_row(label if i == 0 else "", str(q["n_layers"]) if i == 0 else "",
                        names[meth], _fmt(q["mape"]), _fmt(q["median_ape"]), _fmt(q["wape"]),
                        _fmt(q["stage_mape"]), end_section=i == 3)
    con.print(tab)
    s = res["summary"]
    con.print("seen devices, MAPE median \\[min-max] over devices: " + ", ".join(
        f"{k} {v['median']} [{v['min']}-{v['max']}]" for k, v in s.items()))
    for name, c in res["learning_curves"].items():
        tab = Table(title=f"held-out {name}: error % on a job's last step after n of its "
                          f"samples (median \\[min-max] over {c['jobs']} jobs)")
        for col in ("n", "per-layer MAPE", "time-weighted", "per-stage MAPE"):
            tab.add_column(col, justify="right")
        for n, p in c["points"].items():
            tab.add_row(n, *(f"{_fmt(q['median'])} [{_fmt(q['min'])}-{_fmt(q['max'])}]"
                             for q in (p, p["wape"], p["stage"])))
        con.print(tab)
    tab = Table(title="cost per call (us)")
    for col in ("call", "median", "p90", "calls"):
        tab.add_column(col, justify="right")
    for k, v in res["call_costs"].items():
        tab.add_row(k, f"{v['median_us']:.1f}", f"{v['p90_us']:.1f}", str(v["calls"]))
    con.print(tab)
    if res.get("regressors"):
        tab = Table(title="River regressors on the same streams (MAPE %; measured: median "
                          "over seen devices)")
        for col in ("variant", "regressor", "seed stream (prequential)", "measured, seed only",
                    "measured, online", "online time-weighted", "learn_one us",
                    "predict_one us"):
            tab.add_column(col, justify="right")
        for r in res["regressors"]:
            tab.add_row(r["variant"], r["regressor"], _fmt(r["seed_prequential_mape"]),
                        _fmt(r["measured_seed_only_mape"]["median"]),
                        _fmt(r["measured_online_mape"]["median"]),
                        _fmt(r["measured_online_wape"]["median"]), _fmt(r["learn_one_us"]),
                        _fmt(r["predict_one_us"]))
        con.print(tab)
    for w in res["warnings"]:
        con.print(f"[yellow]warning:[/] {w}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--quick", action="store_true", help="fewer models and repetitions")
    p.add_argument("--seed-samples", default=None,
                   help="seed samples to start from (default: the shipped ones)")
    p.add_argument("--plan", default=None, help="models to measure, model[:width],... ")
    p.add_argument("--reps", type=int, default=None, help="iterations per configuration")
    p.add_argument("--compare", action="store_true",
                   help="also compare the River regressors (slow: a minute or two)")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from accept_mqtt.planning.predictor import CostModel
    from accept_mqtt.planning.predictor.store import SEED_SAMPLES
    from accept_mqtt.planning.profiling import parse_plan, pin_allocator

    plan_text = args.plan or (QUICK_PLAN if args.quick else FULL_PLAN)
    plan = parse_plan(plan_text)
    reps = args.reps or (3 if args.quick else 5)
    threads, batches = (1, 2), (16, 32)
    seed_path = Path(args.seed_samples) if args.seed_samples else SEED_SAMPLES
    res: dict[str, Any] = {"machine": machine(), "config": {
        "plan": plan_text, "batches": list(batches), "threads": list(threads), "reps": reps,
        "warmup": 2, "seen_slowdowns": list(SEEN_SLOWDOWNS)}}
    res["machine"]["allocator_pinned"] = pin_allocator()
    t0 = time.perf_counter()
    seed_model = CostModel.seeded(seed_path)
    res["seed"] = {"path": str(seed_path), "samples": seed_model.n_seed,
                   "train_s": round(time.perf_counter() - t0, 2),
                   "baseline_k": round(seed_model.baseline.k, 3)}
    raw, profiles, warnings = measure_here(plan, threads, batches, reps,
                                           progress=not args.no_progress)
    res["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
    res["warnings"] = warnings
    res["profiles"] = {str(t): p for t, p in profiles.items()}
    devices = make_devices(raw, profiles)
    res["held_out"] = [d.name for d in devices if d.held_out]
    res["devices"] = evaluate_devices(seed_model, devices)
    seen = [d for d in devices if not d.held_out]
    res["summary"] = {m: spread([res["devices"][d.name][m]["mape"] for d in seen])
                      for m in ("baseline", "seed", "online", "floor")}
    res["learning_curves"] = {d.name: learning_curve(seed_model, d)
                              for d in devices if d.held_out}
    res["call_costs"] = call_costs(seed_model, devices)
    if args.compare:
        print("comparing River regressors on the same streams ...", file=sys.stderr)
        res["regressors"] = compare_regressors(seed_path, devices)
    res["elapsed_s"] = round(time.perf_counter() - t0, 1)
    print_report(res)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0 if all(math.isfinite(v["median"] or 0) for v in res["summary"].values()) else 1
