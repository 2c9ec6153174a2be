"""``accept-mqtt bench e2e``: end-to-end training speed on an emulated heterogeneous cluster.

Each scenario starts one private Mosquitto and one agent process per device, with compute
emulation (``--slowdown``: sleep after compute, so slow devices take no CPU from others on a
2-core machine) and link emulation, ``--shaping``:

* ``tc``: Mosquitto and every agent in their own network namespace, each agent's uplink a veth
  shaped by a ``tbf`` qdisc at its bandwidth (``accept_mqtt/harness/netem.py``); agents only
  advertise their bandwidth (``--no-pace``), the kernel shapes. Needs root, ``ip netns`` and ``tc``.
* ``pace``: one loopback broker; each agent paces its own sends (``device_agent/link.py``).
* ``auto`` (default): ``tc`` where it works, else ``pace``, saying why.

A scenario (``SCENARIOS``) is a cluster and the run measured on it: model, width, batch size,
steps and learning rate (the digits CNN by default, and a reduced VGG on 32x32x3 images whose
cuts carry thousands of values per sample); ``--model``, ``--width``, ``--batch-size`` and
``--steps`` override them for every scenario. Then, interleaved in one invocation so machine
noise hits all alike, it trains the same model for the same number of steps with:

1. ``equal-fp32``: equal layer counts, fp32 frames (the baseline);
2. ``flops-fp32``: FLOPs-proportional split, fp32;
3. ``predictor-fp32``: the DP fed by the online latency predictor, fp32;
4. ``accept``: the predictor's DP with compressed links (``--act-bits``/``--grad-bits``).

It reports measured samples/s (median of repeats, with min-max), speed-up over the baseline
measured side by side, the ideal bound (measured per-layer compute of the whole model on this
machine, over the summed device speeds, links ignored), the fraction of the bound reached,
predicted vs measured stage times (compute and uplink per micro-batch), and held-out accuracy
and loss after the same steps (fp32 runs are bit-identical whatever the split).

Every agent traces one step (``--trace-step``, default the middle one) and the bench collects
the spans with its own subscriber (``bench/timeline.py``): the JSON carries them with a
summary (step ms, per-stage compute/send/idle, per-hop latency), and ``--plot PATH.png`` draws
the per-stage timeline of the baseline and AccEPT side by side, one row per scenario.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from accept_mqtt.coordinator import Coordinator
from accept_mqtt.coordinator.config import TrainConfig
from accept_mqtt.harness.local import AgentSpec, LocalCluster
from accept_mqtt.model.descriptors import describe
from accept_mqtt.model.stage import StageRunner
from accept_mqtt.model.zoo import build_model

from . import timeline


@dataclass(frozen=True)
class Scenario:
    """A cluster (``devices``: (slowdown, uplink) each) and the training run measured on it."""

    devices: tuple[tuple[float, str], ...]
    model: str = "cnn"
    width: float = 1.0
    batch_size: int = 64
    steps: int = 30
    lr: float = 0.05


SCENARIOS: dict[str, Scenario] = {
    "3dev-speeds-1-1/2-1/4-slow-links": Scenario(
        ((1.0, "10mbit"), (2.0, "50mbit"), (4.0, "10mbit"))),
    "4dev-one-much-slower": Scenario(
        ((1.0, "50mbit"), (1.0, "50mbit"), (1.0, "50mbit"), (6.0, "50mbit"))),
    # a model whose cheap cuts carry thousands of values per sample, so that balancing
    # compute means sending big tensors and compression can move the cuts; lr 0.02 because
    # 0.05 makes this VGG's held-out accuracy swing by 10 points from step to step
    "vgg-3dev-speeds-1-1/2-1/4-20mbit": Scenario(
        ((1.0, "20mbit"), (2.0, "20mbit"), (4.0, "20mbit")), model="vgg", width=0.25,
        batch_size=32, steps=40, lr=0.02),
}


def methods(act_bits: int, grad_bits: int) -> dict[str, dict[str, Any]]:
    return {
        "equal-fp32": {"partition": "equal"},
        "flops-fp32": {"partition": "flops"},
        "predictor-fp32": {"partition": "auto"},
        "accept": {"partition": "auto", "act_bits": act_bits, "grad_bits": grad_bits},
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", help="write results here")
    p.add_argument("--model", help="override every scenario's model (cnn, vgg, ...)")
    p.add_argument("--width", type=float, help="override every scenario's model width")
    p.add_argument("--steps", type=int, help="override every scenario's optimizer steps per run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, help="override every scenario's batch size")
    p.add_argument("--micro-batches", type=int, default=4)
    p.add_argument("--act-bits", type=int, default=8)
    p.add_argument("--grad-bits", type=int, default=8)
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated names")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--quick", action="store_true", help="1 repeat, 10 steps, first scenario")
    p.add_argument("--shaping", choices=("auto", "pace", "tc"), default="auto",
                   help="link emulation: tc (namespaces + tbf, needs root), pace (agents pace "
                        "their sends), auto: tc when available (default)")
    p.add_argument("--trace-step", type=int, default=None,
                   help="optimizer step whose per-stage spans are recorded (default: middle)")
    p.add_argument("--plot", metavar="PATH.png",
                   help="draw the traced step's timeline, baseline vs AccEPT, per scenario")


def measured_layer_ms(model_name: str, batch: int, reps: int = 5,
                      width: float = 1.0) -> list[float]:
    """Median fwd+bwd ms per layer of the whole model on this machine, one thread."""
    torch.set_num_threads(1)
    m = build_model(model_name, seed=0, width=width)
    descs = describe(m)
    runner = StageRunner(m.layers, descs, m.input_shape, True, True, {"name": "sgd", "lr": 0.0})
    x = torch.randn(batch, *m.input_shape)
    y = torch.zeros(batch, dtype=torch.long)
    per: list[list[float]] = [[] for _ in descs]
    for r in range(reps + 1):
        runner.forward((r, 0), x, y)
        runner.backward((r, 0))
        samples = runner.drain_timings()
        if r == 0:
            continue  # warm-up
        acc = [0.0] * len(descs)
        for s in samples:
            acc[s["layer"]["index"]] += s["ms"]
        for i, v in enumerate(acc):
            per[i].append(v)
    return [statistics.median(v) for v in per]


async def _one(url: str, cfg: TrainConfig, job: str) -> tuple[dict[str, Any],
                                                               list[timeline.Trace]]:
    async with timeline.TraceCollector(url, job) as traces:
        async with Coordinator(url, cfg, job=job) as coord:
            rec = await coord.run()
        return rec, await traces.wait(cfg.devices, timeout=10)


def choose_shaping(wanted: str) -> tuple[str, str]:
    """(``tc`` or ``pace``, why) for ``--shaping``; raises SystemExit if tc is demanded but
    unavailable."""
    from accept_mqtt.harness import netem

    if wanted == "pace":
        return "pace", "asked for agent-side pacing"
    ok = netem.available()
    if ok:
        return "tc", f"tc available: {ok.reason}"
    if wanted == "tc":
        raise SystemExit(f"bench e2e: --shaping tc unavailable: {ok.reason}")
    print(f"tc shaping unavailable ({ok.reason}); falling back to agent-side send pacing",
          flush=True)
    return "pace", f"tc unavailable: {ok.reason}"


EMULATION = {
    "tc": "compute: agent sleeps (slowdown-1)x after compute; links: each agent in its own "
          "network namespace, uplink veth shaped by a tc tbf qdisc at its bandwidth (counts "
          "TCP/IP headers), broker in its own namespace, coordinator unshaped",
    "pace": "compute: agent sleeps (slowdown-1)x after compute; links: agent-side send pacing "
            "at the given bandwidth (payload bytes only; no tc)",
}


def run(args: argparse.Namespace) -> int:
    names = [s for s in args.scenarios.split(",") if s]
    unknown = [s for s in names if s not in SCENARIOS]
    if unknown:
        print(f"unknown scenarios {unknown}; known: {list(SCENARIOS)}")
        return 2
    repeats = args.repeats
    over = {k: v for k, v in (("model", args.model), ("width", args.width),
                              ("steps", args.steps), ("batch_size", args.batch_size))
            if v is not None}
    if args.quick:
        over["steps"], repeats, names = 10, 1, names[:1]
    shaping, why = choose_shaping(args.shaping)
    results: dict[str, Any] = {
        "what": "samples/s of synchronous pipeline training, measured; median of repeats",
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "shaping": shaping, "shaping_why": why, "emulation": EMULATION[shaping],
        "repeats": repeats, "micro_batches": args.micro_batches, "scenarios": {},
    }
    meths = methods(args.act_bits, args.grad_bits)
    panels: list[tuple[str, list[timeline.Trace]]] = []
    print(f"shaping: {shaping} ({why})", flush=True)
    t_bench = time.time()
    for name in names:
        sc = replace(SCENARIOS[name], **over)
        devs = list(sc.devices)
        steps = sc.steps
        trace_step = steps // 2 if args.trace_step is None else args.trace_step
        mb = max(1, sc.batch_size // args.micro_batches)
        layer_ms = measured_layer_ms(sc.model, mb, width=sc.width)
        specs = [AgentSpec(f"e2e-{i}", s, bw, extra_args=("--trace-steps", str(trace_step)))
                 for i, (s, bw) in enumerate(devs)]
        labels = {sp.device_id: f"{sp.device_id}\n1/{sp.slowdown:g} speed, {sp.bandwidth}"
                  for sp in specs}
        speed = sum(1.0 / s for s, _ in devs)
        ideal_ms = sum(layer_ms) / speed
        bound = mb / ideal_ms * 1e3
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in meths}
        traces: dict[str, list[timeline.Trace]] = {}
        with _cluster(specs, shaping) as cluster:
            hop = asyncio.run(timeline.mqtt_hop_ms(cluster.url))
            print(f"[{name}] MQTT hop through the broker, idle, unshaped: {hop}", flush=True)
            for r in range(repeats):
                for mname, settings in meths.items():  # interleaved
                    cfg = TrainConfig(model=sc.model, width=sc.width, lr=sc.lr,
                                      epochs=steps, max_steps=steps,  # max_steps decides
                                      batch_size=sc.batch_size,
                                      micro_batches=args.micro_batches, seed=args.seed,
                                      devices=len(devs), runs_dir="runs/bench-e2e",
                                      device_timeout=120, **settings)
                    t0 = time.time()
                    rec, tr = asyncio.run(_one(cluster.url, cfg, f"e2e-{r}-{mname}"))
                    runs[mname].append(rec)
                    traces[mname] = [dict(t, label=f"stage {t['stage']}: "
                                          f"{labels.get(t['device'], t['device'])}")
                                     for t in tr]  # the last repeat's (warm) trace is kept
                    print(f"[{name}] repeat {r + 1}/{repeats} {mname:15s} "
                          f"{rec['samples_per_s']:8.1f} samples/s  acc "
                          f"{rec['final_accuracy']:.3f}  ({time.time() - t0:.0f}s)", flush=True)
        base = [x["samples_per_s"] for x in runs["equal-fp32"]]
        table = {}
        for mname, recs in runs.items():
            sps = [x["samples_per_s"] for x in recs]
            ratios = [a / b for a, b in zip(sps, base, strict=True)]  # same repeat, side by side
            last = recs[-1]
            table[mname] = {
                "samples_per_s_median": statistics.median(sps),
                "samples_per_s_min": min(sps), "samples_per_s_max": max(sps),
                "speedup_vs_baseline_median": statistics.median(ratios),
                "fraction_of_ideal": statistics.median(sps) / bound,
                "accuracy_median": statistics.median(x["final_accuracy"] for x in recs),
                "test_loss_median": statistics.median(x["epochs"][-1]["test_loss"]
                                                      for x in recs),
                "steps_done": last["steps"],
                # drift re-plans that moved the cuts, per repeat ("plan" is the last one's)
                "live_replans": [sum(bool(r["changed"]) for r in x["replans"]) for x in recs],
                "plan": [(s["device"], s["start"], s["end"], s["act_bits"], s["grad_bits"])
                         for s in last["plan"]["stages"]],
                "stage_ms_predicted": [s["predicted_ms"] for s in last["stages"]],
                "stage_ms_measured": [s["measured_ms_per_microbatch"] for s in last["stages"]],
                "stage_send_ms_measured": [
                    round(s["send_ms"] / max(1, last["steps"] * args.micro_batches), 3)
                    for s in last["stages"]],
                "trace_summary": _with_inflation(timeline.summarize(traces.get(mname, [])),
                                                 last["plan"]["stages"], layer_ms, devs,
                                                 args.micro_batches),
                "trace": traces.get(mname, []),
            }
        results["scenarios"][name] = {"devices": devs, "model": sc.model, "width": sc.width,
                                      "batch_size": sc.batch_size, "steps": steps,
                                      "lr": sc.lr, "trace_step": trace_step,
                                      "ideal_samples_per_s": bound,
                                      "mqtt_hop_idle": hop,
                                      "methods": table}
        panels += [(f"{name}\nequal-fp32 (baseline)", traces.get("equal-fp32", [])),
                   (f"{name}\nAccEPT (predictor + {args.act_bits}/{args.grad_bits}-bit)",
                    traces.get("accept", []))]
        print(f"\n{name}: {sc.model} width {sc.width:g}, batch {sc.batch_size}, {steps} steps; "
              f"devices (slowdown, uplink) {devs}; shaping {shaping}; ideal bound "
              f"{bound:.0f} samples/s")
        print(f"{'method':16s} {'samples/s med [min-max]':>26s} {'speed-up':>9s} "
              f"{'of ideal':>9s} {'accuracy':>9s} {'test loss':>9s}")
        for mname, row in table.items():
            print(f"{mname:16s} {row['samples_per_s_median']:10.1f} "
                  f"[{row['samples_per_s_min']:.0f}-{row['samples_per_s_max']:.0f}]"
                  f"{'':>4s} {row['speedup_vs_baseline_median']:8.2f}x "
                  f"{100 * row['fraction_of_ideal']:8.1f}% {row['accuracy_median']:9.3f} "
                  f"{row['test_loss_median']:9.4f}")
            print(f"{'':16s} plan {row['plan']}; ms per micro-batch predicted "
                  f"{[round(v or 0, 1) for v in row['stage_ms_predicted']]}, measured compute "
                  f"{[round(v, 1) for v in row['stage_ms_measured']]}, send "
                  f"{[round(v, 1) for v in row['stage_send_ms_measured']]}")
            tsum = row["trace_summary"]
            if tsum:
                print(f"{'':16s} traced step {tsum['step_ms']:.1f} ms, hop median "
                      f"{tsum['hop_ms_median']} ms, send median {tsum['send_ms_median']} ms, "
                      f"compute per stage {[s['compute_ms'] for s in tsum['stages']]} ms "
                      f"({tsum['compute_vs_isolated']}x the isolated measurement)")
    results["bench_seconds"] = round(time.time() - t_bench, 1)
    print(f"\nbench took {results['bench_seconds']:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
        print(f"wrote {args.json}")
    if args.plot:
        title = (f"the traced (middle) step, {args.micro_batches} micro-batches per batch; "
                 f"links shaped by {shaping}")
        out = timeline.render(panels, args.plot, suptitle=title)
        print(f"wrote {out}")
    return 0


def _with_inflation(summary: dict[str, Any], stages: list[dict[str, Any]],
                    layer_ms: list[float], devs: list[tuple[float, str]],
                    nmb: int) -> dict[str, Any]:
    """Add, per stage, traced fwd+bwd ms over what the isolated per-layer measurement predicts
    for its layers, micro-batches and slowdown: how much slower compute is inside the pipeline
    (CPU shared by every agent and the broker, thread hand-offs, Python) than alone."""
    if not summary:
        return summary
    slow = {f"e2e-{i}": s for i, (s, _) in enumerate(devs)}
    rows = {int(r["stage"]): r for r in summary["stages"]}
    ratios: list[float | None] = []
    for st in stages:
        want = sum(layer_ms[st["start"]:st["end"]]) * nmb * slow.get(st["device"], 1.0)
        row = rows.get(int(st["index"]))
        ratios.append(round(row["fwd_bwd_ms"] / want, 2) if row and want > 0 else None)
    return dict(summary, compute_vs_isolated=ratios)


def _cluster(specs: list[AgentSpec], shaping: str) -> LocalCluster:
    if shaping == "tc":
        from accept_mqtt.harness.netem import ShapedCluster

        return ShapedCluster(specs)
    return LocalCluster(specs)
