"""Per-stage timeline of one traced step: collect the agents' spans, summarise, plot.

Agents started with ``--trace-steps N`` publish the spans of step ``N`` on
``{root}/jobs/{job}/trace/{device}`` (``device_agent/trace.py``). This module

* ``TraceCollector``: subscribes to one job's trace topics (its own MQTT client, so the
  coordinator is untouched) and returns what arrived, one message per stage;
* ``summarize``: per stage compute/send/idle ms of the step, and the per-hop latency (from a
  stage starting to send a micro-batch's activations to the next stage starting its forward);
* ``render``: a PNG with one panel per (scenario, method), one row per stage, bars for
  forward, backward, optimizer and sends on a common ms axis from the step's first span.

Guarantees: ``render`` and ``summarize`` take plain JSON (what the topic carries, or the
bench JSON), so they work offline and in tests; matplotlib is imported only by ``render``
(with the ``Agg`` backend, no display needed).
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import aiomqtt

from accept_mqtt.wire import messages
from accept_mqtt.wire.broker_url import parse_broker_url
from accept_mqtt.wire.topics import Topics

Trace = dict[str, Any]  # one stage's message: {"stage", "device", "step", "spans": [...]}

COLORS = {"fwd": "#4C72B0", "bwd": "#DD8452", "opt": "#8C8C8C", "send-act": "#55A868",
          "send-grad": "#C44E52"}
LABELS = {"fwd": "compute fwd", "bwd": "compute bwd", "opt": "optimizer step",
          "send-act": "send activations", "send-grad": "send gradients"}


class TraceCollector:
    """``async with TraceCollector(url, job) as tc: ...; traces = await tc.wait(n)``."""

    def __init__(self, url: str, job: str, root: str = "accept") -> None:
        self.url = parse_broker_url(url)
        self.topic = f"{Topics(root).job(job)}/trace/+"
        self.traces: dict[str, Trace] = {}
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._got = asyncio.Event()

    async def __aenter__(self) -> TraceCollector:
        self._client = aiomqtt.Client(**self.url.client_kwargs())
        await self._client.__aenter__()
        await self._client.subscribe(self.topic, qos=1)
        self._task = asyncio.create_task(self._read(), name="trace-collector")
        return self

    async def _read(self) -> None:
        assert self._client is not None
        async for msg in self._client.messages:
            try:
                body = messages.decode(messages.Trace, bytes(msg.payload or b""),
                                       topic=msg.topic.value)
            except messages.MessageError:
                continue  # not a trace: nothing to plot
            self.traces[body.device] = messages.to_builtins(body)  # the plots take plain dicts
            self._got.set()

    async def wait(self, n: int, timeout: float = 10.0) -> list[Trace]:
        """The traces, by stage, once ``n`` devices sent theirs or after ``timeout`` s."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while len(self.traces) < n and loop.time() < end:
            self._got.clear()
            try:
                await asyncio.wait_for(self._got.wait(), max(0.01, end - loop.time()))
            except TimeoutError:
                break
        return sorted(self.traces.values(), key=lambda t: int(t["stage"]))

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, aiomqtt.MqttError):
                pass
        if self._client is not None:
            try:
                await self._client.__aexit__(None, None, None)
            except aiomqtt.MqttError:
                pass


def _key(span: dict[str, Any]) -> str:
    return f"send-{span.get('what', 'act')}" if span["kind"] == "send" else str(span["kind"])


async def mqtt_hop_ms(url: str, n: int = 60, size: int = 1024) -> dict[str, float]:
    """One-way latency of a QoS 1 message through the broker between two aiomqtt clients of
    this process (publish call -> subscriber sees it), median and 90th percentile in ms."""
    u = parse_broker_url(url)
    topic = f"accept/bench/hop/{id(u)}"
    got: asyncio.Queue[float] = asyncio.Queue()
    lat: list[float] = []
    async with aiomqtt.Client(**u.client_kwargs()) as sub, \
            aiomqtt.Client(**u.client_kwargs()) as pub:
        await sub.subscribe(topic, qos=1)

        async def read() -> None:
            async for _ in sub.messages:
                got.put_nowait(time.perf_counter())

        task = asyncio.create_task(read())
        try:
            for i in range(n + 5):
                t0 = time.perf_counter()
                await pub.publish(topic, b"x" * size, qos=1)
                t1 = await asyncio.wait_for(got.get(), 5)
                if i >= 5:  # warm-up
                    lat.append((t1 - t0) * 1e3)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await task
    lat.sort()
    return {"median_ms": round(statistics.median(lat), 3),
            "p90_ms": round(lat[int(0.9 * (len(lat) - 1))], 3), "n": n, "bytes": size}


def step_start(traces: Sequence[Trace]) -> float:
    return min((s["t0"] for t in traces for s in t["spans"]), default=0.0)


def summarize(traces: Sequence[Trace]) -> dict[str, Any]:
    """Step time, per-stage compute/send/idle ms and per-hop latency of one traced step."""
    if not traces or not any(t["spans"] for t in traces):
        return {}
    t0 = step_start(traces)
    t1 = max(s["t1"] for t in traces for s in t["spans"])
    step_ms = (t1 - t0) * 1e3
    stages = []
    for t in traces:
        comp = sum(s["t1"] - s["t0"] for s in t["spans"] if s["kind"] != "send") * 1e3
        fb = sum(s["t1"] - s["t0"] for s in t["spans"] if s["kind"] in ("fwd", "bwd")) * 1e3
        send = sum(s["t1"] - s["t0"] for s in t["spans"] if s["kind"] == "send") * 1e3
        stages.append({"stage": t["stage"], "device": t["device"], "compute_ms": round(comp, 2),
                       "fwd_bwd_ms": round(fb, 2),
                       "send_ms": round(send, 2), "idle_ms": round(step_ms - comp, 2)})
    by_stage = {int(t["stage"]): t["spans"] for t in traces}
    hops, sends = [], []
    for k, spans in by_stage.items():
        nxt = by_stage.get(k + 1)
        for s in spans:
            if s["kind"] == "send":
                sends.append((s["t1"] - s["t0"]) * 1e3)
            if s["kind"] != "send" or s.get("what") != "act" or nxt is None:
                continue
            f = [x for x in nxt if x["kind"] == "fwd" and x["mb"] == s["mb"]]
            if f:
                hops.append((f[0]["t0"] - s["t0"]) * 1e3)
    return {"step_ms": round(step_ms, 2), "stages": stages,
            "hop_ms_median": round(statistics.median(hops), 3) if hops else None,
            "send_ms_median": round(statistics.median(sends), 3) if sends else None}


def render(panels: Sequence[tuple[str, Sequence[Trace]]], path: str | Path, *,
           columns: int = 2, suptitle: str | None = None) -> Path:
    """Draw ``panels`` (title, traces of one step) in a grid of ``columns`` into ``path``.

    A trace's optional ``label`` names its row (default: stage and device)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    if not panels:
        raise ValueError("nothing to plot: no traced steps")
    rows = -(-len(panels) // columns)
    nst = max((len(tr) for _, tr in panels), default=1)
    fig, axes = plt.subplots(rows, columns, figsize=(6.2 * columns, 0.5 + (0.55 * nst + 0.9)
                                                   * rows), squeeze=False)
    for ax, (title, traces) in zip(axes.flat, panels, strict=False):
        _panel(ax, title, traces)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles = [Patch(color=c, label=LABELS[k]) for k, c in COLORS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8,
               frameon=False)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.96 if suptitle else 1))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def _panel(ax: Any, title: str, traces: Sequence[Trace]) -> None:
    if not traces:
        ax.set_title(f"{title}: no trace", fontsize=9)
        ax.axis("off")
        return
    t0 = step_start(traces)
    end = 0.0
    ticks, names = [], []
    for row, t in enumerate(sorted(traces, key=lambda t: int(t["stage"]))):
        y = -row  # stage 0 on top
        ticks.append(y)
        names.append(t.get("label") or f"stage {t['stage']}\n{t['device']}")
        for s in t["spans"]:
            a, b = (s["t0"] - t0) * 1e3, (s["t1"] - t0) * 1e3
            end = max(end, b)
            k = _key(s)
            # compute in the upper part of the row, the uplink below it: they overlap in time
            lo, h = (y - 0.05, 0.4) if s["kind"] != "send" else (y - 0.38, 0.28)
            ax.broken_barh([(a, max(b - a, 1e-3))], (lo, h), facecolors=COLORS.get(k, "k"),
                           edgecolor="white", linewidth=0.3)
    summ = summarize(traces)
    ax.set_yticks(ticks, names, fontsize=7)
    ax.set_xlim(0, end * 1.02 if end > 0 else 1)
    ax.set_ylim(-len(traces) + 0.45, 0.5)
    ax.set_xlabel("ms from the step's first span", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title(f"{title}: step {traces[0]['step']} took {summ.get('step_ms', 0):.0f} ms",
                 fontsize=9)
    ax.grid(axis="x", alpha=0.3)
