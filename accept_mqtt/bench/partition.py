"""``accept-mqtt bench partition``: the planner against its baselines, predicted (no training).

For every zoo model, over the first K = 2..5 devices of an emulated heterogeneous cluster, it
prints the predicted steady-state ms per micro-batch of each method, the ideal bound and the
planning time, then the same comparison summarised over random clusters, and writes JSON.

Cost model (said in the output): per-layer fwd and bwd ms at the micro-batch size are
*measured* once on this machine with one torch thread (median of ``--reps``), and device ``d``
of speed ``s_d`` costs ``ms / s_d`` — the same emulation as ``--slowdown``; ``--cost flops``
uses ``3 x FLOPs`` at the GFLOP/s of a matmul micro-benchmark instead. Codec cost: the real
codec's k-bit encode/decode when it has one, else a numpy min-max quantise + LSB-first
bit-pack stand-in, timed here; scaled per device by ``1 / s_d``.

Guarantee: every number comes from ``accept_mqtt.partition.evaluate`` on the same problem, so
methods are compared under one cost model; nothing is trained or sent.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from accept_mqtt.planning.partition import (
    CodecCost,
    Device,
    InfeasiblePlanError,
    PartitionProblem,
    PartitionResult,
    dp_flops,
    equal_split,
    flops_split,
    ideal_bound_ms,
    partition,
    problem_from_profiles,
)

MODELS = ("cnn", "mlp", "har1d", "vgg", "mobilenet")
# The emulated cluster: (id, speed relative to this machine, uplink bit/s, memory MB).
CLUSTER = (
    ("laptop", 1.0, 100e6, 8192),
    ("jetson", 0.5, 50e6, 4096),
    ("pi4", 0.25, 20e6, 2048),
    ("pi3", 0.125, 10e6, 1024),
    ("phone", 0.5, 5e6, 3072),
)
METHODS = ("equal", "flops-equal", "dp-flops", "dp-fp32", "dp-comp")
COMP_ACT, COMP_GRAD, MIN_ACT, MIN_GRAD = (32, 16, 8, 4), (32, 16, 8), 4, 8


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", type=Path, default=None, help="write results here")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated zoo models")
    p.add_argument("--batch", type=int, default=32, help="mini-batch size (samples)")
    p.add_argument("--micro-batches", type=int, default=4, help="micro-batches per mini-batch")
    p.add_argument("--cost", choices=("measured", "flops"), default="measured",
                   help="per-layer reference cost: timed here, or FLOPs at matmul GFLOP/s")
    p.add_argument("--reps", type=int, default=5, help="timing repetitions per layer")
    p.add_argument("--plan-runs", type=int, default=7, help="planning-time repetitions")
    p.add_argument("--random-clusters", type=int, default=10,
                   help="random clusters per (model, K) for the summary")
    p.add_argument("--seed", type=int, default=0)


# -- reference costs ------------------------------------------------------------------------

def _layer_costs(name: str, mb: int, mode: str, reps: int) -> tuple[list[float], list[float]]:
    """(fwd_ms, bwd_ms) per layer for one micro-batch of ``mb`` samples on this machine."""
    import torch

    from accept_mqtt.model.descriptors import describe
    from accept_mqtt.model.zoo import build_model

    model = build_model(name, seed=0)
    if mode == "flops":
        from accept_mqtt.model.hardware import microbench_gflops

        g = microbench_gflops(1)
        f = [d.flops * mb / (g * 1e6) for d in describe(model)]
        return f, [2 * x for x in f]
    fwd, bwd = [], []
    x = torch.randn(mb, *model.input_shape)
    for layer in model.layers:
        layer.train()
        tf, tb = [], []
        for _ in range(reps + 1):
            xi = x.detach().requires_grad_(True)
            t0 = time.perf_counter()
            y = layer(xi)
            t1 = time.perf_counter()
            y.backward(torch.ones_like(y))
            t2 = time.perf_counter()
            tf.append((t1 - t0) * 1e3)
            tb.append((t2 - t1) * 1e3)
        fwd.append(statistics.median(tf[1:]))
        bwd.append(statistics.median(tb[1:]))
        x = y.detach()
    return fwd, bwd


def _codec_cost() -> tuple[CodecCost, str]:
    """ms per element to encode / decode, timed on 1M elements at 4 bits."""
    import torch

    from accept_mqtt.wire import codec

    x = torch.randn(1 << 20)
    n = x.numel()
    try:
        t0 = time.perf_counter()
        fr = codec.encode(x, bits=4, job="b", step=0, mb=0, kind="act")
        t1 = time.perf_counter()
        codec.decode(fr)
        t2 = time.perf_counter()
        how = "accept_mqtt.wire.codec minmax, 4 bits"
    except (ValueError, NotImplementedError):
        a = x.numpy()
        t0 = time.perf_counter()
        packed, lo, scale = _standin_encode(a, 4)
        t1 = time.perf_counter()
        _standin_decode(packed, lo, scale, 4, n)
        t2 = time.perf_counter()
        how = "numpy min-max + LSB-first bit-pack stand-in, 4 bits (codec has no minmax yet)"
    a32 = x.numpy()
    t3 = time.perf_counter()
    np.frombuffer(a32.astype("<f2").tobytes(), "<f2").astype(np.float32)
    raw16 = (time.perf_counter() - t3) * 1e3 / n / 2
    return CodecCost.minmax((t1 - t0) * 1e3 / n, (t2 - t1) * 1e3 / n, raw16), how


def _standin_encode(a: np.ndarray, bits: int) -> tuple[np.ndarray, float, float]:
    lo, hi = float(a.min()), float(a.max())
    scale = (hi - lo) / (2**bits - 1) or 1.0
    codes = np.rint((a - lo) / scale).astype(np.uint8)
    planes = np.unpackbits(codes[:, None], axis=1, bitorder="little")[:, :bits]
    return np.packbits(planes.reshape(-1), bitorder="little"), lo, scale


def _standin_decode(packed: np.ndarray, lo: float, scale: float, bits: int,
                    n: int) -> np.ndarray:
    planes = np.unpackbits(packed, bitorder="little")[: n * bits].reshape(n, bits)
    codes = np.packbits(np.pad(planes, ((0, 0), (0, 8 - bits))), axis=1, bitorder="little")
    return lo + codes[:, 0].astype(np.float32) * scale


# -- problems -------------------------------------------------------------------------------

def _problem(descs: list[Any], fwd: list[float], bwd: list[float], cluster: Any, mb: int,
             m: int, codec: CodecCost, compressed: bool) -> PartitionProblem:
    ids = [c[0] for c in cluster]
    profiles = {c[0]: {"memory_mb": c[3], "bandwidth_bps": c[2], "bench_gflops": c[1]}
                for c in cluster}
    return problem_from_profiles(
        ids, [[f / c[1] for f in fwd] for c in cluster], [[b / c[1] for b in bwd] for c in cluster],
        descs, mb, profiles,
        act_bits=COMP_ACT if compressed else (32,), grad_bits=COMP_GRAD if compressed else (32,),
        min_act_bits=MIN_ACT if compressed else 32, min_grad_bits=MIN_GRAD if compressed else 32,
        micro_batches=m, codec=codec, reference_gflops=1.0,
    )


def _methods(p32: PartitionProblem, pc: PartitionProblem) -> dict[str, PartitionResult | None]:
    out: dict[str, PartitionResult | None] = {}
    for name, fn in (("equal", lambda: equal_split(p32)), ("flops-equal", lambda: flops_split(p32)),
                     ("dp-flops", lambda: dp_flops(p32)), ("dp-fp32", lambda: partition(p32)),
                     ("dp-comp", lambda: partition(pc))):
        try:
            out[name] = fn()
        except InfeasiblePlanError:
            out[name] = None
    return out


def _ms(r: PartitionResult | None) -> float | None:
    return None if r is None or not r.feasible else r.bottleneck_ms


def _describe(r: PartitionResult | None) -> str:
    """``device[start:end)`` per stage, then ``a<act bits>/g<grad bits>`` per link."""
    if r is None:
        return "infeasible"
    stages = " ".join(f"{d}[{a}:{b})" for d, a, b in zip(r.devices, r.cuts[:-1], r.cuts[1:],
                                                          strict=True))
    links = ",".join(f"a{a}/g{g}" for a, g in zip(r.act_bits[:-1], r.grad_bits[1:],
                                                   strict=True))
    return f"{stages}  {links}" if links else stages


def _fmt(x: float | None) -> str:
    return "   n/a" if x is None else f"{x:8.1f}"


def _random_cluster(rng: np.random.Generator, k: int) -> list[tuple[str, float, float, int]]:
    return [(f"r{i}", float(rng.choice([1.0, 0.5, 0.25, 0.125])),
             float(rng.choice([5e6, 10e6, 20e6, 50e6, 100e6])),
             int(rng.choice([1024, 2048, 4096]))) for i in range(k)]


def _objectives(p: PartitionProblem) -> dict[str, dict[str, float]]:
    out = {}
    for obj in ("steady", "minibatch"):
        r = partition(p, objective=obj)
        out[obj] = {"stages": r.num_stages, "bottleneck_ms": r.bottleneck_ms,
                    "minibatch_ms": (p.micro_batches + r.num_stages - 1) * r.bottleneck_ms}
    return out


def _scaling(runs: int) -> list[dict[str, Any]]:
    """Planning time on random 50-layer problems, 5/8/10 devices, 1/6/12 bit choices."""
    rng = np.random.default_rng(1)
    out = []
    for n in (5, 8, 10):
        for acts, grads in (((32,), (32,)), ((32, 8, 4), (32, 8)), (COMP_ACT, COMP_GRAD)):
            if n == 10 and len(acts) * len(grads) > 6:
                continue
            base = rng.uniform(0.1, 5.0, 50)
            speeds = rng.choice([1.0, 0.5, 0.25, 0.125], n)
            p = PartitionProblem(
                devices=tuple(Device(f"d{i}", 1e9, float(rng.choice([5e6, 2e7, 1e8])), 1 / s)
                              for i, s in enumerate(speeds)),
                compute_ms=np.stack([base / s for s in speeds]),
                out_elems=rng.integers(1_000, 500_000, 50),
                params=rng.integers(0, 2_000_000, 50), act_bits=acts, grad_bits=grads,
                min_act_bits=1, min_grad_bits=1)
            partition(p)
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                partition(p)
                times.append((time.perf_counter() - t0) * 1e3)
            out.append({"devices": n, "layers": 50, "choices": len(acts) * len(grads),
                        "runs": runs, "median": statistics.median(times), "min": min(times),
                        "max": max(times)})
    return out


def run(args: argparse.Namespace) -> int:
    import torch

    from accept_mqtt.model.descriptors import describe
    from accept_mqtt.model.zoo import build_model

    torch.set_num_threads(1)
    mb = args.batch // args.micro_batches
    codec, codec_how = _codec_cost()
    rng = np.random.default_rng(args.seed)
    rows: list[dict[str, Any]] = []
    summary: dict[str, list[float]] = {m: [] for m in METHODS if m != "dp-comp"}
    summary_wins: dict[str, int] = {m: 0 for m in summary}
    summary_n: dict[str, int] = {m: 0 for m in summary}
    refs: dict[str, Any] = {}
    mbo: dict[str, dict[str, dict[str, float]]] = {}
    print(f"partition bench: batch {args.batch} = {args.micro_batches} micro-batches of {mb}; "
          f"reference cost {args.cost} (1 torch thread) / device speed; codec: {codec_how} "
          f"(encode {codec.encode(4) * 1e6:.1f} ns/elem, decode {codec.decode(4) * 1e6:.1f} "
          f"ns/elem); dp-comp act bits {COMP_ACT} >= {MIN_ACT}, grad {COMP_GRAD} >= {MIN_GRAD}")
    print("cluster: " + ", ".join(f"{c[0]} (x{c[1]:g}, {c[2] / 1e6:g} Mbit/s, {c[3]} MB)"
                                  for c in CLUSTER))
    print("\npredicted ms per micro-batch (steady state, lower is better); "
          f"plan ms = dp-comp planning time, median [min-max] of {args.plan_runs} runs")
    head = (f"{'model':<10}{'L':>3}{'K':>3} " + "".join(f"{m:>12}" for m in METHODS)
            + f"{'ideal':>9}{'speed-up':>9}  {'plan ms':<22}dp-comp plan")
    print(head)
    print("-" * len(head))
    for name in args.models.split(","):
        descs = describe(build_model(name, seed=0))
        fwd, bwd = _layer_costs(name, mb, args.cost, args.reps)
        refs[name] = {"fwd_ms": fwd, "bwd_ms": bwd, "layers": [d.type for d in descs]}
        for k in range(2, len(CLUSTER) + 1):
            cl = CLUSTER[:k]
            p32 = _problem(descs, fwd, bwd, cl, mb, args.micro_batches, codec, False)
            pc = _problem(descs, fwd, bwd, cl, mb, args.micro_batches, codec, True)
            res = _methods(p32, pc)
            times = []
            for _ in range(args.plan_runs):
                t0 = time.perf_counter()
                partition(pc)
                times.append((time.perf_counter() - t0) * 1e3)
            best = res["dp-comp"]
            base = [_ms(res[m]) for m in ("equal", "flops-equal", "dp-flops")]
            base_ok = [b for b in base if b is not None]
            speedup = min(base_ok) / best.bottleneck_ms if best and base_ok else None
            plan = _describe(best)
            med = statistics.median(times)
            print(f"{name:<10}{p32.num_layers:>3}{k:>3} "
                  + "".join(f"{_fmt(_ms(res[m])):>12}" for m in METHODS)
                  + f"{ideal_bound_ms(p32):9.1f}"
                  + (f"{speedup:8.2f}x" if speedup else f"{'n/a':>9}")
                  + f"  {med:6.2f} [{min(times):.2f}-{max(times):.2f}]".ljust(24) + plan)
            rows.append({
                "model": name, "layers": p32.num_layers, "devices": k,
                "ms": {m: _ms(res[m]) for m in METHODS}, "ideal_ms": ideal_bound_ms(p32),
                "speedup_vs_best_baseline": speedup,
                "plan_ms": {"runs": len(times), "median": med, "min": min(times),
                            "max": max(times)},
                "results": {m: (r.to_dict() if r else None) for m, r in res.items()},
            })
            for _ in range(args.random_clusters):
                rc = _random_cluster(rng, k)
                r2 = _methods(_problem(descs, fwd, bwd, rc, mb, args.micro_batches, codec, False),
                              _problem(descs, fwd, bwd, rc, mb, args.micro_batches, codec, True))
                ref = _ms(r2["dp-comp"])
                for m in summary:
                    v = _ms(r2[m])
                    if ref is None or v is None:
                        continue
                    summary[m].append(v / ref)
                    summary_n[m] += 1
                    summary_wins[m] += ref <= v * (1 + 1e-9)
        pc = _problem(descs, fwd, bwd, CLUSTER, mb, args.micro_batches, codec, True)
        mbo[name] = _objectives(pc)
    print(f"\nsteady vs mini-batch objective, dp-comp on all {len(CLUSTER)} devices "
          f"(mini-batch ms = (M + K - 1) x bottleneck, M = {args.micro_batches})")
    print(f"{'model':<10}{'objective':>11}{'K':>3}{'bottleneck':>11}{'mini-batch':>11}")
    for name, res in mbo.items():
        for obj, r in res.items():
            print(f"{name:<10}{obj:>11}{r['stages']:>3}{r['bottleneck_ms']:11.1f}"
                  f"{r['minibatch_ms']:11.1f}")
    scaling = _scaling(args.plan_runs)
    print(f"\nplanning time, random 50-layer problems (ms, median [min-max] of {args.plan_runs})")
    print(f"{'devices':>8}{'choices':>8}{'plan ms':>24}")
    for r in scaling:
        print(f"{r['devices']:>8}{r['choices']:>8}   {r['median']:8.1f} "
              f"[{r['min']:.1f}-{r['max']:.1f}]")
    n_rand = len(args.models.split(",")) * (len(CLUSTER) - 1) * args.random_clusters
    print(f"\nover {n_rand} random clusters (speeds 1..1/8, links 5-100 Mbit/s, 1-4 GB): "
          "method time / dp-comp time")
    print(f"{'method':<12}{'n':>5}{'median':>9}{'geomean':>9}{'max':>9}{'dp-comp <= it':>15}")
    agg = {}
    for m, v in summary.items():
        if not v:
            continue
        a = np.array(v)
        agg[m] = {"n": summary_n[m], "median": float(np.median(a)),
                  "geomean": float(np.exp(np.log(a).mean())), "max": float(a.max()),
                  "dp_comp_not_worse": summary_wins[m]}
        print(f"{m:<12}{summary_n[m]:>5}{np.median(a):9.2f}{agg[m]['geomean']:9.2f}"
              f"{a.max():9.2f}{summary_wins[m]:>10}/{summary_n[m]}")
    out = {
        "bench": "partition", "batch": args.batch, "micro_batches": args.micro_batches,
        "micro_batch_size": mb, "cost_model": args.cost, "codec": codec_how,
        "codec_ms_per_elem": {"encode4": codec.encode(4), "decode4": codec.decode(4),
                              "raw16": codec.encode(16)},
        "cluster": [dict(zip(("id", "speed", "bandwidth_bps", "memory_mb"), c, strict=True))
                    for c in CLUSTER],
        "rows": rows, "random_summary": agg, "objectives": mbo, "plan_scaling": scaling,
        "reference_costs": refs,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
        print(f"\nwrote {args.json}")
    return 0
