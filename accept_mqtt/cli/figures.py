"""A run's figures for the tools ML people already use: TensorBoard and Prometheus.

``FIGURES`` is the one list of them: each has its Prometheus name, type and help, its
TensorBoard tag, and reads its values off a monitor's ``JobView`` (what ``FleetView`` folded
from the job's metrics topic). So ``accept-mqtt monitor --prometheus`` serves, and
``--tensorboard`` (``monitor`` or ``train``) writes, the same figures under the two names.

Guarantees:

* ``prometheus_text(view)`` is the Prometheus text exposition format (version 0.0.4): one
  ``# HELP`` and ``# TYPE`` per figure, then a sample per job (and stage, and link
  direction) that has a value; label values escaped; no timestamps (the scrape's time is the
  sample's). A figure with no value yet (no step seen) has no sample.
* ``TensorBoardSink.update(view)`` writes, per job into ``DIR/<job>/``, one event per new
  step (the step figures at that optimizer step, dated by the coordinator's clock) and one
  per new evaluation (the epoch figures at the step it ran after); each is written once,
  however often the view is fed again.
* ``serve_prometheus`` answers ``GET /metrics`` from the event loop it runs on (no thread),
  reading the view as it is at that moment.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from accept_mqtt.cli.monitor import FleetView, JobView
from accept_mqtt.cli.tbevents import EventFileWriter

Labels = dict[str, str]
Values = Iterable[tuple[Labels, float | None]]


@dataclass(frozen=True)
class Figure:
    name: str  # Prometheus metric name
    kind: Literal["gauge", "counter"]
    help: str
    tag: str | None  # TensorBoard tag, {labels} filled in; None: Prometheus only
    at: Literal["step", "epoch", "view"]  # which message brings a new value; "view": the
    # monitor itself (no job label; values read off the FleetView)
    values: Callable[[JobView], Values] | Callable[[FleetView], Values]


def _step(attr: str, scale: float = 1.0) -> Callable[[JobView], Values]:
    def get(j: JobView) -> Values:
        v = getattr(j.step, attr) if j.step is not None else None
        return [({}, None if v is None else v * scale)]
    return get


def _epoch(key: str) -> Callable[[JobView], Values]:
    return lambda j: [({}, None if j.epoch is None else j.epoch.get(key))]


def _stage(attr: str, scale: float = 1.0) -> Callable[[JobView], Values]:
    def get(j: JobView) -> Values:
        for ld in j.loads:
            v = getattr(ld, attr)
            yield ({"stage": str(ld.stage), "device": ld.device or ""},
                   None if v is None else v * scale)
    return get


def _link_bytes(j: JobView) -> Values:
    last = max((ld.stage for ld in j.loads), default=0)
    for ld in j.loads:
        # the links a stage has: activations to the next stage, gradients to the one before
        for kind, v, has in (("act", ld.bytes_act, ld.stage < last),
                             ("grad", ld.bytes_grad, ld.stage > 0)):
            if has:
                yield {"stage": str(ld.stage), "device": ld.device or "", "kind": kind}, v


FIGURES: tuple[Figure, ...] = (
    Figure("accept_mqtt_monitor_connected", "gauge",
           "1 while the monitor is subscribed to the broker, else 0.", None, "view",
           lambda v: [({}, float(v.connected))]),
    Figure("accept_mqtt_step", "gauge", "Latest optimizer step of the job.", None, "step",
           _step("step")),
    Figure("accept_mqtt_train_loss", "gauge", "Training loss of the latest step.",
           "loss/train", "step", _step("loss")),
    Figure("accept_mqtt_train_accuracy", "gauge", "Training accuracy of the latest step.",
           "accuracy/train", "step", _step("train_acc")),
    Figure("accept_mqtt_samples_per_second", "gauge",
           "Training samples per second of the latest step.", "speed/samples_per_s", "step",
           _step("samples_per_s")),
    Figure("accept_mqtt_step_seconds", "gauge", "Wall time of the latest step.",
           "speed/step_s", "step", _step("step_ms", 1e-3)),
    Figure("accept_mqtt_stage_busy_ratio", "gauge",
           "Fraction of the last step interval the stage spent computing.",
           "stage{stage}/busy_fraction", "step", _stage("busy")),
    Figure("accept_mqtt_stage_send_ratio", "gauge",
           "Fraction of the last step interval the stage's uplink spent sending.",
           "stage{stage}/send_fraction", "step", _stage("sending")),
    Figure("accept_mqtt_stage_busy_seconds_total", "counter",
           "Compute time of the stage since its device joined the job.",
           "stage{stage}/busy_s", "step", _stage("busy_ms", 1e-3)),
    Figure("accept_mqtt_stage_send_seconds_total", "counter",
           "Uplink send time of the stage since its device joined the job.",
           "stage{stage}/send_s", "step", _stage("send_ms", 1e-3)),
    Figure("accept_mqtt_link_bytes_total", "counter",
           "Bytes the stage sent: activations downstream (kind=act), gradients upstream "
           "(kind=grad).", "stage{stage}/{kind}_bytes", "step", _link_bytes),
    Figure("accept_mqtt_test_accuracy", "gauge", "Held-out accuracy of the latest evaluation.",
           "accuracy/test", "epoch", _epoch("test_accuracy")),
    Figure("accept_mqtt_test_loss", "gauge", "Held-out loss of the latest evaluation.",
           "loss/test", "epoch", _epoch("test_loss")),
)


def _present(values: Values) -> list[tuple[Labels, float]]:
    return [(lb, float(v)) for lb, v in values if v is not None]


# -- Prometheus ------------------------------------------------------------------------
def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(v)


def prometheus_text(view: FleetView) -> str:
    lines: list[str] = []
    jobs = sorted(view.jobs.values(), key=lambda j: j.id)
    for f in FIGURES:
        lines += [f"# HELP {f.name} {f.help}", f"# TYPE {f.name} {f.kind}"]
        scoped = [(view, {})] if f.at == "view" else [(j, {"job": j.id}) for j in jobs]
        for obj, base in scoped:
            for labels, v in _present(f.values(obj)):  # type: ignore[arg-type]
                lb = ",".join(f'{k}="{_escape(x)}"' for k, x in {**base, **labels}.items())
                lines.append(f"{f.name}{{{lb}}} {_number(v)}" if lb else f"{f.name} {_number(v)}")
    return "\n".join(lines) + "\n"


def parse_listen(text: str) -> tuple[str, int]:
    """``:9108`` (every interface), ``127.0.0.1:9108``, ``[::1]:9108`` or ``9108`` ->
    (host, port); port 0 picks a free one. ``ValueError`` naming the text otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    host = host.strip("[]")
    try:
        n = int(port)
    except ValueError:
        raise ValueError(f"--prometheus {text!r}: use [HOST]:PORT, e.g. :9108") from None
    if not 0 <= n <= 65535:
        raise ValueError(f"--prometheus {text!r}: port must be 0..65535")
    return host or "0.0.0.0", n


async def serve_prometheus(view: FleetView, host: str, port: int) -> asyncio.Server:
    """Start answering ``GET /metrics`` with ``prometheus_text(view)``; the caller closes
    the returned server."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):  # a client that never finishes its request
                request = (await reader.readline()).decode("latin-1").split()
                while (await reader.readline()).strip():
                    pass  # headers: nothing here depends on them
            method, path = (request + ["", ""])[:2]
            if method in ("GET", "HEAD") and path.split("?")[0] == "/metrics":
                status, ctype = "200 OK", "text/plain; version=0.0.4; charset=utf-8"
                body = prometheus_text(view).encode()
            else:
                status, ctype = "404 Not Found", "text/plain; charset=utf-8"
                body = b"accept-mqtt monitor: the metrics are at /metrics\n"
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: "
                         f"{len(body)}\r\nConnection: close\r\n\r\n".encode()
                         + (b"" if method == "HEAD" else body))
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    return await asyncio.start_server(handle, host, port)


# -- TensorBoard -----------------------------------------------------------------------
class TensorBoardSink:
    """Writes the figures of every job a view holds as TensorBoard scalars (module doc)."""

    def __init__(self, logdir: str | Path) -> None:
        self.logdir = Path(logdir)
        self._writers: dict[str, EventFileWriter] = {}
        self._written: dict[tuple[str, str], tuple[int | None, int]] = {}

    def _writer(self, job: str) -> EventFileWriter:
        w = self._writers.get(job)
        if w is None:
            w = self._writers[job] = EventFileWriter(self.logdir / job)
        return w

    def _write(self, j: JobView, at: Literal["step", "epoch"], key: tuple[int | None, int],
               step: int, wall_time: float | None) -> None:
        if self._written.get((j.id, at)) == key:
            return
        scalars = {f.tag.format(**labels): v for f in FIGURES if f.at == at and f.tag
                   for labels, v in _present(f.values(j))}  # type: ignore[arg-type]
        self._writer(j.id).scalars(step, scalars, wall_time)
        self._written[(j.id, at)] = key

    def update(self, view: FleetView) -> None:
        for j in view.jobs.values():
            if j.step is not None:
                self._write(j, "step", (j.step.plan_version, j.step.step), j.step.step,
                            j.step.time)
            if j.epoch is not None:
                step = int(j.epoch.get("step", 0))
                self._write(j, "epoch", (int(j.epoch.get("epoch", 0)), step), step,
                            j.epoch.get("time"))

    def close(self) -> None:
        for w in self._writers.values():
            w.close()
        self._writers.clear()
