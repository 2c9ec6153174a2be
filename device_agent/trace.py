"""Opt-in per-step timeline of one stage: who computes, who sends, when (``--trace-steps``).

An agent started with ``--trace-steps 15`` records, for optimizer step 15 of every job it
serves, one span per forward and backward of each micro-batch, one for the optimizer step
and one per tensor its uplink sends, all as ``time.time()`` seconds (one clock for every
process on a machine; across machines only as good as their clock sync). It publishes them
once, as JSON on the extension topic ``{root}/jobs/{job}/trace/{device}`` (docs/protocol.md)::

    {"v": 1, "job": "j1", "device": "pi-a", "stage": 0, "step": 15, "clock": "unix",
     "spans": [{"kind": "fwd", "mb": 0, "t0": 1732550000.101, "t1": 1732550000.104},
               {"kind": "send", "what": "act", "mb": 0, "bytes": 16433, "t0": ..., "t1": ...},
               {"kind": "bwd", ...}, {"kind": "opt", "mb": -1, ...}]}

Guarantees:

* Steps not traced cost one set lookup per compute and per send; nothing is published.
* Compute spans cover the stage's forward/backward call in the worker thread, including the
  emulated slowdown; send spans cover the uplink's pacing (if any) and the QoS 1 publish up to
  the broker's acknowledgement, i.e. the time the tensor occupied the link.
* A traced step is published after its optimizer step and after the uplink has sent every
  tensor queued until then, so its send spans are complete. A publishing error is logged,
  never raised into the agent.
* A traced step that is computed twice (rewound after a broker restart) is published after
  each of its optimizer steps; the later message carries the spans of both attempts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from device_agent.agent import Agent, _Job
    from device_agent.link import Link

log = logging.getLogger("device_agent.trace")

PublishJson = Callable[[str, Any], Awaitable[None]]


def parse_steps(text: str | None) -> tuple[int, ...]:
    """``"15"`` or ``"10,20"`` -> ``(15,)`` / ``(10, 20)``; empty for None or ``""``.

    >>> parse_steps("3, 5")
    (3, 5)
    """
    if not text:
        return ()
    try:
        steps = tuple(sorted({int(s) for s in text.split(",") if s.strip()}))
    except ValueError:
        raise ValueError(f"--trace-steps {text!r}: comma-separated step numbers") from None
    if any(s < 0 for s in steps):
        raise ValueError(f"--trace-steps {text!r}: steps are >= 0")
    return steps


class StepTracer:
    """Spans of the traced steps of one stage of one job."""

    def __init__(self, steps: Iterable[int], *, job: str, device: str, stage: int,
                 topic: str, publish: PublishJson, link: Link | None,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.steps = frozenset(steps)
        self.job, self.device, self.stage, self.topic = job, device, stage, topic
        self._publish = publish
        self._link = link
        self._loop = loop
        self.spans: dict[int, list[dict[str, Any]]] = {s: [] for s in self.steps}
        self._current: int | None = None  # step of the last compute (for the optimizer span)
        self.published: list[int] = []

    # -- recording -----------------------------------------------------------------------
    def _add(self, step: int, span: dict[str, Any]) -> None:
        self.spans[step].append(span)  # list.append is atomic: worker thread and loop share it

    def wrap(self, runner: Any) -> None:
        """Time ``runner.forward``/``backward``/``step`` (instance attributes, nothing else)."""
        fwd, bwd, opt = runner.forward, runner.backward, runner.step

        def forward(key: tuple[int, int], *a: Any, **kw: Any) -> Any:
            return self._timed("fwd", key, fwd, key, *a, **kw)

        def backward(key: tuple[int, int], *a: Any, **kw: Any) -> Any:
            return self._timed("bwd", key, bwd, key, *a, **kw)

        def step(*a: Any, **kw: Any) -> Any:
            cur = self._current
            if cur not in self.steps:
                return opt(*a, **kw)
            t0 = time.time()
            try:
                return opt(*a, **kw)
            finally:
                assert cur is not None
                self._add(cur, {"kind": "opt", "mb": -1, "t0": t0, "t1": time.time()})
                self._loop.call_soon_threadsafe(self._flush_soon, cur)

        runner.forward, runner.backward, runner.step = forward, backward, step

    def _timed(self, kind: str, key: tuple[int, int], fn: Callable[..., Any], *a: Any,
               **kw: Any) -> Any:
        step, mb = int(key[0]), int(key[1])
        self._current = step
        if step not in self.steps:
            return fn(*a, **kw)
        t0 = time.time()
        try:
            return fn(*a, **kw)
        finally:
            self._add(step, {"kind": kind, "mb": mb, "t0": t0, "t1": time.time()})

    def on_send(self, kind: str, tag: Any, nbytes: int, t0: float, t1: float) -> None:
        """``Link`` observer: one sent payload (``tag`` = (step, mb) for tensor frames)."""
        if not isinstance(tag, tuple) or tag[0] not in self.steps:
            return
        self._add(tag[0], {"kind": "send", "what": kind, "mb": int(tag[1]), "bytes": nbytes,
                           "t0": t0, "t1": t1})

    # -- publishing ----------------------------------------------------------------------
    def _flush_soon(self, step: int) -> None:
        task = self._loop.create_task(self._flush(step), name=f"trace-{step}")
        _pending.add(task)
        task.add_done_callback(_pending.discard)

    async def _flush(self, step: int) -> None:
        try:
            if self._link is not None:
                await asyncio.wait_for(self._link.drain(), 30)
            body = self.message(step)
            await self._publish(self.topic, body)
            self.published.append(step)
        except Exception as e:  # tracing must never disturb training
            log.warning("trace of step %d not published: %s", step, e)

    def message(self, step: int) -> dict[str, Any]:
        spans = sorted(self.spans.get(step, []), key=lambda s: s["t0"])
        return {"v": 1, "job": self.job, "device": self.device, "stage": self.stage,
                "step": step, "clock": "unix", "spans": spans}


_pending: set[asyncio.Task[None]] = set()  # keep flush tasks referenced until done


def attach(agent: Agent, job: _Job) -> StepTracer | None:
    """Trace ``agent.cfg.trace_steps`` of ``job``: wrap its runner, observe the uplink."""
    steps = agent.cfg.trace_steps
    if not steps:
        return None
    dev = agent.cfg.device_id
    tracer = StepTracer(steps, job=job.plan.job, device=dev, stage=job.k,
                        topic=agent.topics.trace(job.plan.job, dev),
                        publish=lambda topic, body: agent._publish_json(topic, body),
                        link=agent._link, loop=asyncio.get_running_loop())
    tracer.wrap(job.runner)
    if agent._link is not None:
        agent._link.observer = tracer.on_send
    return tracer
