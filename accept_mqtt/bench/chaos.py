"""``accept-mqtt bench chaos``: one job under faults injected at random times, from real parts.

A private Mosquitto (the shipped ``mosquitto.conf``, no persistence, as ``accept-mqtt train``
runs it), ``--devices`` agents as ``python -m device_agent`` processes and the coordinator as
an ``accept-mqtt train --broker`` process. First an undisturbed job of ``--steps`` steps (the
reference accuracy of this seed), then the same job (same seed, same steps, same cluster)
while ``--faults`` faults fire, one after another, each at a random step of the job plus a
random fraction of a second (all drawn from ``--seed``):

* ``agent-kill``: SIGKILL a device of the plan, start it again (same device id) 1-3 s later;
* ``broker-restart``: SIGKILL Mosquitto, start it again on the same port 0.5-2 s later (its
  retained statuses and plan are gone: the shipped config keeps no persistence);
* ``coordinator-kill``: SIGKILL the coordinator, start it again 0.5-2 s later with ``--resume``
  (from scratch if it died before its first checkpoint);
* ``device-hang``: SIGSTOP a device of the plan for ``--hang-seconds``, then SIGCONT (it stays
  connected until 1.5x its keepalive passes, then the broker fires its Will);
* ``garbage``: on the job's topics, 10 malformed JSON messages (commands, a plan, sync ops, an
  event, timing samples: every burst has each) and ``--garbage-count`` random binary ones
  (random bytes, truncated msgpack, frames of the wrong shape for the step in flight), in a
  random order (``harness.chaos.garbage``).

Each fault is judged from outside, by what the job's metrics topic shows (a subscriber of the
bench's own) and by the processes: **survived** when, after the fault ended, the job got at
least 3 steps past the step it had reached when the fault began (or finished), within
``--recover-timeout`` seconds, and every process the bench did not kill is still alive.
**Steps replayed** is how far the step counter went back (from the step stream; the
coordinator's own ``recovered`` count when that is larger), against the bound docs/faults.md
gives for that fault. A fault not survived is a row, not the end of the bench: the bench
rescues the job (restarts what is dead, kills a stuck coordinator, resumes it from its
checkpoint) and goes on; if the rescue fails too, the remaining faults are not injected.

The summary compares the final held-out accuracy with the undisturbed run's (within 1 point
is the target) and gives each process's peak resident memory (``VmHWM``, polled every 0.25 s;
for agents and the broker over both runs, all incarnations). Faults are sequential, never
overlapping, so each row is one fault's doing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from accept_mqtt.coordinator.config import TrainConfig
from accept_mqtt.harness.chaos import (
    CoordinatorProcess,
    MemorySampler,
    continue_process,
    garbage,
    stop_process,
    wait_until,
)
from accept_mqtt.harness.local import LocalCluster, default_agents
from accept_mqtt.wire.topics import Topics
from broker import MosquittoBroker

from .overhead import machine

GARBAGE_SETTLE_S = 1.5  # past the coordinator's 1 s window of rate-limited rejections
KINDS = ("agent-kill", "broker-restart", "coordinator-kill", "device-hang", "garbage")
CONFIRM_STEPS = 3  # steps past the fault's step that count as "training goes on"
MAX_RESCUES = 3


def replay_bound(kind: str, checkpoint_every: int) -> int:
    """Steps docs/faults.md says the fault costs at most ("lost at most" column)."""
    if kind in ("broker-restart", "garbage"):
        return 0  # a rewind redoes the step in flight from its start: nothing replayed
    # a device lost or hung, the coordinator resumed: "the steps since the last checkpoint":
    # fewer than checkpoint_every, or exactly that many when the fault hits while the
    # checkpoint due at that step is being collected
    return checkpoint_every


@dataclass
class Fault:
    kind: str
    step: int  # fires once the job has completed this many steps ...
    delay: float  # ... and this many seconds more (a random point inside a step)


def schedule(seed: int, steps: int, n: int, kinds: tuple[str, ...]) -> list[Fault]:
    """``n`` faults at random steps in the middle 10-80 % of the job; every kind once before
    any twice (kinds in a seeded order)."""
    rng = random.Random(seed)
    order: list[str] = []
    while len(order) < n:
        perm = list(kinds)
        rng.shuffle(perm)
        order += perm
    lo, hi = max(2, steps // 10), max(3, steps * 8 // 10)
    at = sorted(rng.randint(lo, hi) for _ in range(n))
    return [Fault(k, s, round(rng.uniform(0.0, 0.5), 3)) for k, s in zip(order[:n], at,
                                                                         strict=True)]


class Monitor:
    """The bench's own MQTT client: every job's metrics and every device's status, kept with
    their arrival times; reconnects by itself after a broker restart."""

    def __init__(self, host: str, port: int, topics: Topics) -> None:
        self.topics = topics
        self.lock = threading.Lock()
        self.metrics: dict[str, list[tuple[float, dict[str, Any]]]] = {}
        self.status: dict[str, dict[str, Any]] = {}
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"chaos-bench-{os.getpid()}", clean_session=True)
        self.client.reconnect_delay_set(min_delay=1, max_delay=1)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect_async(host, port, keepalive=10)
        self.client.loop_start()

    def _on_connect(self, c: mqtt.Client, *_: object) -> None:
        root = self.topics.root
        c.subscribe([(f"{root}/jobs/+/metrics", 1), (self.topics.all_status, 1)])

    def _on_message(self, c: mqtt.Client, userdata: object, m: mqtt.MQTTMessage) -> None:
        parts = m.topic.split("/")
        try:
            body = json.loads(m.payload) if m.payload else None
        except ValueError:
            return
        now = time.monotonic()
        with self.lock:
            if parts[-1] == "metrics" and isinstance(body, dict):
                self.metrics.setdefault(parts[-2], []).append((now, body))
            elif parts[-1] == "status":
                dev = self.topics.parse_device(m.topic)
                if dev is not None:
                    self.status[dev] = body if isinstance(body, dict) else {"state": "offline"}

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    def since(self, job: str, t: float) -> list[tuple[float, dict[str, Any]]]:
        with self.lock:
            return [(ts, b) for ts, b in self.metrics.get(job, []) if ts >= t]

    def last_step(self, job: str) -> int:
        with self.lock:
            steps = [b["step"] for _, b in self.metrics.get(job, []) if b.get("type") == "step"]
        return steps[-1] if steps else 0

    def plan_devices(self, job: str) -> list[str]:
        with self.lock:
            return sorted(d for d, s in self.status.items()
                          if s.get("state") == "busy" and s.get("job") == job)

    def publish(self, topic: str, payload: bytes) -> bool:
        info = self.client.publish(topic, payload, qos=1)
        return info.rc == mqtt.MQTT_ERR_SUCCESS


@dataclass
class Row:
    """One fault as the report shows it."""

    n: int
    kind: str
    target: str = ""
    at_step: int | None = None
    t_s: float | None = None  # seconds into the chaos job
    detail: str = ""
    survived: bool | None = None  # None: not injected
    how: str = ""
    replayed: int | None = None
    bound: int = 0
    within_bound: bool | None = None
    back_after_s: float | None = None
    errors_reported: int = 0
    rescue: str = ""


@dataclass
class Chaos:
    """One bench: the cluster, the monitor and the two jobs (see the module docstring)."""

    args: argparse.Namespace
    workdir: Path
    broker: MosquittoBroker = field(init=False)
    cluster: LocalCluster = field(init=False)
    monitor: Monitor = field(init=False)
    topics: Topics = field(init=False)
    coord: CoordinatorProcess | None = None
    t0: float = field(default_factory=time.monotonic)
    rng: random.Random = field(init=False)  # draws of the fault being injected
    stopped: set[str] = field(default_factory=set)  # devices now SIGSTOPped
    t_job: float = 0.0  # when the current job's coordinator started
    t_fault: float = 0.0  # when the current fault began ...
    t_end: float = 0.0  # ... and ended (the process back, the burst sent)
    garbage_topics: set[str] = field(default_factory=set)  # of the last garbage burst
    log_at: int = 0  # the coordinator log's size when the fault began
    given_broker: MosquittoBroker | None = None  # a started one to use (tests); else our own

    def __post_init__(self) -> None:
        self.rng = random.Random()  # per fault: see _inject
        self.topics = Topics(self.args.root)

    def say(self, msg: str) -> None:
        print(f"[chaos +{time.monotonic() - self.t0:6.1f}s] {msg}", flush=True)

    @property
    def checkpoint_every(self) -> int:
        ce = self.args.checkpoint_every
        return TrainConfig.checkpoint_every if ce is None else ce

    def train_args(self) -> list[str]:
        a = self.args
        out = ["--model", "cnn", "--dataset", "digits", "--devices", str(a.devices),
               "--max-steps", str(a.steps), "--epochs", str(a.steps), "--seed", str(a.seed),
               "--runs-dir", str(self.workdir / "runs")]
        if a.checkpoint_every is not None:
            out += ["--checkpoint-every", str(a.checkpoint_every)]
        return out

    def pids(self) -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        bp = self.broker.proc
        out["broker"] = bp.pid if bp is not None and bp.poll() is None else None
        out["coordinator"] = self.coord.pid if self.coord is not None else None
        for dev, p in list(self.cluster.procs.items()):
            out[dev] = p.pid if p.poll() is None else None
        return out

    # -- one job ------------------------------------------------------------------------------
    def run_job(self, job: str, faults: list[Fault]) -> dict[str, Any]:
        coord = self.coord = CoordinatorProcess(self.broker.url, job, self.train_args(),
                                                self.workdir, root=self.args.root)
        self.t_job = time.monotonic()
        coord.start()
        self.say(f"job {job}: coordinator pid {coord.pid}, {self.args.steps} steps, "
                 f"{len(faults)} faults")
        rows: list[Row] = []
        incidents: list[str] = []
        rescues = 0
        aborted = False
        for i, f in enumerate(faults, 1):
            row = Row(i, f.kind, bound=replay_bound(f.kind, self.checkpoint_every))
            rows.append(row)
            if aborted:
                row.how = "not injected: the job was lost earlier"
                continue
            reached = self._wait_step(job, f.step)
            if reached == "done":
                row.how = "not injected: the job had finished"
                continue
            if reached != "reached":
                incidents.append(f"before fault {i}: {reached}")
                ok, what = self._rescue(job)
                rescues += 1
                row.how = f"not injected: the job {reached}; rescue: {what}"
                if not ok or rescues > MAX_RESCUES:
                    aborted = True
                continue
            time.sleep(f.delay)
            self._inject(job, row)
            self._judge(job, row)
            self.say(f"fault {i} {row.kind}: {'survived' if row.survived else 'NOT survived'}"
                     f" ({row.how}); replayed {row.replayed} (bound {row.bound})")
            if not row.survived:
                ok, what = self._rescue(job)
                rescues += 1
                row.rescue = what
                if not ok or rescues > MAX_RESCUES:
                    aborted = True
        # the rest of the job: rescue a dead or stuck coordinator a few times, then give up
        while not aborted and coord.poll() != 0:
            state = self._wait_end(job)
            if state == "done":
                break
            incidents.append(f"after the faults: {state}")
            ok, what = self._rescue(job)
            incidents.append(f"rescue: {what}")
            rescues += 1
            if not ok or rescues > MAX_RESCUES:
                aborted = True
        coord.wait(10)
        record = coord.record() if coord.poll() == 0 else None
        return {"job": job, "rows": rows, "incidents": incidents, "record": record,
                "finished": record is not None, "coordinator_starts": coord.starts,
                "seconds": round(time.monotonic() - self.t_job, 1),
                "log_tail": coord.log_tail(8) if record is None else ""}

    def _progress_line(self, job: str) -> None:
        self.say(f"step {self.monitor.last_step(job)}/{self.args.steps}")

    def _wait_step(self, job: str, step: int) -> str:
        """"reached", "done", "exited (code N)" or "stalled" (no new step in the timeout)."""
        assert self.coord is not None
        last, last_t, shown = -1, time.monotonic(), time.monotonic()
        while True:
            cur = self.monitor.last_step(job)
            now = time.monotonic()
            if cur >= step:
                return "reached"
            rc = self.coord.poll()
            if rc == 0:
                return "done"
            if rc is not None:
                return f"exited (code {rc}: {self.coord.log_tail(1)})"
            if cur != last:
                last, last_t = cur, now
            elif now - last_t > self.args.recover_timeout:
                return f"stalled at step {cur}"
            if now - shown > 10:
                self._progress_line(job)
                shown = now
            time.sleep(0.05)

    def _wait_end(self, job: str) -> str:
        """"done", or why not (the step counter never passes the last step)."""
        return self._wait_step(job, self.args.steps + 1)

    # -- faults ---------------------------------------------------------------------------------
    def _target(self, job: str) -> str:
        devs = self.monitor.plan_devices(job) or sorted(self.cluster.procs)
        return self.rng.choice(devs)

    def _inject(self, job: str, row: Row) -> None:
        assert self.coord is not None
        row.at_step = self.monitor.last_step(job)
        self.log_at = self.coord.log_size()
        self.t_fault = time.monotonic()
        row.t_s = round(self.t_fault - self.t_job, 1)
        self.say(f"fault {row.n}: {row.kind} at step {row.at_step}")
        # the fault's own random draws: the same seed gives the same target, pauses and bytes
        # whatever happened before (how many devices the plan had, which faults were skipped)
        self.rng = random.Random(f"chaos-{self.args.seed}-{row.n}")
        junk_rng = random.Random(f"chaos-{self.args.seed}-{row.n}-garbage")
        if row.kind == "agent-kill":
            dev = row.target = self._target(job)
            pause = self._down_for(lambda: self.cluster.kill_agent(dev),
                                   lambda: self._start_agent(dev), 1.0, 3.0)
            row.detail = f"SIGKILL, same id back after {pause:.1f} s"
        elif row.kind == "broker-restart":
            row.target = "mosquitto"
            pause = self._down_for(self.broker.kill, self.broker.start, 0.5, 2.0)
            row.detail = f"SIGKILL, same port back after {pause:.1f} s"
        elif row.kind == "coordinator-kill":
            row.target = "coordinator"
            resume = self._checkpoint(job).exists()
            pause = self._down_for(self.coord.kill, lambda: self.coord.start(resume=resume),
                                   0.5, 2.0)
            row.detail = (f"SIGKILL, --resume after {pause:.1f} s" if resume else
                          f"SIGKILL before any checkpoint: restarted after {pause:.1f} s")
        elif row.kind == "device-hang":
            dev = row.target = self._target(job)
            proc = self.cluster.procs[dev]
            stop_process(proc)
            self.stopped.add(dev)
            time.sleep(self.args.hang_seconds)
            continue_process(proc)
            self.stopped.discard(dev)
            row.detail = f"SIGSTOP {self.args.hang_seconds:g} s, then SIGCONT"
        elif row.kind == "garbage":
            row.target = "job topics"
            stages = len(self.monitor.plan_devices(job)) or self.args.devices
            burst = garbage(junk_rng, self.topics, job, row.at_step, stages,
                            sorted(self.cluster.procs), self.args.garbage_count)
            sent = sum(self.monitor.publish(t, p) for t, p, _ in burst)
            self.garbage_topics = {t for t, _, _ in burst}
            kinds = Counter(k for _, _, k in burst)
            row.detail = (f"{sent}/{len(burst)} sent: "
                          + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))
        else:
            raise ValueError(f"unknown fault kind {row.kind!r}")
        self.t_end = time.monotonic()

    def _down_for(self, kill: Callable[[], object], start: Callable[[], object], lo: float,
                  hi: float) -> float:
        """Kill, wait a random lo..hi seconds, start again; the seconds waited."""
        kill()
        pause = self.rng.uniform(lo, hi)
        time.sleep(pause)
        start()
        return pause

    def _start_agent(self, dev: str) -> None:
        self.cluster.start_agent(next(s for s in self.cluster.specs if s.device_id == dev))

    def _checkpoint(self, job: str) -> Path:
        return self.workdir / "runs" / job / "checkpoint.pt"

    def _judge(self, job: str, row: Row) -> None:
        """Wait until the job is CONFIRM_STEPS past the fault's step (or done), then read
        from the metrics what happened: replayed steps, recoveries, errors reported."""
        assert self.coord is not None and row.at_step is not None
        goal = min(row.at_step + CONFIRM_STEPS, self.args.steps)
        deadline = self.t_end + self.args.recover_timeout
        shown = time.monotonic()
        outcome = "timeout"
        while time.monotonic() < deadline:
            after = [b["step"] for _, b in self.monitor.since(job, self.t_end)
                     if b.get("type") == "step"]
            if after and max(after) >= goal:
                outcome = "ok"
                break
            rc = self.coord.poll()
            if rc == 0:
                outcome = "ok"
                break
            if rc is not None:
                outcome = f"coordinator exited (code {rc}: {self.coord.log_tail(1)})"
                break
            if time.monotonic() - shown > 10:
                self._progress_line(job)
                shown = time.monotonic()
            time.sleep(0.05)
        if row.kind == "garbage":  # the coordinator publishes what its rate limit held back
            # as one summary when its window ends (docs/protocol.md, "error"): wait for it
            time.sleep(max(0.0, self.t_end + GARBAGE_SETTLE_S - time.monotonic()))
        msgs = self.monitor.since(job, self.t_fault)
        # steps replayed: each time the counter goes back, how far (from the step stream)
        prev, replayed, first_back = row.at_step, 0, None
        for _, b in msgs:
            if b.get("type") != "step":
                continue
            s = b["step"]
            if s <= prev:  # step s again: steps s..prev are done a second time
                replayed += prev - (s - 1)
                first_back = s - 1 if first_back is None else first_back
            prev = s
        recs = [b for _, b in msgs if b.get("type") == "recovered"]
        redo = sum(int(b.get("redo_steps", 0)) for b in recs)
        row.replayed = max(replayed, redo)
        row.within_bound = row.replayed <= row.bound
        row.errors_reported = sum(1 for _, b in msgs if b.get("type") == "error")
        back = [ts for ts, b in msgs if b.get("type") == "step" and ts >= self.t_end
                and b["step"] > row.at_step]
        row.back_after_s = round(back[0] - self.t_end, 1) if back else None
        how = [f"{b.get('action')} ({b.get('reason')})" for b in recs]
        if not recs:  # published while the broker or our connection was down: its own log
            how += [ln.split("] ", 1)[-1] for ln in self.coord.log_since(self.log_at)
                    .splitlines() if ln.startswith("[accept-mqtt] re-plan:")
                    and ("redone" in ln or "back to step" in ln)][:2]
        if row.kind == "coordinator-kill" and first_back is not None:
            how.append(f"resumed at step {first_back}")
        if row.errors_reported:
            how.append(f"{row.errors_reported} errors on the metrics topic")
        if row.kind == "garbage":
            # a topic that got garbage and no error naming it: silently dropped, or taken in
            named = {b.get("topic") for _, b in msgs if b.get("type") == "error"}
            # the coordinator's rate-limited rejections: a summary names their topics
            named |= {t for _, b in msgs if b.get("type") == "error"
                      for t in b.get("suppressed_topics") or []}
            silent = sorted("/".join(self.topics.parse_tail(t, job))
                            for t in self.garbage_topics if t not in named)
            how.append(f"{len(self.garbage_topics) - len(silent)}/{len(self.garbage_topics)} "
                       f"topics answered with an error"
                       + (f" (none on the metrics topic for: {', '.join(silent)})"
                          if silent else ""))
        dead = [d for d, p in self.cluster.procs.items() if p.poll() is not None]
        if outcome == "ok" and dead:
            outcome = f"agent {', '.join(dead)} died"
        if outcome == "ok" and self.broker.proc is None:
            outcome = "broker died"
        row.survived = outcome == "ok"
        if not row.survived:
            how.insert(0, outcome if outcome != "timeout" else
                       f"no progress past step {row.at_step} in {self.args.recover_timeout:g} s "
                       f"(at step {self.monitor.last_step(job)})")
        row.how = "; ".join(how) or ("training went on, no recovery seen" if row.survived
                                     else "")

    def _rescue(self, job: str) -> tuple[bool, str]:
        """Bring the job back by hand: what a person on call would do. (ok, what was done)"""
        assert self.coord is not None
        done: list[str] = []
        if self.broker.proc is None or self.broker.proc.poll() is not None:
            self.broker.start()
            done.append("broker restarted")
        for dev, p in list(self.cluster.procs.items()):
            if dev in self.stopped:
                continue_process(p)
                self.stopped.discard(dev)
            if p.poll() is not None:
                self._start_agent(dev)
                done.append(f"agent {dev} restarted")
        if self.coord.poll() is None:
            self.coord.kill()
            done.append("stuck coordinator killed")
        resume = self._checkpoint(job).exists()
        self.coord.start(resume=resume)
        done.append("coordinator resumed" if resume else "coordinator restarted")
        t = time.monotonic()
        ok = wait_until(lambda: any(b.get("type") == "step" for _, b in self.monitor.since(
            job, t)) or self.coord.poll() is not None, self.args.recover_timeout, 0.2)
        ok = ok and self.coord.poll() in (None, 0)
        self.say(f"rescue: {', '.join(done)}: {'training again' if ok else 'FAILED'}")
        return ok, ", ".join(done) + ("" if ok else " (rescue failed)")

    # -- the whole bench ----------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        a = self.args
        kinds = tuple(k.strip() for k in a.kinds.split(",") if k.strip())
        faults = schedule(a.seed, a.steps, a.faults, kinds)
        self.broker = self.given_broker or MosquittoBroker(workdir=self.workdir / "broker")
        if self.given_broker is None:
            self.broker.start()
        self.cluster = LocalCluster(default_agents(a.devices), broker=self.broker,
                                    root=a.root, workdir=self.workdir)
        self.monitor = Monitor(self.broker.host, self.broker.port, self.topics)
        sampler = MemorySampler(self.pids)
        load0 = os.getloadavg()[0]
        try:
            with self.cluster:
                sampler.start()
                self.say(f"broker {self.broker.url}, {a.devices} agents"
                         + ("" if a.no_reference else "; the undisturbed run first"))
                ref = self.run_job(f"chaos{a.seed}-ref", []) if not a.no_reference else None
                if ref is not None:
                    acc = (ref["record"] or {}).get("final_accuracy")
                    self.say(f"reference: accuracy {acc}, {ref['seconds']} s")
                self.stopped.clear()
                dis = self.run_job(f"chaos{a.seed}", faults)
                for dev in list(self.stopped):
                    continue_process(self.cluster.procs[dev])
        finally:
            sampler.stop()
            if self.coord is not None:
                self.coord.stop()
            self.monitor.close()
            if self.given_broker is None:
                self.broker.stop()
        return summarize(a, faults, ref, dis, sampler.peaks, load0, os.getloadavg()[0])


def _acc(run: dict[str, Any] | None) -> float | None:
    rec = (run or {}).get("record") or {}
    acc = rec.get("final_accuracy")
    return float(acc) if acc is not None else None


def summarize(args: argparse.Namespace, faults: list[Fault], ref: dict[str, Any] | None,
              dis: dict[str, Any], peaks: dict[str, int], load0: float,
              load1: float) -> dict[str, Any]:
    rows: list[Row] = dis["rows"]
    injected = [r for r in rows if r.survived is not None]
    a_ref, a_dis = _acc(ref), _acc(dis)
    delta = None if a_ref is None or a_dis is None else round(100 * (a_dis - a_ref), 2)
    rec = dis["record"] or {}
    return {
        "bench": "chaos", "seed": args.seed, "steps": args.steps, "devices": args.devices,
        "checkpoint_every": (TrainConfig.checkpoint_every if args.checkpoint_every is None
                             else args.checkpoint_every),
        "hang_seconds": args.hang_seconds, "recover_timeout": args.recover_timeout,
        "schedule": [asdict(f) for f in faults],
        "faults": [asdict(r) for r in rows],
        "injected": len(injected), "survived": sum(1 for r in injected if r.survived),
        "within_bound": sum(1 for r in injected if r.survived and r.within_bound),
        "incidents": dis["incidents"],
        "finished": dis["finished"], "final_steps": rec.get("steps"),
        "coordinator_starts": dis["coordinator_starts"],
        "accuracy": {"undisturbed": a_ref, "disturbed": a_dis, "delta_points": delta,
                     "within_1_point": None if delta is None else abs(delta) <= 1.0},
        "seconds": {"undisturbed": (ref or {}).get("seconds"), "disturbed": dis["seconds"]},
        "peak_rss_mb": {k: round(v / 2**20, 1) for k, v in sorted(peaks.items())},
        "load_average_1min": {"start": round(load0, 2), "end": round(load1, 2)},
        "log_tail": dis["log_tail"], "machine": machine(),
    }


def print_report(res: dict[str, Any]) -> None:
    print()
    print(f"chaos: seed {res['seed']}, {res['steps']} steps, {res['devices']} devices, "
          f"checkpoint every {res['checkpoint_every']} steps")
    print()
    print("| # | fault | target | at step | t (s) | injected how | survived | recovered how "
          "| replayed / bound | back after (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in res["faults"]:
        surv = {True: "yes", False: "**no**", None: "-"}[r["survived"]]
        if r["rescue"]:
            surv += f" (rescue: {r['rescue']})"
        # a fault not survived was replayed by the bench's rescue, not by the recovery
        rep = "-" if r["replayed"] is None or not r["survived"] else (
            f"{r['replayed']} / {r['bound']}" + ("" if r["within_bound"] else " **over**"))
        print(f"| {r['n']} | {r['kind']} | {r['target'] or '-'} | "
              f"{'-' if r['at_step'] is None else r['at_step']} | "
              f"{'-' if r['t_s'] is None else r['t_s']} | {r['detail'] or '-'} | {surv} | "
              f"{r['how']} | {rep} | "
              f"{'-' if r['back_after_s'] is None else r['back_after_s']} |")
    acc = res["accuracy"]
    print()
    print(f"faults survived: {res['survived']}/{res['injected']} injected "
          f"({len(res['faults'])} scheduled); survived within the documented replay bound: "
          f"{res['within_bound']}/{res['survived']}")
    fin = "finished" if res["finished"] else "**did not finish**"
    print(f"job {fin}: {res['final_steps']} steps, {res['coordinator_starts']} coordinator "
          f"start(s), {res['seconds']['disturbed']} s (undisturbed "
          f"{res['seconds']['undisturbed']} s)")
    for line in res["incidents"]:
        print(f"  incident: {line}")

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.2f} %"

    within = {True: "within 1 point", False: "**more than 1 point off**", None: "-"}[
        acc["within_1_point"]]
    print(f"final held-out accuracy: disturbed {pct(acc['disturbed'])}, undisturbed "
          f"{pct(acc['undisturbed'])}, delta {acc['delta_points']} points ({within})")
    print("peak RSS (MB): " + ", ".join(f"{k} {v}" for k, v in res["peak_rss_mb"].items()))
    la = res["load_average_1min"]
    print(f"1-minute load average: {la['start']} at the start, {la['end']} at the end"
          + (" (a shared, busy machine)" if max(la.values()) > 1.0 else ""))
    if res["log_tail"]:
        print("coordinator log (last lines):\n" + res["log_tail"])


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0,
                   help="fixes the training run and the fault schedule (default 0)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps of the job")
    p.add_argument("--faults", type=int, default=10, help="faults to inject (default 10)")
    p.add_argument("--kinds", default=",".join(KINDS),
                   help=f"comma-separated fault kinds (default all: {','.join(KINDS)})")
    p.add_argument("--devices", type=int, default=3, help="device agents (default 3)")
    p.add_argument("--checkpoint-every", type=int, default=None,
                   help="the job's checkpoint interval (default: train's, "
                        f"{TrainConfig.checkpoint_every})")
    p.add_argument("--hang-seconds", type=float, default=20.0,
                   help="how long a hung device stays stopped (default 20: past 1.5x the "
                        "agents' 10 s keepalive, so the broker fires its Will)")
    p.add_argument("--garbage-count", type=int, default=20,
                   help="random binary messages per garbage burst, beside its 10 malformed "
                        "JSON ones (default 20)")
    p.add_argument("--recover-timeout", type=float, default=180.0,
                   help="seconds a fault may take before it counts as not survived "
                        "(default 180: past the 120 s step timeout)")
    p.add_argument("--root", default="accept", help="topic root (default accept)")
    p.add_argument("--no-reference", action="store_true",
                   help="skip the undisturbed run (no accuracy comparison)")
    p.add_argument("--workdir", help="keep logs, records and checkpoints here "
                                     "(default: a temporary directory, removed after)")
    p.add_argument("--json", metavar="PATH", help="write the results here")


def check_args(args: argparse.Namespace) -> str | None:
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        return f"--kinds: unknown {bad or 'none given'}; choose from {', '.join(KINDS)}"
    if args.steps < 5:
        return f"--steps must be >= 5, got {args.steps}"
    if args.faults < 0 or args.devices < 1 or args.garbage_count < 0:
        return "--faults and --garbage-count must be >= 0, --devices >= 1"
    if not (args.hang_seconds > 0 and args.recover_timeout > 0):
        return "--hang-seconds and --recover-timeout must be > 0"
    if args.checkpoint_every is not None and args.checkpoint_every < 0:
        return f"--checkpoint-every must be >= 0, got {args.checkpoint_every}"
    return None


def run(args: argparse.Namespace) -> int:
    err = check_args(args)
    if err:
        print(f"accept-mqtt bench chaos: {err}", file=sys.stderr)
        return 2
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        res = Chaos(args, workdir).run()
    else:
        with tempfile.TemporaryDirectory(prefix="accept-chaos-") as d:
            res = Chaos(args, Path(d)).run()
    print_report(res)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2, default=str), encoding="utf-8")
        print(f"results: {args.json}")
    return 0


