"""One pipeline stage's compute: forward, backward and optimizer step of a slice of layers.

This is the arithmetic a device agent runs; it imports no MQTT so it is tested alone.

Guarantees:

* The stage runs its layers one at a time, cutting autograd at every layer boundary, so it
  can time each layer's forward and backward separately (the timing samples the latency
  predictor learns from) while computing exactly the same gradients as one autograd graph.
* Activations of a training micro-batch are stashed under its ``(step, mb)`` key until its
  backward arrives; ``backward`` frees them. Parameter gradients accumulate across
  micro-batches until ``step()``, which applies the optimizer once and zeroes them.
* With ``slowdown = s`` every layer's compute is followed by a sleep of ``(s - 1)`` times its
  duration, emulating a device ``s`` times slower without taking CPU from other processes;
  reported times include the sleep.
* Observers (``add_observer``, e.g. ``device_agent.trace``) get one ``on_compute`` call per
  ``forward`` ("fwd"), ``backward`` ("bwd") and ``step`` ("opt", key None), with the
  ``time.time()`` span of the call, after it returns or raises. They are called in the thread
  that runs the compute (an agent's worker thread), in registration order. An observer's
  exception is logged and swallowed: it never changes what the stage computes or raises.
  With no observer registered the calls cost one truth test, no clock read.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .descriptors import LayerDescriptor

Key = tuple[int, int]  # (step, micro-batch)

log = logging.getLogger(__name__)


class StageError(ValueError):
    """Input that does not fit this stage (wrong shape, missing labels, unknown key)."""


def make_optimizer(params: list[nn.Parameter], cfg: dict[str, Any]) -> torch.optim.Optimizer:
    name = cfg.get("name", "sgd")
    if name == "sgd":
        return torch.optim.SGD(params, lr=cfg.get("lr", 0.05), momentum=cfg.get("momentum", 0.9),
                               weight_decay=cfg.get("weight_decay", 0.0))
    if name == "adam":
        return torch.optim.Adam(params, lr=cfg.get("lr", 1e-3),
                                weight_decay=cfg.get("weight_decay", 0.0))
    raise ValueError(f"unknown optimizer {name!r} (sgd or adam)")


class StageObserver(Protocol):
    """Told about every forward, backward and optimizer step of a ``StageRunner``."""

    def on_compute(self, kind: str, key: Key | None, t0: float, t1: float) -> None:
        """``kind`` "fwd"/"bwd" (``key`` = (step, mb)) or "opt" (``key`` None): one call's
        ``time.time()`` span. Runs in the compute thread, so keep it short and thread-safe."""
        ...


@dataclass
class _Stash:
    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]
    loss: torch.Tensor | None = None


@dataclass
class ForwardResult:
    out: torch.Tensor | None  # activations for the next stage (None on the last stage)
    loss: float | None = None  # last stage: scaled summed loss of this micro-batch
    correct: int | None = None  # last stage: correct predictions
    n: int = 0


@dataclass
class StageStats:
    busy_ms: float = 0.0  # compute (incl. emulated slowdown)
    fwd_count: int = 0
    bwd_count: int = 0
    steps: int = 0


@dataclass
class StageRunner:
    layers: list[nn.Module]
    descriptors: list[LayerDescriptor]
    in_shape: tuple[int, ...]  # per sample
    is_first: bool
    is_last: bool
    optimizer_cfg: dict[str, Any] = field(default_factory=dict)
    slowdown: float = 1.0
    threads: int = 1

    def __post_init__(self) -> None:
        self.module = nn.Sequential(*self.layers)
        self.module.train()
        params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(params, self.optimizer_cfg) if params else None
        self._stash: dict[Key, _Stash] = {}
        self.timings: list[dict[str, Any]] = []
        self.stats = StageStats()
        # a tuple, replaced on add/remove: the compute thread iterates it while the loop edits
        self._observers: tuple[StageObserver, ...] = ()

    # -- observers -----------------------------------------------------------------------
    def add_observer(self, obs: StageObserver) -> None:
        """Call ``obs.on_compute`` around every later forward, backward and step."""
        self._observers = (*self._observers, obs)

    def remove_observer(self, obs: StageObserver) -> None:
        """Stop calling ``obs`` (no error if it was not registered)."""
        self._observers = tuple(o for o in self._observers if o is not obs)

    def _notify(self, kind: str, key: Key | None, t0: float) -> None:
        t1 = time.time()
        for obs in self._observers:
            try:
                obs.on_compute(kind, key, t0, t1)
            except Exception:  # an observer must never break training
                log.warning("stage observer %r failed on %s %s", obs, kind, key, exc_info=True)

    # -- helpers -------------------------------------------------------------------------
    def _timed(self, fn: Any, *args: Any) -> tuple[Any, float]:
        t0 = time.perf_counter()
        out = fn(*args)
        dt = time.perf_counter() - t0
        if self.slowdown > 1.0:
            time.sleep(dt * (self.slowdown - 1.0))
            dt *= self.slowdown
        return out, dt * 1e3

    def _record(self, i: int, direction: str, batch: int, ms: float) -> None:
        self.stats.busy_ms += ms
        self.timings.append({"layer": self.descriptors[i].to_dict(), "dir": direction,
                             "batch": batch, "ms": round(ms, 4), "threads": self.threads})

    def check_input(self, x: torch.Tensor) -> None:
        if tuple(x.shape[1:]) != self.in_shape or x.dim() != len(self.in_shape) + 1:
            raise StageError(
                f"input shape {list(x.shape)} does not match this stage's "
                f"[batch, {', '.join(map(str, self.in_shape))}]"
            )
        if x.shape[0] == 0:
            raise StageError("empty micro-batch")

    # -- training ------------------------------------------------------------------------
    def forward(self, key: Key, x: torch.Tensor, labels: torch.Tensor | None = None,
                loss_scale: float = 1.0) -> ForwardResult:
        """Training forward of one micro-batch; stashes what its backward needs."""
        if not self._observers:
            return self._forward(key, x, labels, loss_scale)
        t0 = time.time()
        try:
            return self._forward(key, x, labels, loss_scale)
        finally:
            self._notify("fwd", key, t0)

    def _forward(self, key: Key, x: torch.Tensor, labels: torch.Tensor | None,
                 loss_scale: float) -> ForwardResult:
        self.check_input(x)
        if key in self._stash:
            raise StageError(f"micro-batch {key} was already forwarded")
        if self.is_last and (labels is None or len(labels) != x.shape[0]):
            raise StageError("the last stage needs one label per sample")
        n = x.shape[0]
        inputs: list[torch.Tensor] = []
        outputs: list[torch.Tensor] = []
        h = x
        for i, layer in enumerate(self.layers):
            inp = h.detach().requires_grad_(i > 0 or not self.is_first)
            with torch.enable_grad():
                out, ms = self._timed(layer, inp)
            self._record(i, "fwd", n, ms)
            inputs.append(inp)
            outputs.append(out)
            h = out
        self.stats.fwd_count += 1
        res = ForwardResult(None if self.is_last else h.detach(), n=n)
        stash = _Stash(inputs, outputs)
        if self.is_last:
            assert labels is not None
            with torch.enable_grad():
                stash.loss = F.cross_entropy(h, labels, reduction="sum") * loss_scale
            res.loss = float(stash.loss.detach())
            res.correct = int((h.detach().argmax(1) == labels).sum())
        self._stash[key] = stash
        return res

    def backward(self, key: Key, grad: torch.Tensor | None = None) -> torch.Tensor | None:
        """Backward of one micro-batch; returns the gradient of the stage input (or None)."""
        if not self._observers:
            return self._backward(key, grad)
        t0 = time.time()
        try:
            return self._backward(key, grad)
        finally:
            self._notify("bwd", key, t0)

    def _backward(self, key: Key, grad: torch.Tensor | None) -> torch.Tensor | None:
        try:
            stash = self._stash.pop(key)
        except KeyError:
            raise StageError(f"backward for micro-batch {key} that was never forwarded") from None
        if self.is_last:
            g: torch.Tensor | None = None
        else:
            if grad is None:
                raise StageError("a gradient frame is required below the last stage")
            expect = tuple(stash.outputs[-1].shape)
            if tuple(grad.shape) != expect:
                self._stash[key] = stash  # keep it: a correct frame may still come
                raise StageError(
                    f"gradient shape {list(grad.shape)} != output shape {list(expect)}"
                )
            g = grad
        n = stash.inputs[0].shape[0]
        for i in range(len(self.layers) - 1, -1, -1):
            out, inp = stash.outputs[i], stash.inputs[i]
            if self.is_last and i == len(self.layers) - 1:
                assert stash.loss is not None
                _, ms = self._timed(stash.loss.backward)
            elif out.requires_grad:
                _, ms = self._timed(out.backward, g)
            else:
                ms = 0.0
            self._record(i, "bwd", n, ms)
            g = inp.grad if inp.requires_grad else None
        self.stats.bwd_count += 1
        return None if self.is_first else g

    def step(self) -> None:
        """Apply the accumulated gradients once and zero them."""
        if not self._observers:
            return self._step()
        t0 = time.time()
        try:
            return self._step()
        finally:
            self._notify("opt", None, t0)

    def _step(self) -> None:
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.stats.steps += 1

    def pending(self) -> list[Key]:
        return sorted(self._stash)

    def drop(self, key: Key) -> None:
        self._stash.pop(key, None)

    # -- evaluation ----------------------------------------------------------------------
    @torch.no_grad()
    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """Forward in eval mode (BatchNorm uses running stats), no stash, no timing."""
        self.check_input(x)
        self.module.eval()
        try:
            return self.module(x)
        finally:
            self.module.train()

    def drain_timings(self) -> list[dict[str, Any]]:
        out, self.timings = self.timings, []
        return out

    def state_dict(self, offset: int) -> dict[str, torch.Tensor]:
        """Parameters and buffers named as in the whole model (layer index + ``offset``)."""
        out = {}
        for name, t in self.module.state_dict().items():
            i, rest = name.split(".", 1)
            out[f"{int(i) + offset}.{rest}"] = t.detach().clone()
        return out

    def optimizer_state(self, offset: int) -> dict[str, torch.Tensor]:
        """Optimizer state as ``{layer}.{param}::{key}`` tensors (whole-model layer index)."""
        out: dict[str, torch.Tensor] = {}
        if self.optimizer is None:
            return out
        for name, p in self.module.named_parameters():
            i, rest = name.split(".", 1)
            for key, v in self.optimizer.state.get(p, {}).items():
                if isinstance(v, torch.Tensor):
                    out[f"{int(i) + offset}.{rest}::{key}"] = v.detach().clone()
        return out

    def load_optimizer_state(self, state: dict[str, torch.Tensor], offset: int) -> None:
        """Replace the optimizer state with ``state`` (names as ``optimizer_state`` gives)."""
        if self.optimizer is None:
            return
        params = dict(self.module.named_parameters())
        self.optimizer.state.clear()
        for name, v in state.items():
            pname, key = name.split("::", 1)
            i, rest = pname.split(".", 1)
            p = params.get(f"{int(i) - offset}.{rest}")
            if p is None:
                raise StageError(f"optimizer state {name!r} names no parameter of this stage")
            self.optimizer.state[p][key] = v.clone()

    def snapshot(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """A copy of weights, buffers and optimizer state (``restore`` puts it back)."""
        return self.state_dict(0), self.optimizer_state(0)

    def restore(self, snap: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]) -> None:
        """Back to ``snap``; drops every stashed micro-batch and accumulated gradient."""
        self.reset_partial()
        self.load_state_dict(snap[0], 0)
        self.load_optimizer_state(snap[1], 0)

    def reset_partial(self) -> None:
        """Forget a half-done step: stashed activations and accumulated gradients."""
        self._stash.clear()
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            for p in self.module.parameters():
                p.grad = None

    def load_state_dict(self, state: dict[str, torch.Tensor], offset: int) -> None:
        local = {}
        for name, t in state.items():
            i, rest = name.split(".", 1)
            j = int(i) - offset
            if 0 <= j < len(self.layers):
                local[f"{j}.{rest}"] = t
        self.module.load_state_dict(local)
