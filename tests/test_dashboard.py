"""``accept-mqtt dashboard`` in a real headless Chromium, watching a live job on a fleet broker.

The broker runs the ``fleet.conf`` that ``accept-mqtt broker init`` writes (passwords, ACL,
the websockets listener); the page connects from the browser with the monitor account's
credentials, straight to the broker over MQTT over WebSockets.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from accept_mqtt.cli.dashboard import (
    DashboardConfig,
    DashboardError,
    make_server,
    parse_ws_url,
)
from accept_mqtt.coordinator import Coordinator
from accept_mqtt.coordinator.config import TrainConfig
from accept_mqtt.wire.broker_url import PASSWORD_ENV

from .chromium import Chromium, find_chromium
from .conftest import running_agents
from .test_security import Fleet, _make_fleet

JOB = "dash"
SCREENSHOT_ENV = "ACCEPT_DASHBOARD_SCREENSHOT"  # a path: also save the page as a PNG there


@pytest.fixture
def dashboard(tmp_path: Path) -> Iterator[tuple[Fleet, str]]:
    """A fleet broker (passwords, ACL, websockets listener) and the dashboard server for job
    ``JOB`` with the monitor's credentials: (the fleet, the page's URL)."""
    fleet = _make_fleet(tmp_path)
    assert fleet.broker.ws_url, "fleet.conf must have a websockets listener"
    cfg = DashboardConfig(fleet.broker.ws_url + "/", "mon", fleet.passwords["mon"], "accept",
                          JOB)
    server = make_server(cfg, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fleet, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        fleet.broker.cleanup()


SHOWN = """(() => {
  const devices = [...document.querySelectorAll('#devices tbody tr[data-device]')]
    .map((r) => [r.dataset.device, r.children[1].textContent]);
  const loss = document.getElementById('loss');
  const step = document.getElementById('step');
  return {conn: document.getElementById('conn').className, devices,
          plan: [...document.querySelectorAll('#plan tbody tr td:nth-child(2)')]
            .map((td) => td.textContent),
          loss: loss && loss.textContent, lossValue: loss && loss.dataset.value,
          step: step && Number(step.textContent),
          lossPoints: document.querySelectorAll('#losschart polyline').length,
          timelineBars: document.querySelectorAll('#timeline rect').length};
})()"""


def test_the_page_shows_the_jobs_devices_and_the_loss_it_published(
        dashboard: tuple[Fleet, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fleet, url = dashboard
    # a few steps of a tiny model; for the README's screenshot, two epochs of the digits CNN
    showcase = os.environ.get(SCREENSHOT_ENV)
    cfg = TrainConfig(model="cnn" if showcase else "mlp", dataset="digits",
                      epochs=2 if showcase else 1, batch_size=32, micro_batches=2,
                      max_steps=None if showcase else 12, seed=5, devices=2,
                      runs_dir=str(tmp_path / "runs"), device_timeout=20, step_timeout=30,
                      partition="flops")
    monkeypatch.setenv(PASSWORD_ENV, fleet.passwords["coord"])
    published: list[dict[str, Any]] = []
    if find_chromium() is None:
        pytest.fail("chromium is not installed: run 'make test' (it installs it) or "
                    "'apt-get install chromium'")

    with Chromium() as browser:
        page = browser.open(url)
        browser.wait_for(page, "document.getElementById('conn').className === 'connected'", 20)

        async def watch() -> None:  # what the job published, as the monitor account sees it
            async with fleet.client("mon") as c:
                await c.subscribe(f"accept/jobs/{JOB}/metrics")
                async for msg in c.messages:
                    published.append(json.loads(bytes(msg.payload or b"{}")))

        async def main() -> tuple[dict[str, Any], dict[str, Any]]:
            watcher = asyncio.create_task(watch())
            await asyncio.sleep(0.3)
            async with running_agents(fleet.url, ["pi-a", "pi-b"]):
                async with Coordinator(fleet.url("coord", password=False), cfg,
                                       job=JOB) as coord:
                    run = asyncio.create_task(coord.run())
                    # while the job runs: its devices busy on the page, a loss shown
                    live = await asyncio.to_thread(
                        browser.wait_for, page,
                        f"(s => s.devices.filter(d => d[1] === 'busy').length === 2 && s.loss"
                        f" && s)({SHOWN})", 60)
                    record = await run
                    # every step reached the page, the last one included
                    await asyncio.to_thread(browser.wait_for, page,
                                            f"({SHOWN}).step === {record['steps']}", 20)
                    if showcase:
                        browser.screenshot(page, showcase)
            watcher.cancel()
            return record, live

        record, live = asyncio.run(main())
        final = browser.evaluate(page, SHOWN)

    steps = record["steps"]
    assert steps == (12 if not showcase else steps)
    assert sorted(d for d, _ in live["devices"]) == ["pi-a", "pi-b"]
    assert live["plan"] == [s["device"] for s in record["plan"]["stages"]]
    losses = {m["step"]: m["loss"] for m in published if m.get("type") == "step"}
    assert final["step"] == steps and len(losses) == steps
    # the number the page shows is the loss the job published for that step
    assert float(final["lossValue"]) == losses[steps]
    assert final["loss"] == f"{losses[steps]:.4f}"
    assert float(live["lossValue"]) in losses.values()
    assert final["lossPoints"] == 1 and final["timelineBars"] > 0
    # read-only: the page's client published nothing (the log names every PUBLISH received)
    log = fleet.broker.log_path.read_text(errors="replace")
    assert "New client connected" in log and "accept-dashboard-" in log
    assert not [ln for ln in log.splitlines()
                if "Received PUBLISH from accept-dashboard-" in ln], "the page published"
    assert fleet.denied() == []


def test_server_serves_only_its_files_and_config(dashboard: tuple[Fleet, str]) -> None:
    url = dashboard[1]
    cfg = json.loads(urllib.request.urlopen(url + "config.json", timeout=5).read())
    assert cfg["username"] == "mon" and cfg["job"] == JOB and cfg["ws_url"].startswith("ws://")
    assert "mon@" in cfg["display_url"] and cfg["password"] not in cfg["display_url"]
    page = urllib.request.urlopen(url, timeout=5).read().decode()
    assert "mqttws.js" in page and "dashboard.js" in page
    js = urllib.request.urlopen(url + "mqttws.js", timeout=5).read().decode()
    assert "0x82" in js and "0x30" not in js, "the browser client has no PUBLISH encoder"
    for path, code in (("../pyproject.toml", 404), ("etc/passwd", 404)):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url + path, timeout=5)
        assert e.value.code == code
    req = urllib.request.Request(url, data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=5)
    assert e.value.code == 501


def test_ws_url_parsing() -> None:
    assert parse_ws_url("ws://mon@h:9001", {PASSWORD_ENV: "pw"}) == ("ws://h:9001/", "mon",
                                                                      "pw")
    assert parse_ws_url("h", {}) == ("ws://h:9001/", None, None)
    assert parse_ws_url("wss://h/mqtt", {})[0] == "wss://h:443/mqtt"
    for bad in ("mqtt://h:1883", "ws://:9001", "ws://h:99999"):
        with pytest.raises(DashboardError):
            parse_ws_url(bad, {})


def test_both_listeners_of_a_config_move_to_free_ports(tmp_path: Path) -> None:
    """The MQTT and the websockets listener each get their own port, whichever comes first;
    a config without a websockets listener gets none."""
    from broker import render_config, websockets_listeners

    text = ("listener 9001\nprotocol websockets\n\nlistener 1883\n"
            "#listener 8883\nallow_anonymous true\n")
    assert websockets_listeners(text.splitlines()) == [True, False]
    out = render_config(text, 4242, "127.0.0.1", tmp_path, persistence=False, ws_port=4343)
    assert out.splitlines()[:4] == ["listener 4343 127.0.0.1", "protocol websockets", "",
                                    "listener 4242 127.0.0.1"]
    assert "#listener 8883" in out
    plain = render_config("listener 1883\n", 4242, "127.0.0.1", tmp_path, persistence=False,
                          ws_port=None)
    assert "websockets" not in plain and "listener 4242 127.0.0.1" in plain


def test_the_command_serves_the_page_and_refuses_bad_arguments(tmp_path: Path) -> None:
    import subprocess
    import sys

    from accept_mqtt.cli import main as cli_main

    assert cli_main(["dashboard", "--broker", "mqtt://h:1883"]) == 2  # not a WebSocket URL
    assert cli_main(["dashboard", "bad/job"]) == 2
    proc = subprocess.Popen([sys.executable, "-m", "accept_mqtt.cli", "dashboard", "j1",
                             "--broker", "ws://mon@127.0.0.1:9001", "--port", "0"],
                            stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, **{PASSWORD_ENV: "pw"}))
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "dashboard of ws://... on http://127.0.0.1:PORT/ ..."
        url = line.split(" on ", 1)[1].split()[0]
        cfg = json.loads(urllib.request.urlopen(url + "config.json", timeout=5).read())
        assert cfg == {"ws_url": "ws://127.0.0.1:9001/", "username": "mon", "password": "pw",
                       "root": "accept", "job": "j1", "display_url": "ws://mon@127.0.0.1:9001"}
    finally:
        proc.terminate()
        proc.wait(10)
