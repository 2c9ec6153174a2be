"""Twin checks: is another live process holding this device id or this job's coordinator?

A device agent (MQTT client id ``accept-agent-{device}``) and a job's coordinator
(``accept-coord-{job}``) use fixed client ids, so the broker lets one process hold each: a
second process's CONNECT takes the session over before it could read anything, and the first
takes it back when it reconnects, for ever. So before it takes its session, each process asks
``live_holder``:

1. a short probe connection with a unique client id subscribes to the id's retained liveness
   (the device's ``DeviceStatus``, the job's ``CoordinatorStatus``, both with a Last Will) and
   to the id's probe topic, and publishes a question (``Probe``) there;
2. the question's own echo comes back after any retained message (one connection, one
   order), so when it arrives the retained liveness is known: when it does not name another
   live process, the id is free, at once;
3. when it does, the holder is asked: a live holder is subscribed to its probe topic and
   answers. An answer within ``wait`` seconds is a live twin: the caller refuses to start and
   the holder is not disturbed. No answer: the holder died and the broker has not fired its
   Will yet (a hung process, a crash the broker has not noticed): the id is free.

The remaining window: two processes whose probes both finish before either has published its
liveness (the tens of milliseconds between a probe and the first publish) both go ahead, and
the first to connect is taken over. When it reconnects it runs ``live_holder`` again, finds
the other's liveness naming another process, which answers, and stops with the same error:
the loop ends after one round, and the process that stays is the later one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable

import aiomqtt

from .broker_url import BrokerUrl
from .messages import MessageError, Probe, decode, encode

# A coordinator renews its liveness this many times per lease, so an agent that allows the
# lease plus one renewal interval of silence holds a job for at least the lease after its
# coordinator's last word (``allowed_silence``).
RENEWALS_PER_LEASE = 3

# How long a holder named by the retained liveness has to answer. A live agent or coordinator
# serves its connection between work items (it must, to keep its MQTT keepalive), so a
# couple of seconds is plenty; the wait is paid only when the liveness names another process.
PROBE_WAIT = 3.0
# How long the question's echo may take before the check is given up (see ``live_holder``).
ECHO_WAIT = 5.0

log = logging.getLogger("accept_mqtt.liveness")


def allowed_silence(lease: float, announced: float) -> float:
    """Seconds an agent keeps a job without hearing its coordinator: ``lease`` (the shorter
    of the coordinator's ``announced`` lease and the agent's own) plus one renewal interval,
    so a crashed coordinator's agents leave between ``lease`` and ``lease + announced / 3``
    after the crash."""
    return lease + announced / RENEWALS_PER_LEASE


def instance_id() -> str:
    """This process, as liveness messages name it: ``host:pid:random``."""
    return f"{socket.gethostname().split('.')[0]}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


async def live_holder(url: BrokerUrl, *, liveness_topic: str, probe_topic: str, me: str,
                      holder_of: Callable[[bytes], str | None], wait: float = PROBE_WAIT,
                      timeout: float = ECHO_WAIT) -> str | None:
    """The live process other than ``me`` that holds the id (its answer), else None.

    ``holder_of(payload)`` reads the retained liveness: the process it names as live, or None
    (empty, offline, gone). Raises ``aiomqtt.MqttError`` if the broker cannot be reached. A
    question that never echoes (a broker ACL written before the probe topics existed drops it
    silently, docs/security.md) skips the check with a warning after ``timeout`` seconds:
    refusing to start would lock every process out of such a fleet.
    """
    nonce = uuid.uuid4().hex
    named: str | None = None
    asked_at: float | None = None  # when our question's echo came back
    client_id = f"accept-probe-{nonce[:10]}"  # 23 characters: MQTT 3.1.1's safe maximum
    async with aiomqtt.Client(**url.client_kwargs(), identifier=client_id,
                              keepalive=10) as client:
        await client.subscribe(liveness_topic, qos=1)
        await client.subscribe(probe_topic, qos=1)
        await client.publish(probe_topic, encode(Probe(nonce=nonce)), qos=1)
        messages = aiter(client.messages)  # one iterator: anext keeps its place
        deadline = time.monotonic() + timeout
        while True:
            until = deadline if asked_at is None else asked_at + wait
            try:
                msg = await asyncio.wait_for(anext(messages), max(0.0, until - time.monotonic()))
            except TimeoutError:
                if asked_at is None:
                    log.warning("twin check skipped: no echo of the probe on %s in %.0fs (does "
                                "the broker's ACL allow it? docs/security.md)", probe_topic,
                                timeout)
                return None  # (or: named, but nobody answered: a dead holder)
            payload = bytes(msg.payload or b"")
            if msg.topic.value == liveness_topic:
                holder = holder_of(payload) if payload else None
                named = holder if holder != me else None
                continue
            try:
                probe = decode(Probe, payload, topic=probe_topic)
            except MessageError:
                continue  # not ours to judge; the holder reports bad probes
            if probe.nonce != nonce:
                continue  # somebody else's probe
            if probe.answer:
                return probe.holder or "an unnamed process"
            asked_at = time.monotonic()
            if named is None:
                return None

