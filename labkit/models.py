"""The baseline CNN: build, train deterministically, cache, export (notebook 01 and after).

Trained models are cached under artifacts/ keyed by their configuration, so a restarted
kernel or a later notebook reuses them; a missing cache is rebuilt with the same seed.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import labkit  # sets the legacy-Keras switch before TensorFlow loads
import numpy as np
import tensorflow as tf
import tf_keras as keras

from labkit import ARTIFACTS_DIR


@dataclass(frozen=True)
class BaselineConfig:
    """Everything that decides the baseline's weights; its hash names the cache entry."""
    conv_filters: tuple = (32, 64)   # one Conv+BN+ReLU+MaxPool block per entry
    dense_units: int = 128
    dropout: float = 0.25
    epochs: int = 5
    batch_size: int = 128
    learning_rate: float = 2e-3
    seed: int = 0
    train_subset: int | None = None  # tests train on a few images; the book uses them all

    def key(self) -> str:
        return settings_key(asdict(self))


def build_baseline(config: BaselineConfig = BaselineConfig()) -> keras.Model:
    """Conv+BatchNorm+ReLU blocks, then a dense head; logits out (no softmax)."""
    if not config.conv_filters or any(f < 1 for f in config.conv_filters):
        raise ValueError(f"conv_filters must be positive counts, got {config.conv_filters}")
    keras.utils.set_random_seed(config.seed)
    inputs = keras.Input(shape=(28, 28, 1), name="image")
    x = inputs
    for i, filters in enumerate(config.conv_filters, start=1):
        # No conv bias: the batch norm that follows has its own shift (folded in notebook 05).
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
        x = keras.layers.ReLU(name=f"relu{i}")(x)
        x = keras.layers.MaxPooling2D(name=f"pool{i}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(config.dense_units, activation="relu", name="dense1")(x)
    x = keras.layers.Dropout(config.dropout, seed=config.seed, name="dropout")(x)
    outputs = keras.layers.Dense(10, name="logits")(x)
    return keras.Model(inputs, outputs, name="baseline_cnn")


def compile_for_training(model: keras.Model, learning_rate, decay_steps: int | None = None,
                         loss=None, metrics=None) -> keras.Model:
    """Adam, by default on logits against labels; with decay_steps, the rate follows a cosine to 0."""
    if decay_steps:
        learning_rate = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss=loss or keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=metrics or ["accuracy"])
    return model


class TqdmCallback(keras.callbacks.Callback):
    """One progress bar over all training steps, with loss and accuracy."""

    def __init__(self, total_steps: int, description: str = "training"):
        super().__init__()
        self.total_steps, self.description = total_steps, description

    def on_train_begin(self, logs=None):
        self.bar = labkit.progress_bar(total=self.total_steps, desc=self.description, unit="step")

    def on_train_batch_end(self, batch, logs=None):
        if batch % 20 == 0 and logs:   # shown at the bar's next (throttled) redraw
            self.bar.set_postfix(loss=f"{logs['loss']:.3f}", acc=f"{logs['accuracy']:.3f}", refresh=False)
        self.bar.update(1)

    def on_train_end(self, logs=None):
        self.bar.close()


def train(model: keras.Model, x, y, *, epochs: int, batch_size: int, learning_rate: float,
          seed: int = 0, x_val=None, y_val=None, progress: bool = True,
          callbacks: list | None = None, cosine_decay: bool = True, loss=None, metrics=None,
          description: str = "training") -> dict:
    """Deterministic fit (fixed seeds, op determinism); returns the history (floats) and the time taken.

    `loss` and `metrics` replace cross-entropy on logits and accuracy (distillation passes its own).
    """
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    steps = epochs * int(np.ceil(len(x) / batch_size))
    compile_for_training(model, learning_rate, decay_steps=steps if cosine_decay else None,
                         loss=loss, metrics=metrics)
    callbacks = list(callbacks or [])
    if progress:
        callbacks.append(TqdmCallback(steps, description))
    validation = (x_val, y_val) if x_val is not None else None
    start = time.perf_counter()
    history = model.fit(x, y, epochs=epochs, batch_size=batch_size, shuffle=True,
                        validation_data=validation, callbacks=callbacks, verbose=0)
    return {"history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
            "train_seconds": time.perf_counter() - start}


def model_path(name: str, config: BaselineConfig, directory: Path = ARTIFACTS_DIR) -> Path:
    return Path(directory) / f"{name}-{config.key()}.keras"


def load_or_train_baseline(config: BaselineConfig = BaselineConfig(), splits=None, *,
                           directory: Path = ARTIFACTS_DIR, progress: bool = True):
    """The trained baseline and its training record, from the cache or trained now."""
    path = model_path("baseline", config, directory)
    if (cached := load_cached(path)) is not None:
        return cached
    if splits is None:
        from labkit.data import load_mnist
        splits = load_mnist()
    x, y = splits.x_train[:config.train_subset], splits.y_train[:config.train_subset]   # None: all
    model = build_baseline(config)
    fit = train(model, x, y, epochs=config.epochs, batch_size=config.batch_size,
                learning_rate=config.learning_rate, seed=config.seed,
                x_val=splits.x_val, y_val=splits.y_val, progress=progress)
    record = {"config": asdict(config), "train_seconds": fit["train_seconds"],
              "history": fit["history"],
              "tensorflow": tf.__version__, "trained_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    save_cached(model, record, path)
    return model, record


def _json_value(value):
    """NumPy scalars and arrays (and other iterables) in a cache record, as JSON values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    try:
        return list(value)
    except TypeError:
        raise TypeError(f"a cache record holds a {type(value).__name__}, which JSON cannot store") from None


def settings_key(settings) -> str:
    """Ten hex digits that name a cache entry: a hash of its settings as JSON with sorted keys."""
    def key_value(value):
        try:
            return _json_value(value)
        except TypeError:
            return str(value)
    blob = json.dumps(settings, sort_keys=True, default=key_value)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def save_cached(model: keras.Model, record: dict, path: Path) -> None:
    """Save a model and its JSON record into the cache (notebooks 01-08).

    The model goes to a temporary name first, so an interrupted save never leaves half a model;
    the record is written last, and a cache entry counts only when both files exist.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.keras")
    model.save(tmp)
    tmp.replace(path)
    path.with_suffix(".json").write_text(json.dumps(record, indent=1, default=_json_value))


def load_cached(path: Path, compile: bool = True):
    """(model, record) from a cache entry that save_cached completed, or None."""
    path = Path(path)
    record_path = path.with_suffix(".json")
    if path.is_file() and record_path.is_file():
        return keras.models.load_model(path, compile=compile), json.loads(record_path.read_text())
    return None


def clone_with_weights(model: keras.Model) -> keras.Model:
    """A fresh copy with the same weights: tfmot wrappers reuse layers, so never hand them the baseline."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def save_tflite(model_or_converter, path: Path) -> Path:
    """Convert a Keras model (float32, no optimizations) or a ready converter to a .tflite file."""
    if isinstance(model_or_converter, keras.Model):
        converter = tf.lite.TFLiteConverter.from_keras_model(model_or_converter)
    else:
        converter = model_or_converter
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(converter.convert())
    return path


def export_baseline(model: keras.Model, config: BaselineConfig = BaselineConfig(),
                    directory: Path = ARTIFACTS_DIR) -> dict:
    """The baseline as .keras, SavedModel and float32 .tflite files (each written once)."""
    keras_path = model_path("baseline", config, directory)
    paths = {"keras": keras_path,
             "savedmodel": keras_path.with_name(keras_path.stem + "_savedmodel"),
             "tflite": keras_path.with_name(keras_path.stem + "_float32.tflite")}
    if not keras_path.is_file():
        keras_path.parent.mkdir(parents=True, exist_ok=True)
        model.save(keras_path)
    if not (paths["savedmodel"] / "saved_model.pb").is_file():
        tf.saved_model.save(model, str(paths["savedmodel"]))
    if not paths["tflite"].is_file():
        save_tflite(model, paths["tflite"])
    return paths


def baseline_tflite(config: BaselineConfig = BaselineConfig()) -> Path:
    """Path of the baseline's float32 .tflite, trained and exported first if need be (notebooks 02-08)."""
    model, _ = load_or_train_baseline(config)
    return export_baseline(model, config)["tflite"]
