"""A second MQTT broker implementation for the tests: amqtt (pure Python, from PyPI).

The tests that matter most (a training run checked against one-process training, control
commands, a device loss) run against Mosquitto and against this broker (``any_broker`` in
conftest.py), so nothing in accept-mqtt may lean on a Mosquitto-only behaviour.

``AmqttBroker`` is a ``broker.MosquittoBroker`` that runs amqtt instead (``url``, ``host``,
``port``, ``start``, ``stop``, ``cleanup``, ``log_path``): its own YAML config in its own
directory, a free loopback port, anonymous access; ``start()`` returns once the port accepts
TCP connections. amqtt speaks MQTT 3.1.1 only (it refuses protocol level 5), so its URL asks
for 3.1.1 (``?protocol=3.1.1``, docs/fleet.md).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from broker import BrokerError, MosquittoBroker, wait_for_port

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


class AmqttBroker(MosquittoBroker):
    """An amqtt broker process on a free loopback port."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        super().__init__(template="", host=host)  # no Mosquitto config: no websockets port

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}?protocol=3.1.1"

    @property
    def log_path(self) -> Path:
        return self.workdir / "amqtt.log"

    def start(self, timeout: float = 20.0) -> AmqttBroker:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "amqtt.yaml"
        conf.write_text(CONFIG.format(host=self.host, port=self.port), encoding="utf-8")
        amqtt = Path(sys.executable).with_name("amqtt")
        if not amqtt.exists():
            raise BrokerError("amqtt is not installed: pip install -e '.[dev]' (make setup)")
        with open(self.log_path, "ab") as log:
            proc = subprocess.Popen([str(amqtt), "-c", str(conf)], stdout=log,
                                    stderr=subprocess.STDOUT, cwd=self.workdir)
        self.proc = proc

        def exited() -> str:
            return (f"amqtt exited with code {proc.returncode}: "
                    f"{self.log_path.read_text(errors='replace')[-800:]}")

        if wait_for_port(proc, self.host, self.port, timeout, exited):
            return self
        self.stop()
        raise BrokerError(f"amqtt did not accept connections on port {self.port} in {timeout}s")
