"""``accept-mqtt bench accuracy``: what k-bit compression of the pipeline's cuts costs in accuracy.

For each model, in one process: cut the layer list into 3 consecutive stages with the most
even FLOPs (exhaustive over cut pairs), and train with every boundary tensor going through the
real wire codec, ``decode(from_bytes(to_bytes(encode(...))))``: activations forward with
nearest rounding, min-max with one scale per channel for feature maps
(``codec.channel_axis``); gradients backward with stochastic rounding on the zero-aligned grid
(``minmax0``) -- both the pipeline's defaults -- and, for comparison, each default changed
alone (``--variants``). ``fp32`` is the same plumbing with raw 32-bit frames (exact).
Held-out accuracy is measured with the activations compressed the same way, as a deployed
pipeline would infer.

Guarantee: for one seed every bit width starts from the same weights
(``build_model(seed=...)``), sees the same data in the same order and the same optimiser
(SGD, momentum 0.9, the learning-rate schedule ``train`` would use for the model and data set:
``model/schedule.py``), so the accuracy difference is the codec's alone. One seed is one
sample: with ``--seeds`` the summary gives the median and the range over them.

``--links`` adds runs whose two directions differ and use the per-link options of
``wire/delta.py``: ``a2d/g4ef`` is 2-bit delta-coded activations (per training sample, the
change since it last crossed; its first crossing is a plain frame of ``delta.PLAIN_BITS``
(8) bits) with 4-bit gradients
under error feedback; ``a4/g8`` plain 4-bit activations and 8-bit gradients. Held-out
accuracy over a delta-coded link goes through plain frames of ``delta.PLAIN_BITS`` (8) bits at
least, as the pipeline's evaluation frames do (they carry no history).

``--dataset fashion-mnist`` prints the published Fashion-MNIST accuracies the Debian package
ships beside the measured ones (its README's benchmark table: its benchmark/baselines.json
holds only the scikit-learn hyper-parameter grids, no accuracies).
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from accept_mqtt.wire import codec, delta

from .codec import machine_info

BITS = (32, 8, 4, 2)  # 32 = fp32 (raw frames), the baseline
LR = 0.05
MOMENTUM = 0.9
BATCH = 32


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", type=Path, default=None, help="write results here")
    p.add_argument("--models", default="cnn,har1d", help="comma-separated zoo models")
    p.add_argument("--epochs", type=int, default=8, help="training epochs per run")
    p.add_argument("--seed", type=int, default=0, help="weights, data split and order")
    p.add_argument("--seeds", default=None,
                   help="comma-separated seeds (overrides --seed); the summary gives the "
                        "median and range over them")
    p.add_argument("--dataset", default=None,
                   help="data set (default: each model's own, e.g. fashion-mnist for "
                        "fashion-cnn)")
    p.add_argument("--data-path", default=None, help="directory of the data set's files")
    p.add_argument("--bits", default=",".join(map(str, BITS)),
                   help="bit widths to compare; 32 is the fp32 baseline")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="wire variants to compare at every width: default (minmax0 gradients, "
                        "per-channel feature maps), minmax-grads, per-tensor-act")
    p.add_argument("--links", default="",
                   help="comma-separated extra runs, each 'a<bits>[d]/g<bits>[ef]': activation "
                        "width (d: delta-coded), gradient width (ef: error feedback), e.g. "
                        "a2d/g4ef,a4d/g4ef")
    p.add_argument("--no-ablation", action="store_true",
                   help="skip the activations-only / gradients-only runs")
    p.add_argument("--quick", action="store_true", help="2 epochs, no ablation (a smoke test)")


# what the pipeline sends by default, then one change each (for comparison)
VARIANTS = ("default", "minmax-grads", "per-tensor-act")


def balanced_cuts(flops: list[int], stages: int = 3) -> list[int]:
    """Cut points ``c_1 < ... < c_{stages-1}`` minimising the largest stage's FLOPs."""
    if stages != 3:
        raise ValueError("only 3 stages are supported")
    n = len(flops)
    prefix = [0]
    for f in flops:
        prefix.append(prefix[-1] + f)
    best: tuple[int, int, int] | None = None
    for a in range(1, n - 1):
        for b in range(a + 1, n):
            worst = max(prefix[a], prefix[b] - prefix[a], prefix[n] - prefix[b])
            if best is None or worst < best[0]:
                best = (worst, a, b)
    assert best is not None, "a model needs at least 3 layers for 3 stages"
    return [best[1], best[2]]


_LINKS = re.compile(r"a(\d+)(d?)/g(\d+)(ef)?")


@dataclass(frozen=True)
class LinkSpec:
    """What one run sends over every cut: each direction's width and per-link option."""

    act_bits: int
    grad_bits: int
    act_delta: bool = False
    grad_feedback: bool = False

    @classmethod
    def parse(cls, text: str) -> LinkSpec:
        """``a2d/g4ef`` -> 2-bit delta-coded activations, 4-bit error-feedback gradients.

        >>> LinkSpec.parse("a2d/g4ef")
        LinkSpec(act_bits=2, grad_bits=4, act_delta=True, grad_feedback=True)
        >>> LinkSpec.parse("a32d/g8")
        Traceback (most recent call last):
        ...
        ValueError: 'a32d/g8': delta coding needs activation bits 1..8
        """
        m = _LINKS.fullmatch(text.strip())
        if m is None:
            raise ValueError(f"{text!r}: expected a<bits>[d]/g<bits>[ef], e.g. a2d/g4ef")
        spec = cls(int(m[1]), int(m[3]), bool(m[2]), bool(m[4]))
        for name, b in (("activation", spec.act_bits), ("gradient", spec.grad_bits)):
            if b not in codec.VALID_BITS:
                raise ValueError(f"{text!r}: {name} bits must be {codec.BITS_TEXT}")
        if spec.act_delta and spec.act_bits not in codec.MINMAX_BITS:
            raise ValueError(f"{text!r}: delta coding needs activation bits 1..8")
        if spec.grad_feedback and spec.grad_bits not in codec.MINMAX_BITS:
            raise ValueError(f"{text!r}: error feedback needs gradient bits 1..8")
        return spec

    @property
    def label(self) -> str:
        return (f"a{self.act_bits}{' delta' if self.act_delta else ''} / "
                f"g{self.grad_bits}{' EF' if self.grad_feedback else ''}")


class WireLink:
    """One cut: sends activations and gradients through the real codec, counting bytes.

    ``compress`` names the directions that use ``bits``; the other goes as raw fp32 frames.
    ``spec`` (instead of ``bits``/``compress``) sets each direction and the per-link options:
    a delta-coded link keeps an ``ActHistory`` at each end and needs ``ids``, the training
    samples of the batch, before each training forward; evaluation (``ids`` None) sends plain
    frames of at least ``delta.PLAIN_BITS`` bits.
    """

    def __init__(self, bits: int, cut: int, seed: int,
                 compress: tuple[str, ...] = ("act", "grad"), variant: str = "default",
                 spec: LinkSpec | None = None) -> None:
        self.cut, self.seed = cut, seed
        self.spec = spec or LinkSpec(bits if "act" in compress else 32,
                                     bits if "grad" in compress else 32)
        self.grad_scheme = "minmax" if variant == "minmax-grads" else "minmax0"
        self.act_per_channel = variant != "per-tensor-act"
        self.step = 0
        self.ids: torch.Tensor | None = None
        # the two ends of a delta-coded link, as the pipeline's sender and receiver keep them
        self.history = delta.ActHistory() if self.spec.act_delta else None
        self.receiver = delta.ActHistory() if self.spec.act_delta else None
        self.feedback = delta.ErrorFeedback() if self.spec.grad_feedback else None
        self.bytes = {"act": 0, "grad": 0}

    def send(self, t: torch.Tensor, kind: str) -> torch.Tensor:
        grad = kind == "grad"
        bits = self.spec.grad_bits if grad else self.spec.act_bits
        if not grad and self.history is not None and self.ids is None:
            bits = max(bits, delta.PLAIN_BITS)  # an evaluation frame: plain, no history
        kw: dict[str, Any] = dict(
            bits=bits, job="accuracy", step=self.step, mb=0, kind=kind,
            stochastic=grad and bits <= 8, zero=grad and self.grad_scheme == "minmax0",
            axis=None if grad else codec.channel_axis(t.shape, bits, self.act_per_channel),
            # a fresh, reproducible rounding stream per step and cut
            seed=(self.seed * 1_000_003 + self.step * 101 + self.cut) % 2**32,
        )
        if grad and self.feedback is not None:
            frame = self.feedback.encode(t, slot=0, **kw)
        elif not grad and self.history is not None and self.ids is not None:
            step = kw.pop("step")
            frame = self.history.encode(t, self.ids, step=step, **kw)
        else:
            frame = codec.encode(t, **kw)
        payload = codec.to_bytes(frame)
        self.bytes[kind] += len(payload)
        topic = f"accept/jobs/accuracy/stage/{self.cut + (0 if grad else 1)}/" + (
            "bwd" if grad else "fwd")
        if not grad and self.receiver is not None and self.ids is not None:
            return self.receiver.decode(codec.from_bytes(payload, topic), topic)
        return codec.decode(codec.from_bytes(payload, topic))


class _Cut(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, link: WireLink) -> torch.Tensor:  # type: ignore[override]
        ctx.link = link
        return link.send(x, "act")

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return ctx.link.send(g.contiguous(), "grad"), None


class Pipeline(nn.Module):
    """Stages in order with a ``WireLink`` at every cut."""

    def __init__(self, stages: list[nn.Module], links: list[WireLink]) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.links = links

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, stage in enumerate(self.stages):
            if i:
                x = _Cut.apply(x, self.links[i - 1])
            x = stage(x)
        return x


def train_one(name: str, bits: int, epochs: int, seed: int,
              compress: tuple[str, ...] = ("act", "grad"),
              variant: str = "default", dataset: str | None = None,
              data_path: str | None = None, spec: LinkSpec | None = None) -> dict[str, Any]:
    """Train ``name`` with its cuts at ``bits``; a diverged run reports the step, no accuracy."""
    from accept_mqtt.model.data import load_dataset
    from accept_mqtt.model.descriptors import describe
    from accept_mqtt.model.schedule import apply_lr, default_recipe
    from accept_mqtt.model.zoo import ZOO, build_model

    ds = load_dataset(dataset or ZOO[name].default_dataset, path=data_path, seed=seed)
    model = build_model(name, seed=seed, input_shape=ds.input_shape,
                        num_classes=ds.num_classes)
    a, b = balanced_cuts([d.flops for d in describe(model)])
    links = [WireLink(bits, k, seed, compress, variant, spec) for k in (0, 1)]
    net = Pipeline([model.slice(0, a), model.slice(a, b), model.slice(b, len(model.layers))],
                   links)
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
    total = epochs * -(-len(ds.train_x) // BATCH)
    recipe = default_recipe(name, ds.name)
    schedule = {"lr": LR, "lr_schedule": recipe.lr_schedule, "total_steps": total,
                "warmup_steps": recipe.warmup_steps(total)}
    order = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    step, last_loss, diverged = 0, float("nan"), None
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(len(ds.train_x), generator=order)
        loss_sum, seen = 0.0, 0
        for i in range(0, len(perm), BATCH):
            idx = perm[i : i + BATCH]
            for link in links:
                link.step, link.ids = step, idx
            try:
                loss = nn.functional.cross_entropy(net(ds.train_x[idx]), ds.train_y[idx])
                if not torch.isfinite(loss):
                    raise ValueError("loss is inf or NaN")
                opt.zero_grad()
                loss.backward()
            except ValueError as e:  # the codec refuses inf/NaN: training has blown up
                if "inf or NaN" not in str(e):
                    raise
                diverged = step
                break
            apply_lr(opt, schedule, step)
            opt.step()
            loss_sum += loss.item() * len(idx)
            seen += len(idx)
            step += 1
        if diverged is not None:
            break
        last_loss = loss_sum / seen
    for link in links:
        link.ids = None  # evaluation: no sample history
    acc = None if diverged is not None else _accuracy(net, ds.test_x, ds.test_y)
    label = "fp32" if bits == 32 else f"{bits}-bit"
    if bits != 32 and compress != ("act", "grad"):
        label += f" {compress[0]} only"
    if bits != 32 and variant != "default":
        label += f" {variant}"
    if spec is not None:
        label = spec.label + (f" {variant}" if variant != "default" else "")
    return {
        "bits": bits if spec is None else spec.act_bits,
        "links": None if spec is None else spec.__dict__.copy(),
        "variant": variant if bits != 32 else None,
        "compress": list(compress) if bits != 32 else [],
        "label": label,
        "test_acc": acc,
        "diverged_at_step": diverged,
        "train_loss_last_epoch": last_loss,
        "steps": step,
        "cut_bytes_per_step": sum(sum(lk.bytes.values()) for lk in links) / max(step, 1),
        # what the delta histories held at the end, at both ends of every cut
        "history_bytes": sum(2 * lk.history.nbytes for lk in links if lk.history is not None),
        "elapsed_s": time.perf_counter() - t0,
        "cuts": [a, b],
        "seed": seed,
        "lr_schedule": schedule,
        "dataset": ds.name,
        "n_train": len(ds.train_x),
        "n_test": len(ds.test_x),
    }


def _accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    net.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), 256):
            correct += int((net(x[i : i + 256]).argmax(1) == y[i : i + 256]).sum())
    return correct / len(x)


def _row(r: dict[str, Any]) -> str:
    if r["test_acc"] is None:
        return f"{r['label']:>24}  diverged at step {r['diverged_at_step']}"
    return (f"{r['label']:>24} {100 * r['test_acc']:8.2f}% {r['delta_pp']:+7.2f}p "
            f"{r['train_loss_last_epoch']:11.4f} {r['cut_bytes_per_step'] / 1e3:12.1f} "
            f"{r['elapsed_s']:7.1f}")


FASHION_README = Path("/usr/share/doc/dataset-fashion-mnist/README.md.gz")


def published_baselines(readme: Path = FASHION_README) -> list[dict[str, Any]]:
    """The small CNNs (2-3 conv layers, no augmentation) of the benchmark table in the
    README that Debian's dataset-fashion-mnist ships; [] if the file is not there. Zalando
    says of the table: "we haven't yet tested these results"."""
    try:
        text = gzip.decompress(readme.read_bytes()).decode("utf-8", "replace")
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 5 or not re.match(r"[23] Conv", cells[0]):
            continue
        if cells[1] not in ("None", "Normalization"):
            continue
        try:
            acc = float(cells[2])
        except ValueError:
            continue
        who = re.sub(r"\[([^]]*)\]\([^)]*\)", r"\1", cells[4])
        out.append({"classifier": cells[0], "preprocessing": cells[1], "accuracy": acc,
                    "submitter": who})
    return out


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per label: the median and range over seeds of the accuracy and of the change vs fp32."""
    out = []
    for label in dict.fromkeys(r["label"] for r in rows):
        mine = [r for r in rows if r["label"] == label]
        acc = [100 * r["test_acc"] for r in mine if r["test_acc"] is not None]
        delta = [r["delta_pp"] for r in mine if r["delta_pp"] is not None]
        out.append({"label": label, "seeds": [r["seed"] for r in mine],
                    "diverged": len(mine) - len(acc),
                    "acc_median": statistics.median(acc) if acc else None,
                    "acc_min": min(acc, default=None), "acc_max": max(acc, default=None),
                    "delta_median": statistics.median(delta) if delta else None,
                    "delta_min": min(delta, default=None),
                    "delta_max": max(delta, default=None)})
    return out


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)  # reproducible sums, and no thread stalls on a shared box
    epochs = 2 if args.quick else args.epochs
    bits = [int(b) for b in args.bits.split(",")]
    if bits[0] != 32:
        bits = [32] + [b for b in bits if b != 32]
    models = [m for m in args.models.split(",") if m]
    variants = [s for s in args.variants.split(",") if s]
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [args.seed]
    try:
        specs = [LinkSpec.parse(t) for t in args.links.split(",") if t.strip()]
    except ValueError as e:
        print(f"accept-mqtt bench accuracy: --links {e}")
        return 2
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        print(f"accept-mqtt bench accuracy: unknown variants {unknown}; use "
              f"{', '.join(VARIANTS)}")
        return 2
    t0 = time.perf_counter()
    record: dict[str, Any] = {
        "bench": "accuracy",
        "what": "held-out accuracy after training with every cut's activations (nearest) and "
                "gradients (stochastic) through the k-bit wire codec; 3 FLOPs-balanced "
                "stages; default = minmax0 gradients and per-channel feature-map scales, as "
                "the pipeline sends them",
        "machine": machine_info(),
        "seeds": seeds, "epochs": epochs, "batch": BATCH, "dataset": args.dataset,
        "optimizer": f"SGD lr={LR} momentum={MOMENTUM}, the model's lr schedule",
        "models": {}, "summary": {},
    }
    print(f"accuracy vs cut compression: {epochs} epochs, seeds {seeds}, batch {BATCH}, "
          f"SGD lr {LR} momentum {MOMENTUM} (the model's lr schedule), one thread on "
          f"{record['machine']['cpu']}")
    for name in models:
        both = ("act", "grad")
        plan: list[tuple[int, tuple[str, ...], str, LinkSpec | None]] = [
            (32, both, variants[0], None)]
        plan += [(b, both, v, None) for v in variants for b in bits if b != 32]
        if not (args.quick or args.no_ablation):
            plan += [(b, (kind,), variants[0], None) for b in bits if b != 32
                     for kind in ("act", "grad")]
        plan += [(0, both, variants[0], sp) for sp in specs]
        rows: list[dict[str, Any]] = []
        for seed in seeds:
            mine: list[dict[str, Any]] = []
            for b, compress, variant, sp in plan:
                r = train_one(name, b, epochs, seed, compress, variant, args.dataset,
                              args.data_path, sp)
                base = mine[0]["test_acc"] if mine else r["test_acc"]
                r["delta_pp"] = (None if r["test_acc"] is None or base is None
                                 else 100 * (r["test_acc"] - base))
                mine.append(r)
            first = mine[0]
            print(f"\n{name} on {first['dataset']} ({first['n_train']} train / "
                  f"{first['n_test']} held out), seed {seed}, cuts after layers "
                  f"{first['cuts'][0] - 1} and {first['cuts'][1] - 1}")
            print(f"{'cuts at':>24} {'test acc':>9} {'vs fp32':>8} {'train loss':>11} "
                  f"{'cut KB/step':>12} {'time s':>7}")
            for r in mine:
                print(_row(r))
            rows += mine
        record["models"][name] = rows
        summary = record["summary"][name] = summarise(rows)
        if len(seeds) > 1:
            print(f"\n{name}, {len(seeds)} seeds: held-out accuracy median [min-max], "
                  "change vs fp32 of the same seed")
            for t in summary:
                if t["acc_median"] is None:
                    print(f"{t['label']:>24}  diverged for every seed")
                    continue
                print(f"{t['label']:>24} {t['acc_median']:6.2f}% [{t['acc_min']:.2f}-"
                      f"{t['acc_max']:.2f}] {t['delta_median']:+6.2f}p "
                      f"[{t['delta_min']:+.2f} to {t['delta_max']:+.2f}]"
                      + (f", diverged {t['diverged']}x" if t["diverged"] else ""))
    if any(r["dataset"] == "fashion-mnist" for rows in record["models"].values()
           for r in rows):
        record["published"] = published_baselines()
        print(f"\npublished Fashion-MNIST accuracies of small CNNs ({FASHION_README}, "
              "untested by Zalando, other epochs and batch sizes):")
        for b in record["published"]:
            print(f"{100 * b['accuracy']:8.1f}%  {b['classifier']} ({b['preprocessing']}), "
                  f"{b['submitter']}")
    record["elapsed_s"] = time.perf_counter() - t0
    print(f"\nwithin one seed, differences of about a point are seed noise. "
          f"total {record['elapsed_s']:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2))
        print(f"wrote {args.json}")
    return 0
