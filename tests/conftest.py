"""Shared fixtures: a tiny model and a throw-away results store, so tests take seconds."""
import labkit  # noqa: F401  (legacy-Keras switch before TensorFlow loads)
import numpy as np
import pytest


@pytest.fixture(scope="session", autouse=True)
def _setup():
    labkit.setup(seed=0)


@pytest.fixture(scope="session")
def splits():
    from labkit.data import load_mnist
    return load_mnist()


@pytest.fixture(scope="session")
def tiny_config():
    from labkit.models import BaselineConfig
    return BaselineConfig(conv_filters=(4, 8), dense_units=16, epochs=1, batch_size=64, train_subset=512)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tiny_config, splits):
    from labkit.models import load_or_train_baseline
    model, _ = load_or_train_baseline(tiny_config, splits, directory=tmp_path_factory.mktemp("tiny"),
                                      progress=False)
    return model


@pytest.fixture
def images(splits):
    return np.ascontiguousarray(splits.x_test[:32])
