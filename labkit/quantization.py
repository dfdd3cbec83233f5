"""Quantizing a whole model: the one TFLite converter and the one quantization-aware training.

`converter(model, mode, calibration)` makes every TFLite conversion, one of `MODES` (float32,
float16, dynamic = int8 weights with float activations, int8 = full integer); `export` writes it
through the model cache. `compare_with_converter`, `activation_quantization` and `size_breakdown`
read the file back against `labkit/quantizers.py`. `quantize_aware` and `qat` are tfmot's QAT, one
of `QAT_SCHEMES`, cached by the input model's weights. The pipeline, the search and the serving
call them; `python -m labkit.targets.quantization` measures the chapter's figures.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

import labkit  # sets the legacy-Keras switch before TensorFlow loads

tf = labkit.import_tensorflow_quietly(start_runtime=False)
import tensorflow_model_optimization as tfmot  # noqa: E402

from labkit import ARTIFACTS_DIR, files, folding, measure, models, quantizers, tflite  # noqa: E402

QUANT_DIR = ARTIFACTS_DIR / "quantization"
MODES = ("float32", "float16", "dynamic", "int8")      # post-training converter modes
QAT_SCHEMES = ("qat", "pcqat", "cqat", "pqat")   # plain; prune+cluster, cluster, prune preserving
QAT_PLAN = models.FineTune(train_subset=20_000, learning_rate=1e-4)   # one pass, 20,000 images
BYTES_PER_SCALE = 4        # a .tflite stores each scale as float32 ...
BYTES_PER_ZERO_POINT = 8   # ... and each zero point as int64


# ============================================================================ 1. the converter

def representative_dataset(x: np.ndarray, num_samples: int = 500, seed: int = 0):
    """A generator function for the converter: `num_samples` images of x (all of them, in order,
    if fewer)."""
    x = np.asarray(x, np.float32)
    if x.ndim < 2 or len(x) == 0:
        raise ValueError(f"the representative dataset needs at least one image, got an array of "
                         f"shape {x.shape}: the converter calibrates the int8 activation ranges "
                         "on it")
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(x), min(num_samples, len(x)), replace=False))

    def images():
        for i in pick:
            yield [x[i:i + 1]]
    return images


def is_quantize_aware(model) -> bool:
    """True for a tfmot QAT model (it carries its own activation ranges, so int8 needs no
    calibration)."""
    return any(type(layer).__name__ in ("QuantizeWrapper", "QuantizeWrapperV2", "QuantizeLayer")
               for layer in model.layers)


def converter(model, mode: str, calibration: np.ndarray | None = None, *,
              int8_io: bool = True, sparse: bool = False, num_samples: int = 500):
    """The TFLite converter for one mode; write its file with models.save_tflite (or use `export`).

    float32: no optimization. float16: float16 weights, widened to float32 when the model loads.
    dynamic: int8 weights, float activations quantized on the fly at run time.
    int8: int8 weights and activations (integer ops only), ranges calibrated on `calibration`
    (not needed for a quantization-aware model, which learned them); int8 input and output, or
    float32 ones (a QUANTIZE op first, a DEQUANTIZE op last) with int8_io=False.
    sparse: also store sparse weights compactly (EXPERIMENTAL_SPARSITY).
    """
    if mode not in MODES:
        hint = ' ("dynamic-range" is now called "dynamic")' if mode == "dynamic-range" else ""
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}{hint}")
    aware = is_quantize_aware(model)
    if mode != "int8" and calibration is not None:
        raise ValueError(f"only int8 mode uses calibration images; {mode!r} needs none")
    if mode == "int8" and calibration is None and not aware:
        raise ValueError("int8 mode needs calibration images (for example from the training split) "
                         "to set the activation ranges; only a quantization-aware model can do "
                         "without")
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = ([] if mode == "float32" else [tf.lite.Optimize.DEFAULT]) + \
        ([tf.lite.Optimize.EXPERIMENTAL_SPARSITY] if sparse else [])
    if mode == "float16":
        conv.target_spec.supported_types = [tf.float16]
    if mode == "int8":
        # (a QAT model without calibration: the converter refuses integer-only ops)
        if calibration is not None:
            conv.representative_dataset = representative_dataset(calibration, num_samples)
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if int8_io:
            conv.inference_input_type = conv.inference_output_type = tf.int8
    return conv


def export(model, mode: str, calibration: np.ndarray | None = None, *, name: str | None = None,
           directory: Path = QUANT_DIR, int8_io: bool = True, sparse: bool = False,
           num_samples: int = 500) -> Path:
    """The model converted in `mode`, as a .tflite file from the model cache (built on the first
    call).

    The entry is keyed by the model's weights, the settings and the calibration images, so a
    different model or other images never get a stale file.
    """
    images = None if calibration is None else np.ascontiguousarray(calibration, np.float32)
    settings = {"mode": mode, "int8_io": int8_io, "sparse": sparse, "num_samples": num_samples,
                "calibration": None if images is None else files.content_key(images)}

    def build():
        return converter(model, mode, calibration, int8_io=int8_io, sparse=sparse,
                         num_samples=num_samples), {"mode": mode}
    path, _ = models.cached(name or mode, settings, [model], build, directory, kind="tflite")
    return path


# ========================================================================= 2. reading the file back

def deployed_kernels(model) -> dict:
    """The float kernels the converter quantizes: each batch norm folded into its conv
    (folding.fold_batchnorm)."""
    folded = folding.fold_batchnorm(model)
    return {name: models.kernel(folded, name) for name in models.weight_layers(folded)}


def _tflite_layout(kernel: np.ndarray) -> np.ndarray:
    """Keras kernel to the .tflite layout: output channels first."""
    if kernel.ndim == 4:   # (kh, kw, in, out) -> (out, kh, kw, in)
        return np.transpose(kernel, (3, 0, 1, 2))
    return kernel.T        # dense (in, out) -> (out, in)


def compare_with_converter(model, path) -> pd.DataFrame:
    """Per layer: labkit's own symmetric per-channel int8 scales and codes against the
    converter's."""
    ours = deployed_kernels(model)
    stored = tflite.weights(path, layers=list(ours))
    ops, tensors = tflite.ops(path), tflite.tensors(path)
    rows = []
    for name, kernel in ours.items():
        if name not in stored:
            continue
        theirs = stored[name]
        w = _tflite_layout(kernel)
        p = quantizers.symmetric_params(w, 8, axis=theirs["quantized_dimension"])
        q = quantizers.quantize(w, p)
        inputs = ops.iloc[theirs["op_index"]]["inputs"]
        bias = tensors.loc[inputs[2]] if len(inputs) > 2 and inputs[2] >= 0 else None
        input_scales = tensors.loc[inputs[0], "scales"]
        scales, codes = theirs["scales"], theirs["values"]
        row = {"layer": name, "stored_dtype": str(theirs["dtype"]), "channels": len(scales),
               "scale_max_rel_diff": float(np.max(np.abs(p.scale - scales) / scales)),
               "zero_points_all_0": bool(np.all(theirs["zero_points"] == 0)),
               "codes_equal": float(np.mean(q == codes)),
               "codes_max_abs_diff": int(np.max(np.abs(q.astype(int) - codes.astype(int)))),
               "bias_dtype": str(bias["dtype"]) if bias is not None else None,
               "bias_scale_max_rel_diff": None}
        if bias is not None and len(bias["scales"]) and len(input_scales):
            # an int32 bias counts in units of (input scale x weight scale), channel by channel
            expected = float(input_scales[0]) * scales
            row["bias_scale_max_rel_diff"] = float(np.max(np.abs(bias["scales"] - expected)
                                                          / expected))
        rows.append(row)
    return pd.DataFrame(rows)


def activation_quantization(path) -> pd.DataFrame:
    """Scale, zero point and the real range they cover, for every tensor an op produces (int8
    models)."""
    tensors = tflite.tensors(path)
    rows = []
    ops = tflite.ops(path)
    for op, outputs in zip(ops["op"], ops["outputs"]):
        for index in outputs:
            t = tensors.loc[index]
            if len(t["scales"]) != 1:
                continue
            info = np.iinfo(t["dtype"])
            scale, zero_point = float(t["scales"][0]), int(t["zero_points"][0])
            rows.append({"op": op, "name": t["name"], "shape": t["shape"], "scale": scale,
                         "zero_point": zero_point, "lo": scale * (info.min - zero_point),
                         "hi": scale * (info.max - zero_point)})
    return pd.DataFrame(rows)


def size_breakdown(path) -> pd.Series:
    """Where the bytes of a .tflite file go: constant data by dtype, quantization parameters, the
    rest.

    Constant data are the tensors stored in the file (weights, biases, shape constants).
    Quantization parameters are estimated at 4 bytes per scale and 8 per zero point, for every
    tensor an op uses. The rest is the flatbuffer's structure: ops, tensor names, shapes,
    signatures and metadata.
    """
    ops, tensors = tflite.ops(path), tflite.tensors(path)
    used = {i for column in ("inputs", "outputs") for indices in ops[column] for i in indices
            if i >= 0}
    # a kernel's scratch buffers are made at run time, not stored
    tensors = tensors.loc[sorted(used)]
    parts: dict = {}
    for _, t in tensors[tensors["constant"]].iterrows():
        label = f"{t['dtype'].name} constants"
        parts[label] = parts.get(label, 0) + int(t["bytes"])
    total = measure.size_bytes(path)
    parts["quantization parameters (est.)"] = int(sum(
        len(s) * BYTES_PER_SCALE + len(z) * BYTES_PER_ZERO_POINT
        for s, z in zip(tensors["scales"], tensors["zero_points"])))
    parts["structure and metadata"] = total - sum(parts.values())
    parts["file"] = total
    return pd.Series(parts, name=Path(path).name)


def size_table(paths: dict) -> pd.DataFrame:
    """size_breakdown of several files side by side ({column name: path}), constants first,
    file last."""
    table = pd.concat([size_breakdown(path).rename(name) for name, path in paths.items()], axis=1)
    table = table.fillna(0).astype(int)
    constants = sorted(label for label in table.index if label.endswith("constants"))
    rest = ["quantization parameters (est.)", "structure and metadata", "file"]
    return table.loc[constants + rest]


def io_conversion_runner(path, name: str = "int8 I/O conversion only") -> measure.Runner:
    """Only the NumPy work measure.litert does around an int8 model: quantize the input,
    dequantize an output.

    Timed beside the int8 runner, it shows how much of that runner's latency is the caller's
    float-to-int8 conversion rather than the model.
    """
    model = measure.LiteRTModel(path, num_threads=1)
    if model.input["dtype"] == np.float32:
        raise ValueError(f"{path} takes float32 input: there is no int8 conversion to time")
    (in_scale, in_zero) = model.input["quantization"]
    (out_scale, out_zero) = model.output["quantization"]
    info = np.iinfo(model.input["dtype"])
    output = np.zeros(model.output["shape"], model.output["dtype"])

    def run(x):
        np.clip(np.round(x / in_scale + in_zero), info.min, info.max).astype(
            model.input["dtype"])
        return (output.astype(np.float32) - out_zero) * out_scale
    return measure.Runner(name, run, "the input's float32-to-int8 quantization and the output's "
                          "dequantization in NumPy, no model")


# =================================================================== 3. quantization-aware training

def _cluster_preserving_scheme(preserve_sparsity: bool):
    """tfmot's cluster-preserving QAT scheme, with one weight quantizer per layer.

    tfmot's registry hands one weight quantizer to every layer of a kind, and a layer without
    zeros (an unpruned conv1) switches sparsity preservation off on it, for every later conv too:
    conv2 then loses its zeros in training. Each layer gets its own copy here.
    """
    cluster_preserve = tfmot.experimental.combine.Default8BitClusterPreserveQuantizeScheme
    # the scheme's registry class, which tfmot keeps out of its public API
    registry = type(cluster_preserve(preserve_sparsity).get_quantize_registry())

    class PerLayerRegistry(registry):
        def get_quantize_config(self, layer):
            config = super().get_quantize_config(layer)
            if hasattr(config, "weight_quantizer"):
                config.weight_quantizer = copy.copy(config.weight_quantizer)
            return config

    class Scheme(cluster_preserve):
        def get_quantize_registry(self):
            return PerLayerRegistry(self.preserve_sparsity)

    return Scheme(preserve_sparsity=preserve_sparsity)


def quantize_aware(model, scheme: str = "qat"):
    """tfmot's QAT model of a *copy* of `model` (the wrappers reuse layers, so never hand over
    the original).

    qat: tfmot's default 8-bit scheme. cqat keeps the clusters (a clustered model's few shared
    values), pqat keeps the zeros (a pruned model's), pcqat keeps both.
    """
    if scheme not in QAT_SCHEMES:
        raise ValueError(f"scheme must be one of {QAT_SCHEMES}, got {scheme!r}")
    schemes = {"qat": None,
               "pcqat": lambda: _cluster_preserving_scheme(preserve_sparsity=True),
               "cqat": lambda: _cluster_preserving_scheme(preserve_sparsity=False),
               "pqat": lambda: tfmot.experimental.combine.Default8BitPrunePreserveQuantizeScheme()}
    annotated = tfmot.quantization.keras.quantize_annotate_model(models.clone_with_weights(model))
    with labkit.quiet_stderr():
        if schemes[scheme] is None:
            return tfmot.quantization.keras.quantize_apply(annotated)
        return tfmot.quantization.keras.quantize_apply(annotated, schemes[scheme]())


def _activation_quantizers(qat_model) -> list:
    """(wrapped layer name, min variable, max variable) of each activation quantizer in a QAT
    model."""
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
        below = (-lo_v if lo_v < 0 else 0.0) / (hi_v - lo_v) if hi_v > lo_v else 0.0
        rows.append({"layer": name, "min": lo_v, "max": hi_v, "codes_below_zero": below})
    return pd.DataFrame(rows)


def seed_activation_ranges(qat_model, float_model, x: np.ndarray) -> pd.DataFrame:
    """Set each activation quantizer's range to the float model's min/max on x (a calibration).

    tfmot starts every range at [-6, 6] and moves it by an exponential average with decay 0.999
    per training step, so after a short fine-tune a ReLU output still keeps a negative minimum.
    """
    for name, lo, hi in _activation_quantizers(qat_model):
        outputs = quantizers.layer_outputs(float_model, name, x)
        lo_v, hi_v = quantizers.calibrate(outputs, "minmax")
        lo.assign(lo_v)
        hi.assign(hi_v)
    return activation_ranges(qat_model)


def qat(model, splits, plan: models.FineTune = QAT_PLAN, *, scheme: str = "qat",
        seed_ranges: bool = True, calibration_size: int = 1000, name: str | None = None,
        directory: Path = QUANT_DIR, progress: bool = True, callbacks=()):
    """The QAT copy of `model` fine-tuned by `plan`, and its record: from the cache or trained now.

    seed_ranges: start the activation ranges from a min/max calibration of the float model on
    `calibration_size` training images instead of tfmot's [-6, 6]. The entry comes from
    models.cached (keyed by the settings and the input model's weights) and holds the weights
    only (<name>-<key>.weights.h5 and .json): a tfmot QAT model does not load back from a .keras
    file, so it is rebuilt with quantize_aware and the weights are loaded into it.
    """
    if scheme not in QAT_SCHEMES:
        raise ValueError(f"scheme must be one of {QAT_SCHEMES}, got {scheme!r}")
    settings = {"plan": asdict(plan), "scheme": scheme, "seed_ranges": seed_ranges,
                "calibration_size": calibration_size, "weight_quantizers": "per layer"}

    def build():
        qat_model = quantize_aware(model, scheme)
        if seed_ranges:
            x, _ = plan.subset(splits.x_train, splits.y_train)
            seed_activation_ranges(qat_model, model, x[:calibration_size])
        fit = models.fine_tune(qat_model, splits, plan, callbacks=callbacks, progress=progress,
                               description=f"{scheme} fine-tune")
        return qat_model, {**fit, "trained_at": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def load(path):
        qat_model = quantize_aware(model, scheme)
        qat_model.load_weights(path)
        return qat_model

    store = models.Store(".weights.h5", lambda qat_model, path: qat_model.save_weights(path), load)
    return models.cached(name or scheme, settings, [model], build, directory, kind=store)
