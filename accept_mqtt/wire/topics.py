"""Topic names of the wire contract (PROTOCOL.md) in one place.

Guarantee: every name built here has a valid root, job and device id; an invalid id raises
``TopicError`` with the offending value instead of producing a topic that would subscribe to
or publish on somebody else's tree (``+``, ``#`` and ``/`` are never let through).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# a job or device id: one topic level that can never be a wildcard or span levels
ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_ID = ID_PATTERN
_ROOT = re.compile(r"^[A-Za-z0-9_-]{1,64}(/[A-Za-z0-9_-]{1,64})*$")


class TopicError(ValueError):
    pass


def check_id(kind: str, value: str) -> str:
    if not isinstance(value, str) or not _ID.match(value):
        raise TopicError(f"{kind} id {value!r} must match [A-Za-z0-9_-]{{1,64}}")
    return value


@dataclass(frozen=True)
class Topics:
    """All topic names under ``root`` (default ``accept``)."""

    root: str = "accept"

    def __post_init__(self) -> None:
        if not _ROOT.match(self.root):
            raise TopicError(f"topic root {self.root!r} must be [A-Za-z0-9_-] levels")

    # devices
    def status(self, device: str) -> str:
        return f"{self.root}/devices/{check_id('device', device)}/status"

    def profile(self, device: str) -> str:
        return f"{self.root}/devices/{check_id('device', device)}/profile"

    @property
    def all_status(self) -> str:
        return f"{self.root}/devices/+/status"

    @property
    def all_profiles(self) -> str:
        return f"{self.root}/devices/+/profile"

    def device_probe(self, device: str) -> str:
        """Twin probes of a device id and the holder's answers (``wire.liveness``)."""
        return f"{self.root}/devices/{check_id('device', device)}/probe"

    # jobs
    def job(self, job: str) -> str:
        return f"{self.root}/jobs/{check_id('job', job)}"

    def control(self, job: str) -> str:
        return f"{self.job(job)}/control"

    def plan(self, job: str) -> str:
        return f"{self.job(job)}/plan"

    def coordinator(self, job: str) -> str:
        """The coordinator's retained liveness (``CoordinatorStatus``, with a Last Will)."""
        return f"{self.job(job)}/coordinator"

    @property
    def all_coordinators(self) -> str:
        return f"{self.root}/jobs/+/coordinator"

    def job_probe(self, job: str) -> str:
        """Twin probes of a job's coordinator and its answers (``wire.liveness``)."""
        return f"{self.job(job)}/probe"

    def fwd(self, job: str, stage: int) -> str:
        return f"{self.job(job)}/stage/{int(stage)}/fwd"

    def bwd(self, job: str, stage: int) -> str:
        return f"{self.job(job)}/stage/{int(stage)}/bwd"

    def timing(self, job: str, device: str) -> str:
        return f"{self.job(job)}/timing/{check_id('device', device)}"

    def metrics(self, job: str) -> str:
        return f"{self.job(job)}/metrics"

    def weights(self, job: str, stage: int) -> str:
        return f"{self.job(job)}/weights/{int(stage)}"

    # extensions (docs/protocol.md): coordinator -> agents, agents -> coordinator
    def sync(self, job: str) -> str:
        return f"{self.job(job)}/sync"

    def events(self, job: str, device: str) -> str:
        return f"{self.job(job)}/events/{check_id('device', device)}"

    def trace(self, job: str, device: str) -> str:
        """Spans of traced steps (``--trace-steps``; ``device_agent.trace``)."""
        return f"{self.job(job)}/trace/{check_id('device', device)}"

    def parse_device(self, topic: str) -> str | None:
        """The device id of a ``{root}/devices/{device}/...`` topic, else None."""
        parts = topic.split("/")
        r = self.root.split("/")
        if parts[: len(r)] != r or len(parts) != len(r) + 3 or parts[len(r)] != "devices":
            return None
        dev = parts[len(r) + 1]
        return dev if _ID.match(dev) else None

    def parse_tail(self, topic: str, job: str) -> list[str]:
        """The levels after ``{root}/jobs/{job}/``."""
        prefix = self.job(job) + "/"
        return topic[len(prefix):].split("/") if topic.startswith(prefix) else []
