"""``accept-mqtt monitor [JOB]``: a read-only live view of the devices and jobs on a broker.

Three layers, each usable alone:

* ``FleetView`` folds MQTT messages (``ingest(topic, payload)``) into the state a monitor
  shows: devices (status, profile summary), and per job the latest plan, the latest step
  metrics with per-stage busy/idle/sending fractions, the last epoch, recent errors, drift
  events, other events and control commands. It imports no MQTT code and never raises on a
  message. It parses nothing itself: every payload is decoded by the message vocabulary
  (``accept_mqtt.wire.messages``; the plan by its own class), so the monitor accepts exactly
  what the contract defines. A payload the vocabulary rejects (not JSON, a wrong type, a
  missing field) or one on an unexpected topic is counted and remembered as "ignored", with
  the vocabulary's reason (which names the field); nothing else changes.
* ``render(view)`` turns a view into a rich renderable; ``FleetView.snapshot()`` into plain
  JSON-able data.
* ``watch(url, root, job)`` is the MQTT side: one aiomqtt client with a random client id, a
  clean session and no Last Will, that only subscribes. It never publishes, so any number of
  monitors can attach to a broker without disturbing a job or each other. ``live(...)``
  redraws a view while ``watch`` feeds it, reconnecting after a lost connection.

The topics and payloads it reads are listed in docs/monitoring.md (full contract:
docs/protocol.md), for anyone who wants to write their own subscriber.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import signal
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar, get_args

import aiomqtt
from rich import box
from rich.console import Console, Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from accept_mqtt.wire import messages
from accept_mqtt.wire.broker_url import BrokerUrlError, parse_broker_url
from accept_mqtt.wire.messages import (
    ControlCommand,
    DeviceProfile,
    DeviceStatus,
    DoneMetric,
    Drift,
    Epoch,
    Error,
    JobStatus,
    MessageError,
    Metric,
    StageCounters,
    StepMetric,
)
from accept_mqtt.wire.plan import Plan
from accept_mqtt.wire.topics import ID_PATTERN, TopicError, Topics, check_id

RECENT = 5  # errors, drift events, other events and control commands kept per job
MAX_JOBS_SHOWN = 8  # render() shows the newest jobs only; snapshot() has them all
BAR_WIDTH = 12
# the ``type`` tags of the metrics this version knows: any other is an extension (see
# ``_extension_event``)
_METRIC_TAGS = frozenset(messages.wire_name(c) for c in get_args(Metric))


class BadMessage(ValueError):
    """A message the view cannot use beyond what the vocabulary checks (a topic it does not
    read, a plan published under another job); ``ingest`` counts it and moves on."""


# -- the state -------------------------------------------------------------------------
@dataclass
class DeviceView:
    """One device as its retained status and profile describe it."""

    id: str
    state: str | None = None
    job: str | None = None
    stage: int | None = None
    reason: str | None = None
    last_seen: float | None = None  # the "time" of the latest status (the device's clock)
    cores: int | None = None
    bench_gflops: float | None = None
    slowdown: float | None = None
    bandwidth_bps: float | None = None
    cpu: str | None = None
    has_status: bool = False
    has_profile: bool = False


# PlanStage, PlanView and StepView are what the monitor shows of a message: each field is
# filled from the same-named attribute of the decoded message (``_project``), so the names and
# types are defined once, by the message class, and these classes only choose which to keep.
@dataclass(frozen=True)
class PlanStage:
    index: int
    device: str
    start: int
    end: int
    act_bits: int | None
    grad_bits: int | None
    predicted_ms: float | None


@dataclass(frozen=True)
class PlanView:
    version: int | None
    model: str | None
    method: str | None
    schedule: str | None
    micro_batches: int | None
    predicted_bottleneck_ms: float | None
    stages: tuple[PlanStage, ...]


@dataclass(frozen=True)
class StepView:
    step: int
    total_steps: int | None
    epoch: int | None
    loss: float | None
    train_acc: float | None
    samples_per_s: float | None
    step_ms: float | None
    time: float  # the coordinator's clock when the message carries it, else receipt
    stages: dict[int, StageCounters]
    # the plan the step ran under: the message's own ``plan_version``, else the version of
    # the plan this view held when the step arrived
    plan_version: int | None = None


class StageLoad(StageCounters, kw_only=True):
    """One stage over the interval between the two latest step messages: its cumulative
    counters (the ``StageCounters`` of the later message) and what they mean per second.

    ``busy``/``sending`` are the fractions of the interval spent computing / with the uplink
    sending, each in [0, 1]; sends overlap compute, so ``idle = max(0, 1 - busy - sending)``
    is a lower bound (exact when they do not overlap). All three are None when there is no
    earlier step to compare with, or the counters went backwards (the stage moved or its
    agent re-joined). ``act_bytes_per_s``/``grad_bytes_per_s``: bytes sent per second over
    the interval.
    """

    busy: float | None = None
    sending: float | None = None
    idle: float | None = None
    act_bytes_per_s: float | None = None
    grad_bytes_per_s: float | None = None


@dataclass
class JobView:
    id: str
    seq: int  # order in which this view first heard of the job; higher is newer
    plan: PlanView | None = None
    plan_cleared: bool = False  # the coordinator cleared the retained plan: the job is over
    step: StepView | None = None
    prev_step: StepView | None = None
    loads: list[StageLoad] = field(default_factory=list)
    # the latest epoch, done and status messages, and the recent errors and drift events,
    # as their fields (``_fields``)
    epoch: dict[str, Any] | None = None
    done: dict[str, Any] | None = None
    status: dict[str, Any] | None = None
    errors: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=RECENT))
    drifts: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=RECENT))
    controls: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=RECENT))
    # metrics this monitor has no view for (checkpoint, replan, recovered, and types of
    # newer versions), as their scalar fields (``_small``)
    events: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=RECENT))


def stage_loads(prev: StepView | None, cur: StepView) -> list[StageLoad]:
    """Per-stage busy/idle/sending fractions and send rates between ``prev`` and ``cur``.

    Guarantees: one entry per stage of ``cur`` in stage order; fractions are in [0, 1] or
    None (see ``StageLoad``); never raises on odd counters (negative deltas, zero interval).
    """
    dt = cur.time - prev.time if prev is not None else 0.0
    out = []
    for k in sorted(cur.stages):
        c = cur.stages[k]
        counters = messages.to_builtins(c)
        load = StageLoad(**counters)
        p = prev.stages.get(k) if prev is not None else None
        if p is not None and dt > 0 and p.device == c.device:
            d_busy, d_send = c.busy_ms - p.busy_ms, c.send_ms - p.send_ms
            d_act, d_grad = c.bytes_act - p.bytes_act, c.bytes_grad - p.bytes_grad
            if min(d_busy, d_send, d_act, d_grad) >= 0:
                busy = min(1.0, d_busy / (dt * 1e3))
                sending = min(1.0, d_send / (dt * 1e3))
                load = StageLoad(**counters, busy=busy, sending=sending,
                                 idle=max(0.0, 1.0 - busy - sending), act_bytes_per_s=d_act / dt,
                                 grad_bytes_per_s=d_grad / dt)
        out.append(load)
    return out


class FleetView:
    """What a monitor knows, built only from messages fed to ``ingest``.

    Guarantees: ``ingest`` never raises; a message it cannot use changes nothing but the
    ``ignored`` count and ``last_ignored``; retained messages can be fed again (after a
    reconnect) without changing the result; with ``job`` set, other jobs are left out.
    """

    def __init__(self, root: str = "accept", job: str | None = None, *, broker: str = "",
                 clock: Callable[[], float] = time.time) -> None:
        self.topics = Topics(root)
        self.root_levels = len(root.split("/"))
        self.job_filter = check_id("job", job) if job is not None else None
        self.broker = broker
        self.clock = clock
        self.devices: dict[str, DeviceView] = {}
        self.jobs: dict[str, JobView] = {}
        self.messages = 0
        self.ignored = 0
        self.last_ignored: str | None = None
        self.connected = False
        self.connections = 0  # successful (re)connections so far
        self.notice: str | None = None  # e.g. "connection lost, reconnecting"
        self._seq = 0

    # -- input -----------------------------------------------------------------------
    def ingest(self, topic: str, payload: bytes) -> None:
        """Fold one message into the view; never raises."""
        self.messages += 1
        try:
            self._route(topic, bytes(payload))
        except MessageError as e:
            self._ignore(topic, e.reason)
        except BadMessage as e:
            self._ignore(topic, str(e))
        except Exception as e:  # a bug must not take the monitor down either
            self._ignore(topic, f"{type(e).__name__}: {e}")

    def _ignore(self, topic: str, reason: str) -> None:
        self.ignored += 1
        self.last_ignored = f"{topic}: {reason}"

    def _route(self, topic: str, payload: bytes) -> None:
        parts = topic.split("/")
        n = self.root_levels
        if "/".join(parts[:n]) != self.topics.root or len(parts) != n + 3:
            raise BadMessage("unexpected topic")
        kind, ident, leaf = parts[n:]
        if not ID_PATTERN.match(ident):
            raise BadMessage(f"bad id {ident!r}")
        if kind == "devices" and leaf in ("status", "profile"):
            (self._on_status if leaf == "status" else self._on_profile)(topic, ident, payload)
        elif kind == "jobs" and leaf in ("plan", "metrics", "control"):
            if self.job_filter is not None and ident != self.job_filter:
                return
            {"plan": self._on_plan, "metrics": self._on_metrics,
             "control": self._on_control}[leaf](topic, ident, payload)
        else:
            raise BadMessage("unexpected topic")

    # Every handler below decodes first and only then touches the view, so a message the
    # vocabulary rejects leaves no trace (not even an empty job or device entry).
    def _device(self, dev: str) -> DeviceView:
        return self.devices.setdefault(dev, DeviceView(dev))

    def _job(self, job: str) -> JobView:
        j = self.jobs.get(job)
        if j is None:
            self._seq += 1
            j = self.jobs[job] = JobView(job, self._seq)
        return j

    def _on_status(self, topic: str, dev: str, payload: bytes) -> None:
        if not payload:  # the retained status was cleared: forget the device's state
            d = self.devices.get(dev)
            if d is not None:
                d.has_status, d.state, d.job, d.stage, d.reason = False, None, None, None, None
                if not d.has_profile:
                    del self.devices[dev]
            return
        s = messages.decode(DeviceStatus, payload, topic=topic)
        d = self._device(dev)
        d.state, d.job, d.stage, d.reason, d.has_status = s.state, s.job, s.stage, s.reason, True
        d.last_seen = s.time

    def _on_profile(self, topic: str, dev: str, payload: bytes) -> None:
        if not payload:
            d = self.devices.get(dev)
            if d is not None:
                d.has_profile = False
                d.cores = d.bench_gflops = d.slowdown = d.bandwidth_bps = d.cpu = None
                if not d.has_status:
                    del self.devices[dev]
            return
        p = messages.decode(DeviceProfile, payload, topic=topic)
        d = self._device(dev)
        d.cores, d.bench_gflops, d.slowdown, d.bandwidth_bps, d.cpu = (
            p.cores, p.bench_gflops, p.slowdown, p.bandwidth_bps, p.cpu)
        d.has_profile = True

    def _on_plan(self, topic: str, job: str, payload: bytes) -> None:
        if not payload:  # contract: an empty retained plan ends the job
            if job in self.jobs:
                self._job(job).plan_cleared = True
            return
        # the same parse as ``Plan.from_json`` (field types, then the tiling checks of its
        # ``__post_init__``), raising ``MessageError`` like every other message here
        plan = messages.decode(Plan, payload, topic=topic)
        if plan.job != job:
            raise BadMessage(f"plan names job {plan.job!r}")
        view = _project(PlanView, plan, stages=tuple(_project(PlanStage, s) for s in plan.stages))
        j = self._job(job)
        j.plan, j.plan_cleared = view, False

    def _on_control(self, topic: str, job: str, payload: bytes) -> None:
        c = messages.decode(ControlCommand, payload, topic=topic)
        args = {k: v for k, v in messages.to_builtins(c).items() if k != "cmd" and v is not None}
        self._job(job).controls.append({"cmd": c.cmd, "time": self.clock(), **args})

    def _on_metrics(self, topic: str, job: str, payload: bytes) -> None:
        try:
            m = messages.decode(Metric, payload, topic=topic)
        except MessageError:
            body = _extension_event(payload)
            if body is None:
                raise  # a broken message of a known type (or no type at all)
            self._job(job).events.append(self._event(body))
            return
        if isinstance(m, StepMetric):
            self._on_step(job, m)
            return
        j = self._job(job)
        if isinstance(m, Epoch):
            j.epoch = _fields(m)
        elif isinstance(m, DoneMetric):
            j.done = _fields(m)
        elif isinstance(m, JobStatus):
            j.status = _fields(m)
        elif isinstance(m, Error):
            j.errors.append(_fields(m))
        elif isinstance(m, Drift):
            j.drifts.append(_fields(m))
        else:  # checkpoint, replan, recovered: no view of their own, shown as events
            j.events.append(self._event(messages.to_builtins(m)))

    def _event(self, body: dict[str, Any]) -> dict[str, Any]:
        """A generic event: the scalar fields of a metrics message, dated by its ``time`` if
        that is a number (an extension's fields are not checked), else by receipt."""
        ev = _small({k: v for k, v in body.items() if k != "job"})
        t = ev.get("time")
        if not isinstance(t, int | float) or isinstance(t, bool):
            ev["time"] = self.clock()
        return ev

    def _on_step(self, job: str, m: StepMetric) -> None:
        known = self.jobs.get(job)
        version = m.plan_version
        if version is None and known is not None and known.plan is not None:
            version = known.plan.version
        step = _project(StepView, m, time=self.clock() if m.time is None else m.time,
                        stages={c.stage: c for c in m.stages}, plan_version=version)
        j = self._job(job)
        cur = j.step
        if cur is not None and step.step == cur.step and step.plan_version == cur.plan_version:
            return  # a duplicate
        # Compare only with an earlier step under the same plan (stages move on a re-plan);
        # an older step number means a restart (job id reused, or resumed from a checkpoint).
        comparable = (cur is not None and step.step > cur.step
                      and step.plan_version == cur.plan_version)
        j.prev_step = cur if comparable else None
        j.step = step
        j.loads = stage_loads(j.prev_step, step)
        if cur is not None and step.step < cur.step:
            j.done = None  # rewound (checkpoint restore) or restarted: not done any more

    # -- output ----------------------------------------------------------------------
    def job_list(self) -> list[JobView]:
        """Jobs newest first (by when this view first heard of them)."""
        return sorted(self.jobs.values(), key=lambda j: -j.seq)

    def snapshot(self) -> dict[str, Any]:
        """Everything the view holds as JSON-able data (what ``--json`` prints)."""
        return {
            "broker": self.broker, "root": self.topics.root, "job_filter": self.job_filter,
            "time": self.clock(), "messages": self.messages,
            "ignored": {"count": self.ignored, "last": self.last_ignored},
            "devices": {k: _device_json(d) for k, d in sorted(self.devices.items())},
            "jobs": [_job_json(j) for j in self.job_list()],
        }


T = TypeVar("T")


def _project(cls: type[T], msg: object, **given: Any) -> T:
    """A ``cls`` (one of the dataclasses above) whose fields are ``given`` or else the
    same-named attributes of the decoded ``msg``."""
    names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    return cls(**{k: getattr(msg, k) for k in names if k not in given}, **given)


def _fields(msg: Any) -> dict[str, Any]:
    """A decoded metrics message as the plain dict a job view keeps: its fields without the
    ``type`` tag (the slot it is kept in says it) and ``job`` (the view it is kept in)."""
    out: dict[str, Any] = messages.to_builtins(msg)
    out.pop("type", None)
    out.pop("job", None)
    return out


def _extension_event(payload: bytes) -> dict[str, Any] | None:
    """The payload as a JSON object if it is a metrics message of a ``type`` this version
    does not know, else None.

    The vocabulary rejects a tag it does not know like any other bad value, but the contract
    lets newer coordinators and extensions add metric types (docs/protocol.md,
    "Extensions"), and a monitor should show them rather than count them as garbage. So
    this is the one place the monitor reads a payload itself: only to tell "unknown type"
    from "broken message of a known type" (still rejected, with the vocabulary's reason),
    and only the scalar fields are kept (``_small``), none of them interpreted.
    """
    try:
        body = json.loads(payload)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested absurdly deep
        return None
    if not isinstance(body, dict):
        return None
    kind = body.get("type")
    if not isinstance(kind, str) or kind in _METRIC_TAGS:
        return None
    return body


def _small(body: dict[str, Any], limit: int = 200) -> dict[str, Any]:
    """Scalar fields of ``body`` (strings cut to ``limit``); lists and objects left out, so
    a generic event stays small whatever an extension puts in it."""
    out: dict[str, Any] = {}
    for k, v in body.items():
        if isinstance(v, str):
            out[k] = v[:limit]
        elif v is None or isinstance(v, bool | int | float):
            out[k] = v
    return out


def _device_json(d: DeviceView) -> dict[str, Any]:
    out = asdict(d)
    for k in ("id", "has_status", "has_profile"):
        out.pop(k)
    return out


def _job_json(j: JobView) -> dict[str, Any]:
    step = None
    if j.step is not None:  # (not asdict: it would deep-copy the stages only to drop them)
        step = {f.name: getattr(j.step, f.name) for f in fields(StepView) if f.name != "stages"}
    plan = None
    if j.plan is not None:
        plan = asdict(j.plan)
        plan["stages"] = [asdict(s) for s in j.plan.stages]
    return {"job": j.id, "plan": plan, "ended": j.plan_cleared or j.done is not None,
            "step": step, "stages": [messages.to_builtins(ld) for ld in j.loads],
            "epoch": j.epoch, "done": j.done, "status": j.status, "errors": list(j.errors),
            "drifts": list(j.drifts), "controls": list(j.controls), "events": list(j.events)}


# -- rendering ---------------------------------------------------------------------------
def _fmt(v: float | None, spec: str = ".2f", none: str = "-") -> str:
    return none if v is None else format(v, spec)


def _bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _ago(t: float | None, now: float) -> str:
    if t is None:
        return "-"
    s = max(0.0, now - t)
    if s < 60:
        return f"{s:.0f}s ago"
    if s < 3600:
        return f"{s / 60:.0f}m ago"
    return f"{s / 3600:.1f}h ago" if s < 86400 else f"{s / 86400:.0f}d ago"


def load_bar(load: StageLoad, width: int = BAR_WIDTH) -> Text:
    """``width`` cells: busy (green █), sending (cyan ▒, only what fits beside busy),
    idle (dim ·); a dim dash line when the fractions are not known yet."""
    if load.busy is None or load.sending is None:
        return Text("-" * width, style="dim")
    n_busy = round(load.busy * width)
    n_send = min(width - n_busy, round(load.sending * width))
    bar = Text()
    bar.append("█" * n_busy, style="green")
    bar.append("▒" * n_send, style="cyan")
    bar.append("·" * (width - n_busy - n_send), style="dim")
    return bar


def _state_style(state: str | None) -> str:
    return {"online": "green", "busy": "bold cyan", "offline": "red"}.get(state or "", "yellow")


def _devices_table(view: FleetView) -> Table:
    now = view.clock()
    t = Table(title=f"devices ({len(view.devices)})", title_justify="left", expand=False,
              box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0))
    for col, just in (("device", "left"), ("state", "left"), ("job/stage", "left"),
                      ("cores", "right"), ("GFLOP/s", "right"), ("slowdown", "right"),
                      ("uplink", "right"), ("updated", "right")):
        t.add_column(col, justify=just, no_wrap=True,  # type: ignore[arg-type]
                     min_width=6 if col == "device" else None)
    for d in sorted(view.devices.values(), key=lambda d: d.id):
        state = Text(d.state or "?", style=_state_style(d.state))
        if d.reason and d.state == "offline":
            state.append(f" ({d.reason})", style="dim")
        js = "-" if d.job is None else f"{d.job}/{'-' if d.stage is None else d.stage}"
        bw = "-" if d.bandwidth_bps is None else f"{d.bandwidth_bps / 1e6:.3g} Mbit/s"
        t.add_row(d.id, state, js, _fmt(d.cores, "d"), _fmt(d.bench_gflops, ".1f"),
                  _fmt(d.slowdown, "g"), bw, _ago(d.last_seen, now))
    return t


def _pct(f: float | None) -> str:
    return "-" if f is None else f"{100 * f:.0f}%"


def _sent(total: int, rate: float | None) -> Text:
    """Bytes sent so far, and under them (dim) the rate over the last step interval."""
    return Text(_bytes(total)).append("\n" + ("-" if rate is None else f"{_bytes(rate)}/s"),
                                      style="dim")


def _stage_table(j: JobView) -> Table:
    """One row per stage: the plan's side (device, layers, bits, predicted ms) and the
    latest step's side (load bar, busy and sending %, bytes sent with their rate)."""
    t = Table(box=box.SIMPLE_HEAD, expand=False, show_edge=False, pad_edge=False,
              padding=(0, 1, 0, 0))
    for col, just in (("#", "right"), ("device", "left"), ("layers", "left"),
                      ("bits", "right"), ("pred", "right"), ("load", "left"),
                      ("busy", "right"), ("send", "right"), ("act →", "right"),
                      ("← grad", "right")):
        t.add_column(col, justify=just, no_wrap=True,  # type: ignore[arg-type]
                     min_width=6 if col == "device" else None)
    loads = {ld.stage: ld for ld in j.loads}
    by_index = {s.index: s for s in (j.plan.stages if j.plan is not None else ())}
    for k in sorted(set(by_index) | set(loads)):
        s, ld = by_index.get(k), loads.get(k)
        device = s.device if s is not None else (ld.device if ld is not None else None)
        row = [str(k), device or "?", "-" if s is None else f"[{s.start},{s.end})",
               "-" if s is None else f"{_fmt(s.act_bits, 'd')}/{_fmt(s.grad_bits, 'd')}",
               "-" if s is None else _fmt(s.predicted_ms, ".3g")]
        if ld is None:
            t.add_row(*row, Text("-" * BAR_WIDTH, style="dim"), "-", "-", "-", "-")
        else:
            t.add_row(*row, load_bar(ld), _pct(ld.busy), _pct(ld.sending),
                      _sent(ld.bytes_act, ld.act_bytes_per_s),
                      _sent(ld.bytes_grad, ld.grad_bytes_per_s))
    return t


LEGEND = Text.assemble(("█", "green"), " busy  ", ("▒", "cyan"), " sending  ", ("·", "dim"),
                       " idle (last step interval)", style="dim")


def _progress_line(j: JobView) -> Text:
    line = Text()
    s = j.step
    if s is None:
        line.append("no step yet", style="dim")
    else:
        total = "" if s.total_steps is None else f"/{s.total_steps}"
        line.append(f"step {s.step}{total}", style="bold")
        if s.epoch is not None:
            line.append(f"  epoch {s.epoch + 1}")
        line.append(f"  loss {_fmt(s.loss, '.4f')}")
        line.append(f"  {_fmt(s.samples_per_s, '.0f')} samples/s")
        if s.train_acc is not None:
            line.append(f"  train acc {s.train_acc:.3f}")
    if j.epoch is not None and j.epoch.get("test_accuracy") is not None:
        line.append(f"  test acc {j.epoch['test_accuracy']:.4f}", style="bold green")
    if j.status is not None and j.status.get("paused"):
        line.append("  PAUSED", style="bold yellow")
    if j.done is not None:
        line.append(f"  done (final accuracy {_fmt(j.done.get('final_accuracy'), '.4f')})",
                    style="bold green")
    elif j.plan_cleared:
        line.append("  ended", style="bold")
    return line


def _recent_lines(j: JobView, now: float) -> list[Text]:
    lines = []
    for e in j.errors:
        lines.append(Text(f"error {_ago(e.get('time'), now)}: {e.get('device')} rejected "
                          f"{e.get('topic')}: {e.get('reason')}", style="red"))
    for d in j.drifts:
        lines.append(Text(f"drift at step {d.get('step')}: {d.get('device')} runs at "
                          f"{_fmt(d.get('speed_factor'), '.2f')}x its earlier time; "
                          f"{d.get('action') or ''}", style="yellow"))
    for ev in j.events:
        where = next((f" at step {ev[k]}" for k in ("step", "at_step") if k in ev), "")
        reason = f": {ev['reason']}" if ev.get("reason") else ""
        lines.append(Text(f"{ev.get('type')}{where} {_ago(ev.get('time'), now)}{reason}",
                          style="magenta"))
    for c in j.controls:
        extra = {k: v for k, v in c.items() if k not in ("cmd", "time")}
        lines.append(Text(f"control {_ago(c.get('time'), now)}: {c['cmd']}"
                          + (f" {json.dumps(extra)}" if extra else ""), style="dim"))
    return lines


def _job_panel(j: JobView, now: float) -> Panel:
    p = j.plan
    title = f"job {j.id}"
    if p is not None:
        bits = [f"plan v{_fmt(p.version, 'd', '?')}", p.model or "?", p.method or "?",
                p.schedule or "?", f"{_fmt(p.micro_batches, 'd', '?')} micro-batches"]
        if p.predicted_bottleneck_ms is not None:
            bits.append(f"predicted bottleneck {p.predicted_bottleneck_ms:.2f} ms")
        title += " · " + " · ".join(bits)
    parts: list[RenderableType] = [_progress_line(j)]
    if p is not None or j.loads:
        parts += [_stage_table(j), LEGEND]
    parts.extend(_recent_lines(j, now))
    return Panel(Group(*parts), title=title, title_align="left", expand=False)


def render(view: FleetView) -> RenderableType:
    """The whole view: a header, an ignored-messages warning if any, the devices table and
    one panel per job (newest first, at most ``MAX_JOBS_SHOWN``)."""
    now = view.clock()
    head = Text(f"accept-mqtt monitor · {view.broker or '?'} · root {view.topics.root}",
                style="bold")
    if view.job_filter:
        head.append(f" · job {view.job_filter}")
    head.append(f" · {len(view.devices)} devices · {len(view.jobs)} jobs · "
                f"{view.messages} messages")
    parts: list[RenderableType] = [head]
    if view.notice:
        parts.append(Text(view.notice, style="bold red"))
    if view.ignored:
        parts.append(Text(f"warning: {view.ignored} message(s) ignored; last: "
                          f"{view.last_ignored}", style="yellow"))
    parts.append(_devices_table(view))
    jobs = view.job_list()
    for j in jobs[:MAX_JOBS_SHOWN]:
        parts.append(_job_panel(j, now))
    if len(jobs) > MAX_JOBS_SHOWN:
        parts.append(Text(f"... {len(jobs) - MAX_JOBS_SHOWN} older jobs not shown", style="dim"))
    if not jobs:
        parts.append(Text("no job seen yet" + (f" ({view.job_filter})" if view.job_filter
                                                else ""), style="dim"))
    return Group(*parts)


# -- MQTT ----------------------------------------------------------------------------
def monitor_client_id() -> str:
    """A fresh random client id (23 characters, the MQTT 3.1.1 safe maximum), so monitors
    never take over each other's (or anybody's) session."""
    return f"accept-monitor-{uuid.uuid4().hex[:8]}"


def subscriptions(root: str, job: str | None) -> list[tuple[str, int]]:
    """(topic filter, QoS) of everything a monitor reads: retained state at QoS 1, the
    chatty metrics and control at QoS 0."""
    t = Topics(root)
    j = t.job(job) if job is not None else f"{t.root}/jobs/+"
    return [(t.all_status, 1), (t.all_profiles, 1), (f"{j}/plan", 1), (f"{j}/metrics", 0),
            (f"{j}/control", 0)]


def _payload(p: Any) -> bytes:
    if p is None:
        return b""
    if isinstance(p, bytes | bytearray):
        return bytes(p)
    return str(p).encode()


async def watch(url: str, root: str = "accept", job: str | None = None, *,
                view: FleetView | None = None, duration: float | None = None,
                ready: asyncio.Event | None = None,
                on_message: Callable[[FleetView], None] | None = None) -> FleetView:
    """Subscribe and feed every message into ``view`` (a new one if None) until ``duration``
    seconds have passed (None: until cancelled); returns the view. ``on_message(view)`` is
    called after each message is folded in (e.g. a TensorBoard writer).

    Guarantees: read-only (never publishes; no Last Will; clean session; random client id);
    ``ready`` is set once the subscriptions are acknowledged, so retained state is on its way.
    Connection failures raise ``aiomqtt.MqttError``.
    """
    u = parse_broker_url(url)
    if view is None:
        view = FleetView(root, job, broker=str(u))
    elif (view.topics.root, view.job_filter) != (root, job):
        raise ValueError(f"view is for root {view.topics.root!r} job {view.job_filter!r}, "
                         f"watch() for root {root!r} job {job!r}")
    # no session survives the connection: clean session (3.1.1) or session expiry 0 (MQTT 5,
    # which has no clean_session flag), both aiomqtt's default
    client = aiomqtt.Client(**u.client_kwargs(), identifier=monitor_client_id(), will=None)
    async with client:
        await client.subscribe(subscriptions(root, job))
        view.connected, view.notice = True, None
        view.connections += 1
        if ready is not None:
            ready.set()
        try:
            async with asyncio.timeout(duration):
                async for msg in client.messages:
                    view.ingest(msg.topic.value, _payload(msg.payload))
                    if on_message is not None:
                        on_message(view)
        except TimeoutError:
            pass
        finally:
            view.connected = False
    return view


# -- command line ------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", nargs="?", default=None, help="show only this job (default: all)")
    p.add_argument("--broker", default="mqtt://127.0.0.1:1883",
                   help="mqtt://[user:pass@]host[:port] or mqtts://")
    p.add_argument("--root", default="accept", help="topic root (default: accept)")
    p.add_argument("--once", action="store_true",
                   help="collect for --timeout seconds, print one snapshot, exit")
    p.add_argument("--json", action="store_true",
                   help="print the snapshot as JSON (implies --once)")
    p.add_argument("--timeout", type=float, default=2.0,
                   help="seconds to collect with --once/--json (default 2)")
    p.add_argument("--refresh", type=float, default=4.0,
                   help="live view redraws per second (default 4)")
    p.add_argument("--prometheus", metavar="[HOST]:PORT", default=None,
                   help="also serve the jobs' figures at http://HOST:PORT/metrics in "
                        "Prometheus text format (:PORT: every interface)")
    p.add_argument("--tensorboard", metavar="DIR", default=None,
                   help="also write the jobs' figures as TensorBoard event files, one "
                        "directory per job under DIR")
    p.add_argument("--no-view", action="store_true",
                   help="draw nothing (e.g. only --prometheus / --tensorboard, as a service)")


def _finite(obj: Any) -> Any:
    """``obj`` with NaN/inf floats as strings, so ``--json`` output is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


async def follow(url: str, root: str, job: str | None, view: FleetView, *,
                 retry: float = 2.0,
                 on_message: Callable[[FleetView], None] | None = None) -> None:
    """``watch`` until cancelled: a connection lost later is noted in ``view.notice`` and
    retried every ``retry`` seconds, keeping what the view knows; a first connection that
    fails raises ``aiomqtt.MqttError``."""
    while True:
        try:
            await watch(url, root, job, view=view, on_message=on_message)
        except aiomqtt.MqttError as e:
            if view.connections == 0:
                raise
            view.notice = f"connection to {view.broker} lost ({e}); reconnecting"
            await asyncio.sleep(retry)


async def live(url: str, root: str, job: str | None, *, refresh: float = 4.0,
               console: Console | None = None, view: FleetView | None = None,
               retry: float = 2.0,
               on_message: Callable[[FleetView], None] | None = None) -> None:
    """Draw ``view`` (a new one if None) on ``console`` ``refresh`` times a second until
    cancelled, while ``follow`` feeds it."""
    from rich.live import Live

    if view is None:
        view = FleetView(root, job)
    view.broker = view.broker or str(parse_broker_url(url))
    period = 1.0 / max(refresh, 0.1)
    with Live(render(view), console=console or Console(), auto_refresh=False,
              redirect_stdout=False, redirect_stderr=False) as screen:

        async def redraw() -> None:
            while True:
                screen.update(render(view), refresh=True)
                await asyncio.sleep(period)

        painter = asyncio.create_task(redraw())
        try:
            await follow(url, root, job, view, retry=retry, on_message=on_message)
        finally:
            painter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await painter
            screen.update(render(view))  # the last frame shows the latest state


async def _run(args: argparse.Namespace) -> None:
    """The command's work in one event loop: the exporters asked for, then ``--once``'s
    collection, the live view or (``--no-view``) only the exporters, until interrupted."""
    from accept_mqtt.cli import figures

    task = asyncio.current_task()
    if task is not None:  # SIGTERM (a service manager stopping it) ends it like Ctrl-C
        with contextlib.suppress(NotImplementedError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    view = FleetView(args.root, args.job, broker=str(parse_broker_url(args.broker)))
    sink = figures.TensorBoardSink(args.tensorboard) if args.tensorboard else None
    server = None
    if args.prometheus:
        host, port = figures.parse_listen(args.prometheus)
        server = await figures.serve_prometheus(view, host, port)
        bound = server.sockets[0].getsockname()
        print(f"accept-mqtt monitor: Prometheus metrics at http://{bound[0]}:{bound[1]}"
              "/metrics", file=sys.stderr, flush=True)
    try:
        if args.once or args.json:
            await watch(args.broker, args.root, args.job, view=view, duration=args.timeout,
                        on_message=sink.update if sink else None)
            if args.json:
                print(json.dumps(_finite(view.snapshot()), indent=2))
            else:
                Console().print(render(view))
        elif args.no_view:
            await follow(args.broker, args.root, args.job, view,
                         on_message=sink.update if sink else None)
        else:
            await live(args.broker, args.root, args.job, refresh=args.refresh, view=view,
                       on_message=sink.update if sink else None)
    finally:
        if server is not None:
            server.close()
        if sink is not None:
            sink.close()


def run(args: argparse.Namespace) -> int:
    try:
        if args.job is not None:
            check_id("job", args.job)
        Topics(args.root)
        url = str(parse_broker_url(args.broker))
        if args.timeout <= 0 or args.refresh <= 0:
            raise ValueError("--timeout and --refresh must be positive")
        if args.prometheus:
            from accept_mqtt.cli.figures import parse_listen

            parse_listen(args.prometheus)
    except (TopicError, BrokerUrlError, ValueError) as e:
        print(f"accept-mqtt monitor: {e}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_run(args))
        return 0
    except aiomqtt.MqttError as e:
        print(f"accept-mqtt monitor: cannot reach the broker at {url}: {e}", file=sys.stderr)
        return 2
    except BrokerUrlError as e:  # e.g. an unreadable CA file for mqtts://
        print(f"accept-mqtt monitor: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the --prometheus port is taken, --tensorboard not writable
        print(f"accept-mqtt monitor: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, asyncio.CancelledError):
        return 0  # Ctrl-C (or SIGTERM) is how the live view ends
