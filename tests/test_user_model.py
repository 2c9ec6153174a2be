"""The user's own model (``--model MODULE:FACTORY``): loading, fx cutting, fingerprints,
refusals, and training over three agents through a real Mosquitto."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from accept_mqtt.coordinator import Coordinator
from accept_mqtt.coordinator.config import ConfigError, TrainConfig
from accept_mqtt.coordinator.errors import PlanRefused
from accept_mqtt.coordinator.planner import DeviceInfo, build_plan
from accept_mqtt.model import fingerprint, fxcut
from accept_mqtt.model.data import load_dataset
from accept_mqtt.model.descriptors import describe
from accept_mqtt.model.reference import train_reference
from accept_mqtt.model.user import (
    FactoryError,
    ModelSpecError,
    UnitsDontChainError,
    UntraceableModelError,
)
from accept_mqtt.model.zoo import ZooModel, build_model, seeded
from broker import MosquittoBroker

from .conftest import running_agents

DEVICES = ["dev-a", "dev-b", "dev-c"]
HERE = "tests.test_user_model"
DIGITS = {"input_shape": (1, 8, 8), "num_classes": 10}


# -- models a user might bring ---------------------------------------------------------------
class Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(y)))  # the skip: x is needed after the branch


class SkipNet(nn.Module):
    """A plain module with skip connections, written as people write them (not a layer list)."""

    def __init__(self, head: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 6, 3, padding=1)
        self.block1 = Residual(6)
        self.block2 = Residual(6)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(6 * 4 * 4, head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = self.block2(self.block1(x))
        return self.head(torch.flatten(self.pool(x), 1))


def skip_net() -> nn.Module:
    return SkipNet()


class SkipNetV2(SkipNet):
    """The same model after its author changed the head: what a device with an older copy of
    the user's package would not have."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(6 * 4 * 4, 10, bias=False)


def skip_net_v2() -> nn.Module:
    return SkipNetV2()


def broken_factory() -> nn.Module:
    raise RuntimeError("out of coffee")


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # control flow on the data: fx cannot trace this
            x = -x
        return self.fc(x.flatten(1))


def untraceable() -> nn.Module:
    return DataDependent()


class TrainingBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        if self.training:  # a trace would keep only this branch, in eval mode too
            x = x + 0.1 * torch.randn_like(x)
        return self.fc(x)


def training_branch() -> nn.Module:
    return TrainingBranch()


def not_chaining() -> list[nn.Module]:
    return [nn.Flatten(), nn.Linear(64, 20), nn.ReLU(), nn.Linear(30, 10)]


def not_a_model() -> str:
    return "a model"


# -- cutting, without a broker ---------------------------------------------------------------
def test_skip_connections_stay_inside_one_unit_and_the_cut_computes_the_same() -> None:
    net = SkipNet()
    units = fxcut.cut(net, torch.zeros(1, 1, 8, 8))
    names = [type(u).__name__ for u in units]
    # every single-tensor point is a cut; each residual block (up to its sum) is one unit
    assert names == ["Conv2d", "relu", "Residual", "relu", "Residual", "relu", "MaxPool2d",
                     "flatten", "Linear"], names
    block = units[2]
    assert isinstance(block, fx.GraphModule)
    assert block.block1.conv1 is net.block1.conv1, "units hold the module's own layers"
    assert units[0] is net.stem
    x = torch.randn(4, 1, 8, 8)
    net.eval()
    torch.testing.assert_close(nn.Sequential(*units)(x), net(x), rtol=0, atol=0)
    net.train()
    # gradients through the cut are the module's own
    nn.Sequential(*units)(x).square().sum().backward()
    cut_grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    net(x).square().sum().backward()
    for n, p in net.named_parameters():
        assert torch.equal(cut_grads[n], p.grad), n


def test_cuts_only_where_exactly_one_tensor_crosses() -> None:
    class Branches(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.out = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            n = x.size(0)  # an int that crosses: no cut until it is used
            y = torch.cat([self.a(x), self.b(x)], 1)  # two tensors in flight: no cut between
            return self.out(y.view(n, -1))

    gm = fxcut.trace(Branches())
    points = fxcut.cut_points(gm, torch.zeros(1, 4))
    crossing = [v.name for _, v in points]
    assert crossing == ["view"], crossing
    units = fxcut.cut(Branches(), torch.zeros(1, 4))
    assert len(units) == 2 and isinstance(units[1], nn.Linear)


def test_no_cut_before_an_in_place_write_or_through_a_tied_weight() -> None:
    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(4, 4)
            self.act = nn.ReLU(inplace=True)
            self.fc2 = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(self.act(self.fc1(x)))

    units = fxcut.cut(InPlace(), torch.zeros(1, 4))
    assert [type(u).__name__ for u in units] == ["Unit", "Linear"]  # fc1+act stay together

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.mid = nn.Tanh()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.mid(self.fc(x)))  # one weight used twice

    assert len(fxcut.cut(Tied(), torch.zeros(1, 4))) == 1


def test_build_is_seeded_described_and_fingerprinted() -> None:
    a = build_model(f"{HERE}:skip_net", seed=5, **DIGITS)
    b = build_model(f"{HERE}:skip_net", seed=5, **DIGITS)
    c = build_model(f"{HERE}:skip_net", seed=6, **DIGITS)
    sa, sb, sc = (m.sequential().state_dict() for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    d = describe(a)
    assert [x.type for x in d] == ["conv2d", "relu", "residual", "relu", "residual", "relu",
                                   "maxpool", "flatten", "linear"]
    block = d[2]
    conv = 2 * 6 * 8 * 8 * 6 * 9
    # two convs, two BatchNorms, the inner ReLU and the skip sum (one per element each)
    assert block.flops == 2 * conv + 4 * 6 * 8 * 8
    assert (block.kernel, block.stride, block.in_channels, block.out_channels) == (3, 1, 6, 6)
    assert sum(x.params for x in d) == sum(p.numel() for p in a.sequential().parameters())
    fa = fingerprint.unit_fingerprints(a.layers)
    assert fa == fingerprint.unit_fingerprints(c.layers), "the seed is not architecture"
    fingerprint.check(fa, c.layers, "m")
    v2 = build_model(f"{HERE}:skip_net_v2", seed=5, **DIGITS)
    with pytest.raises(fingerprint.FingerprintMismatch, match="at unit 8: here it is Linear"):
        fingerprint.check(fa, v2.layers, "m")


MYNET = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 32)
        self.out = nn.Linear(32, 10)

    def forward(self, x):
        h = torch.relu(self.fc1(x.flatten(1)))
        return self.out(h + torch.relu(self.fc2(h)))


def make():
    return Net()
"""


def test_a_py_file_path_and_model_path(tmp_path: Path) -> None:
    (tmp_path / "mynet.py").write_text(MYNET, encoding="utf-8")
    m = build_model(f"{tmp_path}/mynet.py:make", seed=1, **DIGITS)
    assert [type(u).__name__ for u in m.layers] == ["flatten", "Linear", "relu", "Unit", "Linear"]
    # on a device the coordinator's path does not exist: found by name in --model-path
    m2 = build_model("/elsewhere/mynet.py:make", seed=1, model_path=[str(tmp_path)],
                     **DIGITS)
    assert fingerprint.unit_fingerprints(m2.layers) == fingerprint.unit_fingerprints(m.layers)
    with pytest.raises(ModelSpecError, match="no file /elsewhere/mynet.py"):
        build_model("/elsewhere/mynet.py:make", seed=1, **DIGITS)
    with pytest.raises(ModelSpecError, match="cannot import 'no_such_pkg'.*--model-path"):
        build_model("no_such_pkg:make", seed=1, **DIGITS)
    with pytest.raises(ModelSpecError, match="has no callable 'nope'"):
        build_model(f"{HERE}:nope", seed=1, **DIGITS)
    with pytest.raises(FactoryError, match="returned a str"):
        build_model(f"{HERE}:not_a_model", seed=1, **DIGITS)
    with pytest.raises(UnitsDontChainError, match="output per sample is \\[10\\].*3 classes"):
        build_model(f"{HERE}:skip_net", seed=1, input_shape=(1, 8, 8), num_classes=3)
    with pytest.raises(ConfigError, match="name its --dataset"):
        TrainConfig(model=f"{HERE}:skip_net").validate()


# -- through Mosquitto ------------------------------------------------------------------------
def _cfg(tmp_path: Path, model: str, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = dict(model=model, dataset="digits", epochs=1, batch_size=32,
                                micro_batches=4, max_steps=4, seed=11, runs_dir=str(tmp_path),
                                device_timeout=20, step_timeout=30, partition="flops")
    base.update(kw)
    return TrainConfig(**base)


def test_users_skip_model_trains_over_three_agents_like_one_process(
        broker: MosquittoBroker, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, f"{HERE}:skip_net")

    async def main() -> dict[str, Any]:
        async with running_agents(broker.url, DEVICES):
            async with Coordinator(broker.url, cfg, job="own") as coord:
                return await coord.run()

    record = asyncio.run(main())
    assert record["steps"] == 4
    stages = record["plan"]["stages"]
    assert len(stages) == 3 and all(s["end"] > s["start"] for s in stages)
    assert len(record["plan"]["fingerprint"]) == record["plan"]["num_layers"] == 9
    got = torch.load(Path(record["model_path"]))

    # the yardstick: the user's module itself, uncut, trained in one process
    data = load_dataset("digits", seed=cfg.seed)
    with seeded(cfg.seed):
        module = skip_net()
    whole = ZooModel("uncut", [module], (1, 8, 8), 10)
    optimizer = cfg.optimizer_cfg(4, "digits")  # a user's model gets the default recipe
    assert record["plan"]["optimizer"] == optimizer
    ref = train_reference(whole, data, batch_size=32, micro_batches=4,
                          optimizer=optimizer, seed=cfg.seed, max_steps=4)
    # pipeline names ("{unit}.{name in the unit}") -> the module's own, by tensor identity
    with seeded(cfg.seed):
        fresh = skip_net()
    own = {id(t): name for name, t in fresh.state_dict(keep_vars=True).items()}
    units = fxcut.cut(fresh, torch.zeros(1, 1, 8, 8))
    to_module = {f"{i}.{k}": own[id(t)] for i, u in enumerate(units)
                 for k, t in u.state_dict(keep_vars=True).items()}
    assert set(got) == set(to_module) and len(to_module) == len(ref)
    init = fresh.state_dict()
    moved = 0
    for name, want in ((n, ref[f"0.{to_module[n]}"]) for n in got):
        # bit for bit: the same operations on the same micro-batches, fp32 on every link
        assert torch.equal(got[name], want), (name, (got[name] - want).abs().max())
        moved += int(not torch.equal(init[to_module[name]], want))
    assert moved > 10, "training must actually have changed the parameters"
    assert all(ln["act_bytes"] > 0 and ln["grad_bytes"] > 0 for ln in record["links"])


async def _retained_plans(broker: MosquittoBroker, wait: float = 0.5) -> list[bytes]:
    async with aiomqtt.Client(broker.host, broker.port) as c:
        await c.subscribe("accept/jobs/+/plan", qos=1)
        got: list[bytes] = []
        try:
            async with asyncio.timeout(wait):
                async for msg in c.messages:
                    got.append(bytes(msg.payload or b""))
        except TimeoutError:
            pass
        return got


@pytest.mark.parametrize("factory, error, says", [
    ("broken_factory", FactoryError, r"broken_factory\(\) raised RuntimeError: out of coffee"),
    ("untraceable", UntraceableModelError, "torch.fx cannot trace DataDependent"),
    ("training_branch", UntraceableModelError,
     "TrainingBranch.forward takes another path in eval mode"),
    ("not_chaining", UnitsDontChainError,
     r"unit 3 \(Linear\) does not take unit 2's output \[1, 20\]"),
])
def test_a_bad_model_is_refused_before_any_device_is_touched(
        broker: MosquittoBroker, tmp_path: Path, factory: str, error: type[Exception],
        says: str) -> None:
    cfg = _cfg(tmp_path, f"{HERE}:{factory}")

    async def main() -> None:
        async with running_agents(broker.url, DEVICES) as agents:
            async with Coordinator(broker.url, cfg, job="bad") as coord:
                with pytest.raises(error, match=says):
                    await coord.run()
            assert all(a.job is None and not a.errors for a in agents)
        assert await _retained_plans(broker) == [], "no plan may have been published"

    asyncio.run(main())


def test_an_agent_whose_build_differs_refuses_the_plan_naming_the_unit(
        broker: MosquittoBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The devices have another version of the user's package (SkipNetV2: another head)."""
    import device_agent.agent as agent_module

    def device_build(name: str, **kw: Any) -> ZooModel:
        return build_model(name.replace(":skip_net", ":skip_net_v2"), **kw)

    monkeypatch.setattr(agent_module, "build_model", device_build)
    cfg = _cfg(tmp_path, f"{HERE}:skip_net")
    on_metrics: list[dict[str, Any]] = []

    async def watch() -> None:
        async with aiomqtt.Client(broker.host, broker.port) as c:
            await c.subscribe("accept/jobs/mismatch/metrics")
            async for msg in c.messages:
                on_metrics.append(json.loads(bytes(msg.payload or b"{}")))

    async def main() -> None:
        watcher = asyncio.create_task(watch())
        await asyncio.sleep(0.2)
        async with running_agents(broker.url, DEVICES) as agents:
            async with Coordinator(broker.url, cfg, job="mismatch") as coord:
                with pytest.raises(PlanRefused, match="at unit 8"):
                    await coord.run()
            refused = [e for a in agents for e in a.errors]
            assert all(a.job is None for a in agents), "no agent built a stage"
        await asyncio.sleep(0.2)
        watcher.cancel()
        assert refused and all("at unit 8: here it is Linear" in e.reason for e in refused)

    asyncio.run(main())
    errors = [m for m in on_metrics if m.get("type") == "error"]
    assert errors and all(e["topic"] == "accept/jobs/mismatch/plan" for e in errors)
    assert all("differs from the plan's at unit 8" in e["reason"] for e in errors), errors


def test_a_stage_of_traced_units_saves_and_restores_by_whole_model_names() -> None:
    """Checkpoints, restores and weight migration name tensors "{unit}.{name in the unit}"."""
    from accept_mqtt.model.descriptors import output_shapes
    from accept_mqtt.model.stage import StageRunner

    m = build_model(f"{HERE}:skip_net", seed=3, **DIGITS)
    d, shapes = describe(m), output_shapes(m)
    runner = StageRunner(m.layers[2:5], d[2:5], shapes[1], is_first=False, is_last=False,
                         optimizer_cfg={"name": "sgd", "lr": 0.1})
    x = torch.randn(4, *shapes[1])
    runner.forward((0, 0), x)
    runner.backward((0, 0), torch.ones(4, *shapes[4]))
    runner.step()
    state, optim = runner.state_dict(2), runner.optimizer_state(2)
    assert "2.block1.conv1.weight" in state and "4.block2.bn2.running_mean" in state
    assert "2.block1.conv1.weight::momentum_buffer" in optim
    fresh = build_model(f"{HERE}:skip_net", seed=4, **DIGITS)
    other = StageRunner(fresh.layers[2:5], d[2:5], shapes[1], is_first=False, is_last=False,
                        optimizer_cfg={"name": "sgd", "lr": 0.1})
    other.load_state_dict(state, 2)
    other.load_optimizer_state(optim, 2)
    assert all(torch.equal(v, other.state_dict(2)[k]) for k, v in state.items())
    torch.testing.assert_close(other.infer(x), runner.infer(x), rtol=0, atol=0)


def test_plan_carries_the_fingerprint_and_checks_its_length() -> None:
    from accept_mqtt.wire.plan import Plan, PlanError

    cfg = _cfg(Path("."), f"{HERE}:skip_net")
    m = build_model(cfg.model, seed=cfg.seed, **DIGITS)
    fp = fingerprint.unit_fingerprints(m.layers)
    devs = [DeviceInfo(d, {}) for d in DEVICES]
    plan = build_plan("j", cfg, len(m.layers), devs, [0, 3, 6, 9], method="flops",
                      model_args={"input_shape": [1, 8, 8], "num_classes": 10},
                      fingerprint=fp, optimizer=cfg.optimizer_cfg(10))
    assert Plan.from_json(plan.to_json()) == plan
    assert json.loads(plan.to_json())["fingerprint"] == list(fp)
    body = json.loads(plan.to_json())
    body["fingerprint"] = body["fingerprint"][:-1]
    with pytest.raises(PlanError, match="fingerprint has 8 digests for 9 layers"):
        Plan.from_json(json.dumps(body))


def test_input_shape_from_config_and_reshaped_samples(tmp_path: Path) -> None:
    from accept_mqtt.model.data import DatasetError, reshape_inputs

    cfg = TrainConfig.from_dict({"model": f"{HERE}:skip_net", "dataset": "digits",
                                 "input_shape": [64]})
    assert cfg.input_shape == [64]
    with pytest.raises(ConfigError, match="input_shape must be a list of positive ints"):
        TrainConfig.from_dict({"dataset": "digits", "input_shape": [0, 8]})
    data = load_dataset("digits", seed=0)
    flat = reshape_inputs(data, (64,))
    assert flat.input_shape == (64,) and torch.equal(flat.train_x[3], data.train_x[3].flatten())
    with pytest.raises(DatasetError, match=r"input shape \[3, 8, 8\] holds 192 values but "
                                           r"digits's samples are \[1, 8, 8\]"):
        reshape_inputs(data, (3, 8, 8))


def test_cli_refuses_a_bad_factory_and_the_agent_a_missing_model_path(
        broker: MosquittoBroker, tmp_path: Path) -> None:
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "accept_mqtt.cli", "train", "--broker",
                        broker.url, "--model", f"{HERE}:broken_factory", "--dataset", "digits",
                        "--devices", "1", "--runs-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stderr[-2000:]
    assert "broken_factory() raised RuntimeError: out of coffee" in p.stderr
    assert "waited" not in p.stderr and "Traceback" not in p.stderr
    a = subprocess.run([sys.executable, "-m", "device_agent", "--model-path",
                        str(tmp_path / "nowhere")], capture_output=True, text=True, timeout=60)
    assert a.returncode == 2 and "is not a directory" in a.stderr
