"""The coordinator's exceptions (importable without MQTT)."""

from __future__ import annotations


class CoordinatorError(RuntimeError):
    pass


class DevicesTimeout(CoordinatorError):
    pass


class DeviceLost(CoordinatorError):
    def __init__(self, device: str) -> None:
        super().__init__(f"device {device} went offline during training")
        self.device = device


class StepTimeout(CoordinatorError):
    pass


class BrokerLost(CoordinatorError):
    """The connection to the broker dropped; training continues after a reconnect."""


class PlanRefused(CoordinatorError):
    """A device of the plan refused it (e.g. its stage does not fit its memory limit)."""
