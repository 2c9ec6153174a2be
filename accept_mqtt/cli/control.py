"""``accept-mqtt control JOB CMD``: send a control command to a running job and show the reply.

The same JSON works from a shell: ``mosquitto_pub -t accept/jobs/JOB/control -m '{"cmd":"pause"}'``.
The coordinator answers on ``accept/jobs/JOB/metrics`` (QoS 1) with ``{"type": "status", ...}``,
or ``{"type": "error", ...}`` for a command it refuses (nothing changes then).

Each command goes out with a fresh ``request_id``, and only a reply carrying it is taken for
the answer: another user's command, its refusal, or an agent's error on the same topic are not.
A coordinator from before request ids refuses the unknown key; the command is then sent again
without one and answered the old way (a ``status`` naming the command, or an ``error`` about
the control topic).

The command is a ``messages.ControlCommand`` and is checked here exactly as the coordinator
checks it (decoded from its own JSON), so a bad one fails at once, before any network.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from typing import Any

import aiomqtt
import msgspec

from accept_mqtt.wire import messages
from accept_mqtt.wire.broker_url import BrokerUrlError, parse_broker_url
from accept_mqtt.wire.messages import CONTROL_COMMANDS, ControlCommand, Error, JobStatus, Metric
from accept_mqtt.wire.topics import TopicError, Topics, check_id


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", help="job id")
    p.add_argument("cmd", help=f"one of: {', '.join(CONTROL_COMMANDS)}")
    p.add_argument("--broker", default="mqtt://127.0.0.1:1883")
    p.add_argument("--root", default="accept")
    p.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra fields, e.g. --arg act_bits=4 for 'set'")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for a reply")


def command(cmd: str, args: list[str], request_id: str | None = None) -> ControlCommand:
    """The ``ControlCommand`` of ``cmd`` and ``--arg KEY=VALUE`` strings (values as JSON when
    they parse: numbers, true/false, lists; else the plain string), with ``request_id``
    unless ``--arg request_id=...`` names one.

    Raises ``ValueError`` for a malformed ``--arg`` and ``messages.MessageError`` (a
    ``ValueError`` too) for a command the coordinator would refuse: unknown command or key,
    wrong type, ``set`` without bits.
    """
    body: dict[str, Any] = {"cmd": cmd}
    for kv in args:
        k, sep, v = kv.partition("=")
        if not sep or not k:
            raise ValueError(f"--arg {kv!r} must be KEY=VALUE")
        try:
            body[k] = json.loads(v)
        except ValueError:
            body[k] = v  # a plain word stays a string
    if request_id is not None:
        body.setdefault("request_id", request_id)
    # Decoding the command's own JSON, rather than ``ControlCommand(**body)``, applies every
    # check the receiving side applies (unknown keys, field types, not only __post_init__).
    return messages.decode(ControlCommand, messages.encode(body))


def _reply(payload: bytes, cmd: ControlCommand, control_topic: str) -> JobStatus | Error | None:
    """The coordinator's answer to ``cmd`` if ``payload`` is one, else None.

    With a ``request_id``: only a ``status`` or an ``error`` carrying it, or an older
    coordinator's refusal of the ``request_id`` key itself (``_OLD``). Without one (the old
    way): a ``status`` for this command (older coordinators do not name it), or an ``error``
    about a control message. Other metrics and payloads that do not decode are not the
    answer."""
    try:
        m = messages.decode(Metric, payload)
    except messages.MessageError:
        return None
    if not isinstance(m, JobStatus | Error):
        return None
    if cmd.request_id is not None:
        if m.request_id == cmd.request_id:
            return m
        if (isinstance(m, Error) and m.request_id is None and m.topic == control_topic
                and "request_id" in m.reason):
            return _OLD
        return None
    if isinstance(m, JobStatus) and m.command in (None, cmd.cmd):
        return m
    if isinstance(m, Error) and m.topic == control_topic:
        return m
    return None


# marks an older coordinator's refusal of the ``request_id`` key (see the module docstring)
_OLD = Error(device="coordinator", topic="", reason="request ids not supported")


async def send(broker: str, root: str, job: str, cmd: ControlCommand,
               timeout: float) -> JobStatus | Error | None:
    """Publish ``cmd`` to the job's control topic and wait up to ``timeout`` seconds for the
    reply (None without one)."""
    t = Topics(root)
    u = parse_broker_url(broker)
    async with aiomqtt.Client(**u.client_kwargs()) as c:
        await c.subscribe(t.metrics(job), qos=1)  # before publishing, not to miss the reply
        try:
            async with asyncio.timeout(timeout):
                while True:
                    # unset fields are left out (``omit_defaults``): {"cmd": "set", ...}
                    await c.publish(t.control(job), messages.encode(cmd), qos=1)
                    reply = None
                    async for msg in c.messages:
                        reply = _reply(bytes(msg.payload or b""), cmd, t.control(job))
                        if reply is not None:
                            break
                    if reply is not _OLD:
                        return reply
                    cmd = msgspec.structs.replace(cmd, request_id=None)  # the old way
        except TimeoutError:
            return None
    return None


def run(args: argparse.Namespace) -> int:
    try:
        check_id("job", args.job)
        Topics(args.root)
        url = str(parse_broker_url(args.broker))
        cmd = command(args.cmd, args.arg, uuid.uuid4().hex[:16])
    except messages.MessageError as e:
        print(f"accept-mqtt control: {e.reason}", file=sys.stderr)
        return 2
    except (TopicError, BrokerUrlError, ValueError) as e:
        print(f"accept-mqtt control: {e}", file=sys.stderr)
        return 2
    try:
        reply = asyncio.run(send(args.broker, args.root, args.job, cmd, args.timeout))
    except aiomqtt.MqttError as e:
        print(f"accept-mqtt control: cannot reach the broker at {url}: {e}", file=sys.stderr)
        return 2
    except BrokerUrlError as e:  # e.g. an unreadable CA file for mqtts://
        print(f"accept-mqtt control: {e}", file=sys.stderr)
        return 2
    if reply is None:
        print(f"no reply from job {args.job} within {args.timeout:.0f}s (is it running?)",
              file=sys.stderr)
        return 1
    print(json.dumps(messages.to_builtins(reply), indent=2))
    return 1 if isinstance(reply, Error) else 0
