"""The agent configured and run like a service: settings from flags, the environment and a
TOML file (flags first), bad values refused by name, the shipped systemd unit, and a clean
exit on SIGTERM (retained ``offline`` published by the agent, no Last Will) through a real
Mosquitto."""

from __future__ import annotations

import asyncio
import configparser
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import aiomqtt
import pytest

from accept_mqtt.wire.broker_url import PASSWORD_ENV
from broker import MosquittoBroker
from device_agent import config, service

from .conftest import wait_retained


def _load(argv: list[str], env: dict[str, str] | None = None) -> config.Resolved:
    return config.load(argv, env or {})[1]


def test_flags_win_over_the_environment_over_toml_over_defaults(tmp_path: Path) -> None:
    toml = tmp_path / "agent.toml"
    toml.write_text('broker = "mqtt://toml-host:1884"\nthreads = 3\nslowdown = 2\n'
                    'device_id = "from-toml"\nmodel_path = ["' + str(tmp_path) + '"]\n'
                    'memory_limit = "64MB"\ntrace_steps = [4, 2]\npace = false\n')
    env = {"ACCEPT_MQTT_CONFIG": str(toml), "ACCEPT_MQTT_THREADS": "2",
           "ACCEPT_MQTT_DEVICE_ID": "from-env"}
    r = _load(["--device-id", "from-flag"], env)
    v, src = r.values, r.sources
    assert (v["device_id"], src["device_id"]) == ("from-flag", "flag")
    assert (v["threads"], src["threads"]) == (2, "env")
    assert (v["broker"], src["broker"]) == ("mqtt://toml-host:1884", "toml")
    assert (v["slowdown"], v["memory_limit"], v["trace_steps"]) == (2.0, 64 * 2**20, (2, 4))
    assert v["pace"] is False and v["model_path"] == (str(tmp_path),)
    assert (v["keepalive"], src["keepalive"]) == (10, "default")
    cfg = r.agent_config()
    assert (cfg.device_id, cfg.threads, cfg.pace, cfg.memory_limit) == ("from-flag", 2, False,
                                                                        64 * 2**20)
    # a flag that turns a TOML bool back, and --config beating $ACCEPT_MQTT_CONFIG
    assert _load(["--pace"], env).values["pace"] is True
    other = tmp_path / "other.toml"
    other.write_text("threads = 5\n")
    assert _load(["--config", str(other)], {"ACCEPT_MQTT_CONFIG": str(toml)}).values[
        "threads"] == 5


@pytest.mark.parametrize("argv,env,toml,message", [
    (["--threads", "0"], {}, "", "setting threads = 0 (from --threads): must be >= 1"),
    ([], {"ACCEPT_MQTT_THREADS": "two"}, "",
     "setting threads = 'two' (from $ACCEPT_MQTT_THREADS): expected a whole number"),
    ([], {}, 'threads = "2"', "setting threads = '2' (from threads in {toml}): expected an "
     "integer, got str"),
    ([], {}, "slowdown = 0.5", "setting slowdown = 0.5 (from slowdown in {toml}): must be >= 1"),
    ([], {"ACCEPT_MQTT_DEVICE_ID": "pi/kitchen"}, "",
     "setting device_id = 'pi/kitchen' (from $ACCEPT_MQTT_DEVICE_ID): device id"),
    ([], {"ACCEPT_MQTT_BROKER": "http://h"}, "", "setting broker = 'http://h' (from "
     "$ACCEPT_MQTT_BROKER): broker URL 'http://h': scheme must be mqtt:// or mqtts://"),
    (["--bandwidth", "fast"], {}, "", "setting bandwidth = 'fast' (from --bandwidth)"),
    ([], {}, 'memory_limit = "lots"', "setting memory_limit = 'lots' (from memory_limit in "
     "{toml}): cannot read memory size 'lots'"),
    ([], {"ACCEPT_MQTT_PACE": "maybe"}, "", "setting pace = 'maybe' (from $ACCEPT_MQTT_PACE)"),
    (["--model-path", "/nonexistent-dir"], {}, "", "setting model_path = ['/nonexistent-dir'] "
     "(from --model-path): /nonexistent-dir is not a directory"),
    ([], {}, "treads = 2", "unknown setting(s) ['treads']"),
    ([], {}, "threads = ", "is not valid TOML"),
    ([], {PASSWORD_ENV: "s3cret"}, "", "setting password (from $ACCEPT_MQTT_PASSWORD) is set "
     "but no user name is"),
    (["--username", "bob", "--broker", "mqtt://alice@h"], {}, "",
     "setting username = 'bob' (from --username) differs from the user 'alice'"),
])
def test_a_bad_setting_is_refused_with_its_name_and_source(
        tmp_path: Path, argv: list[str], env: dict[str, str], toml: str, message: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(toml + "\n")
    with pytest.raises(config.SettingError) as e:
        _load(argv + ["--config", str(path)], env)
    assert message.format(toml=path) in str(e.value)
    assert "s3cret" not in str(e.value)


def test_password_never_on_a_command_line_or_printed(tmp_path: Path) -> None:
    assert "--password" not in config.build_parser().format_help()
    toml = tmp_path / "agent.toml"
    toml.write_text('password = "from-toml"\nusername = "pi-a"\n')
    r = _load(["--config", str(toml), "--broker", "mqtts://broker.lan"])
    assert r.values["broker"] == "mqtts://pi-a@broker.lan"  # the user put into the URL
    assert r.client_env() == {PASSWORD_ENV: "from-toml"}  # what client_kwargs reads
    assert "from-toml" not in r.toml() and "# password: set (password in" in r.toml()
    # the environment beats the file here too
    r = _load(["--config", str(toml)], {PASSWORD_ENV: "from-env"})
    assert r.client_env()[PASSWORD_ENV] == "from-env"


def test_the_agent_command_refuses_a_bad_setting_and_prints_its_config(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCEPT_MQTT")}
    bad = subprocess.run([sys.executable, "-m", "device_agent"], capture_output=True,
                         text=True, timeout=60, env=dict(env, ACCEPT_MQTT_KEEPALIVE="0"))
    assert bad.returncode == 2
    assert bad.stderr.strip() == ("device_agent: setting keepalive = 0 (from "
                                  "$ACCEPT_MQTT_KEEPALIVE): must be 1..65535 seconds")
    toml = tmp_path / "agent.toml"
    out = subprocess.run([sys.executable, "-m", "device_agent", "--print-config",
                          "--threads", "3", "--latency", "10ms", "--bandwidth", "20mbit",
                          "--memory-limit", "1.5GB"], capture_output=True,
                         text=True, timeout=60, env=dict(env, ACCEPT_MQTT_DEVICE_ID="pi-k"),
                         check=True).stdout
    assert 'device_id = "pi-k"  # $ACCEPT_MQTT_DEVICE_ID' in out
    assert "threads = 3  # --threads" in out
    # what it prints reads back as the same settings
    toml.write_text(out)
    again = _load(["--config", str(toml)])
    assert (again.values["device_id"], again.values["threads"], again.values["latency"],
            again.values["bandwidth"], again.values["memory_limit"]) == (
        "pi-k", 3, 0.01, 20e6, int(1.5 * 2**30))


def test_every_setting_is_documented_with_its_flag_and_variable() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "deployment.md").read_text()
    rows = {line.split("|")[1].strip(" `"): line for line in doc.splitlines()
            if line.startswith("| `")}
    assert set(rows) >= {s.name for s in config.SETTINGS}
    for s in config.SETTINGS:
        row = rows[s.name]
        assert f"`{s.env_name}`" in row, s.name
        assert (f"`{s.flag_name}`" in row) if s.flag_name else "(none)" in row, s.name


def _unit() -> configparser.ConfigParser:
    # systemd allows repeated keys; interpolation off: '%' means something else to systemd
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(service.systemd_unit())
    return cp


def test_systemd_unit_restarts_on_failure_reads_an_env_file_and_has_its_own_user() -> None:
    out = subprocess.run([sys.executable, "-m", "device_agent", "--print-systemd-unit"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert out == service.systemd_unit()
    unit = _unit()
    assert set(unit.sections()) == {"Unit", "Service", "Install"}
    s = unit["Service"]
    assert s["ExecStart"] == f"{sys.executable} -m device_agent"
    assert Path(s["ExecStart"].split()[0]).is_file()
    assert s["Restart"] == "on-failure" and s["RestartPreventExitStatus"] == "2"
    assert s["EnvironmentFile"].lstrip("-") == "/etc/accept-mqtt/agent.env"
    assert s["User"] == "accept-mqtt" and s["DynamicUser"] == "yes"
    assert s["KillSignal"] == "SIGTERM"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    assert "@" not in s["ExecStart"]  # the placeholder was filled


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed here (Debian package systemd)")
    path = tmp_path / "accept-mqtt-agent.service"
    path.write_text(service.systemd_unit())
    ok = subprocess.run([tool, "verify", str(path)], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and str(path) not in ok.stderr, ok.stderr
    # the check can fail: a unit with a bad restart policy and a missing program does
    path.write_text(service.systemd_unit("/nonexistent/python").replace(
        "Restart=on-failure", "Restart=sometimes"))
    bad = subprocess.run([tool, "verify", str(path)], capture_output=True, text=True, timeout=60)
    assert "sometimes" in bad.stderr and "/nonexistent/python" in bad.stderr


def test_sigterm_publishes_offline_itself_and_no_last_will(broker: MosquittoBroker) -> None:
    """SIGTERM: the agent's own ``offline`` (reason ``shutdown``) and exit 0; the Last Will
    (reason ``connection lost``) never shows. A SIGKILLed agent beside it shows the Will, so
    the two are told apart on the wire."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCEPT_MQTT")}
    env.update(ACCEPT_MQTT_BROKER=broker.url, ACCEPT_MQTT_KEEPALIVE="5")

    def start(dev: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "device_agent", "--device-id", dev],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)

    async def main() -> dict[str, list[dict]]:
        seen: dict[str, list[dict]] = {"term-a": [], "kill-b": []}
        async with aiomqtt.Client(broker.host, broker.port) as c:
            await c.subscribe("accept/devices/+/status", qos=1)
            procs = {dev: start(dev) for dev in seen}
            try:
                async def until(pred: object) -> None:
                    async for msg in c.messages:
                        dev = str(msg.topic).split("/")[2]
                        seen[dev].append(json.loads(bytes(msg.payload or b"{}")))
                        if pred():  # type: ignore[operator]
                            return

                def last(dev: str) -> str | None:
                    return seen[dev][-1].get("state") if seen[dev] else None

                async with asyncio.timeout(60):
                    await until(lambda: last("term-a") == "online" == last("kill-b"))
                procs["term-a"].send_signal(signal.SIGTERM)
                procs["kill-b"].send_signal(signal.SIGKILL)
                async with asyncio.timeout(30):
                    await until(lambda: last("term-a") == "offline" == last("kill-b"))
                assert await asyncio.to_thread(procs["term-a"].wait, 30) == 0
                # anything that would still come (a late Will) comes within this second
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await until(lambda: False)
            finally:
                for p in procs.values():
                    if p.poll() is None:
                        p.kill()
                    p.wait()
        return seen

    seen = asyncio.run(main())
    term = [m for m in seen["term-a"] if m.get("state") == "offline"]
    assert [m.get("reason") for m in term] == ["shutdown"], seen["term-a"]
    killed = [m for m in seen["kill-b"] if m.get("state") == "offline"]
    assert [m.get("reason") for m in killed] == ["connection lost"], seen["kill-b"]
    # and the retained status a newcomer reads is the agent's own goodbye
    final = asyncio.run(wait_retained(broker.url, "accept/devices/term-a/status",
                                      lambda b: True, 10))
    assert (final["state"], final["reason"]) == ("offline", "shutdown")
