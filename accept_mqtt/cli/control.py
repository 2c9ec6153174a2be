"""``accept-mqtt control JOB CMD``: send a control command to a running job and show the reply.

The same JSON works from a shell: ``mosquitto_pub -t accept/jobs/JOB/control -m '{"cmd":"pause"}'``.
The coordinator answers on ``accept/jobs/JOB/metrics`` with ``{"type": "status", ...}``, or
``{"type": "error", ...}`` for a command it refuses (nothing changes then).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

import aiomqtt

from accept_mqtt.wire.broker_url import parse_broker_url
from accept_mqtt.wire.topics import TopicError, Topics, check_id

COMMANDS = ("start", "pause", "resume", "stop", "status", "repartition", "set")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", help="job id")
    p.add_argument("cmd", help=f"one of: {', '.join(COMMANDS)}")
    p.add_argument("--broker", default="mqtt://127.0.0.1:1883")
    p.add_argument("--root", default="accept")
    p.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra fields, e.g. --arg act_bits=4 for 'set'")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for a reply")


async def send(broker: str, root: str, job: str, body: dict[str, Any],
               timeout: float) -> dict[str, Any] | None:
    t = Topics(root)
    u = parse_broker_url(broker)
    async with aiomqtt.Client(**u.client_kwargs()) as c:
        await c.subscribe(t.metrics(job), qos=1)
        await c.publish(t.control(job), json.dumps(body), qos=1)
        try:
            async with asyncio.timeout(timeout):
                async for msg in c.messages:
                    reply = json.loads(bytes(msg.payload or b"{}"))
                    if reply.get("type") in ("status", "error"):
                        return reply
        except TimeoutError:
            return None
    return None


def run(args: argparse.Namespace) -> int:
    try:
        check_id("job", args.job)
        body: dict[str, Any] = {"cmd": args.cmd}
        for kv in args.arg:
            k, sep, v = kv.partition("=")
            if not sep or not k:
                raise ValueError(f"--arg {kv!r} must be KEY=VALUE")
            try:
                body[k] = json.loads(v)  # numbers, true/false, lists
            except ValueError:
                body[k] = v  # a plain word stays a string
    except (TopicError, ValueError) as e:
        print(f"accept-mqtt control: {e}", file=sys.stderr)
        return 2
    reply = asyncio.run(send(args.broker, args.root, args.job, body, args.timeout))
    if reply is None:
        print(f"no reply from job {args.job} within {args.timeout:.0f}s (is it running?)",
              file=sys.stderr)
        return 1
    print(json.dumps(reply, indent=2))
    return 1 if reply.get("type") == "error" else 0
