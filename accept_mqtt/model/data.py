"""Datasets as in-memory tensors, split into train and held-out test by a seed.

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images, no download).
* ``cifar10``: the CIFAR-10 "python version" batches read from a directory the user gives
  (``data_batch_1..5`` and ``test_batch``); nothing is downloaded.
* ``har``: the UCI HAR dataset read from its unpacked directory (``train/Inertial Signals``,
  ``test/...``, ``y_train.txt``...): 9 channels x 128 samples, 6 activities.
* ``fashion-mnist``: Zalando's Fashion-MNIST, the four upstream IDX files (gzipped or not),
  from ``FASHION_MNIST_DIR`` (where Debian's ``dataset-fashion-mnist`` puts them) or the
  directory given; the upstream 60,000 / 10,000 train / test split, standardised with the
  training split's mean and std. 28x28x1, 10 classes.
* ``synthetic-cifar`` / ``synthetic-har`` / ``synthetic-digits``: class-dependent patterns plus
  noise with the real shapes, for quick runs and tests on machines without the data.

Guarantee: the same name, path and seed give the same tensors in the same order.
"""

from __future__ import annotations

import gzip
import math
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


class DatasetError(ValueError):
    pass


@dataclass
class Dataset:
    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])


def reshape_inputs(ds: Dataset, shape: tuple[int, ...]) -> Dataset:
    """The same samples viewed as ``shape`` per sample (``--input-shape``), e.g. 8x8 digits as
    64 values; ``DatasetError`` if the element counts differ."""
    have = ds.input_shape
    if math.prod(shape) != math.prod(have):
        raise DatasetError(f"input shape {list(shape)} holds {math.prod(shape)} values but "
                           f"{ds.name}'s samples are {list(have)} ({math.prod(have)} values)")
    return Dataset(ds.name, ds.train_x.reshape(len(ds.train_x), *shape), ds.train_y,
                   ds.test_x.reshape(len(ds.test_x), *shape), ds.test_y, ds.num_classes)


def _split(name: str, x: np.ndarray, y: np.ndarray, classes: int, seed: int,
           test_fraction: float = 0.2) -> Dataset:
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(x))
    n_test = max(1, int(len(x) * test_fraction))
    te, tr = idx[:n_test], idx[n_test:]
    tx = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    ty = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
    return Dataset(name, tx[tr], ty[tr], tx[te], ty[te], classes)


def _standardise(ds: Dataset) -> Dataset:
    """Per-channel mean/std from the training split only (no test leakage)."""
    dims = [0] + list(range(2, ds.train_x.dim()))
    mean = ds.train_x.mean(dim=dims, keepdim=True)
    std = ds.train_x.std(dim=dims, keepdim=True).clamp_min(1e-6)
    ds.train_x = (ds.train_x - mean) / std
    ds.test_x = (ds.test_x - mean) / std
    return ds


def digits(seed: int = 0) -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    return _split("digits", x, d.target, 10, seed)


def _synthetic(name: str, shape: tuple[int, ...], classes: int, n: int, seed: int) -> Dataset:
    """Each class is a fixed random smooth pattern; samples are pattern + noise + shift."""
    rng = np.random.default_rng(1000 + seed)
    protos = rng.normal(0, 1, (classes, *shape)).astype(np.float32)
    # smooth the prototypes along the last axis so conv layers have structure to find
    k = np.ones(5, dtype=np.float32) / 5
    protos = np.apply_along_axis(lambda v: np.convolve(v, k, mode="same"), -1, protos)
    y = rng.integers(0, classes, n)
    x = protos[y] + rng.normal(0, 1.0, (n, *shape)).astype(np.float32)
    return _standardise(_split(name, x, y, classes, seed))


def cifar10(path: str | Path, seed: int = 0) -> Dataset:
    root = Path(path)
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    files = [root / f"data_batch_{i}" for i in range(1, 6)] + [root / "test_batch"]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise DatasetError(f"CIFAR-10 python batches not found in {root}: missing {missing}")
    xs, ys = [], []
    for f in files:
        with open(f, "rb") as fh:
            batch = pickle.load(fh, encoding="bytes")
        xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(batch[b"labels"], dtype=np.int64))
    x = np.concatenate(xs[:5]).astype(np.float32) / 255.0
    tx = np.concatenate(xs[5:]).astype(np.float32) / 255.0
    ds = Dataset("cifar10", torch.from_numpy(x), torch.from_numpy(np.concatenate(ys[:5])),
                 torch.from_numpy(tx), torch.from_numpy(ys[5]), 10)
    return _standardise(ds)


_HAR_SIGNALS = [f"{s}_{a}" for s in ("body_acc", "body_gyro", "total_acc") for a in "xyz"]


def har(path: str | Path, seed: int = 0) -> Dataset:
    root = Path(path)
    if (root / "UCI HAR Dataset").is_dir():
        root = root / "UCI HAR Dataset"

    def split(part: str) -> tuple[np.ndarray, np.ndarray]:
        sig_dir = root / part / "Inertial Signals"
        chans = []
        for s in _HAR_SIGNALS:
            f = sig_dir / f"{s}_{part}.txt"
            if not f.is_file():
                raise DatasetError(f"UCI HAR file not found: {f}")
            chans.append(np.loadtxt(f, dtype=np.float32))
        x = np.stack(chans, axis=1)  # (n, 9, 128)
        yf = root / part / f"y_{part}.txt"
        if not yf.is_file():
            raise DatasetError(f"UCI HAR labels not found: {yf}")
        y = np.loadtxt(yf, dtype=np.int64) - 1  # activities are 1..6 in the files
        return x, y

    x, y = split("train")
    tx, ty = split("test")
    ds = Dataset("har", torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(tx),
                 torch.from_numpy(ty), 6)
    return _standardise(ds)


FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian dataset-fashion-mnist
_IDX_FILES = {"train-images": 3, "train-labels": 1, "t10k-images": 3, "t10k-labels": 1}


def read_idx(path: Path, dims: int) -> np.ndarray:
    """One IDX file (unsigned bytes, ``dims`` dimensions), gzipped if its name ends in .gz.

    ``DatasetError`` naming the file if it cannot be read, is not IDX with unsigned bytes
    and ``dims`` dimensions, or holds fewer bytes than its header promises.
    """
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DatasetError(f"cannot read {path}: {e}") from None
    head = 4 + 4 * dims
    if len(raw) < head or raw[:2] != b"\0\0" or raw[2] != 0x08 or raw[3] != dims:
        raise DatasetError(f"{path} is not an IDX file of unsigned bytes with {dims} "
                           f"dimension(s) (header {raw[:4].hex() or 'empty'})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    n = int(np.prod(shape))
    if len(raw) - head != n:
        raise DatasetError(f"{path}: the header says {shape} ({n} bytes) but {len(raw) - head} "
                           "bytes follow it")
    return np.frombuffer(raw, dtype=np.uint8, offset=head).reshape(shape)


def fashion_mnist(path: str | Path | None = None) -> Dataset:
    """Fashion-MNIST from ``path`` (default ``FASHION_MNIST_DIR``); see the module docstring."""
    root = Path(path) if path is not None else FASHION_MNIST_DIR
    found: dict[str, np.ndarray] = {}
    for stem, dims in _IDX_FILES.items():
        name = f"{stem}-idx{dims}-ubyte"
        f = next((root / n for n in (name + ".gz", name) if (root / n).is_file()), None)
        if f is None:
            hint = "" if path is not None else (
                " (install Debian's dataset-fashion-mnist, or give --data-path DIR)")
            raise DatasetError(f"Fashion-MNIST file {name}[.gz] not found in {root}{hint}")
        found[stem] = read_idx(f, dims)
    for part in ("train", "t10k"):
        x, y = found[f"{part}-images"], found[f"{part}-labels"]
        if x.shape[1:] != (28, 28) or len(x) != len(y):
            raise DatasetError(f"Fashion-MNIST {part} files in {root} disagree: images "
                               f"{x.shape}, labels {y.shape} (want n x 28 x 28 and n)")
        if len(y) and int(y.max()) > 9:
            raise DatasetError(f"Fashion-MNIST {part} labels in {root} go up to "
                               f"{int(y.max())}; want 0..9")

    def images(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.float32).reshape(-1, 1, 28, 28) / 255.0)

    def labels(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.int64))

    ds = Dataset("fashion-mnist", images(found["train-images"]), labels(found["train-labels"]),
                 images(found["t10k-images"]), labels(found["t10k-labels"]), 10)
    return _standardise(ds)


DATASETS = ("digits", "fashion-mnist", "cifar10", "har", "synthetic-cifar", "synthetic-har",
            "synthetic-digits")


def load_dataset(name: str, *, path: str | Path | None = None, seed: int = 0,
                 synthetic_size: int = 2000) -> Dataset:
    """Load dataset ``name``; ``path`` is required for ``cifar10`` and ``har`` (optional for
    ``fashion-mnist``). The fixed upstream splits (cifar10, har, fashion-mnist) ignore
    ``seed``."""
    if name == "digits":
        return digits(seed)
    if name == "fashion-mnist":
        return fashion_mnist(path)
    if name in ("cifar10", "har"):
        if path is None:
            alt = "synthetic-cifar" if name == "cifar10" else "synthetic-har"
            raise DatasetError(
                f"dataset {name!r} is read from disk: give --data-path DIR (or use {alt})"
            )
        return cifar10(path, seed) if name == "cifar10" else har(path, seed)
    if name == "synthetic-cifar":
        return _synthetic(name, (3, 32, 32), 10, synthetic_size, seed)
    if name == "synthetic-har":
        return _synthetic(name, (9, 128), 6, synthetic_size, seed)
    if name == "synthetic-digits":
        return _synthetic(name, (1, 8, 8), 10, synthetic_size, seed)
    raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
