"""The peer in our own benchmarks: the same model trained with ``torch.distributed.pipelining``.

``run_torch_pipeline`` trains a zoo model cut at given layer indices, one OS process per stage
(``python -m accept_mqtt.bench.torchpipe --worker``, optionally behind a command prefix such
as ``ip netns exec NS``), the stages talking over gloo (TCP; on 127.0.0.1 by default, a free
port). ``run_one_process`` trains the whole model in this process. Neither imports MQTT.

What is trained, identical to accept-mqtt with fp32 links and to ``model.reference``:

* the model ``zoo.build_model(name, seed=seed, width=width)``; stage ``i`` is
  ``nn.Sequential(*layers[cuts[i]:cuts[i+1]])`` in train mode;
* the data ``data.load_dataset(name or the model's default, seed=seed)``, mini-batches in
  the order ``microbatch.epoch_batches(n, batch_size, seed, epoch)`` gives, but only *full*
  mini-batches: torch pipelining allocates its receive buffers once, for one micro-batch
  shape, so the short last batch of an epoch is skipped (accept-mqtt trains it; the two
  differ only after the first epoch, in which samples a step sees, never in a step's work);
* ``micro_batches`` equal micro-batches per mini-batch (``batch_size`` must divide evenly),
  loss ``cross_entropy(reduction="sum") / batch_size`` per micro-batch, gradients
  accumulated (``scale_grads=False``: the loss is already scaled), then one optimizer step
  per mini-batch, SGD made by ``model.stage.make_optimizer`` with the same lr / momentum /
  weight decay;
* every ``PipelineStage`` is given its micro-batch input and output shapes up front
  (computed in eval mode, without autograd), so torch runs no shape-inference forward of
  its own: that extra train-mode forward would move stage 0's BatchNorm running statistics.

So the parameters and buffers after N steps equal one-process training's to float tolerance,
whatever the slowdowns (``check=True`` returns them; ``tests/test_torchpipe.py`` compares
them with ``reference.train_reference``).

What is measured (``samples_per_s``), as accept-mqtt's coordinator times its steps: samples
over time spent inside optimizer steps. Step 0 is a warm-up (gloo's first sends, first-touch
allocations, torch's per-schedule set-up) that trains but is not timed, so ``steps`` must be
>= 2 and ``steps - 1`` steps are timed. In the pipeline, every rank passes a barrier after the
warm-up step and another after the last step; the time between the two on rank 0 is the
timed interval (no barrier between steps: torch's schedule needs none, and a step ends on
stage 0 with its last backward anyway). ``run_one_process`` sums ``perf_counter`` spans of
steps 1..N-1. accept-mqtt's coordinator sums per-step spans the same way (from sending the
first micro-batch to every stage's "stepped"); the overhead bench drops its first step too.

What is emulated (``slowdowns[i] = s``, as ``model.stage.StageRunner.slowdown`` does on an
agent): every call of the stage's ``forward_one_chunk`` (one micro-batch's forward through
the whole stage) and ``backward_one_chunk`` (its backward, input and weight gradients, the
loss's backward on the last stage) is timed and followed by a sleep of ``(s - 1)`` times
the CPU time it used (``model.stage.emulated_pause``: sharing this machine's cores with the
other stages does not get multiplied by ``s``); the sleep takes no CPU from other
processes. Not emulated:
the loss forward on the last stage and the optimizer step (the agent does not stretch its
optimizer step either; it does stretch each layer's forward, which the loss is not part
of). Receives and sends are outside those calls, so waiting for a neighbour is never
stretched. StageRunner sleeps after each layer, this after each stage call: the same total.

What is emulated on the links (``uplinks_bps[i]``, ``latency_s``; both off by default, and
then torch's own point-to-point operations run untouched):

* ``latency_s``, a one-way latency, at the receiver: every receive of activations or
  gradients becomes usable ``latency_s`` after its data arrived (a watcher thread waits on
  the gloo receive and notes the arrival; the schedule's wait returns ``latency_s`` after
  that). Receives are independent, so several transfers are in flight at once, and the
  senders run torch's own sends, whose waits behave as they do without latency (under
  ``tc``, they block while the shaped link drains the socket buffer, as torch's do).
* ``uplinks_bps[i]``, only where no kernel shapes the link (``pace``): rank ``i``'s sends
  leave through an emulated uplink, as an agent's paced ``Link``: in the order they were
  made, each issued as a gloo ``isend`` from a timer thread ``8 * bytes / uplinks_bps[i]``
  seconds after the previous one left; the schedule sees such a send complete at once.

So a transfer is usable ``latency_s`` (plus pacing) after the data left, as over a link
with that one-way latency.

Teardown: workers are our own child processes; on any worker failure, on ``timeout`` and on
any exception here (Ctrl-C included) every worker still running gets SIGTERM, then SIGKILL.
A worker that cannot bring up gloo says so and ``TorchPipeError`` carries its message and
the tail of its log.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from accept_mqtt.model.data import Dataset, load_dataset
from accept_mqtt.model.microbatch import epoch_batches, split
from accept_mqtt.model.stage import emulated_pause, make_optimizer
from accept_mqtt.model.zoo import ZOO, build_model

SCHEDULES = ("1f1b", "gpipe")

TIMING = ("samples / time inside optimizer steps 1..N-1; step 0 is an untimed warm-up; "
          "pipeline: rank 0's interval between a barrier after step 0 and one after the "
          "last step")
EMULATION = ("slowdown s: each stage's forward_one_chunk and backward_one_chunk (one "
             "micro-batch) is followed by a sleep of (s-1) x the CPU time it used (one "
             "torch thread; else (s-1) x its duration); loss "
             "forward, optimizer step and communication are not stretched")
LINK_EMULATION = ("links: one-way latency at the receiver (a receive is usable latency after "
                  "its data arrived; transfers in flight at once; torch's sends untouched); "
                  "uplink rate (pace only): sends issued in order from a timer thread, each "
                  "after the previous one's serialisation time, seen by the schedule as done")


class TorchPipeError(RuntimeError):
    """The torch pipeline could not run: bad arguments, gloo did not start, a worker failed
    or the run timed out. The message names the rank and quotes its log."""


# -- shared by the pipeline workers and the one-process run ----------------------------------
def _dataset(model_name: str, dataset: str | None, data_path: str | None, seed: int,
             synthetic_size: int) -> Dataset:
    return load_dataset(dataset or ZOO[model_name].default_dataset, path=data_path, seed=seed,
                        synthetic_size=synthetic_size)


def full_batches(n: int, batch_size: int, seed: int, steps: int) -> Iterator[torch.Tensor]:
    """The index tensors of ``steps`` full mini-batches in accept-mqtt's order (epoch after
    epoch, the short last batch of each epoch skipped)."""
    if n < batch_size:
        raise TorchPipeError(f"the training set has {n} samples, fewer than one batch of "
                             f"{batch_size}")
    done, epoch = 0, 0
    while done < steps:
        for idx in epoch_batches(n, batch_size, seed, epoch, drop_last=True):
            if done >= steps:
                return
            yield idx
            done += 1
        epoch += 1


def _optimizer(params: list[nn.Parameter], lr: float, momentum: float,
               weight_decay: float) -> torch.optim.Optimizer | None:
    # the agents' own constructor, so the update arithmetic is the same; a stage of only
    # parameter-free layers (pooling, ReLU) has nothing to optimise
    if not params:
        return None
    return make_optimizer(params, {"name": "sgd", "lr": lr, "momentum": momentum,
                                   "weight_decay": weight_decay})


def _check_args(model_name: str, width: float, cuts: Sequence[int], batch_size: int,
                micro_batches: int, schedule: str, steps: int,
                slowdowns: Sequence[float] | None,
                uplinks_bps: Sequence[float | None] | None = None,
                latency_s: float = 0.0) -> int:
    """Stage count; raises ``TorchPipeError`` for what would otherwise fail in a worker."""
    if model_name not in ZOO:
        raise TorchPipeError(f"unknown model {model_name!r}; the zoo has {sorted(ZOO)}")
    n = len(build_model(model_name, seed=0, width=width).layers)
    if schedule not in SCHEDULES:
        raise TorchPipeError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if steps < 2:
        raise TorchPipeError(f"steps must be >= 2 (step 0 is an untimed warm-up), got {steps}")
    if micro_batches < 1 or batch_size % micro_batches:
        raise TorchPipeError(
            f"torch pipelining needs equal micro-batches: batch size {batch_size} does not "
            f"split into {micro_batches}")
    k = len(cuts) - 1
    if k < 1 or cuts[0] != 0 or any(b <= a for a, b in zip(cuts, cuts[1:], strict=False)):
        raise TorchPipeError(f"cuts must start at 0 and increase strictly, got {list(cuts)}")
    if cuts[-1] != n:
        raise TorchPipeError(f"the last cut must be {model_name}'s layer count {n}, got "
                             f"{list(cuts)}")
    if schedule == "1f1b" and micro_batches < k:
        raise TorchPipeError(f"torch's Schedule1F1B needs micro-batches >= stages "
                             f"({micro_batches} < {k})")
    if slowdowns is not None and (len(slowdowns) != k or any(s < 1.0 for s in slowdowns)):
        raise TorchPipeError(f"slowdowns must be {k} values >= 1, got {list(slowdowns)}")
    if uplinks_bps is not None and (len(uplinks_bps) != k or any(
            b is not None and not b > 0 for b in uplinks_bps)):
        raise TorchPipeError(f"uplinks_bps must be {k} rates > 0 (or None), got "
                             f"{list(uplinks_bps)}")
    if not latency_s >= 0.0:
        raise TorchPipeError(f"latency_s must be >= 0, got {latency_s}")
    return k


# -- the pipeline, parent side ---------------------------------------------------------------
def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the gloo store binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def run_torch_pipeline(
    model_name: str,
    width: float,
    cuts: Sequence[int],
    *,
    batch_size: int,
    micro_batches: int,
    schedule: str = "1f1b",
    steps: int,
    seed: int,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    slowdowns: Sequence[float] | None = None,
    uplinks_bps: Sequence[float | None] | None = None,
    latency_s: float = 0.0,
    threads: int = 1,
    dataset: str | None = None,
    data_path: str | None = None,
    synthetic_size: int = 2000,
    check: bool = False,
    timeout: float = 600.0,
    init_timeout: float = 60.0,
    master_addr: str = "127.0.0.1",
    master_port: int | None = None,
    command_prefixes: Sequence[Sequence[str]] | None = None,
    worker_env: Sequence[dict[str, str]] | None = None,
    workdir: str | Path | None = None,
) -> dict[str, Any]:
    """Train ``steps`` mini-batches with torch pipelining over ``len(cuts) - 1`` processes.

    Returns a JSON-able dict: ``samples_per_s`` (see the module docstring for what is timed),
    ``train_seconds``, ``samples``, ``timed_steps``, ``step_ms`` (rank 0, per step, warm-up
    first), ``losses`` (mean loss of each mini-batch), ``stages`` (per rank: layers,
    slowdown, compute and emulated-sleep ms and calls, over all steps, warm-up included;
    with link emulation also ``sends`` and ``send_bytes``) and the settings; with
    ``check=True`` also ``state_dict``: every parameter and buffer named as in the whole
    model (tensors, so that key is not JSON-able).

    ``command_prefixes[i]`` runs rank ``i`` behind a prefix (``["ip", "netns", "exec",
    NS]``); then ``master_addr`` must be rank 0's address as the others reach it, and
    ``worker_env[i]`` can set ``GLOO_SOCKET_IFNAME`` for that rank's interface. By default
    every rank runs here with ``GLOO_SOCKET_IFNAME=lo``.

    ``uplinks_bps[i]`` (bits/s) and ``latency_s`` (one-way) emulate rank ``i``'s uplink (see
    the module docstring).
    """
    k = _check_args(model_name, width, cuts, batch_size, micro_batches, schedule, steps, slowdowns,
                    uplinks_bps, latency_s)
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        raise TorchPipeError("this torch build has no torch.distributed gloo backend")
    if command_prefixes is not None and len(command_prefixes) != k:
        raise TorchPipeError(f"{k} stages need {k} command prefixes")
    if worker_env is not None and len(worker_env) != k:
        raise TorchPipeError(f"{k} stages need {k} worker environments")
    own_dir = workdir is None
    wd = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="torchpipe-"))
    wd.mkdir(parents=True, exist_ok=True)
    job = {
        "model": model_name, "width": width, "cuts": [int(c) for c in cuts],
        "batch_size": batch_size, "micro_batches": micro_batches, "schedule": schedule,
        "steps": steps, "seed": seed, "lr": lr, "momentum": momentum,
        "weight_decay": weight_decay,
        "slowdowns": [float(s) for s in (slowdowns or [1.0] * k)], "threads": threads,
        "uplinks_bps": list(uplinks_bps) if uplinks_bps is not None else [None] * k,
        "latency_s": float(latency_s),
        "dataset": dataset, "data_path": data_path, "synthetic_size": synthetic_size,
        "check": check, "timeout": timeout, "master_addr": master_addr,
        # with command prefixes rank 0 may live in another network namespace, where this
        # check means little; a fresh namespace has every port free anyway
        "master_port": master_port or free_port(),
        "outdir": str(wd),
    }
    (wd / "job.json").write_text(json.dumps(job))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for rank in range(k):
            env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
            if command_prefixes is None:
                # loopback: never let gloo resolve the host name to some other interface
                env.setdefault("GLOO_SOCKET_IFNAME", "lo")
            if worker_env is not None:
                env.update(worker_env[rank])
            prefix = list(command_prefixes[rank]) if command_prefixes is not None else []
            cmd = [*prefix, sys.executable, "-m", "accept_mqtt.bench.torchpipe", "--worker",
                   str(wd / "job.json"), "--rank", str(rank)]
            with open(wd / f"rank{rank}.log", "wb") as log:
                procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                              env=env))
        _wait_all(procs, wd, timeout, init_timeout,
                  f"tcp://{job['master_addr']}:{job['master_port']}")
        out = _collect(job, wd, k)
    finally:
        _stop(procs)
    if own_dir:  # kept on failure: the logs say why
        for f in wd.iterdir():
            with contextlib.suppress(OSError):
                f.unlink()
        with contextlib.suppress(OSError):
            wd.rmdir()
    return out


def _tail(path: Path, n: int = 2000) -> str:
    """The end of a worker's log, without the C++ stack frames torch prints."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    lines = [ln for ln in text.splitlines() if not ln.startswith("frame #")]
    return "\n".join(lines)[-n:]


def _worker_error(wd: Path, rank: int) -> str | None:
    p = wd / f"rank{rank}.json"
    if not p.exists():
        return None
    with contextlib.suppress(ValueError, OSError):
        return json.loads(p.read_text()).get("error")
    return None


def _wait_all(procs: list[subprocess.Popen[bytes]], wd: Path, timeout: float,
              init_timeout: float, url: str) -> None:
    """Until every worker has exited 0; the first failure or the timeout raises, and so does
    a rank that has not joined the gloo group within ``init_timeout``."""
    t0 = time.monotonic()
    deadline, joined = t0 + timeout, False
    while True:
        codes = [p.poll() for p in procs]
        if any(rc not in (None, 0) for rc in codes):
            _raise_failure(procs, wd)
        if all(rc == 0 for rc in codes):
            return
        if not joined:
            missing = [r for r in range(len(procs)) if not (wd / f"rank{r}.up").exists()]
            joined = not missing
            if missing and time.monotonic() > t0 + init_timeout:
                raise TorchPipeError(
                    f"gloo could not start: ranks {missing} did not join {url} within "
                    f"{init_timeout:.0f} s (is the address reachable from every rank?)\n"
                    f"--- log of rank {missing[0]} ({wd}) ---\n"
                    f"{_tail(wd / f'rank{missing[0]}.log')}")
        if time.monotonic() > deadline:
            stuck = [r for r, rc in enumerate(codes) if rc is None]
            raise TorchPipeError(f"torch pipeline timed out after {timeout:.0f} s; ranks "
                                 f"{stuck} still running\n--- log of rank {stuck[0]} ---\n"
                                 f"{_tail(wd / f'rank{stuck[0]}.log')}")
        time.sleep(0.02)


_PEER_GONE = ("closed by peer", "reset by peer", "Broken pipe")


def _raise_failure(procs: list[subprocess.Popen[bytes]], wd: Path, grace: float = 2.0) -> None:
    """Raise for the rank that failed first *of its own accord*: when one rank dies its
    neighbours fail too ("connection closed by peer"), often sooner than it is reaped, so
    wait a moment for the others and blame the rank whose error is not a lost peer."""
    end = time.monotonic() + grace
    while time.monotonic() < end and any(p.poll() is None for p in procs):
        time.sleep(0.05)
    failed = [(r, _worker_error(wd, r) or f"exit code {p.returncode}")
              for r, p in enumerate(procs) if p.returncode not in (None, 0)]
    own = [f for f in failed if not any(s in f[1] for s in _PEER_GONE)]
    rank, why = (own or failed)[0]
    others = ", ".join(str(r) for r, _ in failed if r != rank)
    raise TorchPipeError(f"torch pipeline rank {rank} failed: {why}"
                         + (f" (ranks {others} failed too)" if others else "")
                         + f"\n--- log of rank {rank} ({wd}) ---\n{_tail(wd / f'rank{rank}.log')}")


def _stop(procs: list[subprocess.Popen[bytes]], grace: float = 3.0) -> None:
    """SIGTERM every worker still running, SIGKILL those that outlive ``grace``."""
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        with contextlib.suppress(ProcessLookupError):
            p.terminate()
    deadline = time.monotonic() + grace
    for p in alive:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait()


def _collect(job: dict[str, Any], wd: Path, k: int) -> dict[str, Any]:
    ranks = [json.loads((wd / f"rank{r}.json").read_text()) for r in range(k)]
    r0, last = ranks[0], ranks[-1]
    timed = job["steps"] - 1
    samples = timed * job["batch_size"]
    secs = r0["timed_s"]
    out: dict[str, Any] = {
        "method": "torch-pipelining", "schedule": job["schedule"], "backend": "gloo",
        "model": job["model"], "width": job["width"], "cuts": job["cuts"],
        "batch_size": job["batch_size"], "micro_batches": job["micro_batches"],
        "steps": job["steps"], "warmup_steps": 1, "timed_steps": timed,
        "samples": samples, "train_seconds": round(secs, 6),
        "samples_per_s": samples / max(secs, 1e-9),
        "step_ms": r0["step_ms"], "losses": last["losses"],
        "threads": job["threads"], "timing": TIMING, "emulation": EMULATION,
        "uplinks_bps": job["uplinks_bps"], "latency_s": job["latency_s"],
        "torch": torch.__version__,
        "stages": [{k_: r[k_] for k_ in ("rank", "layers", "slowdown", "fwd_ms", "bwd_ms",
                                        "sleep_ms", "cpu_ms", "fwd_calls", "bwd_calls", "sends",
                                        "send_bytes")}
                   for r in ranks],
    }
    if job["latency_s"] or any(job["uplinks_bps"]):
        out["link_emulation"] = LINK_EMULATION
    if job["check"]:
        state: dict[str, torch.Tensor] = {}
        for r in range(k):
            state.update(torch.load(wd / f"rank{r}.pt", weights_only=True))
        out["state_dict"] = state
    return out


# -- the pipeline, worker side ---------------------------------------------------------------
class _Emulation:
    """Per-stage compute clock: measures a call and sleeps ``(slowdown - 1)`` times its CPU
    time (``model.stage.emulated_pause``, as the agents do)."""

    def __init__(self, slowdown: float, threads: int) -> None:
        self.slowdown = slowdown
        self.threads = threads
        self.ms = {"fwd": 0.0, "bwd": 0.0, "sleep": 0.0, "cpu": 0.0}
        self.calls = {"fwd": 0, "bwd": 0}

    def after(self, kind: str, t0: float, c0: float) -> None:
        """After a call that began at ``perf_counter`` ``t0`` and ``thread_time`` ``c0``."""
        dt = time.perf_counter() - t0
        self.ms[kind] += dt * 1e3
        self.calls[kind] += 1
        # the CPU time of this thread is the call's only with one torch thread
        cpu = time.thread_time() - c0 if self.threads == 1 else dt
        self.ms["cpu"] += cpu * 1e3
        pause = emulated_pause(self.slowdown, dt, cpu)
        if pause > 0.0:
            time.sleep(pause)
            self.ms["sleep"] += pause * 1e3


class _Uplink:
    """One rank's paced uplink (module docstring): ``send`` returns at once; a timer thread
    issues the gloo ``isend`` once the sends before it have had their serialisation time."""

    def __init__(self, bandwidth_bps: float) -> None:
        import threading

        self.bandwidth_bps = bandwidth_bps
        self._free_at = 0.0  # perf_counter when the paced link is free again
        self._queue: deque[tuple[float, torch.Tensor, int, Any]] = deque()
        self._cv = threading.Condition()
        self._works: list[Any] = []
        self._error: BaseException | None = None
        self._closed = False
        self.sends = 0
        self.send_bytes = 0
        self._thread = threading.Thread(target=self._run, name="uplink", daemon=True)
        self._thread.start()

    def send(self, tensor: torch.Tensor, peer: int, group: Any) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        start = max(time.perf_counter(), self._free_at)
        self._free_at = start + nbytes * 8 / self.bandwidth_bps  # due times never decrease
        self.sends += 1
        self.send_bytes += nbytes
        with self._cv:
            if self._error is not None:
                raise TorchPipeError(f"emulated uplink failed: {self._error}")
            self._queue.append((self._free_at, tensor, peer, group))
            self._cv.notify()

    def _run(self) -> None:
        import torch.distributed as dist

        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if not self._queue:
                    return
                due = self._queue[0][0]
                wait = due - time.perf_counter()
                if wait > 0:
                    self._cv.wait(wait)  # a send appended meanwhile is due later: re-check
                    continue
                _, tensor, peer, group = self._queue.popleft()
            try:
                self._works.append(dist.isend(tensor, dst=peer, group=group))
            except BaseException as e:  # surfaced by the next send or by close
                with self._cv:
                    self._error = e
                return

    def close(self) -> None:
        """Issue what is queued, wait for every send to complete, stop the thread."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join()
        if self._error is not None:
            raise TorchPipeError(f"emulated uplink failed: {self._error}")
        for w in self._works:
            w.wait()
        self._works.clear()


class _LateRecv:
    """A gloo receive whose data is usable ``latency_s`` after it arrived: a watcher thread
    waits on the real receive and notes the time; ``wait`` returns ``latency_s`` after it."""

    def __init__(self, work: Any, latency_s: float) -> None:
        import threading

        self._work = work
        self.latency_s = latency_s
        self._arrived = 0.0
        self._error: BaseException | None = None
        self._done = threading.Event()
        threading.Thread(target=self._watch, name="recv-watch", daemon=True).start()

    def _watch(self) -> None:
        try:
            self._work.wait()  # torch releases the GIL while it waits
        except BaseException as e:
            self._error = e
        self._arrived = time.perf_counter()
        self._done.set()

    def wait(self, *args: Any, **kwargs: Any) -> bool:
        self._done.wait()
        if self._error is not None:
            raise self._error
        rest = self._arrived + self.latency_s - time.perf_counter()
        if rest > 0:
            time.sleep(rest)
        return True

    def is_completed(self) -> bool:
        return self._done.is_set() and time.perf_counter() >= self._arrived + self.latency_s


def _example_io(layers: list[nn.Module], in_shape: tuple[int, ...], a: int, b: int,
                mb: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Example input and output of ``layers[a:b]`` for one micro-batch, computed in eval mode
    without autograd, so BatchNorm's running statistics are not touched.

    Given to ``PipelineStage`` they put it in static mode: otherwise torch infers the shapes
    by running the first stage once more on the first micro-batch, in train mode, and that
    extra forward moves stage 0's BatchNorm running statistics away from one-process
    training's."""
    h = torch.zeros(mb, *in_shape)
    inp = h
    with torch.no_grad():
        for i, layer in enumerate(layers[:b]):
            if i == a:
                inp = h
            was = layer.training
            layer.eval()
            h = layer(h)
            layer.train(was)
    # torch derives the gradient buffers from these flags: the output always carries a
    # gradient back, the input only below stage 0 (the data need none)
    return inp.clone().requires_grad_(a > 0), h.clone().requires_grad_(True)


def _make_stage(module: nn.Module, rank: int, k: int, emu: _Emulation,
                example: tuple[torch.Tensor, torch.Tensor], uplink: _Uplink | None = None,
                latency_s: float = 0.0) -> Any:
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage

    def through(ops: list[Any]) -> list[Any]:
        """Hand the sends to the paced uplink; the schedule gets nothing to wait for."""
        if uplink is None:
            return ops
        for op in ops:
            if op.op is not dist.isend:  # torch's send ops are isends: anything else is new
                raise TorchPipeError(f"unexpected point-to-point op {op.op!r} in a send list")
            uplink.send(op.tensor, op.peer, op.group)
        return []

    def late_irecv(tensor: torch.Tensor, **kwargs: Any) -> _LateRecv:
        return _LateRecv(dist.irecv(tensor, **kwargs), latency_s)

    def late(ops: list[Any]) -> list[Any]:
        """Receive ops whose data is usable ``latency_s`` after it arrived. torch runs each
        P2POp's ``op`` with the tensor, group, tag and peer (``_batch_p2p``,
        ``batch_isend_irecv``); the op's own checks passed when it was made."""
        if latency_s <= 0:
            return ops
        for op in ops:
            if op.op is not dist.irecv:
                raise TorchPipeError(f"unexpected point-to-point op {op.op!r} in a recv list")
            op.op = late_irecv
        return ops

    class EmulatedStage(PipelineStage):  # type: ignore[misc]
        """``PipelineStage`` whose per-micro-batch compute calls are stretched by ``emu``.

        Arguments pass through untouched so a change of torch's signatures cannot break it."""

        def forward_one_chunk(self, *args: Any, **kwargs: Any) -> Any:
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return super().forward_one_chunk(*args, **kwargs)
            finally:
                emu.after("fwd", t0, c0)

        def backward_one_chunk(self, *args: Any, **kwargs: Any) -> Any:
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return super().backward_one_chunk(*args, **kwargs)
            finally:
                emu.after("bwd", t0, c0)

        def get_fwd_send_ops(self, *args: Any, **kwargs: Any) -> Any:
            return through(super().get_fwd_send_ops(*args, **kwargs))

        def get_fwd_recv_ops(self, *args: Any, **kwargs: Any) -> Any:
            return late(super().get_fwd_recv_ops(*args, **kwargs))

        def get_bwd_recv_ops(self, *args: Any, **kwargs: Any) -> Any:
            return late(super().get_bwd_recv_ops(*args, **kwargs))

        def get_bwd_send_ops(self, *args: Any, **kwargs: Any) -> Any:
            return through(super().get_bwd_send_ops(*args, **kwargs))

    return EmulatedStage(module, rank, k, torch.device("cpu"), input_args=example[0],
                         output_args=example[1])


def _exit_with_parent() -> None:
    """End this worker if the process that started it dies (SIGKILLed benches leave no
    orphans blocked in gloo for the whole timeout). ``ip netns exec`` execs, so the parent
    is still the bench."""
    import threading

    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(4)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _worker(job_path: str, rank: int) -> int:
    from datetime import timedelta

    import torch.distributed as dist
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

    _exit_with_parent()
    job = json.loads(Path(job_path).read_text())
    wd = Path(job["outdir"])
    cuts: list[int] = job["cuts"]
    k = len(cuts) - 1
    result_path = wd / f"rank{rank}.json"

    def fail(msg: str) -> int:
        result_path.write_text(json.dumps({"error": msg}))
        print(msg, file=sys.stderr, flush=True)
        return 3

    torch.set_num_threads(job["threads"])
    url = f"tcp://{job['master_addr']}:{job['master_port']}"
    try:
        dist.init_process_group("gloo", init_method=url, rank=rank, world_size=k,
                                timeout=timedelta(seconds=job["timeout"]))
    except Exception as e:  # any failure here means: no pipeline at all
        return fail(f"gloo could not start (init_method {url}, rank {rank} of {k}): "
                    f"{type(e).__name__}: {e}")
    (wd / f"rank{rank}.up").touch()  # the parent's sign that this rank joined the group
    try:
        first, last = rank == 0, rank == k - 1
        a, b = cuts[rank], cuts[rank + 1]
        model = build_model(job["model"], seed=job["seed"], width=job["width"])
        module = nn.Sequential(*model.layers[a:b])
        module.train()
        opt = _optimizer([p for p in module.parameters() if p.requires_grad], job["lr"],
                         job["momentum"], job["weight_decay"])
        emu = _Emulation(job["slowdowns"][rank], job["threads"])
        bs = job["batch_size"]
        example = _example_io(model.layers, model.input_shape, a, b, bs // job["micro_batches"])
        bw = job["uplinks_bps"][rank]
        uplink = _Uplink(bw) if bw else None
        stage = _make_stage(module, rank, k, emu, example, uplink, job["latency_s"])
        scale = 1.0 / bs

        def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            # the agents' loss: summed cross-entropy of the micro-batch over the mini-batch
            return F.cross_entropy(out, target, reduction="sum") * scale

        cls = Schedule1F1B if job["schedule"] == "1f1b" else ScheduleGPipe
        sched = cls(stage, n_microbatches=job["micro_batches"], loss_fn=loss_fn,
                    scale_grads=False)
        data = None
        if first or last:
            data = _dataset(job["model"], job["dataset"], job["data_path"], job["seed"],
                            job["synthetic_size"])
            batches = list(full_batches(len(data.train_x), bs, job["seed"], job["steps"]))
        step_ms: list[float] = []
        losses: list[float] = []
        t_start = 0.0
        for s in range(job["steps"]):
            if s == 1:
                dist.barrier()  # everyone done with the warm-up: the timed interval starts
                t_start = time.perf_counter()
            t0 = time.perf_counter()
            mb_losses: list[torch.Tensor] = []
            if data is not None:
                idx = batches[s]
                x, y = data.train_x[idx], data.train_y[idx]
            if first and last:
                sched.step(x, target=y, losses=mb_losses, return_outputs=False)
            elif first:
                sched.step(x, return_outputs=False)
            elif last:
                sched.step(target=y, losses=mb_losses, return_outputs=False)
            else:
                sched.step(return_outputs=False)
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
            step_ms.append((time.perf_counter() - t0) * 1e3)
            if last:
                losses.append(float(sum(float(v) for v in mb_losses)))
        if uplink is not None:
            uplink.close()  # every send issued and complete (its receiver has long had it)
        dist.barrier()
        timed_s = time.perf_counter() - t_start
        if job["check"]:
            state = {f"{int(n.split('.', 1)[0]) + a}.{n.split('.', 1)[1]}": t.detach().clone()
                     for n, t in module.state_dict().items()}
            torch.save(state, wd / f"rank{rank}.pt")
        result_path.write_text(json.dumps({
            "rank": rank, "layers": [a, b], "slowdown": emu.slowdown, "timed_s": timed_s,
            "step_ms": [round(v, 3) for v in step_ms], "losses": losses,
            "fwd_ms": round(emu.ms["fwd"], 3), "bwd_ms": round(emu.ms["bwd"], 3),
            "sleep_ms": round(emu.ms["sleep"], 3), "cpu_ms": round(emu.ms["cpu"], 3),
            "fwd_calls": emu.calls["fwd"],
            "bwd_calls": emu.calls["bwd"],
            "sends": uplink.sends if uplink else None,
            "send_bytes": uplink.send_bytes if uplink else None,
        }))
        return 0
    except Exception as e:
        import traceback

        traceback.print_exc()
        return fail(f"{type(e).__name__}: {e}")
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


# -- one process -----------------------------------------------------------------------------
def run_one_process(
    model_name: str,
    width: float,
    *,
    batch_size: int,
    micro_batches: int,
    steps: int,
    seed: int,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    threads: int = 1,
    dataset: str | None = None,
    data_path: str | None = None,
    synthetic_size: int = 2000,
    check: bool = False,
) -> dict[str, Any]:
    """The whole model in this process, same micro-batches, loss, optimizer and batches as
    the pipeline (``reference.train_reference``'s loop, timed): ``samples_per_s`` over steps
    1..N-1, the sum of their ``perf_counter`` spans. Sets ``torch.set_num_threads(threads)``
    for the run and restores it after."""
    n = len(build_model(model_name, seed=0, width=width).layers)
    _check_args(model_name, width, [0, n], batch_size, micro_batches, "gpipe", steps, None)
    data = _dataset(model_name, dataset, data_path, seed, synthetic_size)
    model = build_model(model_name, seed=seed, width=width)
    net = model.sequential()
    net.train()
    opt = _optimizer([p for p in net.parameters() if p.requires_grad], lr, momentum,
                     weight_decay)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    scale = 1.0 / batch_size
    step_ms: list[float] = []
    losses: list[float] = []
    try:
        for idx in full_batches(len(data.train_x), batch_size, seed, steps):
            x, y = data.train_x[idx], data.train_y[idx]
            t0 = time.perf_counter()
            total = 0.0
            for a, b in split(len(idx), micro_batches):  # torch's chunking too: tensor_split
                loss = F.cross_entropy(net(x[a:b]), y[a:b], reduction="sum") * scale
                loss.backward()
                total += float(loss.detach())
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
            step_ms.append((time.perf_counter() - t0) * 1e3)
            losses.append(total)
    finally:
        torch.set_num_threads(before)
    secs = sum(step_ms[1:]) / 1e3
    samples = (steps - 1) * batch_size
    out: dict[str, Any] = {
        "method": "one-process", "model": model_name, "width": width,
        "batch_size": batch_size, "micro_batches": micro_batches, "steps": steps,
        "warmup_steps": 1, "timed_steps": steps - 1, "samples": samples,
        "train_seconds": round(secs, 6), "samples_per_s": samples / max(secs, 1e-9),
        "step_ms": [round(v, 3) for v in step_ms], "losses": losses, "threads": threads,
        "full_batches_per_epoch": len(data.train_x) // batch_size,
        "timing": "samples / sum of perf_counter spans of optimizer steps 1..N-1",
    }
    if check:
        out["state_dict"] = {n: t.detach().clone() for n, t in net.state_dict().items()}
    return out


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest elementwise difference between two whole-model state dicts (same keys)."""
    if set(a) != set(b):
        raise ValueError(f"state dicts differ in names: {sorted(set(a) ^ set(b))[:5]}")
    return max((float((a[n].double() - b[n].double()).abs().max()) if a[n].numel() else 0.0)
               for n in a)


# -- command line (the worker entry point, and a small manual run) ---------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m accept_mqtt.bench.torchpipe",
                                description="torch pipelining peer of accept-mqtt")
    p.add_argument("--worker", metavar="JOB.json", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--model", default="cnn")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--cuts", default="0,5,9,14", help="comma-separated layer cuts")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--micro-batches", type=int, default=4)
    p.add_argument("--schedule", choices=SCHEDULES, default="1f1b")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--slowdowns", help="comma-separated, one per stage")
    p.add_argument("--check", action="store_true",
                   help="also train in one process and compare the parameters")
    a = p.parse_args(argv)
    if a.worker:
        return _worker(a.worker, a.rank)
    cuts = [int(c) for c in a.cuts.split(",")]
    slow = [float(s) for s in a.slowdowns.split(",")] if a.slowdowns else None
    kw: dict[str, Any] = {"batch_size": a.batch_size, "micro_batches": a.micro_batches,
                          "steps": a.steps, "seed": a.seed, "lr": a.lr, "check": a.check}
    res = run_torch_pipeline(a.model, a.width, cuts, schedule=a.schedule, slowdowns=slow, **kw)
    print(f"torch pipelining ({a.schedule}, cuts {cuts}): {res['samples_per_s']:.1f} "
          f"samples/s over {res['timed_steps']} timed steps; stages "
          f"{[(s['layers'], s['fwd_ms'], s['bwd_ms'], s['sleep_ms']) for s in res['stages']]}")
    if a.check:
        one = run_one_process(a.model, a.width, **kw)
        diff = max_abs_diff(res["state_dict"], one["state_dict"])
        print(f"one process: {one['samples_per_s']:.1f} samples/s; max |param diff| {diff:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
