"""``accept-mqtt train``: run a training job, on a private local cluster or on a fleet broker.

Without ``--broker`` it starts a private Mosquitto (top-level ``mosquitto.conf``, loopback,
free port) and ``--devices`` local agents, trains, and tears everything down. With
``--broker`` it starts nothing: it waits for ``--devices`` idle agents on that broker.

Settings come from, in rising priority: built-in defaults, ``--config FILE`` (JSON with the
keys of ``TrainConfig``), then the flags given on the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

from accept_mqtt.coordinator.config import (
    ConfigError,
    TrainConfig,
    micro_batch_count,
    shape_list,
)

# flag -> TrainConfig field (flags default to None so a config file can fill them)
_FLAGS: list[tuple[str, str, Any, str]] = [
    ("--model", "model", str, "zoo model (cnn, mlp, fashion-cnn, vgg, mobilenet, resnet, "
     "har1d) or your own: MODULE:FACTORY, MODULE a module name or a .py file"),
    ("--dataset", "dataset", str,
     "digits, fashion-mnist, cifar10, har, synthetic-cifar, synthetic-har"),
    ("--data-path", "data_path", str,
     "directory of CIFAR-10 python batches, UCI HAR, or the Fashion-MNIST IDX files "
     "(default for fashion-mnist: /usr/share/datasets/fashion-mnist)"),
    ("--input-shape", "input_shape", shape_list,
     "per-sample input shape, e.g. 3,32,32 (default: the data set's; samples are reshaped)"),
    ("--width", "width", float, "channel width multiplier of the model"),
    ("--devices", "devices", int, "number of device agents (stages)"),
    ("--epochs", "epochs", int, "epochs to train"),
    ("--batch-size", "batch_size", int, "mini-batch size (one optimizer step each)"),
    ("--micro-batches", "micro_batches", micro_batch_count,
     "micro-batches per mini-batch (at most --batch-size), or 'auto' (the planner chooses)"),
    ("--schedule", "schedule", str, "gpipe or 1f1b"),
    ("--in-flight", "in_flight", micro_batch_count,
     "1f1b: micro-batches stage 0 may have in flight, each later stage one fewer; at least "
     "--devices (textbook 1F1B); 'auto' (default): as deep as every device's memory holds"),
    ("--optimizer", "optimizer", str, "sgd or adam"),
    ("--lr", "lr", float, "learning rate"),
    ("--momentum", "momentum", float, "SGD momentum"),
    ("--lr-schedule", "lr_schedule", str,
     "constant, cosine or step (after --warmup-steps); default auto: the model's recipe"),
    ("--warmup-steps", "warmup_steps", int, "linear lr warm-up steps (default: the recipe's)"),
    ("--seed", "seed", int, "fixes data order, initial weights and rounding"),
    ("--act-bits", "act_bits", int, "bits of activations on every link: 1..8, 16, 32"),
    ("--grad-bits", "grad_bits", int, "bits of gradients on every link: 1..8, 16, 32"),
    ("--grad-scheme", "grad_scheme", str,
     "k-bit gradient grid: minmax0 (0 exact, default) or minmax (plain min-max)"),
    ("--partition", "partition", str, "auto, predictor, flops or equal"),
    ("--max-steps", "max_steps", int, "stop after this many optimizer steps"),
    ("--device-timeout", "device_timeout", float, "seconds to wait for device agents"),
    ("--runs-dir", "runs_dir", str, "where run records and models go (default runs/)"),
    ("--predictor-state", "predictor_state", str,
     "file the latency predictor is restored from and saved to (survives restarts)"),
    ("--checkpoint-every", "checkpoint_every", int,
     "optimizer steps between checkpoints (a lost device costs at most this many)"),
    ("--max-message-bytes", "max_message_bytes", int,
     "largest payload the job publishes; weights go in chunks below it (default 262144): "
     "keep it under the broker's message_size_limit"),
    ("--lease", "lease", float,
     "seconds agents keep this job's stages without hearing this coordinator (default 60); "
     "--resume within it finds them still holding the job"),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", help="mqtt://host:port of a fleet broker; omit to run locally")
    p.add_argument("--root", default="accept", help="topic root (default: accept)")
    p.add_argument("--job", help="job id (default: a fresh one)")
    p.add_argument("--config", help="JSON file with TrainConfig keys")
    for flag, name, typ, help_ in _FLAGS:
        p.add_argument(flag, dest=name, type=typ, default=None, help=help_)
    p.add_argument("--slowdowns", help="local cluster only: per-agent slowdown, e.g. 1,2,4")
    p.add_argument("--bandwidths", help="local cluster only: per-agent uplink, e.g. 50mbit,10mbit")
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue --job from its last checkpoint in the runs dir")
    p.add_argument("--act-delta", dest="act_delta", action="store_true", default=None,
                   help="delta-code every link's training activations per sample (AQ-SGD; "
                        "needs --act-bits 1..8): 2-bit links within a point of fp32 on "
                        "fashion-cnn (docs/codec.md)")
    p.add_argument("--grad-feedback", dest="grad_feedback", action="store_true", default=None,
                   help="carry each step's gradient quantisation error into the next "
                        "(error feedback; needs --grad-bits 1..8). Measured to cost about 3 "
                        "points on fashion-cnn (docs/codec.md): stochastic rounding, the "
                        "default, is unbiased already")
    p.add_argument("--per-tensor-act", dest="act_per_channel", action="store_false",
                   default=None, help="one scale per activation tensor instead of per channel")
    p.add_argument("--no-auto-replan", dest="auto_replan", action="store_false", default=None,
                   help="report drift but do not re-plan live")
    p.add_argument("--json", help="also write the run record to this path")
    p.add_argument("--no-progress", action="store_true",
                   help="plain progress lines instead of a live bar")
    p.add_argument("--tensorboard", metavar="DIR",
                   help="write the run's figures (loss, accuracy, samples/s, per-stage busy, "
                        "link bytes) as TensorBoard event files in DIR/<job>/")


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    base: dict[str, Any] = {}
    if args.config:
        base = TrainConfig.from_file(args.config).to_dict()
    names = {f.name for f in fields(TrainConfig)}
    for name in [f[1] for f in _FLAGS] + ["resume", "auto_replan", "act_per_channel",
                                        "act_delta", "grad_feedback"]:
        v = getattr(args, name, None)
        if v is not None and name in names:
            base[name] = v
    return TrainConfig.from_dict(base)


def _split_list(text: str | None, n: int, what: str) -> list[str] | None:
    if not text:
        return None
    items = [s.strip() for s in text.split(",")]
    if len(items) != n:
        raise ConfigError(f"--{what} lists {len(items)} values for {n} devices")
    return items


async def run_job(cfg: TrainConfig, broker: str, *, job: str | None, root: str,
                  progress: Any) -> dict[str, Any]:
    from accept_mqtt.coordinator import Coordinator

    async with Coordinator(broker, cfg, job=job, root=root, progress=progress) as coord:
        return await coord.run()


class _TensorBoardFeed:
    """The coordinator's progress calls -> the monitor's view of the job -> TensorBoard.

    A step's and an epoch's progress call carries the fields of the metrics message the
    coordinator publishes (``StepMetric``, ``Epoch``), so they are folded in as that message,
    decoded by the vocabulary like any subscriber's: the figures written here are those
    ``accept-mqtt monitor --tensorboard`` writes from the wire."""

    def __init__(self, logdir: str, root: str) -> None:
        from .figures import TensorBoardSink
        from .monitor import FleetView

        self.view = FleetView(root)
        self.sink = TensorBoardSink(logdir)
        self.job: str | None = None

    def __call__(self, kind: str, info: dict[str, Any]) -> None:
        if kind == "start":
            self.job = info["job"]
        elif kind in ("step", "epoch") and self.job is not None:
            body = {"type": kind, **info, "job": self.job, "time": time.time()}
            self.view.ingest(self.view.topics.metrics(self.job), json.dumps(body).encode())
            self.sink.update(self.view)


def run(args: argparse.Namespace) -> int:
    from accept_mqtt.coordinator import CoordinatorError
    from accept_mqtt.harness.local import LocalCluster, default_agents
    from accept_mqtt.model.data import DatasetError
    from broker import BrokerError

    from .report import ProgressView, print_summary

    try:
        cfg = resolve_config(args)
        slow = _split_list(args.slowdowns, cfg.devices, "slowdowns")
        bws = _split_list(args.bandwidths, cfg.devices, "bandwidths")
    except ConfigError as e:
        print(f"accept-mqtt train: {e}", file=sys.stderr)
        return 2
    if cfg.resume and not args.job:
        print("accept-mqtt train: --resume needs --job (the job whose checkpoint to continue)",
              file=sys.stderr)
        return 2
    view = ProgressView(enabled=not args.no_progress)
    tb = _TensorBoardFeed(args.tensorboard, args.root) if args.tensorboard else None

    def progress(kind: str, info: dict[str, Any]) -> None:
        view.update(kind, info)
        if tb is not None:
            tb(kind, info)
    try:
        with view:
            if args.broker:
                record = asyncio.run(run_job(cfg, args.broker, job=args.job, root=args.root,
                                             progress=progress))
            else:
                specs = default_agents(cfg.devices, [float(s) for s in slow] if slow else None,
                                       bws)  # type: ignore[arg-type]
                view.update("status", {"msg": "starting a private Mosquitto and "
                                              f"{cfg.devices} local agents"})
                with LocalCluster(specs, root=args.root) as cluster:
                    view.update("status", {"msg": f"broker at {cluster.url}"})
                    record = asyncio.run(run_job(cfg, cluster.url, job=args.job,
                                                 root=args.root, progress=progress))
    except (CoordinatorError, DatasetError, BrokerError, ConfigError, ValueError) as e:
        print(f"accept-mqtt train: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # connection refused etc.
        print(f"accept-mqtt train: cannot reach the broker: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        if type(e).__module__.startswith("aiomqtt"):
            print(f"accept-mqtt train: MQTT error: {e}", file=sys.stderr)
            return 1
        raise
    finally:
        if tb is not None:
            tb.sink.close()
    print_summary(record)
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
        print(f"run record: {args.json}")
    return 0
