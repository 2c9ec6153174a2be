"""The systemd unit shipped with the agent (``accept-mqtt-agent.service`` in this package).

``systemd_unit()`` is that file with ``ExecStart`` filled in to run the agent with the Python
that runs this code (so a unit printed from a virtual environment runs that environment's
agent). The unit restarts the agent on failure but not on a bad setting (exit status 2),
reads ``/etc/accept-mqtt/agent.env`` and runs it as its own user (docs/deployment.md).
"""

from __future__ import annotations

import shlex
import sys
from importlib import resources

UNIT_FILE = "accept-mqtt-agent.service"


def exec_start(python: str | None = None) -> str:
    """The agent's command line as systemd's ``ExecStart`` reads it (quoted like a shell
    word list, which systemd accepts for paths with spaces)."""
    return shlex.join([python or sys.executable, "-m", "device_agent"])


def systemd_unit(python: str | None = None) -> str:
    text = resources.files("device_agent").joinpath(UNIT_FILE).read_text(encoding="utf-8")
    return text.replace("@EXEC_START@", exec_start(python))
