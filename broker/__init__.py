"""Run a private Mosquitto: the embedded default of ``accept-mqtt train`` and the test fixture.

Guarantees:

* ``MosquittoBroker`` writes its own config (derived from the top-level ``mosquitto.conf``,
  or a given template) into its own directory, binds a free loopback port, returns from
  ``start()`` only once the port accepts TCP connections, and ``stop()`` terminates it and
  waits for it (kill after a grace period). It is a context manager.
* A missing binary raises ``MosquittoNotFound`` with the install hint, never a traceback from
  ``subprocess``.
* ``restart()`` keeps the same port and persistence directory, so clients with persistent
  sessions resume (used by the broker-restart tests).
* A fleet-style config (``template=`` text or ``config=`` path, e.g. the ``fleet.conf`` that
  ``accept-mqtt broker init`` writes) runs as given apart from its first MQTT listener (moved
  to the free loopback port), its first websockets listener (moved to a second free loopback
  port, ``ws_port``; the dashboard's browser connects there) and the persistence/log paths;
  its password file and ACL apply, and ``reload()`` makes Mosquitto re-read them (SIGHUP).
* Started as root, the broker keeps running as root (``user root``) instead of switching to
  the ``mosquitto`` user: its files live in the caller's private directories, which that user
  cannot read. Non-root callers are unaffected.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

INSTALL_HINT = "install mosquitto: apt-get install mosquitto (Debian/Ubuntu/Raspberry Pi OS)"
DEFAULT_CONF = Path(__file__).resolve().parent.parent / "mosquitto.conf"
_PACKAGED_CONF = Path(__file__).resolve().parent / "templates" / "mosquitto.conf"


class BrokerError(RuntimeError):
    pass


class MosquittoNotFound(BrokerError):
    def __init__(self) -> None:
        super().__init__(f"mosquitto binary not found on PATH or in /usr/sbin; {INSTALL_HINT}")


def find_mosquitto() -> str:
    """Path of the ``mosquitto`` binary (Debian puts it in /usr/sbin, often not on PATH)."""
    env = os.environ.get("MOSQUITTO_BIN")
    if env and Path(env).is_file():
        return env
    found = shutil.which("mosquitto")
    if found:
        return found
    for cand in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto",
                 "/opt/homebrew/sbin/mosquitto"):
        if Path(cand).is_file():
            return cand
    raise MosquittoNotFound()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


_LISTENER = re.compile(r"^\s*listener\s+\d+(\s+\S+)?\s*$")
_WEBSOCKETS = re.compile(r"^\s*protocol\s+websockets\s*$")
_USER = re.compile(r"^\s*user\s+\S+", re.M)


def wait_for_port(proc: subprocess.Popen[bytes], host: str, port: int, timeout: float,
                  exited: Callable[[], str]) -> bool:
    """Wait until ``host:port`` accepts TCP connections (True) or ``timeout`` s pass (False);
    ``BrokerError(exited())`` if ``proc`` ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BrokerError(exited())
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def websockets_listeners(lines: list[str]) -> list[bool]:
    """For each ``listener`` line of a config, in order: does it speak MQTT over WebSockets
    (a ``protocol websockets`` line before the next listener)?"""
    out: list[bool] = []
    for ln in lines:
        if _LISTENER.match(ln):
            out.append(False)
        elif out and _WEBSOCKETS.match(ln):
            out[-1] = True
    return out


def render_config(template: str, port: int, host: str, workdir: Path, persistence: bool,
                  ws_port: int | None = None) -> str:
    """The template with its first MQTT listener moved to ``host:port``, its first websockets
    listener to ``host:ws_port`` (when given), and our own paths."""
    lines = [ln for ln in template.splitlines()
             if not re.match(r"^\s*(persistence|persistence_location|log_dest|pid_file)\b", ln)]
    kinds = iter(websockets_listeners(lines))
    moved = {False: f"listener {port} {host}", True: f"listener {ws_port} {host}"}
    if ws_port is None:
        del moved[True]
    for i, ln in enumerate(lines):
        if _LISTENER.match(ln):
            ws = next(kinds)
            if ws in moved:
                lines[i] = moved.pop(ws)
    text = "\n".join(lines)
    if False in moved:  # no MQTT listener at all: add one
        text = f"listener {port} {host}\n" + text
    text += f"\npersistence {'true' if persistence else 'false'}\n"
    if persistence:
        text += f"persistence_location {workdir}/\n"
    text += f"log_dest file {workdir}/mosquitto.log\n"
    if _is_root() and not _USER.search(text):
        text += "user root\n"
    return text + "\n"


class MosquittoBroker:
    """A Mosquitto process on a free loopback port.

    >>> with MosquittoBroker() as b:  # doctest: +SKIP
    ...     print(b.url)
    mqtt://127.0.0.1:41234
    """

    def __init__(
        self,
        *,
        config: Path | str | None = None,
        port: int | None = None,
        host: str = "127.0.0.1",
        persistence: bool = False,
        workdir: Path | str | None = None,
        extra_config: str = "",
        template: str | None = None,
        command_prefix: list[str] | tuple[str, ...] = (),
    ) -> None:
        """``template`` is config text used instead of the file ``config`` (default: the
        top-level ``mosquitto.conf``); ``extra_config`` is appended to either."""
        if template is None:
            conf = Path(config) if config else (DEFAULT_CONF if DEFAULT_CONF.exists()
                                                else _PACKAGED_CONF)
            template = conf.read_text(encoding="utf-8")
        self.template = template + "\n" + extra_config
        self.host = host
        self.port = port or free_port(host)
        # a free port for the template's websockets listener, if it has one
        has_ws = any(websockets_listeners(self.template.splitlines()))
        self.ws_port: int | None = free_port(host) if has_ws else None
        self.persistence = persistence
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="accept-mosquitto-"))
        self.proc: subprocess.Popen[bytes] | None = None
        # e.g. ["ip", "netns", "exec", NS] (accept_mqtt.harness.netem): it must exec the broker, so
        # that stop() signals Mosquitto itself
        self.command_prefix = list(command_prefix)

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str | None:
        """``ws://host:port`` of the websockets listener (``accept-mqtt dashboard``), or None
        when the config has none."""
        return None if self.ws_port is None else f"ws://{self.host}:{self.ws_port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    def start(self, timeout: float = 10.0) -> MosquittoBroker:
        binary = find_mosquitto()
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            render_config(self.template, self.port, self.host, self.workdir, self.persistence,
                          self.ws_port),
            encoding="utf-8",
        )
        self.proc = subprocess.Popen(
            [*self.command_prefix, binary, "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=self.workdir,
        )
        proc = self.proc

        def exited() -> str:
            raw = proc.stderr.read() if proc.stderr else b""
            log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
            return (f"mosquitto exited with code {proc.returncode}: "
                    f"{raw.decode(errors='replace').strip()} {log.strip()[-800:]}")

        if wait_for_port(proc, self.host, self.port, timeout, exited):
            return self
        self.stop()
        raise BrokerError(f"mosquitto did not accept connections on {self.url} in {timeout}s")

    def stop(self, grace: float = 5.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr:
            proc.stderr.close()

    def kill(self) -> None:
        """Stop abruptly (SIGKILL), as a crash or power loss would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.stop()

    def reload(self) -> None:
        """Make the running broker re-read its password file and ACL (SIGHUP)."""
        if self.proc is None or self.proc.poll() is not None:
            raise BrokerError("mosquitto is not running")
        self.proc.send_signal(signal.SIGHUP)

    def restart(self, timeout: float = 10.0) -> MosquittoBroker:
        self.stop()
        return self.start(timeout)

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
