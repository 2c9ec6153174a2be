"""``accept-mqtt bench codec``: codec throughput, compression ratio and error on real shapes.

What is measured, on one thread (``torch.set_num_threads(1)``; the codec is numpy):

* ``encode``: ``to_bytes(encode(x, ...))``, tensor to msgpack payload;
* ``decode``: ``decode(from_bytes(payload))``, payload (validated) to tensor;
* ``enc+dec``: both, one after the other;
* ``memcpy``: ``numpy.ndarray.copy()`` of the same float32 array, timed in the same run, as
  the ceiling a codec pass could reach.

Throughput is MB (10**6 bytes) of float32 *input* per second. Each figure is the median over
``--repeats`` runs, with min-max and IQR; a run loops the call until it has taken at least a
few milliseconds so timer resolution does not matter. Ratio is float32 bytes over the full
msgpack frame bytes; error is the RMSE relative to the tensor's range (max - min).

Tensors are real activations: a zoo model (seed 0) run in train mode on N(0, 1) inputs of
batch ``--batch`` up to a middle layer (after a ReLU where the model has one there), so value
distributions (sparsity, skew) are what a pipeline cut would send.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# (model, layer index after which the tensor is taken, what it is)
TENSORS: tuple[tuple[str, int, str], ...] = (
    ("vgg", 9, "VGG 3rd conv ReLU"),
    ("mobilenet", 7, "MobileNetV2 5th block output"),
    ("har1d", 6, "HAR 1-D CNN 2nd conv ReLU"),
    ("cnn", 5, "digits CNN 2nd conv ReLU"),
)
# (label, bits, per-channel axis, stochastic rounding)
CONFIGS: tuple[tuple[str, int, int | None, bool], ...] = (
    ("raw32", 32, None, False),
    ("raw16", 16, None, False),
    ("8b", 8, None, False),
    ("8b/ch", 8, 1, False),
    ("4b", 4, None, False),
    ("4b/ch", 4, 1, False),
    ("4b sto", 4, None, True),
    ("3b", 3, None, False),
    ("2b", 2, None, False),
    ("1b", 1, None, False),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", type=Path, default=None, help="write results here")
    p.add_argument("--repeats", type=int, default=7, help="timed runs per figure (median)")
    p.add_argument("--batch", type=int, default=32, help="samples in each activation tensor")
    p.add_argument("--quick", action="store_true",
                   help="small tensors only, 3 repeats, short runs (a smoke test)")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    import os

    import torch

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads_used": 1,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def activation(name: str, after: int, batch: int) -> Any:
    """Output of layer ``after`` of zoo model ``name`` for a batch of N(0, 1) inputs."""
    import torch

    from accept_mqtt.model.descriptors import output_shapes
    from accept_mqtt.model.zoo import build_model

    model = build_model(name, seed=0)
    shapes = output_shapes(model)
    if not 0 <= after < len(shapes) - 1:
        raise ValueError(f"{name} has no inner layer {after}")
    x = torch.randn(batch, *model.input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for layer in model.layers[: after + 1]:
            layer.train()
            x = layer(x)
    assert tuple(x.shape[1:]) == shapes[after]
    return x.contiguous()


def timed(fn: Callable[[], object], repeats: int, min_run_s: float) -> list[float]:
    """Seconds per call of ``fn`` for each of ``repeats`` runs (after one warm-up call)."""
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    number = max(1, math.ceil(min_run_s / once))
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        out.append((time.perf_counter() - t0) / number)
    return out


def summary(values: list[float]) -> dict[str, float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "q1": q[0], "q3": q[2]}


def _mbps(nbytes: int, seconds: list[float]) -> dict[str, float]:
    return summary([nbytes / s / 1e6 for s in seconds])


def measure(x: Any, repeats: int, min_run_s: float) -> list[dict[str, Any]]:
    from accept_mqtt.wire import codec

    arr = x.numpy()
    nbytes = arr.nbytes
    span = float(arr.max() - arr.min()) if arr.size else 0.0
    memcpy = _mbps(nbytes, timed(arr.copy, repeats, min_run_s))
    rows = []
    for label, bits, axis, sto in CONFIGS:
        def enc(bits: int = bits, axis: int | None = axis, sto: bool = sto) -> bytes:
            f = codec.encode(x, bits=bits, job="bench", step=0, mb=0, kind="act", axis=axis,
                             stochastic=sto, seed=1)
            return codec.to_bytes(f)

        payload = enc()

        def dec(payload: bytes = payload) -> Any:
            return codec.decode(codec.from_bytes(payload, "bench"))

        def both(enc: Callable[[], bytes] = enc) -> Any:
            return codec.decode(codec.from_bytes(enc(), "bench"))

        y = dec().numpy().astype(np.float64)
        rmse = float(np.sqrt(np.mean((y - arr) ** 2))) if arr.size else 0.0
        rows.append({
            "config": label, "bits": bits, "axis": axis, "stochastic": sto,
            "encode_MBps": _mbps(nbytes, timed(enc, repeats, min_run_s)),
            "decode_MBps": _mbps(nbytes, timed(dec, repeats, min_run_s)),
            "enc_dec_MBps": _mbps(nbytes, timed(both, repeats, min_run_s)),
            "memcpy_MBps": memcpy,
            "frame_bytes": len(payload),
            "ratio": nbytes / len(payload),
            "rel_rmse": rmse / span if span else 0.0,
        })
    return rows


def _cell(s: dict[str, float]) -> str:
    return f"{s['median']:7.0f} [{s['min']:.0f}-{s['max']:.0f}]"


def print_table(record: dict[str, Any]) -> None:
    m = record["machine"]
    print(f"codec throughput, MB of float32 input per second, one thread; median [min-max] of "
          f"{record['repeats']} runs (each >= {record['min_run_ms']:g} ms of calls)")
    print(f"machine: {m['cpu']}, {m['cores']} cores, python {m['python']}, torch {m['torch']}, "
          f"numpy {m['numpy']}, 1-min load {m['load_avg_1m']}")
    head = (f"{'config':7} {'encode':>22} {'decode':>22} {'enc+dec':>22} {'ratio':>6} "
            f"{'relRMSE':>8}")
    for t in record["tensors"]:
        mc = t["rows"][0]["memcpy_MBps"]
        print(f"\n{t['what']}: {t['model']} after layer {t['after']}, shape {t['shape']} "
              f"({t['MB']:.2f} MB); memcpy {_cell(mc)} MB/s")
        print(head)
        for r in t["rows"]:
            print(f"{r['config']:7} {_cell(r['encode_MBps']):>22} {_cell(r['decode_MBps']):>22} "
                  f"{_cell(r['enc_dec_MBps']):>22} {r['ratio']:6.2f} {r['rel_rmse']:8.5f}")


def run(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(1)
    repeats = 3 if args.quick else args.repeats
    if repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    min_run_s = 0.002 if args.quick else 0.02
    tensors = [t for t in TENSORS if not args.quick or t[0] in ("har1d", "cnn")]
    record: dict[str, Any] = {
        "bench": "codec",
        "what": "encode = to_bytes(encode(x)), decode = decode(from_bytes(payload)), "
                "enc+dec = both; MB/s of float32 input; memcpy = numpy copy of the same array",
        "machine": machine_info(),
        "repeats": repeats,
        "min_run_ms": min_run_s * 1e3,
        "batch": args.batch,
        "tensors": [],
    }
    for name, after, what in tensors:
        x = activation(name, after, args.batch)
        record["tensors"].append({
            "model": name, "after": after, "what": what, "shape": list(x.shape),
            "MB": x.numel() * 4 / 1e6,
            "zero_fraction": float((x == 0).float().mean()),
            "rows": measure(x, repeats, min_run_s),
        })
    print_table(record)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2))
        print(f"\nwrote {args.json}")
    return 0
