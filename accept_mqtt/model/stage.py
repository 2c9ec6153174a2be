"""One pipeline stage's compute: forward, backward and optimizer step of a slice of layers.

This is the arithmetic a device agent runs; it imports no MQTT so it is tested alone.

Guarantees:

* The stage runs its layers as one autograd graph, exactly as ``nn.Sequential`` would, and
  still times each layer's forward and backward separately (the timing samples the latency
  predictor learns from): forwards by a clock read between layers, backwards by gradient
  hooks on the layer outputs, which fire as the gradient reaches each layer boundary. An
  earlier version cut autograd at every boundary (a leaf per layer and one ``backward`` call
  per layer); that cost 35-50 % extra time on small stages and computes the same values.
* Activations of a training micro-batch are stashed under its ``(step, mb)`` key until its
  backward arrives; ``backward`` frees them. Parameter gradients accumulate across
  micro-batches until ``step()``, which applies the optimizer once and zeroes them.
* With ``slowdown = s`` every forward and backward is followed by a sleep of ``(s - 1)``
  times the CPU time it used (``emulated_pause``; its duration with more than one torch
  thread), emulating a device ``s`` times slower without taking CPU from other processes;
  reported per-layer times are the measured ones stretched by the same factor.
* ``ticks`` grows while the stage computes: once per layer of a forward, once per layer
  boundary a backward's gradient reaches, once per optimizer step and once per 0.2 s of an
  emulated slowdown's pause. It is written by the compute thread only; another thread
  reading it (an agent's heartbeat) tells a slow compute (it grows) from a stalled one.
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
from .schedule import apply_lr, check_schedule

Key = tuple[int, int]  # (step, micro-batch)
PAUSE_SLICE_S = 0.2  # an emulated slowdown's pause sleeps in slices of this, ticking each
# weights and buffers, optimizer state: both named as in the stage (offset 0)
Snapshot = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]

log = logging.getLogger(__name__)


class StageError(ValueError):
    """Input that does not fit this stage (wrong shape, missing labels, unknown key)."""


def make_optimizer(params: list[nn.Parameter], cfg: dict[str, Any]) -> torch.optim.Optimizer:
    """The optimizer of the plan's ``optimizer`` dict (its lr schedule: ``schedule.py``)."""
    check_schedule(cfg)
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
    inp: torch.Tensor  # the stage input (a leaf; requires grad below the first stage)
    outputs: list[torch.Tensor]  # every layer's output, still in the graph
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
        self.timings: list[tuple[int, str, int, float]] = []  # layer, dir, batch, ms
        self.stats = StageStats()
        self.ticks = 0  # compute progress (module docstring)
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
    def _dilate(self, wall: float, cpu: float) -> float:
        """Emulate a slower device after a compute call of ``wall`` seconds that used ``cpu``
        seconds of this thread; the factor by which the call's measured times stretch."""
        pause = emulated_pause(self.slowdown, wall, cpu if self.threads == 1 else wall)
        left = pause
        while left > 0.0:  # in slices: an emulated slow device shows progress as it goes
            time.sleep(min(left, PAUSE_SLICE_S))
            left -= PAUSE_SLICE_S
            self.ticks += 1
        return (wall + pause) / wall if wall > 0.0 else self.slowdown

    def _record(self, direction: str, batch: int, seconds: list[float], factor: float) -> None:
        # plain tuples here, dicts only when drained: this runs for every layer of every
        # micro-batch, the drain once per step
        ms = [t * factor * 1e3 for t in seconds]
        self.stats.busy_ms += sum(ms)
        self.timings.extend((i, direction, batch, m) for i, m in enumerate(ms))

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
        inp = x.detach().requires_grad_(not self.is_first)
        outputs: list[torch.Tensor] = []
        seconds: list[float] = []
        h = inp
        with torch.enable_grad():
            c_start = time.thread_time()
            t0 = t_start = time.perf_counter()
            for layer in self.layers:
                h = layer(h)
                outputs.append(h)
                self.ticks += 1
                t1 = time.perf_counter()
                seconds.append(t1 - t0)
                t0 = t1
            stash = _Stash(inp, outputs)
            if self.is_last:
                assert labels is not None
                stash.loss = F.cross_entropy(h, labels, reduction="sum") * loss_scale
                seconds[-1] += time.perf_counter() - t0
            factor = self._dilate(time.perf_counter() - t_start, time.thread_time() - c_start)
        self._record("fwd", n, seconds, factor)
        self.stats.fwd_count += 1
        res = ForwardResult(None if self.is_last else h.detach(), n=n)
        if stash.loss is not None:
            assert labels is not None
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
        out = stash.outputs[-1]
        if not self.is_last:
            if grad is None:
                raise StageError("a gradient frame is required below the last stage")
            if tuple(grad.shape) != tuple(out.shape):
                self._stash[key] = stash  # keep it: a correct frame may still come
                raise StageError(
                    f"gradient shape {list(grad.shape)} != output shape {list(out.shape)}"
                )
        n = stash.inp.shape[0]
        nl = len(self.layers)
        # reached[i]: when the gradient of layer i's output was complete, i.e. when layers
        # i+1.. had run their backward; a boundary that needs no gradient stays None
        reached: list[float | None] = [None] * nl
        handles = []
        for i, o in enumerate(stash.outputs[:-1]):
            if o.requires_grad:
                handles.append(o.register_hook(_stamp(reached, i, self)))
        c_start, t_start = time.thread_time(), time.perf_counter()
        try:
            if stash.loss is not None:
                stash.loss.backward()
            elif out.requires_grad:
                out.backward(grad)
        finally:
            for h in handles:
                h.remove()
        t_end = time.perf_counter()
        factor = self._dilate(t_end - t_start, time.thread_time() - c_start)
        reached[nl - 1] = t_start
        bounds = [t_end if t is None else t for t in reached]
        seconds = [(bounds[i - 1] if i > 0 else t_end) - bounds[i] for i in range(nl)]
        self._record("bwd", n, seconds, factor)
        self.stats.bwd_count += 1
        self.ticks += 1
        return stash.inp.grad if not self.is_first else None

    def step(self, index: int | None = None) -> None:
        """Apply the accumulated gradients once and zero them.

        ``index``: the run's optimizer step this is (the clock of the lr schedule, so a
        resumed or rewound stage applies the lr of that step); default: the number of steps
        this runner has applied so far."""
        if not self._observers:
            return self._step(index)
        t0 = time.time()
        try:
            return self._step(index)
        finally:
            self._notify("opt", None, t0)

    def _step(self, index: int | None) -> None:
        if self.optimizer is not None:
            apply_lr(self.optimizer, self.optimizer_cfg,
                     self.stats.steps if index is None else index)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.stats.steps += 1
        self.ticks += 1

    @property
    def in_flight(self) -> int:
        """Micro-batches forwarded whose backward has not run yet."""
        return len(self._stash)

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
        """Every layer time since the last drain: layer, dir, batch, ms, threads."""
        raw, self.timings = self.timings, []
        layers = [d.to_dict() for d in self.descriptors]
        return [{"layer": layers[i], "dir": d, "batch": b, "ms": round(ms, 4),
                 "threads": self.threads} for i, d, b, ms in raw]

    def state_dict(self, offset: int) -> dict[str, torch.Tensor]:
        """Parameters and buffers named as in the whole model (layer index + ``offset``)."""
        out = {}
        for name, t in self.module.state_dict().items():
            i, rest = name.split(".", 1)
            out[f"{int(i) + offset}.{rest}"] = t.detach().clone()
        return out

    def optimizer_state(self, offset: int) -> dict[str, torch.Tensor]:
        """Optimizer state as ``{layer}.{param}::{key}`` tensors (whole-model layer index)."""
        return {name: v.detach().clone() for name, v in self._optimizer_tensors(offset)}

    def _optimizer_tensors(self, offset: int) -> list[tuple[str, torch.Tensor]]:
        """The optimizer's state tensors, named as ``optimizer_state`` names them (no copy)."""
        out: list[tuple[str, torch.Tensor]] = []
        if self.optimizer is None:
            return out
        for name, p in self.module.named_parameters():
            i, rest = name.split(".", 1)
            for key, v in self.optimizer.state.get(p, {}).items():
                if isinstance(v, torch.Tensor):
                    out.append((f"{int(i) + offset}.{rest}::{key}", v))
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

    def snapshot(self, into: Snapshot | None = None) -> Snapshot:
        """A copy of weights, buffers and optimizer state (``restore`` puts it back).

        ``into``: an older snapshot of this stage that is no longer needed; when it holds the
        same tensors (names, shapes, dtypes) the copy is written into it and it is returned,
        so a snapshot per step allocates nothing (a fresh copy of a large stage's weights and
        momentum costs page faults on every step). Otherwise a fresh copy is made."""
        state, optim = self.module.state_dict(), dict(self._optimizer_tensors(0))
        if into is not None and _same_layout(into[0], state) and _same_layout(into[1], optim):
            with torch.no_grad():
                for dst, src in ((into[0], state), (into[1], optim)):
                    for name, t in src.items():
                        dst[name].copy_(t)
            return into
        return self.state_dict(0), self.optimizer_state(0)

    def restore(self, snap: Snapshot) -> None:
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


def emulated_pause(slowdown: float, wall: float, cpu: float) -> float:
    """Seconds to sleep after a compute call that took ``wall`` seconds and used ``cpu`` of
    them: ``(slowdown - 1)`` times the CPU time, the extra work of a device ``slowdown`` times
    slower than one core here. Nothing at full speed.

    Why CPU time and not the call's duration: several emulated devices share this machine's
    cores, and a call stretched by waiting for a core (or, in one process, for the GIL) would
    have its stretch multiplied by the slowdown; the wait itself is kept once, as it was.
    (What this cannot remove: on this 2-vCPU machine the CPU time of a call itself grows
    1.1-1.6x while other stages compute, ``bench e2e`` measured, docs/benchmarks.md.)

    >>> emulated_pause(4.0, wall=0.013, cpu=0.010)  # stretched 1.3x: 43 ms in all, not 52
    0.03
    >>> emulated_pause(1.0, wall=0.013, cpu=0.010)
    0.0
    """
    if slowdown <= 1.0:
        return 0.0
    return round((slowdown - 1.0) * cpu, 9)


def _same_layout(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Whether ``a`` and ``b`` hold tensors of the same names, shapes and dtypes."""
    return a.keys() == b.keys() and all(
        a[k].shape == v.shape and a[k].dtype == v.dtype for k, v in b.items())


def _stamp(reached: list[float | None], i: int, runner: StageRunner) -> Any:
    """A gradient hook that notes when the gradient of layer ``i``'s output arrived (and
    ticks the runner's progress)."""
    def hook(_grad: torch.Tensor) -> None:
        reached[i] = time.perf_counter()
        runner.ticks += 1
    return hook
