"""Checkpoints: every stage's parameters, buffers and optimizer state at one optimizer step.

Guarantees:

* Tensors are named as in the whole model (``{layer}.{param}``; optimizer state as
  ``{layer}.{param}::{key}``, e.g. ``3.weight::momentum_buffer``), so a checkpoint taken under
  one plan restores under any other cut of the same model: re-planning over fewer or other
  devices migrates weights by slicing names, never by position.
* ``save`` is atomic (a temporary file, then ``os.replace``): a crash mid-write leaves the
  previous checkpoint intact. ``load`` of a missing, truncated or foreign file raises
  ``CheckpointError`` with the path and the reason, never a pickle traceback.
* ``pack``/``unpack`` give the msgpack-friendly wire form of a tensor dict (docs/protocol.md
  "Weights"): ``{name: {"shape", "dtype", "data"}}`` with raw little-endian bytes.

What a checkpoint at step ``s`` means: the state every stage had when step ``s`` began (after
``s`` optimizer steps). Resuming from it replays steps ``s, s+1, ...`` with the same batches
(``microbatch.epoch_batches`` is a function of the seed and the epoch), so with compression off
a resumed run ends with the same parameters as an undisturbed one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "accept-mqtt-checkpoint/1"


class CheckpointError(RuntimeError):
    pass


def pack(state: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """``{name: {"shape", "dtype", "data"}}``: what msgpack carries (no pickle on the wire)."""
    out = {}
    for name, t in state.items():
        t = t.detach().cpu().contiguous()
        out[name] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                     "data": t.numpy().tobytes()}
    return out


def unpack(packed: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Inverse of ``pack``; a malformed entry raises ``CheckpointError`` naming it."""
    out = {}
    for name, t in packed.items():
        try:
            arr = np.frombuffer(t["data"], dtype=np.dtype(t["dtype"])).reshape(t["shape"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"tensor {name!r}: {e}") from None
        out[str(name)] = torch.from_numpy(arr.copy())
    return out


def layer_of(name: str) -> int:
    """The whole-model layer index of a tensor name (``"3.weight::exp_avg"`` -> 3)."""
    return int(name.split(".", 1)[0])


def stage_slice(state: dict[str, torch.Tensor], start: int, end: int) -> dict[str, torch.Tensor]:
    """The tensors of layers ``[start, end)``."""
    return {n: t for n, t in state.items() if start <= layer_of(n) < end}


@dataclass
class Checkpoint:
    """The state of a whole pipeline at the start of optimizer step ``step``."""

    job: str
    step: int
    weights: dict[str, torch.Tensor]
    optim: dict[str, torch.Tensor] = field(default_factory=dict)
    plan_version: int = 0
    meta: dict[str, Any] = field(default_factory=dict)  # run counters, history, config

    def stage(self, start: int, end: int) -> tuple[dict[str, torch.Tensor],
                                                   dict[str, torch.Tensor]]:
        """(weights, optimizer state) of the stage holding layers ``[start, end)``."""
        return stage_slice(self.weights, start, end), stage_slice(self.optim, start, end)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"format": FORMAT, "job": self.job, "step": self.step,
                    "weights": self.weights, "optim": self.optim,
                    "plan_version": self.plan_version, "meta": self.meta}, tmp)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Checkpoint:
        path = Path(path)
        if not path.exists():
            raise CheckpointError(f"no checkpoint at {path}")
        try:
            body = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated, not a torch file, unpickling refused
            raise CheckpointError(f"checkpoint {path} is unreadable: {type(e).__name__}: "
                                  f"{str(e)[:200]}") from None
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not an accept-mqtt checkpoint (format "
                                  f"{body.get('format') if isinstance(body, dict) else None!r})")
        return cls(job=body["job"], step=int(body["step"]), weights=body["weights"],
                   optim=body["optim"], plan_version=int(body["plan_version"]),
                   meta=body["meta"])
