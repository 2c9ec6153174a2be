"""Step tracing (device_agent/trace.py) and the timeline plot (bench/timeline.py), no broker."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
import torch
from torch import nn

from accept_mqtt.bench import timeline
from accept_mqtt.model.descriptors import LayerDescriptor
from accept_mqtt.model.stage import StageError, StageRunner
from accept_mqtt.wire import messages
from device_agent import trace
from device_agent.link import Link
from device_agent.trace import StepTracer, parse_steps


def _runner() -> StageRunner:
    """A first (not last) stage of one Linear(4, 3): forward needs no labels, backward a grad."""
    torch.manual_seed(0)
    desc = LayerDescriptor(0, "linear", 24, 15, 4, 3, 0, 0, 4, 3)
    return StageRunner([nn.Linear(4, 3)], [desc], (4,), is_first=True, is_last=False,
                       optimizer_cfg={"name": "sgd", "lr": 0.1})


class _Spans:
    """A StageObserver that records what it is told."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, tuple[int, int] | None, float, float]] = []

    def on_compute(self, kind: str, key: tuple[int, int] | None, t0: float, t1: float) -> None:
        self.seen.append((kind, key, t0, t1))


class _Raises:
    def __init__(self) -> None:
        self.calls = 0

    def on_compute(self, kind: str, key: tuple[int, int] | None, t0: float, t1: float) -> None:
        self.calls += 1
        raise RuntimeError("observer bug")


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

        async def pub_json(topic: str, body: messages.Trace) -> None:
            assert isinstance(body, messages.Trace)  # the typed message, encoded by the agent
            published.append((topic, messages.decode(dict, messages.encode(body))))

        link = Link(pub_frame)
        link.start()
        runner = _runner()
        tr = StepTracer([1], job="j", device="d", stage=0, topic="accept/jobs/j/trace/d",
                        publish=pub_json, link=link, loop=asyncio.get_running_loop())
        tr.subscribe(runner)
        for step in (0, 1, 2):
            for mb in range(2):
                res = await asyncio.to_thread(runner.forward, (step, mb), torch.randn(2, 4))
                assert res.out is not None and tuple(res.out.shape) == (2, 3)
                link.send("t/fwd", b"x" * 100, "act", tag=(step, mb))
            for mb in range(2):
                await asyncio.to_thread(runner.backward, (step, mb), torch.ones(2, 3))
            await asyncio.to_thread(runner.step)
            await asyncio.sleep(0.05)
        await link.close()
        st = runner.stats  # observed calls still go through: 6 fwd + 6 bwd + 3 opt
        assert len(sent) == 6 and (st.fwd_count, st.bwd_count, st.steps) == (6, 6, 3)

    asyncio.run(main())
    assert len(published) == 1
    topic, body = published[0]
    assert topic == "accept/jobs/j/trace/d" and body["step"] == 1 and body["stage"] == 0
    kinds = sorted((s["kind"], s["mb"]) for s in body["spans"])
    assert kinds == [("bwd", 0), ("bwd", 1), ("fwd", 0), ("fwd", 1), ("opt", -1),
                     ("send", 0), ("send", 1)]
    assert all(s["t1"] >= s["t0"] for s in body["spans"])
    assert {s["bytes"] for s in body["spans"] if s["kind"] == "send"} == {100}


def test_stage_observer_sees_fwd_bwd_opt_in_order() -> None:
    runner, obs = _runner(), _Spans()
    runner.forward((0, 0), torch.randn(2, 4))  # before add_observer: not seen
    runner.add_observer(obs)
    runner.backward((0, 0), torch.ones(2, 3))
    runner.forward((1, 0), torch.randn(2, 4))
    runner.forward((1, 1), torch.randn(2, 4))
    runner.backward((1, 1), torch.ones(2, 3))
    runner.backward((1, 0), torch.ones(2, 3))
    runner.step()
    assert [(k, key) for k, key, _, _ in obs.seen] == [
        ("bwd", (0, 0)), ("fwd", (1, 0)), ("fwd", (1, 1)), ("bwd", (1, 1)), ("bwd", (1, 0)),
        ("opt", None)]
    assert all(t1 >= t0 for _, _, t0, t1 in obs.seen)
    assert all(a[3] <= b[2] for a, b in zip(obs.seen, obs.seen[1:], strict=False))  # no overlap
    with pytest.raises(StageError):  # a failing call is still one span, and still raises
        runner.backward((9, 9), torch.ones(2, 3))
    assert obs.seen[-1][:2] == ("bwd", (9, 9))
    runner.remove_observer(obs)
    runner.step()
    assert len(obs.seen) == 7


def test_raising_stage_observer_does_not_break_training(caplog: Any) -> None:
    plain, observed = _runner(), _runner()
    bad, good = _Raises(), _Spans()
    observed.add_observer(bad)
    observed.add_observer(good)  # still called after the one before it raised
    x, g = torch.randn(2, 4), torch.ones(2, 3)
    with caplog.at_level(logging.WARNING, logger="accept_mqtt.model.stage"):
        for r in (plain, observed):
            out = r.forward((0, 0), x).out
            assert out is not None
            gin = r.backward((0, 0), g)
            assert gin is None  # the first stage sends no gradient upstream
            r.step()
    assert bad.calls == 3 and [k for k, *_ in good.seen] == ["fwd", "bwd", "opt"]
    assert "observer bug" in caplog.text and caplog.text.count("stage observer") == 3
    torch.testing.assert_close(observed.state_dict(0), plain.state_dict(0))  # same training
    assert observed.stats.steps == plain.stats.steps == 1


def test_link_observers_all_called_and_removable() -> None:
    seen: list[tuple[str, Any, int]] = []

    def bad(kind: str, tag: Any, nbytes: int, t0: float, t1: float) -> None:
        raise RuntimeError("observer bug")

    def good(kind: str, tag: Any, nbytes: int, t0: float, t1: float) -> None:
        assert t1 >= t0
        seen.append((kind, tag, nbytes))

    async def main() -> int:
        sent: list[str] = []

        async def pub_frame(topic: str, payload: bytes) -> None:
            sent.append(topic)

        link = Link(pub_frame)
        link.add_observer(bad)
        link.add_observer(good)
        link.start()
        link.send("t/a", b"ab", "act", tag=(0, 1))
        await link.drain()
        link.remove_observer(good)
        link.remove_observer(good)  # twice: no error
        link.send("t/b", b"abc", "grad", tag=(0, 2))
        await link.drain()
        await link.close()
        return len(sent)

    assert asyncio.run(main()) == 2  # a raising observer does not stop the uplink
    assert seen == [("act", (0, 1), 2)]


def test_attach_observes_and_close_detaches() -> None:
    async def main() -> tuple[StepTracer | None, StepTracer | None, StepTracer | None]:
        async def pub_frame(topic: str, payload: bytes) -> None:
            pass

        async def pub_json(topic: str, body: Any) -> None:
            pass

        link, loop = Link(pub_frame), asyncio.get_running_loop()
        old_runner, new_runner = _runner(), _runner()
        args: dict[str, Any] = dict(job="j", device="d", stage=0, topic="t", publish=pub_json,
                                    link=link, loop=loop)
        none = trace.attach((), runner=old_runner, **args)
        old = trace.attach([0], runner=old_runner, **args)
        assert old is not None
        old.close()  # what the agent does when it leaves the job
        new = trace.attach([0], runner=new_runner, **args)
        link.start()
        link.send("t/fwd", b"x", "act", tag=(0, 0))
        await link.drain()
        await link.close()
        old_runner.forward((0, 0), torch.randn(2, 4))
        new_runner.forward((0, 0), torch.randn(2, 4))
        return none, old, new

    none, old, new = asyncio.run(main())
    assert none is None and old is not None and new is not None
    assert old.spans[0] == []  # detached from its runner and from the link
    assert sorted(s["kind"] for s in new.spans[0]) == ["fwd", "send"]


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
