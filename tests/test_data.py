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
