"""A second MQTT broker implementation for the tests: amqtt (pure Python, from PyPI).

The tests that matter most (a training run checked against one-process training, control
commands, a device loss) run against Mosquitto and against this broker (``any_broker`` in
conftest.py), so nothing in accept-mqtt may lean on a Mosquitto-only behaviour.

``AmqttBroker`` has the parts of ``broker.MosquittoBroker`` the tests use (``url``, ``host``,
``port``, ``start``, ``stop``, ``cleanup``, ``log_path``): its own YAML config in its own
directory, a free loopback port, anonymous access, ``start()`` returns once the port accepts
TCP connections. amqtt speaks MQTT 3.1.1 only (it refuses protocol level 5), so its URL asks
for 3.1.1 (``?protocol=3.1.1``, docs/fleet.md).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from broker import BrokerError, free_port

CONFIG = """\
listeners:
  default:
    type: tcp
    bind: {host}:{port}
    max_connections: 100
plugins:
  amqtt.plugins.authentication.AnonymousAuthPlugin:
    allow_anonymous: true
"""


class AmqttBroker:
    """An amqtt broker process on a free loopback port (``python -m amqtt.scripts...``)."""

    name = "amqtt"

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = free_port(host)
        self.workdir = Path(tempfile.mkdtemp(prefix="accept-amqtt-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}?protocol=3.1.1"

    @property
    def log_path(self) -> Path:
        return self.workdir / "amqtt.log"

    def start(self, timeout: float = 20.0) -> AmqttBroker:
        conf = self.workdir / "amqtt.yaml"
        conf.write_text(CONFIG.format(host=self.host, port=self.port), encoding="utf-8")
        amqtt = Path(sys.executable).with_name("amqtt")
        if not amqtt.exists():
            raise BrokerError("amqtt is not installed: pip install -e '.[dev]' (make setup)")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([str(amqtt), "-c", str(conf)], stdout=log,
                                         stderr=subprocess.STDOUT, cwd=self.workdir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrokerError(f"amqtt exited with code {self.proc.returncode}: "
                                  f"{self.log_path.read_text(errors='replace')[-800:]}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise BrokerError(f"amqtt did not accept connections on port {self.port} in {timeout}s")

    def stop(self, grace: float = 5.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> AmqttBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
