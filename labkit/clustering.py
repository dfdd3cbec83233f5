"""Weight sharing by k-means clustering, from NumPy to tfmot (notebook 03).

Clustering replaces every weight of a layer by the nearest of k shared values. The layer
is then a *codebook* (k float32 centroids) plus an *index* per weight (log2(k) bits).
Read top to bottom: k-means in NumPy, the same on one layer with tfmot, whole-model
clustering with fine-tuning, honest sizes, and clustering that keeps a pruned model's zeros.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import labkit  # sets the legacy-Keras switch before TensorFlow loads
import numpy as np
import pandas as pd

labkit.import_tensorflow_quietly()   # quiet start-up for `python -m labkit.clustering` too
import tf_keras as keras  # noqa: E402
import tensorflow_model_optimization as tfmot  # noqa: E402

from labkit import ARTIFACTS_DIR, measure, models

CLUSTERING_DIR = ARTIFACTS_DIR / "clustering"
FLOAT32_BYTES = 4
INITS = ("linear", "density", "kmeans++")
TFMOT_INITS = {"linear": tfmot.clustering.keras.CentroidInitialization.LINEAR,
               "density": tfmot.clustering.keras.CentroidInitialization.DENSITY_BASED,
               "kmeans++": tfmot.clustering.keras.CentroidInitialization.KMEANS_PLUS_PLUS}
# tfmot's density-based start reads the weights' CDF on this many evenly spaced points.
TFMOT_DENSITY_GRID_POINTS = 30
TFMOT_DENSITY_GAP = 0.01
BOOK_LAYERS = ("conv1", "conv2", "dense1", "logits")   # every Conv2D and Dense kernel of the baseline
LARGE_LAYERS = ("conv2", "dense1", "logits")           # the ones worth pruning (conv1 has 288 weights)


# ----------------------------------------------------------------------------- checks

def check_clusters(k, n_weights: int, where: str = "the weights") -> int:
    """k must be an integer with 2 <= k <= number of weights; anything else is a ValueError."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"the number of clusters k must be an integer, got {k!r}")
    if k < 2:
        raise ValueError(f"k={k} clusters: k must be at least 2 (one shared value throws the layer away)")
    if k > n_weights:
        raise ValueError(f"k={k} clusters is more than the {n_weights} weights of {where}: "
                         f"choose 2 <= k <= {n_weights}")
    return int(k)


def check_init(init: str) -> str:
    if init not in INITS:
        raise ValueError(f"unknown centroid initialisation {init!r}; choose one of {INITS}")
    return init


def sparse_split(weights: np.ndarray, k: int) -> tuple[int, int]:
    """Centroids tfmot's sparsity-preserving start gives the negative and the positive weights.

    One centroid is pinned at zero; the other k - 1 are shared in proportion to how many
    non-zero weights are negative and positive (rounded half to even, as tf.round does).
    """
    negative, positive = int(np.sum(weights < 0)), int(np.sum(weights > 0))
    n_negative = int(np.round((k - 1) * negative / max(negative + positive, 1)))
    return n_negative, k - 1 - n_negative


def check_sparse_clusters(weights: np.ndarray, k: int, where: str) -> None:
    """Sparsity-preserving k-means++ needs at least as many weights on each side of zero as centroids.

    tfmot otherwise fails deep inside TensorFlow with "Expected num_to_sample <= points.rows()".
    """
    n_negative, n_positive = sparse_split(weights, k)
    negative, positive = int(np.sum(weights < 0)), int(np.sum(weights > 0))
    if negative < n_negative or positive < n_positive:
        raise ValueError(
            f"{where} has only {negative} negative and {positive} positive non-zero weights, but "
            f"sparsity-preserving clustering with k={k} gives them {n_negative} and {n_positive} "
            "centroids: use a smaller k or leave this layer out (cluster only large layers)")


# ----------------------------------------------------------------------------- k-means in NumPy

def init_centroids(weights: np.ndarray, k: int, init: str = "kmeans++", seed: int = 0) -> np.ndarray:
    """k starting centroids (sorted, float64) from the flattened weights."""
    w = np.asarray(weights, np.float64).ravel()
    k = check_clusters(k, w.size)
    check_init(init)
    if init == "linear":      # evenly spaced between the smallest and the largest weight
        return np.linspace(w.min(), w.max(), k)
    if init == "density":     # equal steps in probability: many centroids where weights crowd
        # tfmot's probability levels, so the two can be compared; p = 1 puts one at the largest weight.
        return np.quantile(w, np.linspace(0.01, 1.0, k), method="inverted_cdf")
    # k-means++: each next centroid drawn with probability proportional to the squared
    # distance to the nearest centroid chosen so far, so far-away weights get a centroid.
    rng = np.random.default_rng(seed)
    centroids = [w[rng.integers(w.size)]]
    d2 = (w - centroids[0]) ** 2
    for _ in range(1, k):
        total = d2.sum()
        pick = rng.choice(w.size, p=d2 / total) if total > 0 else rng.integers(w.size)
        centroids.append(w[pick])
        d2 = np.minimum(d2, (w - w[pick]) ** 2)
    return np.sort(np.array(centroids))


def assign(weights: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid for every weight (centroids sorted ascending).

    In one dimension the boundaries between clusters are the midpoints of neighbouring
    centroids, so a binary search replaces an n-by-k table of distances.
    """
    midpoints = (centroids[1:] + centroids[:-1]) / 2
    return np.searchsorted(midpoints, np.asarray(weights), side="left")


def reconstruction_mse(weights: np.ndarray, centroids: np.ndarray) -> float:
    """Mean squared error between the weights and their nearest centroids."""
    w = np.asarray(weights, np.float64).ravel()
    c = np.sort(np.asarray(centroids, np.float64).ravel())
    return float(np.mean((w - c[assign(w, c)]) ** 2))


@dataclass
class Codebook:
    """A clustered tensor: `centroids[indices]` is the tensor with every weight replaced."""
    centroids: np.ndarray      # (k,) float32, sorted
    indices: np.ndarray        # the tensor's shape, smallest unsigned integer type that holds k - 1
    mse_history: list          # reconstruction MSE after each Lloyd iteration

    @property
    def k(self) -> int:
        return len(self.centroids)

    def decode(self) -> np.ndarray:
        return self.centroids[self.indices]

    def index_bits(self) -> int:
        return max(1, math.ceil(math.log2(self.k)))

    def storage_bytes(self) -> int:
        """float32 codebook plus densely packed fixed-width indices."""
        return self.k * FLOAT32_BYTES + math.ceil(self.indices.size * self.index_bits() / 8)


def kmeans(weights: np.ndarray, k: int, init: str = "kmeans++", *, iterations: int = 100,
           seed: int = 0, centroids: np.ndarray | None = None, tol: float = 1e-9) -> Codebook:
    """Lloyd's k-means on the scalar weights: assign to the nearest centroid, move each centroid
    to the mean of its weights, repeat. Neither step can raise the squared error.

    Pass `centroids` to start from given values (for example tfmot's) instead of `init`.
    """
    w = np.asarray(weights, np.float64)
    flat = w.ravel()
    k = check_clusters(k, flat.size)
    if centroids is not None and len(centroids) != k:
        raise ValueError(f"got {len(centroids)} starting centroids for k={k} clusters")
    c = np.sort(np.asarray(centroids, np.float64)) if centroids is not None else init_centroids(flat, k, init, seed)
    history = []
    for _ in range(iterations):
        idx = assign(flat, c)
        counts = np.bincount(idx, minlength=k)
        sums = np.bincount(idx, weights=flat, minlength=k)
        # An empty cluster keeps its centroid (a duplicate start leaves one empty).
        new = np.where(counts > 0, sums / np.maximum(counts, 1), c)
        history.append(float(np.mean((flat - c[idx]) ** 2)))
        moved = np.max(np.abs(new - c))
        c = np.sort(new)
        if moved < tol:
            break
    idx = assign(flat, c)
    history.append(float(np.mean((flat - c[idx]) ** 2)))
    dtype = np.uint8 if k <= 256 else np.uint16 if k <= 65536 else np.uint32
    return Codebook(c.astype(np.float32), idx.astype(dtype).reshape(w.shape), history)


# ----------------------------------------------------------------------------- the same with tfmot

def kernel(model, layer_name: str) -> np.ndarray:
    """The kernel (first weight) of a Conv2D or Dense layer, as NumPy."""
    return model.get_layer(layer_name).get_weights()[0]


def tfmot_layer_clusters(model, layer_name: str, k: int, init: str = "kmeans++") -> dict:
    """tfmot's starting centroids for one layer, and the kernel tfmot builds from them.

    tfmot runs no Lloyd iterations: the start *is* its clustering until fine-tuning moves
    the centroids by gradient descent.
    """
    check_init(init)
    check_clusters(k, kernel(model, layer_name).size, f"layer {layer_name}")
    layer = models.clone_with_weights(model).get_layer(layer_name)
    wrapper = tfmot.clustering.keras.cluster_weights(layer, number_of_clusters=int(k),
                                                     cluster_centroids_init=TFMOT_INITS[init])
    wrapper.build(layer.input_shape)
    wrapper.update_clustered_weights_associations()   # gathers centroids into the kernel
    return {"centroids": np.sort(wrapper.cluster_centroids["kernel"].numpy()),
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
    w = kernel(model, layer_name).astype(np.float64)
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
            "numpy_kmeans_mse": kmeans(w, k, init, seed=seed, iterations=iterations).mse_history[-1],
            "kmeans_from_tfmot_start_mse": kmeans(w, k, centroids=theirs["centroids"],
                                                  iterations=iterations).mse_history[-1],
        })
    return pd.DataFrame(rows).set_index("init")


# ----------------------------------------------------------------------------- whole model, fine-tuned

def _clusterable(model, layer_names) -> None:
    """Every named layer exists and is a Conv2D or Dense (the layers with a kernel to share or prune)."""
    if not layer_names:
        raise ValueError("name at least one Conv2D or Dense layer")
    for name in layer_names:
        try:
            layer = model.get_layer(name)
        except ValueError:
            raise ValueError(f"no layer named {name!r}; the model has "
                             f"{[l.name for l in model.layers]}") from None
        if not isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            raise ValueError(f"layer {name!r} is a {type(layer).__name__}; only Conv2D and Dense "
                             "kernels are clustered or pruned here")


def cluster_model(model, k: int, init: str = "kmeans++", layers=BOOK_LAYERS,
                  preserve_sparsity: bool = False) -> keras.Model:
    """A copy of `model` whose named layers are wrapped by tfmot's ClusterWeights.

    Every setting is checked first: tfmot silently skips a Conv2D with too few weights and
    fails obscurely on a sparse layer with too few non-zero weights.
    """
    check_init(init)
    layers = tuple(layers)
    _clusterable(model, layers)
    if preserve_sparsity and isinstance(k, (int, np.integer)) and k == 2:
        raise ValueError("k=2: sparsity-preserving clustering needs k >= 3 (one centroid is pinned at zero)")
    for name in layers:
        w = kernel(model, name)
        check_clusters(k, w.size, f"layer {name}")
        if preserve_sparsity:
            check_sparse_clusters(w, k, f"layer {name}")
    base = models.clone_with_weights(model)   # tfmot wrappers reuse layers: never wrap the caller's

    def wrap(layer):
        if layer.name in layers:
            return tfmot.clustering.keras.cluster_weights(
                layer, number_of_clusters=int(k), cluster_centroids_init=TFMOT_INITS[init],
                preserve_sparsity=preserve_sparsity)
        return layer
    return keras.models.clone_model(base, clone_function=wrap)


def strip(model) -> keras.Model:
    """The clustered model with plain layers again: the kernels hold the shared values."""
    return tfmot.clustering.keras.strip_clustering(model)


@dataclass(frozen=True)
class ClusterConfig:
    """Everything that decides a fine-tuned clustered model; its hash names the cache entry."""
    k: int = 16
    init: str = "kmeans++"
    layers: tuple = BOOK_LAYERS
    preserve_sparsity: bool = False
    epochs: int = 1
    train_subset: int | None = 20000   # fine-tuning a trained model needs far less than training it
    batch_size: int = 128
    learning_rate: float = 3e-4
    seed: int = 0
    start: str = "baseline-" + models.BaselineConfig().key()   # the cache name of the model clustered

    def key(self) -> str:
        return models.settings_key(asdict(self))

    @property
    def name(self) -> str:
        return f"clustered-k{self.k}" + ("-sparse" if self.preserve_sparsity else "")


def _cached(path: Path, build):
    """Load model and record from `path`, or build, save (atomically) and return them."""
    if (cached := models.load_cached(path)) is not None:
        return cached
    model, record = build()
    models.save_cached(model, record, path)
    return model, record


def _fine_tune(model, config, splits, callbacks=None, progress=True) -> dict:
    x, y = splits.x_train[:config.train_subset], splits.y_train[:config.train_subset]   # None: all
    fit = models.train(model, x, y, epochs=config.epochs, batch_size=config.batch_size,
                       learning_rate=config.learning_rate, seed=config.seed,
                       x_val=splits.x_val, y_val=splits.y_val, progress=progress, callbacks=callbacks)
    return {"config": asdict(config), "train_seconds": fit["train_seconds"],
            "history": fit["history"],
            "trained_at": time.strftime("%Y-%m-%dT%H:%M:%S")}


def load_or_cluster(model, config: ClusterConfig, splits, *, directory: Path = CLUSTERING_DIR,
                    progress: bool = True):
    """Cluster `model` (the one named by config.start), fine-tune, strip; cached by the config."""
    def build():
        wrapped = cluster_model(model, config.k, config.init, config.layers, config.preserve_sparsity)
        record = _fine_tune(wrapped, config, splits, progress=progress)
        return strip(wrapped), record
    return _cached(Path(directory) / f"{config.name}-{config.key()}.keras", build)


# ----------------------------------------------------------------------------- pruning first

@dataclass(frozen=True)
class PruneConfig:
    """A modest magnitude pruning of the large layers, as the start of sparsity-preserving clustering."""
    sparsity: float = 0.5
    layers: tuple = LARGE_LAYERS
    epochs: int = 1
    train_subset: int | None = 20000
    batch_size: int = 128
    learning_rate: float = 3e-4
    seed: int = 0
    start: str = "baseline-" + models.BaselineConfig().key()

    def key(self) -> str:
        return models.settings_key(asdict(self))

    @property
    def name(self) -> str:
        return f"pruned-{round(self.sparsity * 100)}"


def prune_model(model, sparsity: float, layers=LARGE_LAYERS) -> keras.Model:
    """A copy of `model` with tfmot magnitude pruning (constant sparsity) on the named layers."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity is the fraction of weights set to zero, 0 <= sparsity < 1; got {sparsity}")
    layers = tuple(layers)
    _clusterable(model, layers)
    base = models.clone_with_weights(model)
    schedule = tfmot.sparsity.keras.ConstantSparsity(sparsity, begin_step=0, frequency=50)

    def wrap(layer):
        if layer.name in layers:
            return tfmot.sparsity.keras.prune_low_magnitude(layer, pruning_schedule=schedule)
        return layer
    return keras.models.clone_model(base, clone_function=wrap)


def load_or_prune(model, config: PruneConfig, splits, *, directory: Path = CLUSTERING_DIR,
                  progress: bool = True):
    """Prune `model` to config.sparsity, fine-tune, strip the wrappers; cached by the config."""
    def build():
        wrapped = prune_model(model, config.sparsity, config.layers)
        record = _fine_tune(wrapped, config, splits, progress=progress,
                            callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
        return tfmot.sparsity.keras.strip_pruning(wrapped), record
    return _cached(Path(directory) / f"{config.name}-{config.key()}.keras", build)


# ----------------------------------------------------------------------------- what the weights hold

def unique_values(model, layers=BOOK_LAYERS) -> dict:
    """Distinct values in each named layer's kernel."""
    return {name: int(np.unique(kernel(model, name)).size) for name in layers}


def sparsity(model, layers=BOOK_LAYERS) -> dict:
    """Fraction of exact zeros in each named layer's kernel."""
    return {name: float(np.mean(kernel(model, name) == 0)) for name in layers}


def storage_table(model, layers=BOOK_LAYERS) -> pd.DataFrame:
    """Bytes each clustered kernel needs as float32, as codebook + fixed-width indices, and as
    codebook + entropy-coded indices (the floor any lossless coder such as gzip can approach).

    Computed from the real weights: the codebook is the kernel's distinct values. Every other
    parameter (biases, batch norm, unclustered layers) stays float32 in the last row.
    """
    rows, clustered = [], 0
    for name in layers:
        w = kernel(model, name)
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
                 "codebook_index_bytes": rest * FLOAT32_BYTES, "entropy_coded_bytes": rest * FLOAT32_BYTES})
    table = pd.DataFrame(rows).set_index("layer")
    table.loc["total"] = table.sum(numeric_only=True)
    table.loc["total", ["unique_values", "index_bits"]] = np.nan
    return table


def tflite_unique_values(path, min_size: int = 100) -> pd.DataFrame:
    """Distinct values in each constant tensor of a .tflite file with at least `min_size` elements.

    The converter folds batch norm into the conv kernel, scaling each output channel by its
    own factor, so a clustered conv kernel reaches the file with up to k x channels values.
    """
    from ai_edge_litert.interpreter import Interpreter
    with labkit.quiet_stderr():
        interpreter = Interpreter(model_path=str(path))
    rows = []
    for detail in interpreter.get_tensor_details():
        if int(np.prod(detail["shape"])) < min_size:
            continue
        try:
            values = interpreter.get_tensor(detail["index"])
        except ValueError:   # an activation: no data until the model runs
            continue
        rows.append({"tensor": detail["name"].split(";")[0], "shape": tuple(detail["shape"]),
                     "unique_values": int(np.unique(values).size)})
    return pd.DataFrame(rows).set_index("tensor")


def export_tflite(model, name: str, directory: Path = CLUSTERING_DIR) -> Path:
    """A float32 .tflite of a stripped model (no converter optimizations: the weights stay float32)."""
    return models.save_tflite(model, Path(directory) / f"{name}.tflite")


# ----------------------------------------------------------------------------- the targets

def benchmark(k: int = 16, progress: bool = False) -> dict:
    """Print and return the issue's targets, measured in one run: the test accuracy lost by
    k clusters (LiteRT, float32 files) and how much smaller the gzipped file is."""
    from labkit.data import load_mnist
    splits = load_mnist()
    baseline, _ = models.load_or_train_baseline(splits=splits, progress=progress)
    baseline_path = models.baseline_tflite()
    config = ClusterConfig(k=k)
    clustered, _ = load_or_cluster(baseline, config, splits, progress=progress)
    path = export_tflite(clustered, f"{config.name}-{config.key()}")
    base_acc = measure.accuracy(measure.litert(baseline_path), splits.x_test, splits.y_test)
    clus_acc = measure.accuracy(measure.litert(path), splits.x_test, splits.y_test)
    out = {"k": k, "baseline_test_accuracy": base_acc, "clustered_test_accuracy": clus_acc,
           "accuracy_drop_points": 100 * (base_acc - clus_acc),
           "baseline_gzip_bytes": measure.gzip_bytes(baseline_path),
           "clustered_gzip_bytes": measure.gzip_bytes(path)}
    out["gzip_smaller"] = out["baseline_gzip_bytes"] / out["clustered_gzip_bytes"]
    print(f"machine: {measure.machine_string()}")
    print(f"test accuracy: baseline {100 * base_acc:.2f}%, {k} clusters {100 * clus_acc:.2f}% "
          f"-> drop {out['accuracy_drop_points']:.2f} points (target <= 0.30): "
          f"{'met' if out['accuracy_drop_points'] <= 0.3 else 'MISSED'}")
    print(f"gzipped .tflite: baseline {out['baseline_gzip_bytes']:,} B, {k} clusters "
          f"{out['clustered_gzip_bytes']:,} B -> {out['gzip_smaller']:.2f}x smaller (target >= 3x): "
          f"{'met' if out['gzip_smaller'] >= 3 else 'MISSED'}")
    return out


if __name__ == "__main__":
    labkit.setup(seed=0)
    benchmark()
