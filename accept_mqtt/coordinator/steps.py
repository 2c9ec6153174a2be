"""The step driver: the synchronous pipeline protocol, one mini-batch at a time.

Guarantees:

* ``publish_plan`` publishes a plan retained, naming this coordinator as its ``owner``, and
  returns once every stage's agent says it is ready for it; a new plan version starts at
  generation 0 with fresh per-stage counters.
* ``train_step`` is one optimizer step on every stage: the coordinator is the data source, it
  publishes every micro-batch of the step (inputs + labels) to ``stage/0/fwd`` at once (under
  1F1B stage 0 itself keeps at most one micro-batch per stage in flight, so no stage waits
  for a round trip to the coordinator inside a step). It returns when the first and the last
  stage have each reported the step (``stepped``): stage 0 runs the step's last backward, so
  every stage has finished it; the last stage's report carries the loss summed over the
  micro-batches and the accuracy.
* ``train_step(..., ahead=(x, y))`` also sends the *next* step's inputs before it waits, so
  stage 0 starts that step the moment it finishes this one, without a round trip to the
  coordinator in between (stage 0 holds them until then). The next ``train_step`` then
  sends nothing new for its own step. The caller must run that next step before anything
  else happens at the boundary (pause, checkpoint, re-plan, evaluation): the devices will
  compute it on their own. A new plan or a rewind makes the frames sent ahead stale; they are
  forgotten here and dropped by the agents.
* ``evaluate`` sends the held-out set in eval mode (no stash, no step), in chunks of
  ``eval_batch`` samples with at most ``stages + EVAL_AHEAD`` chunks in flight (a new one
  goes out as the last stage reports one), and aggregates the last stage's ``eval`` events,
  one per chunk. Flow control: the broker, stage 0's queue and the coordinator hold a few
  chunks, never the whole set (CIFAR-10's test set is 123 MB of float32).
* Events of an earlier plan version or rewind generation are dropped on arrival (frames and
  events carry both, docs/faults.md); events without them count as current.
* ``next_event`` raises ``DeviceLost`` for a plan device that is offline *now* (a Last Will
  followed by the device's return is not a loss), ``DeltaMismatch`` when a device reported
  a delta frame that did not match its history under the current plan and generation
  (``resync``; the step cannot finish), ``PlanRefused`` when a plan device
  reported that it cannot build its stage of the current plan (its error names the plan's
  version and owner; an error about anything else on the plan topic is not a refusal),
  ``BrokerLost`` when the connection dropped and ``StepTimeout`` when nothing arrives for
  ``timeout`` seconds; faults are never lost when queued events are dropped (``drain``).
* Hung devices: during a training step or an evaluation, a plan device that has sent a
  ``progress`` heartbeat under the current plan and then nothing at all (no heartbeat, no
  event) for ``hang_timeout`` seconds (at least three of its heartbeat intervals) is marked
  hung in the fleet and raises ``DeviceLost``. Silence is counted from the later of its last
  message and the start of the wait, so time the coordinator spent elsewhere (a checkpoint,
  planning) is not held against a device; a device that never sent a heartbeat (an older
  agent, ``--heartbeat 0``) is left to ``step_timeout``. ``check_hung`` does the same for a
  wait elsewhere (``Recovery`` collecting a checkpoint). Found within ``hang_timeout`` plus
  one heartbeat interval plus ``HANG_CHECK_S`` of the hang (docs/faults.md).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from accept_mqtt.model.microbatch import split
from accept_mqtt.wire import codec
from accept_mqtt.wire.delta import IDS_KEY, pack_ids
from accept_mqtt.wire.messages import Eval, Event, Progress, Ready, Rewound, Stepped
from accept_mqtt.wire.plan import Plan
from accept_mqtt.wire.topics import Topics

from .errors import (
    BrokerLost,
    CoordinatorError,
    DeltaMismatch,
    DeviceLost,
    PlanRefused,
    StepTimeout,
)
from .record import RunState, StageTotals

HANG_CHECK_S = 0.5  # how often a watched wait looks for a silent device
# evaluation chunks in flight beyond one per stage: while every stage computes one, the
# next is already on its way, so no stage waits for a round trip to the coordinator
EVAL_AHEAD = 2


def plan_payload(plan: Plan) -> str:
    """The plan's JSON; ``CoordinatorError`` if it is above the plan's own message limit
    (the broker would acknowledge it and deliver it to nobody: agents never get ready)."""
    text = plan.to_json()
    size = len(text.encode())
    if plan.max_message_bytes is not None and size > plan.max_message_bytes:
        raise CoordinatorError(
            f"plan v{plan.version} is {size} bytes, above max_message_bytes "
            f"{plan.max_message_bytes}: raise --max-message-bytes (and the broker's "
            "message_size_limit) to at least that")
    return text


class Publisher(Protocol):
    async def publish(self, topic: str, payload: bytes | str, qos: int = 1,
                      retain: bool = False) -> None:
        """Publish or raise ``BrokerLost``."""


class DeviceStates(Protocol):
    def device_state(self, device: str) -> str:
        """``online``, ``busy``, ``elsewhere``, ``offline``, ``hung`` or ``unknown``, now."""

    def mark_hung(self, device: str) -> None:
        """From now on ``device`` is ``hung`` (neither waited for nor planned with)."""

    def clear_hung(self, device: str) -> None:
        """``device`` computes again: its status counts again."""


@dataclass(frozen=True)
class Lost:
    """Internal: a plan device's status said ``offline`` (checked again when taken)."""

    device: str


@dataclass(frozen=True)
class Disconnected:
    """Internal: the broker connection dropped."""

    reason: str


@dataclass(frozen=True)
class Refused:
    """Internal: a device refused plan ``version`` of ``owner`` (it cannot build its stage)."""

    device: str
    reason: str
    version: int
    owner: str | None


@dataclass(frozen=True)
class Resync:
    """Internal: a device's delta frame did not match its history, under plan version ``pv``
    and rewind generation ``gen`` (None: unknown, taken as current)."""

    device: str
    reason: str
    pv: int | None
    gen: int | None


Queued = Event | Lost | Disconnected | Refused | Resync


class StepDriver:
    """Drives the current plan's pipeline (see the module docstring)."""

    def __init__(self, job: str, topics: Topics, state: RunState, publisher: Publisher,
                 devices: DeviceStates, *, step_timeout: float, eval_batch: int,
                 hang_timeout: float = 0.0,
                 say: Callable[[str, dict[str, Any]], None] = lambda kind, info: None,
                 owner: str | None = None) -> None:
        self.job = job
        self.owner = owner  # this coordinator process: every plan it publishes names it
        self.topics = topics
        self.state = state
        self.publisher = publisher
        self.devices = devices
        self.step_timeout = step_timeout
        self.eval_batch = eval_batch
        self.say = say
        self.plan: Plan | None = None
        self.gen = 0  # rewind generation of the current plan (frames and events carry it)
        self.sent_ahead: int | None = None  # a step whose inputs went out with the one before
        self._events: asyncio.Queue[Queued] = asyncio.Queue()
        self.hang_timeout = hang_timeout  # 0: no hang detection
        # plan devices that beat under the current plan: their heartbeat interval, and when
        # anything of theirs last arrived (monotonic)
        self._beat_every: dict[str, float] = {}
        self._heard: dict[str, float] = {}

    @property
    def step(self) -> int:
        return self.state.step

    # -- what arrives (from the session) ---------------------------------------------------
    def on_event(self, ev: Event) -> None:
        if self._stale(ev):
            return
        self._heard[ev.device] = time.monotonic()
        if isinstance(ev, Progress):  # a heartbeat: heard, nothing to wait for
            self._beat_every[ev.device] = ev.every
            self.devices.clear_hung(ev.device)
            return
        if isinstance(ev, Stepped):
            self._count(ev)
        self._events.put_nowait(ev)

    def _count(self, ev: Stepped) -> None:
        """A stage's counters from its ``stepped``, once per (generation, step): QoS 1 may
        deliver an event twice, and an older copy must not roll the cumulative counters
        back. A step redone after a rewind (a new generation) counts again: it was
        computed again, and its compute is in the agent's cumulative ``busy_ms``."""
        tot = self.state.stages.setdefault(ev.stage, StageTotals())
        mark = (ev.gen or 0, ev.step)
        if tot.last is not None and mark <= tot.last:
            return
        tot.last = mark
        tot.busy_ms, tot.send_ms = ev.busy_ms, ev.send_ms
        tot.bytes_act, tot.bytes_grad = ev.bytes_act, ev.bytes_grad
        tot.steps += 1
        tot.mbs += ev.mbs

    def device_offline(self, device: str) -> None:
        """A device's status says offline: a fault if the plan uses it and it stays so."""
        if self.plan is not None and device in self.plan.devices:
            self._events.put_nowait(Lost(device))

    def disconnected(self, reason: str) -> None:
        """The connection dropped: a fault once there is a plan (before, whoever waits for
        devices checks the connection itself, and a reconnect makes this one stale)."""
        if self.plan is not None:
            self._events.put_nowait(Disconnected(reason))

    def plan_refused(self, device: str, reason: str, version: int,
                     owner: str | None = None) -> None:
        """A device says it cannot take plan ``version`` (published by ``owner``): a fault if
        that is the current plan and it uses the device."""
        self._events.put_nowait(Refused(device, reason, version, owner))

    def resync(self, device: str, reason: str, pv: int | None, gen: int | None) -> None:
        """A device says a delta frame's history did not match: a fault of the step in
        flight if it is of the current plan and generation (dropped by ``drain``: after a
        rewind every history starts afresh)."""
        self._events.put_nowait(Resync(device, reason, pv, gen))

    def _stale(self, ev: Event) -> bool:
        """An event of an earlier plan version or rewind generation (absent keys: current)."""
        if self.plan is not None and ev.pv is not None and ev.pv != self.plan.version:
            return True
        if isinstance(ev, Rewound):
            return ev.rewind_gen != self.gen
        return ev.gen is not None and ev.gen != self.gen

    def drain(self) -> None:
        """Forget queued events (a new plan or a rewind makes them meaningless)."""
        self.sent_ahead = None  # and the frames sent ahead: stale for the agents now
        keep = []
        while not self._events.empty():
            ev = self._events.get_nowait()
            if isinstance(ev, Lost | Disconnected | Refused):  # faults are never dropped
                keep.append(ev)
        for ev in keep:
            self._events.put_nowait(ev)

    def new_generation(self) -> int:
        """Start the next rewind generation of this plan: queued events are dropped."""
        self.gen += 1
        self.drain()
        return self.gen

    async def next_event(self, timeout: float, waiting_for: str,
                         watch_from: float | None = None) -> Event:
        """The next agent event (see the module docstring for the faults it raises).

        ``watch_from``: look for hung devices, counting silence from this monotonic time at
        the earliest (a training step's or an evaluation's start)."""
        deadline = time.monotonic() + timeout
        watch = watch_from is not None and self.hang_timeout > 0
        while True:
            if watch:
                assert watch_from is not None
                self.check_hung(watch_from)
            left = max(0.0, deadline - time.monotonic())
            try:
                ev = await asyncio.wait_for(self._events.get(),
                                            min(left, HANG_CHECK_S) if watch else left)
            except TimeoutError:
                if watch and time.monotonic() < deadline:
                    continue
                raise StepTimeout(f"no progress for {timeout:.0f}s while waiting for "
                                  f"{waiting_for}") from None
            match ev:
                case Lost(device=dev):
                    if self.plan is not None and dev in self.plan.devices and (
                            self.devices.device_state(dev) == "offline"):
                        raise DeviceLost(dev)
                case Disconnected(reason=reason):
                    raise BrokerLost(reason)
                case Refused(device=dev, reason=reason, version=version, owner=owner):
                    plan = self.plan  # a refusal of another plan (an older one, a forged
                    # one) is not a refusal of this one: logged where it arrived, no more
                    if (plan is not None and dev in plan.devices and version == plan.version
                            and owner in (None, plan.owner)):
                        raise PlanRefused(dev, reason)
                case Resync(device=dev, reason=reason, pv=pv, gen=gen):
                    plan = self.plan
                    if plan is not None and pv in (None, plan.version) and gen in (None,
                                                                                 self.gen):
                        raise DeltaMismatch(dev, reason)
                case _:
                    return ev

    def check_hung(self, since: float) -> None:
        """Raise ``DeviceLost`` for a beating plan device silent too long (module docstring);
        also for waits outside this driver (a checkpoint's weights)."""
        if self.plan is None or self.hang_timeout <= 0:
            return
        now = time.monotonic()
        for dev in self.plan.devices:
            every = self._beat_every.get(dev)
            if every is None:
                continue
            silent = now - max(self._heard.get(dev, since), since)
            if silent > max(self.hang_timeout, 3 * every):
                self.devices.mark_hung(dev)
                self._beat_every.pop(dev, None)
                raise DeviceLost(dev, f"stopped computing (connected, but no heartbeat or "
                                      f"event for {silent:.1f}s: hung)")

    # -- the plan --------------------------------------------------------------------------
    async def publish_plan(self, plan: Plan, timeout: float = 60.0) -> None:
        """Publish ``plan`` retained and wait until every stage's agent says it is ready;
        ``CoordinatorError`` (nothing published) if it is above its ``max_message_bytes``.
        The plan goes out naming this coordinator (``owner``): agents take a plan whose
        version they run when another coordinator published it (a resume after a crash)."""
        if self.owner is not None and plan.owner != self.owner:
            plan = dataclasses.replace(plan, owner=self.owner)
        plan_payload(plan)
        if self.plan is None or self.plan.version != plan.version:
            self.gen = 0
            self.state.stages = {}  # the new stages count from zero
            self._beat_every.clear()  # heartbeats count under the plan they were sent for
            self.drain()
        self.plan = plan
        for dev in plan.devices:  # offline before the plan existed: its Will was not a loss
            if self.devices.device_state(dev) == "offline":
                self._events.put_nowait(Lost(dev))
        await self.republish_plan()
        ready: set[int] = set()
        deadline = time.monotonic() + timeout
        while len(ready) < len(plan.stages):
            ev = await self.next_event(max(0.1, deadline - time.monotonic()),
                                       f"agents to load plan v{plan.version}")
            if isinstance(ev, Ready) and ev.version == plan.version:
                ready.add(ev.stage)
        self.say("plan", {"plan": plan.to_dict()})

    async def republish_plan(self) -> None:
        """Publish the current plan retained again (after a reconnect), without waiting."""
        assert self.plan is not None
        await self.publisher.publish(self.topics.plan(self.job), plan_payload(self.plan),
                                     retain=True)

    # -- training --------------------------------------------------------------------------
    def _input_frame(self, x: torch.Tensor, y: torch.Tensor, step: int, mb: int,
                     extra: dict[str, Any]) -> bytes:
        assert self.plan is not None
        f = codec.encode(x, bits=32, job=self.job, step=step, mb=mb, kind="act", labels=y,
                         extra={**extra, "pv": self.plan.version, "gen": self.gen})
        return codec.to_bytes(f)

    def _step_frames(self, x: torch.Tensor, y: torch.Tensor, step: int,
                     ids: torch.Tensor | None) -> list[bytes]:
        assert self.plan is not None
        mbs = split(len(x), self.plan.micro_batches)
        extra = {"nmb": len(mbs), "bsz": len(x), "train": True}
        if not any(s.act_delta for s in self.plan.stages):
            ids = None  # without delta links the frames stay exactly as they were
        elif ids is None or len(ids) != len(x):
            raise CoordinatorError("a plan with delta-coded links needs the dataset index of "
                                   "every training sample (ids)")
        return [self._input_frame(x[a:b], y[a:b], step, mb, extra if ids is None else
                                  {**extra, IDS_KEY: pack_ids(ids[a:b])})
                for mb, (a, b) in enumerate(mbs)]

    async def train_step(self, x: torch.Tensor, y: torch.Tensor,
                         ahead: tuple[torch.Tensor, torch.Tensor] | None = None, *,
                         ids: torch.Tensor | None = None,
                         ahead_ids: torch.Tensor | None = None) -> dict[str, float]:
        """One mini-batch through the pipeline; returns loss and accuracy of the batch.

        ``ahead``: the next step's mini-batch, sent now (see the module docstring).
        ``ids`` / ``ahead_ids``: the samples' indices in the training set; sent (extension
        key ``ids``) only when a link of the plan is delta-coded, which needs them."""
        assert self.plan is not None
        step, bsz = self.state.step, len(x)
        nmb, last = len(split(bsz, self.plan.micro_batches)), len(self.plan.stages) - 1
        frames = [] if self.sent_ahead == step else self._step_frames(x, y, step, ids)
        if ahead is not None:
            frames += self._step_frames(*ahead, step + 1, ahead_ids)
        self.sent_ahead = step + 1 if ahead is not None else None
        fwd0 = self.topics.fwd(self.job, 0)
        # started in order, so the client queues them in order; all in flight at once
        await asyncio.gather(*(self.publisher.publish(fwd0, f) for f in frames))
        waiting = {0, last}
        result: Stepped | None = None
        since = time.monotonic()
        while waiting:
            ev = await self.next_event(self.step_timeout, f"step {step}", watch_from=since)
            if isinstance(ev, Stepped) and ev.step == step and ev.stage in waiting:
                waiting.discard(ev.stage)
                if ev.stage == last:
                    result = ev
            # anything else: a late event of an earlier step, or an eval
        assert result is not None
        self.state.step += 1
        self.state.microbatches += nmb
        return {"loss": result.loss or 0.0, "train_acc": (result.correct or 0) / bsz}

    async def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """Held-out accuracy through the pipeline in eval mode (no stash, no step)."""
        assert self.plan is not None
        fwd0 = self.topics.fwd(self.job, 0)
        chunks = [(i, min(i + self.eval_batch, len(x)))
                  for i in range(0, len(x), self.eval_batch)]
        window = len(self.plan.stages) + EVAL_AHEAD
        sent = 0

        async def send_next() -> None:
            nonlocal sent
            a, b = chunks[sent]
            await self.publisher.publish(fwd0, self._input_frame(x[a:b], y[a:b],
                                                                 self.state.step, sent,
                                                                 {"train": False}))
            sent += 1

        while sent < min(window, len(chunks)):
            await send_next()
        got: dict[int, Eval] = {}
        since = time.monotonic()
        while len(got) < len(chunks):
            ev = await self.next_event(self.step_timeout, "evaluation results",
                                       watch_from=since)
            if isinstance(ev, Eval) and ev.step == self.state.step and ev.mb not in got:
                got[ev.mb] = ev  # one result per chunk, a second copy counts nothing
                if sent < len(chunks):
                    await send_next()
        n = sum(e.n for e in got.values())
        return {"accuracy": sum(e.correct for e in got.values()) / max(n, 1),
                "loss": sum(e.loss_sum for e in got.values()) / max(n, 1)}
