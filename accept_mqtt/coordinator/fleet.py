"""The coordinator's view of the fleet: each device's retained status and profile.

Guarantees:

* ``device_state`` is what the latest retained status says *now*: ``online`` (idle),
  ``busy`` (with this job), ``elsewhere`` (busy with another job), ``offline`` (its Last Will,
  a goodbye, or a cleared status) or ``unknown`` (no status seen).
* ``online_devices`` are the devices free for this job: idle ones, and those already busy
  with this job, with a profile.
* ``wait_for_devices`` returns the ``n`` fastest free devices, fastest first, ties broken by
  id, so the choice is reproducible; after its timeout ``at_least`` devices will do, fewer
  raise ``DevicesTimeout`` naming what was seen and how to start an agent.
* ``wait_changed`` wakes on any status or profile update.
* ``wait_for_devices`` raises ``BrokerLost`` when the session's connection is gone (nothing
  would arrive any more: the caller reconnects).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from accept_mqtt.wire.messages import DeviceProfile, DeviceStatus, to_builtins

from .errors import BrokerLost, DevicesTimeout
from .planner import DeviceInfo


@dataclass
class _Device:
    seen_status: bool = False
    status: DeviceStatus | None = None  # None after a status was seen: cleared (offline)
    profile: dict[str, Any] | None = None  # the profile as the planner takes it


class Fleet:
    """Devices' statuses and profiles as the session delivers them (module docstring)."""

    def __init__(self, job: str, broker: str,
                 say: Callable[[str, dict[str, Any]], None] = lambda kind, info: None, *,
                 connected: Callable[[], bool] = lambda: True) -> None:
        self.job = job
        self.connected = connected
        self.broker = broker  # for messages only
        self.say = say
        self._devices: dict[str, _Device] = {}
        self._changed = asyncio.Event()

    # -- updates (from the session) --------------------------------------------------------
    def update_status(self, device: str, status: DeviceStatus | None) -> None:
        d = self._devices.setdefault(device, _Device())
        d.seen_status, d.status = True, status
        self._changed.set()

    def update_profile(self, device: str, profile: DeviceProfile | None) -> None:
        d = self._devices.setdefault(device, _Device())
        d.profile = None if profile is None else to_builtins(profile)
        self._changed.set()

    # -- queries ---------------------------------------------------------------------------
    def device_state(self, device: str) -> str:
        d = self._devices.get(device)
        if d is None or not d.seen_status:
            return "unknown"
        if d.status is None:
            return "offline"
        if d.status.state == "busy" and d.status.job != self.job:
            return "elsewhere"
        return d.status.state

    def profile(self, device: str) -> dict[str, Any] | None:
        d = self._devices.get(device)
        return None if d is None else d.profile

    def online_devices(self, exclude: set[str] | frozenset[str] = frozenset()) -> list[DeviceInfo]:
        """Devices free for this job: idle ones, and those already busy with this job."""
        out = []
        for dev, d in self._devices.items():
            if self.device_state(dev) in ("online", "busy") and d.profile is not None and (
                    dev not in exclude):
                out.append(DeviceInfo(dev, d.profile))
        return out

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """``{device: {"status": {...}, "profile": {...}}}`` as far as each was seen."""
        out: dict[str, dict[str, Any]] = {}
        for dev, d in self._devices.items():
            view: dict[str, Any] = {}
            if d.seen_status:
                view["status"] = ({"state": "offline"} if d.status is None
                                  else to_builtins(d.status))
            if d.profile is not None:
                view["profile"] = d.profile
            out[dev] = view
        return out

    # -- waiting ---------------------------------------------------------------------------
    async def wait_changed(self, timeout: float) -> None:
        """Until the next status or profile update, or ``timeout`` seconds."""
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    async def wait_for_devices(self, n: int, timeout: float,
                               exclude: set[str] | frozenset[str] = frozenset(),
                               at_least: int | None = None) -> list[DeviceInfo]:
        """The ``n`` fastest free devices (fastest first, ties by id: reproducible).

        Waits up to ``timeout``; then ``at_least`` devices will do (a re-plan after a loss
        takes what is there), fewer raise ``DevicesTimeout`` with what was seen.
        """
        deadline = time.monotonic() + timeout
        while True:
            if not self.connected():
                raise BrokerLost("connection to the broker lost")
            online = self.online_devices(exclude)
            self.say("devices", {"online": len(online), "wanted": n})
            left = deadline - time.monotonic()
            if len(online) >= n or (left <= 0 and len(online) >= (at_least or n)):
                return sorted(online, key=lambda d: (-d.speed, d.id))[:n]
            if left <= 0:
                seen = ", ".join(f"{k}={self._seen_state(k)}"
                                 for k in sorted(self._devices)) or "none"
                raise DevicesTimeout(
                    f"waited {timeout:.0f}s for {at_least or n} idle device agents on "
                    f"{self.broker}, found {len(online)} (seen: {seen}); start agents with "
                    f"'python -m device_agent --broker {self.broker} --device-id NAME'"
                )
            await self.wait_changed(min(left, 1.0))

    def _seen_state(self, device: str) -> str:
        """The state a status gave, as the timeout message shows it (``?``: none seen)."""
        d = self._devices[device]
        if not d.seen_status:
            return "?"
        return "offline" if d.status is None else d.status.state
