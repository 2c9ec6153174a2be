"""A whole cluster on this machine: a private Mosquitto plus device agents as processes.

Used by ``accept-mqtt train`` without ``--broker`` (the embedded default), by the benchmarks
and by the end-to-end tests.

Guarantees: agents are real ``python -m device_agent`` processes talking to a real broker;
``__exit__`` stops every agent (SIGTERM, then SIGKILL after a grace period) and then the
broker, whatever happened inside the ``with``; agent logs go to files under the cluster's
work directory, so a failing run can be read afterwards.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from broker import MosquittoBroker


@dataclass(frozen=True)
class AgentSpec:
    device_id: str
    slowdown: float = 1.0
    bandwidth: str | None = None  # e.g. "20mbit"
    threads: int = 1
    keepalive: int = 10
    extra_args: tuple[str, ...] = ()  # more device_agent flags, e.g. ("--trace-steps", "15")


class LocalCluster:
    def __init__(self, agents: list[AgentSpec], *, broker: MosquittoBroker | None = None,
                 root: str = "accept", workdir: str | Path | None = None) -> None:
        self.specs = agents
        self.root = root
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="accept-cluster-"))
        self._own_broker = broker is None
        self.broker = broker or MosquittoBroker()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        return self.broker.url

    def agent_cmd(self, spec: AgentSpec) -> list[str]:
        cmd = [sys.executable, "-m", "device_agent", "--broker", self.url, "--device-id",
               spec.device_id, "--root", self.root, "--threads", str(spec.threads),
               "--slowdown", str(spec.slowdown), "--keepalive", str(spec.keepalive)]
        if spec.bandwidth:
            cmd += ["--bandwidth", spec.bandwidth]
        return cmd + list(spec.extra_args)

    def start_agent(self, spec: AgentSpec) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"agent-{spec.device_id}.log", "ab")  # noqa: SIM115
        # the harness alone configures its agents: a device's ACCEPT_MQTT_* settings (or
        # the TOML file $ACCEPT_MQTT_CONFIG names) in this shell must not leak into them
        env = {k: v for k, v in os.environ.items() if not k.startswith("ACCEPT_MQTT_")}
        env.update(OMP_NUM_THREADS=str(spec.threads), PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(self.agent_cmd(spec), stdout=log, stderr=subprocess.STDOUT,
                                env=env)
        log.close()
        self.procs[spec.device_id] = proc
        return proc

    def kill_agent(self, device_id: str) -> None:
        """SIGKILL, as a power cut would: no goodbye, the broker fires the Last Will."""
        proc = self.procs[device_id]
        proc.kill()
        proc.wait()

    def stop_agent(self, device_id: str, grace: float = 5.0) -> None:
        proc = self.procs.get(device_id)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def agent_log(self, device_id: str) -> str:
        p = self.workdir / f"agent-{device_id}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def __enter__(self) -> LocalCluster:
        if self._own_broker:
            self.broker.start()
        try:
            for spec in self.specs:
                self.start_agent(spec)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for dev in list(self.procs):
            self.stop_agent(dev)
        if self._own_broker:
            self.broker.cleanup()


def default_agents(n: int, slowdowns: list[float] | None = None,
                   bandwidths: list[str | None] | None = None) -> list[AgentSpec]:
    return [AgentSpec(f"local-{i}", (slowdowns or [1.0] * n)[i],
                      (bandwidths or [None] * n)[i]) for i in range(n)]
