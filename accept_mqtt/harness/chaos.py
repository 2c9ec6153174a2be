"""Fault injectors for chaos runs: real processes, real signals, real bytes on the wire.

Used by ``accept-mqtt bench chaos`` (``accept_mqtt/bench/chaos.py``) and its test. Nothing here
fakes a fault: a killed agent gets SIGKILL, a hung one SIGSTOP (it computes nothing, answers
nothing and, past 1.5x its keepalive, the broker drops it and fires its Will), the coordinator
is a separate ``accept-mqtt train`` process killed with SIGKILL and resumed with ``--resume``,
and garbage is bytes a broken or hostile client could publish.

Guarantees:

* ``CoordinatorProcess`` runs ``python -m accept_mqtt.cli train --broker URL --job J ...`` with
  plain progress lines appended to one log file per job (every incarnation, a marker line
  between them), and its run record written with ``--json``; ``stop`` ends it (SIGTERM, then
  SIGKILL) whatever state it is in, a stopped (SIGSTOP) process included.
* ``proc_memory`` reads a live process's resident set and its peak (``VmRSS``, ``VmHWM`` of
  ``/proc/PID/status``; None once it is gone), and ``MemorySampler`` polls a set of processes
  from a thread, keeping each role's peak across its incarnations: a process killed with
  SIGKILL keeps the peak read before it died.
* ``garbage`` returns a burst of malformed payloads for a job's topics: every ``bad_json``
  message (JSON that is no valid command, plan, sync op, event or timing list) and random
  ones drawn from a ``random.Random`` (so a seed fixes them): random bytes, truncated msgpack,
  well-formed frames of the wrong shape for the step in flight. It never returns a valid
  message (a valid ``sync`` op or command would be an instruction, not garbage).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from accept_mqtt.wire import codec
from accept_mqtt.wire.messages import Weights, encode
from accept_mqtt.wire.topics import Topics


@dataclass
class CoordinatorProcess:
    """One job's coordinator as its own OS process (``accept-mqtt train --broker``)."""

    url: str
    job: str
    train_args: list[str]  # --model, --dataset, --devices, --max-steps ... (no --job/--resume)
    workdir: Path
    root: str = "accept"
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def log_path(self) -> Path:
        return self.workdir / f"coordinator-{self.job}.log"

    @property
    def record_path(self) -> Path:
        return self.workdir / f"record-{self.job}.json"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def start(self, resume: bool = False) -> None:
        cmd = [sys.executable, "-m", "accept_mqtt.cli", "train", "--broker", self.url,
               "--root", self.root, "--job", self.job, *self.train_args,
               "--json", str(self.record_path), "--no-progress"]
        if resume:
            cmd.append("--resume")
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== start {self.starts}{' (resume)' if resume else ''}: "
                      f"{' '.join(cmd)}\n".encode())
            log.flush()
            # one torch thread: the coordinator's own work is tiny, the agents need the cores
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)

    def poll(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def kill(self) -> None:
        """SIGKILL, as a crash would: no retained plan cleared, no record written."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self, grace: float = 5.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGCONT)
        self.proc.terminate()
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.kill()

    def wait(self, timeout: float) -> int | None:
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_since(self, offset: int) -> str:
        """What the coordinator (any incarnation) printed after ``offset`` bytes."""
        if not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def log_tail(self, lines: int = 5) -> str:
        if not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace").strip().splitlines()
        return "\n".join(text[-lines:])

    def record(self) -> dict[str, object] | None:
        try:
            data = json.loads(self.record_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None


def proc_memory(pid: int) -> tuple[int, int] | None:
    """(resident bytes now, peak resident bytes) of a live process; None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    vals: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            vals[key] = int(rest.split()[0]) * 1024  # kB
    if "VmRSS" not in vals:  # a zombie has no memory lines
        return None
    return vals["VmRSS"], vals.get("VmHWM", vals["VmRSS"])


@dataclass
class MemorySampler:
    """Polls ``pids()`` (role -> pid or None) every ``interval`` s in a thread; ``peaks`` is
    each role's largest peak RSS (``VmHWM``) seen over all its processes."""

    pids: Callable[[], dict[str, int | None]]
    interval: float = 0.25
    peaks: dict[str, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> None:
        for role, pid in self.pids().items():
            if pid is None:
                continue
            mem = proc_memory(pid)
            if mem is not None:
                self.peaks[role] = max(self.peaks.get(role, 0), mem[1])

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):  # a dict changing under us: next poll
                self.sample()

    def start(self) -> MemorySampler:
        self._thread = threading.Thread(target=self._loop, name="memory-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGSTOP: the process neither computes nor answers, and its socket goes quiet."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGSTOP)


def continue_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)


# -- garbage ---------------------------------------------------------------------------------
GARBAGE_KINDS = ("random-bytes", "truncated-msgpack", "wrong-shape-frame", "bad-json")


def _frame(job: str, step: int, mb: int, kind: str, shape: tuple[int, ...],
           rng: random.Random) -> bytes:
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    x = torch.randn(shape, generator=g)
    labels = torch.zeros(shape[0], dtype=torch.int64) if kind == "act" else None
    return codec.to_bytes(codec.encode(x, bits=32, job=job, step=step, mb=mb, kind=kind,
                                       labels=labels))


def bad_json(topics: Topics, job: str, device: str) -> list[tuple[str, bytes, str]]:
    """One of each malformed JSON message the bench sends: a command, a sync op, a plan, an
    event and timing samples that no receiver may act on."""
    return [(topic, body.encode(), "bad-json") for topic, body in [
        (topics.control(job), '{"cmd": "explode"}'),
        (topics.control(job), '{"cmd": "set", "act_bits": "eight"}'),
        (topics.control(job), '{"cmd": "pause", "unknown_field": 1}'),
        (topics.control(job), "pause now please"),
        (topics.control(job), "[1, 2, 3"),
        (topics.sync(job), '{"op": "rewind"}'),
        (topics.sync(job), '{"op": "format-disk"}'),
        (topics.plan(job), '{"job": 42, "stages": "all"}'),
        (topics.events(job, device), '{"op": "stepped", "device": 1}'),
        (topics.timing(job, device), '{"not": "a list"}'),
    ]]


def garbage(rng: random.Random, topics: Topics, job: str, step: int, stages: int,
            devices: list[str], n: int) -> list[tuple[str, bytes, str]]:
    """A burst for ``job``, whose step in flight is ``step``: every ``bad_json`` message plus
    ``n`` random binary ones (random bytes, truncated msgpack, wrong-shape frames), shuffled;
    each as (topic, payload, what)."""
    out = bad_json(topics, job, rng.choice(devices))
    for _ in range(n):
        kind = rng.choice(GARBAGE_KINDS[:3])
        s = rng.randrange(stages)
        dev = rng.choice(devices)
        if kind == "random-bytes":
            topic = rng.choice([topics.fwd(job, s), topics.bwd(job, s), topics.sync(job),
                                topics.weights(job, s), topics.events(job, dev),
                                topics.timing(job, dev), topics.control(job)])
            payload = rng.randbytes(rng.randrange(1, 2048))
        elif kind == "truncated-msgpack":
            if rng.random() < 0.5:
                full = _frame(job, step, rng.randrange(4), "act", (16, 8), rng)
                topic = topics.fwd(job, s)
            else:
                full = encode(Weights(job=job, stage=s, step=step, purpose="restore",
                                      version=1, tensors={}))
                topic = topics.weights(job, s)
            payload = full[: rng.randrange(1, len(full))]
        else:  # a well-formed frame for the step in flight whose tensor fits no stage
            if rng.random() < 0.5:
                topic = topics.fwd(job, s)
                payload = _frame(job, step, rng.randrange(4), "act", (3, 5, 7), rng)
            else:
                topic = topics.bwd(job, s)
                payload = _frame(job, step, rng.randrange(4), "grad", (2, 11), rng)
        out.append((topic, payload, kind))
    rng.shuffle(out)
    return out


def wait_until(pred: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()
