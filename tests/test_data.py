import numpy as np
import pytest

from labkit import data


def test_load_mnist_splits_are_checked_scaled_and_disjoint(splits):
    assert len(splits.x_train) == 55000 and len(splits.x_val) == 5000
    assert len(splits.x_test) == 10000
    assert splits.x_train.shape[1:] == (28, 28, 1) and splits.x_train.dtype == np.float32
    assert 0.0 == splits.x_train.min() and splits.x_train.max() == 1.0
    # the canonical set: mean pixel 0.1307 over all 60,000 training images
    pixels = np.concatenate([splits.x_train, splits.x_val])
    assert abs(pixels.mean() - 0.1307) < 5e-4
    assert np.bincount(splits.y_test).tolist() == [980, 1135, 1032, 1010, 982, 892, 958,
                                                   1028, 974, 1009]
    raw = data.read_mnist_arrays()
    val_rows = {row.tobytes() for row in (splits.x_val[:200] * 255).round().astype(np.uint8)}
    train_rows = {row.tobytes() for row in (splits.x_train * 255).round().astype(np.uint8)}
    # MNIST has a few duplicate images; the split itself is disjoint
    assert len(val_rows & train_rows) <= 1
    assert raw["y_test"][:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


def test_validation_split_is_fixed():
    first = data.load_mnist()
    data._CACHE.clear()
    second = data.load_mnist()
    assert np.array_equal(first.y_val, second.y_val) and np.array_equal(first.x_val[:50],
                                                                        second.x_val[:50])


def test_arrays_are_read_only(splits):
    with pytest.raises(ValueError):
        splits.x_train[0, 0, 0, 0] = 1.0


def test_missing_file_names_path_and_fix(tmp_path):
    missing = tmp_path / "mnist.npz"
    with pytest.raises(data.DataError, match="not found") as error:
        data.load_mnist(missing)
    assert str(missing) in str(error.value) and "git checkout" in str(error.value)


def test_corrupt_file_fails_checksum(tmp_path):
    corrupt = tmp_path / "mnist.npz"
    blob = bytearray(data.MNIST_PATH.read_bytes())
    blob[5000] ^= 0xFF
    corrupt.write_bytes(bytes(blob))
    with pytest.raises(data.DataError, match="corrupt") as error:
        data.load_mnist(corrupt)
    assert str(corrupt) in str(error.value)


def test_wrong_shapes_are_rejected(tmp_path):
    wrong = tmp_path / "mnist.npz"
    np.savez(wrong, x_train=np.zeros((100, 28, 28), np.uint8), y_train=np.zeros(100, np.uint8),
             x_test=np.zeros((10, 28, 28), np.uint8), y_test=np.zeros(10, np.uint8))
    with pytest.raises(data.DataError, match="shape"):
        data.load_mnist(wrong, sha256=None)


def test_not_an_npz_file(tmp_path):
    junk = tmp_path / "mnist.npz"
    junk.write_text("not numpy")
    with pytest.raises(data.DataError, match="cannot be read"):
        data.load_mnist(junk, sha256=None)


def test_bad_validation_size():
    with pytest.raises(ValueError, match="validation_size"):
        data.load_mnist(validation_size=0)
