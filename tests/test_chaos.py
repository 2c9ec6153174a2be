"""``accept-mqtt bench chaos``: its schedule, its garbage, and a short run against a real broker.

The short run (30 steps, an agent SIGKILLed and restarted, a garbage burst) uses the real
parts the bench uses: the fixture's Mosquitto, agents and the coordinator as OS processes.
It checks what the report says about each fault against what must be true of it: the job
finished all its steps, a killed agent costs at most the steps since the last checkpoint, a
garbage burst is survived (it used to end the job: a malformed plan was taken for a refusal),
answered with errors on the metrics topic, and costs no step.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import pytest

from accept_mqtt.bench.chaos import KINDS, Chaos, add_arguments, schedule, summarize
from accept_mqtt.harness.chaos import garbage
from accept_mqtt.wire import codec
from accept_mqtt.wire.messages import (
    ControlCommand,
    Event,
    MessageError,
    SyncOp,
    TimingSample,
    Weights,
    decode,
)
from accept_mqtt.wire.plan import Plan, PlanError
from accept_mqtt.wire.topics import Topics
from broker import MosquittoBroker


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


def test_schedule_is_fixed_by_the_seed_and_spreads_the_kinds() -> None:
    a = schedule(0, 300, 10, KINDS)
    assert a == schedule(0, 300, 10, KINDS)
    assert a != schedule(1, 300, 10, KINDS)
    steps = [f.step for f in a]
    assert steps == sorted(steps) and 30 <= steps[0] and steps[-1] <= 240
    # every kind once before any twice: 10 faults of 5 kinds are 2 of each
    assert sorted(f.kind for f in a) == sorted(KINDS * 2)
    assert all(0.0 <= f.delay <= 0.5 for f in a)


def test_garbage_is_never_a_valid_message() -> None:
    t = Topics("accept")
    job = "j1"
    burst = garbage(random.Random(3), t, job, 5, 3, ["a", "b"], 300)
    assert {k for _, _, k in burst} == {"random-bytes", "truncated-msgpack",
                                        "wrong-shape-frame", "bad-json"}
    for topic, payload, kind in burst:
        tail = t.parse_tail(topic, job)
        if tail[0] == "stage":
            try:
                frame = codec.from_bytes(payload, topic)
            except codec.FrameError:
                continue
            # a well-formed frame: only its shape is wrong (no stage of the digits CNN
            # takes [3, 5, 7] inputs or gives [2, 11] outputs)
            assert kind == "wrong-shape-frame" and frame.shape in ((3, 5, 7), (2, 11))
            continue
        kinds = {"control": ControlCommand, "sync": SyncOp, "events": Event,
                 "timing": list[TimingSample], "weights": Weights}
        if tail[0] == "plan":
            with pytest.raises(PlanError):
                Plan.from_json(payload)
            continue
        with pytest.raises(MessageError):
            decode(kinds[tail[0]], payload, topic=topic)


def test_summary_compares_accuracy_with_the_undisturbed_run() -> None:
    args = _args("--steps", "30")
    ref = {"record": {"final_accuracy": 0.95}, "seconds": 10.0}

    def dis(acc: float) -> dict[str, object]:
        return {"rows": [], "incidents": [], "record": {"final_accuracy": acc, "steps": 30},
                "finished": True, "coordinator_starts": 1, "seconds": 12.0, "log_tail": ""}

    near = summarize(args, [], ref, dis(0.9451), {}, 0.0, 0.0)["accuracy"]
    assert near["within_1_point"] is True and near["delta_points"] == pytest.approx(-0.49)
    far = summarize(args, [], ref, dis(0.93), {}, 0.0, 0.0)["accuracy"]
    assert far["within_1_point"] is False and far["delta_points"] == pytest.approx(-2.0)


@pytest.mark.timeout(150)
def test_short_chaos_run_reports_each_fault(broker: MosquittoBroker, tmp_path: Path) -> None:
    args = _args("--seed", "0", "--steps", "30", "--faults", "2", "--kinds",
                 "agent-kill,garbage", "--checkpoint-every", "10", "--no-reference",
                 "--recover-timeout", "60", "--garbage-count", "6")
    res = Chaos(args, tmp_path, given_broker=broker).run()
    # whatever a fault did, the bench rescued the job and it trained all its steps
    assert res["finished"] and res["final_steps"] == 30
    assert res["injected"] == 2
    rows = {r["kind"]: r for r in res["faults"]}
    assert set(rows) == {"agent-kill", "garbage"}
    kill = rows["agent-kill"]
    assert kill["target"].startswith("local-") and kill["at_step"] is not None
    # a killed agent is a fault the coordinator recovers from: replayed at most the steps
    # since the last checkpoint (10 steps apart here)
    assert kill["survived"] is True, kill
    assert kill["bound"] == 10 and kill["within_bound"] and 0 <= kill["replayed"] <= 10
    assert "re-plan from checkpoint" in kill["how"] or "rewind" in kill["how"], kill
    assert kill["back_after_s"] is not None and not kill["rescue"]
    junk = rows["garbage"]
    assert junk["errors_reported"] > 0 and "answered with an error" in junk["how"]
    # garbage never stops training (a malformed plan used to end the job: issue 14)
    assert junk["survived"] is True, junk
    assert junk["replayed"] == 0 and junk["within_bound"] and not junk["rescue"]
    assert res["survived"] == 2
    acc = res["accuracy"]
    assert acc["undisturbed"] is None and 0.0 < acc["disturbed"] <= 1.0
    mem = res["peak_rss_mb"]
    assert {"broker", "coordinator", "local-0", "local-1", "local-2"} <= set(mem)
    assert all(v > 1.0 for v in mem.values())
