"""``python -m device_agent --broker mqtt://host:1883 --device-id pi-kitchen``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys

from accept_mqtt.model.footprint import parse_bytes
from accept_mqtt.model.hardware import pin_allocator
from accept_mqtt.wire.broker_url import (
    BrokerUrlError,
    parse_bandwidth,
    parse_broker_url,
    parse_latency,
)
from accept_mqtt.wire.topics import TopicError, check_id
from device_agent.agent import Agent, AgentConfig
from device_agent.trace import parse_steps

log = logging.getLogger("device_agent")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m device_agent",
        description="accept-mqtt device agent: runs the pipeline stage a plan gives it.",
    )
    p.add_argument("--broker", default=os.environ.get("ACCEPT_BROKER", "mqtt://127.0.0.1:1883"),
                   help="mqtt://[user:pass@]host[:port] or mqtts:// (env ACCEPT_BROKER)")
    p.add_argument("--device-id", default=os.environ.get("ACCEPT_DEVICE_ID",
                                                         socket.gethostname().split(".")[0]),
                   help="[A-Za-z0-9_-]{1,64}; default: the host name")
    p.add_argument("--root", default="accept", help="topic root (default: accept)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for compute")
    p.add_argument("--slowdown", type=float, default=1.0,
                   help="emulate a device this many times slower (sleeps after compute)")
    p.add_argument("--bandwidth", default=None,
                   help="emulate a slower uplink, e.g. 20mbit (paces this agent's sends)")
    p.add_argument("--no-pace", action="store_true",
                   help="advertise --bandwidth in the profile but do not pace: the link is "
                        "shaped elsewhere (tc in a network namespace, or a real slow link)")
    p.add_argument("--latency", default=None, metavar="10ms",
                   help="emulate this one-way latency on every frame and event the agent "
                        "publishes (a delay line: frames stay in flight, order kept); for "
                        "links without it, e.g. where the kernel has no netem")
    p.add_argument("--trace-steps", default=None, metavar="N[,N...]",
                   help="publish compute/send spans of these optimizer steps of every job on "
                        "{root}/jobs/{job}/trace/{device} (for timeline plots)")
    p.add_argument("--keepalive", type=int, default=10,
                   help="MQTT keepalive seconds; a dead agent is marked offline after 1.5x this")
    p.add_argument("--memory-limit", default=None, metavar="SIZE",
                   help="memory a stage may use, e.g. 512MB (K/M/G = 1024^n); advertised to "
                        "the planner, and a stage that would not fit is refused before it is "
                        "built. Default: the device's memory x 0.8 less 300 MB")
    p.add_argument("--model-path", action="append", default=[], metavar="DIR",
                   help="directory a user's model (--model MODULE:FACTORY) is imported or "
                        "its .py file found in; repeat for more (default: installed packages)")
    p.add_argument("--lease", type=float, default=None, metavar="SECONDS",
                   help="leave a job whose coordinator was not heard alive for this long, if "
                        "shorter than the coordinator's own lease (default: the coordinator's)")
    p.add_argument("--heartbeat", type=float, default=1.0, metavar="SECONDS",
                   help="seconds between progress heartbeats while in a job (how the "
                        "coordinator tells a hung device from a slow one); 0: none")
    p.add_argument("--fault-hang-at-step", type=int, default=None, metavar="N",
                   help="FAULT INJECTION for tests and drills: from optimizer step N on, the "
                        "stage's compute blocks for ever while the connection stays up")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


async def _main(cfg: AgentConfig) -> None:
    loop = asyncio.get_running_loop()
    async with Agent(cfg) as agent:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, agent.stop)
        await agent.run()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s agent[%(process)d]: %(message)s")
    try:
        parse_broker_url(args.broker)
        check_id("device", args.device_id)
        bw = parse_bandwidth(args.bandwidth)
        latency = parse_latency(args.latency)
        trace_steps = parse_steps(args.trace_steps)
        limit = None if args.memory_limit is None else parse_bytes(args.memory_limit)
        if args.slowdown < 1.0:
            raise ValueError(f"--slowdown must be >= 1 (got {args.slowdown})")
        if args.lease is not None and not args.lease > 0:
            raise ValueError(f"--lease must be > 0 seconds (got {args.lease})")
        if not args.heartbeat >= 0.0:
            raise ValueError(f"--heartbeat must be >= 0 seconds (got {args.heartbeat})")
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1 (got {args.threads})")
        for d in args.model_path:
            if not os.path.isdir(d):
                raise ValueError(f"--model-path {d} is not a directory")
    except (BrokerUrlError, TopicError, ValueError) as e:
        print(f"device_agent: {e}", file=sys.stderr)
        return 2
    cfg = AgentConfig(broker=args.broker, device_id=args.device_id, root=args.root,
                      threads=args.threads, slowdown=args.slowdown, bandwidth_bps=bw,
                      keepalive=args.keepalive, pace=not args.no_pace,
                      trace_steps=trace_steps, memory_limit=limit,
                      model_path=tuple(os.path.abspath(d) for d in args.model_path),
                      latency_s=latency, lease=args.lease, heartbeat=args.heartbeat,
                      fault_hang_at_step=args.fault_hang_at_step)
    pin_allocator()  # layer times then match the seed the predictor was trained on
    try:
        asyncio.run(_main(cfg))
    except asyncio.CancelledError:
        pass
    except KeyboardInterrupt:
        pass
    except Exception as e:  # aiomqtt.MqttError and friends: say what, not a traceback
        print(f"device_agent: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
