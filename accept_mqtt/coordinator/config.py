"""Training job configuration: CLI flags and an optional JSON config file map onto this.

Guarantee: ``TrainConfig.from_file`` rejects unknown keys and wrong types with the key's name,
so a typo in a config file is an error, not a silently ignored setting.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

from accept_mqtt.model.schedule import LR_SCHEDULES, default_recipe
from accept_mqtt.model.user import is_user_model
from accept_mqtt.wire.chunks import DEFAULT_MAX_MESSAGE_BYTES, check_limit
from accept_mqtt.wire.codec import BITS_TEXT, VALID_BITS
from accept_mqtt.wire.plan import GRAD_SCHEMES, SCHEDULES, link_option_refusal

DEFAULT_SEED = 1234


class ConfigError(ValueError):
    pass


def micro_batch_count(text: str) -> int | Literal["auto"]:
    """``--micro-batches``, ``--in-flight``: ``auto`` or an int (its range is
    ``TrainConfig.validate``'s)."""
    return "auto" if text == "auto" else int(text)


# int fields that also take a word (checked by ``validate``)
_WORDS: dict[str, tuple[str, ...]] = {"micro_batches": ("auto",), "in_flight": ("auto",)}


def shape_list(text: str) -> list[int]:
    """``--input-shape 3,32,32`` (or ``3x32x32``): per-sample dimensions."""
    try:
        return [int(d) for d in text.replace("x", ",").split(",")]
    except ValueError:
        raise ConfigError(f"--input-shape must be dimensions like 3,32,32, got {text!r}") from None


@dataclass
class TrainConfig:
    model: str = "cnn"  # a zoo name, or MODULE:FACTORY (the user's own, model/user.py)
    dataset: str | None = None  # default: the model's own (zoo.ZOO[model].default_dataset)
    input_shape: list[int] | None = None  # per sample; default: the data set's
    data_path: str | None = None
    width: float = 1.0
    epochs: int = 2
    batch_size: int = 64
    micro_batches: int | Literal["auto"] = 4  # "auto": the planner chooses (planner.py)
    schedule: str = "1f1b"
    # 1F1B: micro-batches stage 0 may have in flight, stage s one fewer per stage before it
    # (>= the stage count: textbook 1F1B); "auto": as deep as every device's memory holds, up
    # to every stage but the last holding all micro_batches (planner.with_depth)
    in_flight: int | Literal["auto"] = "auto"
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_schedule: str = "auto"  # constant | cosine | step; auto: model/schedule.py's recipe
    warmup_steps: int | None = None  # None: the recipe's share of the run's steps
    seed: int = DEFAULT_SEED
    act_bits: int = 32
    grad_bits: int = 32
    # every link's activations delta-coded per training sample / gradients with error
    # feedback (wire/delta.py); need k-bit widths (1..8)
    act_delta: bool = False
    grad_feedback: bool = False
    stochastic_grad_rounding: bool = True
    grad_scheme: str = "minmax0"  # minmax0: 0 is a code, so sparse gradients stay sparse
    act_per_channel: bool = True  # k-bit feature-map activations: one scale per channel
    devices: int = 3
    partition: str = "auto"  # auto | predictor | flops | equal
    max_steps: int | None = None
    eval_batch: int = 256
    device_timeout: float = 60.0
    step_timeout: float = 120.0
    # a plan device that sends heartbeats and is silent this long during a step or an
    # evaluation is hung (docs/faults.md); 0: only step_timeout finds it
    hang_timeout: float = 10.0
    runs_dir: str = "runs"
    synthetic_size: int = 2000
    predictor_state: str | None = None
    checkpoint_every: int = 20  # optimizer steps between checkpoints; 0: only at the start
    resume: bool = False  # continue the job from runs_dir/<job>/checkpoint.pt
    auto_replan: bool = True  # re-plan live when a device's drift moves the partition
    replan_min_steps: int = 10  # at least this many steps between two drift re-plans
    reconnect_timeout: float = 120.0  # seconds to retry a lost broker before giving up
    rejoin_grace: float = 15.0  # seconds a device that went offline has to come back
    # seconds agents keep their stages without hearing this coordinator alive (it renews
    # every lease / 3 s): a --resume within it finds them still holding the job; after it
    # they are idle again, free for other jobs (docs/faults.md)
    lease: float = 60.0
    # emulated one-way latency of the coordinator's own sends (a delay line, wire.aio), so
    # that with agents run with ``--latency`` every hop of a step pays it (bench e2e)
    emulate_latency_ms: float = 0.0
    # the largest payload this job's coordinator and agents publish (set it below the broker's
    # message_size_limit): a stage's weights travel in chunks of at most this (wire/chunks.py)
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES

    def validate(self) -> TrainConfig:
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.micro_batches != "auto" and (isinstance(self.micro_batches, bool) or not (
                isinstance(self.micro_batches, int) and self.micro_batches >= 1)):
            raise ConfigError(f"micro_batches must be an int >= 1 or 'auto', got "
                              f"{self.micro_batches!r}")
        if isinstance(self.micro_batches, int) and self.micro_batches > self.batch_size:
            # the split would quietly make fewer, one-sample micro-batches instead
            raise ConfigError(f"micro_batches {self.micro_batches} is more than batch_size "
                              f"{self.batch_size}: every micro-batch needs a sample")
        if self.devices < 1:
            raise ConfigError(f"devices must be >= 1, got {self.devices}")
        if self.in_flight != "auto" and (isinstance(self.in_flight, bool) or not (
                isinstance(self.in_flight, int) and self.in_flight >= 1)):
            raise ConfigError(f"in_flight must be an int >= 1 or 'auto', got "
                              f"{self.in_flight!r}")
        if self.in_flight != "auto" and self.schedule != "1f1b":
            raise ConfigError(f"in_flight {self.in_flight} applies to the 1f1b schedule only: "
                              f"{self.schedule} keeps every micro-batch in flight")
        for name in ("act_bits", "grad_bits"):
            b = getattr(self, name)
            if b not in VALID_BITS:
                raise ConfigError(f"{name} must be {BITS_TEXT}, got {b}")
        why = link_option_refusal(self)  # the plan's own rule, said before any plan exists
        if why is not None:
            raise ConfigError(why)
        if self.grad_scheme not in GRAD_SCHEMES:
            raise ConfigError(f"grad_scheme must be minmax or minmax0, got "
                              f"{self.grad_scheme!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be gpipe or 1f1b, got {self.schedule!r}")
        if self.partition not in ("auto", "predictor", "flops", "equal"):
            raise ConfigError(f"partition must be auto, predictor, flops or equal, got "
                              f"{self.partition!r}")
        if not self.emulate_latency_ms >= 0.0:  # NaN too
            raise ConfigError(f"emulate_latency_ms must be >= 0, got {self.emulate_latency_ms}")
        if self.lr_schedule not in ("auto", *LR_SCHEDULES):
            raise ConfigError(f"lr_schedule must be auto, {', '.join(LR_SCHEDULES)}, got "
                              f"{self.lr_schedule!r}")
        if self.warmup_steps is not None and (isinstance(self.warmup_steps, bool) or not (
                isinstance(self.warmup_steps, int) and self.warmup_steps >= 0)):
            raise ConfigError(f"warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if is_user_model(self.model) and self.dataset is None:
            raise ConfigError(f"model {self.model!r} is your own: name its --dataset (the input "
                              "shape and class count come from it)")
        if self.input_shape is not None and not (
                isinstance(self.input_shape, list) and self.input_shape and all(
                    isinstance(d, int) and not isinstance(d, bool) and d > 0
                    for d in self.input_shape)):
            raise ConfigError(f"input_shape must be a list of positive ints, got "
                              f"{self.input_shape!r}")
        try:
            check_limit(self.max_message_bytes)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if not self.lease > 0.0:  # NaN too
            raise ConfigError(f"lease must be > 0 seconds, got {self.lease}")
        if not self.hang_timeout >= 0.0:  # NaN too
            raise ConfigError(f"hang_timeout must be >= 0 seconds, got {self.hang_timeout}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        return self

    def optimizer_cfg(self, total_steps: int, dataset: str | None = None) -> dict[str, Any]:
        """The plan's ``optimizer`` dict for a run of ``total_steps`` optimizer steps on
        ``dataset`` (default: the configured one): ``lr_schedule`` "auto" and an unset
        ``warmup_steps`` take the (model, data set) recipe of ``model/schedule.py``."""
        recipe = default_recipe(self.model, self.dataset or dataset)
        kind = recipe.lr_schedule if self.lr_schedule == "auto" else self.lr_schedule
        warm = self.warmup_steps
        if warm is None:
            warm = recipe.warmup_steps(total_steps) if kind != "constant" else 0
        return {"name": self.optimizer, "lr": self.lr, "momentum": self.momentum,
                "weight_decay": self.weight_decay, "lr_schedule": kind,
                "warmup_steps": warm, "total_steps": total_steps}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; known: {sorted(known)}")
        defaults = cls()
        for k, v in d.items():
            want = int if k in _WORDS else type(getattr(defaults, k))
            if getattr(defaults, k) is None or v is None or v in _WORDS.get(k, ()):
                continue
            if want is float and isinstance(v, int) and not isinstance(v, bool):
                d[k] = float(v)
            elif not isinstance(v, want) or (want is int and isinstance(v, bool)):
                raise ConfigError(f"config key {k!r} must be {want.__name__}, got {v!r}")
        return cls(**d).validate()

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
        except ValueError as e:
            raise ConfigError(f"config {path} is not JSON: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"config {path} must be a JSON object")
        return cls.from_dict(d)
