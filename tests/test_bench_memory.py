"""``accept-mqtt bench memory``: a tiny run through the real processes (Mosquitto, agent
processes, the coordinator as ``accept-mqtt train``); figures come from the kernel."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from accept_mqtt.cli import main


def test_bench_memory_reports_every_process_peak(tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    rc = main(["bench", "memory", "--model", "cnn", "--width", "1", "--dataset",
               "synthetic-digits", "--synthetic-size", "600", "--epochs", "1", "--max-steps",
               "3", "--batch-size", "32", "--eval-batch", "16", "--timing-steps", "1000",
               "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    procs = {p["process"]: p for p in res["processes"]}
    assert set(procs) == {"coordinator", "broker", "local-0", "local-1", "local-2"}
    assert sorted(p["stage"] for n, p in procs.items() if n.startswith("local-")) == [0, 1, 2]
    for p in procs.values():
        # the kernel's peak is at least what the sampler saw during the run (the kernel's
        # per-thread RSS counters lag by up to 64 pages a thread: a margin)
        assert p["max_rss_in_run_mb"] >= p["rss_at_start_mb"] > 1.0, p
        assert p["peak_rss_mb"] >= p["max_rss_in_run_mb"] - 2.0, p
        assert p["run_added_mb"] == pytest.approx(
            p["max_rss_in_run_mb"] - p["rss_at_start_mb"], abs=0.11)
    assert procs["coordinator"]["peak_rss_mb"] > 50 and procs["local-0"]["peak_rss_mb"] > 50
    assert res["run"]["steps"] == 3 and res["run"]["evaluations"] == 1
    # cnn: 14 layers over 3 devices, fwd and bwd: 28 samples a step; the store is bounded
    # (planner.TIMING_SAMPLES_KEPT), so 1000 steps' worth stays small
    store = res["timing_store"]
    assert store["samples"] == 1000 * 28 and store["held_mb"] < 5.0, store
    # 120 held-out 1x8x8 float32 samples
    assert res["test_set_mb"] == pytest.approx(120 * 64 * 4 / 2**20, abs=1e-3)


def test_bench_memory_refuses_a_code_dir_without_sources(tmp_path: Path) -> None:
    assert main(["bench", "memory", "--code", str(tmp_path)]) == 2
