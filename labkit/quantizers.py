"""Quantizers by hand, in NumPy: the arithmetic before any converter (the converter and QAT
that apply it to a whole model are in `labkit/quantization.py`).

Uniform quantizers (affine and symmetric, per tensor or per channel; `quantize`, `dequantize`),
a k-means codebook (`kmeans_quantize`), `fake_quantize`, `sqnr_db`, `weight_sweep` (each scheme
and bit width on a model's weights), `integer_matmul_terms` (why weights get zero point 0) and
activation calibration (min/max, percentile, MSE). TFLite's int8 conventions: ``real = scale *
(q - zero_point)``; weights symmetric on [-127, 127], activations affine; kernels HWIO.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import numpy as np
import pandas as pd

import labkit  # sets the legacy-Keras switch before TensorFlow loads
from labkit import kmeans, measure

# labkit.models and tf_keras are imported inside weight_sweep, layer_outputs and _tail:
# labkit.check.quantization imports this module and must not load TensorFlow.

MIN_BITS, MAX_BITS = 1, 16
SCHEMES = ("affine", "symmetric", "kmeans")
CALIBRATIONS = ("minmax", "percentile", "mse")


# ============================================================================ 1. uniform quantizers

def check_bits(bits) -> int:
    """The bit width as an int; a ValueError that names the allowed range otherwise."""
    if (isinstance(bits, bool) or not isinstance(bits, (int, np.integer))
            or not MIN_BITS <= bits <= MAX_BITS):
        raise ValueError(f"bits must be a whole number from {MIN_BITS} to {MAX_BITS}, "
                         f"got {bits!r}")
    return int(bits)


def check_axis(x: np.ndarray, axis) -> int | None:
    """None means one range for the whole tensor; an axis means one range per slice along it."""
    if axis is None:
        return None
    if (isinstance(axis, bool) or not isinstance(axis, (int, np.integer))
            or not -x.ndim <= axis < x.ndim):
        raise ValueError(f"axis {axis!r} does not exist for an array of shape {x.shape}: use None "
                         f"(per tensor) or a channel axis from {-x.ndim} to {x.ndim - 1} "
                         "(per channel)")
    return int(axis) % x.ndim


def check_finite(x: np.ndarray, what: str = "the values") -> np.ndarray:
    """x, if it holds no NaN or infinity: those have no integer code (np.round would make NaN
    code 0)."""
    bad = ~np.isfinite(x)
    if bad.any():
        raise ValueError(f"{what} hold {int(np.isnan(x).sum())} NaN and {int(np.isinf(x).sum())} "
                         f"infinite value(s) out of {x.size}: they have no integer code. Find "
                         "where they come from (a diverged training, a division by zero) before "
                         "quantizing.")
    return x


def _per_channel(fn, x: np.ndarray, axis: int | None) -> np.ndarray:
    """fn (np.min, np.max, ...) over everything but `axis`: a scalar, or one value per channel."""
    if axis is None:
        return np.asarray(fn(x))
    return fn(x, axis=tuple(i for i in range(x.ndim) if i != axis))


def along(values: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    """Reshape per-channel values so they broadcast against a tensor along `axis`."""
    if axis is None:
        return values
    shape = [1] * ndim
    shape[axis] = -1
    return values.reshape(shape)


@dataclass(frozen=True)
class QuantParams:
    """How reals map to integer codes: ``q = clip(round(x / scale) + zero_point, qmin, qmax)``."""
    scale: np.ndarray        # float32; a scalar (per tensor) or one per channel
    zero_point: np.ndarray   # int64, same shape as scale
    qmin: int
    qmax: int
    bits: int
    axis: int | None = None


def params_from_range(lo, hi, bits: int, symmetric: bool = False,
                      axis: int | None = None) -> QuantParams:
    """Scale and zero point that cover [lo, hi] (widened to include 0, so zero is exact)."""
    bits = check_bits(bits)
    lo = np.minimum(check_finite(np.asarray(lo, np.float64), "the range"), 0.0)
    hi = np.maximum(check_finite(np.asarray(hi, np.float64), "the range"), 0.0)
    if symmetric:
        if bits < 2:
            raise ValueError("symmetric quantization needs bits >= 2: one bit has no room for "
                             "negative, zero and positive codes (use the affine scheme)")
        qmax = 2 ** (bits - 1) - 1
        qmin = -qmax                  # narrow range: -128 stays unused, so the grid is symmetric
        scale = np.maximum(-lo, hi) / qmax
        zero_point = np.zeros_like(scale, dtype=np.int64)
    else:
        qmin, qmax = -2 ** (bits - 1), 2 ** (bits - 1) - 1
        scale = (hi - lo) / (qmax - qmin)
    # an all-zero tensor: any scale works
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    if not symmetric:
        zero_point = np.clip(np.round(qmin - lo / scale), qmin, qmax).astype(np.int64)
    return QuantParams(scale, zero_point, qmin, qmax, bits, axis)


def affine_params(x: np.ndarray, bits: int, axis: int | None = None) -> QuantParams:
    """Asymmetric: the codes span [min(x), max(x)], so the zero point moves with the data."""
    x = check_finite(np.asarray(x))
    axis = check_axis(x, axis)
    return params_from_range(_per_channel(np.min, x, axis), _per_channel(np.max, x, axis), bits,
                             False, axis)


def symmetric_params(x: np.ndarray, bits: int, axis: int | None = None) -> QuantParams:
    """Symmetric: zero point 0 and scale = max|x| / qmax, as TFLite quantizes weights."""
    x = check_finite(np.asarray(x))
    axis = check_axis(x, axis)
    return params_from_range(_per_channel(np.min, x, axis), _per_channel(np.max, x, axis), bits,
                             True, axis)


def quantize(x: np.ndarray, p: QuantParams) -> np.ndarray:
    """Real values to integer codes (int8 up to 8 bits, int16 above); NaN or infinity is a
    ValueError."""
    x = check_finite(np.asarray(x, np.float32))
    scale = along(p.scale, x.ndim, p.axis)
    zero_point = along(p.zero_point, x.ndim, p.axis)
    q = np.clip(np.round(x / scale) + zero_point, p.qmin, p.qmax)
    return q.astype(np.int8 if p.bits <= 8 else np.int16)


def dequantize(q: np.ndarray, p: QuantParams) -> np.ndarray:
    """Integer codes back to reals: scale * (q - zero_point)."""
    scale = along(p.scale, q.ndim, p.axis)
    zero_point = along(p.zero_point, q.ndim, p.axis)
    return ((q.astype(np.int64) - zero_point) * scale).astype(np.float32)


# ========================================================================== 2. non-uniform: k-means

def kmeans_quantize(x: np.ndarray, bits: int, axis: int | None = None,
                    seed: int = 0) -> np.ndarray:
    """Every value replaced by the nearest of 2**bits learned levels (one codebook per channel
    with axis).

    The levels come from clustering's k-means (`kmeans.kmeans`, k-means++ start). A tensor
    with at most 2**bits distinct values needs no clustering: each value is its own level.
    """
    bits = check_bits(bits)
    x = check_finite(np.asarray(x, np.float32))
    axis = check_axis(x, axis)
    if axis is not None:
        moved = np.moveaxis(x, axis, 0)
        out = np.stack([kmeans_quantize(channel, bits, seed=seed) for channel in moved])
        return np.moveaxis(out, 0, axis)
    if x.size == 0:
        raise ValueError("k-means needs at least one value")
    if len(np.unique(x)) <= 2 ** bits:
        return x.copy()
    codebook = kmeans.kmeans(x.ravel(), 2 ** bits, seed=seed)
    return codebook.decode().reshape(x.shape).astype(np.float32)   # every value -> its centroid


def fake_quantize(x: np.ndarray, bits: int, scheme: str = "affine",
                  axis: int | None = None) -> np.ndarray:
    """Quantize then dequantize: float values that carry exactly the error of the integer codes."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if scheme == "kmeans":
        return kmeans_quantize(x, bits, axis)
    params = (affine_params if scheme == "affine" else symmetric_params)(x, bits, axis)
    return dequantize(quantize(x, params), params)


def integer_matmul_terms(x_q: np.ndarray, x_zero_point: int, w_q: np.ndarray,
                         w_zero_point: int = 0) -> dict:
    """(x_q - z_x) @ (w_q - z_w) expanded into its four terms, each int64 of shape (batch, out).

    Only the first two depend on the input. The last two depend on the weights alone, so an
    integer kernel adds them to the bias once, when the model loads. With z_w = 0, as TFLite's
    symmetric weights have, the second term (a sum over each input row, at every call) and the
    fourth vanish.
    """
    x, w = np.asarray(x_q, np.int64), np.asarray(w_q, np.int64)
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"x_q must be (batch, in) and w_q (in, out), got {x.shape} and {w.shape}")
    full = np.zeros((x.shape[0], w.shape[1]), np.int64)
    return {"x_q @ w_q": x @ w,
            "- z_w * sum_k x_q (each call)": full - w_zero_point * x.sum(axis=1, keepdims=True),
            "- z_x * sum_k w_q (at load)": full - x_zero_point * w.sum(axis=0, keepdims=True),
            "+ K * z_x * z_w (at load)": full + x.shape[1] * x_zero_point * w_zero_point}


def sqnr_db(x: np.ndarray, x_hat: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB: each bit is worth about 6 dB to a uniform
    quantizer."""
    x, x_hat = np.asarray(x, np.float64), np.asarray(x_hat, np.float64)
    noise = np.sum((x - x_hat) ** 2)
    return float("inf") if noise == 0 else float(10 * np.log10(np.sum(x ** 2) / noise))


# ======================================================================== 3. the baseline's weights

def weight_sweep(model, x, y, bits_list=(8, 6, 4, 2), schemes=SCHEMES,
                 progress: bool = True) -> pd.DataFrame:
    """Fake-quantize every kernel with each scheme, granularity and bit width; SQNR and accuracy
    of each.

    Only kernels are quantized here (biases and batch norms stay float), so this isolates the
    error of the weight codes. One row per setting, plus a float32 reference row.
    """
    from labkit import models  # loads TensorFlow: see the note at the top
    for bits in bits_list:
        check_bits(bits)
    work = models.clone_with_weights(model)   # the caller's model keeps its weights
    runner = measure.tf_function(work, name="fake-quantized")
    originals = {name: models.kernel(model, name) for name in models.weight_layers(model)}
    flat = np.concatenate([w.ravel() for w in originals.values()])
    rows = [{"scheme": "float32", "granularity": "-", "bits": 32, "sqnr_db": float("inf"),
             "accuracy": measure.accuracy(runner, x, y)}]
    settings = list(product(schemes, ("per-tensor", "per-channel"), bits_list))
    for scheme, granularity, bits in labkit.progress_bar(settings, desc="weight sweep",
                                                         disable=not progress):
        quantized = {}
        axis = -1 if granularity == "per-channel" else None
        for name, w in originals.items():
            quantized[name] = fake_quantize(w, bits, scheme, axis=axis)
            work.get_layer(name).kernel.assign(quantized[name])
        noisy = np.concatenate([w.ravel() for w in quantized.values()])
        rows.append({"scheme": scheme, "granularity": granularity, "bits": bits,
                     "sqnr_db": sqnr_db(flat, noisy), "accuracy": measure.accuracy(runner, x, y)})
    return pd.DataFrame(rows)


# ======================================================================== 4. activation calibration

def layer_outputs(model, layer_name: str, x: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """What one layer outputs for the images x (the values an activation quantizer must cover)."""
    import tf_keras as keras  # loads TensorFlow: see the note at the top
    probe = keras.Model(model.input, model.get_layer(layer_name).output)
    return np.concatenate([probe(x[i:i + batch_size], training=False).numpy()
                           for i in range(0, len(x), batch_size)])


def range_mse(values: np.ndarray, lo: float, hi: float, bits: int) -> float:
    """Mean squared error of affine-quantizing `values` with the range [lo, hi] (clipping
    included)."""
    p = params_from_range(lo, hi, bits)
    return float(np.mean((values - dequantize(quantize(values, p), p)) ** 2))


def calibrate(values: np.ndarray, method: str = "minmax", bits: int = 8, percentile: float = 99.99,
              grid: int = 200, max_samples: int = 200_000, seed: int = 0) -> tuple:
    """The range (lo, hi) an activation quantizer would use, from sample activations.

    minmax: the extremes seen. percentile: clip the rarest (100 - percentile)% on each side.
    mse: shrink the min/max range by the factor, out of `grid` candidates, that gives the lowest
    quantization MSE on the samples (a subsample of at most max_samples values, for speed).
    """
    if method not in CALIBRATIONS:
        raise ValueError(f"method must be one of {CALIBRATIONS}, got {method!r}")
    if not 50 < percentile <= 100:
        raise ValueError(f"percentile must be in (50, 100], got {percentile}")
    bits = check_bits(bits)
    values = check_finite(np.asarray(values, np.float32).ravel(), "the activations")
    if values.size == 0:
        raise ValueError("calibration needs at least one activation value")
    lo, hi = min(float(values.min()), 0.0), max(float(values.max()), 0.0)
    if method == "percentile":
        lo = min(float(np.percentile(values, 100 - percentile)), 0.0)
        hi = max(float(np.percentile(values, percentile)), 0.0)
    elif method == "mse":
        if values.size > max_samples:  # keep the extremes: they are what the search weighs
            rng = np.random.default_rng(seed)
            keep = rng.choice(values.size, max_samples, replace=False)
            values = np.concatenate([values[keep], [values.min(), values.max()]])
        factors = np.geomspace(1e-3, 1.0, grid)
        errors = [range_mse(values, lo * f, hi * f, bits) for f in factors]
        best = factors[int(np.argmin(errors))]
        lo, hi = lo * best, hi * best
    return lo, hi


def _tail(model, layer_name: str):
    """The layers after `layer_name` as a model of their own (the baseline is a plain chain)."""
    import tf_keras as keras  # loads TensorFlow: see the note at the top
    names = [layer.name for layer in model.layers]
    inputs = keras.Input(model.get_layer(layer_name).output.shape[1:])
    x = inputs
    for layer in model.layers[names.index(layer_name) + 1:]:
        x = layer(x)
    return keras.Model(inputs, x)


def outlier_study(model, x_cal, x_eval, y_eval, layer_name: str = "dense1", bits_list=(8, 4),
                  outlier_factor: float = 10.0) -> pd.DataFrame:
    """Calibrate one layer's activations with each method, with and without one outlier.

    The outlier is a single extra activation `outlier_factor` times the largest seen. Each range
    is judged on the clean activations (MSE) and by accuracy when that layer's outputs on
    x_eval are fake-quantized with it (the rest of the model stays float).
    """
    clean = layer_outputs(model, layer_name, x_cal).ravel()
    spiked = np.append(clean, outlier_factor * clean.max()).astype(np.float32)
    acts_eval = layer_outputs(model, layer_name, x_eval)
    tail = _tail(model, layer_name)
    rows = []
    for bits, (label, values), method in product(bits_list, (("no", clean), ("yes", spiked)),
                                                 CALIBRATIONS):
        lo, hi = calibrate(values, method, bits)
        p = params_from_range(lo, hi, bits)
        logits = tail(dequantize(quantize(acts_eval, p), p), training=False).numpy()
        rows.append({"bits": bits, "outlier": label, "method": method, "lo": lo, "hi": hi,
                     "step": float(p.scale), "mse_clean": range_mse(clean, lo, hi, bits),
                     "accuracy": float(np.mean(np.argmax(logits, axis=1) == y_eval))})
    return pd.DataFrame(rows)
