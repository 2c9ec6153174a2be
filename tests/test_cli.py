"""The README's commands, run as a user would (subprocesses, real broker, real agents)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from broker import MosquittoBroker


def _cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "accept_mqtt.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_train_without_broker_runs_a_private_cluster(tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    p = _cli("train", "--model", "cnn", "--dataset", "digits", "--devices", "3", "--epochs", "1",
             "--max-steps", "5", "--runs-dir", str(tmp_path), "--json", str(out), "--no-progress")
    assert p.returncode == 0, p.stderr[-3000:]
    rec = json.loads(out.read_text())
    assert rec["steps"] == 5 and len(rec["stages"]) == 3
    # default planning: the DP fed by the online predictor, which learnt from agents' samples
    assert rec["plan"]["method"] == "dp+predictor"
    assert all(s["predicted_ms"] > 0 for s in rec["plan"]["stages"])
    assert rec["timing_samples"] > 0
    assert all(e is not None for e in rec["predictor_error"].values())
    assert 0.0 <= rec["final_accuracy"] <= 1.0
    assert "samples/s" in p.stdout and "held-out accuracy" in p.stdout
    assert (Path(rec["record_path"])).exists() and Path(rec["model_path"]).exists()


def test_train_with_broker_and_no_agents_says_what_is_missing(broker: MosquittoBroker,
                                                              tmp_path: Path) -> None:
    p = _cli("train", "--broker", broker.url, "--devices", "2", "--device-timeout", "1",
             "--runs-dir", str(tmp_path), timeout=60)
    assert p.returncode == 1
    assert "waited 1s for 2 idle device agents" in p.stderr
    assert "python -m device_agent --broker" in p.stderr
    assert "Traceback" not in p.stderr


def test_bad_flags_are_clear_errors(tmp_path: Path) -> None:
    p = _cli("train", "--act-bits", "9", "--runs-dir", str(tmp_path), timeout=60)
    assert p.returncode == 2 and "act_bits must be 1..8, 16 or 32" in p.stderr
    cfg = tmp_path / "c.json"
    cfg.write_text('{"epochs": 1, "lrr": 0.1}')
    p = _cli("train", "--config", str(cfg), timeout=60)
    assert p.returncode == 2 and "unknown config keys ['lrr']" in p.stderr
    a = subprocess.run([sys.executable, "-m", "device_agent", "--device-id", "bad/id"],
                       capture_output=True, text=True, timeout=60)
    assert a.returncode == 2 and "device id 'bad/id'" in a.stderr
