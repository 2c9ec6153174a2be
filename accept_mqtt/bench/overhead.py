"""``accept-mqtt bench overhead``: what accept-mqtt costs over torch pipelining and one process.

For each chosen zoo model (``--models``; ``CASES``), on this machine's loopback, with no
emulation at all (every device at full speed, no link shaping, no compression: fp32), it
trains the same model from the same seed on the same mini-batches with the same
micro-batching (``--micro-batches``, ``--schedule``) and the same SGD, several ways:

1. ``accept-mqtt``: a private Mosquitto and 3 local device agents (``harness.local``), one
   thread each, and a ``Coordinator`` with ``partition="equal"`` (drift re-planning off, so
   the cuts never move) and the default ``in_flight="auto"``: under 1F1B the planner lets
   stage 0 run up to ``M`` micro-batches ahead when memory allows (here it always does; the
   plan's figure is printed); the cluster is started once per model and reused by every
   repeat;
2. ``accept-textbook`` (1F1B only): the same with ``in_flight`` = the stage count, the bound
   of textbook 1F1B and of torch's ``Schedule1F1B``: the runtimes compared on exactly the same
   schedule;
3. ``torch-pipelining``: ``torch.distributed.pipelining`` over gloo on 127.0.0.1, one process
   per stage, one thread each (``bench/torchpipe.py``), the configured schedule, on the SAME
   cuts: the equal split accept-mqtt's planner makes (``planning.partition.equal_split``),
   checked against the plan in accept-mqtt's record;
4. ``torch-gpipe`` (when the configured schedule is 1F1B): the same with ``ScheduleGPipe``,
   which keeps every micro-batch in flight as accept-mqtt's deeper 1F1B may: a user of torch
   picks the faster of its two schedules, so ``accept/best-torch`` divides by that;
5. ``one-process``: the whole model in this process, one thread.

Speed is samples/s over optimizer steps 1..N-1 of each run (step 0 is an untimed warm-up in
all three: accept-mqtt's per-step times come from the coordinator's step progress events,
each from sending the first micro-batch to every stage's "stepped"). The three are
interleaved within every repeat, so machine noise hits them alike, and the ratios
accept/torch and accept/one-process are taken per repeat, side by side, then their median
(with min-max) is reported. Each run's per-step losses are compared with one-process
training's (in the first epoch they see the same samples): equal losses mean the three did
the same arithmetic, so the ratios compare systems, not work.

Honest limits: everything shares this machine's cores (accept-mqtt: broker, coordinator and
3 agents; torch: 3 workers); idle agents sleep in their MQTT loop while the other two run.
A 1-minute load average above 1.0 at the start is printed as a warning: the numbers of a
busy machine are noisy. Speed targets belong here, never in timed tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from accept_mqtt.bench import torchpipe
from accept_mqtt.coordinator import Coordinator
from accept_mqtt.coordinator.config import TrainConfig
from accept_mqtt.harness.local import AgentSpec, LocalCluster
from accept_mqtt.model.zoo import build_model
from accept_mqtt.planning.partition import equal_split
from accept_mqtt.planning.partition.problem import Device, PartitionProblem


@dataclass(frozen=True)
class Case:
    """One model as benchmarked: zoo name, width, batch size and learning rate."""

    model: str
    width: float
    batch_size: int
    lr: float


CASES: dict[str, Case] = {
    "cnn": Case("cnn", 1.0, 64, 0.05),  # digits, 8x8x1
    "vgg-0.25": Case("vgg", 0.25, 32, 0.02),  # 32x32x3, as in bench e2e
    "vgg-1": Case("vgg", 1.0, 32, 0.02),
    "mobilenet-0.5": Case("mobilenet", 0.5, 32, 0.02),
    "mlp": Case("mlp", 1.0, 64, 0.05),
    "har1d": Case("har1d", 1.0, 64, 0.05),
}
DEFAULT_MODELS = "cnn,vgg-0.25,vgg-1"
METHODS = ("accept-mqtt", "accept-textbook", "torch-pipelining", "torch-gpipe", "one-process")
ONLY_1F1B = ("accept-textbook", "torch-gpipe")  # what the methods add under 1F1B only
STAGES = 3
EMULATION = "none: loopback, every stage at full speed, no link shaping, fp32 frames"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", help=f"comma-separated, of {', '.join(CASES)} "
                                    f"(default {DEFAULT_MODELS}; --quick: cnn)")
    p.add_argument("--repeats", type=int, help="interleaved repeats per model (default 3)")
    p.add_argument("--steps", type=int,
                   help="optimizer steps per run, the first untimed (default 20)")
    p.add_argument("--micro-batches", type=int, default=4)
    p.add_argument("--schedule", choices=torchpipe.SCHEDULES, default="1f1b")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--json", metavar="PATH", help="write the results here")
    p.add_argument("--quick", action="store_true",
                   help="1 repeat, 6 steps, cnn only (explicit flags win)")


def methods_for(schedule: str) -> tuple[str, ...]:
    """The methods run under ``schedule`` (``ONLY_1F1B`` need 1F1B to differ from the rest)."""
    return tuple(m for m in METHODS if schedule == "1f1b" or m not in ONLY_1F1B)


def equal_cuts(model: str, width: float, stages: int = STAGES) -> list[int]:
    """The cuts accept-mqtt's ``partition="equal"`` makes: the planner's own ``equal_split``
    on a problem of this model's layer count (costs do not matter to it)."""
    n = len(build_model(model, seed=0, width=width).layers)
    p = PartitionProblem(devices=tuple(Device(f"d{i}") for i in range(stages)),
                         compute_ms=np.zeros((stages, n)), out_elems=np.ones(n))
    return [int(c) for c in equal_split(p).cuts]


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform()}


def timed_steps(steps: list[dict[str, Any]]) -> tuple[float, int] | None:
    """(seconds, samples) of steps 1..N-1 from the coordinator's "step" progress events."""
    timed = steps[1:]
    if not timed or not all("step_ms" in s and "samples_per_s" in s for s in timed):
        return None
    secs = sum(float(s["step_ms"]) for s in timed) / 1e3
    samples = sum(round(float(s["samples_per_s"]) * float(s["step_ms"]) / 1e3) for s in timed)
    return secs, samples


async def _accept_once(url: str, cfg: TrainConfig, job: str) -> tuple[dict[str, Any],
                                                                      list[dict[str, Any]]]:
    steps: list[dict[str, Any]] = []

    def progress(kind: str, info: dict[str, Any]) -> None:
        if kind == "step":
            steps.append(dict(info))

    async with Coordinator(url, cfg, job=job, progress=progress) as coord:
        rec = await coord.run()
    return rec, steps


def run_accept(url: str, case: Case, steps: int, args: argparse.Namespace, job: str,
               runs_dir: str, textbook: bool = False) -> dict[str, Any]:
    """One accept-mqtt run; ``textbook``: 1F1B's own bound (``in_flight`` = the stages)."""
    cfg = TrainConfig(model=case.model, width=case.width, lr=case.lr, batch_size=case.batch_size,
                      micro_batches=args.micro_batches, schedule=args.schedule, seed=args.seed,
                      in_flight=STAGES if textbook else "auto",
                      epochs=steps, max_steps=steps,  # max_steps decides
                      devices=STAGES, partition="equal", auto_replan=False,
                      checkpoint_every=0, runs_dir=runs_dir, device_timeout=120,
                      lr_schedule="constant")  # the constant lr the other two use
    rec, events = asyncio.run(_accept_once(url, cfg, job))
    timed = timed_steps(events)
    if timed is None:  # the coordinator's progress events changed: say what was measured
        sps, secs, samples, warm = rec["samples_per_s"], rec["train_seconds"], rec["samples"], 0
    else:
        secs, samples = timed
        sps, warm = samples / max(secs, 1e-9), 1
    return {"method": "accept-textbook" if textbook else "accept-mqtt", "samples_per_s": sps,
            "in_flight": rec["plan"].get("in_flight"), "train_seconds": secs,
            "samples": samples, "warmup_steps": warm, "steps": rec["steps"],
            "record_samples_per_s": rec["samples_per_s"],
            "step_ms": [s.get("step_ms") for s in events],
            "losses": [s.get("loss") for s in events],
            "cuts": [s["start"] for s in rec["plan"]["stages"]] + [
                rec["plan"]["stages"][-1]["end"]]}


def _loss_diff(a: list[Any], b: list[float], n: int) -> float | None:
    """Largest |loss difference| over the first ``n`` steps (None if either lacks them)."""
    pairs = [(x, y) for x, y in zip(a[:n], b[:n], strict=False) if x is not None]
    return max(abs(float(x) - y) for x, y in pairs) if pairs else None


def spread(values: list[float]) -> dict[str, float]:
    """``{"median", "min", "max"}`` of ``values``."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run(args: argparse.Namespace) -> int:
    names = [m for m in (args.models or ("cnn" if args.quick else DEFAULT_MODELS)).split(",")
             if m]
    unknown = [m for m in names if m not in CASES]
    if unknown:
        print(f"unknown models {unknown}; known: {list(CASES)}", file=sys.stderr)
        return 2
    repeats = args.repeats or (1 if args.quick else 3)
    steps = args.steps or (6 if args.quick else 20)
    if steps < 2 or repeats < 1:
        print("--steps must be >= 2 (the first is untimed) and --repeats >= 1", file=sys.stderr)
        return 2
    if args.schedule == "1f1b" and args.micro_batches < STAGES:
        print(f"--micro-batches {args.micro_batches} is below the {STAGES} stages: torch's "
              f"Schedule1F1B refuses that (use --schedule gpipe)", file=sys.stderr)
        return 2
    load1 = os.getloadavg()[0]
    mach = machine()
    results: dict[str, Any] = {
        "what": "samples/s of synchronous pipeline training over optimizer steps 1..N-1 "
                "(step 0 untimed), median [min-max] of interleaved repeats; ratios are "
                "medians of same-repeat ratios",
        "emulation": EMULATION, "machine": mach, "load_average_1min_at_start": load1,
        "repeats": repeats, "steps": steps, "micro_batches": args.micro_batches,
        "schedule": args.schedule, "stages": STAGES, "threads_per_process": 1,
        "seed": args.seed, "torch_timing": torchpipe.TIMING, "models": {},
    }
    print(f"bench overhead: loopback, no emulation (full speed, no link shaping, fp32); "
          f"{STAGES} stages, 1 thread per process; {steps} steps per run (step 0 untimed), "
          f"{repeats} repeat(s), interleaved", flush=True)
    print(f"machine: {mach['cpu']}, {mach['cores']} cores, python {mach['python']}, "
          f"torch {mach['torch']}; load average (1 min) {load1:.2f}", flush=True)
    if load1 > 1.0:
        print(f"WARNING: the 1-minute load average was {load1:.2f} (> 1.0) at the start: the "
              f"CPU is busy and these numbers are noisy", flush=True)
    runs_dir = tempfile.mkdtemp(prefix="bench-overhead-")
    t_bench = time.time()
    try:
        for name in names:
            case = CASES[name]
            if case.batch_size % args.micro_batches:
                print(f"[{name}] skipped: batch {case.batch_size} does not split into "
                      f"{args.micro_batches} equal micro-batches (torch pipelining needs that)")
                continue
            cuts = equal_cuts(case.model, case.width)
            runs = _bench_model(name, case, cuts, steps, repeats, args, runs_dir)
            results["models"][name] = _summarize(name, case, cuts, runs, steps)
    finally:
        shutil.rmtree(runs_dir, ignore_errors=True)  # accept-mqtt's run records
    results["bench_seconds"] = round(time.time() - t_bench, 1)
    print(f"\nbench took {results['bench_seconds']:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0


def _bench_model(name: str, case: Case, cuts: list[int], steps: int, repeats: int,
                 args: argparse.Namespace, runs_dir: str) -> dict[str, list[dict[str, Any]]]:
    """Every method once per repeat, interleaved; one cluster for all of accept-mqtt's runs."""
    common: dict[str, Any] = {"batch_size": case.batch_size, "micro_batches": args.micro_batches,
                              "steps": steps, "seed": args.seed, "lr": case.lr, "threads": 1}
    methods = methods_for(args.schedule)
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    specs = [AgentSpec(f"ovh-{i}", 1.0, None, threads=1) for i in range(STAGES)]
    with LocalCluster(specs) as cluster:
        for r in range(repeats):
            for method in methods:
                t0 = time.time()
                if method.startswith("accept"):
                    job = re.sub(r"[^A-Za-z0-9_-]", "_", f"ovh-{os.getpid()}-{name}-{method}-{r}")
                    res = run_accept(cluster.url, case, steps, args, job, runs_dir,
                                     textbook=method == "accept-textbook")
                    if res["cuts"] != cuts:
                        print(f"[{name}] WARNING: accept-mqtt planned cuts {res['cuts']}, not "
                              f"the equal split {cuts} torch uses", flush=True)
                elif method.startswith("torch"):
                    sched = "gpipe" if method == "torch-gpipe" else args.schedule
                    res = torchpipe.run_torch_pipeline(case.model, case.width, cuts,
                                                       schedule=sched, **common)
                else:
                    res = torchpipe.run_one_process(case.model, case.width, **common)
                runs[method].append(res)
                depth = f", in_flight {res['in_flight']}" if res.get("in_flight") else ""
                print(f"[{name}] repeat {r + 1}/{repeats} {method:17s} "
                      f"{res['samples_per_s']:9.1f} samples/s  ({time.time() - t0:.1f} s{depth})",
                      flush=True)
    return runs


def _summarize(name: str, case: Case, cuts: list[int], runs: dict[str, list[dict[str, Any]]],
               steps: int) -> dict[str, Any]:
    """The per-model table (printed) and its JSON."""
    methods = list(runs)
    sps = {m: [x["samples_per_s"] for x in runs[m]] for m in methods}

    def per_repeat(a: list[float], b: list[float]) -> list[float]:
        return [x / y for x, y in zip(a, b, strict=True)]

    ratios = {"accept/torch": per_repeat(sps["accept-mqtt"], sps["torch-pipelining"])}
    if "torch-gpipe" in sps:
        best = [max(a, b) for a, b in zip(sps["torch-pipelining"], sps["torch-gpipe"],
                                          strict=True)]
        ratios["accept/best-torch"] = per_repeat(sps["accept-mqtt"], best)
        ratios["textbook/torch"] = per_repeat(sps["accept-textbook"], sps["torch-pipelining"])
    ratios["accept/one-process"] = per_repeat(sps["accept-mqtt"], sps["one-process"])
    ratios["torch/one-process"] = per_repeat(sps["torch-pipelining"], sps["one-process"])
    # in the first epoch all three see the same samples in the same order
    n = min(steps, runs["one-process"][-1]["full_batches_per_epoch"])
    ref = runs["one-process"][-1]["losses"]
    loss_diff = {m: _loss_diff(runs[m][-1]["losses"], ref, n) for m in methods
                 if m != "one-process"}
    out = {
        "model": case.model, "width": case.width, "batch_size": case.batch_size, "lr": case.lr,
        "cuts": cuts, "samples_per_s": {m: spread(v) for m, v in sps.items()},
        "samples_per_s_per_repeat": sps,
        "ratios": {k: spread(v) for k, v in ratios.items()}, "ratios_per_repeat": ratios,
        "max_loss_diff_vs_one_process": loss_diff,
        "accept_warmup_excluded": all(x["warmup_steps"] == 1 for x in runs["accept-mqtt"]),
        "accept_record_samples_per_s": [x["record_samples_per_s"] for x in runs["accept-mqtt"]],
        "torch_stages": runs["torch-pipelining"][-1]["stages"],
        "step_ms": {m: runs[m][-1]["step_ms"] for m in methods},
        "in_flight": {m: runs[m][-1]["in_flight"] for m in methods if m.startswith("accept")},
    }
    print(f"\n{name}: {case.model} width {case.width:g}, batch {case.batch_size}, cuts {cuts} "
          f"(accept-mqtt's equal split) for both pipelines")
    print(f"{'method':20s} samples/s median [min-max]")
    for m in methods:
        row = out["samples_per_s"][m]
        depth = f"  (in_flight {out['in_flight'][m]})" if out["in_flight"].get(m) else ""
        print(f"{m:20s} {row['median']:9.1f} [{row['min']:.1f}-{row['max']:.1f}]{depth}")
    for k, row in out["ratios"].items():
        print(f"{k:20s} {row['median']:8.3f}x [{row['min']:.3f}-{row['max']:.3f}]  "
              f"(median of same-repeat ratios)")
    diffs = ", ".join(f"{m} {'n/a' if d is None else f'{d:.2g}'}" for m, d in loss_diff.items())
    print(f"{'':20s} max |per-step loss - one-process's|: {diffs}")
    if not out["accept_warmup_excluded"]:
        print(f"{'':20s} note: accept-mqtt's step events were missing; its figure is the "
              f"record's, warm-up step included")
    return out
