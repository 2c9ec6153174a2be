"""Terminal output of a training run: a live progress bar and the closing summary table.

The progress bar shows step, loss and samples/s; when stdout is not a terminal (CI, a log
file) it degrades to one plain line per epoch and per error, so long runs still show progress.
"""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


class ProgressView:
    def __init__(self, enabled: bool = True) -> None:
        self.console = Console(stderr=False)
        self.live = enabled and self.console.is_terminal
        self.plain = not self.live  # no terminal or --no-progress: plain lines
        self._progress: Progress | None = None
        self._task: Any = None

    def __enter__(self) -> ProgressView:
        if self.live:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[sps]} samples/s"),
                TimeElapsedColumn(), console=self.console,
            )
            self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(None, None, None)

    def _say(self, text: str) -> None:
        if self._progress is not None:
            self._progress.console.print(text)
        elif self.plain:
            print(text, flush=True)

    def update(self, kind: str, info: dict[str, Any]) -> None:
        if kind == "status":
            self._say(f"[accept-mqtt] {info['msg']}")
        elif kind == "plan":
            p = info["plan"]
            parts = [f"{s['device']}:[{s['start']},{s['end']})" for s in p["stages"]]
            self._say(f"[accept-mqtt] plan v{p['version']} ({p['method']}): " + " | ".join(parts))
        elif kind == "start":
            self._say(f"[accept-mqtt] job {info['job']}: {info['total_steps']} steps")
            if self._progress is not None:
                self._task = self._progress.add_task("train", total=info["total_steps"],
                                                     completed=info.get("first_step", 0),
                                                     loss="-", sps="-")
        elif kind == "step":
            if self._progress is not None and self._task is not None:
                self._progress.update(self._task, completed=info["step"],
                                      loss=f"{info['loss']:.4f}",
                                      sps=f"{info['samples_per_s']:.0f}",
                                      description=f"epoch {info['epoch'] + 1}")
            elif self.plain and info["step"] % 10 == 0:
                print(f"step {info['step']} loss {info['loss']:.4f} "
                      f"{info['samples_per_s']:.0f} samples/s", flush=True)
        elif kind == "epoch":
            self._say(f"[accept-mqtt] epoch {info['epoch'] + 1}: held-out accuracy "
                      f"{info['test_accuracy']:.4f}, {info['samples_per_s']:.0f} samples/s")
        elif kind == "error":
            self._say(f"[accept-mqtt] {info.get('device')} rejected {info.get('topic')}: "
                      f"{info.get('reason')}")
        elif kind == "replan":
            self._say(f"[accept-mqtt] re-plan: {info.get('reason')}")


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def print_summary(record: dict[str, Any], file: Any = None) -> None:
    console = Console(file=file or sys.stdout)
    acc = record.get("final_accuracy")
    t = Table(title=f"job {record['job']}: {record['config']['model']} on {record['dataset']}")
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_row("held-out accuracy", "-" if acc is None else f"{acc:.4f}")
    t.add_row("steps / samples", f"{record['steps']} / {record['samples']}")
    t.add_row("training time", f"{record['train_seconds']:.1f} s")
    t.add_row("samples/s", f"{record['samples_per_s']:.1f}")
    t.add_row("errors rejected", str(len(record.get("errors", []))))
    t.add_row("checkpoints", str(len(record.get("checkpoints", []))))
    for r in record.get("replans", []):
        t.add_row("re-plan", f"step {r['step']}, {r['reason']}: "
                  + ("moved" if r["changed"] else "unchanged"))
    for r in record.get("recoveries", []):
        t.add_row(r.get("type", "recovered"),
                  f"{r.get('reason', '')}: step {r.get('restored_step')}"
                  f" ({r.get('redo_steps', 0)} redone)")
    console.print(t)
    s = Table(title="stages")
    for col in ("stage", "device", "layers", "busy s", "busy %", "pred ms/mb", "meas ms/mb"):
        s.add_column(col, justify="right")
    for st in record["stages"]:
        pred = st.get("predicted_ms")
        s.add_row(str(st["stage"]), st["device"], f"[{st['layers'][0]},{st['layers'][1]})",
                  f"{st['busy_ms'] / 1e3:.2f}", f"{100 * st['busy_fraction']:.0f}%",
                  "-" if pred is None else f"{pred:.2f}",
                  f"{st['measured_ms_per_microbatch']:.2f}")
    console.print(s)
    if record.get("links"):
        lt = Table(title="links")
        for col in ("link", "activations sent", "gradients sent"):
            lt.add_column(col, justify="right")
        for ln in record["links"]:
            lt.add_row(ln["link"], _fmt_bytes(ln["act_bytes"]), _fmt_bytes(ln["grad_bytes"]))
        console.print(lt)
    if record.get("record_path"):
        console.print(f"run record: {record['record_path']}  model: {record.get('model_path')}")
