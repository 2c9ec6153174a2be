"""The coordinator's MQTT session: connection, reconnect, and routing of what arrives.

Guarantees:

* ``Session`` is the only part of the coordinator that parses payloads: every message on a
  subscribed topic is decoded with the message vocabulary (``wire.messages``) and handed, typed,
  to one method of the ``Inbox``. A payload that does not decode goes to
  ``Inbox.on_bad_message`` (a control command's to ``Inbox.on_control``, which answers it), and
  an inbox method that raises is logged: one message never stops the reader. A stage's
  weights arrive in chunks (``wire.chunks``): the inbox gets each whole, checked ``Weights``
  once; a chunk that does not fit its transfer goes to ``on_bad_message``.
* A clean session: what matters after a reconnect is re-synchronised explicitly (plan
  re-published, stages rewound, docs/faults.md), so nothing depends on the broker having kept
  queues. ``reconnect`` retries for ``reconnect_timeout`` seconds, then raises
  ``CoordinatorError``.
* ``publish`` raises ``BrokerLost`` when the connection is gone; ``soon``/``emit`` publish in
  the background, where a broker hiccup is not an error. A lost connection is reported once,
  as ``Inbox.on_disconnected``.
* With ``delay_s`` (an emulated one-way latency), every ``publish`` leaves that much later
  through a delay line: concurrent publishes stay in flight and keep their order.
* Liveness (docs/faults.md): every connect publishes the retained ``CoordinatorStatus``
  ``alive`` on ``{root}/jobs/{job}/coordinator``, renewed every ``lease / 3`` seconds; its
  Last Will says ``gone``. Agents leave a job whose coordinator they have not heard alive for
  ``lease`` seconds. The session answers twin probes on ``{root}/jobs/{job}/probe``.
* Twins: before each connect (the first and every reconnect) ``wire.liveness.live_holder``
  asks whether another live coordinator holds the job; if one answers, ``connect`` raises
  ``CoordinatorError`` naming it, and that coordinator's session is never touched.
* ``close`` (on normal exit, error or cancel) clears the retained plan, so agents go back to
  idle, then the liveness, and then disconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, Literal, Protocol

import aiomqtt
import msgspec

from accept_mqtt.wire.aio import DelayLine, cancel_and_wait, retry
from accept_mqtt.wire.broker_url import BrokerUrl
from accept_mqtt.wire.chunks import ChunkError, Reassembler
from accept_mqtt.wire.liveness import RENEWALS_PER_LEASE, instance_id, live_holder
from accept_mqtt.wire.messages import (
    ControlCommand,
    CoordinatorStatus,
    DeviceProfile,
    DeviceStatus,
    Error,
    Event,
    MessageError,
    Metric,
    Probe,
    TimingSample,
    Weights,
    WeightsChunk,
    decode,
    encode,
    peek_request_id,
)
from accept_mqtt.wire.topics import Topics

from .errors import BrokerLost, CoordinatorError

log = logging.getLogger("accept_mqtt.coordinator")


class Inbox(Protocol):
    """What the session delivers, one typed message per call (called in the reader task)."""

    def on_status(self, device: str, status: DeviceStatus | None) -> None:
        """A device's retained status; None: the retained status was cleared."""

    def on_profile(self, device: str, profile: DeviceProfile | None) -> None: ...

    def on_event(self, event: Event) -> None: ...

    def on_error_metric(self, error: Error) -> None:
        """An ``error`` on the job's metrics topic (other metrics are not for us)."""

    def on_control(self, command: ControlCommand | MessageError,
                   request_id: str | None = None) -> None:
        """A user's command, or why it was rejected (and the rejected one's ``request_id``)."""

    def on_timing(self, device: str, samples: list[TimingSample]) -> None: ...

    def on_weights(self, weights: Weights) -> None: ...

    def on_bad_message(self, error: MessageError) -> None:
        """A payload that is not the message its topic carries."""

    def on_disconnected(self, reason: str) -> None: ...


class Session:
    """The aiomqtt client of one job's coordinator (see the module docstring)."""

    def __init__(self, url: BrokerUrl, topics: Topics, job: str, inbox: Inbox, *,
                 reconnect_timeout: float, lease: float = 60.0,
                 say: Callable[[str], None] = lambda msg: None, delay_s: float = 0.0) -> None:
        self.url = url
        self.topics = topics
        self.job = job
        self.inbox = inbox
        self.reconnect_timeout = reconnect_timeout
        self.say = say
        self._client: aiomqtt.Client | None = None
        self._reader: asyncio.Task[None] | None = None
        self._bg: set[asyncio.Task[Any]] = set()
        self._distrusted = False
        self._delay = DelayLine(delay_s)
        self._chunks = Reassembler()  # stages' weights arrive in chunks (wire/chunks.py)
        self.lease = lease
        self.owner = instance_id()  # this process, as the liveness names it
        self._renewer: asyncio.Task[None] | None = None

    # -- connection ----------------------------------------------------------------------
    async def connect(self) -> None:
        """Check for a twin, connect, subscribe, announce liveness and start the reader
        (first time and after a lost broker)."""
        t, j = self.topics, self.job
        twin = await live_holder(self.url, liveness_topic=t.coordinator(j),
                                 probe_topic=t.job_probe(j), me=self.owner,
                                 holder_of=_live_owner)
        if twin is not None:
            raise CoordinatorError(
                f"job {j} already has a live coordinator ({twin}) on {self.url}: one job, one "
                "coordinator. Stop that one first, or start this one with another --job")
        client = aiomqtt.Client(**self.url.client_kwargs(),
                                identifier=f"accept-coord-{self.job}",
                                will=aiomqtt.Will(t.coordinator(j),
                                                  self._liveness("gone", "connection lost"),
                                                  qos=1, retain=True),
                                keepalive=10, max_inflight_messages=100)
        await client.__aenter__()
        self._client = client
        for topic in (t.all_status, t.all_profiles, f"{t.job(j)}/events/+", t.metrics(j),
                      t.control(j), f"{t.job(j)}/timing/+", f"{t.job(j)}/weights/+",
                      t.job_probe(j)):
            await client.subscribe(topic, qos=1)
        await client.publish(t.coordinator(j), self._liveness("alive"), qos=1, retain=True)
        self._reader = asyncio.create_task(self._read(), name="coordinator-reader")
        self._renewer = asyncio.create_task(self._renew(client), name="coordinator-liveness")

    def _liveness(self, state: Literal["alive", "gone"], reason: str | None = None) -> bytes:
        return encode(CoordinatorStatus(state=state, job=self.job, owner=self.owner,
                                        time=time.time(), lease_s=self.lease, reason=reason))

    async def _renew(self, client: aiomqtt.Client) -> None:
        """Renew the retained ``alive`` every lease / 3 s (agents count the lease from the
        last one they heard); a failure is the reader's to notice."""
        with contextlib.suppress(aiomqtt.MqttError):
            while True:
                await asyncio.sleep(self.lease / RENEWALS_PER_LEASE)
                await client.publish(self.topics.coordinator(self.job), self._liveness("alive"),
                                     qos=1, retain=True)

    async def reconnect(self) -> None:
        """Drop the connection and retry the broker for ``reconnect_timeout`` seconds."""
        await cancel_and_wait(self._reader, self._renewer)
        old, self._client = self._client, None
        if old is not None:
            with contextlib.suppress(Exception):
                await old.__aexit__(None, None, None)

        def say(e: BaseException, delay: float) -> None:
            self.say(f"broker unreachable ({e}); retrying")

        try:
            await retry(self.connect, self.reconnect_timeout, aiomqtt.MqttError, say)
        except aiomqtt.MqttError as e:
            raise CoordinatorError(f"broker {self.url} unreachable for "
                                   f"{self.reconnect_timeout:.0f}s: {e}") from None
        self._distrusted = False

    @property
    def alive(self) -> bool:
        """Connected, and the reader is still receiving."""
        return self._client is not None and self._reader is not None and not self._reader.done()

    @property
    def trusted(self) -> bool:
        """Alive, and nothing since the last connect said the connection is broken."""
        return self.alive and not self._distrusted

    def distrust(self) -> None:
        """A publish failed: reconnect before relying on the connection again (a publish on a
        dead connection fails without yielding, before the reader notices)."""
        self._distrusted = True

    async def close(self) -> None:
        await cancel_and_wait(*self._bg)
        if self._client is not None:
            with contextlib.suppress(Exception):
                # clearing the retained plan tells every agent that the job is over
                await self._client.publish(self.topics.plan(self.job), b"", qos=1, retain=True,
                                           timeout=5)
        await cancel_and_wait(self._renewer)
        if self._client is not None:
            with contextlib.suppress(Exception):
                # a clean goodbye: no liveness left behind (the Will only fires on a crash)
                await self._client.publish(self.topics.coordinator(self.job), b"", qos=1,
                                           retain=True, timeout=5)
        await cancel_and_wait(self._reader)
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.__aexit__(None, None, None)
        self._client = None

    # -- outgoing ------------------------------------------------------------------------
    async def publish(self, topic: str, payload: bytes | str, qos: int = 1,
                      retain: bool = False) -> None:
        await self._delay.wait()
        if self._client is None:
            raise BrokerLost("not connected to the broker")
        try:
            await self._client.publish(topic, payload, qos=qos, retain=retain)
        except aiomqtt.MqttError as e:
            raise BrokerLost(f"publish to {topic} failed: {e}") from e

    async def metric(self, msg: Metric, qos: int = 0) -> None:
        """Publish a metrics message of this job, stamped with the job and the time now."""
        msg = msgspec.structs.replace(msg, job=self.job, time=time.time())
        await self.publish(self.topics.metrics(self.job), encode(msg), qos=qos)

    def soon(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a publish in the background; a broker hiccup there is not an error."""
        async def guarded() -> None:
            with contextlib.suppress(aiomqtt.MqttError, BrokerLost):
                await coro
        task = asyncio.get_running_loop().create_task(guarded())
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    def emit(self, msg: Metric) -> None:
        """``metric`` in the background."""
        self.soon(self.metric(msg))

    def reply(self, msg: Metric) -> None:
        """``metric`` in the background at QoS 1: the answer to a control command, which its
        sender waits for (a lost one would look like a job that does not answer)."""
        self.soon(self.metric(msg, qos=1))

    # -- incoming ------------------------------------------------------------------------
    async def _read(self) -> None:
        assert self._client is not None
        try:
            async for msg in self._client.messages:
                topic = msg.topic.value
                payload = bytes(msg.payload or b"")
                try:
                    self._route(topic, payload)
                except MessageError as e:
                    log.warning("%s", e)
                    self.inbox.on_bad_message(e)
                except Exception as e:  # never let one message kill the reader
                    log.warning("ignored message on %s: %s", topic, e)
        except aiomqtt.MqttError as e:
            log.warning("connection to %s lost: %s", self.url, e)
            self.inbox.on_disconnected(str(e))

    def _route(self, topic: str, payload: bytes) -> None:
        """Decode ``payload`` as what ``topic`` carries and hand it to the inbox."""
        inbox = self.inbox
        dev = self.topics.parse_device(topic)
        if dev is not None:
            kind = topic.rsplit("/", 1)[1]
            if kind == "status":
                inbox.on_status(dev, decode(DeviceStatus, payload, topic=topic)
                                if payload else None)
            elif kind == "profile":
                inbox.on_profile(dev, decode(DeviceProfile, payload, topic=topic)
                                 if payload else None)
            return
        tail = self.topics.parse_tail(topic, self.job)
        if not tail:
            return
        match tail[0]:
            case "events":
                inbox.on_event(decode(Event, payload, topic=topic))
            case "metrics":
                m = decode(Metric, payload, topic=topic)
                if isinstance(m, Error):
                    inbox.on_error_metric(m)
            case "control":
                try:
                    cmd: ControlCommand | MessageError = decode(ControlCommand, payload,
                                                                topic=topic)
                except MessageError as e:
                    inbox.on_control(e, peek_request_id(payload))
                    return
                inbox.on_control(cmd)
            case "timing" if len(tail) > 1:
                inbox.on_timing(tail[1], decode(list[TimingSample], payload, topic=topic))
            case "weights":
                chunk = decode(WeightsChunk, payload, topic=topic)
                if chunk.purpose == "restore":
                    return  # our own restore, echoed: never reassembled
                try:
                    whole = self._chunks.add(chunk, topic)
                except ChunkError as e:
                    raise MessageError(str(e), topic) from None
                if whole is not None:
                    inbox.on_weights(whole)
            case "probe":  # a would-be twin asks whether this job's coordinator is alive
                probe = decode(Probe, payload, topic=topic)
                if not probe.answer:
                    answer = Probe(nonce=probe.nonce, answer=True, holder=self.owner)
                    self.soon(self.publish(topic, encode(answer)))


def _live_owner(payload: bytes) -> str | None:
    """The coordinator a retained liveness names as alive (None: gone, or unreadable)."""
    try:
        status = decode(CoordinatorStatus, payload)
    except MessageError:
        return None
    return status.owner if status.state == "alive" else None
