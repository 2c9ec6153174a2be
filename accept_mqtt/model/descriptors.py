"""Layer descriptors computed from the model itself, never typed by hand.

A descriptor says what one cuttable layer costs per sample: its type, FLOPs, parameter count,
input and output element counts, and the kernel, stride and channels of its convolution (the
first one inside a composite block). The predictor turns these into features; the partitioner
uses ``out_elems`` for the size of the tensor that crosses a cut.

Guarantee: ``describe(model)`` runs one zero sample through the layers with forward hooks and
counts multiply-adds of every leaf module, so a composite block costs the sum of its parts;
a block's skip sum, and each functional operation of a traced unit (``fxcut``: ``x + y``,
``F.relu``) that makes a new tensor, count one per output element, as a leaf's elementwise
work does.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import fx, nn

from .zoo import BasicBlock, InvertedResidual, ZooModel


@dataclass(frozen=True)
class LayerDescriptor:
    index: int
    type: str
    flops: int  # per sample, 2 x multiply-adds for conv/linear, 1 per element otherwise
    params: int
    in_elems: int  # per sample
    out_elems: int  # per sample
    kernel: int
    stride: int
    in_channels: int
    out_channels: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerDescriptor:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


_TYPE_NAMES = {
    nn.Conv1d: "conv1d",
    nn.Conv2d: "conv2d",
    nn.Linear: "linear",
    nn.BatchNorm1d: "batchnorm",
    nn.BatchNorm2d: "batchnorm",
    nn.ReLU: "relu",
    nn.ReLU6: "relu",
    nn.MaxPool1d: "maxpool",
    nn.MaxPool2d: "maxpool",
    nn.AdaptiveAvgPool1d: "avgpool",
    nn.AdaptiveAvgPool2d: "avgpool",
    nn.Flatten: "flatten",
    nn.Dropout: "dropout",
    InvertedResidual: "invres",
    BasicBlock: "basicblock",
}

LAYER_TYPES: tuple[str, ...] = tuple(sorted(set(_TYPE_NAMES.values())))


def layer_type(m: nn.Module) -> str:
    return _TYPE_NAMES.get(type(m), type(m).__name__.lower())


def _leaf_flops(m: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    if isinstance(m, nn.Conv1d | nn.Conv2d):
        k = math.prod(m.kernel_size)
        return 2 * out.numel() * (m.in_channels // m.groups) * k
    if isinstance(m, nn.Linear):
        return 2 * m.in_features * m.out_features
    if isinstance(m, nn.MaxPool1d | nn.MaxPool2d):
        ks = m.kernel_size
        dims = 2 if isinstance(m, nn.MaxPool2d) else 1
        return out.numel() * (ks**dims if isinstance(ks, int) else math.prod(ks))
    if isinstance(m, nn.Flatten | nn.Dropout | nn.Identity):
        return 0
    return inp.numel()  # elementwise: BN, activations, pooling to 1


class _FunctionalFlops(fx.Interpreter):
    """Runs a traced unit, counting its functional operations' new elements (submodule calls
    go through the modules, so their forward hooks fire as usual)."""

    def __init__(self, unit: fx.GraphModule) -> None:
        super().__init__(unit)
        self.flops = 0

    def run_node(self, n: fx.Node) -> object:
        out = super().run_node(n)
        if (n.op in ("call_function", "call_method") and isinstance(out, torch.Tensor)
                and not out._is_view()):  # a view (flatten, indexing) moves no data
            self.flops += out.numel()
        return out


def _conv_geometry(m: nn.Module) -> tuple[int, int, int, int]:
    """(kernel, stride, in_channels, out_channels) of a layer, 0 where it has none."""
    if isinstance(m, InvertedResidual):
        dw = [c for c in m.modules() if isinstance(c, nn.Conv2d) and c.groups > 1][0]
        return dw.kernel_size[0], m.stride, m.in_channels, m.out_channels
    convs = [c for c in m.modules() if isinstance(c, nn.Conv1d | nn.Conv2d)]
    if convs and next(m.children(), None) is not None:
        # a composite block (ResNet's, a traced unit): its first convolution's kernel and
        # stride, the channels it takes in and the last one gives out
        return (convs[0].kernel_size[0], convs[0].stride[0], convs[0].in_channels,
                convs[-1].out_channels)
    if isinstance(m, nn.Conv1d | nn.Conv2d):
        return m.kernel_size[0], m.stride[0], m.in_channels, m.out_channels
    if isinstance(m, nn.Linear):
        return 1, 1, m.in_features, m.out_features
    if isinstance(m, nn.MaxPool1d | nn.MaxPool2d):
        k = m.kernel_size if isinstance(m.kernel_size, int) else m.kernel_size[0]
        s = m.stride if isinstance(m.stride, int) else m.stride[0]
        return k, s, 0, 0
    return 0, 0, 0, 0


@torch.no_grad()
def describe(model: ZooModel) -> list[LayerDescriptor]:
    """Descriptors of every layer of ``model`` for one sample.

    >>> from accept_mqtt.model.zoo import build_model
    >>> d = describe(build_model("cnn", seed=0))
    >>> d[0].type, d[0].in_elems, d[0].out_elems
    ('conv2d', 64, 1024)
    """
    x = torch.zeros(1, *model.input_shape)
    out: list[LayerDescriptor] = []
    was_training = [layer.training for layer in model.layers]
    for layer in model.layers:
        layer.eval()  # no BatchNorm running-stat update from the probe sample
    try:
        for i, layer in enumerate(model.layers):
            counted: list[int] = []

            def hook(
                m: nn.Module, args: tuple[torch.Tensor, ...], y: torch.Tensor,
                counted: list[int] = counted,
            ) -> None:
                counted.append(_leaf_flops(m, args[0], y))

            leaves = [m for m in layer.modules() if not list(m.children())] or [layer]
            handles = [m.register_forward_hook(hook) for m in leaves]
            functional = _FunctionalFlops(layer) if isinstance(layer, fx.GraphModule) else None
            try:
                y = functional.run(x) if functional is not None else layer(x)
            finally:
                for h in handles:
                    h.remove()
            flops = sum(counted) + (functional.flops if functional is not None else 0)
            if getattr(layer, "use_skip", False):  # InvertedResidual, BasicBlock: the sum
                flops += y.numel()
            k, s, cin, cout = _conv_geometry(layer)
            out.append(
                LayerDescriptor(
                    index=i,
                    type=layer_type(layer),
                    flops=int(flops),
                    params=sum(p.numel() for p in layer.parameters()),
                    in_elems=x.numel(),
                    out_elems=y.numel(),
                    kernel=k,
                    stride=s,
                    in_channels=cin,
                    out_channels=cout,
                )
            )
            x = y
    finally:
        for layer, t in zip(model.layers, was_training, strict=True):
            layer.train(t)
    return out


def output_shapes(model: ZooModel) -> list[tuple[int, ...]]:
    """Per-sample shape after each layer (what crosses a cut placed after it)."""
    shapes = []
    with torch.no_grad():
        x = torch.zeros(1, *model.input_shape)
        training = [layer.training for layer in model.layers]
        for layer in model.layers:
            layer.eval()
            x = layer(x)
            shapes.append(tuple(x.shape[1:]))
        for layer, t in zip(model.layers, training, strict=True):
            layer.train(t)
    return shapes
