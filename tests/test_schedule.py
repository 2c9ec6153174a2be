"""Learning-rate schedules: a pure function of the step, the same on a stage and in the
reference, checked before anything is built; the config resolves recipes without replacing
what the user set."""

from __future__ import annotations

import math

import pytest
import torch

from accept_mqtt.coordinator.config import ConfigError, TrainConfig
from accept_mqtt.model.descriptors import describe
from accept_mqtt.model.schedule import ScheduleError, check_schedule, lr_at
from accept_mqtt.model.stage import StageRunner
from accept_mqtt.model.zoo import build_model


def test_warmup_then_cosine_and_step() -> None:
    cos = {"lr": 0.1, "lr_schedule": "cosine", "warmup_steps": 3, "total_steps": 13}
    got = [lr_at(cos, s) for s in range(13)]
    assert got[:3] == pytest.approx([0.025, 0.05, 0.075])  # (s + 1) / (w + 1)
    assert got[3] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(got[3:], got[4:], strict=False)), "falls after warm-up"
    assert 0 < got[-1] < 0.01
    assert got[8] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    step = {"lr": 1.0, "lr_schedule": "step", "total_steps": 8}
    assert [lr_at(step, s) for s in range(8)] == pytest.approx([1] * 4 + [0.1, 0.1, 0.01, 0.01])
    assert lr_at({"lr": 0.05}, 10**6) == 0.05, "no schedule key: constant, as before"


@pytest.mark.parametrize("cfg,match", [
    ({"lr_schedule": "linear"}, "lr_schedule must be one of"),
    ({"lr_schedule": "cosine"}, "needs total_steps"),
    ({"lr_schedule": "step", "total_steps": 0}, "needs total_steps"),
    ({"warmup_steps": -1}, "warmup_steps must be"),
    ({"lr": 0}, "lr must be"),
])
def test_malformed_schedules_are_refused_before_a_stage_is_built(cfg: dict, match: str) -> None:
    with pytest.raises(ScheduleError, match=match):
        check_schedule(cfg)
    model = build_model("cnn", seed=0)
    with pytest.raises(ScheduleError, match=match):
        StageRunner(model.layers[:3], describe(model)[:3], model.input_shape, is_first=True,
                    is_last=False, optimizer_cfg={"name": "sgd", **cfg})


def test_a_stage_applies_the_lr_of_the_step_it_is_told() -> None:
    """The step index is the clock: a stage resumed at step 7 uses step 7's lr."""
    model = build_model("mlp", seed=0)
    cfg = {"name": "sgd", "lr": 0.2, "momentum": 0.0, "lr_schedule": "cosine",
           "warmup_steps": 2, "total_steps": 10}
    runner = StageRunner(model.layers, describe(model), model.input_shape, is_first=True,
                         is_last=True, optimizer_cfg=cfg)
    x, y = torch.randn(4, *model.input_shape), torch.tensor([0, 1, 2, 3])
    for step in (0, 7):
        runner.forward((step, 0), x, y)
        runner.backward((step, 0))
        runner.step(step)
        assert runner.optimizer is not None
        assert runner.optimizer.param_groups[0]["lr"] == lr_at(cfg, step)
    assert lr_at(cfg, 0) != lr_at(cfg, 7)


def test_config_resolves_the_recipe_and_keeps_what_the_user_set() -> None:
    auto = TrainConfig(model="cnn", dataset="digits").optimizer_cfg(100)
    assert auto["lr_schedule"] == "cosine" and auto["warmup_steps"] == 10
    assert auto["total_steps"] == 100
    mine = TrainConfig(model="cnn", lr_schedule="constant", warmup_steps=0).optimizer_cfg(100)
    assert (mine["lr_schedule"], mine["warmup_steps"]) == ("constant", 0)
    assert [lr_at(mine, s) for s in (0, 99)] == [0.05, 0.05]
    with pytest.raises(ConfigError, match="lr_schedule must be"):
        TrainConfig(lr_schedule="exp").validate()
    with pytest.raises(ConfigError, match="warmup_steps must be"):
        TrainConfig.from_dict({"warmup_steps": "3"})
