"""Shared fixtures: tiny models, the data, and throw-away stores, so tests take seconds."""
import numpy as np
import pytest

import labkit  # noqa: F401  (legacy-Keras switch before TensorFlow loads)

TINY_IMAGES = 512   # training images for the tiny models: enough to beat chance clearly, in seconds


@pytest.fixture(scope="session", autouse=True)
def _setup():
    labkit.setup(seed=0)


@pytest.fixture(autouse=True)
def _fresh_accuracy_memo(tmp_path, monkeypatch):
    """Each test counts its own accuracies: measure.accuracy keeps a .tflite file's on disk."""
    from labkit import measure
    monkeypatch.setattr(measure, "ACCURACY_DIR", tmp_path / "accuracy")


@pytest.fixture(scope="session")
def splits():
    from labkit.data import load_mnist
    return load_mnist()


@pytest.fixture(scope="session")
def tiny_config():
    from labkit.models import BaselineConfig
    return BaselineConfig(conv_filters=(4, 8), dense_units=16, epochs=1, batch_size=64,
                          train_subset=TINY_IMAGES)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tiny_config, splits):
    """The baseline's shape (conv + batch norm), 4 and 8 filters, 16 dense units, one epoch on
    512 images."""
    from labkit.models import load_or_train_baseline
    model, _ = load_or_train_baseline(tiny_config, splits,
                                      directory=tmp_path_factory.mktemp("tiny"),
                                      progress=False)
    return model


@pytest.fixture(scope="session")
def tiny_bn_model(tiny_model):
    """A copy of tiny_model whose batch norms are far from the identity they start at, so that
    folding them, or zeroing a filter before them, visibly matters."""
    from labkit import models
    model = models.clone_with_weights(tiny_model)
    rng = np.random.default_rng(0)
    for name in ("bn1", "bn2"):
        layer = model.get_layer(name)
        channels = layer.get_weights()[0].shape[0]
        layer.set_weights([rng.uniform(0.5, 1.5, channels), rng.normal(0, 0.5, channels),
                           rng.normal(0, 0.5, channels), rng.uniform(0.5, 2.0, channels)])
    return model


@pytest.fixture(scope="session")
def tiny_plain_model(splits):
    """models.build_cnn((4, 8), 16, batchnorm=False) trained like tiny_model: conv layers with
    bias."""
    from labkit import models
    model = models.build_cnn((4, 8), 16, batchnorm=False, name="tiny_plain")
    models.train(model, splits.x_train[:TINY_IMAGES], splits.y_train[:TINY_IMAGES],
                 models.TrainSettings(epochs=1, batch_size=64, learning_rate=2e-3), progress=False)
    return model


@pytest.fixture(scope="session")
def three_files():
    """convert(model, directory) -> {"float32", "int8", "float16": path}: the model as plain,
    full-int8 (20 random calibration images) and float16 .tflite files (float16 widens its weights
    with a DEQUANTIZE of a constant, as the int4 weight-only file does)."""
    import tensorflow as tf

    from labkit import models

    def convert(model, directory) -> dict:
        paths = {"float32": models.save_tflite(model, directory / "float32.tflite")}
        calibration = np.random.default_rng(0).random((20, 28, 28, 1), dtype=np.float32)
        for name in ("int8", "float16"):
            converter = tf.lite.TFLiteConverter.from_keras_model(model)
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            if name == "int8":
                converter.representative_dataset = lambda: ([x[None]] for x in calibration)
                converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
                converter.inference_input_type = converter.inference_output_type = tf.int8
            else:
                converter.target_spec.supported_types = [tf.float16]
            paths[name] = models.save_tflite(converter, directory / f"{name}.tflite")
        return paths
    return convert


@pytest.fixture
def images(splits):
    return np.ascontiguousarray(splits.x_test[:32])


@pytest.fixture
def results_path(tmp_path, monkeypatch):
    """A throw-away results store that every results.load / upsert without a path uses."""
    from labkit import results
    path = tmp_path / "results" / "measurements.csv"
    monkeypatch.setattr(results, "RESULTS_PATH", path)
    return path


@pytest.fixture
def artifacts_dir(tmp_path):
    path = tmp_path / "artifacts"
    path.mkdir()
    return path


def pytest_collection_modifyitems(config, items):
    """Tests marked after_notebooks run last, once the notebooks (collected after tests/) have
    cached their models."""
    later = [item for item in items if item.get_closest_marker("after_notebooks")]
    items[:] = [item for item in items if not item.get_closest_marker("after_notebooks")] + later
