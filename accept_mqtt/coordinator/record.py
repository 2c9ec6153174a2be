"""The run's counters and its record: what a job leaves behind in ``runs/<job>/``.

Guarantees:

* ``RunState`` is the one place the run's progress is counted (step, epoch, samples, per-stage
  totals, history, errors, drifts, recoveries, checkpoints, re-plans); the other parts of the
  coordinator add to it and nothing else keeps a copy.
* ``make_record`` gives the run record (the JSON ``runs/<job>/record.json``; its keys are what
  tests, the CLI summary and the benchmarks read) and ``write_run`` writes it atomically
  (temporary file + rename) next to the final parameters (``model.pt``).
* ``as_metric`` turns one of the record's entries into its wire message, so what the record
  keeps and what the metrics topic carries are the same fields.
"""

from __future__ import annotations

import itertools
import json
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from accept_mqtt.wire.messages import ERRORS_KEPT, StageCounters
from accept_mqtt.wire.plan import Plan

from .config import TrainConfig

M = TypeVar("M")


@dataclass
class StageTotals:
    """Cumulative counters of one stage of the current plan (its agent's ``stepped``)."""

    busy_ms: float = 0.0
    send_ms: float = 0.0
    bytes_act: int = 0
    bytes_grad: int = 0
    steps: int = 0  # ``stepped`` events counted: one per step and rewind generation
    mbs: int = 0  # micro-batches those steps computed (the events' ``mbs``)
    last: tuple[int, int] | None = None  # (gen, step) of the latest counted: a copy is not


@dataclass
class RunState:
    step: int = 0
    epoch: int = 0
    samples: int = 0
    microbatches: int = 0
    train_s: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    # the latest ERRORS_KEPT error reports, and how many there were in all
    errors: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=ERRORS_KEPT))
    errors_total: int = 0
    drifts: list[dict[str, Any]] = field(default_factory=list)
    stages: dict[int, StageTotals] = field(default_factory=dict)
    recoveries: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: list[int] = field(default_factory=list)  # steps checkpointed
    replans: list[dict[str, Any]] = field(default_factory=list)  # live re-plans
    replayed_steps: int = 0

    def add_error(self, err: dict[str, Any]) -> None:
        """Keep ``err`` (dropping the oldest beyond ``ERRORS_KEPT``) and count it."""
        self.errors.append(err)
        self.errors_total += 1

    def counters(self) -> dict[str, Any]:
        """What a checkpoint keeps of the run, so a resumed record reads as one run."""
        return {"step": self.step, "epoch": self.epoch, "history": list(self.history)}


def as_metric(kind: type[M], entry: dict[str, Any]) -> M:
    """The metrics message of a record entry (``{"type": ..., **fields}``)."""
    return kind(**{k: v for k, v in entry.items() if k != "type"})


def stage_counters(plan: Plan, state: RunState) -> list[StageCounters]:
    """Cumulative per-stage counters of ``plan``'s agents (for the ``step`` metric)."""
    out = []
    for s in plan.stages:
        tot = state.stages.get(s.index, StageTotals())
        out.append(StageCounters(stage=s.index, device=s.device, busy_ms=round(tot.busy_ms, 3),
                                 send_ms=round(tot.send_ms, 3), bytes_act=tot.bytes_act,
                                 bytes_grad=tot.bytes_grad))
    return out


def make_record(*, job: str, dataset: str, cfg: TrainConfig, plan: Plan,
                profiles: dict[str, dict[str, Any]], state: RunState, timing_samples: int,
                predictor_error: dict[str, Any] | None, started: float) -> dict[str, Any]:
    """The run record (``runs/<job>/record.json``)."""
    st = state
    stages = []
    for s in plan.stages:
        tot = st.stages.get(s.index, StageTotals())
        stages.append({
            "stage": s.index, "device": s.device, "layers": [s.start, s.end],
            "busy_ms": round(tot.busy_ms, 2), "send_ms": round(tot.send_ms, 2),
            "busy_fraction": round(tot.busy_ms / max(st.train_s * 1e3, 1e-9), 4),
            "predicted_ms": s.predicted_ms,
            # both counted over the current plan's steps (a re-plan starts them at zero)
            "measured_ms_per_microbatch": round(tot.busy_ms / max(1, tot.mbs), 4),
            "bytes_act_sent": tot.bytes_act, "bytes_grad_sent": tot.bytes_grad,
        })
    links = [{"link": f"{a['stage']}->{b['stage']}", "act_bytes": a["bytes_act_sent"],
              "grad_bytes": b["bytes_grad_sent"]} for a, b in itertools.pairwise(stages)]
    return {
        "v": 1, "job": job, "dataset": dataset, "config": cfg.to_dict(),
        "plan": plan.to_dict(), "devices": profiles,
        "steps": st.step, "samples": st.samples, "train_seconds": round(st.train_s, 3),
        "samples_per_s": round(st.samples / max(st.train_s, 1e-9), 2),
        "final_accuracy": st.history[-1]["test_accuracy"] if st.history else None,
        "epochs": st.history, "stages": stages, "links": links,
        "errors": list(st.errors), "errors_total": st.errors_total,
        "drifts": st.drifts, "timing_samples": timing_samples,
        "recoveries": st.recoveries, "checkpoints": st.checkpoints, "replans": st.replans,
        "replayed_steps": st.replayed_steps,
        "predictor_error": predictor_error,
        "started": started, "finished": time.time(), "torch": torch.__version__,
    }


def write_run(out: Path, record: dict[str, Any], weights: dict[str, torch.Tensor]) -> None:
    """``record.json`` (atomically) and ``model.pt`` in ``out``; adds both paths to
    ``record``."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "record.json.tmp"
    tmp.write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
    tmp.replace(out / "record.json")
    torch.save(weights, out / "model.pt")
    record["record_path"] = str(out / "record.json")
    record["model_path"] = str(out / "model.pt")
