"""``accept-mqtt dashboard``: a read-only live page of a broker's devices and jobs, in a browser.

This command only serves files: the page (``static/dashboard.html``, ``dashboard.js``) and a
small MQTT 3.1.1 subscriber over WebSocket (``static/mqttws.js``) connect from the browser
straight to the broker's websockets listener (``listener 9001`` + ``protocol websockets`` in
the shipped Mosquitto configs), subscribe to the same small JSON topics as ``accept-mqtt
monitor`` (docs/monitoring.md) and draw the devices, the plan, loss and accuracy curves and
each stage's compute / send / idle share of recent steps.

Guarantees:

* Read-only by construction: the browser's client has no PUBLISH packet at all, and the
  server answers GET and HEAD for its four paths only (``/``, the two scripts,
  ``/config.json``); anything else is 404, a write method 501.
* ``/config.json`` carries the WebSocket URL, the topic root, the job filter and the user
  name and password the page connects with (``--broker ws://NAME@host:9001``, the password
  from ``$ACCEPT_MQTT_PASSWORD`` or the URL). Whoever can load the page can read that
  password, so give the dashboard a monitor account (``accept-mqtt broker add-monitor``:
  the broker's ACL lets it read, never write) and keep ``--listen`` on loopback (the
  default) unless the network is trusted.
* Works offline: nothing is loaded from anywhere but this server and the broker.
* A bad ``--broker``, root or job is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import unquote, urlsplit

from accept_mqtt.wire.broker_url import PASSWORD_ENV
from accept_mqtt.wire.topics import TopicError, Topics, check_id

STATIC = {"/": ("dashboard.html", "text/html; charset=utf-8"),
          "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
          "/mqttws.js": ("mqttws.js", "text/javascript; charset=utf-8")}


class DashboardError(ValueError):
    """A bad argument: one line, exit code 2."""


@dataclass(frozen=True)
class DashboardConfig:
    """What the page is told (``/config.json``)."""

    ws_url: str  # ws://host:port/ without credentials: what the browser opens
    username: str | None
    password: str | None
    root: str = "accept"
    job: str | None = None

    def to_json(self) -> bytes:
        shown = urlsplit(self.ws_url)
        user = f"{self.username}@" if self.username else ""
        return json.dumps({"ws_url": self.ws_url, "username": self.username,
                           "password": self.password, "root": self.root, "job": self.job,
                           "display_url": f"{shown.scheme}://{user}{shown.netloc}"}).encode()


def parse_ws_url(url: str, env: dict[str, str] | None = None) -> tuple[str, str | None,
                                                                        str | None]:
    """(URL without credentials, user, password) of ``ws[s]://[user[:password]@]host[:port]``.

    The password comes from ``$ACCEPT_MQTT_PASSWORD`` when the URL has a user and no
    password, as for every other command.

    >>> parse_ws_url("ws://mon:s3@h:9001", {})
    ('ws://h:9001/', 'mon', 's3')
    """
    env = dict(os.environ) if env is None else env
    parts = urlsplit(url if "://" in url else "ws://" + url)
    if parts.scheme not in ("ws", "wss"):
        raise DashboardError(f"--broker {url!r}: the page connects over WebSocket: use "
                             "ws://host:9001 (or wss://), the broker's websockets listener")
    if not parts.hostname:
        raise DashboardError(f"--broker {url!r} has no host")
    try:
        port = parts.port or (443 if parts.scheme == "wss" else 9001)
    except ValueError as e:
        raise DashboardError(f"--broker {url!r}: {e}") from None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    if user is not None and password is None:
        password = env.get(PASSWORD_ENV) or None
    return f"{parts.scheme}://{host}:{port}{parts.path or '/'}", user, password


def _static(name: str) -> bytes:
    return resources.files("accept_mqtt.cli").joinpath("static", name).read_bytes()


def make_server(cfg: DashboardConfig, host: str = "127.0.0.1",
                port: int = 8080) -> ThreadingHTTPServer:
    """An HTTP server for the page (not started: ``serve_forever()``); port 0 picks a free
    one (``server.server_address``)."""
    config = cfg.to_json()

    class Handler(BaseHTTPRequestHandler):
        server_version = "accept-mqtt-dashboard"

        def _send(self, head_only: bool) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/config.json":
                body, ctype = config, "application/json"
            elif path in STATIC:
                name, ctype = STATIC[path]
                body = _static(name)
            else:
                self.send_error(HTTPStatus.NOT_FOUND)
                return
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if not head_only:
                self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            self._send(head_only=False)

        def do_HEAD(self) -> None:  # noqa: N802
            self._send(head_only=True)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass  # one line per request would drown the terminal

    return ThreadingHTTPServer((host, port), Handler)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", nargs="?", default=None, metavar="JOB",
                   help="show only this job (default: the most recently active one)")
    p.add_argument("--broker", default="ws://127.0.0.1:9001",
                   help="the broker's websockets listener, ws://[user[:password]@]host[:port] "
                        f"or wss://; a user without password takes ${PASSWORD_ENV} "
                        "(default ws://127.0.0.1:9001)")
    p.add_argument("--root", default="accept", help="topic root (default: accept)")
    p.add_argument("--listen", default="127.0.0.1",
                   help="address the page is served on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="HTTP port (default 8080; 0: any)")


def config_from_args(args: argparse.Namespace) -> DashboardConfig:
    Topics(args.root)
    if args.job is not None:
        check_id("job", args.job)
    ws_url, user, password = parse_ws_url(args.broker)
    return DashboardConfig(ws_url, user, password, args.root, args.job)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
        server = make_server(cfg, args.listen, args.port)
    except (DashboardError, TopicError) as e:
        print(f"accept-mqtt dashboard: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"accept-mqtt dashboard: cannot listen on {args.listen}:{args.port}: "
              f"{e.strerror or e}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    print(f"dashboard of {cfg.ws_url} (root {cfg.root}"
          + (f", job {cfg.job}" if cfg.job else "") + f") on http://{host}:{port}/ "
          "(Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()  # until Ctrl-C (the command line reports it)
    finally:
        server.server_close()
    return 0
