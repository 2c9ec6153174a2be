"""The device agent: one MQTT connection, runs whatever pipeline stage a plan gives it.

Lifecycle::

    async with Agent(AgentConfig(broker="mqtt://host:1883", device_id="pi-kitchen")) as agent:
        await agent.run()          # until cancelled

* On connect it publishes its retained profile and ``online`` status, with a Last Will that
  marks it ``offline`` if the connection drops without a goodbye.
* It watches ``{root}/jobs/+/plan``; a plan naming this device makes it build that stage
  (from the plan's model, seed and layer range: the same weights as a one-process run),
  subscribe to the stage's ``fwd``/``bwd`` topics and report ``busy``. An empty retained plan
  ends the job. A plan whose model this agent cannot build, or builds differently (the
  plan's per-unit fingerprint), is refused: logged and reported on the job's metrics topic
  naming the first differing unit, and the agent stays idle.
* Frames are validated before use; a bad frame is logged and reported on the job's metrics
  topic (``{"type": "error", ...}``, naming topic and reason) and dropped. Nothing else
  changes: the stage's stash, weights and step counter are untouched. A second frame for a
  micro-batch already computed is such a frame too (nothing of the job sends one twice; the
  chaos bench's wrong-shape gradients were dropped as "duplicates" without a word).
* Plans: a payload on a plan topic that is no plan is reported (an ``error`` without
  ``plan_version``) and changes nothing; a refusal of a plan it could read names the plan's
  version and owner. A plan is the one running when version and ``owner`` match, so a
  resumed coordinator's plan is taken even at the version a dead one left behind; a plan of
  another owner than the job's live coordinator (its liveness names it) is refused.
* Compute runs on the event loop's own thread, one work item at a time, between which the
  loop services the connection: measured, a worker thread that competes with the loop for
  the GIL stretched 2 ms convolutions to 5-11 ms. Only where the loop must keep time while
  the stage computes -- ``--slowdown`` (its emulating sleep), a paced uplink (its
  serialisation delay overlaps compute, as a real NIC overlaps a CPU) and ``--latency`` (its
  delay line) -- or when asked
  (``compute_thread``, e.g. agents sharing one process in tests) does compute go to a worker
  thread (``asyncio.to_thread``).
* Under 1F1B, stage 0 keeps at most as many micro-batches of a step in flight (forwarded, not
  yet backwarded) as there are stages; the coordinator sends a step's inputs at once, so no
  stage waits for a round trip to the coordinator inside a step. A training frame for the
  step after the current one is held until the current one ends.
* Delta-coded links (plan ``act_delta``/``grad_feedback``, ``wire/delta.py``): a stage keeps
  the history of the activations it sends and of those it receives on such a link, and the
  residuals of its error-feedback gradients; evaluation frames never touch them; a new plan,
  a rewind and a restore reset them all. A delta frame its history does not match is dropped
  and reported with ``resync`` (its plan version and generation): the coordinator rewinds.
* Events (``ready``, ``stepped``, ...) are published without waiting for their PUBACK: the
  stage computes on while the broker acknowledges.
* Recovery (docs/faults.md): the agent keeps a copy of its stage's state at the start of the
  current and the previous step, so the coordinator can *rewind* it to a step after a broker
  restart (sync op ``rewind``) without losing or repeating a step, and it accepts a restore of
  weights and optimizer state on ``weights/{k}`` after a re-plan. Weights travel both ways in
  chunks of at most the plan's ``max_message_bytes``, checked on arrival (``wire.chunks``):
  a broker drops a larger message after acknowledging it. Timing samples are split likewise.
  Frames and events carry the plan version (``pv``) and the rewind generation (``gen``); a
  frame of another plan or generation is stale (sent before a re-plan or a rewind) and
  dropped without an error.
* While it holds a job, the agent sends a ``progress`` heartbeat every ``heartbeat`` seconds,
  except while a compute has made no progress since the previous heartbeat (the stage's
  ``ticks`` and the finished work items have not moved): a stalled compute falls silent
  while the connection stays up, and the coordinator declares the device hung
  (docs/faults.md). An idle stage (waiting for frames) beats: it is not hung. Computing
  inline, the loop cannot beat during a work item, so one inline item lasting longer than
  the coordinator's ``hang_timeout`` reads as a hang.
* ``fault_hang_at_step`` is a FAULT-INJECTION hook for tests and drills, off by default:
  from that optimizer step on, every compute call blocks in a worker thread until the agent
  exits, while the event loop (connection, keepalive, reader) runs on: a hung device.
* A lost connection is retried (``reconnect_timeout``) with a fresh session; the stage and its
  state survive, and the agent re-announces itself and re-subscribes.
* Twins: before it takes its session (first connect and every reconnect) the agent asks
  whether another live agent holds its device id (``wire.liveness.live_holder``: the retained
  status names the holder's ``instance``, which answers a probe on
  ``{root}/devices/{device}/probe``). If one does, it raises ``DeviceIdTaken`` naming it and
  the other agent's session is never touched; this agent answers such probes itself.
* Lease (docs/faults.md): a job's coordinator announces itself on the retained
  ``{root}/jobs/{job}/coordinator`` (renewed every ``lease_s / 3``; its Will says ``gone``).
  The agent leaves a job whose coordinator it has not heard alive for the lease (the
  coordinator's ``lease_s``, or ``lease`` here if shorter) plus one renewal interval
  (``wire.liveness.allowed_silence``; counted while connected) and goes
  back to idle, and it does not join the plan of a job whose coordinator is gone. A job whose
  coordinator never announced itself (an older coordinator) has no lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import aiomqtt
import torch

from accept_mqtt.model import checkpoint, fingerprint, footprint
from accept_mqtt.model.descriptors import describe, output_shapes
from accept_mqtt.model.hardware import device_profile
from accept_mqtt.model.stage import StageError, StageRunner
from accept_mqtt.model.zoo import BUILD_LOCK, build_model
from accept_mqtt.wire import chunks, codec, delta
from accept_mqtt.wire.aio import cancel_and_wait, retry, widen_socket_buffers
from accept_mqtt.wire.broker_url import parse_broker_url
from accept_mqtt.wire.liveness import allowed_silence, instance_id, live_holder
from accept_mqtt.wire.messages import (
    ERRORS_KEPT,
    CoordinatorStatus,
    DeviceProfile,
    DeviceStatus,
    Error,
    Eval,
    Event,
    LayerInfo,
    MessageError,
    Pong,
    Probe,
    Progress,
    Ready,
    Restored,
    Rewound,
    Stepped,
    SyncOp,
    SyncPing,
    SyncRewind,
    SyncWeights,
    TimingSample,
    Weights,
    WeightsChunk,
    decode,
    encode,
)
from accept_mqtt.wire.mqtt import Client, PublishRefused
from accept_mqtt.wire.plan import Plan, PlanError
from accept_mqtt.wire.topics import Topics, check_id
from device_agent import trace
from device_agent.link import Link

log = logging.getLogger("device_agent")
T = TypeVar("T")


@dataclass
class AgentConfig:
    broker: str
    device_id: str
    root: str = "accept"
    threads: int = 1
    slowdown: float = 1.0
    bandwidth_bps: float | None = None
    keepalive: int = 10  # seconds; the broker fires the Last Will after 1.5x this
    timing_every: int = 1  # publish timing samples every N optimizer steps
    reconnect_timeout: float = 300.0  # seconds to keep retrying a lost broker connection
    pace: bool = True  # False: bandwidth_bps is only advertised, the link is shaped elsewhere
    trace_steps: tuple[int, ...] = ()  # steps whose spans go to trace/{device} (trace.py)
    compute_thread: bool = False  # compute in a worker thread even at full speed
    uplink_window: int = 16  # frames in flight on the uplink (Link)
    memory_limit: int | None = None  # bytes a stage may use; None: hardware's default
    model_path: tuple[str, ...] = ()  # directories a user's model (MODULE:FACTORY) is found in
    latency_s: float = 0.0  # emulated one-way latency of frames and events (Link's delay line)
    heartbeat: float = 1.0  # seconds between progress heartbeats while in a job; 0: none
    # FAULT INJECTION (tests, drills): from this optimizer step on, compute blocks for ever
    # in a worker thread while the connection stays up (module docstring). None: off.
    fault_hang_at_step: int | None = None
    lease: float | None = None  # seconds at most to hold a job whose coordinator is silent;
    # None: the coordinator's own lease (CoordinatorStatus.lease_s)


class DeviceIdTaken(RuntimeError):
    """Another live agent holds this device id (a twin): this one does not start."""


@dataclass
class _Heard:
    """What the agent last heard of one job's coordinator (its retained liveness)."""

    alive: bool
    heard: float  # monotonic: the last ``alive`` (or the first word, or the last reconnect)
    lease_s: float
    owner: str  # the coordinator process it names


@dataclass
class _Work:
    topic: str
    payload: bytes
    direction: str  # "fwd" | "bwd"


class _Job:
    """Everything an agent holds for the stage it runs in one job."""

    def __init__(self, plan: Plan, device: str, threads: int, slowdown: float,
                 model_path: tuple[str, ...] = ()) -> None:
        stage = plan.stage_of(device)
        assert stage is not None
        self.plan = plan
        self.stage = stage
        self.k = stage.index
        self.last = stage.index == len(plan.stages) - 1
        # 1F1B: training micro-batches this stage may hold (forwarded, backward not done)
        self.bound = stage_in_flight(plan, self.k)
        model = build_model(plan.model, seed=plan.seed, model_path=model_path, **plan.model_args)
        if plan.fingerprint:  # refuse before allocating a stage that would not match
            fingerprint.check(plan.fingerprint, model.layers, plan.model)
        descs = describe(model)
        in_shape = model.input_shape if stage.start == 0 else output_shapes(model)[stage.start - 1]
        self.runner = StageRunner(
            model.layers[stage.start:stage.end], descs[stage.start:stage.end], in_shape,
            is_first=stage.index == 0, is_last=self.last, optimizer_cfg=dict(plan.optimizer),
            slowdown=slowdown, threads=threads,
        )
        self.step = plan.start_step
        self.nmb = 0  # micro-batches in the current step (from its frames)
        self.fwd_done: dict[int, set[int]] = defaultdict(set)
        self.bwd_done: dict[int, set[int]] = defaultdict(set)
        self.deferred: list[tuple[int, int]] = []  # gpipe: last stage's waiting backwards
        self.early: list[_Work] = []  # training frames of the next step, held until it starts
        self.results: dict[int, list[float]] = {}  # last stage: step -> [loss, correct, n]
        self.fwd_q: deque[_Work] = deque()
        self.bwd_q: deque[_Work] = deque()
        self.errors = 0
        self.gen = 0  # rewind generation: frames and events of another one are stale
        self.link0: tuple[float, int, int] = (0.0, 0, 0)  # uplink counters when the job began
        self.tracer: trace.StepTracer | None = None  # only with --trace-steps
        # state at the start of the current and the previous step (for ``rewind``)
        self.snapshots: dict[int, Any] = {self.step: self.runner.snapshot()}
        # delta-coded links (wire/delta.py): the history of what this stage sends to the next
        # stage, of what it receives from the previous one, and its gradients' residuals
        prev = plan.stages[self.k - 1] if self.k > 0 else None
        self.act_tx = delta.ActHistory() if stage.act_delta and not self.last else None
        self.act_rx = delta.ActHistory() if prev is not None and prev.act_delta else None
        self.grad_ef = delta.ErrorFeedback() if stage.grad_feedback and self.k > 0 else None

    def reset(self, step: int, gen: int) -> None:
        """Forget everything of a half-done step; continue at ``step`` in generation ``gen``.
        Every delta link's history and residual goes too (a rewind or a restore resets both
        ends of every link, so the next frames are plain ones)."""
        for h in (self.act_tx, self.act_rx, self.grad_ef):
            if h is not None:
                h.reset()
        self.runner.reset_partial()
        self.fwd_q.clear()
        self.bwd_q.clear()
        self.fwd_done.clear()
        self.bwd_done.clear()
        self.deferred.clear()
        self.early.clear()
        self.results.clear()
        self.nmb = 0
        self.step, self.gen = step, gen
        self.snapshots = {s: v for s, v in self.snapshots.items() if s <= step}

    def stale(self, frame: codec.TensorFrame) -> bool:
        """A frame sent under another plan version or before a rewind (absent keys: current)."""
        pv, gen = frame.extra.get("pv"), frame.extra.get("gen")
        return (pv is not None and pv != self.plan.version) or (gen is not None
                                                                 and gen != self.gen)

    @property
    def next_bits(self) -> int:
        return self.stage.act_bits

    @property
    def prev_bits(self) -> int:
        return self.stage.grad_bits


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        check_id("device", config.device_id)
        self.cfg = config
        self.topics = Topics(config.root)
        self.url = parse_broker_url(config.broker)
        self.job: _Job | None = None
        self._client: aiomqtt.Client | None = None
        self._link: Link | None = None
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._compute = asyncio.Lock()  # one compute or state change of the stage at a time
        self._in_thread = bool(config.compute_thread or config.slowdown > 1.0
                               or (config.bandwidth_bps and config.pace)
                               or config.latency_s > 0)  # the delay line keeps time too
        self._bg: set[asyncio.Task[None]] = set()  # publishes nobody waits for
        self.profile: DeviceProfile | None = None
        self.errors: deque[Error] = deque(maxlen=ERRORS_KEPT)  # the latest; logged all
        self.reconnects = 0
        self._chunks = chunks.Reassembler()  # restores arrive in chunks (wire/chunks.py)
        self.instance = instance_id()  # this process, as its status names it
        self._coordinators: dict[str, _Heard] = {}  # job -> its coordinator's liveness
        self._computing = 0  # compute calls running now (the heartbeat's "busy")
        self._items = 0  # compute calls finished (progress between the stage's own ticks)
        self._hang_release = threading.Event()  # fault_hang_at_step: set on exit

    # -- connection ----------------------------------------------------------------------
    def _status(self, state: Literal["online", "busy", "offline"], *, job: str | None = None,
                stage: int | None = None, reason: str | None = None) -> DeviceStatus:
        return DeviceStatus(state=state, device=self.cfg.device_id, time=time.time(), job=job,
                            stage=stage, reason=reason, instance=self.instance)

    async def __aenter__(self) -> Agent:
        torch.set_num_threads(self.cfg.threads)
        self.profile = DeviceProfile(**device_profile(
            self.cfg.device_id, threads=self.cfg.threads, slowdown=self.cfg.slowdown,
            bandwidth_bps=self.cfg.bandwidth_bps, memory_limit_bytes=self.cfg.memory_limit))
        await self._first_connect()
        self._link = Link(self._publish_frame, self.cfg.bandwidth_bps if self.cfg.pace else None,
                          window=self.cfg.uplink_window, delay_s=self.cfg.latency_s)
        self._link.start()
        log.info("agent %s online at %s (threads=%d slowdown=%g bandwidth=%s)",
                 self.cfg.device_id, self.url, self.cfg.threads, self.cfg.slowdown,
                 self.cfg.bandwidth_bps)
        return self

    async def _connect(self) -> None:
        """Connect, announce profile and status, subscribe: the first time and on reconnect.

        A clean session each time: after a broker restart nothing is assumed to survive at
        the broker; the coordinator rewinds the step in flight (docs/faults.md). Another live
        agent with this device id raises ``DeviceIdTaken`` before the session is taken.
        """
        dev = self.cfg.device_id
        twin = await live_holder(self.url, liveness_topic=self.topics.status(dev),
                                 probe_topic=self.topics.device_probe(dev), me=self.instance,
                                 holder_of=_live_instance)
        if twin is not None:
            raise DeviceIdTaken(
                f"device id {dev} is held by a live agent ({twin}) on {self.url}: give this "
                "agent another --device-id, or stop that one first")
        now = time.monotonic()
        for heard in self._coordinators.values():  # the lease counts while connected
            heard.heard = now
        will = aiomqtt.Will(self.topics.status(self.cfg.device_id),
                            encode(self._status("offline", reason="connection lost")), qos=1,
                            retain=True)
        client = Client(
            **self.url.client_kwargs(), identifier=f"accept-agent-{self.cfg.device_id}",
            will=will, keepalive=self.cfg.keepalive, max_inflight_messages=100,
        )
        await client.__aenter__()
        self._client = client
        try:
            await self._announce(client)
        except BaseException:
            # a session half set up is closed, not left to a retry that opens another with
            # the same client id (which the broker would then take over)
            self._client = None
            with contextlib.suppress(Exception):
                await client.__aexit__(None, None, None)
            raise

    async def _announce(self, client: Client) -> None:
        """Profile, status and subscriptions on a fresh session."""
        widen_socket_buffers(client._client.socket())  # aiomqtt keeps paho's client there
        job = self.job
        state = self._status("busy", job=job.plan.job, stage=job.k) if job else self._status(
            "online")
        await client.publish(self.topics.profile(self.cfg.device_id), encode(self.profile),
                             qos=1, retain=True)
        await client.publish(self.topics.status(self.cfg.device_id), encode(state), qos=1,
                             retain=True)
        # liveness first: its retained messages then arrive before the plans they govern
        await client.subscribe(self.topics.all_coordinators, qos=1)
        await client.subscribe(f"{self.topics.root}/jobs/+/plan", qos=1)
        await client.subscribe(self.topics.device_probe(self.cfg.device_id), qos=1)
        if job is not None:
            await client.subscribe([(t, 1) for t in self._job_topics(job)], timeout=10)

    async def _first_connect(self) -> None:
        """The first connection, retried like a lost one (``reconnect_timeout``) while the
        broker is not there yet or too busy to answer in time: a device may boot before its
        broker, and a loaded broker may miss one CONNECT or SUBSCRIBE (seen with amqtt in CI:
        "Operation timed out" ended an agent before its job). A refusal by the broker (bad
        credentials, not authorised: ``MqttCodeError``) and a twin are final."""
        await retry(self._connect, self.cfg.reconnect_timeout, aiomqtt.MqttError,
                    self._say_unreachable, final=aiomqtt.MqttCodeError)

    def _say_unreachable(self, e: BaseException, delay: float) -> None:
        log.info("broker %s unreachable (%s); retrying in %.1fs", self.url, e, delay)

    async def _reconnect(self) -> None:
        """Retry the broker until ``reconnect_timeout``; raise the last error after that."""
        old, self._client = self._client, None
        if old is not None:
            with contextlib.suppress(Exception):
                await old.__aexit__(None, None, None)

        await retry(self._connect, self.cfg.reconnect_timeout, aiomqtt.MqttError,
                    self._say_unreachable)
        self.reconnects += 1
        log.warning("reconnected to %s (reconnect #%d)", self.url, self.reconnects)

    def _job_topics(self, job: _Job) -> list[str]:
        t, k, j = self.topics, job.k, job.plan.job
        return [t.fwd(j, k), t.sync(j), t.weights(j, k)] + ([] if job.last else [t.bwd(j, k)])

    async def __aexit__(self, *exc: object) -> None:
        self._hang_release.set()  # an injected hang ends with the agent
        await cancel_and_wait(*self._tasks)
        if self._bg:  # let the last events leave (bounded: the broker may be gone)
            await asyncio.wait(set(self._bg), timeout=2)
            await cancel_and_wait(*self._bg)
        if self._link is not None:
            await self._link.close()
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.publish(self.topics.status(self.cfg.device_id),
                                           encode(self._status("offline", reason="shutdown")),
                                           qos=1, retain=True, timeout=2)
            with contextlib.suppress(Exception):
                await self._client.__aexit__(None, None, None)
        self._client = None

    async def _publish_frame(self, topic: str, payload: bytes) -> None:
        if self._client is None:
            raise aiomqtt.MqttError("not connected (reconnecting)")
        try:
            await self._client.publish(topic, payload, qos=1)
        except PublishRefused as e:
            # the next stage will never see this frame: say why where the coordinator reads
            await self._report_error(topic, str(e))
            raise

    async def _publish_msg(self, topic: str, message: Any, qos: int = 1,
                           retain: bool = False) -> None:
        """Publish a ``wire.messages`` message (or a list of them)."""
        if self._client is None:
            raise aiomqtt.MqttError("not connected (reconnecting)")
        await self._client.publish(topic, encode(message), qos=qos, retain=retain)

    def _publish_soon(self, topic: str, message: Any, qos: int = 1) -> None:
        """``_publish_msg`` without waiting for the broker's acknowledgement.

        The client takes the packet before this returns (with ``latency_s``, that much
        later, through the uplink's delay line), so messages published this way leave in call
        order; a failure is logged (a lost connection makes the coordinator
        rewind the step, docs/faults.md)."""
        async def send() -> None:
            try:
                await self._publish_msg(topic, message, qos=qos)
            except aiomqtt.MqttError as e:
                log.warning("publish to %s failed: %s", topic, e)

        def start() -> None:
            task = asyncio.get_running_loop().create_task(send())
            self._bg.add(task)
            task.add_done_callback(self._bg.discard)

        # with an emulated latency, events share the frames' delay line (order kept)
        if self._link is not None:
            self._link.delay.call(start)
        else:
            start()

    async def _compute_call(self, fn: Any, *args: Any) -> Any:
        """Run one piece of stage compute: inline, or in a worker thread (module docstring)."""
        self._computing += 1
        try:
            hang = self.cfg.fault_hang_at_step
            if hang is not None and self.job is not None and self.job.step >= hang:
                log.warning("FAULT INJECTION: compute hangs at step %d (--fault-hang-at-step)",
                            self.job.step)
                await asyncio.to_thread(self._hang_release.wait)
            if self._in_thread:
                return await asyncio.to_thread(fn, *args)
            return fn(*args)
        finally:
            self._computing -= 1
            self._items += 1

    async def _heartbeat(self) -> None:
        """A ``progress`` event every ``heartbeat`` seconds while in a job, unless a compute
        is running that has not moved since the previous one (module docstring)."""
        every = self.cfg.heartbeat
        last: tuple[int, int] | None = None
        while True:
            await asyncio.sleep(every)
            job = self.job
            if job is None or self._client is None:
                continue
            mark = (self._items, job.runner.ticks)
            if self._computing and mark == last:
                continue  # stalled: say nothing
            last = mark
            ev = Progress(device=self.cfg.device_id, time=time.time(), pv=job.plan.version,
                          gen=job.gen, stage=job.k, step=job.step, ticks=sum(mark),
                          every=every)
            # QoS 0: a lost heartbeat is made good by the next; the bound is several of them
            self._publish_soon(self.topics.events(job.plan.job, self.cfg.device_id), ev, qos=0)

    # -- main loop -----------------------------------------------------------------------
    def stop(self) -> None:
        """Ask ``run()`` to return (safe from a signal handler)."""
        self._stop.set()

    async def run(self) -> None:
        """Serve until ``stop()``, cancellation, or the connection is lost (raises)."""
        assert self._client is not None, "use 'async with Agent(...)'"
        worker = asyncio.create_task(self._worker(), name="worker")
        reader = asyncio.create_task(self._read(), name="reader")
        lease = asyncio.create_task(self._watch_lease(), name="lease")
        stop = asyncio.create_task(self._stop.wait(), name="stop")
        beat = (asyncio.create_task(self._heartbeat(), name="heartbeat")
                if self.cfg.heartbeat > 0 else None)
        self._tasks += [worker, reader, lease] + ([beat] if beat else [])
        try:
            done, _ = await asyncio.wait({worker, reader, lease, stop},
                                         return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not stop and not t.cancelled() and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
        finally:
            await cancel_and_wait(worker, reader, lease, stop, beat)

    async def _read(self) -> None:
        """Serve messages; on a lost connection reconnect and go on (the stage is kept)."""
        while True:
            client = self._client
            assert client is not None
            try:
                async for msg in client.messages:
                    try:
                        await self._dispatch(msg.topic.value, bytes(msg.payload or b""))
                    except aiomqtt.MqttError:
                        raise
                    except Exception as e:  # one bad message must never stop the agent
                        log.exception("failed to handle message on %s", msg.topic.value)
                        await self._report_error(msg.topic.value, f"{type(e).__name__}: {e}")
                return
            except aiomqtt.MqttError as e:
                if self._stop.is_set():
                    return
                log.warning("connection to %s lost: %s; reconnecting", self.url, e)
                await self._reconnect()

    async def _dispatch(self, topic: str, payload: bytes) -> None:
        parts = topic.split("/")
        root_n = len(self.topics.root.split("/"))
        tail = parts[root_n:]
        if len(tail) == 3 and tail[0] == "jobs" and tail[2] == "plan":
            await self._on_plan(tail[1], payload)
            return
        if len(tail) == 3 and tail[0] == "jobs" and tail[2] == "coordinator":
            await self._on_coordinator(tail[1], topic, payload)
            return
        if tail == ["devices", self.cfg.device_id, "probe"]:
            try:
                probe = decode(Probe, payload, topic=topic)
            except MessageError as e:  # no job to report it on: the log says it
                log.warning("%s", e)
                return
            if not probe.answer:  # a would-be twin asks: this id is taken
                self._publish_soon(topic, Probe(nonce=probe.nonce, answer=True,
                                                holder=self.instance))
            return
        job = self.job
        if job is None or len(tail) < 3 or tail[1] != job.plan.job:
            return
        rest = tail[2:]
        if rest[0] == "stage" and len(rest) == 3 and rest[2] in ("fwd", "bwd"):
            work = _Work(topic, payload, rest[2])
            (job.fwd_q if rest[2] == "fwd" else job.bwd_q).append(work)
            self._wake.set()
        elif rest == ["sync"]:
            await self._on_sync(payload)
        elif rest == ["weights", str(job.k)]:
            await self._on_restore(topic, payload)

    async def _on_plan(self, job_id: str, payload: bytes) -> None:
        current = self.job
        if not payload:  # the coordinator cleared the retained plan: job over
            if current is not None and current.plan.job == job_id:
                await self._leave_job("job ended")
            return
        try:
            plan = Plan.from_json(payload)
        except PlanError as e:  # bad input: reported, and the current stage goes on
            if current is None or current.plan.job == job_id:
                await self._report_error(self.topics.plan(job_id), str(e), job=job_id)
            else:
                log.error("rejected plan on job %s: %s", job_id, e)
            return
        mine = plan.stage_of(self.cfg.device_id)
        if current is not None and current.plan.job != job_id:
            if mine is not None:  # the current job goes on; the other job hears why not
                await self._report_error(self.topics.plan(job_id),
                                         f"device is busy with job {current.plan.job}",
                                         job=job_id, plan=plan)
            return
        if (other := self._not_from_coordinator(job_id, plan)) is not None:
            # a well-formed plan someone else published: refused, the job goes on
            await self._report_error(self.topics.plan(job_id), other, job=job_id, plan=plan)
            return
        if mine is None:
            if current is not None:
                await self._leave_job("not in the new plan")
            return
        if current is not None and _same_plan(current.plan, plan):
            return  # republished (a reconnect): the stage goes on
        if (gone := self._coordinator_gone(job_id)) is not None:
            log.warning("not joining plan v%d of job %s: %s", plan.version, job_id, gone)
            return
        if current is not None:
            await self._leave_job(f"re-plan to version {plan.version}")
        await self._join_job(plan)

    async def _join_job(self, plan: Plan) -> None:
        assert self._client is not None
        assert self.profile is not None
        try:
            refusal = await asyncio.to_thread(_building, memory_refusal, plan,
                                              self.cfg.device_id, self.profile.memory_limit_mb,
                                              self.cfg.model_path)
        except Exception as e:  # a model that cannot be sized on the meta device: building
            # it (below) reports what is wrong with it, if anything
            log.warning("cannot size the stage of plan v%d without allocating it (%s: %s); "
                        "its memory is not checked", plan.version, type(e).__name__, e)
            refusal = None
        if refusal is not None:  # before a single weight of the stage is allocated
            await self._report_error(self.topics.plan(plan.job), refusal, job=plan.job,
                                     plan=plan)
            return
        try:
            job = await asyncio.to_thread(_building, _Job, plan, self.cfg.device_id,
                                          self.cfg.threads, self.cfg.slowdown,
                                          self.cfg.model_path)
        except Exception as e:
            await self._report_error(self.topics.plan(plan.job), f"cannot build stage: {e}",
                                     job=plan.job, plan=plan)
            return
        self.job = job
        if self._link is not None:  # the link's counters live as long as the connection
            job.link0 = (self._link.busy_ms, self._link.bytes_by_kind["act"],
                         self._link.bytes_by_kind["grad"])
        job.tracer = trace.attach(  # None unless --trace-steps
            self.cfg.trace_steps, job=plan.job, device=self.cfg.device_id, stage=job.k,
            topic=self.topics.trace(plan.job, self.cfg.device_id), publish=self._publish_msg,
            runner=job.runner, link=self._link, loop=asyncio.get_running_loop())
        t, k = self.topics, job.k
        await self._client.subscribe([(topic, 1) for topic in self._job_topics(job)], timeout=10)
        await self._publish_msg(t.status(self.cfg.device_id),
                                self._status("busy", job=plan.job, stage=k), retain=True)
        self._event(job, Ready, version=plan.version, stage=k)
        log.info("stage %d of job %s: layers [%d, %d), plan v%d", k, plan.job, job.stage.start,
                 job.stage.end, plan.version)

    async def _leave_job(self, why: str) -> None:
        job, self.job = self.job, None
        if job is not None and job.tracer is not None:
            job.tracer.close()  # a later job's sends are not this job's
        if job is None or self._client is None:
            return
        t = self.topics
        try:
            await self._client.unsubscribe(self._job_topics(job), timeout=10)
        except Exception as e:  # stale subscriptions are harmless: _dispatch checks the job
            log.warning("unsubscribe from job %s failed: %s", job.plan.job, e)
        if self.job is None:  # not if a plan was joined meanwhile (the lease ran out as it came)
            await self._publish_msg(t.status(self.cfg.device_id), self._status("online"),
                                    retain=True)
        log.info("left job %s: %s", job.plan.job, why)

    # -- the coordinator's lease -------------------------------------------------------------
    async def _on_coordinator(self, job: str, topic: str, payload: bytes) -> None:
        """A job's coordinator liveness: ``alive`` renews the lease, ``gone`` does not."""
        if not payload:  # cleared: the job ended cleanly (its plan is cleared too)
            self._coordinators.pop(job, None)
            return
        try:
            status = decode(CoordinatorStatus, payload, topic=topic)
        except MessageError as e:  # what was heard before stands
            await self._report_error(topic, f"bad coordinator status: {e.reason}", job=job)
            return
        heard = self._coordinators.get(job)
        now = time.monotonic()
        if heard is None:
            self._coordinators[job] = _Heard(status.state == "alive", now, status.lease_s,
                                             status.owner)
        elif status.state == "alive":
            heard.alive, heard.heard, heard.lease_s = True, now, status.lease_s
            heard.owner = status.owner
        else:
            heard.alive = False

    def _lease(self, heard: _Heard) -> float:
        own = self.cfg.lease
        return heard.lease_s if own is None else min(own, heard.lease_s)

    def _expired(self, heard: _Heard) -> bool:
        """Silent for longer than the lease allows (``wire.liveness.allowed_silence``)."""
        silent = time.monotonic() - heard.heard
        return silent > allowed_silence(self._lease(heard), heard.lease_s)

    def _not_from_coordinator(self, job: str, plan: Plan) -> str | None:
        """Why ``plan`` is not the plan of ``job``'s coordinator (None: it is, or the plan
        or the coordinator names no owner: older versions). The job's liveness names its
        coordinator; a plan of another process is someone else's (a stale or forged one)."""
        heard = self._coordinators.get(job)
        if heard is None or plan.owner is None or plan.owner == heard.owner:
            return None
        return (f"plan v{plan.version} of job {job} comes from {plan.owner}, but the job's "
                f"coordinator is {heard.owner}: not taken")

    def _coordinator_gone(self, job: str) -> str | None:
        """Why ``job``'s coordinator counts as gone (None: alive, or it has no lease)."""
        heard = self._coordinators.get(job)
        if heard is None:
            return None
        if self._expired(heard):
            return (f"its coordinator was not heard alive for "
                    f"{time.monotonic() - heard.heard:.0f}s (lease {self._lease(heard):g}s)")
        if not heard.alive:
            return "its coordinator is gone (its Last Will)"
        return None

    async def _watch_lease(self) -> None:
        """Leave the current job once its coordinator's lease ran out (checked twice a
        second, only while connected: the lease counts while this agent can hear)."""
        while True:
            await asyncio.sleep(0.5)
            job = self.job
            if job is None or self._client is None:
                continue
            heard = self._coordinators.get(job.plan.job)
            if heard is None or not self._expired(heard):
                continue
            try:
                await self._leave_job(f"its coordinator was not heard alive for the lease "
                                      f"({self._lease(heard):g}s)")
            except aiomqtt.MqttError as e:  # the reader reconnects; the lease counts anew
                log.warning("leaving job %s: %s", job.plan.job, e)

    async def _on_sync(self, payload: bytes) -> None:
        job = self.job
        assert job is not None
        topic = self.topics.sync(job.plan.job)
        try:
            cmd = decode(SyncOp, payload, topic=topic)
        except MessageError as e:
            await self._report_error(topic, f"bad sync message: {e.reason}")
            return
        match cmd:
            case SyncWeights(optim=optim):
                await self._send_weights(job, optim=optim)
            case SyncPing():
                self._event(job, Pong, stage=job.k, step=job.step)
            case SyncRewind():
                await self._rewind(job, cmd)

    async def _send_weights(self, job: _Job, optim: bool = False) -> None:
        async with self._compute:  # between two computations: a consistent state
            state = await self._compute_call(job.runner.state_dict, job.stage.start)
            opt = (await self._compute_call(job.runner.optimizer_state, job.stage.start)
                   if optim else {})
            step = job.step
        body = Weights(job=job.plan.job, stage=job.k, step=step, purpose="checkpoint",
                       version=job.plan.version, gen=job.gen, tensors=checkpoint.pack(state),
                       optim=checkpoint.pack(opt) if optim else None)
        assert self._link is not None
        topic = self.topics.weights(job.plan.job, job.k)
        for piece in chunks.split(body, _message_limit(job.plan)):  # below the broker's limit
            self._link.send(topic, piece, "weights")

    async def _rewind(self, job: _Job, cmd: SyncRewind) -> None:
        """Back to the start of step ``cmd.step`` in generation ``cmd.gen``.

        Works from the same step (a half-done step is forgotten) or the next one (the step
        finished here but not everywhere: the saved start-of-step state comes back).
        """
        step, gen = cmd.step, cmd.gen
        async with self._compute:
            snap = job.snapshots.get(step)
            ok = snap is not None
            if ok:
                await self._compute_call(job.runner.restore, snap)
                job.reset(step, gen)
        reason = None if ok else (f"no saved state of step {step} (stage is at step "
                                  f"{job.step}, keeps {sorted(job.snapshots)})")
        log.info("rewind to step %d gen %d: %s", step, gen, "ok" if ok else reason)
        self._event(job, Rewound, stage=job.k, step=step, ok=ok, reason=reason, rewind_gen=gen)

    async def _on_restore(self, topic: str, payload: bytes) -> None:
        """Weights and optimizer state from a checkpoint, sent by the coordinator."""
        job = self.job
        assert job is not None
        try:
            chunk = decode(WeightsChunk, payload, topic=topic)
            if chunk.purpose != "restore":
                return  # our own checkpoint upload echoed back
            body = self._chunks.add(chunk, topic)
        except MessageError as e:
            await self._report_error(topic, f"bad weights message: {e.reason}")
            return
        except chunks.ChunkError as e:
            await self._report_error(topic, f"bad weights message: {e}")
            return
        if body is None:
            return  # more chunks to come
        if body.version != job.plan.version:
            return  # for another plan version
        try:
            step, gen = body.step, body.gen
            weights = checkpoint.unpack(dict(body.tensors))
            optim = checkpoint.unpack(dict(body.optim or {}))
            async with self._compute:
                await self._compute_call(job.runner.load_state_dict, weights, job.stage.start)
                await self._compute_call(job.runner.load_optimizer_state, optim, job.stage.start)
                job.snapshots = {}
                job.reset(step, gen)
                job.snapshots[step] = await self._compute_call(job.runner.snapshot)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            await self._report_error(topic, f"cannot restore stage {job.k}: {e}")
            return
        log.info("stage %d restored to step %d (plan v%d)", job.k, step, job.plan.version)
        self._event(job, Restored, stage=job.k, step=step, version=job.plan.version)

    # -- compute -------------------------------------------------------------------------
    def _pick(self, job: _Job) -> _Work | None:
        """The next work item: 1F1B prefers backwards, and a stage forwards a new training
        micro-batch only while it holds fewer than its bound (``footprint.in_flight``: the
        plan's ``in_flight`` minus the stage index, what the memory model counts); GPipe
        prefers forwards."""
        if job.plan.schedule == "1f1b":
            if job.bwd_q:
                return job.bwd_q.popleft()
            if job.fwd_q and (job.runner.in_flight < job.bound
                              or not _is_training(job.fwd_q[0])):
                return job.fwd_q.popleft()
            return None
        if job.fwd_q:
            return job.fwd_q.popleft()
        if job.bwd_q:
            return job.bwd_q.popleft()
        return None

    async def _worker(self) -> None:
        while True:
            job = self.job
            work = self._pick(job) if job is not None else None
            if work is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            assert job is not None
            try:
                async with self._compute:
                    if self.job is not job:
                        continue  # the job changed while this waited
                    if work.direction == "fwd":
                        await self._forward(job, work)
                    else:
                        await self._backward(job, work)
            except aiomqtt.MqttError as e:
                # the broker went away mid-step; the coordinator rewinds this step
                log.warning("stage %d: lost a message on %s: %s", job.k, work.topic, e)
            except delta.HistoryMismatch as e:
                # the link's two histories are out of step: this step cannot finish, and
                # the coordinator rewinds it at once when it reads ``resync`` (docs/faults.md)
                job.errors += 1
                await self._report_error(work.topic, e.reason, resync=job)
            except (codec.FrameError, StageError, ValueError) as e:
                job.errors += 1
                await self._report_error(work.topic, getattr(e, "reason", str(e)))
            except Exception as e:
                job.errors += 1
                log.exception("stage %d failed on %s", job.k, work.topic)
                await self._report_error(work.topic, f"{type(e).__name__}: {e}")
            await _let_io_run()

    def _check_frame(self, job: _Job, frame: codec.TensorFrame, topic: str, kind: str) -> None:
        if frame.kind != kind:
            raise codec.FrameError(topic, f"expected kind {kind!r} on this topic, got "
                                   f"{frame.kind!r}")
        if frame.job != job.plan.job:
            raise codec.FrameError(topic, f"frame for job {frame.job!r} on job {job.plan.job!r}")
        if frame.extra.get("train", True) and frame.step not in (job.step, job.step + 1):
            raise codec.FrameError(topic, f"frame for step {frame.step} but this stage is at "
                                   f"step {job.step}")

    async def _forward(self, job: _Job, work: _Work) -> None:
        frame = codec.from_bytes(work.payload, work.topic)
        if job.stale(frame):
            log.info("stale frame on %s dropped (plan/rewind changed)", work.topic)
            return
        train = bool(frame.extra.get("train", True))
        if train and frame.step == job.step + 1 and frame.kind == "act":
            job.early.append(work)  # the next step's input: checked when that step starts
            return
        if frame.extra.get(delta.DELTA_KEY, False) and (job.act_rx is None or not train):
            raise codec.FrameError(work.topic, "delta frame on a link that is not delta-coded "
                                   "(or for evaluation): it carries a change, not an activation")
        delta_rx = train and job.act_rx is not None
        # a delta link's frame is decoded against its history once every check has passed
        # (a frame dropped here leaves the history as it was); its shape is checked first
        x = (torch.empty(delta.frame_shape(frame, work.topic), device="meta") if delta_rx
             else codec.decode(frame))
        job.runner.check_input(x)  # the frame's own shape first: the most specific reason
        self._check_frame(job, frame, work.topic, "act")
        labels = frame.labels_tensor()
        extra = {k: frame.extra[k] for k in ("nmb", "bsz", "train", delta.IDS_KEY)
                 if k in frame.extra}
        if not train:
            out = await self._compute_call(job.runner.infer, x)
            if job.last:
                if labels is None or len(labels) != len(out):
                    raise StageError("evaluation frame reached the last stage without labels")
                loss = torch.nn.functional.cross_entropy(out, labels, reduction="sum")
                self._event(job, Eval, step=frame.step, mb=frame.mb,
                            correct=int((out.argmax(1) == labels).sum()), n=len(labels),
                            loss_sum=float(loss))
            else:
                self._send_tensor(job, out, frame, "act", labels, extra)
            return
        nmb, bsz = frame.extra.get("nmb"), frame.extra.get("bsz")
        if not isinstance(nmb, int) or not isinstance(bsz, int) or nmb < 1 or bsz < 1:
            raise codec.FrameError(work.topic, "training frame needs positive int 'nmb' and "
                                   "'bsz' keys")
        if not 0 <= frame.mb < nmb:
            raise codec.FrameError(work.topic, f"mb {frame.mb} out of range for nmb {nmb}")
        if frame.mb in job.fwd_done[frame.step]:  # reported: nothing sends a frame twice
            raise codec.FrameError(work.topic, f"duplicate forward frame: step {frame.step} "
                                   f"mb {frame.mb} was already computed; dropped")
        if train and job.act_tx is not None:  # what the next stage's history is kept by
            delta.unpack_ids(frame, delta.IDS_KEY, work.topic)
        if job.act_rx is not None:  # the activation is its history plus the change
            x = job.act_rx.decode(frame, work.topic)
        key = (frame.step, frame.mb)
        res = await self._compute_call(job.runner.forward, key, x, labels, 1.0 / bsz)
        job.fwd_done[frame.step].add(frame.mb)
        job.nmb = nmb
        if not job.last:
            assert res.out is not None
            self._send_tensor(job, res.out, frame, "act", labels, extra)
            return
        acc = job.results.setdefault(frame.step, [0.0, 0, 0])
        acc[0] += res.loss or 0.0
        acc[1] += res.correct or 0
        acc[2] += res.n
        if job.plan.schedule == "1f1b":
            await self._run_backward(job, key, None)
        else:
            job.deferred.append(key)
            if len(job.fwd_done[frame.step]) == nmb:
                for k in reversed(job.deferred):
                    await self._run_backward(job, k, None)
                job.deferred.clear()

    async def _backward(self, job: _Job, work: _Work) -> None:
        frame = codec.from_bytes(work.payload, work.topic)
        if job.stale(frame):
            log.info("stale frame on %s dropped (plan/rewind changed)", work.topic)
            return
        self._check_frame(job, frame, work.topic, "grad")
        if frame.step != job.step:
            raise codec.FrameError(work.topic, f"gradient for step {frame.step} but this stage "
                                   f"is at step {job.step}")
        if frame.mb in job.bwd_done[frame.step]:  # reported: nothing sends a frame twice
            raise codec.FrameError(work.topic, f"duplicate gradient frame: step {frame.step} "
                                   f"mb {frame.mb} was already computed; dropped")
        g = codec.decode(frame)
        await self._run_backward(job, (frame.step, frame.mb), g)

    async def _run_backward(self, job: _Job, key: tuple[int, int], g: torch.Tensor | None) -> None:
        step, mb = key
        gin = await self._compute_call(job.runner.backward, key, g)
        job.bwd_done[step].add(mb)
        if gin is not None and job.k > 0:
            fake = codec.TensorFrame(job.plan.job, step, mb, "grad", (), 32, "raw", None, 0.0,
                                     0.0, b"")
            self._send_tensor(job, gin, fake, "grad", None, {})
        if len(job.bwd_done[step]) == job.nmb:
            await self._finish_step(job, step)

    async def _finish_step(self, job: _Job, step: int) -> None:
        await self._compute_call(job.runner.step, step)  # the lr schedule's clock
        job.step = step + 1
        if job.early:  # the next step's inputs that came early go first
            job.fwd_q.extendleft(reversed(job.early))
            job.early.clear()
            self._wake.set()
        job.fwd_done.pop(step, None)
        job.bwd_done.pop(step, None)
        # the state at the start of the new step; the previous one is kept for a rewind, an
        # older one is overwritten (no allocation per step)
        older = [s for s in job.snapshots if s < step]
        recycled = job.snapshots.pop(older[0]) if older else None
        job.snapshots = {s: v for s, v in job.snapshots.items() if s >= step}
        job.snapshots[step + 1] = await self._compute_call(job.runner.snapshot, recycled)
        assert self._link is not None
        link = self._link
        result = job.results.pop(step, None) if job.last else None
        self._event(
            job, Stepped, step=step, stage=job.k, busy_ms=round(job.runner.stats.busy_ms, 3),
            send_ms=round(link.busy_ms - job.link0[0], 3),  # since this job began here
            bytes_act=link.bytes_by_kind["act"] - job.link0[1],
            bytes_grad=link.bytes_by_kind["grad"] - job.link0[2], mbs=job.nmb,
            loss=None if result is None else result[0],
            correct=None if result is None else int(result[1]),
            n=None if result is None else int(result[2]))
        if self.cfg.timing_every and step % self.cfg.timing_every == 0:
            samples = _aggregate(job.runner.drain_timings())
            topic = self.topics.timing(job.plan.job, self.cfg.device_id)
            for part in _fitting(samples, _message_limit(job.plan)):  # grows with the stage
                self._publish_soon(topic, part, qos=0)

    def _send_tensor(self, job: _Job, t: torch.Tensor, src: codec.TensorFrame, kind: str,
                     labels: torch.Tensor | None, extra: dict[str, Any]) -> None:
        bits = job.next_bits if kind == "act" else job.prev_bits
        grad = kind == "grad"
        train = bool(extra.get("train", True))
        if not grad and not train and job.act_tx is not None:
            # an evaluation frame has no history to be a change of: it goes plain, and not
            # at the 2 bits only a change survives (wire/delta.py, PLAIN_BITS)
            bits = max(bits, delta.PLAIN_BITS)
        kw: dict[str, Any] = dict(
            bits=bits, job=job.plan.job, step=src.step, mb=src.mb, kind=kind, labels=labels,
            stochastic=grad and job.plan.stochastic_grad_rounding,
            seed=_frame_seed(job.plan.seed, src.step, src.mb, job.k),
            zero=grad and job.plan.grad_scheme == "minmax0", extra=extra,
            axis=None if grad else codec.channel_axis(t.shape, bits, job.plan.act_per_channel),
        )
        if grad and job.grad_ef is not None:
            frame = job.grad_ef.encode(t, slot=src.mb, **kw)
        elif not grad and train and job.act_tx is not None:  # evaluation: never delta-coded
            ids = delta.unpack_ids(src, delta.IDS_KEY, self.topics.fwd(job.plan.job, job.k))
            frame = job.act_tx.encode(t, ids, **kw)  # sets ``ids`` (and ``delta``/``base``)
        else:
            frame = codec.encode(t, **kw)
        frame.extra.update(pv=job.plan.version, gen=job.gen)
        k = job.k + 1 if kind == "act" else job.k - 1
        topic = (self.topics.fwd if kind == "act" else self.topics.bwd)(job.plan.job, k)
        assert self._link is not None
        self._link.send(topic, codec.to_bytes(frame), kind, tag=(src.step, src.mb))

    # -- reporting -----------------------------------------------------------------------
    def _event(self, job: _Job, kind: type[Event], **fields: Any) -> None:
        """Publish a ``kind`` event of ``job``, stamped with this device, the time, and the
        plan version and rewind generation of ``job`` -- the job whose compute produced the
        event, which is not always the agent's current one: a plan can replace the job while
        a work item computes in a worker thread, and the old work's ``stepped`` stamped with
        the new plan would be taken as current. Sent without waiting for its PUBACK."""
        if self._client is None:
            return
        ev = kind(device=self.cfg.device_id, time=time.time(), pv=job.plan.version, gen=job.gen,
                  **fields)
        self._publish_soon(self.topics.events(job.plan.job, self.cfg.device_id), ev)

    async def _report_error(self, topic: str, reason: str, job: str | None = None,
                            plan: Plan | None = None, resync: _Job | None = None) -> None:
        """Log and publish on the job's metrics topic why a message was rejected; ``plan``:
        the plan refused (its version and owner say which plan the refusal is about);
        ``resync``: the stage whose delta history did not match (its plan version and rewind
        generation go with the error, so the coordinator rewinds only a current mismatch)."""
        log.error("rejected message on %s: %s", topic, reason)
        err = Error(device=self.cfg.device_id, topic=topic, reason=reason, time=time.time(),
                    plan_version=None if plan is None else plan.version,
                    plan_owner=None if plan is None else plan.owner,
                    resync=None if resync is None else True,
                    pv=None if resync is None else resync.plan.version,
                    gen=None if resync is None else resync.gen)
        self.errors.append(err)
        job_id = job or (self.job.plan.job if self.job else None)
        if job_id is None or self._client is None:
            return
        with contextlib.suppress(Exception):
            await self._publish_msg(self.topics.metrics(job_id), err)


def stage_in_flight(plan: Plan, index: int) -> int:
    """Training micro-batches stage ``index`` of ``plan`` may hold at once: the bound the stage
    enforces (``Agent._pick``) and the stash its memory check counts (``memory_refusal``)."""
    return footprint.in_flight(plan.schedule, plan.micro_batches,
                               len(plan.stages) - 1 - index, plan.deeper())


def _same_plan(a: Plan, b: Plan) -> bool:
    """The same plan: same version from the same coordinator. A resumed coordinator (another
    owner) may publish the version a dead one left the agents running: that is a new plan."""
    return a.version == b.version and a.owner == b.owner


def _live_instance(payload: bytes) -> str | None:
    """The agent a retained device status names as live (None: offline, or unreadable)."""
    try:
        status = decode(DeviceStatus, payload)
    except MessageError:
        return None
    if status.state == "offline":
        return None
    return status.instance or "an agent of an older version"


def memory_refusal(plan: Plan, device: str, limit_mb: float | None,
                   model_path: tuple[str, ...] = ()) -> str | None:
    """Why ``device`` cannot hold its stage of ``plan`` within ``limit_mb`` (None: it fits,
    or the plan carries no batch size to size it by). The model is built on torch's meta
    device: shapes only, no weight is allocated."""
    stage = plan.stage_of(device)
    if stage is None or limit_mb is None or plan.batch_size is None:
        return None
    with torch.device("meta"):
        descs = describe(build_model(plan.model, seed=plan.seed, model_path=model_path,
                                     **plan.model_args))
    mb = -(-plan.batch_size // plan.micro_batches)  # the largest micro-batch
    mine = descs[stage.start:stage.end]
    last = stage.index == len(plan.stages) - 1
    fed = stage.index > 0 and plan.stages[stage.index - 1].act_delta  # delta-coded links
    fp = footprint.stage_footprint(
        [d.params for d in mine], mine[0].in_elems * mb, [d.out_elems * mb for d in mine],
        in_flight=stage_in_flight(plan, stage.index),
        micro_batches=plan.micro_batches, optimizer_slots=footprint.optimizer_slots(
            plan.optimizer), first=stage.index == 0, last=last,
        train_samples=plan.train_samples or 0, delta_in_elems=mine[0].in_elems * fed,
        delta_out_elems=mine[-1].out_elems * stage.act_delta,
        grad_feedback=stage.grad_feedback)
    limit = limit_mb * 2**20
    if fp.total <= limit:
        return None
    big = mine[fp.largest_layer()]
    return (f"stage {stage.index} (layers [{stage.start}, {stage.end}) of {plan.model}) does "
            f"not fit this device's memory limit of {limit:.0f} bytes ({limit_mb:.3f} MiB): "
            f"training it needs {fp.text()}; the largest part is layer {big.index} "
            f"({big.type}, {fp.per_layer[fp.largest_layer()]:.0f} bytes). Plan over more "
            "devices, fewer micro-batches, a smaller batch or --in-flight, or raise "
            "--memory-limit")


async def _let_io_run() -> None:
    """Give the loop the turn it needs to put on the socket what a work item queued.

    Computing inline never suspends, so without this a frame queued by one work item would
    leave only when the stage runs out of work. One turn: the uplink starts the frame's
    publish at once (``Link.send``) and the client writes it when it is made
    (``wire.mqtt.Client``), so the publish task's first step, on this turn, puts it on the
    socket. Received messages are read on the same turn. Before both, it took three turns,
    each one more zero-timeout poll."""
    await asyncio.sleep(0)


def _is_training(work: _Work) -> bool:
    """A forward frame of a training step (evaluation frames are not bounded by 1F1B)."""
    try:
        return bool(codec.from_bytes(work.payload, work.topic).extra.get("train", True))
    except codec.FrameError:
        return True  # it fails in _forward, where it is reported


def _building(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, a stage build, under the zoo's build lock. torch.fx patches
    ``nn.Module.__call__`` for the whole process while it traces a user's model, so while one
    agent traces, another agent of the same process (in-process agents, as in the tests) must
    not run a module: sizing, describing and chain-checking a model all do (seen: three
    in-process agents joining a job at once, one refused it with "module is not installed as
    a submodule", twice in two full test runs)."""
    with BUILD_LOCK:
        return fn(*args)


def _message_limit(plan: Plan) -> int:
    """The largest payload to publish in this plan's job (plans of earlier versions: the
    default)."""
    return plan.max_message_bytes or chunks.DEFAULT_MAX_MESSAGE_BYTES


def _fitting(samples: list[TimingSample], limit: int) -> list[list[TimingSample]]:
    """``samples`` as lists that each encode to at most ``limit`` bytes (halved until they
    do; a single sample is a few hundred bytes, far below any limit a chunk allows)."""
    if len(samples) <= 1 or len(encode(samples)) <= limit:
        return [samples]
    half = len(samples) // 2
    return _fitting(samples[:half], limit) + _fitting(samples[half:], limit)


def _frame_seed(seed: int, step: int, mb: int, stage: int) -> int:
    """Stochastic-rounding seed of one frame: fixed by the run's seed, never by time."""
    return (seed * 1_000_003 + step * 10_007 + mb * 101 + stage) % 2**32


def _aggregate(samples: list[dict[str, Any]]) -> list[TimingSample]:
    """Mean ms per (layer, direction, batch) over one step's micro-batches."""
    acc: dict[tuple[int, str, int], list[dict[str, Any]]] = defaultdict(list)
    for s in samples:
        acc[(s["layer"]["index"], s["dir"], s["batch"])].append(s)
    return [TimingSample(layer=LayerInfo(**g[0]["layer"]), dir=g[0]["dir"], batch=g[0]["batch"],
                         threads=g[0]["threads"], n=len(g),
                         ms=round(sum(x["ms"] for x in g) / len(g), 4)) for g in acc.values()]
