"""Weight sharing by k-means clustering, from NumPy to tfmot.

Clustering replaces every weight of a layer by the nearest of k shared values: the layer becomes
a *codebook* (k float32 centroids) plus an *index* per weight (log2(k) bits). Owns tfmot's
clustering wrapped and validated (`cluster_model`, `strip`), THE cluster + fine-tune + strip
(`cluster`, set by a `ClusterSettings`, cached by `cached_cluster`), what a clustered model holds
(distinct values, codebook sizes, a .tflite file's values) and what batch-norm folding does to a
conv codebook (`folding_and_codebooks`). THE 1-D k-means is labkit.kmeans's.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

import labkit  # sets the legacy-Keras switch before TensorFlow loads

labkit.import_tensorflow_quietly(start_runtime=False)  # its C++ start-up lines
import tensorflow_model_optimization as tfmot  # noqa: E402
import tf_keras as keras  # noqa: E402

from labkit import ARTIFACTS_DIR, folding, measure, models, tflite  # noqa: E402
from labkit.kmeans import (  # noqa: E402
    FLOAT32_BYTES,
    INITS,
    check_clusters,
    check_init,
    init_centroids,
    kmeans,
    reconstruction_mse,
)

CLUSTERING_DIR = ARTIFACTS_DIR / "clustering"
TFMOT_INITS = {"linear": tfmot.clustering.keras.CentroidInitialization.LINEAR,
               "density": tfmot.clustering.keras.CentroidInitialization.DENSITY_BASED,
               "kmeans++": tfmot.clustering.keras.CentroidInitialization.KMEANS_PLUS_PLUS}
# tfmot's density-based start reads the weights' CDF on this many evenly spaced points.
TFMOT_DENSITY_GRID_POINTS = 30
TFMOT_DENSITY_GAP = 0.01
LARGE_LAYERS = ("conv2", "dense1", "logits")   # the ones worth pruning (conv1 has 288 weights)
# The book's fine-tune: one epoch on 10,000 images (a trained model needs far less than training).
PLAN = models.FineTune(train_subset=10_000, learning_rate=3e-4)
# The chapter's targets at k = 16, stated and checked with these numbers (in the book and by
# `python -m labkit.targets.clustering`).
TARGET_DROP_POINTS = 0.3     # test accuracy lost against the float32 baseline, in percentage points
TARGET_GZIP_SMALLER = 3.0    # gzipped clustered .tflite against the gzipped baseline


# ----------------------------------------------------------------------------- checks

def sparse_split(weights: np.ndarray, k: int) -> tuple[int, int]:
    """Centroids tfmot's sparsity-preserving start gives the negative and the positive weights.

    One centroid is pinned at zero; the other k - 1 are shared in proportion to how many
    non-zero weights are negative and positive (rounded half to even, as tf.round does).
    """
    negative, positive = int(np.sum(weights < 0)), int(np.sum(weights > 0))
    n_negative = int(np.round((k - 1) * negative / max(negative + positive, 1)))
    return n_negative, k - 1 - n_negative


def check_sparse_clusters(weights: np.ndarray, k: int, where: str) -> None:
    """Sparsity-preserving k-means++ needs at least as many weights on each side of zero as
    centroids.

    tfmot otherwise fails deep inside TensorFlow with "Expected num_to_sample <= points.rows()".
    """
    n_negative, n_positive = sparse_split(weights, k)
    negative, positive = int(np.sum(weights < 0)), int(np.sum(weights > 0))
    if negative < n_negative or positive < n_positive:
        raise ValueError(
            f"{where} has only {negative} negative and {positive} positive non-zero weights, but "
            f"sparsity-preserving clustering with k={k} gives them {n_negative} and {n_positive} "
            "centroids: use a smaller k or leave this layer out (cluster only large layers)")


# ----------------------------------------------------------------------------- the same with tfmot

def tfmot_layer_clusters(model, layer_name: str, k: int, init: str = "kmeans++",
                         per_channel: bool = False) -> dict:
    """tfmot's starting centroids for one layer, and the kernel tfmot builds from them.

    tfmot runs no Lloyd iterations: the start *is* its clustering until fine-tuning moves
    the centroids by gradient descent. per_channel (Conv2D only): tfmot's cluster_per_channel,
    k centroids for each output channel (centroids of shape (channels, k)).
    """
    check_init(init)
    w = models.kernel(model, layer_name)
    check_clusters(k, w.size // w.shape[-1] if per_channel else w.size, f"layer {layer_name}")
    layer = models.clone_with_weights(model).get_layer(layer_name)
    if per_channel and not (isinstance(layer, keras.layers.Conv2D) and layer.use_bias):
        # tfmot 0.8.1 counts channels with the size of the layer's last trainable weight, taken
        # for the bias: without one it counts the kernel, finds one weight per "channel" and
        # skips the layer.
        raise ValueError(f"layer {layer_name}: tfmot's cluster_per_channel needs a Conv2D with a "
                         "bias (fold its batch norm first: folding.fold_batchnorm gives it one)")
    wrapper = tfmot.clustering.keras.cluster_weights(
        layer, number_of_clusters=int(k), cluster_centroids_init=TFMOT_INITS[init],
        cluster_per_channel=per_channel)
    with labkit.quiet_stderr():   # oneDNN's C++ note on int64 ops (the indices); errors still raise
        wrapper.build(layer.input_shape)
        wrapper.update_clustered_weights_associations()   # gathers centroids into the kernel
    return {"centroids": np.sort(wrapper.cluster_centroids["kernel"].numpy(), axis=-1),
            "clustered_kernel": wrapper.layer.kernel.numpy()}


def density_tolerance(weights: np.ndarray) -> float:
    """How far tfmot's density start may sit from the exact quantiles.

    tfmot reads the CDF on 30 points spaced from min - 0.01 to max + 0.01 and takes, for each
    level, the first grid point above it: at most one grid step above the quantile. The last
    level (p = 1) lands on the top of the grid, 0.01 above the largest weight.
    """
    w = np.asarray(weights)
    step = (w.max() - w.min() + 2 * TFMOT_DENSITY_GAP) / (TFMOT_DENSITY_GRID_POINTS - 1)
    return float(max(step, TFMOT_DENSITY_GAP) * (1 + 1e-6))


def compare_with_tfmot(model, layer_name: str, k: int = 16, seed: int = 0,
                       iterations: int = 100) -> pd.DataFrame:
    """NumPy starts and k-means against tfmot's on one layer: centroids and reconstruction error.

    linear and density starts are deterministic, so their centroids are compared directly
    (density within one step of tfmot's CDF grid). k-means++ draws at random in both, so
    there the comparison is the error that Lloyd reaches from each start.
    """
    w = models.kernel(model, layer_name).astype(np.float64)
    tolerances = {"linear": 1e-6, "density": density_tolerance(w), "kmeans++": np.nan}
    rows = []
    for init in INITS:
        mine = init_centroids(w, k, init, seed)
        theirs = tfmot_layer_clusters(model, layer_name, k, init)
        gap = np.max(np.abs(mine - theirs["centroids"])) if init != "kmeans++" else np.nan
        rows.append({
            "init": init,
            "centroid_gap_max": gap,
            "tolerance": tolerances[init],
            "distinct_tfmot_centroids": len(np.unique(theirs["centroids"])),
            "numpy_start_mse": reconstruction_mse(w, mine),
            "tfmot_start_mse": reconstruction_mse(w, theirs["centroids"]),
            # tfmot's own gather, measured directly: checks our nearest-centroid assignment.
            "tfmot_kernel_mse": float(np.mean((w - theirs["clustered_kernel"]) ** 2)),
            "numpy_kmeans_mse": kmeans(w, k, init, seed=seed,
                                       iterations=iterations).mse_history[-1],
            "kmeans_from_tfmot_start_mse": kmeans(
                w, k, centroids=theirs["centroids"], iterations=iterations).mse_history[-1],
        })
    return pd.DataFrame(rows).set_index("init")


# -------------------------------------------------------------------------- whole model, fine-tuned

def _clusterable(model, layers) -> tuple:
    """The named layers (None: every weight layer), each a Conv2D or Dense (the layers with a
    kernel)."""
    layers = tuple(models.weight_layers(model) if layers is None else layers)
    if not layers:
        raise ValueError("name at least one Conv2D or Dense layer")
    for name in layers:
        try:
            layer = model.get_layer(name)
        except ValueError:
            raise ValueError(f"no layer named {name!r}; the model has "
                             f"{[l.name for l in model.layers]}") from None
        if not isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            raise ValueError(f"layer {name!r} is a {type(layer).__name__}; only Conv2D and Dense "
                             "kernels are clustered or pruned here")
    return layers


def cluster_model(model, k: int, init: str = "kmeans++", layers=None,
                  preserve_sparsity: bool = False) -> keras.Model:
    """A copy of `model` whose named layers (None: every weight layer) are wrapped by tfmot's
    ClusterWeights.

    Every setting is checked first: tfmot silently skips a Conv2D with too few weights and
    fails obscurely on a sparse layer with too few non-zero weights.
    """
    check_init(init)
    layers = _clusterable(model, layers)
    if preserve_sparsity and isinstance(k, (int, np.integer)) and k == 2:
        raise ValueError("k=2: sparsity-preserving clustering needs k >= 3 "
                         "(one centroid is pinned at zero)")
    for name in layers:
        w = models.kernel(model, name)
        check_clusters(k, w.size, f"layer {name}")
        if preserve_sparsity:
            check_sparse_clusters(w, k, f"layer {name}")
    base = models.clone_with_weights(model)   # tfmot wrappers reuse layers: never the caller's

    def wrap(layer):
        if layer.name in layers:
            return tfmot.clustering.keras.cluster_weights(
                layer, number_of_clusters=int(k), cluster_centroids_init=TFMOT_INITS[init],
                preserve_sparsity=preserve_sparsity)
        return layer
    return keras.models.clone_model(base, clone_function=wrap)


def strip(model) -> keras.Model:
    """The clustered model with plain layers again: the kernels hold the shared values.

    Cloned into a model of its own: tfmot's strip_clustering shares layers with the wrapped model.
    """
    return models.clone_with_weights(tfmot.clustering.keras.strip_clustering(model))


@dataclass(frozen=True)
class ClusterSettings:
    """What `cluster` does; `cached_cluster` keys its entry by these and the input model's weights.

    k shared values per layer in `layers` (None: every weight layer), tfmot's `init` start, the
    fine-tune `plan` (None: clustered, not fine-tuned) and `preserve_sparsity` (one centroid
    pinned at zero, so a pruned model keeps its zeros).
    """
    k: int
    plan: models.FineTune | None = None
    layers: tuple | list | None = None
    init: str = "kmeans++"
    preserve_sparsity: bool = False

    def __post_init__(self):
        check_init(self.init)


def cluster(model, settings: ClusterSettings, splits=None, *, progress: bool = True,
            callbacks=()):
    """Cluster a copy of `model`, fine-tune it when settings.plan is given, strip.

    Returns (model, record). Fine-tuning moves the centroids by gradient descent; with
    preserve_sparsity a centroid stays pinned at zero, so a pruned model keeps its zeros.
    `cached_cluster` caches it.
    """
    s = settings
    wrapped = cluster_model(model, s.k, s.init, s.layers, s.preserve_sparsity)
    record = {"k": int(s.k), "init": s.init, "layers": list(_clusterable(model, s.layers)),
              "preserve_sparsity": s.preserve_sparsity}
    if s.plan is not None:
        if splits is None:
            raise ValueError("a fine-tune needs the data splits: pass splits with plan")
        record.update(models.fine_tune(wrapped, splits, s.plan, callbacks=callbacks,
                                       progress=progress, description="cluster"))
    return strip(wrapped), record


def cached_cluster(model, settings: ClusterSettings, splits, *, name: str | None = None,
                   directory: Path = CLUSTERING_DIR, progress: bool = True):
    """`cluster` through models.cached: the entry's key covers the settings and `model`'s weights.

    `name` (None: clustered-k<k>, with -sparse when preserve_sparsity) starts the file names.
    """
    name = name or f"clustered-k{settings.k}" + ("-sparse" if settings.preserve_sparsity else "")
    return models.cached(name, asdict(settings), [model],
                         lambda: cluster(model, settings, splits, progress=progress), directory)


# ---------------------------------------------------------------------------- what the weights hold

def unique_values(model, layers=None) -> dict:
    """Distinct values in each named layer's kernel (None: every weight layer)."""
    return {name: int(np.unique(models.kernel(model, name)).size)
            for name in _clusterable(model, layers)}


def storage_table(model, layers=None) -> pd.DataFrame:
    """Bytes each clustered kernel needs as float32, as codebook + fixed-width indices, and as
    codebook + entropy-coded indices (the floor any lossless coder such as gzip can approach).

    Computed from the real weights: the codebook is the kernel's distinct values. Every other
    parameter (biases, batch norm, unclustered layers) stays float32 in the last row.
    """
    rows, clustered = [], 0
    for name in _clusterable(model, layers):
        w = models.kernel(model, name)
        values, idx = np.unique(w, return_inverse=True)
        counts = np.bincount(idx.ravel())
        p = counts / counts.sum()
        bits = max(1, math.ceil(math.log2(len(values))))
        entropy_bits = float(-(p * np.log2(p)).sum())
        codebook = len(values) * FLOAT32_BYTES
        rows.append({"layer": name, "weights": w.size, "unique_values": len(values),
                     "index_bits": bits, "float32_bytes": w.size * FLOAT32_BYTES,
                     "codebook_index_bytes": codebook + math.ceil(w.size * bits / 8),
                     "entropy_coded_bytes": codebook + math.ceil(w.size * entropy_bits / 8)})
        clustered += w.size
    rest = measure.count_params(model)["params"] - clustered
    rows.append({"layer": "other parameters (float32)", "weights": rest, "unique_values": np.nan,
                 "index_bits": 32, "float32_bytes": rest * FLOAT32_BYTES,
                 "codebook_index_bytes": rest * FLOAT32_BYTES,
                 "entropy_coded_bytes": rest * FLOAT32_BYTES})
    table = pd.DataFrame(rows).set_index("layer")
    table.loc["total"] = table.sum(numeric_only=True)
    table.loc["total", ["unique_values", "index_bits"]] = np.nan
    return table


def tflite_unique_values(path, min_size: int = 100) -> pd.DataFrame:
    """Distinct values in the kernel of every conv and fully connected op of a .tflite file, by
    layer (kernels with fewer than `min_size` values left out).

    The converter folds batch norm into the conv kernel, scaling each output channel by its
    own factor, so a clustered conv kernel reaches the file with up to k x channels values.
    """
    rows = [{"layer": layer, "op": w["op"], "tensor": w["tensor"],
             "shape": tuple(w["values"].shape), "unique_values": int(np.unique(w["values"]).size)}
            for layer, w in tflite.weights(path).items() if w["values"].size >= min_size]
    columns = ["layer", "op", "tensor", "shape", "unique_values"]
    return pd.DataFrame(rows, columns=columns).set_index("layer")


def folding_and_codebooks(model, layer_name: str = "conv2", k: int = 16) -> pd.DataFrame:
    """A conv kernel's codebook and batch-norm folding, three ways: tfmot's k-means++ start, then
    Lloyd.

    per tensor, folded after: `cluster`'s way on the baseline; folding scales each output channel
    by its own factor, so the file's kernel holds up to k x channels values. folded first, per
    tensor: the pipeline clusters the kernel that deploys (k values). folded first, per channel:
    tfmot's remedy, cluster_per_channel=True, k values for each channel from the start. Errors
    are against the folded float kernel, the one the converter writes (no fine-tuning here).
    """
    folded = folding.fold_batchnorm(model)
    target = models.kernel(folded, layer_name).astype(np.float64)

    def lloyd(kernel, start):   # from tfmot's start: one codebook, or one per output channel
        if start.ndim == 1:
            return kmeans(kernel, k, centroids=start).decode()
        return np.stack([kmeans(kernel[..., c], k, centroids=start[c]).decode()
                         for c in range(kernel.shape[-1])], axis=-1)

    def fold_after(kernel):
        copy = models.clone_with_weights(model)
        copy.get_layer(layer_name).kernel.assign(kernel)
        return models.kernel(folding.fold_batchnorm(copy), layer_name)

    starts = {"per tensor, folded after (clustering.cluster)": (model, False),
              "folded first, per tensor (the pipeline)": (folded, False),
              "folded first, per channel (cluster_per_channel=True)": (folded, True)}
    rows = []
    for way, (source, per_channel) in starts.items():
        start = tfmot_layer_clusters(source, layer_name, k, per_channel=per_channel)
        centroids = start["centroids"]
        clustered = lloyd(models.kernel(source, layer_name), centroids)
        deployed = fold_after(clustered) if source is model else clustered
        channels = deployed.reshape(-1, deployed.shape[-1]).T
        rows.append({"way": way, "centroids_stored": int(centroids.size),
                     "distinct_in_file_kernel": int(np.unique(deployed).size),
                     "most_distinct_per_channel": max(int(np.unique(c).size) for c in channels),
                     "mse_vs_folded_float": float(np.mean((deployed - target) ** 2))})
    return pd.DataFrame(rows).set_index("way")


def export_tflite(model, name: str, directory: Path = CLUSTERING_DIR) -> Path:
    """A float32 .tflite of a stripped model (no converter optimizations: the weights stay
    float32)."""
    return models.save_tflite(model, Path(directory) / f"{name}.tflite")
