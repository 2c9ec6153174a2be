"""A real headless Chromium, driven over the DevTools protocol on a pipe (no driver, no pip).

``Chromium`` starts Debian's ``chromium`` with ``--remote-debugging-pipe``: the browser reads
JSON commands (NUL-terminated) on its fd 3 and writes answers and events on fd 4. That is all
a test needs to open a page, read what it shows (``evaluate``), wait for something to appear
(``wait_for``) and take a screenshot, with nothing installed but the browser itself
(``broker/ensure_chromium.sh``, run by ``make setup``).
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Chromium:
    """``with Chromium() as b: page = b.open(url); b.wait_for(page, "expr", 10)``."""

    def __init__(self, width: int = 1280, height: int = 900) -> None:
        binary = find_chromium()
        if binary is None:
            raise RuntimeError("chromium is not installed: 'make setup' installs it "
                               "(apt-get install chromium)")
        self.profile = Path(tempfile.mkdtemp(prefix="accept-chromium-"))
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        # the child's ends well above 4, so "3<&r 4>&w" cannot overwrite one with the other
        to_child_r, from_child_w = (self._high(fd) for fd in (to_child_r, from_child_w))
        args = ["--headless", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                "--disable-background-networking", "--disable-dev-shm-usage",
                f"--user-data-dir={self.profile}", f"--window-size={width},{height}",
                "about:blank"]
        # the browser expects the pipe on fds 3 (commands) and 4 (answers); bash, because
        # dash's redirections take one-digit fds only
        self.proc = subprocess.Popen(
            ["bash", "-c", f'exec "$0" "$@" 3<&{to_child_r} 4>&{from_child_w}', binary, *args],
            pass_fds=(to_child_r, from_child_w), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_child_r)
        os.close(from_child_w)
        self._buf = b""
        self._next_id = 0

    @staticmethod
    def _high(fd: int) -> int:
        high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(fd)
        return high

    # -- the protocol ----------------------------------------------------------------------
    def send(self, method: str, params: dict[str, Any] | None = None,
             session: str | None = None, timeout: float = 30.0) -> dict[str, Any]:
        """Send one command and return its result (events in between are dropped)."""
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            msg["sessionId"] = session
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._next_id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return dict(reply.get("result", {}))
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise RuntimeError(f"chromium did not answer {method} in {timeout}s "
                                   f"(exit code {self.proc.poll()})")
            ready, _, _ = select.select([self._from_child], [], [], left)
            if ready:
                chunk = os.read(self._from_child, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self._buf += chunk

    def open(self, url: str) -> str:
        """A new tab on ``url``; its session id for ``evaluate``."""
        target = self.send("Target.createTarget", {"url": url})["targetId"]
        return str(self.send("Target.attachToTarget", {"targetId": target,
                                                       "flatten": True})["sessionId"])

    def evaluate(self, session: str, expression: str) -> Any:
        """The JSON value of a JavaScript expression in the page."""
        res = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True},
                        session)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expression!r}: {res['exceptionDetails']}")
        return res.get("result", {}).get("value")

    def wait_for(self, session: str, expression: str, timeout: float) -> Any:
        """Poll ``expression`` until it is truthy (an exception counts as not yet); its value
        (``AssertionError`` after ``timeout`` s, with the page's text)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = self.evaluate(session, expression)
            except RuntimeError:  # e.g. the page is still loading: its elements are not there
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                text = self.evaluate(session, "document.body ? document.body.innerText : ''")
                raise AssertionError(f"not true after {timeout}s: {expression}\npage:\n{text}")
            time.sleep(0.2)

    def screenshot(self, session: str, path: Path | str) -> None:
        """A PNG of the whole page."""
        size = self.evaluate(session, "[document.documentElement.scrollWidth,"
                                      " document.documentElement.scrollHeight]")
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": int(size[0]), "height": int(size[1]), "deviceScaleFactor": 1,
                   "mobile": False}, session)
        data = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport":
                                                    True}, session)["data"]
        Path(path).write_bytes(base64.b64decode(data))

    # -- lifetime --------------------------------------------------------------------------
    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("Browser.close", timeout=5)
            except (RuntimeError, OSError):
                pass  # gone already
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for fd in (self._to_child, self._from_child):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
