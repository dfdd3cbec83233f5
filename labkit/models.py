"""Models, the spine's part: the baseline and everything every chapter after it builds on.

Owns: the one CNN builder (`build_cnn`, with or without batch norm), deterministic training
(`train`, `TrainSettings`) and the one fine-tune plan (`FineTune`, `fine_tune`), listing weight
layers and kernels, the one model cache (`cached`: keyed by the settings *and* the input model's
weights), the one .tflite writer (`save_tflite`), and the baseline: trained once, cached, exported.
Technique modules build on these; this module knows no technique.
"""
from __future__ import annotations

import json
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

import labkit  # sets the legacy-Keras switch before TensorFlow loads
from labkit import ARTIFACTS_DIR, files
from labkit.data import load_mnist

tf = labkit.import_tensorflow_quietly(start_runtime=False)
import tf_keras as keras  # noqa: E402


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


def build_cnn(conv_filters=(32, 64), dense_units: int = 128, *, batchnorm: bool = True,
              dropout: float = 0.25, seed: int = 0, name: str = "cnn") -> keras.Model:
    """The book's one CNN: a conv block per entry of `conv_filters`, then a dense head; logits out.

    With batch norm a block is conv{i} (no bias: the norm has its own shift) -> bn{i} -> relu{i}
    -> pool{i}; without it, conv{i} carries a bias and its ReLU -> pool{i}. The head is flatten
    -> dense1 (ReLU) -> dropout (when dropout > 0) -> logits (10 units, no softmax).
    """
    if not conv_filters or any(int(f) < 1 for f in conv_filters) or int(dense_units) < 1:
        raise ValueError(f"conv_filters and dense_units must be positive counts, got "
                         f"{conv_filters} and {dense_units}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout is a fraction in [0, 1), got {dropout}")
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape=(28, 28, 1), name="image")
    x = inputs
    for i, filters in enumerate(conv_filters, start=1):
        if batchnorm:
            x = keras.layers.Conv2D(int(filters), 3, padding="same", use_bias=False,
                                    name=f"conv{i}")(x)
            x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
            x = keras.layers.ReLU(name=f"relu{i}")(x)
        else:
            x = keras.layers.Conv2D(int(filters), 3, padding="same", activation="relu",
                                    name=f"conv{i}")(x)
        x = keras.layers.MaxPooling2D(name=f"pool{i}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(int(dense_units), activation="relu", name="dense1")(x)
    if dropout > 0:
        x = keras.layers.Dropout(dropout, seed=seed, name="dropout")(x)
    outputs = keras.layers.Dense(10, name="logits")(x)
    return keras.Model(inputs, outputs, name=name)


def build_baseline(config: BaselineConfig = BaselineConfig()) -> keras.Model:
    """The baseline: Conv+BatchNorm+ReLU blocks, then a dense head."""
    return build_cnn(config.conv_filters, config.dense_units, batchnorm=True,
                     dropout=config.dropout, seed=config.seed, name="baseline_cnn")


def compile_for_training(model: keras.Model, learning_rate, decay_steps: int | None = None,
                         loss=None, metrics=None) -> keras.Model:
    """Adam, by default on logits against labels; with decay_steps the rate follows a cosine
    to 0."""
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
            self.bar.set_postfix(loss=f"{logs['loss']:.3f}", acc=f"{logs['accuracy']:.3f}",
                                 refresh=False)
        self.bar.update(1)

    def on_train_end(self, logs=None):
        self.bar.close()


@dataclass(frozen=True)
class TrainSettings:
    """How `train` fits: epochs, batch size, the starting rate and the seed; with cosine_decay
    the rate follows a cosine from `learning_rate` to 0 over all steps."""
    epochs: int
    batch_size: int
    learning_rate: float
    seed: int = 0
    cosine_decay: bool = True

    @classmethod
    def of(cls, config) -> "TrainSettings":
        """The settings of any config that has epochs, batch_size, learning_rate and seed (the
        baseline's, a fine-tune plan, a student's), with a cosine decay."""
        return cls(config.epochs, config.batch_size, config.learning_rate, config.seed)


def train(model: keras.Model, x, y, settings: TrainSettings, *, validation=None,
          progress: bool = True, callbacks: list | None = None, loss=None, metrics=None,
          description: str = "training") -> dict:
    """Deterministic fit (fixed seeds, op determinism); returns the history (floats) and the time.

    `validation` is (x_val, y_val) or None. `loss` and `metrics` replace cross-entropy on logits
    and accuracy (distillation passes its own).
    """
    keras.utils.set_random_seed(settings.seed)
    tf.config.experimental.enable_op_determinism()
    steps = settings.epochs * int(np.ceil(len(x) / settings.batch_size))
    compile_for_training(model, settings.learning_rate,
                         decay_steps=steps if settings.cosine_decay else None,
                         loss=loss, metrics=metrics)
    callbacks = list(callbacks or [])
    if progress:
        callbacks.append(TqdmCallback(steps, description))
    start = time.perf_counter()
    history = model.fit(x, y, epochs=settings.epochs, batch_size=settings.batch_size, shuffle=True,
                        validation_data=validation, callbacks=callbacks, verbose=0)
    return {"history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
            "train_seconds": time.perf_counter() - start}


@dataclass(frozen=True)
class FineTune:
    """The one training plan for a fine-tune (pruning, clustering, QAT, low rank, search).

    `train_subset` takes the first images of the training split (None: all 55,000); the rate
    follows a cosine from `learning_rate` to 0 over all steps.
    """
    train_subset: int | None = None
    epochs: int = 1
    batch_size: int = 128
    learning_rate: float = 5e-4
    seed: int = 0

    def __post_init__(self):
        if self.train_subset is not None and self.train_subset < 1:
            raise ValueError("train_subset is a number of images (or None: all), "
                             f"got {self.train_subset}")
        if self.epochs < 1 or self.batch_size < 1 or not self.learning_rate > 0:
            raise ValueError("epochs and batch_size must be at least 1 and learning_rate positive, "
                             f"got {self.epochs}, {self.batch_size}, {self.learning_rate}")

    def subset(self, x, y):
        return x[:self.train_subset], y[:self.train_subset]   # None: all

    def steps(self, n_images: int) -> int:
        n = n_images if self.train_subset is None else min(n_images, self.train_subset)
        return self.epochs * int(np.ceil(n / self.batch_size))

    def training(self) -> TrainSettings:
        """The plan as `train` takes it (a cosine from learning_rate to 0)."""
        return TrainSettings.of(self)


def fine_tune(model: keras.Model, splits, plan: FineTune = FineTune(), *, callbacks=(),
              progress: bool = True, validation: bool = False,
              description: str = "fine-tune") -> dict:
    """Train `model` (plain or tfmot-wrapped) by `plan` on the training split; the run's record."""
    x, y = plan.subset(splits.x_train, splits.y_train)
    fit = train(model, x, y, plan.training(),
                validation=(splits.x_val, splits.y_val) if validation else None,
                progress=progress, callbacks=list(callbacks), description=description)
    return {**fit, "plan": asdict(plan)}


def progress_callback(stage: str, steps: int, on_progress) -> keras.callbacks.Callback:
    """A Keras callback that reports `on_progress(stage, fraction_done)` (a widget's bar)."""
    class Progress(keras.callbacks.Callback):
        done = 0

        def on_train_batch_end(self, batch, logs=None):
            self.done += 1
            if self.done % 10 == 0 or self.done == steps:
                on_progress(stage, min(self.done / max(steps, 1), 1.0))
    return Progress()


# ----------------------------------------------------------------------------- layers and kernels

def _unwrap(layer):
    """The Keras layer inside tfmot wrappers (pruning, clustering, QAT), or the layer itself."""
    while hasattr(layer, "layer"):
        layer = layer.layer
    return layer


WEIGHT_LAYER_TYPES = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)


def weight_layers(model: keras.Model, min_weights: int = 0) -> list[str]:
    """Names of the Conv2D, DepthwiseConv2D and Dense layers with >= min_weights kernel entries.

    Through tfmot wrappers: a pruning or QAT wrapper around conv2 is listed as conv2.
    """
    names = []
    for wrapper in model.layers:
        layer = _unwrap(wrapper)
        if (isinstance(layer, WEIGHT_LAYER_TYPES)
                and int(np.prod(_kernel_variable(layer).shape)) >= min_weights):
            names.append(layer.name)
    return names


def _kernel_variable(layer):
    depthwise = isinstance(layer, keras.layers.DepthwiseConv2D)
    return layer.depthwise_kernel if depthwise else layer.kernel


def kernel(model: keras.Model, name: str) -> np.ndarray:
    """The kernel of layer `name` as a NumPy array (the layer's name, or its tfmot wrapper's)."""
    found = [w for w in model.layers if w.name == name or _unwrap(w).name == name]
    if not found:
        raise ValueError(f"no layer named {name!r}; the weight layers are {weight_layers(model)}")
    wrapper, layer = found[0], _unwrap(found[0])
    if not isinstance(layer, WEIGHT_LAYER_TYPES):
        raise ValueError(f"layer {name!r} is a {type(layer).__name__}, which has no kernel; "
                         f"the weight layers are {weight_layers(model)}")
    variable = _kernel_variable(layer)
    if not hasattr(variable, "numpy"):   # a QAT wrapper swaps the kernel for its quantized tensor
        depthwise = isinstance(layer, keras.layers.DepthwiseConv2D)
        suffix = "/depthwise_kernel:0" if depthwise else "/kernel:0"
        variable = next(v for v in wrapper.weights if v.name.endswith(suffix))
    return variable.numpy()


def model_path(name: str, config: BaselineConfig, directory: Path = ARTIFACTS_DIR) -> Path:
    return Path(directory) / f"{name}-{config.key()}.keras"


def load_or_train_baseline(config: BaselineConfig = BaselineConfig(), splits=None, *,
                           directory: Path = ARTIFACTS_DIR, progress: bool = True):
    """The trained baseline and its training record, from the cache or trained now."""
    path = model_path("baseline", config, directory)
    if (cached := load_cached(path)) is not None:
        return cached
    if splits is None:
        splits = load_mnist()
    x, y = splits.x_train[:config.train_subset], splits.y_train[:config.train_subset]   # None: all
    model = build_baseline(config)
    settings = TrainSettings.of(config)
    fit = train(model, x, y, settings, validation=(splits.x_val, splits.y_val), progress=progress)
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
        raise TypeError(f"a cache record holds a {type(value).__name__}, "
                        "which JSON cannot store") from None


def settings_key(settings) -> str:
    """Ten hex digits that name a cache entry: a hash of its settings as JSON with sorted keys."""
    def key_value(value):
        try:
            return _json_value(value)
        except TypeError:
            return str(value)
    return files.content_key(json.dumps(settings, sort_keys=True, default=key_value))


def save_cached(model: keras.Model, record: dict, path: Path) -> None:
    """Save a model and its JSON record into the cache, each written whole or not at all.

    The record is written last: a cache entry counts only when both files exist.
    """
    files.write_atomic(path, model.save)
    files.write_json(Path(path).with_suffix(".json"), record, default=_json_value)


def load_cached(path: Path, compile: bool = True):
    """(model, record) from a cache entry that save_cached completed, or None."""
    path = Path(path)
    record_path = path.with_suffix(".json")
    if path.is_file() and record_path.is_file():
        return keras.models.load_model(path, compile=compile), json.loads(record_path.read_text())
    return None


def clone_with_weights(model: keras.Model) -> keras.Model:
    """A fresh copy with the same weights: tfmot wrappers reuse layers, so never give them the
    baseline itself."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def weights_key(obj) -> str:
    """Ten hex digits naming what a cache entry was built from: a model's weights, a file's bytes.

    Two models with the same settings but different weights get different keys, so a cache never
    hands back an artifact built from another model. A str that is not a file is hashed as it is.
    """
    if isinstance(obj, keras.Model):
        return files.content_key(*obj.get_weights())
    if isinstance(obj, Path) or (isinstance(obj, str) and Path(obj).is_file()):
        return files.content_key(Path(obj).read_bytes())
    if isinstance(obj, str):
        return files.content_key(obj)
    raise TypeError(f"a cache input is a Keras model, a file path or a string, "
                    f"got {type(obj).__name__}")


@dataclass(frozen=True)
class Store:
    """How the cache keeps one kind of artifact: its file suffix, `save(artifact, path)` and
    `load(path)`. A tfmot QAT model, which does not load back from .keras, stores its weights."""
    suffix: str
    save: Callable
    load: Callable


KERAS_STORE = Store(".keras", lambda model, path: model.save(path),
                    lambda path: keras.models.load_model(path, compile=False))
TFLITE_STORE = Store(".tflite", lambda source, path: save_tflite(source, path), lambda path: path)
STORES = {"keras": KERAS_STORE, "tflite": TFLITE_STORE}


def cached(name: str, settings: dict, inputs, build, directory: Path, *, kind="keras"):
    """The one cache: (artifact, record) from `directory`, or built now and stored.

    The key hashes `settings` and the weights of every input model (or the bytes of every input
    file), so a change to either builds a new entry. `build()` returns (artifact, record). `kind`
    is "keras" (a Keras model, <name>-<key>.keras), "tflite" (a Keras model, a TFLiteConverter or
    bytes, stored as <name>-<key>.tflite and returned as its path) or a `Store` of your own. The
    record is saved beside it as <name>-<key>.json, written last: an entry counts only when both
    files exist.
    """
    store = STORES.get(kind) if isinstance(kind, str) else kind
    if not isinstance(store, Store):
        raise ValueError(f"kind must be 'keras', 'tflite' or a models.Store, got {kind!r}")
    inputs = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    input_keys = [weights_key(i) for i in inputs]
    key = settings_key({"settings": settings, "inputs": input_keys})
    path = Path(directory) / f"{name}-{key}{store.suffix}"
    record_path = Path(directory) / f"{name}-{key}.json"
    if path.exists() and record_path.is_file():
        return store.load(path), {**json.loads(record_path.read_text()), "cached": True}
    start = time.perf_counter()
    artifact, record = build()
    record = {**(record or {}), "settings": settings, "inputs": input_keys}
    files.write_atomic(path, lambda tmp: store.save(artifact, tmp))   # a converter converts here
    record["build_seconds"] = time.perf_counter() - start
    files.write_json(record_path, record, default=_json_value)
    stored = path if store is TFLITE_STORE else artifact
    return stored, {**record, "cached": False}


@contextmanager
def converter_messages(what: str):
    """Keep the TFLite converter's C++ log lines out of sight, unless the block fails.

    On failure the last lines it printed (usually naming the op or setting it could not handle)
    are attached to a RuntimeError that says `what` failed.
    """
    with tempfile.TemporaryFile() as log, warnings.catch_warnings():
        # int8 input without "quantized input stats" is expected: the ranges come from
        # calibration or from quantization-aware training
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs")
        try:
            with labkit.redirect_stderr(log):
                yield
        except Exception as error:
            log.seek(0)
            lines = log.read().decode(errors="replace").strip().splitlines()
            raise RuntimeError(f"{what} failed: {error}\nThe converter said:\n"
                               + "\n".join(lines[-40:])) from error


def save_tflite(source, path: Path) -> Path:
    """The one .tflite writer: a Keras model (plain float32), a ready TFLiteConverter, or bytes.

    The file appears whole or not at all (written under a temporary name, then renamed). The
    converter's C++ log lines are kept out of the notebook, but when a conversion fails they are
    attached to the error, since they usually say which op or setting it could not handle.
    """
    if isinstance(source, keras.Model):
        source = tf.lite.TFLiteConverter.from_keras_model(source)
    if isinstance(source, (bytes, bytearray)):
        content = bytes(source)
    elif hasattr(source, "convert"):
        with converter_messages(f"the TFLite conversion for {path}"):
            content = source.convert()
    else:
        raise TypeError(f"save_tflite takes a Keras model, a TFLiteConverter or bytes, "
                        f"got {type(source).__name__}")
    return files.write_atomic(path, lambda tmp: tmp.write_bytes(content))


def export_baseline(model: keras.Model, config: BaselineConfig = BaselineConfig(),
                    directory: Path = ARTIFACTS_DIR) -> dict:
    """The baseline as .keras, SavedModel and float32 .tflite files (each written once)."""
    keras_path = model_path("baseline", config, directory)
    paths = {"keras": keras_path,
             "savedmodel": keras_path.with_name(keras_path.stem + "_savedmodel"),
             "tflite": keras_path.with_name(keras_path.stem + "_float32.tflite")}
    if not keras_path.is_file():
        files.write_atomic(keras_path, model.save)
    if not (paths["savedmodel"] / "saved_model.pb").is_file():
        files.write_atomic(paths["savedmodel"], lambda tmp: tf.saved_model.save(model, str(tmp)))
    if not paths["tflite"].is_file():
        save_tflite(model, paths["tflite"])
    return paths


def baseline_tflite(config: BaselineConfig = BaselineConfig()) -> Path:
    """Path of the baseline's float32 .tflite, trained and exported first if need be."""
    model, _ = load_or_train_baseline(config)
    return export_baseline(model, config)["tflite"]
