"""The combined pipeline, where the techniques meet: thin, prune, cluster, quantize (notebook 07).

The recipe is tfmot's collaborative optimization, preceded by two steps of our own:

1. fold each batch norm into its convolution, so the weights we prune and cluster are the
   weights the .tflite file stores (the converter would otherwise rescale them per channel);
2. thin the network (structured pruning): keep the strongest conv2 filters and dense1 units;
3. prune the remaining weights by magnitude (tfmot ``prune_low_magnitude``), layer by layer as
   the sensitivity analysis allows;
4. cluster them with sparsity preserved (``cluster_weights(..., preserve_sparsity=True)``);
5. quantization-aware training that keeps both the zeros and the clusters
   (``Default8BitClusterPreserveQuantizeScheme(preserve_sparsity=True)``), then a full-integer
   int8 .tflite.

Every stage is cached under artifacts/pipeline/ by a hash of the settings it depends on, so a
re-run, or the build-your-own panel of labkit.widgets, never trains the same thing twice.
``python -m labkit.pipeline`` prints the target figures measured in one run.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import labkit  # noqa: F401  (sets the legacy-Keras switch before TensorFlow loads)
import numpy as np
import pandas as pd

from labkit import ARTIFACTS_DIR

PIPELINE_DIR = ARTIFACTS_DIR / "pipeline"
NOTEBOOK = "07_pipeline"
QUANTIZATION_MODES = ("float32", "ptq-int8", "qat-int8", "pcqat-int8")
TARGETS = {"min_test_accuracy": 0.990, "min_gzip_ratio": 30.0, "min_speedup_p50": 1.5}
WEIGHT_LAYERS = ("conv1", "conv2", "dense1", "logits")


# ----------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class PipelineConfig:
    """Everything that decides the pipeline's weights. Each stage's cache key hashes only the
    settings that stage and the stages before it depend on."""
    conv2_filters: int = 48
    dense_units: int = 96
    thin_epochs: int = 1
    sparsity: tuple = (("conv2", 0.5), ("dense1", 0.9))   # (layer, fraction of zeros)
    prune_epochs: int = 2
    clusters: int = 16
    cluster_layers: tuple = ("conv2", "dense1", "logits")  # conv1 has 288 weights: not worth it
    cluster_epochs: int = 1
    quantization: str = "pcqat-int8"
    qat_epochs: int = 1
    finetune_subset: int | None = None  # images for the prune and cluster fine-tunes (None: all)
    qat_subset: int | None = None       # images for quantization-aware training (None: all)
    learning_rate: float = 5e-4
    batch_size: int = 128
    seed: int = 0

    def __post_init__(self):
        if self.quantization not in QUANTIZATION_MODES:
            raise ValueError(f"quantization must be one of {QUANTIZATION_MODES}, got {self.quantization!r}")
        if not 1 <= self.conv2_filters <= 64 or not 1 <= self.dense_units <= 128:
            raise ValueError("conv2_filters must be in 1..64 and dense_units in 1..128 "
                             f"(the baseline's widths), got {self.conv2_filters} and {self.dense_units}")
        for layer, sparsity in self.sparsity:
            if layer not in WEIGHT_LAYERS or not 0.0 <= sparsity < 1.0:
                raise ValueError(f"sparsity entries are (layer, fraction) with layer in {WEIGHT_LAYERS} "
                                 f"and 0 <= fraction < 1, got ({layer!r}, {sparsity})")
        if self.clusters != 0 and not 2 <= self.clusters <= 256:
            raise ValueError(f"clusters must be 0 (no clustering) or 2..256, got {self.clusters}")
        if set(self.cluster_layers) - set(WEIGHT_LAYERS):
            raise ValueError(f"cluster_layers must be among {WEIGHT_LAYERS}, got {self.cluster_layers}")

    def stage_key(self, stage: str) -> str:
        """Hash of the settings that decide `stage` ('thin', 'pruned', 'clustered' or 'final')."""
        fields = {"thin": ["conv2_filters", "dense_units", "thin_epochs", "learning_rate", "batch_size", "seed"]}
        fields["pruned"] = fields["thin"] + ["sparsity", "prune_epochs", "finetune_subset"]
        fields["clustered"] = fields["pruned"] + ["clusters", "cluster_layers", "cluster_epochs"]
        fields["final"] = fields["clustered"] + ["quantization", "qat_epochs", "qat_subset"]
        if stage not in fields:
            raise ValueError(f"stage must be one of {list(fields)}, got {stage!r}")
        from labkit.models import BaselineConfig, settings_key
        settings = {name: getattr(self, name) for name in fields[stage]}
        settings["baseline"] = BaselineConfig().key()
        return settings_key(settings)

    @property
    def sparsity_of(self) -> dict:
        return dict(self.sparsity)

    def name(self) -> str:
        """A short variant name: widths, sparsities, clusters, quantization."""
        sparsity = "-".join(f"{layer}{round(100 * s)}" for layer, s in self.sparsity) or "dense"
        k = f"k{self.clusters}" if self.clusters else "nok"
        return f"c{self.conv2_filters}-d{self.dense_units}-{sparsity}-{k}-{self.quantization}"


# ----------------------------------------------------------------------------- 1. fold batch norm

def build_plain(conv_filters=(32, 64), dense_units: int = 128, dropout: float = 0.25, seed: int = 0):
    """The baseline's shape without batch norm: each conv has a bias and its own ReLU."""
    import tf_keras as keras
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape=(28, 28, 1), name="image")
    x = inputs
    for i, filters in enumerate(conv_filters, start=1):
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"conv{i}")(x)
        x = keras.layers.MaxPooling2D(name=f"pool{i}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(dense_units, activation="relu", name="dense1")(x)
    x = keras.layers.Dropout(dropout, seed=seed, name="dropout")(x)
    outputs = keras.layers.Dense(10, name="logits")(x)
    return keras.Model(inputs, outputs, name="plain_cnn")


def fold_batchnorm(model):
    """The same function without batch norm, as build_plain's layers (the math: graph.fold_conv_bn)."""
    from labkit.graph import fold_conv_bn
    conv_filters = [model.get_layer(f"conv{i}").filters for i in (1, 2)]
    folded = build_plain(conv_filters, model.get_layer("dense1").units)
    for i in (1, 2):
        kernel = model.get_layer(f"conv{i}").get_weights()[0]   # the baseline's convolutions have no bias
        bn = model.get_layer(f"bn{i}")
        gamma, beta, mean, variance = bn.get_weights()
        folded.get_layer(f"conv{i}").set_weights(
            fold_conv_bn(kernel, np.zeros_like(mean), gamma, beta, mean, variance, bn.epsilon))
    for name in ("dense1", "logits"):
        folded.get_layer(name).set_weights(model.get_layer(name).get_weights())
    return folded


# ----------------------------------------------------------------------------- 2. thin (structured)

def thin(folded, conv2_filters: int, dense_units: int):
    """Keep the `conv2_filters` strongest conv2 filters and `dense_units` strongest dense1 units.

    A unit's strength is the norm of what flows in times the norm of what flows out: a filter
    with large weights that the next layer ignores is as useless as one the next layer needs
    but that never fires.
    """
    kernel2, bias2 = folded.get_layer("conv2").get_weights()
    w1, b1 = folded.get_layer("dense1").get_weights()
    w2, b2 = folded.get_layer("logits").get_weights()
    channels = kernel2.shape[-1]
    w1_by_channel = w1.reshape(-1, channels, w1.shape[1])        # Flatten is (row, col, channel)
    filter_score = np.abs(kernel2).sum(axis=(0, 1, 2)) * np.linalg.norm(w1_by_channel, axis=(0, 2))
    keep_filters = np.sort(np.argsort(-filter_score, kind="stable")[:conv2_filters])
    w1 = w1_by_channel[:, keep_filters, :].reshape(-1, w1.shape[1])
    unit_score = np.linalg.norm(w1, axis=0) * np.linalg.norm(w2, axis=1)
    keep_units = np.sort(np.argsort(-unit_score, kind="stable")[:dense_units])
    model = build_plain((folded.get_layer("conv1").filters, conv2_filters), dense_units)
    model.get_layer("conv1").set_weights(folded.get_layer("conv1").get_weights())
    model.get_layer("conv2").set_weights([kernel2[..., keep_filters], bias2[keep_filters]])
    model.get_layer("dense1").set_weights([w1[:, keep_units], b1[keep_units]])
    model.get_layer("logits").set_weights([w2[keep_units], b2])
    return model


# ----------------------------------------------------------------------------- 3. prune

def magnitude_mask(weights: np.ndarray, sparsity: float) -> np.ndarray:
    """From scratch: keep the round(n * (1 - sparsity)) largest |w| (ties at the threshold kept, as tfmot does)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity is a fraction in [0, 1), got {sparsity}")
    magnitudes = np.abs(weights).ravel()
    keep = max(int(np.round(magnitudes.size * (1.0 - sparsity))), 1)
    threshold = np.sort(magnitudes)[::-1][keep - 1]
    return (np.abs(weights) >= threshold).astype(weights.dtype)


def val_accuracy(model, x, y) -> float:
    """Keras accuracy on a tuning split (validation), in batches of 500."""
    logits = model.predict(x, batch_size=500, verbose=0)
    return float(np.mean(np.argmax(logits, axis=1) == y))


def sensitivity(model, x_val, y_val, layers=("conv2", "dense1", "logits"),
                sparsities=(0.5, 0.7, 0.8, 0.9, 0.95)) -> pd.DataFrame:
    """Validation accuracy when one layer alone is pruned in one shot (no fine-tuning)."""
    from labkit.models import clone_with_weights
    rows = [{"layer": "(none)", "sparsity": 0.0, "val_accuracy": val_accuracy(model, x_val, y_val)}]
    for layer in layers:
        for sparsity in sparsities:
            copy = clone_with_weights(model)
            kernel, *rest = copy.get_layer(layer).get_weights()
            copy.get_layer(layer).set_weights([kernel * magnitude_mask(kernel, sparsity), *rest])
            rows.append({"layer": layer, "sparsity": sparsity,
                         "val_accuracy": val_accuracy(copy, x_val, y_val)})
    table = pd.DataFrame(rows)
    table["drop"] = rows[0]["val_accuracy"] - table["val_accuracy"]
    return table


def _progress_callback(stage: str, steps: int, on_progress):
    """A Keras callback that reports `on_progress(stage, fraction_done)` (the build panel's bar)."""
    import tf_keras as keras

    class Progress(keras.callbacks.Callback):
        done = 0

        def on_train_batch_end(self, batch, logs=None):
            self.done += 1
            if self.done % 10 == 0 or self.done == steps:
                on_progress(stage, self.done / steps)
    return Progress()


def _fit(model, x, y, config: PipelineConfig, epochs: int, learning_rate: float, stage: str,
         callbacks=(), progress=True, on_progress=None):
    from labkit.models import train
    callbacks = list(callbacks)
    if on_progress is not None:
        callbacks.append(_progress_callback(stage, epochs * int(np.ceil(len(x) / config.batch_size)), on_progress))
    return train(model, x, y, epochs=epochs, batch_size=config.batch_size, learning_rate=learning_rate,
                 seed=config.seed, progress=progress, callbacks=callbacks)


def prune(model, sparsity: dict, x, y, config: PipelineConfig, progress=True, on_progress=None):
    """tfmot magnitude pruning, a gradual schedule per layer; returns the stripped (plain Keras) model."""
    import tensorflow_model_optimization as tfmot
    import tf_keras as keras
    from labkit.models import clone_with_weights
    steps = config.prune_epochs * int(np.ceil(len(x) / config.batch_size))

    def wrap(layer):
        if sparsity.get(layer.name, 0.0) <= 0.0:
            return layer
        # Reach the target at 60% of the steps, then let the remaining weights recover.
        schedule = tfmot.sparsity.keras.PolynomialDecay(0.0, sparsity[layer.name], begin_step=0,
                                                        end_step=max(int(0.6 * steps), 1),
                                                        frequency=max(steps // 20, 1))
        return tfmot.sparsity.keras.prune_low_magnitude(layer, pruning_schedule=schedule)

    wrapped = keras.models.clone_model(clone_with_weights(model), clone_function=wrap)
    _fit(wrapped, x, y, config, config.prune_epochs, config.learning_rate, "prune",
         [tfmot.sparsity.keras.UpdatePruningStep()], progress, on_progress)
    return tfmot.sparsity.keras.strip_pruning(wrapped)


# ----------------------------------------------------------------------------- 4. cluster

def cluster(model, clusters: int, layers, x, y, config: PipelineConfig, progress=True, on_progress=None):
    """Sparsity-preserving weight clustering (k-means++ start); returns the stripped model."""
    import tensorflow_model_optimization as tfmot
    import tf_keras as keras
    from labkit.models import clone_with_weights
    init = tfmot.clustering.keras.CentroidInitialization.KMEANS_PLUS_PLUS

    def wrap(layer):
        if layer.name not in layers:
            return layer
        return tfmot.clustering.keras.cluster_weights(layer, number_of_clusters=clusters,
                                                      cluster_centroids_init=init, preserve_sparsity=True)

    wrapped = keras.models.clone_model(clone_with_weights(model), clone_function=wrap)
    # A third of the pruning rate: the centroids only need to settle, not to move far.
    _fit(wrapped, x, y, config, config.cluster_epochs, config.learning_rate / 3, "cluster",
         progress=progress, on_progress=on_progress)
    return tfmot.clustering.keras.strip_clustering(wrapped)


# ----------------------------------------------------------------------------- 5. quantize

def quantize_aware(model, x, y, config: PipelineConfig, preserve: bool = True, progress=True, on_progress=None):
    """QAT; with `preserve`, tfmot's collaborative scheme keeps the zeros and the clusters (PCQAT)."""
    import tensorflow_model_optimization as tfmot
    from tensorflow_model_optimization.python.core.quantization.keras.collab_opts.cluster_preserve import (
        default_8bit_cluster_preserve_quantize_scheme as pcqat)
    from labkit.models import clone_with_weights
    annotated = tfmot.quantization.keras.quantize_annotate_model(clone_with_weights(model))
    with labkit.quiet_stderr():
        if preserve:
            scheme = pcqat.Default8BitClusterPreserveQuantizeScheme(preserve_sparsity=True)
            qat = tfmot.quantization.keras.quantize_apply(annotated, scheme)
        else:
            qat = tfmot.quantization.keras.quantize_apply(annotated)
    _fit(qat, x, y, config, config.qat_epochs, config.learning_rate / 5, "quantize",
         progress=progress, on_progress=on_progress)
    return qat


def to_tflite(model, path: Path, int8: bool = False, calibration=None, sparse_storage: bool = False) -> Path:
    """Float32, or full-integer int8 with int8 input and output.

    The converter wants `calibration` images for any full-integer model; after QAT it keeps the
    ranges learnt in training and uses them only where none were learnt.
    """
    import tensorflow as tf
    from labkit.models import save_tflite
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if int8:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = converter.inference_output_type = tf.int8
        if calibration is not None:
            converter.representative_dataset = lambda: ([image[None]] for image in calibration)
    if sparse_storage:
        converter.optimizations = [*converter.optimizations, tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
    import warnings
    with labkit.quiet_stderr(), warnings.catch_warnings():
        # After QAT the input range is learnt; the converter still warns that none was given.
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs")
        return save_tflite(converter, path)


# ----------------------------------------------------------------------------- the weights in the file

def tflite_weights(path) -> dict:
    """Each CONV_2D / FULLY_CONNECTED weight tensor of a .tflite, read through the LiteRT interpreter.

    Returns {layer: {"values", "scales", "dtype", "op"}} with values laid out as the file stores
    them (output channel first).
    """
    from ai_edge_litert.interpreter import Interpreter
    with labkit.quiet_stderr():
        interpreter = Interpreter(model_path=str(path))
        interpreter.allocate_tensors()
    details = {t["index"]: t for t in interpreter.get_tensor_details()}
    found = {}
    for op in interpreter._get_ops_details():
        if op["op_name"] not in ("CONV_2D", "FULLY_CONNECTED"):
            continue
        tensor = details[op["inputs"][1]]
        if tensor["name"].startswith("sequential") or not len(tensor["shape"]):
            continue
        layer = next((name for name in WEIGHT_LAYERS if name in tensor["name"]), tensor["name"])
        found[layer] = {"values": interpreter.get_tensor(tensor["index"]).copy(),
                        "scales": tensor["quantization_parameters"]["scales"],
                        "dtype": np.dtype(tensor["dtype"]), "op": op["op_name"]}
    return found


def weight_report(path, clusters: int, expected_sparsity: dict | None = None) -> pd.DataFrame:
    """Per layer of a .tflite: dtype, sparsity, unique values per layer and per output channel.

    A Dense kernel is quantized per tensor, so its k centroids stay k int8 values per layer. A
    Conv2D kernel is quantized per output channel (one scale each), so the same centroid becomes
    a different int8 value in each channel: there, at most k values per channel is the claim.
    """
    rows = []
    for layer, w in tflite_weights(path).items():
        values = w["values"].reshape(w["values"].shape[0], -1)
        nonzero_per_channel = [len(np.unique(row[row != 0])) for row in values]
        rows.append({"layer": layer, "op": w["op"], "dtype": str(w["dtype"]), "weights": values.size,
                     "sparsity": 1.0 - np.count_nonzero(values) / values.size,
                     "expected_sparsity": (expected_sparsity or {}).get(layer, 0.0),
                     "scales": len(np.unique(w["scales"])) if len(w["scales"]) else 0,
                     "unique_nonzero_layer": len(np.unique(values[values != 0])),
                     "unique_nonzero_max_per_channel": max(nonzero_per_channel), "clusters": clusters})
    return pd.DataFrame(rows).set_index("layer")


# ----------------------------------------------------------------------------- the whole pipeline

@dataclass
class PipelineRun:
    """The stage artifacts of one configuration: a .tflite per stage and the tuning figures."""
    config: PipelineConfig
    tflite: dict = field(default_factory=dict)      # stage -> path
    models: dict = field(default_factory=dict)      # stage -> Keras model (thin, pruned, clustered)
    val_accuracy: dict = field(default_factory=dict)  # stage -> Keras validation accuracy
    seconds: dict = field(default_factory=dict)       # stage -> training seconds (0 when cached)


def _cached_model(path: Path, build: Callable, meta: dict, run: PipelineRun, stage: str):
    """Load `path` if present, else build, save (atomically) and note the time it took."""
    import time
    from labkit import models
    if (cached := models.load_cached(path, compile=False)) is not None:
        model, record = cached
        run.seconds[stage] = 0.0
        run.val_accuracy[stage] = record["val_accuracy"]
        return model
    start = time.perf_counter()
    model = build()
    run.seconds[stage] = time.perf_counter() - start
    run.val_accuracy[stage] = meta["val_accuracy"](model)
    models.save_cached(model, {"val_accuracy": run.val_accuracy[stage], "seconds": run.seconds[stage],
                               "config": asdict(run.config)}, path)
    return model


def run_pipeline(config: PipelineConfig = PipelineConfig(), splits=None, *, directory: Path = PIPELINE_DIR,
                 baseline=None, progress: bool = True, on_progress=None, until: str = "final") -> PipelineRun:
    """Every stage from the baseline to the final .tflite, each taken from the cache when it is there.

    `on_progress(stage, fraction)` is called during training (the build panel's progress bar);
    `until="thin"` stops after the thinned model (for the sensitivity analysis).
    """
    if until not in ("thin", "final"):
        raise ValueError(f"until must be 'thin' or 'final', got {until!r}")
    import time
    from labkit import models
    if splits is None:
        from labkit.data import load_mnist
        splits = load_mnist()
    directory = Path(directory)
    run = PipelineRun(config)
    x, y = splits.x_train, splits.y_train
    fx, fy = (x, y) if config.finetune_subset is None else (x[:config.finetune_subset], y[:config.finetune_subset])
    meta = {"val_accuracy": lambda m: val_accuracy(m, splits.x_val, splits.y_val)}
    report = on_progress or (lambda stage, fraction: None)

    def build_thin():
        base = baseline if baseline is not None else models.load_or_train_baseline()[0]
        model = thin(fold_batchnorm(base), config.conv2_filters, config.dense_units)
        if config.thin_epochs:
            _fit(model, x, y, config, config.thin_epochs, config.learning_rate, "thin", progress=progress,
                 on_progress=on_progress)
        return model

    thin_model = _cached_model(directory / f"thin-{config.stage_key('thin')}.keras", build_thin, meta, run, "thin")
    report("thin", 1.0)
    run.models["thin"] = thin_model
    if until == "thin":
        return run
    pruned = _cached_model(directory / f"pruned-{config.stage_key('pruned')}.keras",
                           lambda: prune(thin_model, config.sparsity_of, fx, fy, config, progress, on_progress),
                           meta, run, "pruned")
    report("prune", 1.0)
    if config.clusters:
        clustered = _cached_model(directory / f"clustered-{config.stage_key('clustered')}.keras",
                                  lambda: cluster(pruned, config.clusters, config.cluster_layers, fx, fy, config,
                                                  progress, on_progress), meta, run, "clustered")
    else:
        clustered = pruned
    report("cluster", 1.0)
    run.models.update(pruned=pruned, clustered=clustered)
    for stage, model in (("thin", thin_model), ("pruned", pruned), ("clustered", clustered)):
        path = directory / f"{stage}-{config.stage_key(stage)}_float32.tflite"
        if not path.is_file():
            to_tflite(model, path)
        run.tflite[stage] = path

    final = directory / f"final-{config.stage_key('final')}.tflite"
    info_path = final.with_suffix(".json")
    if final.is_file() and info_path.is_file():
        run.seconds["final"] = 0.0
        run.val_accuracy["final"] = json.loads(info_path.read_text())["val_accuracy"]
    else:
        start = time.perf_counter()
        if config.quantization == "float32":
            to_tflite(clustered, final)
        elif config.quantization == "ptq-int8":
            to_tflite(clustered, final, int8=True, calibration=x[:500])
        else:
            qx, qy = (x, y) if config.qat_subset is None else (x[:config.qat_subset], y[:config.qat_subset])
            qat = quantize_aware(clustered, qx, qy, config, preserve=config.quantization == "pcqat-int8",
                                 progress=progress, on_progress=on_progress)
            to_tflite(qat, final, int8=True, calibration=x[:200])
        run.seconds["final"] = time.perf_counter() - start
        from labkit.measure import accuracy, litert
        run.val_accuracy["final"] = accuracy(litert(final), splits.x_val, splits.y_val)
        info_path.write_text(json.dumps({"val_accuracy": run.val_accuracy["final"],
                                         "seconds": run.seconds["final"], "config": asdict(config)},
                                        indent=1, default=list))
    report("quantize", 1.0)
    run.tflite["final"] = final
    return run


def sparse_storage_files(run: PipelineRun, calibration) -> dict:
    """The clustered model as post-training int8, stored dense and in the converter's sparse format.

    EXPERIMENTAL_SPARSITY stores a pruned tensor as its non-zero values plus index arrays; the
    kernels that read it are LiteRT's built-in ones (XNNPACK, the default, refuses such tensors).
    """
    key = run.config.stage_key("clustered")
    paths = {"dense": PIPELINE_DIR / f"ptq-dense-{key}.tflite", "sparse": PIPELINE_DIR / f"ptq-sparse-{key}.tflite"}
    for storage, path in paths.items():
        if not path.is_file():
            to_tflite(run.models["clustered"], path, int8=True, calibration=calibration,
                      sparse_storage=storage == "sparse")
    return paths


# ----------------------------------------------------------------------------- measuring the stages

STAGE_LABELS = {"baseline": "baseline float32", "thin": "1 thinned", "pruned": "2 pruned",
                "clustered": "3 clustered", "final": "4 final"}


def measure_stages(run: PipelineRun, splits, baseline_tflite=None, *, repeats: int = 300,
                   extra: dict | None = None):
    """LiteRT test accuracy, size, gzip size and interleaved batch-1 latency of every stage.

    Returns (table, latency); `extra` adds more {label: .tflite path} to the same timing loop.
    """
    from labkit import measure, models
    paths = {STAGE_LABELS["baseline"]: Path(baseline_tflite or models.baseline_tflite())}
    paths.update({STAGE_LABELS[stage]: Path(p) for stage, p in run.tflite.items()})
    paths.update(extra or {})
    runners = [measure.litert(p, num_threads=1, name=label) for label, p in paths.items()]
    latency = measure.measure_latency(runners, splits.x_val[:200], warmup=20, repeats=repeats)
    base = STAGE_LABELS["baseline"]
    rows = []
    for runner in runners:
        path = paths[runner.name]
        rows.append({"stage": runner.name,
                     "test_accuracy": measure.accuracy(runner, splits.x_test, splits.y_test),
                     "size_bytes": measure.size_bytes(path), "gzip_bytes": measure.gzip_bytes(path),
                     "latency_p50_us": latency.p50(runner.name), "latency_p95_us": latency.p95(runner.name),
                     "artifact": str(path)})
    table = pd.DataFrame(rows).set_index("stage")
    table["gzip_ratio"] = table.loc[base, "gzip_bytes"] / table["gzip_bytes"]
    table["speedup_p50"] = table.loc[base, "latency_p50_us"] / table["latency_p50_us"]
    return table, latency


def targets_met(table: pd.DataFrame, final: str = STAGE_LABELS["final"]) -> dict:
    """The issue's three targets for the final stage: measured figure, target, met?"""
    row = table.loc[final]
    measured = {"min_test_accuracy": row["test_accuracy"], "min_gzip_ratio": row["gzip_ratio"],
                "min_speedup_p50": row["speedup_p50"]}
    return {name: {"measured": float(measured[name]), "target": target, "met": bool(measured[name] >= target)}
            for name, target in TARGETS.items()}


STAGES_CSV = PIPELINE_DIR / "stages.csv"  # the last measured stage table, for the book report


def record(table: pd.DataFrame, latency, names: dict, stages_csv: Path = STAGES_CSV, results_path=None) -> pd.DataFrame:
    """Store the rows of `table` whose stage is in `names` ({stage label: variant name}).

    The whole stage table, timed interleaved in one loop, is also kept in `stages_csv` so that
    the book report compares the final model with the baseline from the same timing loop.
    """
    from labkit import measure, results
    rows = [results.make_row(variant, "pipeline", NOTEBOOK, accuracy=float(table.loc[stage, "test_accuracy"]),
                             latency=latency, runner_name=stage, artifact=table.loc[stage, "artifact"])
            for stage, variant in names.items()]
    kept = table.drop(columns=["artifact"]).assign(variant=pd.Series(names), machine=measure.machine_string())
    Path(stages_csv).parent.mkdir(parents=True, exist_ok=True)
    kept.to_csv(stages_csv)
    return results.upsert(rows) if results_path is None else results.upsert(rows, results_path)


def variant_names(config: PipelineConfig) -> dict:
    """Results-store names of the stages of one configuration."""
    c = config
    thin_name = f"pipeline-thin-c{c.conv2_filters}-d{c.dense_units}"
    sparsity = "-".join(f"{layer}{round(100 * s)}" for layer, s in c.sparsity)
    return {STAGE_LABELS["thin"]: thin_name,
            STAGE_LABELS["pruned"]: f"{thin_name}-pruned-{sparsity}",
            STAGE_LABELS["clustered"]: f"{thin_name}-pruned-{sparsity}-k{c.clusters}",
            STAGE_LABELS["final"]: f"pipeline-{c.name()}"}


# ----------------------------------------------------------------------------- build your own (widgets)

CUSTOM_SUBSET = 10_000  # images per fine-tune of a build-your-own variant: under a minute on 2 cores


def custom_config(sparsity: float, clusters: int, quantization: str, base: PipelineConfig = PipelineConfig()):
    """The build panel's recipe: the thinned model of `base`, then one uniform sparsity for conv2
    and dense1, `clusters` (0: none) and a quantization mode, each fine-tune one epoch on a subset."""
    sparsity = round(float(sparsity), 2)
    if not 0.0 <= sparsity <= 0.97:
        raise ValueError(f"sparsity must be between 0 and 0.97, got {sparsity}")
    return replace(base, sparsity=(("conv2", sparsity), ("dense1", sparsity)), clusters=int(clusters),
                   quantization=quantization, prune_epochs=1, cluster_epochs=1, qat_epochs=1,
                   finetune_subset=CUSTOM_SUBSET, qat_subset=CUSTOM_SUBSET)


def build_and_measure(config: PipelineConfig, splits=None, *, on_progress=None, directory: Path = PIPELINE_DIR,
                      repeats: int = 200) -> dict:
    """Build one configuration (stages from the cache where possible) and measure its final .tflite.

    Latency is timed interleaved with the baseline float32 .tflite; returns the results-store row.
    """
    from labkit import measure, models, results
    if splits is None:
        from labkit.data import load_mnist
        splits = load_mnist()
    run = run_pipeline(config, splits, directory=directory, progress=False, on_progress=on_progress)
    variant = f"pipeline-custom-{config.name()}"
    runner = measure.litert(run.tflite["final"], num_threads=1, name=variant)
    reference = measure.litert(models.baseline_tflite(), num_threads=1, name="baseline float32")
    latency = measure.measure_latency([runner, reference], splits.x_val[:100], warmup=10, repeats=repeats)
    return results.make_row(variant, "pipeline", NOTEBOOK, latency=latency, runner_name=variant,
                            accuracy=measure.accuracy(runner, splits.x_test, splits.y_test),
                            artifact=run.tflite["final"])


# ----------------------------------------------------------------------------- the Pareto frontier

OBJECTIVES = (("accuracy", "max"), ("latency_p50_us", "min"), ("gzip_bytes", "min"))


def pareto_front(table: pd.DataFrame, objectives=OBJECTIVES) -> pd.Series:
    """True for each row that no other row dominates (rows missing an objective are False).

    Row a dominates row b when a is at least as good on every objective and strictly better on
    one. A row equal to another on every objective is kept (neither dominates).
    """
    for column, sense in objectives:
        if sense not in ("max", "min"):
            raise ValueError(f"objective sense must be 'max' or 'min', got {sense!r} for {column}")
        if column not in table.columns:
            raise ValueError(f"no column {column!r} in the table; columns are {list(table.columns)}")
    columns = [column for column, _ in objectives]
    complete = table[columns].notna().all(axis=1)
    # Turn every objective into "smaller is better".
    values = np.stack([(-1 if sense == "max" else 1) * table.loc[complete, column].astype(float).to_numpy()
                       for column, sense in objectives], axis=1)
    at_least_as_good = (values[:, None, :] <= values[None, :, :]).all(axis=2)  # [a, b]: a <= b everywhere
    strictly_better = (values[:, None, :] < values[None, :, :]).any(axis=2)
    dominated = (at_least_as_good & strictly_better).any(axis=0)
    front = pd.Series(False, index=table.index)
    front[complete[complete].index] = ~dominated
    return front


def pareto_plot(table: pd.DataFrame, x: str = "latency_p50_us", y: str = "accuracy", size: str = "gzip_bytes",
                techniques=None, highlight: str | None = None, ylim=None, ax=None):
    """Every variant of the store, one colour per technique, the Pareto frontier ringed and numbered.

    The frontier is computed over all three objectives (accuracy, latency, gzip size) and over
    the whole table, so a ringed point can look beaten in this two-axis view: it wins on the
    third axis. `ylim` zooms in; the title says how many variants the zoom leaves out.
    """
    import matplotlib.pyplot as plt
    from labkit.results import TECHNIQUES
    table = table.copy()
    table["pareto"] = pareto_front(table)
    if techniques is not None:
        table = table[table["technique"].isin(list(techniques))]
    table = table.dropna(subset=[x, y])
    if ax is None:
        fig, ax = plt.subplots(figsize=(11, 5.5))
    else:
        fig = ax.figure
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    lines = []
    if not table.empty:
        sizes = table[size].astype(float) if size in table else pd.Series(0.0, index=table.index)
        scale = max(float(sizes.max()), 1.0) if sizes.notna().any() else 1.0
        for technique, group in table.groupby("technique"):
            colour = colours[TECHNIQUES.index(technique) % len(colours)] if technique in TECHNIQUES else None
            ax.scatter(group[x], group[y], s=25 + 400 * sizes[group.index].fillna(0) / scale, alpha=0.6,
                       label=technique, color=colour)
        front = table[table["pareto"]].sort_values(x)
        ax.scatter(front[x], front[y], s=160, facecolors="none", edgecolors="black", linewidths=1.5,
                   label="Pareto frontier")
        for number, (_, row) in enumerate(front.iterrows(), start=1):
            ax.annotate(str(number), (row[x], row[y]), fontsize=8, weight="bold", xytext=(5, 4),
                        textcoords="offset points")
            lines.append(f"{number:>2}  {row['variant']}")
        if highlight is not None and highlight in set(table["variant"]):
            row = table[table["variant"] == highlight].iloc[0]
            ax.scatter([row[x]], [row[y]], s=300, marker="*", color="red", label=f"selected: {highlight}")
        ax.legend(fontsize=8, loc="lower left", bbox_to_anchor=(1.01, 0.0), borderaxespad=0)
    ax.text(1.01, 1.0, "Pareto frontier\n" + "\n".join(lines), transform=ax.transAxes, va="top",
            fontsize=7, family="monospace")
    spans_decades = ("latency_p50_us", "latency_p95_us", "size_bytes", "gzip_bytes", "throughput_ips")
    if x in spans_decades:
        ax.set_xscale("log")
    if y in spans_decades:
        ax.set_yscale("log")
    title = f"Every variant in the results store (marker area: {size})"
    if ylim is not None:
        ax.set_ylim(*ylim)
        low, high = ax.get_ylim()
        hidden = int(((table[y] < low) | (table[y] > high)).sum())
        title += f"; {hidden} outside this view" if hidden else ""
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def report_figures(table: pd.DataFrame | None = None, stages_csv: Path = STAGES_CSV):
    """For the book report: (Pareto figure, targets table, stage table), or None for a missing part.

    The figure plots the whole results store, zoomed to accuracies of 98% and up. The two tables
    come from the stage table notebook 07 last measured (all stages timed in one interleaved loop):
    `targets` has one row per target (figure, measured, target, met), `stages` one row per stage.
    """
    from labkit import results
    table = results.load() if table is None else table
    figure = pareto_plot(table, ylim=(0.98, None)) if len(table) else None
    if not Path(stages_csv).is_file():
        return figure, None, None
    stages = pd.read_csv(stages_csv, index_col="stage")
    if STAGE_LABELS["final"] not in stages.index or STAGE_LABELS["baseline"] not in stages.index:
        return figure, None, stages
    targets = (pd.DataFrame(targets_met(stages)).T.astype({"measured": float, "target": float, "met": bool})
               .rename_axis("figure").reset_index())
    return figure, targets, stages


# ----------------------------------------------------------------------------- benchmark

def benchmark(config: PipelineConfig = PipelineConfig(), repeats: int = 500) -> pd.DataFrame:
    """Build (or load) the pipeline and print the three target figures, measured in one run."""
    from labkit.data import load_mnist
    from labkit.measure import machine_string
    splits = load_mnist()
    run = run_pipeline(config, splits)
    table, _ = measure_stages(run, splits, repeats=repeats)
    shown = table.drop(columns=["artifact"])
    print(f"machine: {machine_string()}")
    print(shown.round(4).to_string())
    for name, figure in targets_met(table).items():
        print(f"{name:>18}: measured {figure['measured']:.4f}, target {figure['target']}, "
              f"{'met' if figure['met'] else 'MISSED'}")
    return table


if __name__ == "__main__":
    labkit.setup(seed=0)
    benchmark()
