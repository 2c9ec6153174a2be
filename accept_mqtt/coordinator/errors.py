"""The coordinator's exceptions (importable without MQTT)."""

from __future__ import annotations


class CoordinatorError(RuntimeError):
    pass


class DevicesTimeout(CoordinatorError):
    pass


class DeviceLost(CoordinatorError):
    """A plan device is gone: offline (its Last Will or a goodbye), or hung (``why`` says:
    connected, but its compute stopped)."""

    def __init__(self, device: str, why: str = "went offline") -> None:
        super().__init__(f"device {device} {why} during training")
        self.device = device
        self.why = why


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


class DeltaMismatch(CoordinatorError):
    """A stage reported that a delta frame's history did not match (``Error.resync``): the
    step in flight cannot finish; a rewind resets every link's history (docs/faults.md)."""

    def __init__(self, device: str, reason: str) -> None:
        super().__init__(f"device {device}: {reason}")
        self.device = device
