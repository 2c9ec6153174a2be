"""Dataset readers on files in the real on-disk formats (written here, tiny)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from accept_mqtt.model.data import DatasetError, load_dataset


def test_cifar10_python_batches(tmp_path: Path) -> None:
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                 b"labels": list(rng.integers(0, 10, 4))}
        with open(root / name, "wb") as f:
            pickle.dump(batch, f)
    ds = load_dataset("cifar10", path=tmp_path)
    assert ds.train_x.shape == (20, 3, 32, 32) and ds.test_x.shape == (4, 3, 32, 32)
    assert ds.num_classes == 10 and ds.train_y.dtype.is_floating_point is False
    with pytest.raises(DatasetError, match="missing"):
        load_dataset("cifar10", path=tmp_path / "nowhere")


def test_uci_har_text_files(tmp_path: Path) -> None:
    root = tmp_path / "UCI HAR Dataset"
    rng = np.random.default_rng(0)
    for part, n in (("train", 6), ("test", 3)):
        sig = root / part / "Inertial Signals"
        sig.mkdir(parents=True)
        for s in ("body_acc", "body_gyro", "total_acc"):
            for axis in "xyz":
                np.savetxt(sig / f"{s}_{axis}_{part}.txt", rng.normal(size=(n, 128)))
        np.savetxt(root / part / f"y_{part}.txt", rng.integers(1, 7, n), fmt="%d")
    ds = load_dataset("har", path=tmp_path)
    assert ds.train_x.shape == (6, 9, 128) and ds.test_x.shape == (3, 9, 128)
    assert int(ds.train_y.min()) >= 0 and int(ds.train_y.max()) <= 5  # 1..6 on disk
    with pytest.raises(DatasetError, match="give --data-path"):
        load_dataset("har")


def test_digits_and_synthetic_are_reproducible() -> None:
    a, b = load_dataset("digits", seed=3), load_dataset("digits", seed=3)
    assert a.train_x.equal(b.train_x) and len(a.train_x) + len(a.test_x) == 1797
    s = load_dataset("synthetic-har", seed=1, synthetic_size=100)
    assert s.input_shape == (9, 128) and s.num_classes == 6
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset("imagenet")


def _idx(path: Path, arr: np.ndarray, gz: bool = True) -> None:
    import gzip

    head = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    raw = head + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def test_fashion_mnist_idx_files(tmp_path: Path) -> None:
    """The upstream IDX layout, gzipped as Debian ships it or plain; bad files name the path."""
    rng = np.random.default_rng(0)
    for part, n in (("train", 6), ("t10k", 3)):
        _idx(tmp_path / f"{part}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _idx(tmp_path / f"{part}-labels-idx1-ubyte", rng.integers(0, 10, n), gz=False)
    ds = load_dataset("fashion-mnist", path=tmp_path)
    assert ds.train_x.shape == (6, 1, 28, 28) and ds.test_x.shape == (3, 1, 28, 28)
    assert ds.num_classes == 10 and abs(float(ds.train_x.mean())) < 1e-5  # standardised
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte\[\.gz\] not found in "
                                           + str(tmp_path / "nowhere")):
        load_dataset("fashion-mnist", path=tmp_path / "nowhere")
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\0\0\x08\x01\0\0\0\x09" + bytes(3))
    with pytest.raises(DatasetError, match="the header says .9,. .9 bytes. but 3 bytes"):
        load_dataset("fashion-mnist", path=tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"<html>not found</html>")
    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte is not an IDX file"):
        load_dataset("fashion-mnist", path=tmp_path)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b truncated")
    with pytest.raises(DatasetError, match="cannot read .*train-images-idx3-ubyte.gz"):
        load_dataset("fashion-mnist", path=tmp_path)


def test_fashion_mnist_as_debian_installs_it() -> None:
    """`make setup` installs dataset-fashion-mnist; the zoo's fashion-cnn takes its images."""
    from accept_mqtt.model.data import FASHION_MNIST_DIR
    from accept_mqtt.model.zoo import build_model

    assert FASHION_MNIST_DIR.is_dir(), "run 'make setup' (apt-get install dataset-fashion-mnist)"
    ds = load_dataset("fashion-mnist")
    assert (len(ds.train_x), len(ds.test_x)) == (60000, 10000)
    assert sorted(ds.train_y.unique().tolist()) == list(range(10))
    model = build_model("fashion-cnn", seed=0)
    assert model.input_shape == ds.input_shape
    assert tuple(model.sequential()(ds.test_x[:2]).shape) == (2, 10)
