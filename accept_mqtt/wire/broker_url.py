"""Parse ``mqtt://[user[:password]@]host[:port][?protocol=5|3.1.1]`` (and ``mqtts://`` for TLS).

Clients speak MQTT 5 unless the URL asks for 3.1.1 (``?protocol=3.1.1``), for brokers that
do not speak 5 (e.g. amqtt): MQTT 5 is what makes a broker say why it dropped a message
(``wire.mqtt.PublishRefused``) instead of dropping it silently.

The password may instead come from ``$ACCEPT_MQTT_PASSWORD`` and the CA of a TLS broker from
``$ACCEPT_MQTT_CAFILE`` (``BrokerUrl.client_kwargs``), keeping secrets off command lines.

Also units for link speeds, e.g. ``20mbit`` (the ``--bandwidth`` flag), so the agent and the
coordinator read them the same way.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import aiomqtt

PASSWORD_ENV = "ACCEPT_MQTT_PASSWORD"
CAFILE_ENV = "ACCEPT_MQTT_CAFILE"
# ``?protocol=`` values -> the MQTT version a client asks for
PROTOCOLS = {"5": aiomqtt.ProtocolVersion.V5, "3.1.1": aiomqtt.ProtocolVersion.V311}


class BrokerUrlError(ValueError):
    pass


def _tls_context(cafile: str | None) -> ssl.SSLContext:
    """A verifying client context: the given CA file's certificates, else the system's."""
    try:
        return ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as e:
        raise BrokerUrlError(f"{CAFILE_ENV}={cafile!r}: cannot load CA certificates: "
                             f"{getattr(e, 'strerror', None) or e}") from None


@dataclass(frozen=True)
class BrokerUrl:
    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never in logs or tracebacks
    tls: bool = False
    protocol: str = "5"  # a key of PROTOCOLS

    def client_kwargs(self, env: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Keyword arguments for ``aiomqtt.Client``.

        Guarantees (``env`` defaults to ``os.environ``, read at each call):

        * A URL with a username and no password takes the password from
          ``$ACCEPT_MQTT_PASSWORD``, so it need not appear on a command line; a password in
          the URL always wins, and the variable is ignored for a URL without a username.
        * ``protocol`` is the URL's MQTT version (5 unless ``?protocol=3.1.1``).
        * ``mqtts://`` verifies the broker's certificate and host name against the CA file
          ``$ACCEPT_MQTT_CAFILE`` when set, else against the system's CAs; an unreadable CA
          file raises ``BrokerUrlError`` naming it. Plain ``mqtt://`` ignores the variable.

        >>> parse_broker_url("mqtt://pi@h").client_kwargs({PASSWORD_ENV: "s3"})["password"]
        's3'
        """
        env = os.environ if env is None else env
        # TCP_NODELAY: frames are latency-bound request/response traffic; Nagle's algorithm
        # would hold small frames back for up to a delayed-ACK period (tens of ms) per hop.
        kw: dict[str, Any] = {"hostname": self.host, "port": self.port,
                              "protocol": PROTOCOLS[self.protocol],
                              "socket_options": [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]}
        if self.username is not None:
            kw["username"] = self.username
            kw["password"] = self.password if self.password is not None else (
                env.get(PASSWORD_ENV) or None)
        if self.tls:
            kw["tls_context"] = _tls_context(env.get(CAFILE_ENV) or None)
        return kw

    def __str__(self) -> str:
        scheme = "mqtts" if self.tls else "mqtt"
        user = f"{self.username}@" if self.username else ""
        query = "" if self.protocol == "5" else f"?protocol={self.protocol}"
        return f"{scheme}://{user}{self.host}:{self.port}{query}"


def parse_broker_url(url: str) -> BrokerUrl:
    """The parts of a broker URL; a bad scheme, host or port raises ``BrokerUrlError``.

    >>> parse_broker_url("mqtt://pi:secret@10.0.0.2:1884")
    BrokerUrl(host='10.0.0.2', port=1884, username='pi', tls=False, protocol='5')
    >>> parse_broker_url("mqtt://h?protocol=3.1.1").protocol
    '3.1.1'
    """
    if "://" not in url:
        url = "mqtt://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise BrokerUrlError(f"broker URL {url!r}: scheme must be mqtt:// or mqtts://")
    tls = parts.scheme in ("mqtts", "ssl")
    if not parts.hostname:
        raise BrokerUrlError(f"broker URL {url!r} has no host")
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError as e:
        raise BrokerUrlError(f"broker URL {url!r}: {e}") from None
    protocol = "5"
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key != "protocol":
            raise BrokerUrlError(f"broker URL {url!r}: unknown option {key!r}; the only one "
                                 "is ?protocol=5 or ?protocol=3.1.1")
        if value not in PROTOCOLS:
            raise BrokerUrlError(f"broker URL {url!r}: protocol {value!r} is not one of "
                                 f"{', '.join(PROTOCOLS)}")
        protocol = value
    return BrokerUrl(parts.hostname, port,
                     unquote(parts.username) if parts.username else None,
                     unquote(parts.password) if parts.password else None, tls, protocol)


_RATE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmg]?)(bit|bps|b)?(/s)?\s*$", re.I)


def parse_bandwidth(text: str | None) -> float | None:
    """Bits per second from ``20mbit``, ``500kbit``, ``1gbit`` or a plain number; None for none.

    >>> parse_bandwidth("20mbit")
    20000000.0
    """
    if text is None or str(text).strip().lower() in ("", "none", "0", "inf", "unlimited"):
        return None
    m = _RATE.match(str(text))
    if not m:
        raise ValueError(f"bandwidth {text!r}: use e.g. 20mbit, 500kbit or bits/s")
    mult = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2).lower()]
    value = float(m.group(1)) * mult
    if value <= 0:
        raise ValueError(f"bandwidth {text!r} must be positive")
    return value


_LATENCY = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(us|ms|s)?\s*$", re.I)


def parse_latency(text: str | None) -> float:
    """Seconds from ``10ms``, ``500us``, ``0.01s`` or a plain number of milliseconds; 0 for none.

    >>> parse_latency("10ms")
    0.01
    """
    if text is None or str(text).strip().lower() in ("", "none", "0"):
        return 0.0
    m = _LATENCY.match(str(text))
    if not m:
        raise ValueError(f"latency {text!r}: use e.g. 10ms, 500us or 0.01s")
    unit = (m.group(2) or "ms").lower()
    return float(m.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[unit]
