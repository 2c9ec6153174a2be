"""The plain ``pip install accept-mqtt`` is the device agent's, and that agent trains in a job.

One slow test (about a minute: torch alone takes ~30 s to unpack into a fresh environment):
the package is built into a wheel, installed with its plain requirements from the package
index into a new virtual environment (torch first, pinned as the Makefile pins it, so pip
does not pull a multi-GB CUDA build), and then

* what the wheel added beyond torch is exactly the lean set, and the agent imports every
  distribution of it (nothing unused is required, nothing imported is missing);
* the coordinator's command, run there, stops and names the extra to install;
* that environment's agent runs one stage of a real job through Mosquitto beside an agent
  of the development environment, and leaves on SIGTERM with exit status 0.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

from accept_mqtt.coordinator import Coordinator
from accept_mqtt.coordinator.config import TrainConfig
from broker import MosquittoBroker

from .conftest import running_agents, wait_retained

ROOT = Path(__file__).resolve().parents[1]
LEAN = {"torch", "numpy", "msgpack", "msgspec", "aiomqtt", "paho-mqtt"}
TORCH_PIN = "torch==2.13.0"  # the Makefile's TORCH_PIN
# The distributions the agent imports, as importlib.metadata names them, printed by the fresh
# environment's Python after importing the agent
IMPORTED = """
import json, sys, importlib.metadata as md
import device_agent.__main__, device_agent.agent
owners = md.packages_distributions()
dists = {d.lower() for m in list(sys.modules) for d in owners.get(m.split('.')[0], [])}
print(json.dumps({"dists": sorted(dists), "file": device_agent.__file__}))
"""


def _norm(name: str) -> str:
    return name.lower().replace("_", "-")


def _pip_names(python: Path) -> set[str]:
    out = subprocess.run([str(python), "-m", "pip", "list", "--format", "json"],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    return {_norm(p["name"]) for p in json.loads(out)}


def _build_wheel(tmp: Path) -> Path:
    """A wheel of the working tree, built from a copy (a build leaves build/ and egg-info)."""
    src = tmp / "src"
    src.mkdir()
    for f in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / f, src / f)
    for pkg in ("accept_mqtt", "device_agent", "broker"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp / "dist"), f"{src}/"],
                   check=True, timeout=300, capture_output=True)
    (wheel,) = (tmp / "dist").glob("accept_mqtt-*.whl")
    return wheel


def _requirements(wheel: Path) -> tuple[set[str], dict[str, set[str]]]:
    """(plain requirements, extra -> its requirements) from the wheel's METADATA."""
    with zipfile.ZipFile(wheel) as z:
        meta_name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(z.read(meta_name).decode())
    plain: set[str] = set()
    extras: dict[str, set[str]] = {}
    for req in meta.get_all("Requires-Dist") or []:
        name = _norm(re.match(r"[A-Za-z0-9_.-]+", req).group(0))  # type: ignore[union-attr]
        extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)", req)
        (extras.setdefault(extra.group(1), set()) if extra else plain).add(name)
    return plain, extras


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_plain_install_is_the_agents_and_it_trains_in_a_job(broker: MosquittoBroker,
                                                            tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path)
    plain, extras = _requirements(wheel)
    assert plain == LEAN
    assert {"river", "scikit-learn", "rich"} <= extras["coordinator"]

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    pip = [str(py), "-m", "pip", "install", "-q"]
    subprocess.run(pip + [TORCH_PIN], check=True, timeout=600, capture_output=True)
    with_torch = _pip_names(py)
    subprocess.run(pip + [str(wheel)], check=True, timeout=600, capture_output=True)
    added = _pip_names(py) - with_torch
    assert added == (LEAN - {"torch"}) | {"accept-mqtt"}, added

    # run from tmp_path so the working tree's sources are not what gets imported
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "ACCEPT_MQTT"))}
    got = json.loads(subprocess.run([str(py), "-c", IMPORTED], capture_output=True, text=True,
                                    check=True, timeout=120, cwd=tmp_path, env=env).stdout)
    assert Path(got["file"]).is_relative_to(venv)
    imported = {_norm(d) for d in got["dists"]} - {"accept-mqtt"}
    assert LEAN <= imported, f"required but never imported: {LEAN - imported}"
    assert imported <= with_torch | LEAN, f"imported but not required: {imported - LEAN}"

    train = subprocess.run([str(venv / "bin" / "accept-mqtt"), "train", "--devices", "1"],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert train.returncode == 2
    assert "pip install 'accept-mqtt[coordinator]'" in train.stderr, train.stderr

    agent = subprocess.Popen(
        [str(venv / "bin" / "accept-mqtt-agent"), "--device-id", "lean-b", "--keepalive", "5"],
        cwd=tmp_path, env=dict(env, ACCEPT_MQTT_BROKER=broker.url), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    try:
        cfg = TrainConfig(model="cnn", dataset="digits", devices=2, epochs=1, batch_size=32,
                          micro_batches=2, max_steps=3, seed=3, runs_dir=str(tmp_path / "runs"),
                          device_timeout=60, step_timeout=60, partition="equal")

        async def main() -> dict:
            await wait_retained(broker.url, "accept/devices/lean-b/status",
                                lambda b: b.get("state") == "online", 60)
            async with running_agents(broker.url, ["dev-a"]):
                async with Coordinator(broker.url, cfg, job="lean") as coord:
                    return await coord.run()

        record = asyncio.run(main())
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(30) == 0
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    log = agent.stdout.read() if agent.stdout else ""
    assert record["steps"] == 3
    lean = [s for s in record["stages"] if s["device"] == "lean-b"]
    assert len(lean) == 1 and lean[0]["busy_ms"] > 0, (record["stages"], log)
    assert all(ln["act_bytes"] > 0 and ln["grad_bytes"] > 0 for ln in record["links"])
