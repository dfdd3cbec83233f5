"""MNIST from data/mnist.npz, checked and split once for the whole book.

The training set is split into train and a fixed validation part: every tuning decision
(sensitivity, calibration, settings) uses validation; the test set is for final figures only.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from labkit import DATA_DIR
from labkit.files import sha256_of

MNIST_PATH = DATA_DIR / "mnist.npz"
MNIST_SHA256 = "06af5dfe73b70e3bc1c36439982b18a8d76803db9b544f6fdf838a37fbb01b64"
EXPECTED_SHAPES = {
    "x_train": ((60000, 28, 28), np.uint8),
    "y_train": ((60000,), np.uint8),
    "x_test": ((10000, 28, 28), np.uint8),
    "y_test": ((10000,), np.uint8),
}
VALIDATION_SIZE = 5000
SPLIT_SEED = 0  # fixed on purpose: every notebook and every machine gets the same validation set

RESTORE_HINT = ("Restore it with `git checkout -- data/mnist.npz` from the repository root "
                "(the book never downloads data).")


class DataError(RuntimeError):
    """The MNIST file is missing, damaged or not the file the book expects."""


@dataclass(frozen=True)
class Splits:
    """Images as float32 in [0, 1] with shape (n, 28, 28, 1); labels as int64."""
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    def __repr__(self) -> str:
        return (f"Splits(train={len(self.x_train)}, val={len(self.x_val)}, "
                f"test={len(self.x_test)}, image_shape={self.x_train.shape[1:]})")


def read_mnist_arrays(path: Path = MNIST_PATH, sha256: str | None = MNIST_SHA256) -> dict:
    """Read the raw uint8 arrays after checking the file's checksum (skip it with sha256=None)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"MNIST file not found: {path}. {RESTORE_HINT}")
    if sha256 is not None:
        actual = sha256_of(path)
        if actual != sha256:
            raise DataError(f"MNIST file {path} is corrupt: sha256 {actual[:16]}... "
                            f"does not match the expected {sha256[:16]}.... {RESTORE_HINT}")
    try:
        with np.load(path) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except Exception as error:  # a truncated or non-npz file
        raise DataError(f"MNIST file {path} cannot be read as .npz ({error}). "
                        f"{RESTORE_HINT}") from None
    for key, (shape, dtype) in EXPECTED_SHAPES.items():
        if key not in arrays:
            raise DataError(f"MNIST file {path} has no array '{key}'. {RESTORE_HINT}")
        if arrays[key].shape != shape or arrays[key].dtype != dtype:
            raise DataError(f"MNIST file {path}: '{key}' has shape {arrays[key].shape} and dtype "
                            f"{arrays[key].dtype}, expected {shape} {np.dtype(dtype)}. "
                            f"{RESTORE_HINT}")
    return arrays


_CACHE: dict = {}


def load_mnist(path: Path = MNIST_PATH, validation_size: int = VALIDATION_SIZE,
               sha256: str | None = MNIST_SHA256) -> Splits:
    """Checked MNIST as train / validation / test splits, pixels scaled to [0, 1]."""
    if not 0 < validation_size < 60000:
        raise ValueError(f"validation_size must be between 1 and 59999, got {validation_size}")
    key = (str(Path(path).resolve()), validation_size, sha256)
    if key not in _CACHE:
        raw = read_mnist_arrays(path, sha256)
        order = np.random.default_rng(SPLIT_SEED).permutation(len(raw["x_train"]))
        val_idx, train_idx = order[:validation_size], order[validation_size:]

        # Read-only, since every caller shares these arrays.
        def images(x):
            out = (x.astype(np.float32) / 255.0)[..., np.newaxis]
            out.setflags(write=False)
            return out

        def labels(y):
            out = y.astype(np.int64)
            out.setflags(write=False)
            return out

        _CACHE[key] = Splits(
            x_train=images(raw["x_train"][train_idx]), y_train=labels(raw["y_train"][train_idx]),
            x_val=images(raw["x_train"][val_idx]), y_val=labels(raw["y_train"][val_idx]),
            x_test=images(raw["x_test"]), y_test=labels(raw["y_test"]))
    return _CACHE[key]
