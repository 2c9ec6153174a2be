"""TensorBoard event files and Prometheus metrics of a run, read back with each tool's own
reader (``tensorboard``'s event accumulator, ``prometheus_client``'s text parser).

One real job (two agents, Mosquitto) feeds three exporters at once: ``train``'s TensorBoard
feed (the coordinator's progress calls), the monitor's TensorBoard sink and its Prometheus
endpoint (both from the metrics topic), scraped while the job runs and after it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

from accept_mqtt.cli import figures, tbevents
from accept_mqtt.cli.monitor import FleetView, watch
from accept_mqtt.cli.train import _TensorBoardFeed
from accept_mqtt.coordinator import Coordinator
from accept_mqtt.coordinator.config import TrainConfig
from accept_mqtt.wire.messages import StageCounters, StepMetric, encode
from broker import MosquittoBroker

from .conftest import running_agents


def _scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    ea = EventAccumulator(str(logdir))
    ea.Reload()
    return {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}


def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_event_bytes_are_what_tensorboards_own_writer_makes(tmp_path: Path) -> None:
    assert tbevents.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    ours = tbevents.event(1700000000.25, 42, scalars={"loss/train": 0.5, "stage0/busy": 0.125})
    theirs = event_pb2.Event(wall_time=1700000000.25, step=42, summary=summary_pb2.Summary(
        value=[summary_pb2.Summary.Value(tag="loss/train", simple_value=0.5),
               summary_pb2.Summary.Value(tag="stage0/busy", simple_value=0.125)]))
    assert ours == theirs.SerializeToString()
    first = event_pb2.Event(wall_time=3.0, file_version="brain.Event:2")
    assert tbevents.event(3.0, file_version="brain.Event:2") == first.SerializeToString()
    path = tmp_path / "theirs"
    with open(path, "wb") as f:
        RecordWriter(f).write(ours)
    assert path.read_bytes() == tbevents.record(ours)


def test_prometheus_listen_addresses() -> None:
    assert figures.parse_listen(":9108") == ("0.0.0.0", 9108)
    assert figures.parse_listen("127.0.0.1:0") == ("127.0.0.1", 0)
    assert figures.parse_listen("[::1]:9108") == ("::1", 9108)
    for bad in ("localhost:http", ":70000"):
        with pytest.raises(ValueError, match="--prometheus"):
            figures.parse_listen(bad)


def test_one_job_read_back_from_tensorboard_and_prometheus(broker: MosquittoBroker,
                                                           tmp_path: Path) -> None:
    cfg = TrainConfig(model="cnn", dataset="digits", devices=2, epochs=1, batch_size=32,
                      micro_batches=2, max_steps=8, seed=5, runs_dir=str(tmp_path / "runs"),
                      device_timeout=30, step_timeout=60, partition="equal")
    feed = _TensorBoardFeed(str(tmp_path / "tb-train"), "accept")
    sink = figures.TensorBoardSink(tmp_path / "tb-monitor")
    view = FleetView("accept", "fig")
    during: list[dict] = []

    async def main() -> tuple[dict[str, Any], dict]:
        server = await figures.serve_prometheus(view, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/metrics"
        ready = asyncio.Event()
        watcher = asyncio.create_task(watch(broker.url, "accept", "fig", view=view,
                                            ready=ready, on_message=sink.update))
        await ready.wait()

        async def scrape_while_running() -> None:
            while True:
                got = await asyncio.to_thread(_scrape, url)
                if got.get(("accept_mqtt_step", (("job", "fig"),)), 0) >= 2:
                    during.append(got)
                    return
                await asyncio.sleep(0.05)

        scraper = asyncio.create_task(scrape_while_running())
        async with running_agents(broker.url, ["fa", "fb"]):
            async with Coordinator(broker.url, cfg, job="fig", progress=feed) as coord:
                record = await coord.run()
        await asyncio.wait_for(scraper, 10)
        # the last step's and evaluation's metrics reach the monitor through the broker
        async with asyncio.timeout(10):
            while view.jobs["fig"].epoch is None or view.jobs["fig"].step.step < 8:
                await asyncio.sleep(0.05)
        after = await asyncio.to_thread(_scrape, url)
        watcher.cancel()
        server.close()
        return record, after

    record, after = asyncio.run(main())
    feed.sink.close()
    sink.close()
    assert during and during[0][("accept_mqtt_step", (("job", "fig"),))] < 8, \
        "scraped while the job ran"

    # TensorBoard, as train wrote it: one point per step, the record's figures
    tb = _scalars(tmp_path / "tb-train" / "fig")
    steps = list(range(1, 9))
    assert [s for s, _ in tb["loss/train"]] == steps
    assert [s for s, _ in tb["speed/samples_per_s"]] == steps
    assert all(v > 0 for _, v in tb["speed/samples_per_s"])
    final = record["epochs"][-1] if record.get("epochs") else None
    assert final is not None
    assert tb["accuracy/test"] == [(8, pytest.approx(final["test_accuracy"], rel=1e-6))]
    for st in record["stages"]:
        k = st["stage"]
        assert tb[f"stage{k}/busy_s"][-1][1] == pytest.approx(st["busy_ms"] / 1e3, rel=1e-3)
        fractions = [v for _, v in tb[f"stage{k}/busy_fraction"]]
        assert len(fractions) == 7 and all(0 < v <= 1 for v in fractions)
    (link,) = record["links"]
    assert tb["stage0/act_bytes"][-1][1] == pytest.approx(link["act_bytes"], rel=1e-6)
    assert tb["stage1/grad_bytes"][-1][1] == pytest.approx(link["grad_bytes"], rel=1e-6)
    assert "stage0/grad_bytes" not in tb and "stage1/act_bytes" not in tb  # no such link

    # the monitor's TensorBoard, from the wire: the same figures at the same steps
    tbm = _scalars(tmp_path / "tb-monitor" / "fig")
    for tag in ("loss/train", "accuracy/train", "stage1/busy_s", "stage0/act_bytes",
                "accuracy/test"):
        assert tbm[tag] == tb[tag], tag

    # Prometheus after the job: the last step's values, counters as the record counted
    job = ("job", "fig")
    assert after[("accept_mqtt_step", (job,))] == 8
    assert after[("accept_mqtt_train_loss", (job,))] == pytest.approx(tb["loss/train"][-1][1],
                                                                      rel=1e-6)
    assert after[("accept_mqtt_test_accuracy", (job,))] == pytest.approx(
        final["test_accuracy"])
    for st in record["stages"]:
        lb = (("device", st["device"]), job, ("stage", str(st["stage"])))
        assert after[("accept_mqtt_stage_busy_seconds_total", lb)] == pytest.approx(
            st["busy_ms"] / 1e3, rel=1e-3)
        assert 0 < after[("accept_mqtt_stage_busy_ratio", lb)] <= 1
    act = [v for (n, lb), v in after.items()
           if n == "accept_mqtt_link_bytes_total" and ("kind", "act") in lb]
    assert act == [link["act_bytes"]]


def test_monitor_command_serves_and_writes_from_a_metrics_stream(broker: MosquittoBroker,
                                                                 tmp_path: Path) -> None:
    """``accept-mqtt monitor --no-view --prometheus --tensorboard`` as a service runs it,
    fed step metrics published to the broker; SIGTERM ends it with status 0."""
    mon = subprocess.Popen(
        [sys.executable, "-m", "accept_mqtt.cli", "monitor", "rec", "--broker", broker.url,
         "--no-view", "--prometheus", "127.0.0.1:0", "--tensorboard", str(tmp_path / "tb")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        assert mon.stderr is not None
        line = mon.stderr.readline()
        m = re.search(r"Prometheus metrics at (http://\S+/metrics)", line)
        assert m, line
        url = m.group(1)

        def step(n: int, loss: float) -> bytes:
            return encode(StepMetric(job="rec", time=1000.0 + n, step=n, loss=loss,
                                     samples_per_s=100.0 * n, stages=[
                                         StageCounters(stage=0, device="d0", busy_ms=250.0 * n,
                                                       bytes_act=1000 * n),
                                         StageCounters(stage=1, device="d1", busy_ms=100.0 * n,
                                                       bytes_grad=500 * n)]))

        async def publish() -> None:
            async with aiomqtt.Client(broker.host, broker.port) as c:
                for n, loss in ((1, 2.0), (2, 1.5), (3, 1.25)):
                    await c.publish("accept/jobs/rec/metrics", step(n, loss), qos=1)

        def scrape_until(key: tuple, want: float) -> dict:
            deadline = time.monotonic() + 30
            while True:
                try:
                    got = _scrape(url)
                except urllib.error.URLError:
                    got = {}
                if got.get(key) == want or time.monotonic() > deadline:
                    return got
                time.sleep(0.1)

        # subscribed first: metrics are not retained, so earlier ones would be missed
        assert scrape_until(("accept_mqtt_monitor_connected", ()), 1.0)[
            ("accept_mqtt_monitor_connected", ())] == 1.0
        asyncio.run(publish())
        got = scrape_until(("accept_mqtt_step", (("job", "rec"),)), 3)
        assert got[("accept_mqtt_train_loss", (("job", "rec"),))] == 1.25
        # busy over the last interval (1 s of coordinator clock): 250 ms of stage 0
        assert got[("accept_mqtt_stage_busy_ratio",
                    (("device", "d0"), ("job", "rec"), ("stage", "0")))] == pytest.approx(0.25)
        assert got[("accept_mqtt_link_bytes_total", (("device", "d1"), ("job", "rec"),
                                                     ("kind", "grad"), ("stage", "1")))] == 1500
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(url.replace("/metrics", "/other"), timeout=10)
    finally:
        mon.send_signal(signal.SIGTERM)
        rc = mon.wait(30)
    assert rc == 0, mon.stderr.read() if mon.stderr else ""
    tb = _scalars(tmp_path / "tb" / "rec")
    assert [v for _, v in tb["loss/train"]] == [2.0, 1.5, 1.25]
    assert [s for s, _ in tb["loss/train"]] == [1, 2, 3]
    json.dumps(tb)  # plain data
