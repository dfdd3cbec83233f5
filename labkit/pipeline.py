"""The combined pipeline, where the techniques meet: fold, thin, prune, cluster, quantize.

Each stage is a function from the previous stage's `Artifact` (a Keras model and its .tflite) to
its own, calling the module that owns the technique (folding, structured, pruning, clustering,
quantization, litert_quant), cached by `models.cached` on its settings and its input's weights.
The rest is naming (`STAGES`, `QUANTIZATION`, `variant_names`), the codebook-against-folding
comparison (`codebooks_and_folding`) and reporting (`weight_report`, `measure_stages`, `record`).
"""
from __future__ import annotations

import gzip
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

import labkit  # sets the legacy-Keras switch before TensorFlow loads

labkit.import_tensorflow_quietly(start_runtime=False)  # no C++ start-up lines
import tensorflow_model_optimization as tfmot  # noqa: E402
import tf_keras as keras  # noqa: E402

from labkit import (  # noqa: E402
    ARTIFACTS_DIR,
    clustering,
    files,
    folding,
    litert_quant,
    machine,
    measure,
    models,
    plots,
    pruning,
    quantization,
    results,
    structured,
    tflite,
)
from labkit.data import load_mnist  # noqa: E402

PIPELINE_DIR = ARTIFACTS_DIR / "pipeline"
NOTEBOOK = "07_pipeline"
STAGES = ("fold", "thin", "prune", "cluster", "quantize")  # cache names, rows, variants, progress
# The final stage's modes, in quantization's words: its PTQ modes, then "<QAT scheme>-int8"; and
# "int4-weights", LiteRT's own quantizer (labkit.litert_quant) on the clustered float .tflite.
QUANTIZATION = ("float32", "int8", "qat-int8", "pcqat-int8", "int4-weights")
INT4_MAX_DROP = 0.001  # "int4-weights": int4 for a layer that alone costs at most this val accuracy
# The final stage against the baseline, minimums. Accuracy is a validation figure, as every choice
# of the pipeline is made on validation; the test split gives the final report.
TARGETS = {"val_accuracy": 0.985, "gzip_ratio": 30.0, "speedup_p50": 1.5}
WEIGHT_LAYERS = ("conv1", "conv2", "dense1", "logits")
PRUNE_RAMP = 0.6  # the sparsity reaches its target at 60% of the steps; the survivors then recover


# ----------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class PipelineConfig:
    """Everything that decides the pipeline's weights. A stage's cache key hashes its own
    settings (`stage_settings`) and the weights of the model the stage before it produced."""
    conv2_filters: int = 48
    dense_units: int = 96
    thin_epochs: int = 1
    sparsity: tuple = (("conv2", 0.5), ("dense1", 0.9))   # (layer, fraction of zeros)
    prune_epochs: int = 1
    clusters: int = 16
    cluster_layers: tuple = ("conv2", "dense1", "logits")  # conv1 has 288 weights: not worth it
    cluster_epochs: int = 1
    quantization: str = "pcqat-int8"
    qat_epochs: int = 1
    finetune_subset: int | None = 27_500  # images for the prune and cluster fine-tunes (None: all)
    qat_subset: int | None = 27_500     # images for quantization-aware training (None: all)
    learning_rate: float = 5e-4
    batch_size: int = 128
    seed: int = 0

    def __post_init__(self):
        if self.quantization not in QUANTIZATION:
            raise ValueError(f"quantization must be one of {QUANTIZATION}, "
                             f"got {self.quantization!r}")
        if not 1 <= self.conv2_filters <= 64 or not 1 <= self.dense_units <= 128:
            raise ValueError("conv2_filters must be in 1..64 and dense_units in 1..128 (the "
                             f"baseline's widths), got {self.conv2_filters} and {self.dense_units}")
        for layer, sparsity in self.sparsity:
            if layer not in WEIGHT_LAYERS or not 0.0 <= sparsity < 1.0:
                raise ValueError(f"sparsity entries are (layer, fraction) with layer in "
                                 f"{WEIGHT_LAYERS} and 0 <= fraction < 1, "
                                 f"got ({layer!r}, {sparsity})")
        if self.clusters != 0 and not 2 <= self.clusters <= 256:
            raise ValueError(f"clusters must be 0 (no clustering) or 2..256, got {self.clusters}")
        if set(self.cluster_layers) - set(WEIGHT_LAYERS):
            raise ValueError(f"cluster_layers must be among {WEIGHT_LAYERS}, "
                             f"got {self.cluster_layers}")

    @property
    def sparsity_of(self) -> dict:
        return {layer: s for layer, s in self.sparsity if s > 0}

    def plan(self, stage: str):
        """The stage's `models.FineTune` (None: no training). Clustering fine-tunes at a third of
        the rate (the centroids only need to settle) and QAT at a fifth."""
        epochs, subset, rate = {
            "thin": (self.thin_epochs, None, 1.0),
            "prune": (self.prune_epochs, self.finetune_subset, 1.0),
            "cluster": (self.cluster_epochs, self.finetune_subset, 1 / 3),
            "quantize": (self.qat_epochs if "qat" in self.quantization else 0, self.qat_subset,
                         1 / 5)}.get(_check_stage(stage), (0, None, 1.0))
        if not epochs:
            return None
        return models.FineTune(train_subset=subset, epochs=epochs, batch_size=self.batch_size,
                               learning_rate=self.learning_rate * rate, seed=self.seed)

    def stage_settings(self, stage: str) -> dict:
        """The settings `stage` itself depends on (its input model's weights cover the rest)."""
        own = {"fold": {},
               "thin": {"conv2_filters": self.conv2_filters, "dense_units": self.dense_units},
               "prune": {"sparsity": self.sparsity_of, "ramp": PRUNE_RAMP},
               "cluster": {"clusters": self.clusters, "layers": self.cluster_layers,
                           "preserve_sparsity": True},
               "quantize": {"quantization": self.quantization}}[_check_stage(stage)]
        plan = self.plan(stage)
        return {**own, "plan": asdict(plan) if plan else None}

    def name(self) -> str:
        """A short variant name: widths, sparsities, clusters, quantization."""
        return "-".join(_name_parts(self))


def _check_stage(stage: str) -> str:
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    return stage


def _name_parts(config: PipelineConfig) -> list:
    """What thin, prune, cluster and quantize add to a variant's name, in that order."""
    sparsity = "-".join(f"{layer}{round(100 * s)}" for layer, s in config.sparsity) or "dense"
    return [f"c{config.conv2_filters}-d{config.dense_units}", sparsity,
            f"k{config.clusters}" if config.clusters else "nok", config.quantization]


def variant_names(config: PipelineConfig) -> dict:
    """Results-store names of the stages of one configuration: pipeline-<stage>-<what it set>."""
    parts = _name_parts(config)
    return {stage: "-".join(["pipeline", stage, *parts[:i]]) for i, stage in enumerate(STAGES)}


# ----------------------------------------------------------------------------- the stages

@dataclass(frozen=True)
class Artifact:
    """What a stage hands the next: its Keras model (None after quantize), .tflite and record."""
    model: object
    tflite: Path | None
    record: dict


@dataclass(frozen=True)
class Context:
    """What every stage reads besides its input: the settings, the data, the cache, the progress."""
    config: PipelineConfig
    splits: object
    directory: Path
    progress: bool = True
    on_progress: Callable | None = None   # on_progress(stage, fraction): the build panel's bar

    def callbacks(self, stage: str) -> tuple:
        """The Keras callbacks that report `stage`'s training to `on_progress`."""
        plan = self.config.plan(stage)
        if self.on_progress is None or plan is None:
            return ()
        steps = plan.steps(len(self.splits.x_train))
        return (models.progress_callback(stage, steps, self.on_progress),)


def val_accuracy(model, splits) -> float:
    """Accuracy of a Keras model on the validation split (the tuning split: never the test one)."""
    return measure.accuracy(measure.tf_function(model), splits.x_val, splits.y_val)


def _litert_val_accuracy(path, splits) -> float:
    return measure.accuracy(measure.litert(path), splits.x_val, splits.y_val)


def _keras_stage(stage: str, previous: Artifact, context: Context, build) -> Artifact:
    """`build(model) -> (model, record)` on the previous stage's model, cached with its validation
    accuracy by its settings and its input's weights, and its float32 .tflite (cached too)."""
    def scored():
        model, record = build(previous.model)
        return model, {**record, "val_accuracy": val_accuracy(model, context.splits)}
    model, record = models.cached(stage, context.config.stage_settings(stage), [previous.model],
                                  scored, context.directory)
    path, _ = models.cached(f"{stage}-float32", {}, [model], lambda: (model, {}),
                            context.directory, kind="tflite")
    return Artifact(model, Path(path), record)


def fold(previous: Artifact, context: Context) -> Artifact:
    """`folding.fold_batchnorm`: the weights we prune and cluster are then those the .tflite
    stores (the converter would otherwise rescale them per channel)."""
    return _keras_stage("fold", previous, context,
                        lambda model: (folding.fold_batchnorm(model), {}))


def thin(previous: Artifact, context: Context) -> Artifact:
    """`structured.thin(score="io")`: keep the strongest conv2 filters and dense1 units, then
    fine-tune."""
    c = context.config
    settings = structured.ThinSettings({"conv2": c.conv2_filters, "dense1": c.dense_units},
                                       c.plan("thin"), score="io")
    return _keras_stage("thin", previous, context, lambda model: structured.thin(
        model, settings, context.splits, progress=context.progress,
        callbacks=context.callbacks("thin")))


def prune(previous: Artifact, context: Context) -> Artifact:
    """`pruning.prune`: magnitude pruning per layer, as the sensitivity analysis allows, reaching
    the target at PRUNE_RAMP of the steps (no sparsity: the model passes unchanged)."""
    c = context.config

    def build(model):
        if not c.sparsity_of:
            return model, {}
        plan = c.plan("prune")
        settings = pruning.PruneSettings(
            c.sparsity_of, plan, schedule="polynomial", ramp=PRUNE_RAMP,
            frequency=max(plan.steps(len(context.splits.x_train)) // 20, 1))
        return pruning.prune(model, settings, context.splits, progress=context.progress,
                             callbacks=context.callbacks("prune"))
    return _keras_stage("prune", previous, context, build)


def cluster(previous: Artifact, context: Context) -> Artifact:
    """`clustering.cluster` with sparsity preserved (0 clusters: the model passes unchanged)."""
    c = context.config

    def build(model):
        if not c.clusters:
            return model, {}
        settings = clustering.ClusterSettings(c.clusters, c.plan("cluster"),
                                              layers=c.cluster_layers, init="kmeans++",
                                              preserve_sparsity=True)
        return clustering.cluster(model, settings, context.splits, progress=context.progress,
                                  callbacks=context.callbacks("cluster"))
    return _keras_stage("cluster", previous, context, build)


def quantize(previous: Artifact, context: Context) -> Artifact:
    """The final .tflite: `quantization.converter` (after `quantization.qat` for "qat-int8" and
    "pcqat-int8", which keeps both the zeros and the clusters), or for "int4-weights" LiteRT's own
    quantizer on the previous stage's float .tflite (`int4_weights`)."""
    if context.config.quantization == "int4-weights":
        return int4_weights(previous, context)
    path, record = models.cached("quantize", context.config.stage_settings("quantize"),
                                 [previous.model], lambda: _convert(previous.model, context),
                                 context.directory, kind="tflite")
    return Artifact(None, Path(path),
                    {**record, "val_accuracy": _litert_val_accuracy(path, context.splits)})


def _convert(model, context: Context):
    """(converter, record): post-training in a quantization.MODES mode, or after QAT."""
    c, splits = context.config, context.splits
    if c.quantization in quantization.MODES:
        calibration = splits.x_train[:500] if c.quantization == "int8" else None
        return quantization.converter(model, c.quantization, calibration), {}
    scheme = c.quantization.removesuffix("-int8")
    qat_model, record = quantization.qat(model, splits, c.plan("quantize"), scheme=scheme,
                                         directory=context.directory, name=f"quantize-{scheme}",
                                         progress=context.progress,
                                         callbacks=context.callbacks("quantize"))
    return quantization.converter(qat_model, "int8"), record  # QAT set the ranges: no calibration


def int4_weights(previous: Artifact, context: Context) -> Artifact:
    """`litert_quant.tolerant_recipe` on the previous stage's float .tflite: int4 weights for the
    layers whose validation accuracy tolerates it, int8 for the rest (the tool caches its files)."""
    start, splits, directory = time.perf_counter(), context.splits, context.directory
    recipe, layers = litert_quant.tolerant_recipe(previous.tflite, splits.x_val, splits.y_val,
                                                  INT4_MAX_DROP,
                                                  directory=directory / "int4-trials")
    path = litert_quant.quantize(previous.tflite, recipe, name="quantize", directory=directory)
    return Artifact(None, Path(path), {
        "recipe": recipe.name, "int4_layers": layers.reset_index().to_dict("records"),
        "val_accuracy": _litert_val_accuracy(path, splits), "cached": False,
        "build_seconds": time.perf_counter() - start})


STEPS = dict(zip(STAGES, (fold, thin, prune, cluster, quantize)))   # stage -> its function


# ----------------------------------------------------------------------------- the whole pipeline

@dataclass
class PipelineRun:
    """The stage artifacts of one configuration: Keras models, a .tflite per stage, figures."""
    config: PipelineConfig
    models: dict = field(default_factory=dict)        # stage -> Keras model (fold .. cluster)
    tflite: dict = field(default_factory=dict)        # stage -> .tflite (float32 but the last)
    val_accuracy: dict = field(default_factory=dict)  # stage -> validation accuracy
    seconds: dict = field(default_factory=dict)       # stage -> build seconds (0 when cached)
    records: dict = field(default_factory=dict)       # stage -> the cache record

    def add(self, stage: str, artifact: Artifact) -> None:
        if artifact.model is not None:
            self.models[stage] = artifact.model
        self.tflite[stage], self.records[stage] = Path(artifact.tflite), artifact.record
        self.val_accuracy[stage] = artifact.record["val_accuracy"]
        cached = artifact.record.get("cached")
        self.seconds[stage] = 0.0 if cached else artifact.record["build_seconds"]


def run_pipeline(config: PipelineConfig = PipelineConfig(), splits=None, *,
                 directory: Path = PIPELINE_DIR, baseline=None, progress: bool = True,
                 on_progress=None, until: str = "quantize") -> PipelineRun:
    """Every stage from the baseline to the final .tflite, each from the cache when it is there.

    `on_progress(stage, fraction)` is called during training (the build panel's progress bar);
    `until` stops after that stage (the sensitivity analysis stops after "thin").
    """
    stages = STAGES[:STAGES.index(_check_stage(until)) + 1]
    splits = load_mnist() if splits is None else splits
    if baseline is None:
        baseline, _ = models.load_or_train_baseline(splits=splits)
    context = Context(config, splits, Path(directory), progress, on_progress)
    run, artifact = PipelineRun(config), Artifact(baseline, None, {})
    for stage in stages:
        artifact = STEPS[stage](artifact, context)
        run.add(stage, artifact)
        if on_progress is not None:
            on_progress(stage, 1.0)
    return run


def sparse_storage_files(run: PipelineRun, calibration, directory: Path = PIPELINE_DIR) -> dict:
    """The clustered model as post-training int8, stored dense and in the converter's sparse format.

    EXPERIMENTAL_SPARSITY stores a pruned tensor as its non-zero values plus index arrays; the
    kernels that read it are LiteRT's built-in ones (XNNPACK, the default, refuses such tensors).
    """
    return {storage: quantization.export(run.models["cluster"], "int8", calibration,
                                         name=f"quantize-{storage}", directory=directory,
                                         sparse=storage == "sparse")
            for storage in ("dense", "sparse")}


# ------------------------------------------------------------------------- codebooks and folding

def _one_shot_cluster(model, layer: str, k: int, per_channel: bool):
    """`layer` of a copy of `model` clustered once by tfmot (k-means++ start, no fine-tune), and
    whether tfmot wrapped the layer at all (it skips, with a warning only, what it finds small)."""
    base = models.clone_with_weights(model)

    def wrap(found):
        if found.name != layer:
            return found
        return tfmot.clustering.keras.cluster_weights(
            found, number_of_clusters=int(k), cluster_per_channel=per_channel,
            cluster_centroids_init=tfmot.clustering.keras.CentroidInitialization.KMEANS_PLUS_PLUS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the skip is reported in the table, not as a warning
        wrapped = keras.models.clone_model(base, clone_function=wrap)
    clustered = any(type(found).__name__ == "ClusterWeights" for found in wrapped.layers)  # tfmot's
    return clustering.strip(wrapped), clustered


def _with_zero_bias(model, layer: str):
    """A copy of `model` whose `layer` (a Conv2D without bias) gets a zero bias: same function."""
    def clone(found):
        config = found.get_config()
        return found.__class__.from_config({**config, "use_bias": True} if found.name == layer
                                           else config)
    copy = keras.models.clone_model(model, clone_function=clone)
    for old, new in zip(model.layers, copy.layers):
        weights = old.get_weights()
        if old.name == layer and len(weights) == 1:
            weights.append(np.zeros(weights[0].shape[-1], np.float32))
        new.set_weights(weights)
    return copy


def _kernel_row(name: str, kernel, reference, k: int, per_channel: bool, wrapped: bool) -> dict:
    """What one recipe did to the folded kernel: distinct values, codebook floats, error, gzip."""
    columns = kernel.reshape(-1, kernel.shape[-1])
    return {"recipe": name, "clustered": wrapped,
            "values_per_channel_max": max(len(np.unique(columns[:, j]))
                                          for j in range(columns.shape[1])),
            "values_in_layer": len(np.unique(kernel)),
            "codebook_floats": (k * kernel.shape[-1] if per_channel else k) if wrapped else 0,
            "relative_error": float(np.linalg.norm(kernel - reference)
                                    / np.linalg.norm(reference)),
            "kernel_gzip_bytes": len(gzip.compress(kernel.astype(np.float32).tobytes(), 9))}


def codebooks_and_folding(baseline, splits, k: int = 16, layer: str = "conv2") -> pd.DataFrame:
    """Batch-norm folding against a conv layer's codebook.

    `layer` is clustered to k values in one shot, per layer (the book) or per output channel
    (tfmot's own remedy, `cluster_per_channel=True`), before or after `folding.fold_batchnorm`, and
    each result is read on the folded kernel: distinct values per channel and in the layer, the
    codebook's floats, the relative error against the folded baseline's kernel, the gzip size of
    the float32 kernel and the model's validation accuracy (no fine-tuning: the errors show raw).
    tfmot counts a Conv2D's channels by its last trainable weight, the bias: a conv without a bias
    (every conv a batch norm follows) looks like one weight per channel, so tfmot skips it with a
    warning only. The `clustered` column says so; one row gives the conv a bias of zeros first.
    """
    folded = folding.fold_batchnorm(baseline)
    reference = models.kernel(folded, layer)
    recipes = (("cluster per layer, then fold", baseline, False, True),
               ("fold, then cluster per layer (the book)", folded, False, False),
               ("cluster per channel, then fold", baseline, True, True),
               ("zero bias, cluster per channel, then fold", _with_zero_bias(baseline, layer), True,
                True),
               ("fold, then cluster per channel", folded, True, False))
    rows = []
    for name, model, per_channel, fold_after in recipes:
        clustered, wrapped = _one_shot_cluster(model, layer, k, per_channel)
        if fold_after:
            clustered = folding.fold_batchnorm(clustered)
        row = _kernel_row(name, models.kernel(clustered, layer), reference, k, per_channel, wrapped)
        rows.append({**row, "val_accuracy": val_accuracy(clustered, splits)})
    return pd.DataFrame(rows).set_index("recipe")


# ----------------------------------------------------------------------------- reporting

def weight_report(path, clusters: int, expected_sparsity: dict | None = None) -> pd.DataFrame:
    """Per layer of a .tflite: dtype, sparsity, scales, unique values per layer and per channel.

    How many scales a kernel gets depends on who quantized it. tfmot's QAT schemes (qat, pcqat)
    quantize a Conv2D kernel per output channel and a Dense kernel per tensor, so a clustered Dense
    layer keeps its k centroids as k int8 values in the whole layer. The converter's post-training
    int8 quantizes both per output channel. With one scale per channel the same centroid becomes a
    different int8 value in each channel: there, at most k values per channel is the claim.
    """
    rows = []
    for layer, w in tflite.weights(path, WEIGHT_LAYERS).items():
        values = w["values"].reshape(w["values"].shape[0], -1)
        rows.append({"layer": layer, "op": w["op"], "dtype": str(np.dtype(w["dtype"])),
                     "weights": values.size, "channels": values.shape[0],
                     "sparsity": 1.0 - np.count_nonzero(values) / values.size,
                     "expected_sparsity": (expected_sparsity or {}).get(layer, 0.0),
                     "scales": len(np.atleast_1d(w["scales"])),
                     "unique_nonzero_layer": len(np.unique(values[values != 0])),
                     "unique_nonzero_max_per_channel": max(len(np.unique(row[row != 0]))
                                                           for row in values),
                     "clusters": clusters})
    return pd.DataFrame(rows).set_index("layer")


def measure_stages(run: PipelineRun, splits, baseline_tflite=None, *, repeats: int = 300,
                   extra: dict | None = None):
    """LiteRT test and validation accuracy, size, gzip size and interleaved batch-1 latency of the
    baseline and every stage (`measure.side_by_side`), with gzip_ratio and speedup_p50.

    Returns (table, latency); the rows are "baseline" and the stages; `extra` adds more
    {label: .tflite path} to the same timing loop. `accuracy` is the test split's (the results
    store's column), `val_accuracy` the validation split's (the one the targets read).
    """
    paths = {"baseline": Path(baseline_tflite or models.baseline_tflite()), **run.tflite,
             **(extra or {})}
    table, latency = measure.side_by_side(paths, splits.x_test, splits.y_test,
                                          latency_images=splits.x_val[:200], reference="baseline",
                                          repeats=repeats)
    table.insert(1, "val_accuracy", [_litert_val_accuracy(path, splits) for path in paths.values()])
    return table.rename_axis("stage"), latency


def targets_met(table: pd.DataFrame, final: str = "quantize") -> pd.DataFrame:
    """The three targets for the final stage (`measure.verdicts`): figure, measured, target, met."""
    return measure.verdicts({name: float(table.loc[final, name]) for name in TARGETS}, TARGETS)


STAGES_CSV = PIPELINE_DIR / "stages.csv"  # the last measured stage table, for the book report


def record(table: pd.DataFrame, latency, names: dict, stages_csv: Path = STAGES_CSV,
           results_path=None) -> pd.DataFrame:
    """Store the rows of `table` whose label is in `names` ({label: variant name}).

    The whole stage table, timed interleaved in one loop, is also kept in `stages_csv` so that
    the book report compares the final model with the baseline from the same timing loop.
    """
    kept = table.drop(columns=["artifact"]).assign(variant=pd.Series(names),
                                                   machine=machine.machine_string())
    files.write_atomic(stages_csv, lambda tmp: kept.rename_axis("stage").to_csv(tmp))
    return results.record_table(table, latency, "pipeline", NOTEBOOK, names, results_path)


def report_figures(table: pd.DataFrame | None = None, stages_csv: Path = STAGES_CSV):
    """For the book report: (Pareto figure, targets table, stage table), or None for a missing part.

    The figure (`plots.pareto_plot`) plots the whole results store, zoomed to accuracies of 98%
    and up. The two tables come from the stage table `record` last stored (all stages timed in
    one interleaved loop): `targets` has one row per target (figure, measured, target, met),
    `stages` one row per stage.
    """
    table = results.load() if table is None else table
    figure = plots.pareto_plot(table, ylim=(0.98, None)) if len(table) else None
    if not Path(stages_csv).is_file():
        return figure, None, None
    stages = pd.read_csv(stages_csv, index_col="stage")
    if not {"baseline", "quantize"} <= set(stages.index) or not set(TARGETS) <= set(stages.columns):
        return figure, None, stages
    targets = targets_met(stages).astype({"measured": float, "target": float, "met": bool})
    return figure, targets, stages


# ----------------------------------------------------------------------------- build your own

CUSTOM_SUBSET = 10_000  # images per fine-tune of a build-your-own variant: a minute on 2 cores


def custom_config(sparsity: float, clusters: int, quantization: str,
                  base: PipelineConfig = PipelineConfig()):
    """The build panel's recipe: the thinned model of `base`, then one uniform sparsity for conv2
    and dense1, `clusters` (0: none) and a quantization mode; each fine-tune one epoch, a subset."""
    sparsity = round(float(sparsity), 2)
    if not 0.0 <= sparsity <= 0.97:
        raise ValueError(f"sparsity must be between 0 and 0.97, got {sparsity}")
    return replace(base, sparsity=(("conv2", sparsity), ("dense1", sparsity)),
                   clusters=int(clusters), quantization=quantization, prune_epochs=1,
                   cluster_epochs=1, qat_epochs=1, finetune_subset=CUSTOM_SUBSET,
                   qat_subset=CUSTOM_SUBSET)


def build_and_measure(config: PipelineConfig, splits=None, *, on_progress=None,
                      directory: Path = PIPELINE_DIR, baseline=None, baseline_tflite=None,
                      repeats: int = 200) -> dict:
    """Build one configuration (stages from the cache where possible) and measure its final .tflite,
    timed interleaved with the baseline float32 .tflite; returns the results-store row."""
    splits = load_mnist() if splits is None else splits
    run = run_pipeline(config, splits, directory=directory, baseline=baseline, progress=False,
                       on_progress=on_progress)
    variant = f"pipeline-custom-{config.name()}"
    paths = {variant: run.tflite["quantize"],
             "baseline": Path(baseline_tflite or models.baseline_tflite())}
    table, latency = measure.side_by_side(paths, splits.x_test, splits.y_test,
                                          latency_images=splits.x_val[:100], repeats=repeats,
                                          warmup=10)
    return results.make_row(variant, "pipeline", NOTEBOOK, latency=latency, runner_name=variant,
                            accuracy=float(table.loc[variant, "accuracy"]),
                            artifact=run.tflite["quantize"])
