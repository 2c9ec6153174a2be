"""Model zoo: every model is an ordered list of layers that can be cut between any two.

Guarantees:

* ``build_model(name, seed=s)`` returns the same initial weights for the same ``s`` on every
  machine, so a device agent can rebuild its own slice from the plan alone and a one-process
  reference starts from identical parameters.
* Each layer maps one tensor to one tensor; running ``layers[a:b]`` in order and feeding the
  result to ``layers[b:c]`` is the same as running ``layers[a:c]``. Composite blocks with a
  skip connection (MobileNetV2's inverted residual, ResNet's basic block) are one layer, so
  no cut splits a skip.
* A name ``MODULE:FACTORY`` is the user's own model, built by ``user.build_user_model`` with
  the same seeding (``seeded``) and the same guarantees.
* Shapes are per sample (no batch dimension) in ``input_shape``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ZooModel:
    """A cuttable model: ``layers`` in order, the per-sample input shape and class count."""

    name: str
    layers: list[nn.Module]
    input_shape: tuple[int, ...]
    num_classes: int

    def sequential(self) -> nn.Sequential:
        return nn.Sequential(*self.layers)

    def slice(self, start: int, end: int) -> nn.Sequential:
        """Layers ``[start, end)`` as one module (a pipeline stage)."""
        if not 0 <= start < end <= len(self.layers):
            raise ValueError(
                f"layer range [{start}, {end}) is outside {self.name}'s {len(self.layers)} layers"
            )
        return nn.Sequential(*self.layers[start:end])


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 project, skip when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_skip = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.block = nn.Sequential(*layers)
        self.stride = stride
        self.in_channels = cin
        self.out_channels = cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.use_skip else y


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convolutions and a skip (a 1x1 projection when the shape
    changes), ReLU after the sum."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))
        self.relu = nn.ReLU()
        self.use_skip = True  # descriptors count the sum as elementwise work
        self.stride = stride
        self.in_channels = cin
        self.out_channels = cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


def _digits_cnn(in_shape: tuple[int, ...], classes: int, width: float) -> list[nn.Module]:
    c1, c2, c3 = (max(4, int(c * width)) for c in (16, 32, 64))
    cin, h, w = in_shape
    return [
        nn.Conv2d(cin, c1, 3, padding=1),
        nn.BatchNorm2d(c1),
        nn.ReLU(),
        nn.Conv2d(c1, c2, 3, padding=1),
        nn.BatchNorm2d(c2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c2, c3, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c3 * (h // 4) * (w // 4), 64),
        nn.ReLU(),
        nn.Linear(64, classes),
    ]


def _fashion_cnn(in_shape: tuple[int, ...], classes: int, width: float) -> list[nn.Module]:
    """Two conv + BN + pool blocks and two linear layers, for 28x28 grey images."""
    c1, c2 = (max(4, int(c * width)) for c in (16, 32))
    hidden = max(16, int(128 * width))
    cin, h, w = in_shape
    return [
        nn.Conv2d(cin, c1, 3, padding=1),
        nn.BatchNorm2d(c1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1),
        nn.BatchNorm2d(c2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c2 * (h // 4) * (w // 4), hidden),
        nn.ReLU(),
        nn.Linear(hidden, classes),
    ]


def _vgg(in_shape: tuple[int, ...], classes: int, width: float) -> list[nn.Module]:
    cfg: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, "M"]
    layers: list[nn.Module] = []
    cin, h, w = in_shape
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        else:
            cout = max(8, int(int(v) * width))
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
            cin = cout
    hidden = max(16, int(256 * width))
    layers += [
        nn.Flatten(),
        nn.Linear(cin * h * w, hidden),
        nn.ReLU(),
        nn.Dropout(0.0),  # a placeholder kept at p=0 so runs stay exactly reproducible
        nn.Linear(hidden, classes),
    ]
    return layers


def _stem(cin: int, cout: int, act: nn.Module) -> list[nn.Module]:
    """A 3x3 convolution without bias, BatchNorm and ``act``: three cuttable layers."""
    return [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), act]


def _mobilenet_v2(in_shape: tuple[int, ...], classes: int, width: float) -> list[nn.Module]:
    # (expand, channels, repeats, first stride) as in MobileNetV2, strides cut for 32x32 inputs.
    cfg = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
           (6, 160, 3, 2), (6, 320, 1, 1)]
    ch = lambda c: max(8, int(c * width))
    cin = ch(32)
    layers = _stem(in_shape[0], cin, nn.ReLU6())
    for t, c, n, s in cfg:
        cout = ch(c)
        for i in range(n):
            layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
            cin = cout
    last = max(64, int(1280 * width))
    layers += [
        nn.Conv2d(cin, last, 1, bias=False),
        nn.BatchNorm2d(last),
        nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(last, classes),
    ]
    return layers


def _resnet(in_shape: tuple[int, ...], classes: int, width: float) -> list[nn.Module]:
    # CIFAR ResNet-20 (He et al. 2016, section 4.2): a 3x3 stem, three groups of three basic
    # blocks at 16/32/64 channels (x width), the last two groups halving the resolution
    ch = lambda c: max(8, int(c * width))
    cin = ch(16)
    layers = _stem(in_shape[0], cin, nn.ReLU())
    for group, c in enumerate((16, 32, 64)):
        cout = ch(c)
        for i in range(3):
            layers.append(BasicBlock(cin, cout, 2 if group > 0 and i == 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return layers


def _har_cnn(in_shape: tuple[int, ...], classes: int, width: float) -> list[nn.Module]:
    c1, c2, c3 = (max(8, int(c * width)) for c in (32, 64, 128))
    cin = in_shape[0]
    return [
        nn.Conv1d(cin, c1, 5, padding=2),
        nn.BatchNorm1d(c1),
        nn.ReLU(),
        nn.MaxPool1d(2),
        nn.Conv1d(c1, c2, 5, padding=2),
        nn.BatchNorm1d(c2),
        nn.ReLU(),
        nn.MaxPool1d(2),
        nn.Conv1d(c2, c3, 3, padding=1),
        nn.BatchNorm1d(c3),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(c3, classes),
    ]


def _mlp(in_shape: tuple[int, ...], classes: int, width: float) -> list[nn.Module]:
    n_in = 1
    for d in in_shape:
        n_in *= d
    hidden = max(8, int(256 * width))
    return [
        nn.Flatten(),
        nn.Linear(n_in, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden // 2),
        nn.ReLU(),
        nn.Linear(hidden // 2, classes),
    ]


Builder = Callable[[tuple[int, ...], int, float], list[nn.Module]]


@dataclass(frozen=True)
class ZooEntry:
    builder: Builder
    input_shape: tuple[int, ...]
    num_classes: int
    default_dataset: str
    summary: str


ZOO: dict[str, ZooEntry] = {
    "cnn": ZooEntry(_digits_cnn, (1, 8, 8), 10, "digits", "small CNN for 8x8 handwritten digits"),
    "mlp": ZooEntry(_mlp, (1, 8, 8), 10, "digits", "3-hidden-layer MLP"),
    "fashion-cnn": ZooEntry(_fashion_cnn, (1, 28, 28), 10, "fashion-mnist",
                            "2-conv CNN for 28x28x1 images (Fashion-MNIST)"),
    "vgg": ZooEntry(_vgg, (3, 32, 32), 10, "synthetic-cifar", "VGG-style CNN for 32x32x3 images"),
    "mobilenet": ZooEntry(
        _mobilenet_v2, (3, 32, 32), 10, "synthetic-cifar", "MobileNetV2-style CNN, 32x32x3"
    ),
    "resnet": ZooEntry(
        _resnet, (3, 32, 32), 10, "synthetic-cifar", "CIFAR ResNet-20 (basic blocks), 32x32x3"
    ),
    "har1d": ZooEntry(
        _har_cnn, (9, 128), 6, "synthetic-har", "1-D CNN for 9-channel inertial windows (UCI HAR)"
    ),
}


BUILD_LOCK = threading.Lock()


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Draw from torch's global RNG as if it had just been seeded with ``seed``, and leave it
    as it was afterwards. Building a model under this never disturbs (and is never disturbed
    by) whatever else the process draws; ``BUILD_LOCK`` matters when several agents build
    their stages in threads of one process: the global generator is shared, and interleaved
    draws would give different weights."""
    with BUILD_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class UnknownModelError(ValueError):
    pass


def build_model(
    name: str,
    *,
    seed: int,
    input_shape: tuple[int, ...] | None = None,
    num_classes: int | None = None,
    width: float = 1.0,
    model_path: Sequence[str] = (),
) -> ZooModel:
    """Build zoo model ``name`` with weights fixed by ``seed``; a ``MODULE:FACTORY`` name is
    the user's own model (``user.build_user_model``, which searches ``model_path`` too).

    >>> m = build_model("cnn", seed=0)
    >>> len(m.layers), m.input_shape
    (14, (1, 8, 8))
    >>> x = torch.zeros(2, *m.input_shape)
    >>> tuple(m.sequential()(x).shape)
    (2, 10)
    """
    from . import user  # here, not at the top: user builds on this module

    if user.is_user_model(name):
        if width != 1.0:
            raise user.UserModelError(f"width applies to zoo models only, not to {name!r}")
        return user.build_user_model(name, seed=seed, input_shape=input_shape,
                                     num_classes=num_classes, model_path=model_path)
    try:
        entry = ZOO[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}; the zoo has: {', '.join(sorted(ZOO))}"
        ) from None
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    shape = tuple(input_shape) if input_shape is not None else entry.input_shape
    classes = num_classes if num_classes is not None else entry.num_classes
    with seeded(seed):
        layers = entry.builder(shape, classes, width)
    return ZooModel(name, layers, shape, classes)
