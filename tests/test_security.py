"""A fleet broker with auth on: passwords and the ACL, checked against a real Mosquitto.

The broker in every test runs the ``fleet.conf`` that ``accept-mqtt broker init`` writes, with
the password file and ACL that ``add-device`` / ``add-coordinator`` / ``add-monitor`` write
(password hashes computed in Python, no ``mosquitto_passwd``). Only its listener is moved to a
free loopback port. Under MQTT 3.1.1 Mosquitto drops an unauthorised publish silently (the
PUBACK still comes), so "refused" is shown by absence: a forbidden QoS 1 publish is followed
by an allowed one from the same client, and the subscriber must see the allowed one without
the forbidden one before it (the broker handles one client's publishes in order). The clients
here are plain ``aiomqtt.Client``s, which ignore a PUBACK's reason code whatever the protocol;
accept-mqtt's own client (``wire.mqtt.Client``, MQTT 5) raises ``PublishRefused`` instead:
tests/test_mqtt5.py.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from accept_mqtt.coordinator import Coordinator
from accept_mqtt.coordinator.config import TrainConfig
from accept_mqtt.wire.broker_url import CAFILE_ENV, PASSWORD_ENV, BrokerUrlError, parse_broker_url
from broker import MosquittoBroker
from broker.cli import (
    FleetDir,
    acl_roles,
    add_client,
    check_password,
    hash_password,
    init_fleet,
    main,
    password_entry,
    remove_client,
)

from .conftest import running_agents

USERS = {"coord": "coordinator", "pi-a": "device", "pi-b": "device", "mon": "monitor"}


@dataclass
class Fleet:
    dir: FleetDir
    broker: MosquittoBroker
    passwords: dict[str, str]

    def url(self, user: str, scheme: str = "mqtt", password: bool = True) -> str:
        pw = f":{self.passwords[user]}" if password else ""
        return f"{scheme}://{user}{pw}@{self.broker.host}:{self.broker.port}"

    def client(self, user: str, **kw: Any) -> aiomqtt.Client:
        return aiomqtt.Client(**parse_broker_url(self.url(user)).client_kwargs(), **kw)

    def denied(self) -> list[str]:
        """The broker's log lines of publishes its ACL dropped."""
        return [ln for ln in self.broker.log_path.read_text(errors="replace").splitlines()
                if "Denied PUBLISH" in ln]


def _make_fleet(tmp_path: Path, template: str | None = None) -> Fleet:
    fd = init_fleet(tmp_path / "fleet")
    passwords = {}
    for name, role in USERS.items():
        pw, _ = add_client(fd.path, name, role)
        assert pw is not None
        passwords[name] = pw
    # log_type all: the log then names every publish the ACL denied
    b = MosquittoBroker(config=fd.conf, template=template, workdir=tmp_path / "broker",
                        extra_config="log_type all\n")
    return Fleet(fd, b.start(), passwords)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    f = _make_fleet(tmp_path)
    try:
        yield f
    finally:
        f.broker.cleanup()


async def _collect(client: aiomqtt.Client, until: str, timeout: float = 5) -> list[str]:
    """Topics (with payloads) received until the message ``until`` arrives."""
    seen: list[str] = []
    async with asyncio.timeout(timeout):
        async for msg in client.messages:
            item = f"{msg.topic.value}={bytes(msg.payload or b'').decode()}"
            seen.append(item)
            if item == until:
                return seen
    raise AssertionError("unreachable")


# -- (a, b) who may connect ---------------------------------------------------------------------
@pytest.mark.parametrize("creds", [{}, {"username": "pi-a", "password": "wrong"},
                                   {"username": "nobody", "password": "x"},
                                   {"username": "pi-a"}])
def test_anonymous_wrong_password_and_unknown_users_are_refused(fleet: Fleet,
                                                                creds: dict[str, str]) -> None:
    async def connect() -> None:
        async with aiomqtt.Client(fleet.broker.host, fleet.broker.port, **creds):
            pass

    with pytest.raises(aiomqtt.MqttError, match="(?i)not authori[sz]ed"):
        asyncio.run(connect())


def test_password_from_the_environment_not_the_command_line(fleet: Fleet,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    url = parse_broker_url(fleet.url("pi-a", password=False))
    assert "pi-a@" in str(url) and fleet.passwords["pi-a"] not in str(url)
    monkeypatch.setenv(PASSWORD_ENV, fleet.passwords["pi-a"])

    async def connect() -> None:
        async with aiomqtt.Client(**url.client_kwargs()) as c:
            await c.publish("accept/devices/pi-a/status", b"{}", qos=1)

    asyncio.run(connect())
    # a password in the URL wins over the variable; no username: the variable is not used
    kw = parse_broker_url("mqtt://u:inurl@h").client_kwargs({PASSWORD_ENV: "env"})
    assert kw["password"] == "inurl"
    assert "password" not in parse_broker_url("mqtt://h").client_kwargs({PASSWORD_ENV: "env"})


# -- (c) a device may publish only its own topics -------------------------------------------
def test_device_cannot_publish_as_another_device_or_as_the_coordinator(fleet: Fleet) -> None:
    forbidden = ["accept/devices/pi-b/status", "accept/devices/pi-b/profile",
                 "accept/jobs/j/timing/pi-b", "accept/jobs/j/events/pi-b",
                 "accept/jobs/j/trace/pi-b", "accept/jobs/j/plan",
                 "accept/jobs/j/control", "accept/jobs/j/sync", "other/devices/pi-a/status"]
    allowed = ["accept/devices/pi-a/status", "accept/devices/pi-a/profile",
               "accept/jobs/j/timing/pi-a", "accept/jobs/j/events/pi-a",
               "accept/jobs/j/trace/pi-a", "accept/jobs/j/stage/1/fwd", "accept/jobs/j/stage/0/bwd",
               "accept/jobs/j/metrics", "accept/jobs/j/weights/1"]

    async def main() -> list[str]:
        async with fleet.client("coord") as sub, fleet.client("pi-a") as dev:
            await sub.subscribe("#", qos=1)
            for topic in forbidden:
                await dev.publish(topic, b"forged", qos=1)
            for topic in allowed:
                await dev.publish(topic, b"ok", qos=1)
            return await _collect(sub, f"{allowed[-1]}=ok")

    seen = asyncio.run(main())
    assert seen == [f"{t}=ok" for t in allowed], seen
    assert len(fleet.denied()) == len(forbidden)


def test_device_reads_job_topics_but_not_other_devices(fleet: Fleet) -> None:
    async def main() -> list[str]:
        async with (fleet.client("pi-a") as dev, fleet.client("pi-b") as other,
                    fleet.client("coord") as coord):
            await dev.subscribe("accept/#", qos=1)
            await other.publish("accept/devices/pi-b/status", b"private", qos=1)
            await other.publish("accept/jobs/j/timing/pi-b", b"private", qos=1)
            await coord.publish("accept/jobs/j/plan", b"plan", qos=1)
            await coord.publish("accept/jobs/j/weights/0", b"restore", qos=1)
            await other.publish("accept/jobs/j/stage/1/fwd", b"frame", qos=1)
            return await _collect(dev, "accept/jobs/j/stage/1/fwd=frame")

    assert asyncio.run(main()) == ["accept/jobs/j/plan=plan", "accept/jobs/j/weights/0=restore",
                                   "accept/jobs/j/stage/1/fwd=frame"]


# -- (d) a monitor only reads ---------------------------------------------------------------
def test_monitor_reads_everything_and_cannot_publish_control(fleet: Fleet) -> None:
    async def main() -> tuple[list[str], list[str]]:
        async with (fleet.client("coord") as sub, fleet.client("mon") as mon,
                    fleet.client("coord") as coord):
            await sub.subscribe("accept/jobs/j/control", qos=1)
            await mon.subscribe("accept/#", qos=1)
            await mon.publish("accept/jobs/j/control", b'{"cmd": "stop"}', qos=1)
            await mon.publish("accept/jobs/j/plan", b"", qos=1, retain=True)
            await coord.publish("accept/jobs/j/control", b'{"cmd": "status"}', qos=1)
            got = await _collect(sub, 'accept/jobs/j/control={"cmd": "status"}')
            return got, await _collect(mon, 'accept/jobs/j/control={"cmd": "status"}')

    by_coord, by_mon = asyncio.run(main())
    assert by_coord == ['accept/jobs/j/control={"cmd": "status"}']
    assert by_mon == ['accept/jobs/j/control={"cmd": "status"}']
    assert len(fleet.denied()) == 2


# -- Last Will: its own status is allowed, another device's is not -----------------------
_WILL_CLIENT = """
import sys, time, paho.mqtt.client as mqtt
port, user, pw, topic = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
c.username_pw_set(user, pw)
c.will_set(topic, b'{"state": "offline", "reason": "connection lost"}', qos=1, retain=True)
c.connect("127.0.0.1", int(port), keepalive=30)
c.loop_start()
time.sleep(0.3)
print("connected", flush=True)
time.sleep(60)
"""


def _killed_client(fleet: Fleet, user: str, will_topic: str) -> None:
    """A client with a Last Will, killed with SIGKILL (no DISCONNECT): the broker fires it."""
    p = subprocess.Popen([sys.executable, "-c", _WILL_CLIENT, str(fleet.broker.port), user,
                          fleet.passwords[user], will_topic], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "connected"
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()


def test_last_will_on_own_status_is_delivered_on_another_devices_is_not(fleet: Fleet) -> None:
    async def main() -> list[str]:
        async with fleet.client("coord") as sub:
            await sub.subscribe("accept/devices/+/status", qos=1)
            await asyncio.to_thread(_killed_client, fleet, "pi-a", "accept/devices/pi-b/status")
            await asyncio.to_thread(_killed_client, fleet, "pi-a", "accept/devices/pi-a/status")
            return await _collect(sub, 'accept/devices/pi-a/status={"state": "offline", '
                                  '"reason": "connection lost"}')

    seen = asyncio.run(main())
    assert len(seen) == 1 and seen[0].startswith("accept/devices/pi-a/status="), seen


# -- (e) a real training run: coordinator and agents authenticated, ACL sufficient -------
def test_training_through_the_acl(fleet: Fleet, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = TrainConfig(model="mlp", dataset="digits", epochs=1, batch_size=32, micro_batches=2,
                      max_steps=3, seed=3, devices=2, runs_dir=str(tmp_path / "runs"),
                      device_timeout=20, step_timeout=30, partition="flops")
    monkeypatch.setenv(PASSWORD_ENV, fleet.passwords["coord"])  # the coordinator's URL has none

    async def main() -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
        async with running_agents(fleet.url, ["pi-a", "pi-b"]) as agents:
            async with Coordinator(fleet.url("coord", password=False), cfg, job="sec") as coord:
                record = await coord.run()
                devices = dict(coord.devices)
            return record, devices, [e for a in agents for e in a.errors]

    record, devices, agent_errors = asyncio.run(main())
    assert record["steps"] == 3
    assert [s["device"] for s in record["plan"]["stages"]] == ["pi-a", "pi-b"]
    assert record["final_accuracy"] is not None
    assert not record["errors"] and not agent_errors
    # the agents' retained status and profile reached the coordinator user
    assert {"pi-a", "pi-b"} <= set(devices)
    assert all("status" in devices[d] and "profile" in devices[d] for d in ("pi-a", "pi-b"))
    assert all(ln["act_bytes"] > 0 and ln["grad_bytes"] > 0 for ln in record["links"])
    assert fleet.denied() == [], "the ACL must allow everything a training run publishes"


# -- reload: devices added and removed while the broker runs ----------------------------
def test_reload_admits_an_added_device_and_drops_a_removed_one(fleet: Fleet) -> None:
    pw, _ = add_client(fleet.dir.path, "pi-c", "device")
    assert pw is not None

    async def main() -> None:
        async with fleet.client("pi-b") as gone:
            assert remove_client(fleet.dir.path, "pi-b") == "device"
            fleet.broker.reload()
            for _ in range(50):  # SIGHUP is handled asynchronously
                try:
                    async with aiomqtt.Client(fleet.broker.host, fleet.broker.port,
                                              username="pi-c", password=pw) as c:
                        await c.publish("accept/devices/pi-c/status", b"{}", qos=1)
                        break
                except aiomqtt.MqttError:
                    await asyncio.sleep(0.05)
            else:
                raise AssertionError("pi-c was not accepted after SIGHUP")
            with pytest.raises(aiomqtt.MqttError):  # the reload disconnected removed pi-b
                await gone.publish("accept/devices/pi-b/status", b"{}", qos=1, timeout=2)

    asyncio.run(main())


# -- TLS: the template's TLS block, mqtts:// and ACCEPT_MQTT_CAFILE ------------------------
def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_certs(certs: Path) -> None:
    """A CA and a server certificate for 127.0.0.1/localhost, made by the commands of
    docs/security.md ("TLS listener")."""
    certs.mkdir(parents=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-days", "3650", "-keyout", "ca.key", "-out", "ca.crt",
             "-subj", "/CN=accept-mqtt fleet CA", "-addext",
             "keyUsage=critical,keyCertSign,cRLSign", cwd=certs)
    _openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost",
             cwd=certs)
    (certs / "server.ext").write_text(
        "subjectAltName = DNS:localhost, IP:127.0.0.1\n"
        "basicConstraints = CA:FALSE\n"
        "keyUsage = critical, digitalSignature\n"
        "extendedKeyUsage = serverAuth\n"
        "subjectKeyIdentifier = hash\n"
        "authorityKeyIdentifier = keyid\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "825", "-out", "server.crt", "-extfile", "server.ext",
             cwd=certs)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_tls_listener_from_the_template(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = (init_fleet(tmp_path / "tls-template").conf.read_text())
    # the instructions: comment out the plain listener, uncomment the TLS block
    lines = []
    for ln in conf.splitlines():
        if ln == "listener 1883":
            ln = "#" + ln
        elif ln.startswith(("#listener 8883", "#cafile", "#certfile", "#keyfile",
                            "#require_certificate")):
            ln = ln[1:]
        lines.append(ln)
    text = "\n".join(lines).replace(str((tmp_path / "tls-template").resolve()),
                                    str((tmp_path / "fleet").resolve()))
    _make_certs(tmp_path / "fleet" / "certs")
    fleet = _make_fleet(tmp_path, template=text)
    try:
        monkeypatch.setenv(PASSWORD_ENV, fleet.passwords["pi-a"])
        url = parse_broker_url(fleet.url("pi-a", scheme="mqtts", password=False))

        async def publish() -> None:
            async with aiomqtt.Client(**url.client_kwargs()) as c:
                await c.publish("accept/devices/pi-a/status", b"tls", qos=1)

        monkeypatch.delenv(CAFILE_ENV, raising=False)
        with pytest.raises(aiomqtt.MqttError, match="(?i)certificate"):
            asyncio.run(publish())  # our CA is not a system CA: verification must fail
        monkeypatch.setenv(CAFILE_ENV, str(tmp_path / "fleet" / "certs" / "ca.crt"))
        asyncio.run(publish())
        strict = url.client_kwargs()  # the certificates also pass strict X.509 checks
        strict["tls_context"].verify_flags |= ssl.VERIFY_X509_STRICT

        async def strict_connect() -> None:
            async with aiomqtt.Client(**strict):
                pass

        asyncio.run(strict_connect())
        async def plain_connect() -> None:
            async with aiomqtt.Client(fleet.broker.host, fleet.broker.port, username="pi-a",
                                      password=fleet.passwords["pi-a"], timeout=3):
                pass

        with pytest.raises(aiomqtt.MqttError):
            asyncio.run(plain_connect())  # the only listener speaks TLS
        monkeypatch.setenv(CAFILE_ENV, str(tmp_path / "missing.crt"))
        with pytest.raises(BrokerUrlError, match="ACCEPT_MQTT_CAFILE"):
            url.client_kwargs()
    finally:
        fleet.broker.cleanup()


# -- (f) the CLI ---------------------------------------------------------------------------
def test_add_device_twice_replaces_password_and_keeps_one_acl_block(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "fb"
    assert main(["init", str(d)]) == 0
    assert main(["add-device", "pi-a", "--dir", str(d), "--host", "broker.lan"]) == 0
    first = capsys.readouterr().out
    assert "python -m device_agent --broker mqtt://pi-a:" in first
    assert "@broker.lan:1883 --device-id pi-a" in first
    assert main(["add-device", "pi-a", "--dir", str(d), "--password", "n3w p@ss"]) == 0
    out = capsys.readouterr().out
    assert "n3w p@ss" not in out and "n3w%20p%40ss" not in out  # a typed password is not echoed
    fd = FleetDir(d)
    acl, passwd = fd.acl.read_text(), fd.passwd.read_text()
    assert acl.count("user pi-a") == 1 and acl.count("BEGIN accept-mqtt device pi-a") == 1
    assert acl.count("topic write accept/devices/pi-a/status") == 1
    assert passwd.count("pi-a:") == 1
    entry = password_entry(passwd, "pi-a")
    assert entry is not None and check_password("n3w p@ss", entry)
    assert main(["add-coordinator", "coord", "--dir", str(d)]) == 0
    assert main(["add-device", "pi-a", "--dir", str(d), "--keep-password", "--root", "lab"]) == 0
    acl = fd.acl.read_text()
    assert acl.count("user pi-a") == 1 and "topic write lab/devices/pi-a/status" in acl
    assert check_password("n3w p@ss", password_entry(fd.passwd.read_text(), "pi-a") or "")
    assert acl_roles(acl) == {"pi-a": "device", "coord": "coordinator"}
    assert main(["remove", "pi-a", "--dir", str(d)]) == 0
    assert acl_roles(fd.acl.read_text()) == {"coord": "coordinator"}
    assert password_entry(fd.passwd.read_text(), "pi-a") is None
    assert "user pi-a" not in fd.acl.read_text()


@pytest.mark.parametrize("argv, message", [
    (["add-device", "pi/b"], "device id 'pi/b' must match"),
    (["add-device", "pi+"], "device id 'pi+' must match"),
    (["add-device", "a:b"], "device id 'a:b' must match"),
    (["add-device", "#"], "device id '#' must match"),
    (["add-monitor", "x" * 65], "must match"),
    (["add-device", "ok", "--root", "a/+"], "topic root 'a/+'"),
    (["add-device", "ok", "--dir", "{tmp}/missing"], "no such directory"),
    (["init", "{tmp}/fb"], "already exists; use --force"),
    (["remove", "ghost"], "ghost: no such user"),
    (["run", "--dir", "{tmp}/missing"], "no such config"),
])
def test_cli_errors_are_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            argv: list[str], message: str) -> None:
    d = tmp_path / "fb"
    init_fleet(d)
    before = (FleetDir(d).acl.read_text(), FleetDir(d).passwd.read_text())
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if "--dir" not in argv and argv[0] != "init":
        argv += ["--dir", str(d)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert (FleetDir(d).acl.read_text(), FleetDir(d).passwd.read_text()) == before


def test_hand_written_user_block_is_not_duplicated(tmp_path: Path) -> None:
    fd = init_fleet(tmp_path / "fb")
    fd.acl.write_text(fd.acl.read_text() + "user pi-a\ntopic readwrite accept/#\n")
    with pytest.raises(Exception, match="hand-written 'user pi-a'"):
        add_client(fd.path, "pi-a", "device")
    assert password_entry(fd.passwd.read_text(), "pi-a") is None


def test_password_hash_is_mosquittos_format() -> None:
    h = hash_password("secret", salt=b"0123456789ab")
    kind, iterations, salt, digest = h.split("$")[1:]
    assert (kind, iterations, salt) == ("7", "101", "MDEyMzQ1Njc4OWFi")
    assert len(digest) == 88 and check_password("secret", h) and not check_password("x", h)


def test_accept_mqtt_broker_command_is_wired(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from accept_mqtt.cli import main as cli_main

    assert cli_main(["broker", "init", str(tmp_path / "fb")]) == 0
    assert cli_main(["broker", "add-monitor", "mon", "--dir", str(tmp_path / "fb")]) == 0
    assert "accept-mqtt monitor --broker mqtt://mon:" in capsys.readouterr().out
    conf = (tmp_path / "fb" / "fleet.conf").read_text()
    assert f"password_file {(tmp_path / 'fb').resolve()}/passwd" in conf
    assert "allow_anonymous false" in conf and "@DIR@" not in conf
    embedded = (Path(__file__).resolve().parent.parent / "mosquitto.conf").read_text()
    assert "listener 1883 127.0.0.1" in embedded and "fleet.conf" in embedded
    assert acl_roles((tmp_path / "fb" / "acl").read_text()) == {"mon": "monitor"}
