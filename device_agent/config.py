"""The device agent's settings: one table, read from flags, the environment and a TOML file.

Every setting is one row of ``SETTINGS`` (name, flag, environment variable, TOML key, kind,
validator, default, help): the argument parser, the environment and TOML readers, the error
messages, ``--print-config`` and docs/deployment.md all come from that table.

Guarantees (``resolve``):

* Priority, highest first: a flag on the command line, the environment (``ACCEPT_MQTT_*``),
  the TOML file (``--config FILE`` or ``$ACCEPT_MQTT_CONFIG``), the built-in default.
* A value that does not parse or validate raises ``SettingError`` naming the setting, the
  value and where it came from (``--threads``, ``ACCEPT_MQTT_THREADS`` or ``threads in
  /etc/accept-mqtt/agent.toml``); so does a TOML key the table does not know, and a TOML
  value of the wrong type (a string where a number belongs). Nothing is replaced silently.
* The password has no flag: a command line is visible to every user of the machine (``ps``),
  so it comes from ``$ACCEPT_MQTT_PASSWORD`` or the TOML file (keep that file private).
  ``--print-config`` never prints it.
"""

from __future__ import annotations

import argparse
import os
import socket
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from accept_mqtt.model.footprint import parse_bytes
from accept_mqtt.wire.broker_url import (
    CAFILE_ENV,
    PASSWORD_ENV,
    parse_bandwidth,
    parse_broker_url,
    parse_latency,
)
from accept_mqtt.wire.topics import Topics, check_id
from device_agent.agent import AgentConfig
from device_agent.trace import parse_steps

CONFIG_ENV = "ACCEPT_MQTT_CONFIG"
Kind = Literal["str", "int", "float", "bool", "list"]
Source = Literal["flag", "env", "toml", "default"]


class SettingError(ValueError):
    """A setting that cannot be used; the message names the setting and its source."""


@dataclass(frozen=True)
class Setting:
    name: str  # also the TOML key
    kind: Kind
    help: str
    default: Any = None
    check: Callable[[Any], Any] | None = None  # value -> value to use; ValueError if bad
    flag: str | None = ""  # "" -> --name-with-dashes; None -> no flag (secrets)
    env: str | None = ""  # "" -> ACCEPT_MQTT_NAME
    metavar: str | None = None

    @property
    def flag_name(self) -> str | None:
        return "--" + self.name.replace("_", "-") if self.flag == "" else self.flag

    @property
    def env_name(self) -> str | None:
        return "ACCEPT_MQTT_" + self.name.upper() if self.env == "" else self.env


def _at_least(lo: float, *, above: bool = False) -> Callable[[Any], Any]:
    """A check that a number is ``>= lo`` (``> lo`` with ``above``); NaN fails either way."""
    def check(v: Any) -> Any:
        if not (v > lo if above else v >= lo):  # `not`: a NaN compares false, and fails
            raise ValueError(f"must be {'>' if above else '>='} {lo:g}")
        return v
    return check


def _keepalive(v: int) -> int:
    if not 1 <= v <= 65535:
        raise ValueError("must be 1..65535 seconds")
    return v


def _broker(v: str) -> str:
    parse_broker_url(v)
    return v


def _root(v: str) -> str:
    Topics(v)
    return v


def _device_id(v: str) -> str:
    return check_id("device", v)


def _cafile(v: str) -> str:
    if not os.path.isfile(v):
        raise ValueError("no such file")
    return v


def _dirs(v: list[str]) -> tuple[str, ...]:
    for d in v:
        if not os.path.isdir(d):
            raise ValueError(f"{d} is not a directory")
    return tuple(os.path.abspath(d) for d in v)


def _steps(v: list[str]) -> tuple[int, ...]:
    return parse_steps(",".join(str(s) for s in v))


def _memory(v: str | None) -> int | None:
    return None if v is None else parse_bytes(str(v))


# The table. Its order is the order of --help and --print-config.
SETTINGS: tuple[Setting, ...] = (
    Setting("broker", "str", "mqtt://[user@]host[:port] or mqtts:// for TLS",
            "mqtt://127.0.0.1:1883", _broker, metavar="URL"),
    Setting("username", "str", "MQTT user name, if the broker URL has none", metavar="NAME"),
    Setting("password", "str", "MQTT password (environment or TOML only: a flag would show "
            "in ps)", flag=None, env=PASSWORD_ENV),
    Setting("cafile", "str", "CA certificates that sign an mqtts:// broker's certificate "
            "(default: the system's)", check=_cafile, env=CAFILE_ENV, metavar="FILE"),
    Setting("device_id", "str", "[A-Za-z0-9_-]{1,64}; default: the host name",
            None, _device_id, metavar="ID"),
    Setting("root", "str", "topic root", "accept", _root),
    Setting("threads", "int", "torch threads for compute", 1, _at_least(1), metavar="N"),
    Setting("slowdown", "float", "emulate a device this many times slower (sleeps after "
            "compute)", 1.0, _at_least(1.0), metavar="S"),
    Setting("bandwidth", "str", "emulate a slower uplink, e.g. 20mbit (paces this agent's "
            "sends)", None, parse_bandwidth, metavar="RATE"),
    Setting("pace", "bool", "pace sends to --bandwidth; --no-pace only advertises it (the "
            "link is shaped elsewhere: tc, or a real slow link)", True),
    Setting("latency", "str", "emulate this one-way latency on every frame and event the "
            "agent publishes (a delay line; order kept)", "0", parse_latency, metavar="10ms"),
    Setting("trace_steps", "list", "publish compute/send spans of these optimizer steps on "
            "{root}/jobs/{job}/trace/{device} (timeline plots)", [], _steps,
            metavar="N[,N...]"),
    Setting("keepalive", "int", "MQTT keepalive seconds; a dead agent is marked offline "
            "after 1.5x this", 10, _keepalive, metavar="SECONDS"),
    Setting("memory_limit", "str", "memory a stage may use, e.g. 512MB (K/M/G = 1024^n); "
            "default: the device's memory x 0.8 less 300 MB", None, _memory, metavar="SIZE"),
    Setting("model_path", "list", "directories a user's model (MODULE:FACTORY) is imported "
            "from or its .py file found in (flag repeatable; env: separated by "
            f"'{os.pathsep}')", [], _dirs, metavar="DIR"),
    Setting("lease", "float", "leave a job whose coordinator was not heard alive for this "
            "long, if shorter than the coordinator's own lease (default: the coordinator's)",
            None, _at_least(0, above=True), metavar="SECONDS"),
    Setting("heartbeat", "float", "seconds between progress heartbeats while in a job (how "
            "the coordinator tells a hung device from a slow one); 0: none", 1.0,
            _at_least(0.0), metavar="SECONDS"),
    Setting("fault_hang_at_step", "int", "FAULT INJECTION for tests and drills: from "
            "optimizer step N on, the stage's compute blocks for ever while the connection "
            "stays up", None, _at_least(0), metavar="N"),
    Setting("verbose", "bool", "debug logging", False, flag="--verbose"),
)
BY_NAME = {s.name: s for s in SETTINGS}


def _where(s: Setting, source: Source, config_path: str | None) -> str:
    if source == "flag":
        return str(s.flag_name)
    if source == "env":
        return f"${s.env_name}"
    if source == "toml":
        return f"{s.name} in {config_path}"
    return "the default"


def _from_text(s: Setting, text: str) -> Any:
    """A flag's or an environment variable's text as the setting's kind."""
    if s.kind == "str":
        return text
    if s.kind == "int":
        try:
            return int(text)
        except ValueError:
            raise ValueError("expected a whole number") from None
    if s.kind == "float":
        try:
            return float(text)
        except ValueError:
            raise ValueError("expected a number") from None
    if s.kind == "bool":
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected true/false, yes/no, on/off or 1/0")
    sep = "," if s.name == "trace_steps" else os.pathsep
    return [p for p in text.split(sep) if p.strip()]


def _from_toml(s: Setting, v: Any) -> Any:
    """A TOML value, type-checked against the setting's kind (a bool is not a number)."""
    ok = {"str": isinstance(v, str), "bool": isinstance(v, bool),
          "int": isinstance(v, int) and not isinstance(v, bool),
          "float": isinstance(v, int | float) and not isinstance(v, bool),
          "list": isinstance(v, list)}[s.kind]
    if s.name == "memory_limit" and isinstance(v, int) and not isinstance(v, bool):
        return str(v)  # a plain number of bytes
    if s.name == "trace_steps" and isinstance(v, int) and not isinstance(v, bool):
        return [v]
    if not ok:
        want = {"str": "a string", "int": "an integer", "float": "a number",
                "bool": "true or false", "list": "a list"}[s.kind]
        raise ValueError(f"expected {want}, got {type(v).__name__}")
    return float(v) if s.kind == "float" else v


def read_toml(path: str) -> dict[str, Any]:
    """The settings in a TOML file: top-level keys of the table, refused otherwise."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise SettingError(f"config file {path}: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SettingError(f"config file {path} is not valid TOML: {e}") from None
    unknown = sorted(set(data) - set(BY_NAME))
    if unknown:
        raise SettingError(f"config file {path}: unknown setting(s) {unknown}; known: "
                           f"{sorted(BY_NAME)}")
    return data


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m device_agent",
        description="accept-mqtt device agent: runs the pipeline stage a plan gives it. "
                    "Each setting is taken from its flag, else its ACCEPT_MQTT_* variable, "
                    f"else the TOML file (--config or ${CONFIG_ENV}), else its default.",
    )
    p.add_argument("--config", metavar="FILE", default=None,
                   help=f"TOML file of settings (keys as below; env {CONFIG_ENV})")
    for s in SETTINGS:
        if s.flag_name is None:
            continue
        shown = s.default not in (None, [], "0") and s.name != "verbose"
        env = f" (default {s.default}; env {s.env_name})" if shown else f" (env {s.env_name})"
        if s.kind == "bool":
            names = [s.flag_name, "-v"] if s.name == "verbose" else [s.flag_name]
            p.add_argument(*names, dest=s.name, default=None,
                           action=argparse.BooleanOptionalAction, help=s.help + env)
        else:
            p.add_argument(s.flag_name, dest=s.name, default=None, metavar=s.metavar,
                           action="append" if s.name == "model_path" else "store",
                           help=s.help + env)
    p.add_argument("--print-config", action="store_true",
                   help="print the settings in effect (as TOML, each with its source) and exit")
    p.add_argument("--print-systemd-unit", action="store_true",
                   help="print a systemd unit that runs this agent as a service and exit")
    return p


@dataclass(frozen=True)
class Resolved:
    """The settings in effect: each value after its validator, and where it came from."""

    values: dict[str, Any]
    sources: dict[str, Source]
    config_path: str | None

    def agent_config(self) -> AgentConfig:
        v = self.values
        return AgentConfig(
            broker=v["broker"], device_id=v["device_id"], root=v["root"], threads=v["threads"],
            slowdown=v["slowdown"], bandwidth_bps=v["bandwidth"], keepalive=v["keepalive"],
            pace=v["pace"], trace_steps=v["trace_steps"], memory_limit=v["memory_limit"],
            model_path=v["model_path"], latency_s=v["latency"], lease=v["lease"],
            heartbeat=v["heartbeat"], fault_hang_at_step=v["fault_hang_at_step"])

    def client_env(self) -> dict[str, str]:
        """What ``BrokerUrl.client_kwargs`` reads from the environment at each (re)connect:
        the password and CA file, wherever they were set."""
        out = {}
        if self.values["password"] is not None:
            out[PASSWORD_ENV] = self.values["password"]
        if self.values["cafile"] is not None:
            out[CAFILE_ENV] = self.values["cafile"]
        return out

    def toml(self) -> str:
        """The settings as a TOML file, each with its source; the password left out."""
        lines = []
        for s in SETTINGS:
            raw = self.values[s.name]
            src = _where(s, self.sources[s.name], self.config_path)
            if s.name == "password":
                lines.append(f"# password: {'set' if raw else 'not set'} ({src})")
                continue
            shown = _toml_value(s, raw)
            lines.append(f"# {s.name} = (none)  # {src}" if shown is None
                         else f"{s.name} = {shown}  # {src}")
        return "\n".join(lines) + "\n"


def _toml_value(s: Setting, v: Any) -> str | None:
    if v is None:
        return None
    if s.name == "bandwidth":  # bits/s, in a form parse_bandwidth reads back exactly
        return f'"{v:.0f}"'
    if s.name == "latency":
        return '"' + f"{v * 1e3:.6f}".rstrip("0").rstrip(".") + 'ms"' if v else None
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, tuple | list):
        return "[" + ", ".join(_toml_value(s, x) or "" for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def resolve(args: argparse.Namespace, env: Mapping[str, str]) -> Resolved:
    """The settings in effect from parsed flags, an environment and the TOML file they name.

    Raises ``SettingError`` naming the first bad setting and its source.
    """
    config_path = args.config or env.get(CONFIG_ENV) or None
    toml = read_toml(config_path) if config_path else {}
    values: dict[str, Any] = {}
    sources: dict[str, Source] = {}
    for s in SETTINGS:
        flag_v = getattr(args, s.name, None)
        raw: Any
        if flag_v is not None:
            source, raw = "flag", flag_v
        elif s.env_name and env.get(s.env_name, "") != "":
            source, raw = "env", env[s.env_name]
        elif s.name in toml:
            source, raw = "toml", toml[s.name]
        else:
            source, raw = "default", s.default
        where = _where(s, source, config_path)
        try:
            if source in ("flag", "env") and isinstance(raw, str):
                raw = _from_text(s, raw)
            elif source == "toml":
                raw = _from_toml(s, raw)
            if s.name == "device_id" and raw is None:
                raw = socket.gethostname().split(".")[0]
            value = s.check(raw) if s.check is not None and raw is not None else raw
        except ValueError as e:
            shown = "***" if s.name == "password" else repr(raw)
            raise SettingError(f"setting {s.name} = {shown} (from {where}): {e}") from None
        values[s.name], sources[s.name] = value, source
    values["broker"] = _with_user(values, sources, config_path)
    return Resolved(values, sources, config_path)


def _with_user(values: dict[str, Any], sources: dict[str, Source],
               config_path: str | None) -> str:
    """The broker URL with ``username`` put in; a password without any user name, or two
    different user names, is refused rather than ignored."""
    def where(name: str) -> str:
        return _where(BY_NAME[name], sources[name], config_path)

    broker: str = values["broker"]
    url = parse_broker_url(broker)
    user = values["username"]
    if user is not None and url.username is not None and user != url.username:
        raise SettingError(f"setting username = {user!r} (from {where('username')}) differs "
                           f"from the user {url.username!r} in the broker URL")
    if user is not None and url.username is None:
        scheme, rest = (broker if "://" in broker else "mqtt://" + broker).split("://", 1)
        return f"{scheme}://{quote(user, safe='')}@{rest}"
    if values["password"] is not None and url.username is None:
        raise SettingError(f"setting password (from {where('password')}) is set but no user "
                           "name is: give the broker URL one (mqtt://USER@host) or set "
                           "username")
    return broker


def load(argv: Sequence[str] | None = None,
         env: Mapping[str, str] | None = None) -> tuple[argparse.Namespace, Resolved]:
    """Parse ``argv`` and resolve the settings against ``env`` (default: os.environ)."""
    args = build_parser().parse_args(argv)
    return args, resolve(args, os.environ if env is None else env)
