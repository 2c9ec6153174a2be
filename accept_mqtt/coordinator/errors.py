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


class PlanRefused(CoordinatorError):
    """A device of the plan could not build its stage (e.g. its build of the model differs,
    or the stage would not fit its memory limit)."""

    def __init__(self, device: str, reason: str) -> None:
        super().__init__(f"device {device} refused the plan: {reason}")
        self.device = device


class StepTimeout(CoordinatorError):
    pass


class BrokerLost(CoordinatorError):
    """The connection to the broker dropped; training continues after a reconnect."""
