"""``accept-mqtt bench e2e``'s code paths: settings refused with a reason, the latency
emulation chosen at run time, the ideal bound's micro-batch count, and one tiny run of every
path end to end (agents, coordinator and torch peer, with user-space latency).

No speed is asserted: speed belongs to the benchmark, run on a quiet machine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from accept_mqtt.bench import e2e
from accept_mqtt.harness import netem
from accept_mqtt.model.hardware import device_profile


def test_methods_are_checked() -> None:
    assert e2e._check_methods("equal-fp32,torch-equal") == ["equal-fp32", "torch-equal"]
    with pytest.raises(SystemExit, match="unknown methods"):
        e2e._check_methods("equal-fp32,torch-fast")
    with pytest.raises(SystemExit, match="torch-accept runs on the cuts of accept"):
        e2e._check_methods("equal-fp32,torch-accept")
    with pytest.raises(SystemExit, match="list equal-fp32 before it"):
        e2e._check_methods("torch-equal,equal-fp32")


def test_torch_peer_settings_it_cannot_run_are_refused() -> None:
    sc = e2e.SCENARIOS["vgg1-3dev-speeds-1-1/2-1/4-20mbit"]
    with pytest.raises(SystemExit, match="does not split into 5"):
        e2e._check_torch(sc, 5, ["equal-fp32", "torch-equal"], "x")
    with pytest.raises(SystemExit, match="micro-batches >= stages"):
        e2e._check_torch(sc, 2, ["equal-fp32", "torch-equal"], "x")
    e2e._check_torch(sc, 5, ["equal-fp32"], "x")  # no torch peer: no constraint


def test_latency_emulation_is_netem_where_it_exists_else_the_delay_line(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netem, "available",
                        lambda: netem.Availability(True, "tbf (no sch_netem)", delay=False))
    assert e2e.choose_latency("auto", "tc")[0] == "delay-line"
    assert "no netem here" in e2e.choose_latency("auto", "tc")[1]
    with pytest.raises(SystemExit, match="--latency-via netem unavailable"):
        e2e.choose_latency("netem", "tc")
    with pytest.raises(SystemExit, match="needs --shaping tc"):
        e2e.choose_latency("netem", "pace")
    assert e2e.choose_latency("auto", "pace")[0] == "delay-line"
    monkeypatch.setattr(netem, "available",
                        lambda: netem.Availability(True, "tbf, netem", delay=True))
    assert e2e.choose_latency("auto", "tc")[0] == "netem"
    assert e2e.choose_latency("delay-line", "tc")[0] == "delay-line"


def test_scenarios_pair_the_latency_twin_with_its_baseline() -> None:
    twin = e2e.SCENARIOS["vgg1-3dev-speeds-1-1/2-1/4-20mbit-20ms-rtt"]
    base = e2e.SCENARIOS[twin.baseline or ""]
    assert twin.latency == "10ms" and base.latency is None  # 20 ms round trips
    assert (twin.devices, twin.model, twin.width, twin.batch_size, twin.steps) == \
        (base.devices, base.model, base.width, base.batch_size, base.steps)
    assert base.model == "vgg" and base.width == 1.0
    assert all(bw == "20mbit" for _, bw in base.devices)


def test_a_latency_twin_and_its_baseline_alternate_repeat_by_repeat() -> None:
    sc = {n: e2e.SCENARIOS[n] for n in ("4dev-one-much-slower",
                                        "vgg1-3dev-speeds-1-1/2-1/4-20mbit-20ms-rtt",
                                        "vgg1-3dev-speeds-1-1/2-1/4-20mbit")}
    base, twin = "vgg1-3dev-speeds-1-1/2-1/4-20mbit", "vgg1-3dev-speeds-1-1/2-1/4-20mbit-20ms-rtt"
    assert e2e.sessions(sc, 2) == [("4dev-one-much-slower", [0, 1]), (twin, [0]), (base, [0]),
                                   (twin, [1]), (base, [1])]
    alone = {twin: sc[twin]}  # its baseline not chosen: all repeats on one cluster
    assert e2e.sessions(alone, 3) == [(twin, [0, 1, 2])]


def test_ideal_bound_takes_the_best_micro_batch_count_that_fits_memory() -> None:
    sc = e2e.Scenario(((1.0, "10mbit"), (2.0, "10mbit")), model="cnn", batch_size=16)

    def layer_ms(size: int) -> list[float]:  # per-sample cost falls with size, then rises
        return [0.5 + size * (0.1 if size <= 4 else 0.3)]

    big = {f"d{i}": device_profile(f"d{i}", threads=1, bench=False) for i in range(2)}
    got = e2e.ideal_bounds(sc, 1.5, layer_ms, big)
    per_sample = {m: v for m, v in got["by_micro_batches"].items() if v is not None}
    assert got["best_micro_batches"] == 4  # micro-batches of 4 samples: cheapest per sample
    assert got["samples_per_s"] == pytest.approx(16 / (4 * (0.5 + 0.4) / 1.5) * 1e3)
    assert got["samples_per_s"] == max(per_sample.values())
    tiny = {d: dict(p, memory_limit_mb=1e-6) for d, p in big.items()}
    with pytest.raises(SystemExit, match="no micro-batch count fits"):
        e2e.ideal_bounds(sc, 1.5, layer_ms, tiny)


def test_accept_delta_is_parsed_interleaved_and_plans_delta_links() -> None:
    """The AccEPT-delta method: on by default beside AccEPT, its widths parsed and checked,
    its plan (the VGG slow-link scenario's devices) delta-coded and error-fed on every link,
    and its ratio to AccEPT taken repeat against repeat."""
    import argparse
    from dataclasses import replace

    from accept_mqtt.coordinator.config import TrainConfig
    from accept_mqtt.coordinator.planner import DeviceInfo, build_plan, make_partition
    from accept_mqtt.model.descriptors import describe
    from accept_mqtt.model.zoo import build_model
    from accept_mqtt.wire.broker_url import parse_bandwidth

    ap = argparse.ArgumentParser()
    e2e.add_arguments(ap)
    args = ap.parse_args(["--delta-act-bits", "3", "--delta-grad-feedback"])
    chosen = e2e._check_methods(args.methods)
    assert chosen.index("accept") < chosen.index("accept-delta")  # interleaved, all by default
    meths = e2e.methods(args.act_bits, args.grad_bits, args.delta_act_bits,
                        args.delta_grad_bits, args.delta_grad_feedback)
    assert meths["accept-delta"] == {"partition": "auto", "act_bits": 3, "grad_bits": 4,
                                     "act_delta": True, "grad_feedback": True}
    assert meths["accept"]["act_bits"] == 8 and "act_delta" not in meths["accept"]
    assert e2e.methods(8, 8)["accept-delta"]["grad_feedback"] is False  # it costs accuracy
    with pytest.raises(SystemExit, match="--delta-grad-bits must be 1..8"):
        e2e._check_delta_bits(2, 16)
    name = "vgg-3dev-speeds-1-1/2-1/4-20mbit"
    sc = e2e.SCENARIOS[name]
    cfg = TrainConfig(model=sc.model, width=sc.width, batch_size=sc.batch_size,
                      micro_batches=4, devices=len(sc.devices),
                      **e2e.methods(8, 8, delta_grad_feedback=True)["accept-delta"])
    descs = describe(build_model(sc.model, seed=cfg.seed, width=sc.width))
    devs = [DeviceInfo(f"e2e-{i}", {"bench_gflops": 10.0 / s,
                                    "bandwidth_bps": parse_bandwidth(bw)})
            for i, (s, bw) in enumerate(sc.devices)]
    res = make_partition(descs, devs, cfg, method="dp", train_samples=1000)
    stages = res.stages()
    assert [(s.act_bits, s.act_delta) for s in stages[:-1]] == [(2, True)] * 2
    assert [(s.grad_bits, s.grad_feedback) for s in stages[1:]] == [(4, True)] * 2
    bare = replace(cfg, act_delta=False, grad_feedback=False)  # stages from the partition
    plan = replace(build_plan("j", bare, len(descs), [d for i in res.devices for d in devs
                                                     if d.id == i], list(res.cuts),
                              method="dp", optimizer=cfg.optimizer_cfg(10)),
                   stages=stages, train_samples=1000)
    plan.validate()  # a plan the agents accept
    runs = {"accept": [{"samples_per_s": 10.0}, {"samples_per_s": 20.0}],
            "accept-delta": [{"samples_per_s": 15.0}, {"samples_per_s": 20.0}]}
    got = e2e._ratios(runs)["AccEPT-delta / AccEPT"]
    assert got["per_repeat"] == [1.5, 1.0] and got["median"] == 1.25


def test_bench_e2e_tiny_run_with_latency_and_the_torch_peer(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from accept_mqtt.cli import main

    out = tmp_path / "e2e.json"
    rc = main(["bench", "e2e", "--scenarios", "3dev-speeds-1-1/2-1/4-slow-links",
               "--repeats", "1", "--steps", "3", "--shaping", "pace", "--latency", "5ms",
               "--methods", "equal-fp32,torch-equal", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    for row in ("equal-fp32 ", "torch-equal ", "equal-fp32 / torch-equal",
                "one-way latency 5 ms (delay-line)", "best of --micro-batches auto"):
        assert row in text
    res: dict[str, Any] = json.loads(out.read_text())
    assert res["latency_via"] == "delay-line" and res["machine"]["cores"]
    sc = res["scenarios"]["3dev-speeds-1-1/2-1/4-slow-links"]
    eq, peer = sc["methods"]["equal-fp32"], sc["methods"]["torch-equal"]
    assert eq["samples_per_s_median"] > 0 and peer["samples_per_s_median"] > 0
    # the torch peer ran on exactly the record's cuts and devices, with the same emulation
    plan = [(d, a, b) for d, a, b, _, _ in eq["plan"]]
    assert peer["cuts"] == [a for _, a, _ in plan] + [plan[-1][2]]
    assert peer["devices"] == [d for d, _, _ in plan]
    run = peer["runs"][0]
    assert run["latency_s"] == pytest.approx(0.005)
    assert run["uplinks_bps"] == [10e6, 50e6, 10e6]
    assert [s["slowdown"] for s in run["stages"]] == [1.0, 2.0, 4.0]
    assert str(sc["ideal"]["best_micro_batches"]) in sc["ideal"]["by_micro_batches"]
    assert sc["latency_one_way_ms"] == pytest.approx(5.0)
