"""Step tracing (device_agent/trace.py) and the timeline plot (bench/timeline.py), no broker."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from accept_mqtt.bench import timeline
from device_agent.link import Link
from device_agent.trace import StepTracer, parse_steps


class _Runner:
    """Just the calls the tracer wraps."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def forward(self, key: tuple[int, int], *a: Any) -> str:
        self.calls.append(("fwd", key))
        return "out"

    def backward(self, key: tuple[int, int], g: Any = None) -> None:
        self.calls.append(("bwd", key))

    def step(self) -> None:
        self.calls.append(("opt", None))


def test_parse_steps() -> None:
    assert parse_steps(None) == () and parse_steps("") == ()
    assert parse_steps("5, 3,5") == (3, 5)
    with pytest.raises(ValueError):
        parse_steps("x")
    with pytest.raises(ValueError):
        parse_steps("-1")


def test_tracer_records_only_traced_step_and_publishes_once() -> None:
    published: list[tuple[str, dict[str, Any]]] = []

    async def main() -> None:
        sent: list[str] = []

        async def pub_frame(topic: str, payload: bytes) -> None:
            sent.append(topic)

        async def pub_json(topic: str, body: Any) -> None:
            published.append((topic, body))

        link = Link(pub_frame)
        link.start()
        runner = _Runner()
        tr = StepTracer([1], job="j", device="d", stage=0, topic="accept/jobs/j/trace/d",
                        publish=pub_json, link=link, loop=asyncio.get_running_loop())
        tr.wrap(runner)
        link.observer = tr.on_send
        for step in (0, 1, 2):
            for mb in range(2):
                assert await asyncio.to_thread(runner.forward, (step, mb), None) == "out"
                link.send("t/fwd", b"x" * 100, "act", tag=(step, mb))
            for mb in range(2):
                await asyncio.to_thread(runner.backward, (step, mb), None)
            await asyncio.to_thread(runner.step)
            await asyncio.sleep(0.05)
        await link.close()
        assert len(sent) == 6 and len(runner.calls) == 15  # wrapped calls still go through

    asyncio.run(main())
    assert len(published) == 1
    topic, body = published[0]
    assert topic == "accept/jobs/j/trace/d" and body["step"] == 1 and body["stage"] == 0
    kinds = sorted((s["kind"], s["mb"]) for s in body["spans"])
    assert kinds == [("bwd", 0), ("bwd", 1), ("fwd", 0), ("fwd", 1), ("opt", -1),
                     ("send", 0), ("send", 1)]
    assert all(s["t1"] >= s["t0"] for s in body["spans"])
    assert {s["bytes"] for s in body["spans"] if s["kind"] == "send"} == {100}


def _synthetic(stages: int, mb_ms: float, send_ms: float) -> list[timeline.Trace]:
    t0 = 1_700_000_000.0
    out = []
    for k in range(stages):
        spans = []
        for mb in range(4):
            a = t0 + (k + mb) * (mb_ms + send_ms) / 1e3
            spans.append({"kind": "fwd", "mb": mb, "t0": a, "t1": a + mb_ms / 1e3})
            if k < stages - 1:
                b = a + mb_ms / 1e3
                spans.append({"kind": "send", "what": "act", "mb": mb, "bytes": 1000,
                              "t0": b, "t1": b + send_ms / 1e3})
            c = a + 10 * mb_ms / 1e3
            spans.append({"kind": "bwd", "mb": mb, "t0": c, "t1": c + mb_ms / 1e3})
        out.append({"v": 1, "job": "j", "device": f"d{k}", "stage": k, "step": 3,
                    "spans": spans})
    return out


def test_summary_and_png(tmp_path: Any) -> None:
    base, fast = _synthetic(3, 20, 50), _synthetic(3, 2, 1)
    s = timeline.summarize(base)
    assert s["step_ms"] > 0 and len(s["stages"]) == 3
    assert s["hop_ms_median"] == pytest.approx(50, abs=0.5)  # send start -> next fwd start
    assert timeline.summarize([]) == {}
    out = timeline.render([("baseline", base), ("AccEPT", fast), ("empty", [])],
                          tmp_path / "t.png", suptitle="synthetic")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and 5_000 < len(data) < 200_000


def test_shaping_auto_falls_back_to_pacing_and_says_why(monkeypatch: Any, capsys: Any) -> None:
    from accept_mqtt.bench import e2e
    from accept_mqtt.harness import netem

    monkeypatch.setattr(netem, "available", lambda: netem.Availability(False, "needs root"))
    assert e2e.choose_shaping("auto") == ("pace", "tc unavailable: needs root")
    assert "falling back to agent-side send pacing" in capsys.readouterr().out
    assert e2e.choose_shaping("pace")[0] == "pace"
    with pytest.raises(SystemExit, match="needs root"):
        e2e.choose_shaping("tc")
    monkeypatch.setattr(netem, "available", lambda: netem.Availability(True, "ok"))
    assert e2e.choose_shaping("auto")[0] == "tc"
