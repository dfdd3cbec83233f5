"""Quantization from the arithmetic up to a deployed int8 model (notebook 04).

Read it top to bottom, in the notebook's order:

1. uniform quantizers in NumPy (affine and symmetric; per tensor or per channel) and a
   non-uniform one (a k-means codebook), used to fake-quantize the baseline's weights;
2. activation calibration (min/max, percentile, MSE) and what one outlier does to each;
3. post-training quantization with the TFLite converter, and reading the result back
   through the LiteRT interpreter to check it against the NumPy arithmetic;
4. quantization-aware training with tfmot, and its conversion to an int8 model;
5. ``benchmark()`` (``python -m labkit.quantization``): the issue's targets, measured in one run.

Conventions follow the TFLite int8 scheme: ``real = scale * (q - zero_point)``; signed integer
codes; weights symmetric (zero point 0) on the narrow range [-127, 127]; activations affine on
[-128, 127]. Keras kernels keep output channels on the last axis.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from itertools import product
from pathlib import Path

import labkit  # sets the legacy-Keras switch before TensorFlow loads
import numpy as np
import pandas as pd

from labkit import ARTIFACTS_DIR, measure, models

QUANT_DIR = ARTIFACTS_DIR / "quantization"
MIN_BITS, MAX_BITS = 1, 16
SCHEMES = ("affine", "symmetric", "kmeans")
CALIBRATIONS = ("minmax", "percentile", "mse")
PTQ_MODES = ("dynamic-range", "int8", "float16")
BYTES_PER_SCALE = 4        # a .tflite stores each scale as float32 ...
BYTES_PER_ZERO_POINT = 8   # ... and each zero point as int64


# ============================================================================ 1. uniform quantizers

def check_bits(bits) -> int:
    """The bit width as an int; a ValueError that names the allowed range otherwise."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be a whole number from {MIN_BITS} to {MAX_BITS}, got {bits!r}")
    return int(bits)


def check_axis(x: np.ndarray, axis) -> int | None:
    """None means one range for the whole tensor; an axis means one range per slice along it."""
    if axis is None:
        return None
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis!r} does not exist for an array of shape {x.shape}: use None "
                         f"(per tensor) or a channel axis from {-x.ndim} to {x.ndim - 1} (per channel)")
    return int(axis) % x.ndim


def _per_channel(fn, x: np.ndarray, axis: int | None) -> np.ndarray:
    """fn (np.min, np.max, ...) over everything but `axis`: a scalar, or one value per channel."""
    if axis is None:
        return np.asarray(fn(x))
    return fn(x, axis=tuple(i for i in range(x.ndim) if i != axis))


def _along(values: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
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


def params_from_range(lo, hi, bits: int, symmetric: bool = False, axis: int | None = None) -> QuantParams:
    """Scale and zero point that cover [lo, hi] (widened to include 0, so zero is exact)."""
    bits = check_bits(bits)
    lo = np.minimum(np.asarray(lo, np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, np.float64), 0.0)
    if symmetric:
        if bits < 2:
            raise ValueError("symmetric quantization needs bits >= 2: one bit has no room for "
                             "negative, zero and positive codes (use the affine scheme)")
        qmax = 2 ** (bits - 1) - 1
        qmin = -qmax                      # narrow range: -128 stays unused, so the grid is symmetric
        scale = np.maximum(-lo, hi) / qmax
        zero_point = np.zeros_like(scale, dtype=np.int64)
    else:
        qmin, qmax = -2 ** (bits - 1), 2 ** (bits - 1) - 1
        scale = (hi - lo) / (qmax - qmin)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)   # an all-zero tensor: any scale works
    if not symmetric:
        zero_point = np.clip(np.round(qmin - lo / scale), qmin, qmax).astype(np.int64)
    return QuantParams(scale, zero_point, qmin, qmax, bits, axis)


def affine_params(x: np.ndarray, bits: int, axis: int | None = None) -> QuantParams:
    """Asymmetric: the codes span [min(x), max(x)], so the zero point moves with the data."""
    x = np.asarray(x)
    axis = check_axis(x, axis)
    return params_from_range(_per_channel(np.min, x, axis), _per_channel(np.max, x, axis), bits, False, axis)


def symmetric_params(x: np.ndarray, bits: int, axis: int | None = None) -> QuantParams:
    """Symmetric: zero point 0 and scale = max|x| / qmax, as TFLite quantizes weights."""
    x = np.asarray(x)
    axis = check_axis(x, axis)
    return params_from_range(_per_channel(np.min, x, axis), _per_channel(np.max, x, axis), bits, True, axis)


def quantize(x: np.ndarray, p: QuantParams) -> np.ndarray:
    """Real values to integer codes (int8 up to 8 bits, int16 above)."""
    x = np.asarray(x, np.float32)
    scale = _along(p.scale, x.ndim, p.axis)
    zero_point = _along(p.zero_point, x.ndim, p.axis)
    q = np.clip(np.round(x / scale) + zero_point, p.qmin, p.qmax)
    return q.astype(np.int8 if p.bits <= 8 else np.int16)


def dequantize(q: np.ndarray, p: QuantParams) -> np.ndarray:
    scale = _along(p.scale, q.ndim, p.axis)
    zero_point = _along(p.zero_point, q.ndim, p.axis)
    return ((q.astype(np.int64) - zero_point) * scale).astype(np.float32)


# ---------------------------------------------------------------------------- non-uniform: k-means

def kmeans_1d(values: np.ndarray, n_clusters: int, iterations: int = 50):
    """Lloyd's k-means on a line: (sorted centroids, label of each value).

    Starts from evenly spaced centroids between min and max (the "linear" start that tfmot's
    clustering also uses). In one dimension each cluster is an interval, so assignment is a
    binary search against the midpoints between neighbouring centroids. A centroid that no
    value picks is a wasted level: it moves to the value that is worst served so far.
    """
    values = np.asarray(values, np.float64).ravel()
    if values.size == 0:
        raise ValueError("k-means needs at least one value")
    centroids = np.linspace(values.min(), values.max(), n_clusters)
    for _ in range(iterations):
        labels = np.searchsorted((centroids[1:] + centroids[:-1]) / 2, values)
        counts = np.bincount(labels, minlength=n_clusters)
        sums = np.bincount(labels, weights=values, minlength=n_clusters)
        updated = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
        empty = np.flatnonzero(counts == 0)
        error = np.abs(values - updated[labels])
        if empty.size and error.max() > 0:
            order = np.argsort(-error, kind="stable")[:np.count_nonzero(error)]
            _, first = np.unique(values[order], return_index=True)   # distinct values, worst first
            worst = values[order][np.sort(first)][:empty.size]
            updated[empty[:worst.size]] = worst
            updated = np.sort(updated)
        if np.allclose(updated, centroids, rtol=0, atol=1e-12):
            break
        centroids = updated
    labels = np.searchsorted((centroids[1:] + centroids[:-1]) / 2, values)
    return centroids, labels


def kmeans_quantize(x: np.ndarray, bits: int, axis: int | None = None) -> np.ndarray:
    """Every value replaced by the nearest of 2**bits learned levels (one codebook per channel with axis)."""
    bits = check_bits(bits)
    x = np.asarray(x, np.float32)
    axis = check_axis(x, axis)
    if axis is None:
        centroids, labels = kmeans_1d(x, 2 ** bits)
        return centroids[labels].reshape(x.shape).astype(np.float32)
    moved = np.moveaxis(x, axis, 0)
    out = np.stack([kmeans_quantize(channel, bits) for channel in moved])
    return np.moveaxis(out, 0, axis)


def fake_quantize(x: np.ndarray, bits: int, scheme: str = "affine", axis: int | None = None) -> np.ndarray:
    """Quantize then dequantize: float values that carry exactly the error of the integer codes."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if scheme == "kmeans":
        return kmeans_quantize(x, bits, axis)
    params = (affine_params if scheme == "affine" else symmetric_params)(x, bits, axis)
    return dequantize(quantize(x, params), params)


def sqnr_db(x: np.ndarray, x_hat: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB: each bit is worth about 6 dB to a uniform quantizer."""
    x, x_hat = np.asarray(x, np.float64), np.asarray(x_hat, np.float64)
    noise = np.sum((x - x_hat) ** 2)
    return float("inf") if noise == 0 else float(10 * np.log10(np.sum(x ** 2) / noise))


# ---------------------------------------------------------------------------- the baseline's weights

def kernels(model) -> dict:
    """Kernel of every Conv2D and Dense layer by layer name (output channels on the last axis)."""
    import tf_keras as keras
    return {layer.name: layer.kernel.numpy() for layer in model.layers
            if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))}


def weight_sweep(model, x, y, bits_list=(8, 6, 4, 2), schemes=SCHEMES, progress: bool = True) -> pd.DataFrame:
    """Fake-quantize every kernel with each scheme, granularity and bit width; SQNR and accuracy of each.

    Only kernels are quantized here (biases and batch norms stay float), so this isolates the
    error of the weight codes. One row per setting, plus a float32 reference row.
    """
    for bits in bits_list:
        check_bits(bits)
    work = models.clone_with_weights(model)   # the caller's model keeps its weights
    runner = measure.tf_function(work, name="fake-quantized")
    originals = kernels(model)
    flat = np.concatenate([w.ravel() for w in originals.values()])
    rows = [{"scheme": "float32", "granularity": "-", "bits": 32, "sqnr_db": float("inf"),
             "accuracy": measure.accuracy(runner, x, y)}]
    settings = list(product(schemes, ("per-tensor", "per-channel"), bits_list))
    for scheme, granularity, bits in labkit.progress_bar(settings, desc="weight sweep", disable=not progress):
        quantized = {}
        for name, w in originals.items():
            quantized[name] = fake_quantize(w, bits, scheme, axis=-1 if granularity == "per-channel" else None)
            work.get_layer(name).kernel.assign(quantized[name])
        noisy = np.concatenate([w.ravel() for w in quantized.values()])
        rows.append({"scheme": scheme, "granularity": granularity, "bits": bits,
                     "sqnr_db": sqnr_db(flat, noisy), "accuracy": measure.accuracy(runner, x, y)})
    return pd.DataFrame(rows)


# ============================================================================ 2. activation calibration

def layer_outputs(model, layer_name: str, x: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """What one layer outputs for the images x (the values an activation quantizer must cover)."""
    import tf_keras as keras
    probe = keras.Model(model.input, model.get_layer(layer_name).output)
    return np.concatenate([probe(x[i:i + batch_size], training=False).numpy()
                           for i in range(0, len(x), batch_size)])


def range_mse(values: np.ndarray, lo: float, hi: float, bits: int) -> float:
    """Mean squared error of affine-quantizing `values` with the range [lo, hi] (clipping included)."""
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
    values = np.asarray(values, np.float32).ravel()
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
    import tf_keras as keras
    names = [layer.name for layer in model.layers]
    start = names.index(layer_name) + 1
    inputs = keras.Input(model.get_layer(layer_name).output.shape[1:])
    x = inputs
    for layer in model.layers[start:]:
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
    for bits, (label, values), method in product(bits_list, (("no", clean), ("yes", spiked)), CALIBRATIONS):
        lo, hi = calibrate(values, method, bits)
        p = params_from_range(lo, hi, bits)
        logits = tail(dequantize(quantize(acts_eval, p), p), training=False).numpy()
        rows.append({"bits": bits, "outlier": label, "method": method, "lo": lo, "hi": hi,
                     "step": float(p.scale), "mse_clean": range_mse(clean, lo, hi, bits),
                     "accuracy": float(np.mean(np.argmax(logits, axis=1) == y_eval))})
    return pd.DataFrame(rows)


# ============================================================================ 3. post-training quantization

def representative_dataset(x: np.ndarray, num_samples: int = 500, seed: int = 0):
    """A generator function for the converter: `num_samples` images of x, one per call, fixed by seed."""
    x = np.asarray(x, np.float32)
    if x.ndim != 4 or len(x) == 0:
        raise ValueError(f"the representative dataset needs at least one image of shape (n, 28, 28, 1), "
                         f"got an array of shape {x.shape}: the converter calibrates int8 ranges on it")
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    pick = np.sort(np.random.default_rng(seed).choice(len(x), min(num_samples, len(x)), replace=False))

    def images():
        for i in pick:
            yield [x[i:i + 1]]
    return images


def ptq_converter(model, mode: str, representative: np.ndarray | None = None, num_samples: int = 500):
    """A TFLite converter for one post-training mode.

    dynamic-range: int8 weights, float activations (quantized on the fly at run time).
    int8: int8 weights and activations, ranges calibrated on `representative`; int8 input and output.
    float16: float16 weights, dequantized to float32 when the model loads.
    """
    import tensorflow as tf
    if mode not in PTQ_MODES:
        raise ValueError(f"mode must be one of {PTQ_MODES}, got {mode!r}")
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "int8":
        if representative is None:
            raise ValueError("int8 mode needs representative images (for example from the training "
                             "split) to calibrate the activation ranges")
        converter.representative_dataset = representative_dataset(representative, num_samples)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    elif representative is not None:
        raise ValueError(f"only int8 mode uses representative images; {mode!r} needs none")
    if mode == "float16":
        converter.target_spec.supported_types = [tf.float16]
    return converter


def convert(converter, path) -> Path:
    """Run a converter and write the .tflite file (its MLIR log lines silenced)."""
    import warnings
    with labkit.quiet_stderr(), warnings.catch_warnings():
        # int8 input without "quantized input stats" is fine here: the ranges come from calibration or QAT
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs were expected")
        return models.save_tflite(converter, path)


def _interpreter(path):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    with labkit.quiet_stderr():  # no delegate: every tensor of the file stays readable
        interpreter = Interpreter(model_path=str(path),
                                  experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        interpreter.allocate_tensors()
    return interpreter


def io_dtypes(path) -> tuple:
    """(input dtype, output dtype) of a .tflite model, as numpy dtypes."""
    interpreter = _interpreter(path)
    return (np.dtype(interpreter.get_input_details()[0]["dtype"]),
            np.dtype(interpreter.get_output_details()[0]["dtype"]))


def weight_tensors(path) -> list:
    """Weights and bias of every conv and fully connected op as stored in the file, read through the interpreter.

    Each entry: op, tensor name, role, dtype, shape, per-channel scales and zero points, the
    quantized dimension, the stored values, and the scale of the op's input activation.
    """
    interpreter = _interpreter(path)
    details = {t["index"]: t for t in interpreter.get_tensor_details()}
    ops = interpreter._get_ops_details()
    # float16 files store weights in float16 and widen them with a DEQUANTIZE op: follow it back
    widened = {op["outputs"][0]: op["inputs"][0] for op in ops if op["op_name"] == "DEQUANTIZE"}
    out = []
    for op_index, op in enumerate(ops):
        if op["op_name"] not in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
            continue
        input_scales = details[op["inputs"][0]]["quantization_parameters"]["scales"]
        for role, index in zip(("weights", "bias"), op["inputs"][1:3]):
            if index < 0:  # an op without bias
                continue
            index = widened.get(index, index)
            t = details[index]
            q = t["quantization_parameters"]
            out.append({"op_index": op_index, "op": op["op_name"], "name": t["name"], "role": role,
                        "dtype": np.dtype(t["dtype"]),
                        "shape": tuple(int(s) for s in t["shape"]), "scales": q["scales"],
                        "zero_points": q["zero_points"], "quantized_dimension": q["quantized_dimension"],
                        "values": interpreter.get_tensor(index),
                        "input_scale": float(input_scales[0]) if len(input_scales) else None})
    return out


def activation_quantization(path) -> pd.DataFrame:
    """Scale, zero point and the real range they cover, for every tensor an op produces (int8 models)."""
    interpreter = _interpreter(path)
    details = {t["index"]: t for t in interpreter.get_tensor_details()}
    rows = []
    for op in interpreter._get_ops_details():
        for index in op["outputs"]:
            t = details[index]
            scales, zero_points = t["quantization_parameters"]["scales"], t["quantization_parameters"]["zero_points"]
            if len(scales) != 1:
                continue
            info = np.iinfo(t["dtype"])
            scale, zero_point = float(scales[0]), int(zero_points[0])
            rows.append({"op": op["op_name"], "name": t["name"], "shape": tuple(int(v) for v in t["shape"]),
                         "scale": scale, "zero_point": zero_point,
                         "lo": scale * (info.min - zero_point), "hi": scale * (info.max - zero_point)})
    return pd.DataFrame(rows)


def io_conversion_runner(path, name: str = "int8 I/O conversion only") -> measure.Runner:
    """Only the NumPy work measure.litert does around an int8 model: quantize the input, dequantize an output.

    Timed beside the int8 runner, it shows how much of that runner's latency is the caller's
    float-to-int8 conversion rather than the model.
    """
    model = measure.LiteRTModel(path, num_threads=1)
    if model.input["dtype"] == np.float32:
        raise ValueError(f"{path} takes float32 input: there is no int8 conversion to time")
    (in_scale, in_zero), (out_scale, out_zero) = model.input["quantization"], model.output["quantization"]
    info = np.iinfo(model.input["dtype"])
    output = np.zeros(model.output["shape"], model.output["dtype"])

    def run(x):
        np.clip(np.round(x / in_scale + in_zero), info.min, info.max).astype(model.input["dtype"])
        return (output.astype(np.float32) - out_zero) * out_scale
    return measure.Runner(name, run, "the input's float32-to-int8 quantization and the output's "
                          "dequantization in NumPy, no model")


def deployed_kernels(model) -> dict:
    """The float kernels the converter will quantize: each batch norm folded into the conv before it.

    A BatchNormalization after a conv scales each output channel by gamma / sqrt(var + eps),
    so the converter multiplies that factor into the conv's kernel (and moves the shift into a
    bias) before it computes the per-channel scales.
    """
    import tf_keras as keras
    out = kernels(model)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            source = layer.inbound_nodes[0].inbound_layers
            if isinstance(source, keras.layers.Conv2D):
                gamma = layer.gamma.numpy() if layer.scale else 1.0
                out[source.name] = out[source.name] * (gamma / np.sqrt(layer.moving_variance.numpy() + layer.epsilon))
    return out


def _tflite_layout(kernel: np.ndarray) -> np.ndarray:
    """Keras kernel to the .tflite layout: output channels first."""
    if kernel.ndim == 4:   # (kh, kw, in, out) -> (out, kh, kw, in)
        return np.transpose(kernel, (3, 0, 1, 2))
    return kernel.T        # dense (in, out) -> (out, in)


def compare_with_converter(model, path) -> pd.DataFrame:
    """Per layer: labkit's own symmetric per-channel int8 scales and codes against the converter's."""
    ours = deployed_kernels(model)
    tensors = weight_tensors(path)
    rows = []
    for tensor in (t for t in tensors if t["role"] == "weights"):
        matches = [name for name in ours if f"/{name}/" in tensor["name"] or tensor["name"].startswith(f"{name}/")]
        if len(matches) != 1:
            continue
        name = matches[0]
        w = _tflite_layout(ours[name])
        p = symmetric_params(w, 8, axis=tensor["quantized_dimension"])
        q = quantize(w, p)
        theirs = tensor["values"]
        bias = next((t for t in tensors if t["role"] == "bias" and t["op_index"] == tensor["op_index"]), None)
        row = {"layer": name, "stored_dtype": str(tensor["dtype"]), "channels": len(tensor["scales"]),
               "scale_max_rel_diff": float(np.max(np.abs(p.scale - tensor["scales"]) / tensor["scales"])),
               "zero_points_all_0": bool(np.all(tensor["zero_points"] == 0)),
               "codes_equal": float(np.mean(q == theirs)),
               "codes_max_abs_diff": int(np.max(np.abs(q.astype(int) - theirs.astype(int)))),
               "bias_dtype": str(bias["dtype"]) if bias else None, "bias_scale_max_rel_diff": None}
        if bias is not None and len(bias["scales"]) and tensor["input_scale"] is not None:
            # an int32 bias counts in units of (input scale x weight scale), channel by channel
            expected = tensor["input_scale"] * tensor["scales"]
            row["bias_scale_max_rel_diff"] = float(np.max(np.abs(bias["scales"] - expected) / expected))
        rows.append(row)
    return pd.DataFrame(rows)


def size_breakdown(path) -> pd.Series:
    """Where the bytes of a .tflite file go: constant data by dtype, quantization parameters, the rest.

    Constant data are the tensors no op produces (weights, biases, shape constants). Quantization
    parameters are estimated at 4 bytes per scale and 8 per zero point, for every tensor. The rest
    is the flatbuffer's structure: ops, tensor names, shapes, signatures and metadata.
    """
    interpreter = _interpreter(path)
    ops = interpreter._get_ops_details()
    produced = {i for op in ops for i in op["outputs"]}
    consumed = {i for op in ops for i in op["inputs"]}
    graph_io = {d["index"] for d in interpreter.get_input_details() + interpreter.get_output_details()}
    parts: dict = {}
    quant_bytes = 0
    for t in interpreter.get_tensor_details():
        if t["index"] not in produced | consumed | graph_io:
            continue  # a kernel's scratch buffer, made at run time, not stored in the file
        q = t["quantization_parameters"]
        quant_bytes += len(q["scales"]) * BYTES_PER_SCALE + len(q["zero_points"]) * BYTES_PER_ZERO_POINT
        if t["index"] in produced or t["index"] in graph_io:
            continue
        label = f"{np.dtype(t['dtype']).name} constants"
        parts[label] = parts.get(label, 0) + int(np.prod(t["shape"])) * np.dtype(t["dtype"]).itemsize
    total = measure.size_bytes(path)
    parts["quantization parameters (est.)"] = quant_bytes
    parts["structure and metadata"] = total - sum(parts.values())
    parts["file"] = total
    return pd.Series(parts, name=Path(path).name)


def size_table(paths: dict) -> pd.DataFrame:
    """size_breakdown of several files side by side ({column name: path}), constants first, file last."""
    table = pd.concat([size_breakdown(path).rename(name) for name, path in paths.items()], axis=1)
    table = table.fillna(0).astype(int)
    constants = sorted(label for label in table.index if label.endswith("constants"))
    return table.loc[constants + ["quantization parameters (est.)", "structure and metadata", "file"]]


# ============================================================================ 4. quantization-aware training

@dataclass(frozen=True)
class QATConfig:
    """Everything that decides a QAT fine-tune; its hash (with the baseline's) names the cache entry."""
    epochs: int = 1
    batch_size: int = 128
    learning_rate: float = 1e-4
    seed: int = 0
    seed_ranges: bool = True       # start activation ranges from a min/max calibration, not tfmot's [-6, 6]
    calibration_size: int = 1000   # training images for that calibration
    train_subset: int | None = None

    def key(self, baseline_key: str = "") -> str:
        return models.settings_key({**asdict(self), "baseline": baseline_key})


def quantize_aware(model):
    """tfmot's QAT model of a *copy* of `model` (the wrappers reuse layers, so never hand over the original)."""
    import tensorflow_model_optimization as tfmot
    with labkit.quiet_stderr():
        return tfmot.quantization.keras.quantize_model(models.clone_with_weights(model))


def _activation_quantizers(qat_model) -> list:
    """(wrapped layer name, min variable, max variable) of each activation quantizer in a QAT model."""
    out = []
    for wrapper in qat_model.layers:
        inner = getattr(wrapper, "layer", None)
        if inner is None:
            continue
        for kind in ("output", "post_activation"):
            lo = [v for v in wrapper.weights if v.name.endswith(f"/{kind}_min:0")]
            hi = [v for v in wrapper.weights if v.name.endswith(f"/{kind}_max:0")]
            if lo and hi:
                out.append((inner.name, lo[0], hi[0]))
    return out


def activation_ranges(qat_model) -> pd.DataFrame:
    """The activation ranges a QAT model holds, and the share of the 256 int8 codes below zero."""
    rows = []
    for name, lo, hi in _activation_quantizers(qat_model):
        lo_v, hi_v = float(lo.numpy()), float(hi.numpy())
        rows.append({"layer": name, "min": lo_v, "max": hi_v,
                     "codes_below_zero": (-lo_v if lo_v < 0 else 0.0) / (hi_v - lo_v) if hi_v > lo_v else 0.0})
    return pd.DataFrame(rows)


def seed_activation_ranges(qat_model, float_model, x: np.ndarray) -> pd.DataFrame:
    """Set each activation quantizer's range to the float model's min/max on x (a calibration).

    tfmot starts every range at [-6, 6] and moves it by an exponential average with decay 0.999
    per training step, so after a short fine-tune a ReLU output still keeps a negative minimum.
    """
    for name, lo, hi in _activation_quantizers(qat_model):
        values = layer_outputs(float_model, name, x)
        lo_v, hi_v = calibrate(values, "minmax")
        lo.assign(lo_v)
        hi.assign(hi_v)
    return activation_ranges(qat_model)


def load_or_train_qat(model, splits, config: QATConfig = QATConfig(),
                      baseline_config: models.BaselineConfig = models.BaselineConfig(),
                      directory: Path = QUANT_DIR, progress: bool = True):
    """The fine-tuned QAT model and its record, from artifacts/quantization/ or trained now."""
    key = config.key(baseline_config.key())
    weights_path = Path(directory) / f"qat-{key}.weights.h5"
    record_path = weights_path.with_name(f"qat-{key}.json")
    qat_model = quantize_aware(model)
    if weights_path.is_file() and record_path.is_file():
        qat_model.load_weights(weights_path)
        return qat_model, json.loads(record_path.read_text())
    x, y = splits.x_train[:config.train_subset], splits.y_train[:config.train_subset]   # None: all
    if config.seed_ranges:
        seed_activation_ranges(qat_model, model, x[:config.calibration_size])
    fit = models.train(qat_model, x, y, epochs=config.epochs, batch_size=config.batch_size,
                       learning_rate=config.learning_rate, seed=config.seed, progress=progress)
    record = {"config": asdict(config), "baseline": baseline_config.key(),
              "train_seconds": fit["train_seconds"],
              "history": fit["history"],
              "trained_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = weights_path.with_name(f"qat-{key}.tmp.weights.h5")
    qat_model.save_weights(tmp)
    tmp.replace(weights_path)
    record_path.write_text(json.dumps(record, indent=1))
    return qat_model, record


def qat_converter(qat_model, int8_io: bool = True):
    """Converter for a QAT model: its ranges are learned, so no representative data is needed.

    Without int8_io the file still computes in int8 inside, but starts with a QUANTIZE op and ends
    with a DEQUANTIZE op, so it takes and returns float32: the trap notebook 04 shows.
    """
    import tensorflow as tf
    converter = tf.lite.TFLiteConverter.from_keras_model(qat_model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if int8_io:
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    return converter


def op_names(path) -> list:
    """The ops of a .tflite model in execution order (no delegate applied)."""
    return [op["op_name"] for op in _interpreter(path)._get_ops_details()]


# ============================================================================ 5. the targets, in one run

def artifact_path(variant: str, baseline_config: models.BaselineConfig = models.BaselineConfig()) -> Path:
    return QUANT_DIR / f"{variant}-{baseline_config.key()}.tflite"


def benchmark(repeats: int = 300, warmup: int = 30, threads: int = 1, progress: bool = False) -> dict:
    """Build (or reuse) the float, PTQ and QAT models, measure them in one run and print the targets."""
    from labkit.data import load_mnist
    splits = load_mnist()
    baseline, _ = models.load_or_train_baseline(progress=progress)
    float_path = models.baseline_tflite()
    paths = {"baseline-float32-tflite": float_path}
    for mode in PTQ_MODES:
        representative = splits.x_train if mode == "int8" else None
        paths[f"quantization-ptq-{mode}"] = convert(ptq_converter(baseline, mode, representative),
                                                    artifact_path(f"ptq-{mode}"))
    qat_model, _ = load_or_train_qat(baseline, splits, progress=progress)
    paths["quantization-qat-int8"] = convert(qat_converter(qat_model), artifact_path("qat-int8"))
    runners = [measure.litert(p, num_threads=threads, name=name) for name, p in paths.items()]
    acc = {r.name: measure.accuracy(r, splits.x_test, splits.y_test) for r in runners}
    latency = measure.measure_latency(runners, splits.x_test[:200], warmup=warmup, repeats=repeats)
    table = latency.summary()[["latency_p50_us", "latency_p95_us"]]
    table.insert(0, "accuracy", pd.Series(acc))
    table.insert(1, "size_bytes", pd.Series({name: measure.size_bytes(p) for name, p in paths.items()}))
    base, int8, qat = "baseline-float32-tflite", "quantization-ptq-int8", "quantization-qat-int8"
    figures = {
        "size_ratio": table.loc[base, "size_bytes"] / table.loc[int8, "size_bytes"],
        "accuracy_drop_points": 100 * (table.loc[base, "accuracy"] - table.loc[int8, "accuracy"]),
        "p50_ratio": table.loc[base, "latency_p50_us"] / table.loc[int8, "latency_p50_us"],
        "qat_minus_ptq_points": 100 * (table.loc[qat, "accuracy"] - table.loc[int8, "accuracy"]),
    }
    breakdown = size_table({"float32": paths[base], "int8": paths[int8]})
    print(f"machine: {measure.machine_string()}")
    print(f"LiteRT, {threads} thread(s), batch 1, {repeats} interleaved calls each; accuracy on the "
          f"{len(splits.y_test)} test images")
    with pd.option_context("display.width", 200):
        print(table.round(4).to_string())
    checks = [
        ("int8 file >= 3.8x smaller than float", figures["size_ratio"] >= 3.8, f"{figures['size_ratio']:.3f}x"),
        ("int8 accuracy lost <= 0.2 points", figures["accuracy_drop_points"] <= 0.2,
         f"{figures['accuracy_drop_points']:+.2f} points"),
        ("int8 p50 >= 1.5x lower than float", figures["p50_ratio"] >= 1.5, f"{figures['p50_ratio']:.2f}x"),
        ("QAT int8 at least as accurate as PTQ int8", figures["qat_minus_ptq_points"] >= 0,
         f"{figures['qat_minus_ptq_points']:+.2f} points"),
    ]
    for label, ok, value in checks:
        print(f"[{'met   ' if ok else 'MISSED'}] {label}: {value}")
    constants_ratio = (breakdown.loc["float32 constants", "float32"]
                       / breakdown.loc[["int8 constants", "int32 constants"], "int8"].sum())
    print("why not 4x: bytes of each file by what they hold")
    print(breakdown.to_string())
    print(f"only the int8 weights shrink 4x: with the int32 biases the constant data shrink {constants_ratio:.3f}x, "
          "and the scales, zero points and the file's structure come on top")
    return {"table": table, "figures": figures, "checks": checks, "breakdown": breakdown, "paths": paths}


def main(argv=None) -> int:
    import argparse
    parser = argparse.ArgumentParser(description="Notebook 04's targets: PTQ and QAT int8 against the float .tflite")
    parser.add_argument("--repeats", type=int, default=300, help="timed calls per model")
    parser.add_argument("--threads", type=int, default=1, help="LiteRT interpreter threads")
    args = parser.parse_args(argv)
    labkit.setup(seed=0)
    benchmark(repeats=args.repeats, threads=args.threads, progress=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
