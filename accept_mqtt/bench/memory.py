"""``accept-mqtt bench memory``: peak resident memory of the coordinator, each agent and the
broker over a training run with evaluations.

What it runs: a private Mosquitto, ``--devices`` agent processes (``harness.local``) and the
coordinator as its own process (``accept-mqtt train --broker ...``), so each one's memory is
its own. By default the run is shaped like CIFAR-10: ``synthetic-cifar`` with 50,000 samples
(40,000 training, a 10,000-image held-out set: 123 MB of float32, evaluated at the end of
every epoch), VGG-style at width 0.125, batch 256, two epochs.

What it measures, per process: the peak resident set size -- ``ru_maxrss`` from ``wait4``
for the coordinator (exact, from the kernel at its exit), ``VmHWM`` from ``/proc`` for the
agents and the broker, read just before they are stopped (also exact) -- and, from a 0.25 s
sampler of ``VmRSS``, the resident size when training starts (the coordinator's log says
so), the largest seen after that, and their difference: what the run itself added, apart
from start-up (imports, the data set; making 50,000 synthetic samples alone peaks at about
2.5 GB in the coordinator). Memory does not depend on a shared CPU the way speed does, so the
figures are meaningful on a busy machine (the run only takes longer); the load average is
printed with them.

A process's resident size can hide what a long run accumulates: memory freed after start-up
(the data set's temporaries) is reused before the heap grows. So the bench also measures the
coordinator's timing-sample store directly: the planner fed ``--timing-steps`` steps' worth of
the samples the run's agents send (``tracemalloc``, in a child process of the same code).

``--code DIR`` runs the coordinator and the agents from the source tree in ``DIR`` (e.g.
``git archive <commit> | tar -x -C DIR``) instead of this one: the same workload before and
after a change, for an honest comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MB = 2**20


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="vgg")
    p.add_argument("--width", type=float, default=0.125)
    p.add_argument("--dataset", default="synthetic-cifar")
    p.add_argument("--synthetic-size", type=int, default=50_000,
                   help="samples of a synthetic data set, a fifth of them held out "
                        "(default 50000: a CIFAR-10-sized 10,000-image test set)")
    p.add_argument("--epochs", type=int, default=2, help="epochs (one evaluation after each)")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--micro-batches", type=int, default=4)
    p.add_argument("--devices", type=int, default=3)
    p.add_argument("--eval-batch", type=int, default=256)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--timing-steps", type=int, default=10_000,
                   help="steps of timing samples fed to the planner's store (default 10000)")
    p.add_argument("--code", metavar="DIR",
                   help="run the coordinator and agents from this source tree (before/after)")
    p.add_argument("--label", default=None, help="name of this run in the output")
    p.add_argument("--json", metavar="PATH", help="write the results here")


def _status_kb(pid: int, key: str) -> int | None:
    """A ``/proc/<pid>/status`` field in kB (VmRSS, VmHWM), None once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


class Sampler:
    """VmRSS of named processes every ``every`` seconds, in a thread; notes when a line
    starting with ``phrase`` first appears in the file ``marks`` (training started)."""

    def __init__(self, marks: Path, phrase: str, every: float = 0.25) -> None:
        self.every = every
        self.marks, self.phrase = marks, phrase
        self.pids: dict[str, int] = {}
        self.series: dict[str, list[tuple[float, int]]] = {}  # name -> (monotonic, kB)
        self.started: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def watch(self, name: str, pid: int) -> None:
        self.pids[name] = pid

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            now = time.monotonic()
            if self.started is None and self.marks.exists() and any(
                    ln.startswith(self.phrase)
                    for ln in self.marks.read_text(errors="replace").splitlines()):
                self.started = now
            for name, pid in list(self.pids.items()):
                kb = _status_kb(pid, "VmRSS")
                if kb is not None:
                    self.series.setdefault(name, []).append((now, kb))

    def during_run(self, name: str) -> tuple[int, int]:
        """(kB at the start of training, largest kB after it); (0, 0) if never seen."""
        after = [kb for t, kb in self.series.get(name, []) if self.started is not None
                 and t >= self.started]
        return (after[0], max(after)) if after else (0, 0)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@contextmanager
def _children_use(code: str | None) -> Iterator[None]:
    """Child processes import accept_mqtt, device_agent and broker from ``code``.

    They start in a directory without sources: ``python -m``/``-c`` put the working
    directory first on ``sys.path``, and a checkout there would shadow ``PYTHONPATH``."""
    if code is None:
        yield
        return
    old, cwd = os.environ.get("PYTHONPATH"), os.getcwd()
    os.environ["PYTHONPATH"] = os.path.abspath(code) + (os.pathsep + old if old else "")
    os.chdir(tempfile.gettempdir())
    try:
        yield
    finally:
        os.chdir(cwd)
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old


# runs in a child process of the code under test (``--code``): only APIs both sides have
_TIMING_STORE = """
import asyncio, json, sys, tracemalloc
from accept_mqtt.coordinator.config import TrainConfig
from accept_mqtt.coordinator.planner import Planner
from accept_mqtt.coordinator.record import RunState
from accept_mqtt.model.descriptors import describe
from accept_mqtt.model.zoo import build_model
from accept_mqtt.wire.messages import LayerInfo, TimingSample, to_builtins

model, width, devices, steps, batch = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), \
    int(sys.argv[4]), int(sys.argv[5])
descs = describe(build_model(model, seed=0, width=width))
share = -(-len(descs) // devices)
per_dev = [[TimingSample(layer=LayerInfo(**d.to_dict()), dir=di, batch=batch, threads=1, n=1,
                         ms=1.0) for d in descs[i * share:(i + 1) * share]
            for di in ("fwd", "bwd")] for i in range(devices)]

async def main():
    p = Planner("m", TrainConfig(partition="flops"), RunState(), current=lambda: None,
                emit=lambda m: None)
    tracemalloc.start()
    base, n = tracemalloc.get_traced_memory()[0], 0
    for _ in range(steps):
        for dev, samples in enumerate(per_dev):
            p.on_timing(f"d{dev}", [to_builtins(s) for s in samples])
            n += len(samples)
    print(json.dumps({"samples": n, "held_mb": (tracemalloc.get_traced_memory()[0] - base)
                      / 2**20}))

asyncio.run(main())
"""


def child_tree() -> str:
    """The directory child processes import ``accept_mqtt`` from (printed: which code ran)."""
    p = subprocess.run([sys.executable, "-c", "import accept_mqtt, os; "
                        "print(os.path.dirname(os.path.dirname(accept_mqtt.__file__)))"],
                       capture_output=True, text=True, timeout=120, check=True)
    return p.stdout.strip()


def timing_store(args: argparse.Namespace) -> dict[str, Any]:
    """What the planner holds after ``--timing-steps`` steps of timing samples (MB)."""
    mb = -(-args.batch_size // args.micro_batches)
    p = subprocess.run([sys.executable, "-c", _TIMING_STORE, args.model, str(args.width),
                        str(args.devices), str(args.timing_steps), str(mb)],
                       capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise RuntimeError(f"timing-store measurement failed:\n{p.stderr[-2000:]}")
    res: dict[str, Any] = json.loads(p.stdout.strip().splitlines()[-1])
    return {"steps": args.timing_steps, "samples": res["samples"],
            "held_mb": round(res["held_mb"], 1)}


def _config(args: argparse.Namespace, runs_dir: str) -> dict[str, Any]:
    return {"model": args.model, "width": args.width, "dataset": args.dataset,
            "synthetic_size": args.synthetic_size, "epochs": args.epochs,
            "max_steps": args.max_steps, "batch_size": args.batch_size,
            "micro_batches": args.micro_batches, "devices": args.devices,
            "eval_batch": args.eval_batch, "seed": args.seed, "partition": "flops",
            "checkpoint_every": 0, "device_timeout": 300.0, "runs_dir": runs_dir}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from accept_mqtt.harness.local import LocalCluster, default_agents

    work = Path(tempfile.mkdtemp(prefix="accept-bench-memory-"))
    cfg = _config(args, str(work / "runs"))
    (work / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    out: dict[str, Any] = {}
    t0 = time.monotonic()
    log_path = work / "coordinator.log"
    with _children_use(args.code), Sampler(log_path, "[accept-mqtt] job ") as sampler, LocalCluster(
            default_agents(args.devices), workdir=work) as cluster:
        assert cluster.broker.proc is not None
        sampler.watch("broker", cluster.broker.proc.pid)
        for dev, proc in cluster.procs.items():
            sampler.watch(dev, proc.pid)
        cmd = [sys.executable, "-m", "accept_mqtt.cli", "train", "--broker", cluster.url,
               "--config", str(work / "config.json"), "--job", "memory",
               "--json", str(work / "record.json"), "--no-progress"]
        with open(log_path, "wb") as log:
            coord = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        sampler.watch("coordinator", coord.pid)
        try:
            _, status, usage = os.wait4(coord.pid, 0)  # ru_maxrss: the kernel's own peak, kB
        except BaseException:  # interrupted: do not leave the coordinator behind
            coord.kill()
            coord.wait()
            raise
        coord.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.monotonic() - t0
        peaks = {"coordinator": usage.ru_maxrss}
        ends = {}
        for name, pid in sampler.pids.items():
            if name != "coordinator":
                peaks[name] = _status_kb(pid, "VmHWM") or 0
                ends[name] = _status_kb(pid, "VmRSS") or 0
    if coord.returncode != 0:
        tail = (work / "coordinator.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"the coordinator failed (exit {coord.returncode}):\n{tail}")
    record = json.loads((work / "record.json").read_text(encoding="utf-8"))
    stage_of = {s["device"]: s["index"] for s in record["plan"]["stages"]}
    out["processes"] = []
    for name, kb in peaks.items():
        start, top = sampler.during_run(name)
        out["processes"].append({
            "process": name, "stage": stage_of.get(name), "peak_rss_mb": round(kb / 1024, 1),
            "rss_at_start_mb": round(start / 1024, 1),
            "max_rss_in_run_mb": round(top / 1024, 1),
            "run_added_mb": round((top - start) / 1024, 1),
            "end_rss_mb": None if name not in ends else round(ends[name] / 1024, 1)})
    out["run"] = {"steps": record["steps"], "evaluations": len(record["epochs"]),
                  "timing_samples": record["timing_samples"], "seconds": round(seconds, 1),
                  "final_accuracy": record["final_accuracy"],
                  "plan": [[s["device"], s["start"], s["end"]]
                           for s in record["plan"]["stages"]]}
    return out


def run(args: argparse.Namespace) -> int:
    if args.code is not None and not (Path(args.code) / "accept_mqtt").is_dir():
        print(f"bench memory: --code {args.code} has no accept_mqtt/ source tree",
              file=sys.stderr)
        return 2
    load0 = os.getloadavg()[0]
    from accept_mqtt.model.data import load_dataset

    data = load_dataset(args.dataset, seed=args.seed, synthetic_size=args.synthetic_size)
    test_mb = data.test_x.element_size() * data.test_x.nelement() / MB
    label = args.label or (f"code {args.code}" if args.code else "this tree")
    print(f"bench memory ({label}): {args.model} width {args.width} on {args.dataset} "
          f"({len(data.train_x)} training, {len(data.test_x)} held-out samples = "
          f"{test_mb:.0f} MB of float32), batch {args.batch_size}, {args.devices} agent "
          f"processes + coordinator process + Mosquitto on this machine; load average "
          f"{load0:.2f} at the start (memory figures do not depend on a busy CPU)")
    del data
    try:
        with _children_use(args.code):
            tree = child_tree()
            store = timing_store(args)
        print(f"code run by the coordinator and agents: {tree}")
        res = measure(args)
    except RuntimeError as e:
        print(f"bench memory: {e}", file=sys.stderr)
        return 1
    r = res["run"]
    print(f"run: {r['steps']} steps, {r['evaluations']} evaluations of the held-out set, "
          f"{r['timing_samples']} timing samples, {r['seconds']:.0f} s; plan {r['plan']}")
    print("MB (2^20 bytes); peak: the kernel's; start/max in run/added: sampled VmRSS from "
          "the start of training on")
    print(f"{'process':<14}{'stage':>6}{'peak':>9}{'at start':>10}{'max in run':>12}"
          f"{'added':>8}{'at end':>9}")
    for p in res["processes"]:
        stage = "" if p["stage"] is None else str(p["stage"])
        end = "" if p["end_rss_mb"] is None else f"{p['end_rss_mb']:.1f}"
        print(f"{p['process']:<14}{stage:>6}{p['peak_rss_mb']:>9.1f}"
              f"{p['rss_at_start_mb']:>10.1f}{p['max_rss_in_run_mb']:>12.1f}"
              f"{p['run_added_mb']:>8.1f}{end:>9}")
    print(f"coordinator's timing-sample store after {store['steps']} steps "
          f"({store['samples']} samples as the agents send them): {store['held_mb']:.1f} MB "
          "(tracemalloc)")
    res.update(label=label, code=tree, load_average_start=load0, test_set_mb=round(test_mb, 3),
               timing_store=store,
               config={k: v for k, v in vars(args).items() if not k.startswith("_")})
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2), encoding="utf-8")
        print(f"results: {args.json}")
    return 0
