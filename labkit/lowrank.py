"""Low-rank factorization: one layer becomes two thinner ones from a truncated SVD.

Owns: the SVD factors (`svd_factors` for a Dense kernel, `spatial_factors` for a convolution),
rebuilding a chain model with factored layers (`factorize`), the one-shot rank sweep and the
fine-tune of the chosen ranks (models.fine_tune, cached by models.cached keyed by the input
model's weights). The search (labkit.search) starts from its model;
`python -m labkit.targets.lowrank` measures it against the baseline.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import tf_keras as keras

import labkit  # sets the legacy-Keras switch before TensorFlow loads
from labkit import ARTIFACTS_DIR, measure, models

LOWRANK_DIR = ARTIFACTS_DIR / "lowrank"
BOOK_RANKS = {"conv2": 16, "dense1": 16}   # what the book chooses from its rank sweep


# ============================================================================ the factors

def full_rank(layer) -> int:
    """The largest rank a factorization of this Dense or Conv2D layer can have (exact at that
    rank)."""
    kernel = layer.get_weights()[0]
    if isinstance(layer, keras.layers.Dense):
        return int(min(kernel.shape))
    if isinstance(layer, keras.layers.Conv2D):
        kh, kw, c_in, c_out = kernel.shape
        return int(min(kh * c_in, kw * c_out))
    raise ValueError(f"layer {layer.name!r} is a {type(layer).__name__}; "
                     "only Dense and Conv2D factor")


def check_rank(rank, maximum: int, where: str) -> int:
    whole = not isinstance(rank, bool) and isinstance(rank, (int, np.integer))
    if not whole or not 1 <= rank <= maximum:
        raise ValueError(f"rank of {where} must be a whole number from 1 to {maximum} "
                         f"(its full rank), got {rank!r}")
    return int(rank)


def svd_factors(matrix: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) with A @ B the best rank-`rank` approximation of `matrix`; sqrt(S) goes to each side.

    A Dense kernel W (n_in x n_out) of rank r is the product of an n_in x r and an r x n_out
    matrix: two Dense layers with r units between them, costing r * (n_in + n_out) weights and
    MACs instead of n_in * n_out. The singular value decomposition W = U S V^T gives the best
    such pair for every r at once (Eckart-Young): keep the r largest singular values.
    """
    matrix = np.asarray(matrix, np.float64)
    rank = check_rank(rank, min(matrix.shape), f"a {matrix.shape[0]}x{matrix.shape[1]} matrix")
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    root = np.sqrt(s[:rank])
    first, second = u[:, :rank] * root, root[:, None] * vt[:rank]
    return first.astype(np.float32), second.astype(np.float32)


def conv_as_matrix(kernel: np.ndarray) -> np.ndarray:
    """K[a, b, c, o] (Keras layout) as M[(a, c), (b, o)]."""
    kh, kw, c_in, c_out = kernel.shape
    return kernel.transpose(0, 2, 1, 3).reshape(kh * c_in, kw * c_out)


def spatial_factors(kernel: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Kernels of a (kh x 1, c_in -> rank) and a (1 x kw, rank -> c_out) convolution.

    A k x k convolution factors as a Dense kernel does once its kernel K[a, b, c, o] is read as a
    matrix M[(a, c), (b, o)] (rows: kernel row and input channel; columns: kernel column and
    output channel). A rank-r factor of M is a k x 1 convolution to r channels followed by a
    1 x k convolution to the output channels (a *spatial* factorization); at full rank the pair
    computes exactly the original convolution, zero padding included.
    """
    kh, kw, c_in, c_out = kernel.shape
    check_rank(rank, min(kh * c_in, kw * c_out), f"a {kh}x{kw} convolution {c_in}->{c_out}")
    a, b = svd_factors(conv_as_matrix(kernel), rank)
    first = a.reshape(kh, c_in, rank)[:, None]                        # (kh, 1, c_in, r)
    second = b.reshape(rank, kw, c_out).transpose(1, 0, 2)[None]      # (1, kw, r, c_out)
    return first, second


def singular_values(layer) -> np.ndarray:
    """The singular values of a layer's kernel (of M for a convolution), largest first."""
    kernel = layer.get_weights()[0]
    matrix = conv_as_matrix(kernel) if kernel.ndim == 4 else kernel
    return np.linalg.svd(matrix, compute_uv=False)


# ============================================================================ rebuilding the model

def _factor_pair(layer, rank: int) -> list:
    """The two layers that replace `layer` at `rank`, with their weights."""
    config = layer.get_config()
    weights = layer.get_weights()
    bias = weights[1:] if config.get("use_bias", False) else []
    if isinstance(layer, keras.layers.Dense):
        a, b = svd_factors(weights[0], rank)
        first = keras.layers.Dense(rank, use_bias=False, name=f"{layer.name}_a")
        second = keras.layers.Dense(config["units"], activation=config["activation"],
                                    use_bias=config["use_bias"], name=f"{layer.name}_b")
    else:
        if tuple(config["strides"]) != (1, 1) or tuple(config["dilation_rate"]) != (1, 1) \
                or config.get("groups", 1) != 1:
            raise ValueError(f"{layer.name}: only stride 1, dilation 1, groups 1 convolutions "
                             "are factored here")
        a, b = spatial_factors(weights[0], rank)
        kh, kw = config["kernel_size"]
        first = keras.layers.Conv2D(rank, (kh, 1), padding=config["padding"], use_bias=False,
                                    name=f"{layer.name}_kx1")
        second = keras.layers.Conv2D(config["filters"], (1, kw), padding=config["padding"],
                                     activation=config["activation"], use_bias=config["use_bias"],
                                     name=f"{layer.name}_1xk")
    return [(first, [a]), (second, [b, *bias])]


def factorize(model, ranks: dict) -> keras.Model:
    """A copy of a chain model (each layer feeds the next) with the layers in `ranks` factored.

    `ranks` is {layer name: rank}; every other layer is copied with its weights.
    """
    names = [layer.name for layer in model.layers]
    for name, rank in ranks.items():
        if name not in names:
            raise ValueError(f"no layer {name!r} in the model; its layers are {names}")
        check_rank(rank, full_rank(model.get_layer(name)), f"layer {name}")
    inputs = keras.Input(shape=model.input_shape[1:], name=model.layers[0].name)
    x, assign = inputs, []
    for layer in model.layers[1:]:
        if layer.name in ranks:
            for new, weights in _factor_pair(layer, int(ranks[layer.name])):
                x = new(x)
                assign.append((new, weights))
        else:
            new = layer.__class__.from_config(layer.get_config())
            x = new(x)
            assign.append((new, layer.get_weights()))
    factored = keras.Model(inputs, x, name=f"{model.name}_lowrank")
    for layer, weights in assign:
        if weights:
            layer.set_weights(weights)
    return factored


def describe(model) -> dict:
    """Parameters and MACs per image of a model."""
    return {"params": measure.count_params(model)["params"], "macs": measure.count_macs(model)}


# ============================================================================ the rank sweep

def rank_sweep(model, x_val, y_val, ranks_by_layer: dict, progress: bool = True) -> pd.DataFrame:
    """One layer factored at a time, no fine-tuning: validation accuracy, params and MACs per
    rank."""
    jobs = [(layer, r) for layer, ranks in ranks_by_layer.items() for r in ranks]
    rows = [{"layer": "(none)", "rank": None, "full_rank": None,
             "val_accuracy": measure.accuracy(measure.keras_call(model), x_val, y_val),
             **describe(model)}]
    for layer, rank in labkit.progress_bar(jobs, desc="rank sweep", disable=not progress):
        factored = factorize(model, {layer: rank})
        rows.append({"layer": layer, "rank": rank, "full_rank": full_rank(model.get_layer(layer)),
                     "val_accuracy": measure.accuracy(measure.keras_call(factored), x_val, y_val),
                     **describe(factored)})
    table = pd.DataFrame(rows)
    table["drop"] = rows[0]["val_accuracy"] - table["val_accuracy"]
    return table


def choose_rank(sweep: pd.DataFrame, layer: str, max_drop: float) -> int:
    """The smallest swept rank of `layer` whose one-shot validation drop is at most
    `max_drop`."""
    if not 0.0 <= max_drop <= 1.0:
        raise ValueError(f"max_drop is an accuracy fraction in [0, 1], got {max_drop}")
    rows = sweep[(sweep["layer"] == layer) & (sweep["drop"] <= max_drop)]
    if rows.empty:
        raise ValueError(f"no swept rank of {layer} stays within a drop of {max_drop}; "
                         "sweep larger ranks")
    return int(rows["rank"].min())


# ===================================================================== fine-tuning the chosen ranks

def load_or_fine_tune(model, ranks: dict, splits, plan: models.FineTune = models.FineTune(), *,
                      directory: Path = LOWRANK_DIR, progress: bool = True):
    """`model` factored at `ranks` and fine-tuned on labels by `plan`; returns (model, record).

    Cached by models.cached, keyed by the ranks, the plan and the input model's weights.
    """
    name = "lowrank-" + "-".join(f"{layer}r{rank}" for layer, rank in sorted(ranks.items()))

    def tune():
        factored = factorize(model, ranks)
        one_shot = measure.accuracy(measure.keras_call(factored), splits.x_val, splits.y_val)
        fit = models.fine_tune(factored, splits, plan, progress=progress, description=name)
        val_accuracy = measure.accuracy(measure.keras_call(factored), splits.x_val, splits.y_val)
        return factored, {"name": name, "train_seconds": fit["train_seconds"],
                          "one_shot_val_accuracy": one_shot, "val_accuracy": val_accuracy,
                          **describe(factored), "trained_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    settings = {"ranks": dict(sorted(ranks.items())), "plan": asdict(plan)}
    return models.cached(name, settings, [model], tune, directory)


def export_tflite(model, name: str, directory: Path = LOWRANK_DIR) -> Path:
    """Float32 .tflite of a (factored) model, written once per model's weights (models.cached)."""
    path, _ = models.cached(name, {"format": "float32"}, [model], lambda: (model, {}), directory,
                            kind="tflite")
    return path
