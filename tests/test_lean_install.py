"""The plain ``pip install accept-mqtt`` is the device agent's, and that agent trains in a job.

Fast: a CLI command whose extra is missing (simulated by blocking its module) says which
extra to install, and the extras the CLI names are pyproject's.

One slow test (about 40 s on an idle machine): the package is built into a wheel and
installed with its plain requirements from the package index into a new virtual environment.
torch is not unpacked again (30-60 s here): the new environment is given this one's torch,
the version the Makefile pins, and what torch requires, through a .pth file naming a folder
of links to just those; pip sees it installed and fetches the rest, so every other package
the agent gets comes from the wheel's own requirements. Then

* what the wheel added beyond torch is exactly the lean set, and the agent imports every
  distribution of it (nothing unused is required, nothing imported is missing);
* the shipped systemd unit is in the wheel and names that environment's Python;
* the coordinator's command, run there, stops and names the extra to install;
* that environment's agent runs one stage of a real job through Mosquitto beside an agent
  of the development environment, and leaves on SIGTERM with exit status 0.
"""

from __future__ import annotations

import asyncio
import importlib.metadata as md
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from accept_mqtt.cli import EXTRA_MODULES, NEEDS
from accept_mqtt.coordinator import Coordinator
from accept_mqtt.coordinator.config import TrainConfig
from broker import MosquittoBroker

from .conftest import running_agents, wait_retained

ROOT = Path(__file__).resolve().parents[1]
LEAN = {"torch", "numpy", "msgpack", "msgspec", "aiomqtt", "paho-mqtt"}
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


def _give_torch(venv: Path) -> None:
    """Make this environment's torch, and the distributions it requires (recursively, no
    extras), importable and visible to pip in ``venv``: links in one folder, named by a
    .pth file. Nothing else of this environment is visible there."""
    links = venv / "torch-from-dev"
    links.mkdir()
    todo, seen = ["torch"], set()
    while todo:
        dist = md.distribution(todo.pop())
        name = _norm(dist.metadata["Name"])
        if name in seen or name in ("pip", "setuptools"):  # the new venv has its own
            continue
        seen.add(name)
        for top in {f.parts[0] for f in dist.files or [] if f.parts[0] != ".."}:
            target = Path(str(dist.locate_file(top)))
            if not (links / top).exists():
                (links / top).symlink_to(target)
        for req in map(Requirement, dist.requires or []):
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    (site,) = (venv / "lib").glob("python3*/site-packages")
    (site / "torch-from-dev.pth").write_text(f"{links}\n")


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


def _cli_without(modules: list[str], *argv: str) -> subprocess.CompletedProcess[str]:
    """``accept-mqtt ARGV`` in a Python where importing ``modules`` fails, as it does where
    their packages are not installed."""
    code = ("import sys\n"
            f"for m in {modules!r}: sys.modules[m] = None\n"
            "from accept_mqtt.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("blocked,argv", [
    (["river"], ["train", "--devices", "1"]),
    (["rich"], ["monitor", "--once"]),  # monitor imports rich as its module loads
    (["sklearn"], ["bench", "codec"]),
    (["river", "sklearn", "rich"], ["profile"]),
])
def test_a_command_without_its_extra_names_it(blocked: list[str], argv: list[str]) -> None:
    p = _cli_without(blocked, *argv)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip() == (
        f"accept-mqtt: 'accept-mqtt {argv[0]}' needs the 'coordinator' extra (module "
        f"{blocked[0]!r} is not installed): pip install 'accept-mqtt[coordinator]'")


def test_a_lazy_import_of_an_extra_is_reported_too() -> None:
    """matplotlib is imported only when a plot is drawn; its absence then names 'plot'."""
    code = ("import sys\nsys.modules['matplotlib'] = None\n"
            "from accept_mqtt.cli import _missing_extra\n"
            "try:\n    import matplotlib.pyplot\n"
            "except ModuleNotFoundError as e:\n    print(_missing_extra('bench', e))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert "needs the 'plot' extra (module 'matplotlib'" in out


def test_the_extras_the_cli_names_are_pyprojects() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert set(NEEDS.values()) | set(EXTRA_MODULES.values()) <= set(extras)
    owners = {"river": "river", "sklearn": "scikit-learn", "rich": "rich",
              "matplotlib": "matplotlib"}
    for module, extra in EXTRA_MODULES.items():
        assert any(r.startswith(owners[module]) for r in extras[extra]), (module, extra)
    for extra in NEEDS.values():  # every package of a command's extra is checked for
        for req in extras[extra]:
            name = re.match(r"[A-Za-z0-9_.-]+", req).group(0)  # type: ignore[union-attr]
            assert name in owners.values() and EXTRA_MODULES[
                next(m for m, d in owners.items() if d == name)] == extra, req


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
    _give_torch(venv)
    with_torch = _pip_names(py)
    assert "torch" in with_torch and "river" not in with_torch
    subprocess.run([str(py), "-m", "pip", "install", "-q", str(wheel)], check=True,
                   timeout=600, capture_output=True)
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

    unit = subprocess.run([str(venv / "bin" / "accept-mqtt-agent"), "--print-systemd-unit"],
                          capture_output=True, text=True, check=True, timeout=120,
                          cwd=tmp_path, env=env).stdout  # the unit file is in the wheel
    assert f"ExecStart={py} -m device_agent" in unit and "Restart=on-failure" in unit

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
