"""``accept-mqtt profile``: measure the zoo's layers here to seed the latency predictor.

Guarantees:

* Layers are timed by the very code a device agent runs (``stage.StageRunner``, the whole model
  as one stage), so every sample has the agent's shape: ``{"layer", "dir", "batch", "ms",
  "threads"}``, plus ``"device"``, ``"profile"`` (the profile dict an agent would publish),
  ``"model"``, ``"width"`` and ``"rep"``.
* A slowdown ``s`` is emulated by multiplying measured times by ``s`` -- exactly what an agent
  started with ``--slowdown s`` reports (it sleeps ``(s - 1)`` times each compute and reports
  ``s`` times it) -- and the profile's ``bench_gflops`` is divided by ``s`` as the agent's is.
* ``pin_allocator()`` (called by ``run``) fixes glibc's malloc thresholds first: with the
  default dynamic ones a layer's backward can take 2-4x longer or not depending on which
  tensor sizes the process freed before (page faults after heap trimming), which would make
  times depend on the order of measurement. Agents call it too
  (``model.hardware``), so that what they time matches the seed.
* Samples with no measurable compute (``ms <= 0``: a backward through a layer with neither
  parameters nor an input that needs a gradient) are kept out of the output.
* The output is JSON lines, gzip-compressed when the path ends in ``.gz``, written to a
  temporary file and renamed, so an interrupted run never leaves a half-written file.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from accept_mqtt.model.hardware import pin_allocator, robust_bench

Sample = dict[str, Any]

DEFAULT_PLAN: tuple[tuple[str, float], ...] = (
    ("cnn", 0.5), ("cnn", 1.0), ("cnn", 2.0),
    ("mlp", 0.5), ("mlp", 1.0), ("mlp", 2.0),
    ("har1d", 0.5), ("har1d", 1.0), ("har1d", 2.0),
    ("vgg", 0.5), ("vgg", 1.0),
    ("mobilenet", 0.5), ("mobilenet", 1.0),
)


def measure(name: str, width: float, *, threads: int, batch: int, reps: int, warmup: int = 2,
            seed: int = 0) -> Iterator[list[Sample]]:
    """Yield the timing samples of ``reps`` training iterations (fwd + bwd) of a zoo model.

    Each yielded list is one iteration: every layer's forward then backward sample, as an agent
    holding the whole model as one stage would publish them for one micro-batch.
    """
    import torch

    from accept_mqtt.model.descriptors import describe
    from accept_mqtt.model.stage import StageRunner
    from accept_mqtt.model.zoo import build_model

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = build_model(name, seed=seed, width=width)
        runner = StageRunner(model.layers, describe(model), tuple(model.input_shape),
                             is_first=True, is_last=True, threads=threads)
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, *model.input_shape, generator=g)
        y = torch.randint(0, model.num_classes, (batch,), generator=g)
        for it in range(warmup + reps):
            runner.forward((it, 0), x, y)
            runner.backward((it, 0))
            runner.step()
            samples = runner.drain_timings()
            if it >= warmup:
                yield [dict(s, model=name, width=width, rep=it - warmup) for s in samples
                       if s["ms"] > 0]
    finally:
        torch.set_num_threads(old)


def _busy_cpu_s() -> float | None:
    """CPU-seconds all processes have used since boot (Linux ``/proc/stat``), None elsewhere."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """Cores used by *other* processes between ``start()`` and ``cores()``: a 2-thread torch
    run on a 2-core machine slows down 5-25x while anything else computes, so measurements
    taken then say nothing about the device and are retried."""

    def start(self) -> None:
        self.busy0, self.own0, self.wall0 = _busy_cpu_s(), time.process_time(), time.perf_counter()

    def cores(self) -> float:
        busy = _busy_cpu_s()
        if busy is None or self.busy0 is None:
            return 0.0
        wall = max(time.perf_counter() - self.wall0, 1e-3)
        return max(0.0, (busy - self.busy0) - (time.process_time() - self.own0)) / wall


def wait_for_quiet(max_cores: float, max_wait: float, interval: float = 0.5) -> float:
    """Wait (at most ``max_wait`` s) until other processes use under ``max_cores`` for one
    ``interval``; returns the seconds waited."""
    t0 = time.monotonic()
    probe = OtherLoad()
    while time.monotonic() - t0 < max_wait:
        probe.start()
        time.sleep(interval)
        if probe.cores() < max_cores:
            break
    return time.monotonic() - t0


class Calibrator:
    """A fixed 2-3 ms workload (small matmuls and Python dispatch, like a layer run) timed
    before and after each measurement: when it runs more than ``tolerance`` times slower than
    its best, something is stealing this CPU (another process, an SMT sibling, the
    hypervisor), whether ``/proc/stat`` shows it or not."""

    def __init__(self, threads: int, tolerance: float = 1.15) -> None:
        self.threads = threads
        self.tolerance = tolerance
        self.best = float("inf")

    def probe(self) -> float:
        import torch

        old = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            g = torch.Generator().manual_seed(0)
            a = torch.randn(160, 160, generator=g)
            v = torch.randn(4096, generator=g)
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                for _ in range(8):
                    torch.mm(a, a)
                    for _ in range(20):
                        torch.relu(v)
                best = min(best, time.perf_counter() - t0)
        finally:
            torch.set_num_threads(old)
        self.best = min(self.best, best)
        return best

    def warm_up(self, seconds: float = 2.0) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            self.probe()
            time.sleep(0.05)

    def ok(self) -> bool:
        return self.probe() <= self.tolerance * self.best


def measure_quietly(name: str, width: float, *, threads: int, batch: int, reps: int,
                    warmup: int = 2, max_cores: float = 0.3, retries: int = 3,
                    max_wait: float = 30.0, calibrator: Calibrator | None = None
                    ) -> tuple[list[list[Sample]], float, int]:
    """``measure`` on a quiet machine: wait until other processes are idle (and the
    ``calibrator``, if given, runs at its best speed), measure, and measure again (up to
    ``retries`` times) if other processes used more than ``max_cores`` meanwhile or the
    calibrator slowed down.

    Returns the iterations, the other processes' load during them (``inf`` when the
    calibrator said the CPU was slow) and the attempts made.
    """
    load = OtherLoad()
    iterations: list[list[Sample]] = []
    others, attempts = 0.0, 0
    while attempts <= retries:
        attempts += 1
        wait_for_quiet(max_cores, max_wait)
        if calibrator is not None:
            t0 = time.monotonic()
            while not calibrator.ok() and time.monotonic() - t0 < max_wait:
                time.sleep(0.5)
        load.start()
        iterations = list(measure(name, width, threads=threads, batch=batch, reps=reps,
                                  warmup=warmup))
        others = load.cores()
        if calibrator is not None and not calibrator.ok():
            others = float("inf")
        if others <= max_cores:
            break
    return iterations, others, attempts


def median_samples(samples: Iterable[Sample]) -> list[Sample]:
    """One sample per (model, width, threads, batch, layer, dir): the median over repetitions."""
    groups: dict[tuple[Any, ...], list[Sample]] = defaultdict(list)
    for s in samples:
        key = (s.get("model"), s.get("width"), s["threads"], s["batch"], s["layer"]["index"],
               s["dir"])
        groups[key].append(s)
    out = []
    for group in groups.values():
        s = {k: v for k, v in group[0].items() if k != "rep"}
        s["ms"] = round(statistics.median(g["ms"] for g in group), 5)
        s["n"] = len(group)
        out.append(s)
    return out


def emulate(samples: Iterable[Sample], profile: dict[str, Any], slowdown: float,
            device: str) -> list[Sample]:
    """The samples a ``--slowdown`` device would report, with that device's profile attached.

    ``profile`` is the profile measured here at slowdown 1 (its ``bench_gflops`` undivided).
    """
    prof = dict(profile, device=device, slowdown=slowdown)
    if profile.get("bench_gflops"):
        prof["bench_gflops"] = round(float(profile["bench_gflops"]) / slowdown, 3)
    return [dict(s, ms=round(s["ms"] * slowdown, 5), device=device, profile=prof)
            for s in samples]


def device_name(threads: int, slowdown: float, host: str = "local") -> str:
    return f"{host}-t{threads}-s{slowdown:g}"


@contextmanager
def progress_bar(total: int, enabled: bool, description: str = "profiling") -> Iterator[
        Callable[[str], None]]:
    """A callable ``advance(label)``: a rich progress bar on a terminal, plain lines otherwise."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    if enabled and console.is_terminal:
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[label]}"), TimeElapsedColumn(),
                      TimeRemainingColumn(), console=console) as prog:
            task = prog.add_task(description, total=total, label="")
            yield lambda label: prog.update(task, advance=1, label=label)
        return
    done = [0]
    t0 = time.monotonic()

    def advance(label: str) -> None:
        done[0] += 1
        if enabled:
            print(f"[{description}] {done[0]}/{total} {label} ({time.monotonic() - t0:.0f}s)",
                  file=sys.stderr, flush=True)

    yield advance


def write_jsonl(path: str | Path, samples: Iterable[Sample]) -> int:
    """Write samples as JSON lines (gzip if ``.gz``) atomically; returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    n = 0
    try:
        with os.fdopen(fd, "wb") as raw:
            # mtime=0: the same samples give the same bytes (a reproducible shipped seed file)
            f = gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) if path.suffix == ".gz" else raw
            try:
                for s in samples:
                    f.write(json.dumps(s, separators=(",", ":"), sort_keys=True).encode())
                    f.write(b"\n")
                    n += 1
            finally:
                if f is not raw:
                    f.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        with _suppress_oserror():
            os.unlink(tmp)
        raise
    return n


@contextmanager
def _suppress_oserror() -> Iterator[None]:
    try:
        yield
    except OSError:
        pass


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_plan(text: str | None) -> list[tuple[str, float]]:
    """``"vgg:0.5,cnn"`` -> ``[("vgg", 0.5), ("cnn", 1.0)]``; None -> the default plan."""
    if not text:
        return list(DEFAULT_PLAN)
    out = []
    for item in text.split(","):
        name, _, width = item.strip().partition(":")
        out.append((name, float(width) if width else 1.0))
    return out


def collect(plan: list[tuple[str, float]], *, threads: list[int], batches: list[int],
            slowdowns: list[float], reps: int, warmup: int = 2, aggregate: bool = True,
            host: str = "local", progress: bool = True, max_cores: float = 0.3,
            retries: int = 3) -> list[Sample]:
    """Measure ``plan`` under each thread count and batch, then emulate each slowdown."""
    from accept_mqtt.model.hardware import device_profile

    out: list[Sample] = []
    contended: list[str] = []
    total = len(threads) * len(plan) * len(batches)
    with progress_bar(total, progress) as advance:
        for t in threads:
            base = device_profile(device_name(t, 1.0, host), threads=t, slowdown=1.0,
                                  bench=False)
            bench = robust_bench(t)
            calibrator = Calibrator(t)
            calibrator.warm_up()
            measured: list[Sample] = []
            for name, width in plan:
                for b in batches:
                    its, others, _ = measure_quietly(name, width, threads=t, batch=b, reps=reps,
                                                     warmup=warmup, max_cores=max_cores,
                                                     retries=retries, calibrator=calibrator)
                    for it in its:
                        measured.extend(it)
                    label = f"threads={t} {name}x{width:g} batch={b}"
                    if others > max_cores:
                        contended.append(f"{label} ({others:.1f} other cores busy)"
                                         if math.isfinite(others) else f"{label} (CPU slow)")
                    advance(label)
            base["bench_gflops"] = max(bench, robust_bench(t))
            if aggregate:
                measured = median_samples(measured)
            for s in slowdowns:
                out.extend(emulate(measured, base, s, device_name(t, s, host)))
    if contended:
        print(f"warning: {len(contended)} measurement(s) shared the CPU with other processes "
              f"after {retries} retries: {'; '.join(contended)}", file=sys.stderr)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="seed_samples.jsonl.gz",
                   help="output JSON lines (gzip if it ends in .gz) [%(default)s]")
    p.add_argument("--models", default=None,
                   help="comma list of model[:width] (default: the zoo at widths 0.5-2)")
    p.add_argument("--threads", default="1,2", help="torch thread counts [%(default)s]")
    p.add_argument("--slowdowns", default="1,2,4", help="emulated slowdowns [%(default)s]")
    p.add_argument("--batches", default="4,16,64", help="micro-batch sizes [%(default)s]")
    p.add_argument("--reps", type=int, default=3, help="measured iterations each [%(default)s]")
    p.add_argument("--warmup", type=int, default=2, help="discarded iterations [%(default)s]")
    p.add_argument("--raw", action="store_true",
                   help="keep every repetition instead of the median per layer")
    p.add_argument("--host", default="local", help="device-name prefix [%(default)s]")
    p.add_argument("--max-other-load", type=float, default=0.2,
                   help="retry a measurement if other processes used more cores [%(default)s]")
    p.add_argument("--no-progress", action="store_true", help="no progress display")


def run(args: argparse.Namespace) -> int:
    try:
        plan = parse_plan(args.models)
        threads, batches = _ints(args.threads), _ints(args.batches)
        slowdowns = _floats(args.slowdowns)
        if not threads or not batches or not slowdowns or min(threads + batches) < 1:
            raise ValueError("threads and batches must be positive integers")
        if min(slowdowns) < 1.0:
            raise ValueError("slowdowns must be >= 1")
        if args.reps < 1 or args.warmup < 0:
            raise ValueError("--reps must be >= 1 and --warmup >= 0")
    except ValueError as e:
        print(f"accept-mqtt profile: {e}", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    pin_allocator()
    samples = collect(plan, threads=threads, batches=batches, slowdowns=slowdowns,
                      reps=args.reps, warmup=args.warmup, aggregate=not args.raw,
                      host=args.host, progress=not args.no_progress,
                      max_cores=args.max_other_load)
    n = write_jsonl(args.out, samples)
    size = Path(args.out).stat().st_size
    print(f"wrote {n} samples ({len(plan)} model sizes x threads {threads} x batches {batches} "
          f"x slowdowns {slowdowns}) to {args.out} ({size / 1024:.0f} KiB) in "
          f"{time.monotonic() - t0:.0f}s")
    return 0
