"""A user's control commands (``{root}/jobs/{job}/control``, docs/protocol.md "Control").

Guarantees:

* ``pause`` lets the current optimizer step finish, then training waits (``running`` is
  cleared) until ``resume``/``start``; ``stop`` ends it at the next step boundary (evaluated,
  saved); ``repartition`` and ``set`` ask the planner for a live re-plan at the next step
  boundary; ``status`` only answers. "The next step boundary" is the first one without a
  step in flight: a step whose inputs the coordinator sent ahead (``StepDriver``) is run
  first, so a command takes effect at most one step later than it would otherwise.
* Every accepted command is answered on the metrics topic with ``status`` (``JobStatus``).
* A rejected command (not JSON, unknown, a ``set`` with another key or a value the config
  refuses) changes nothing; it is answered with an ``error`` (``device: "coordinator"``),
  logged, and kept in the run record's errors.
* A reply carries the command's ``request_id`` (that of a refused one too, when its JSON has
  a usable one) and goes out at QoS 1 (``reply``), so a sender can wait for its own answer;
  a command without one is answered all the same.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Protocol

from accept_mqtt.wire.messages import ControlCommand, Error, JobStatus, MessageError, Metric
from accept_mqtt.wire.plan import Plan

from .record import RunState

log = logging.getLogger("accept_mqtt.coordinator")


class Replanning(Protocol):
    """The planner, as commands use it."""

    def request_replan(self, reason: str) -> None: ...

    def set_widths(self, changes: dict[str, int]) -> None:
        """Raises ``ValueError`` (nothing changed) for widths the config refuses."""


def rejection(e: MessageError) -> str:
    """Why a command that did not decode is refused, in the words docs/protocol.md uses."""
    r = e.reason
    if r.startswith("unknown command") or " takes no " in r:
        return r
    for key in ("act_bits", "grad_bits"):
        if f"`$.{key}`" in r:
            return f"set: {key} must be an int ({r}); nothing changed"
    if "unknown field" in r or r.startswith("set needs"):
        return f"set: expected act_bits and/or grad_bits ({r}); nothing changed"
    return f"malformed control message: {r}"


class Control:
    """Pause/stop state of one job and what each command does (module docstring)."""

    def __init__(self, topic: str, state: RunState, planner: Replanning, *,
                 current: Callable[[], Plan | None], reply: Callable[[Metric], None],
                 say: Callable[[str, dict[str, Any]], None] = lambda kind, info: None) -> None:
        self.topic = topic
        self.state = state
        self.planner = planner
        self.current = current
        self.reply = reply
        self.say = say
        self.running = asyncio.Event()  # cleared by 'pause'
        self.running.set()
        self.stop_requested = False

    def on_command(self, cmd: ControlCommand | MessageError,
                   request_id: str | None = None) -> None:
        """Do ``cmd`` and answer it; ``request_id``: that of a command that did not decode."""
        if isinstance(cmd, MessageError):
            self._reject(rejection(cmd), request_id)
            return
        log.info("control: %s", cmd)
        match cmd.cmd:
            case "pause":
                self.running.clear()
            case "resume" | "start":
                self.running.set()
            case "stop":
                self.stop_requested = True
                self.running.set()
            case "repartition":
                self.planner.request_replan("repartition command")
            case "set":
                changes = {k: v for k, v in (("act_bits", cmd.act_bits),
                                             ("grad_bits", cmd.grad_bits)) if v is not None}
                try:
                    self.planner.set_widths(changes)
                except ValueError as e:
                    self._reject(f"set: {e}; nothing changed", cmd.request_id)
                    return
        self.reply(self.status(cmd.cmd, cmd.request_id))

    def status(self, command: str | None = None, request_id: str | None = None) -> JobStatus:
        plan = self.current()
        return JobStatus(command=command, request_id=request_id, step=self.state.step,
                         epoch=self.state.epoch,
                         paused=not self.running.is_set(), stopping=self.stop_requested,
                         plan_version=plan.version if plan else None,
                         devices=plan.devices if plan else [])

    def _reject(self, reason: str, request_id: str | None) -> None:
        log.warning("control message rejected: %s", reason)
        err = {"type": "error", "device": "coordinator", "topic": self.topic, "reason": reason,
               **({"request_id": request_id} if request_id else {})}
        self.state.add_error(err)
        self.say("error", err)
        self.reply(Error(device="coordinator", topic=self.topic, reason=reason,
                         request_id=request_id))
