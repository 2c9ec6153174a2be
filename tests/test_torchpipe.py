"""The torch-pipelining peer (``bench/torchpipe.py``) and ``accept-mqtt bench overhead``.

No speed is asserted here (speed targets live in the benchmarks): only that the runs work,
that the torch pipeline does the project's arithmetic (its parameters equal
``reference.train_reference``'s), that the slowdown emulation sleeps what it says, and that
failures are clear and leave no worker behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from accept_mqtt.bench import overhead, torchpipe
from accept_mqtt.bench.torchpipe import TorchPipeError, run_one_process, run_torch_pipeline
from accept_mqtt.model.data import load_dataset
from accept_mqtt.model.reference import train_reference
from accept_mqtt.model.zoo import build_model

SEED = 1234
KW = {"batch_size": 16, "micro_batches": 4, "steps": 2, "seed": SEED, "lr": 0.05,
      "momentum": 0.9}


def _workers_alive(tmp: Path) -> list[int]:
    """Pids of processes whose command line names this test's job file."""
    job = str(tmp / "job.json").encode()
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if job in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


def test_two_stages_train_and_match_one_process_reference(tmp_path: Path) -> None:
    res = run_torch_pipeline("cnn", 0.5, [0, 7, 14], schedule="1f1b", check=True,
                             workdir=tmp_path, **KW)
    assert res["samples_per_s"] > 0
    assert res["timed_steps"] == 1 and res["samples"] == 16
    assert len(res["losses"]) == 2 and len(res["step_ms"]) == 2
    assert [s["layers"] for s in res["stages"]] == [[0, 7], [7, 14]]
    assert all(s["fwd_calls"] == s["bwd_calls"] == 2 * 4 for s in res["stages"])
    assert all(s["sleep_ms"] == 0 for s in res["stages"])

    data = load_dataset("digits", seed=SEED)
    want = train_reference(build_model("cnn", seed=SEED, width=0.5), data, batch_size=16,
                           micro_batches=4, optimizer={"name": "sgd", "lr": 0.05,
                                                       "momentum": 0.9},
                           seed=SEED, max_steps=2)
    got = res["state_dict"]
    assert set(got) == set(want)  # BatchNorm buffers included: no extra forward happened
    for name, t in want.items():
        torch.testing.assert_close(got[name], t, rtol=1e-5, atol=1e-6, msg=name)

    one = run_one_process("cnn", 0.5, check=True, **KW)
    assert one["samples_per_s"] > 0
    assert torchpipe.max_abs_diff(one["state_dict"], want) < 1e-6
    assert one["losses"] == pytest.approx(res["losses"], rel=1e-6)


def test_slowdown_sleeps_its_share_of_each_stage_call(tmp_path: Path) -> None:
    res = run_torch_pipeline("cnn", 0.5, [0, 7, 14], schedule="gpipe", slowdowns=[1.0, 3.0],
                             workdir=tmp_path, **KW)
    fast, slow = res["stages"]
    assert fast["sleep_ms"] == 0
    # each call sleeps 2x the CPU time it used (however much the other stage stretched it)
    busy = slow["fwd_ms"] + slow["bwd_ms"]
    assert slow["sleep_ms"] == pytest.approx(2.0 * slow["cpu_ms"], rel=0.02)
    assert 0 < slow["cpu_ms"] <= busy * 1.01
    assert "(s-1) x the CPU time" in res["emulation"]


@pytest.mark.parametrize("change, phrase", [
    ({"cuts": [0, 7, 99]}, "layer count 14"),
    ({"cuts": [0, 7, 7, 14]}, "increase strictly"),
    ({"batch_size": 18}, "equal micro-batches"),
    ({"steps": 1}, "warm-up"),
    ({"micro_batches": 2, "cuts": [0, 4, 9, 14]}, "micro-batches >= stages"),
    ({"slowdowns": [1.0]}, "slowdowns"),
    ({"uplinks_bps": [1e6]}, "uplinks_bps must be 2 rates"),
    ({"uplinks_bps": [1e6, 0.0]}, "uplinks_bps must be 2 rates"),
    ({"latency_s": -0.01}, "latency_s must be >= 0"),
])
def test_bad_arguments_fail_before_any_process(change: dict[str, object], phrase: str) -> None:
    kw: dict[str, object] = dict(KW, cuts=[0, 7, 14], schedule="1f1b")
    kw.update(change)
    cuts = kw.pop("cuts")
    with pytest.raises(TorchPipeError, match=phrase):
        run_torch_pipeline("cnn", 0.5, cuts, **kw)  # type: ignore[arg-type]


def test_unreachable_gloo_master_is_a_clear_error_and_leaves_no_worker(tmp_path: Path) -> None:
    # 192.0.2.1 is TEST-NET-1: never routed, so no rank can join
    with pytest.raises(TorchPipeError, match="gloo could not start"):
        run_torch_pipeline("cnn", 0.5, [0, 7, 14], master_addr="192.0.2.1", init_timeout=4,
                           workdir=tmp_path, **KW)
    assert _workers_alive(tmp_path) == []


def test_equal_cuts_are_the_planners() -> None:
    assert overhead.equal_cuts("cnn", 1.0) == [0, 5, 9, 14]
    n = len(build_model("vgg", seed=0, width=0.25).layers)
    cuts = overhead.equal_cuts("vgg", 0.25)
    assert cuts[0] == 0 and cuts[-1] == n and len(cuts) == 4


def test_bench_overhead_quick_prints_all_three(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from accept_mqtt.cli import main

    out = tmp_path / "overhead.json"
    rc = main(["bench", "overhead", "--quick", "--models", "cnn", "--steps", "3",
               "--repeats", "1", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    for row in ("accept-mqtt ", "torch-pipelining ", "one-process ", "accept/torch",
                "accept/one-process", "loopback, no emulation", "cores"):
        assert row in text
    assert "planned cuts" not in text  # accept-mqtt used the cuts torch was given
    res = json.loads(out.read_text())["models"]["cnn"]
    assert set(res["samples_per_s"]) == set(overhead.METHODS)
    assert all(v["median"] > 0 for v in res["samples_per_s"].values())
    # the same arithmetic three ways: the per-step losses agree
    assert all(d is not None and d < 1e-4 for d in res["max_loss_diff_vs_one_process"].values())


# -- link emulation (bench e2e's torch peer) -------------------------------------------------
class _FakeWork:
    def wait(self) -> None:
        pass


def test_paced_uplink_sends_in_order_one_serialisation_time_apart(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The timer thread issues each send once the sends before it had their serialisation
    time, in order; ``send`` itself returns at once."""
    import time

    import torch.distributed as dist

    issued: list[tuple[int, float]] = []
    monkeypatch.setattr(dist, "isend", lambda t, dst, group: (
        issued.append((int(t[0]), time.perf_counter())), _FakeWork())[1])
    up = torchpipe._Uplink(8 * 4000 / 0.02)  # one 4000-byte tensor takes 20 ms
    t0 = time.perf_counter()
    for i in range(5):
        up.send(torch.full((1000,), float(i)), 1, None)
    assert time.perf_counter() - t0 < 0.01
    up.close()
    late = [t - t0 for _, t in issued]
    assert [i for i, _ in issued] == list(range(5))
    assert up.sends == 5 and up.send_bytes == 20_000
    for j, v in enumerate(late):
        assert 0.02 * (j + 1) - 1e-3 <= v < 0.02 * (j + 1) + 0.05, late


class _ArrivesAt:
    """A receive whose data arrives at ``t`` (perf_counter)."""

    def __init__(self, t: float) -> None:
        self.t = t

    def wait(self) -> bool:
        import time

        time.sleep(max(0.0, self.t - time.perf_counter()))
        return True


def test_late_receives_are_usable_latency_after_arrival_and_overlap() -> None:
    """Each receive is usable ``latency`` after its own data arrived: ten receives whose
    data arrive 10 ms apart are all usable within ``latency`` + 100 ms, not 10 latencies."""
    import time

    t0 = time.perf_counter()
    recvs = [torchpipe._LateRecv(_ArrivesAt(t0 + 0.01 * i), 0.1) for i in range(10)]
    assert not recvs[0].is_completed()
    done = []
    for r in recvs:
        r.wait()
        done.append(time.perf_counter() - t0)
    for i, v in enumerate(done):
        assert v >= 0.01 * i + 0.1 - 1e-3, done
    assert done[-1] < 0.09 + 0.1 + 0.05, done
    assert recvs[-1].is_completed()


def test_latency_and_pacing_keep_the_arithmetic(tmp_path: Path) -> None:
    """Sends through the emulated uplinks still match their receives: three stages train
    exactly as one process does, and a step takes at least the round trips 1F1B needs."""
    latency = 0.03
    res = run_torch_pipeline("cnn", 0.5, [0, 5, 9, 14], schedule="1f1b", check=True,
                             latency_s=latency, uplinks_bps=[50e6, 50e6, 50e6],
                             workdir=tmp_path, **KW)
    assert res["latency_s"] == latency and "link_emulation" in res
    assert [s["sends"] for s in res["stages"]] == [2 * 4, 2 * 2 * 4, 2 * 4]  # paced sends
    one = run_one_process("cnn", 0.5, check=True, **KW)
    assert torchpipe.max_abs_diff(res["state_dict"], one["state_dict"]) < 1e-6
    # micro-batch 0 crosses 2 links forward and 2 back before stage 0 may send micro-batch 3,
    # which then crosses them again: at least 8 one-way latencies; each transfer pays its
    # latency once (16 transfers per step, all delayed, would be 16 if they queued)
    assert 8 * latency * 1e3 <= res["step_ms"][1] < 14 * latency * 1e3, res["step_ms"]
