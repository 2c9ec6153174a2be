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

* The tracer only listens: it registers as an observer of the stage's ``StageRunner``
  (``accept_mqtt.model.stage``) and of the agent's ``Link``, and never replaces their methods.
  Without ``--trace-steps`` nothing is registered. Steps not traced cost, per compute and per
  send, one observer call and one set lookup; nothing is published.
* Compute spans cover the runner's forward/backward/optimizer-step call in the worker thread,
  including the emulated slowdown; send spans cover the uplink's pacing (if any) and the QoS 1
  publish up to the broker's acknowledgement, i.e. the time the tensor occupied the link.
* One tracer per link: ``attach`` first detaches the tracer attached to the same link before
  (an agent serves one job at a time, and a re-plan is a new job), so a trace never holds the
  sends of another job.
* A traced step is published after its optimizer step and after the uplink has sent every
  tensor queued until then, so its send spans are complete. A publishing error is logged,
  never raised into the agent.
* A traced step that is computed twice (rewound after a broker restart) is published after
  each of its optimizer steps; the later message carries the spans of both attempts.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

from accept_mqtt.wire.messages import Span, Trace

if TYPE_CHECKING:
    from accept_mqtt.model.stage import StageRunner
    from device_agent.link import Link

log = logging.getLogger("device_agent.trace")

Publish = Callable[[str, Trace], Awaitable[None]]  # (topic, message)


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
    """Spans of the traced steps of one stage of one job.

    ``subscribe(runner)`` makes it observe the runner's computes and ``link``'s sends;
    ``close()`` stops both. ``link`` (if any) is also what a flush waits for to drain.
    """

    def __init__(self, steps: Iterable[int], *, job: str, device: str, stage: int,
                 topic: str, publish: Publish, link: Link | None,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.steps = frozenset(steps)
        self.job, self.device, self.stage, self.topic = job, device, stage, topic
        self._publish = publish
        self._link = link
        self._loop = loop
        self._runner: StageRunner | None = None
        self.spans: dict[int, list[dict[str, Any]]] = {s: [] for s in self.steps}
        self._current: int | None = None  # step of the last compute (for the optimizer span)
        self.published: list[int] = []

    def subscribe(self, runner: StageRunner | None) -> None:
        """Observe ``runner``'s forward/backward/step and the link's sends (call once)."""
        if runner is not None:
            runner.add_observer(self)
            self._runner = runner
        if self._link is not None:
            self._link.add_observer(self.on_send)

    def close(self) -> None:
        """Stop observing; spans kept so far stay, a flush already scheduled still publishes."""
        if self._runner is not None:
            self._runner.remove_observer(self)
            self._runner = None
        if self._link is not None:
            self._link.remove_observer(self.on_send)

    # -- recording -----------------------------------------------------------------------
    def _add(self, step: int, span: dict[str, Any]) -> None:
        self.spans[step].append(span)  # list.append is atomic: worker thread and loop share it

    def on_compute(self, kind: str, key: tuple[int, int] | None, t0: float, t1: float) -> None:
        """``StageObserver`` (worker thread): one forward/backward, or the optimizer step."""
        if key is not None:  # fwd / bwd of (step, mb)
            step = int(key[0])
            self._current = step
            if step in self.steps:
                self._add(step, {"kind": kind, "mb": int(key[1]), "t0": t0, "t1": t1})
            return
        # the optimizer step carries no key: it closes the step of the computes before it
        cur = self._current
        if cur is None or cur not in self.steps:
            return
        self._add(cur, {"kind": "opt", "mb": -1, "t0": t0, "t1": t1})
        self._loop.call_soon_threadsafe(self._flush_soon, cur)

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

    def message(self, step: int) -> Trace:
        spans = sorted(self.spans.get(step, []), key=lambda s: s["t0"])
        return Trace(job=self.job, device=self.device, stage=self.stage, step=step,
                     spans=[Span(**s) for s in spans])


_pending: set[asyncio.Task[None]] = set()  # keep flush tasks referenced until done


def attach(steps: Iterable[int], *, job: str, device: str, stage: int, topic: str,
           publish: Publish, runner: StageRunner, link: Link | None,
           loop: asyncio.AbstractEventLoop) -> StepTracer | None:
    """Trace ``steps`` of stage ``stage`` of ``job``: observe ``runner`` and the uplink.

    Returns None (observing nothing) when ``steps`` is empty; otherwise the caller owns the
    tracer and ``close()``s it when the stage ends (the agent does when it leaves a job), so
    a later job's sends are not counted as this one's.
    """
    steps = tuple(steps)
    if not steps:
        return None
    tracer = StepTracer(steps, job=job, device=device, stage=stage, topic=topic,
                        publish=publish, link=link, loop=loop)
    tracer.subscribe(runner)
    return tracer
