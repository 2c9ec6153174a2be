"""``accept-mqtt monitor``: the pure view, and real monitors on a real Mosquitto.

The view is fed messages built the way the project builds them (``Plan.to_json``, the
agent's status payload) plus garbage; the MQTT tests watch a real training run, run the CLI
as a user would, check that a monitor publishes nothing, and run the documented example
subscriber (examples/monitor_min.py) so docs/monitoring.md cannot rot.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from accept_mqtt.cli.monitor import FleetView, live, load_bar, render, stage_loads, watch
from accept_mqtt.coordinator import Coordinator
from accept_mqtt.coordinator.config import TrainConfig
from accept_mqtt.wire import messages
from accept_mqtt.wire.aio import cancel_and_wait
from accept_mqtt.wire.plan import Plan, cuts_to_stages
from broker import MosquittoBroker

from .conftest import running_agents

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "monitor_min.py"
DEVICES = ["mon-a", "mon-b", "mon-c"]


# -- helpers -------------------------------------------------------------------------------
class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _status(device: str, state: str, **extra: Any) -> bytes:
    """The agent's own status payload (device_agent.agent.Agent._status, encoded as the agent
    publishes it)."""
    from device_agent.agent import Agent, AgentConfig

    if device not in _AGENTS:
        _AGENTS[device] = Agent(AgentConfig("mqtt://127.0.0.1:1", device))
    return messages.encode(_AGENTS[device]._status(state, **extra))


_AGENTS: dict[str, Any] = {}


def _profile(device: str, gflops: float) -> bytes:
    return json.dumps({"device": device, "cores": 4, "threads": 1, "memory_mb": 3800.0,
                       "cpu": "Cortex-A72", "clock_mhz": 1500.0, "arch": "aarch64",
                       "torch": "2.1.0", "bench_gflops": gflops, "slowdown": 1.0,
                       "bandwidth_bps": 2e7}).encode()


def _plan(job: str = "j1", version: int = 1) -> bytes:
    stages = cuts_to_stages([0, 4, 9, 14], ["pi-a", "pi-b", "pi-c"], act_bits=[4, 4, 32],
                            grad_bits=[32, 8, 8], predicted_ms=[1.5, 1.25, 1.0])
    return Plan(job=job, version=version, model="cnn", num_layers=14, stages=stages,
                seed=1, method="dp+predictor", predicted_bottleneck_ms=1.5).to_json().encode()


def _step(step: int, t: float, counters: list[tuple[float, float, int, int]],
          loss: float = 1.5) -> bytes:
    """A ``step`` metrics message as docs/protocol.md defines it (cumulative counters)."""
    stages = [{"stage": k, "device": f"pi-{'abc'[k]}", "busy_ms": b, "send_ms": s,
               "bytes_act": a, "bytes_grad": g} for k, (b, s, a, g) in enumerate(counters)]
    return json.dumps({"job": "j1", "time": t, "type": "step", "step": step, "epoch": 0,
                       "loss": loss, "train_acc": 0.5, "samples_per_s": 640.0, "step_ms": 100.0,
                       "total_steps": 10, "stage_busy_ms": {}, "stages": stages}).encode()


def _text(view: FleetView, width: int = 200) -> str:
    out = io.StringIO()
    Console(file=out, width=width, color_system=None).print(render(view))
    return out.getvalue()


async def _until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


def _cfg(tmp_path: Path, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = dict(model="cnn", dataset="digits", epochs=1, batch_size=32,
                                micro_batches=4, max_steps=4, seed=7, runs_dir=str(tmp_path),
                                device_timeout=20, step_timeout=30, partition="flops")
    base.update(kw)
    return TrainConfig(**base)


# -- the pure view -----------------------------------------------------------------------------
def _fed_view() -> tuple[FleetView, Clock]:
    clock = Clock()
    v = FleetView(broker="mqtt://test:1883", clock=clock)
    for dev, g in (("pi-a", 20.0), ("pi-b", 10.0), ("pi-c", 5.0)):
        v.ingest(f"accept/devices/{dev}/profile", _profile(dev, g))
        v.ingest(f"accept/devices/{dev}/status", _status(dev, "online"))
    v.ingest("accept/jobs/j1/plan", _plan())
    for k, dev in enumerate(("pi-a", "pi-b", "pi-c")):
        v.ingest(f"accept/devices/{dev}/status", _status(dev, "busy", job="j1", stage=k))
    v.ingest("accept/jobs/j1/metrics", _step(1, 500.0, [(10, 0, 1000, 0), (5, 0, 200, 100),
                                                        (2, 0, 0, 50)]))
    v.ingest("accept/jobs/j1/metrics", _step(2, 500.1, [(60, 20, 11000, 0), (15, 5, 1200, 600),
                                                        (102, 0, 0, 50)], loss=1.25))
    return v, clock


def test_view_folds_devices_plan_and_steps() -> None:
    v, _ = _fed_view()
    assert v.ignored == 0, v.last_ignored
    assert set(v.devices) == {"pi-a", "pi-b", "pi-c"}
    a = v.devices["pi-a"]
    assert (a.state, a.job, a.stage, a.cores, a.bench_gflops, a.bandwidth_bps) == (
        "busy", "j1", 0, 4, 20.0, 2e7)
    j = v.jobs["j1"]
    assert j.plan is not None and j.plan.version == 1 and j.plan.method == "dp+predictor"
    assert [(s.device, s.start, s.end, s.act_bits, s.grad_bits) for s in j.plan.stages] == [
        ("pi-a", 0, 4, 4, 32), ("pi-b", 4, 9, 4, 8), ("pi-c", 9, 14, 32, 8)]
    assert j.step is not None and (j.step.step, j.step.total_steps, j.step.loss) == (2, 10, 1.25)


def test_busy_idle_sending_fractions_from_two_step_messages() -> None:
    v, _ = _fed_view()
    s0, s1, s2 = v.jobs["j1"].loads
    # 100 ms between the two messages; stage 0 computed 50 ms and sent for 20 ms
    assert s0.busy == pytest.approx(0.5) and s0.sending == pytest.approx(0.2)
    assert s0.idle == pytest.approx(0.3)
    assert s0.act_bytes_per_s == pytest.approx(100_000) and s0.grad_bytes_per_s == 0
    assert (s1.busy, s1.sending, s1.idle) == pytest.approx((0.1, 0.05, 0.85))
    assert s1.grad_bytes_per_s == pytest.approx(5000)
    assert (s2.busy, s2.sending, s2.idle) == pytest.approx((1.0, 0.0, 0.0))  # clamped at 1
    bar = load_bar(s0, width=10).plain
    assert bar == "█████▒▒···"


def test_fractions_are_unknown_without_a_comparable_earlier_step() -> None:
    v, _ = _fed_view()
    j = v.jobs["j1"]
    first = j.prev_step
    assert first is not None
    assert all(ld.busy is None for ld in stage_loads(None, first))
    # counters going backwards (the agent re-joined): unknown, not negative
    v.ingest("accept/jobs/j1/metrics", _step(3, 500.2, [(1, 0, 10, 0), (16, 6, 1300, 700),
                                                        (103, 0, 0, 60)]))
    s0, s1, _ = j.loads
    assert s0.busy is None and s0.idle is None
    assert s1.busy == pytest.approx(0.01)
    # a repeated step changes nothing; an older step (job id reused) starts over
    before = [ld.busy for ld in j.loads]
    v.ingest("accept/jobs/j1/metrics", _step(3, 600.0, [(0, 0, 0, 0)] * 3))
    assert [ld.busy for ld in j.loads] == before
    v.ingest("accept/jobs/j1/metrics", _step(1, 700.0, [(0, 0, 0, 0)] * 3))
    assert j.step is not None and j.step.step == 1 and j.prev_step is None


def test_a_new_plan_version_is_not_compared_with_the_old_one() -> None:
    v, _ = _fed_view()
    v.ingest("accept/jobs/j1/plan", _plan(version=2))
    v.ingest("accept/jobs/j1/metrics", _step(3, 500.2, [(70, 30, 12000, 0), (25, 10, 1300, 700),
                                                        (103, 0, 0, 60)]))
    j = v.jobs["j1"]
    assert j.plan is not None and j.plan.version == 2
    assert all(ld.busy is None for ld in j.loads), "stages moved: no interval to compare"
    v.ingest("accept/jobs/j1/metrics", _step(4, 500.3, [(80, 30, 13000, 0), (25, 10, 1300, 700),
                                                        (103, 0, 0, 60)]))
    assert j.loads[0].busy == pytest.approx(0.1) and j.loads[1].busy == 0


GARBAGE: list[tuple[str, bytes]] = [
    ("accept/jobs/j1/metrics", b"\x00not json\xff"),
    ("accept/jobs/j1/metrics", b"[1, 2, 3]"),
    ("accept/jobs/j1/metrics", b'{"step": 3}'),  # no type
    ("accept/jobs/j1/metrics", b'{"type": "step", "step": "three", "stages": []}'),
    ("accept/jobs/j1/metrics", b'{"type": "step", "step": 4, "loss": "low"}'),
    ("accept/jobs/j1/metrics", b'{"type": "step", "step": 4, "stages": "all"}'),
    ("accept/jobs/j1/metrics", b'{"type": "step", "step": true}'),
    ("accept/jobs/j1/metrics", b'{"type": "error", "reason": 17}'),
    ("accept/jobs/j1/metrics", b""),
    ("accept/jobs/new/metrics", b'{"type": "step"}'),  # no step number
    ("accept/jobs/new/metrics", b'{"type": "drift", "speed_factor": "fast"}'),
    ("accept/jobs/new/plan", b'{"stages": []}'),
    ("accept/jobs/new/control", b'{"cmd": 1}'),
    ("accept/jobs/j1/plan", b'{"stages": "none"}'),
    ("accept/jobs/j1/plan", b'{"stages": [{"index": 0, "device": "x"}]}'),
    ("accept/jobs/j1/plan", _plan(job="other")),
    ("accept/jobs/j1/control", b'{"command": "pause"}'),
    ("accept/devices/pi-a/status", b'{"state": 5}'),
    ("accept/devices/pi-a/status", b'{"online": true}'),
    ("accept/devices/pi-a/profile", b'{"cores": "four"}'),
    ("accept/devices/bad id/status", _status("pi-a", "online")),
    ("accept/jobs/j1/weird", b"{}"),
    ("accept/devices/pi-a/status/extra", b"{}"),
    ("elsewhere/devices/pi-a/status", b'{"state": "online"}'),
    ("accept", b"{}"),
]


def test_garbage_is_counted_and_changes_nothing() -> None:
    v, clock = _fed_view()
    before = v.snapshot()
    for topic, payload in GARBAGE:
        v.ingest(topic, payload)
    assert v.ignored == len(GARBAGE)
    after = v.snapshot()
    for snap in (before, after):
        snap.pop("messages")
        snap.pop("ignored")
    assert after == before, "garbage must not change what the view shows"
    text = _text(v)
    assert f"warning: {len(GARBAGE)} message(s) ignored" in text
    assert "accept: unexpected topic" in text  # the last one, named with its topic


_KEYS = ["type", "step", "stages", "stage", "device", "busy_ms", "send_ms", "bytes_act",
         "bytes_grad", "time", "loss", "state", "job", "index", "start", "end", "cmd",
         "version", "cores", "bench_gflops", "speed_factor", "reason", "total_steps"]
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.sampled_from(
        ["step", "epoch", "done", "error", "drift", "status", "online", "pi-a"]),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(_KEYS), inner, max_size=8), max_leaves=30)
_TOPICS = st.sampled_from(["accept/jobs/j1/metrics", "accept/jobs/j1/plan",
                           "accept/jobs/j1/control", "accept/devices/pi-a/status",
                           "accept/devices/pi-a/profile", "accept/jobs/j9/metrics"])


@settings(max_examples=120, deadline=None)
@given(messages=st.lists(st.tuples(_TOPICS, _JSON.map(lambda o: json.dumps(o).encode())
                                   | st.binary(max_size=12)), max_size=6))
def test_any_payload_is_used_or_ignored_never_fatal(messages: list[tuple[str, bytes]]) -> None:
    v, _ = _fed_view()
    for topic, payload in messages:
        v.ingest(topic, payload)
        assert "Error: " not in (v.last_ignored or ""), "only deliberate rejections"
    _text(v)
    json.dumps(v.snapshot())


def test_other_messages_and_job_filter() -> None:
    v, clock = _fed_view()
    clock.t = 1010.0
    for body in ({"type": "epoch", "epoch": 0, "step": 10, "test_accuracy": 0.9,
                  "test_loss": 0.3, "samples_per_s": 600.0},
                 {"type": "error", "device": "pi-b", "topic": "accept/jobs/j1/stage/1/fwd",
                  "reason": "frame is not msgpack", "time": 1005.0},
                 {"type": "drift", "device": "pi-a", "step": 8, "speed_factor": 3.2,
                  "vs_model": 3.0, "error": 0.1, "partition_moves": True,
                  "action": "re-plan advised"},
                 {"type": "status", "step": 10, "epoch": 0, "paused": True, "stopping": False,
                  "plan_version": 1, "devices": ["pi-a", "pi-b", "pi-c"]},
                 {"type": "checkpoint", "step": 10, "path": "runs/j1/checkpoint.pt"},
                 {"type": "replan", "reason": "pi-a slowed down", "changed": True, "step": 10,
                  "plan_version": 2, "stages": [{"index": 0}]},
                 {"type": "done", "final_accuracy": 0.9, "samples_per_s": 600.0}):
        v.ingest("accept/jobs/j1/metrics", json.dumps(body).encode())
    v.ingest("accept/jobs/j1/control", b'{"cmd": "pause"}')
    v.ingest("accept/jobs/j2/plan", _plan("j2"))
    v.ingest("accept/jobs/j1/plan", b"")  # the coordinator's goodbye
    v.ingest("accept/devices/pi-c/status", _status("pi-c", "offline", reason="connection lost"))
    assert v.ignored == 0, v.last_ignored
    j = v.jobs["j1"]
    assert j.plan_cleared and j.done == {"final_accuracy": 0.9, "samples_per_s": 600.0,
                                         "time": None}
    assert [e["reason"] for e in j.errors] == ["frame is not msgpack"]
    assert j.drifts[0]["speed_factor"] == 3.2 and j.status and j.status["paused"] is True
    assert [c["cmd"] for c in j.controls] == ["pause"]
    assert [e["type"] for e in j.events] == ["checkpoint", "replan"], "extensions are kept"
    assert "stages" not in j.events[1] and j.events[1]["changed"] is True
    assert [x.id for x in v.job_list()] == ["j2", "j1"], "newest first"
    text = _text(v)
    for want in ("pi-a", "20.0", "step 2/10", "loss 1.2500",
                 "640 samples/s", "test acc 0.9000", "done (final accuracy 0.9000)",
                 "frame is not msgpack", "3.20x its earlier time", "control 0s ago: pause",
                 "PAUSED", "connection lost", "[0,4)", "4/32", "50%", "job j2",
                 "checkpoint at step 10", "replan at step 10 0s ago: pi-a slowed down"):
        assert want in text, (want, text)
    snap = json.loads(json.dumps(v.snapshot()))
    assert [x["job"] for x in snap["jobs"]] == ["j2", "j1"]
    assert snap["jobs"][1]["ended"]
    assert snap["jobs"][1]["stages"][0]["busy"] == pytest.approx(0.5)
    assert snap["devices"]["pi-c"]["state"] == "offline"

    only = FleetView(job="j2", clock=clock)
    for topic, payload in (("accept/jobs/j1/plan", _plan("j1")), ("accept/jobs/j2/plan",
                                                                  _plan("j2"))):
        only.ingest(topic, payload)
    assert list(only.jobs) == ["j2"] and only.ignored == 0
    # a cleared retained status forgets the device; a cleared profile only the profile
    v.ingest("accept/devices/pi-c/status", b"")
    v.ingest("accept/devices/pi-c/profile", b"")
    v.ingest("accept/devices/pi-b/profile", b"")
    assert "pi-c" not in v.devices and v.devices["pi-b"].cores is None


# -- real monitors on a real broker -----------------------------------------------------------
def test_two_monitors_follow_a_real_training_run(broker: MosquittoBroker, tmp_path: Path) -> None:
    job = "mon"

    async def main() -> tuple[dict[str, Any], list[FleetView]]:
        views = [FleetView(), FleetView(job=job)]
        readies = [asyncio.Event(), asyncio.Event()]
        tasks = [asyncio.create_task(watch(broker.url, "accept", v.job_filter, view=v, ready=r))
                 for v, r in zip(views, readies, strict=True)]
        try:
            await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 10)
            async with running_agents(broker.url, DEVICES):
                async with Coordinator(broker.url, _cfg(tmp_path), job=job) as coord:
                    run = asyncio.create_task(coord.run())
                    await _until(lambda: coord.state.step >= 1 or run.done(), 30, "a step")
                    async with aiomqtt.Client(broker.host, broker.port) as user:
                        await user.publish(f"accept/jobs/{job}/control", b'{"cmd": "status"}',
                                           qos=1)
                    record = await asyncio.wait_for(run, 60)

                def seen_end() -> bool:
                    return all(job in v.jobs and v.jobs[job].done is not None
                               and v.jobs[job].plan_cleared for v in views)

                await _until(seen_end, 10, "both monitors to see the job end")
        finally:
            await cancel_and_wait(*tasks)
        return record, views

    record, views = asyncio.run(main())
    plan_devices = [s["device"] for s in record["plan"]["stages"]]
    for v in views:
        assert v.ignored == 0, v.last_ignored
        assert set(DEVICES) <= set(v.devices)
        assert all(v.devices[d].cores and v.devices[d].bench_gflops for d in DEVICES)
        j = v.jobs[job]
        assert j.plan is not None and [s.device for s in j.plan.stages] == plan_devices
        assert j.step is not None and j.step.step == j.step.total_steps == 4
        assert j.step.loss is not None and math.isfinite(j.step.loss)
        assert j.step.samples_per_s and j.step.samples_per_s > 0
        assert len(j.loads) == 3 and any(ld.busy for ld in j.loads)
        for ld in j.loads:
            for f in (ld.busy, ld.sending, ld.idle):
                assert f is None or 0.0 <= f <= 1.0
        assert j.loads[0].bytes_act > 0 and j.loads[-1].bytes_grad > 0
        assert j.epoch and j.epoch["test_accuracy"] == record["final_accuracy"]
        assert j.done and j.done["final_accuracy"] == record["final_accuracy"]
        assert [c["cmd"] for c in j.controls] == ["status"] and j.status is not None
        text = _text(v)
        assert "step 4/4" in text and "done (final accuracy" in text
    assert list(views[1].jobs) == [job]
    a, b = (v.snapshot()["jobs"] for v in views)
    for snap in (a, b):
        for j in snap:
            j["controls"] = [c["cmd"] for c in j["controls"]]  # received at slightly other times
    assert a == b, "every monitor sees the same job"


def test_live_view_reconnects_after_the_broker_restarts(broker: MosquittoBroker) -> None:
    async def main() -> tuple[FleetView, str]:
        view, out = FleetView(), io.StringIO()
        task = asyncio.create_task(live(broker.url, "accept", None, refresh=20, view=view,
                                        console=Console(file=out, width=120), retry=0.2))
        try:
            await _until(lambda: view.connections == 1, 10, "the first connection")
            broker.stop()
            await _until(lambda: view.notice is not None, 10, "the lost connection to show")
            assert "lost" in (view.notice or "")
            broker.start()
            async with aiomqtt.Client(broker.host, broker.port) as c:
                status = messages.DeviceStatus(state="online", device="back", time=time.time())
                await c.publish("accept/devices/back/status", messages.encode(status), qos=1,
                                retain=True)
            await _until(lambda: "back" in view.devices, 10, "the view to reconnect")
            assert view.notice is None and view.connections == 2
        finally:
            await cancel_and_wait(task)
        return view, out.getvalue()

    view, text = asyncio.run(main())
    assert "back" in text and "online" in text, "the last frame is drawn when the view ends"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "accept_mqtt.cli", "monitor", *args]


async def _run(cmd: list[str], timeout: float = 30) -> tuple[int, str, str]:
    p = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE,
                                             stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(p.communicate(), timeout)
    assert p.returncode is not None
    return p.returncode, out.decode(), err.decode()


def test_cli_once_prints_devices_of_real_agents(broker: MosquittoBroker) -> None:
    async def main() -> list[tuple[int, str, str]]:
        async with running_agents(broker.url, ["cli-a", "cli-b"]):
            return await asyncio.gather(
                _run(_cli("--broker", broker.url, "--once", "--json", "--timeout", "1")),
                _run(_cli("--broker", broker.url, "--once", "--timeout", "1")),
                _run(_cli("--broker", "mqtt://127.0.0.1:1", "--once")))

    (rc, out, err), (rc2, out2, err2), (rc3, out3, err3) = asyncio.run(main())
    assert rc == 0, err
    snap = json.loads(out)
    assert set(snap["devices"]) == {"cli-a", "cli-b"}
    for d in snap["devices"].values():
        assert d["state"] == "online" and d["cores"] >= 1 and d["bench_gflops"] > 0
    assert snap["jobs"] == [] and snap["ignored"] == {"count": 0, "last": None}
    assert rc2 == 0, err2
    assert "devices (2)" in out2 and "cli-a" in out2 and "cli-b" in out2
    assert rc3 == 2 and out3 == ""
    assert err3.startswith("accept-mqtt monitor: cannot reach the broker at mqtt://127.0.0.1:1")
    assert len(err3.strip().splitlines()) == 1 and "Traceback" not in err3


def test_monitors_publish_nothing(broker: MosquittoBroker) -> None:
    """Alone on a fresh broker, a live and a --once monitor publish nothing, not even a Last
    Will when killed; each connects with its own random id and a clean session."""

    async def main() -> tuple[list[str], str]:
        seen: list[str] = []
        async with aiomqtt.Client(broker.host, broker.port, identifier="spy") as spy:
            await spy.subscribe("#", qos=1)

            async def listen() -> None:
                async for msg in spy.messages:
                    seen.append(msg.topic.value)

            listener = asyncio.create_task(listen())
            live = [await asyncio.create_subprocess_exec(
                *_cli("--broker", broker.url), stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL) for _ in range(2)]
            once = asyncio.create_task(_run(_cli("--broker", broker.url, "--once", "--timeout",
                                                 "0.5")))

            def monitors() -> list[str]:
                text = broker.log_path.read_text(errors="replace")
                return re.findall(r"as (accept-monitor-\w+) \(p\d, c1,", text)

            await _until(lambda: len(monitors()) == 3, 20, "three monitors to connect")
            live[0].kill()  # no goodbye: a Last Will, if there were one, would fire now
            live[1].send_signal(signal.SIGINT)  # Ctrl-C: the normal way out
            assert await asyncio.wait_for(live[1].wait(), 10) == 0
            await live[0].wait()
            assert (await once)[0] == 0
            await asyncio.sleep(0.5)
            await cancel_and_wait(listener)
        return seen, broker.log_path.read_text(errors="replace")

    seen, log = asyncio.run(main())
    assert seen == [], f"monitors published on {seen}"
    ids = re.findall(r"as (accept-monitor-\w+) \(p\d, c1,", log)
    assert len(set(ids)) == 3, ids


def test_documented_example_subscriber_follows_a_real_run(broker: MosquittoBroker,
                                                          tmp_path: Path) -> None:
    job = "ex"

    async def main() -> tuple[list[str], dict[str, Any], int]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(EXAMPLE), job, "--broker", broker.host, "--port",
            str(broker.port), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        assert proc.stdout is not None
        try:
            first = await asyncio.wait_for(proc.stdout.readline(), 15)
            assert first.decode().strip() == f"watching accept/jobs/{job}/metrics"
            async with running_agents(broker.url, DEVICES):
                async with Coordinator(broker.url, _cfg(tmp_path, max_steps=3), job=job) as c:
                    record = await c.run()
            out = await asyncio.wait_for(proc.stdout.read(), 15)  # it exits after 'done'
            rc = await asyncio.wait_for(proc.wait(), 5)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        return out.decode().splitlines(), record, rc

    lines, record, rc = asyncio.run(main())
    assert rc == 0
    steps = [ln for ln in lines if ln.startswith("step ")]
    assert len(steps) == 3, lines
    assert re.fullmatch(r"step 3/3 epoch 0 loss \d+\.\d{4} \d+ samples/s", steps[-1]), steps
    assert lines[-1] == f"done: final accuracy {record['final_accuracy']}"


def test_the_doc_shows_the_example_file_verbatim() -> None:
    doc = (ROOT / "docs" / "monitoring.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- example:begin -->\n```python\n(.*?)```\n<!-- example:end -->", doc,
                      re.S)
    assert block, "docs/monitoring.md lost its example block"
    assert block.group(1) == EXAMPLE.read_text(encoding="utf-8"), (
        "docs/monitoring.md and examples/monitor_min.py differ: copy the file into the doc")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "docs/monitoring.md" in readme
    # the documented --json snapshot has exactly the keys of a real one
    shown = json.loads(re.search(r"`--json` prints `FleetView.snapshot\(\)`:\n\n```json\n(.*?)```",
                                 doc, re.S).group(1))  # type: ignore[union-attr]
    v, _ = _fed_view()
    v.ingest("accept/jobs/j1/metrics", json.dumps({
        "type": "epoch", "epoch": 0, "step": 2, "test_accuracy": 0.5, "test_loss": 1.0,
        "samples_per_s": 9.0, "time": 1.0}).encode())
    real = v.snapshot()
    keys = set
    assert keys(shown) == keys(real)
    assert keys(next(iter(shown["devices"].values()))) == keys(real["devices"]["pi-a"])
    sj, rj = shown["jobs"][0], real["jobs"][0]
    assert keys(sj) == keys(rj)
    for k in ("plan", "step", "epoch"):
        assert keys(sj[k]) == keys(rj[k]), k
    assert keys(sj["plan"]["stages"][0]) == keys(rj["plan"]["stages"][0])
    assert keys(sj["stages"][0]) == keys(rj["stages"][0])
