"""Quantizing a whole model: the TFLite converter and quantization-aware training (notebook 04, sections 6-10).

Owns the one converter and the one QAT in labkit; the pipeline (notebook 07), the search
(notebook 08) and the Ray serving (notebook 06) call them:

1. `converter(model, mode, calibration)`: every TFLite conversion, one of `MODES`
   (float32, float16, dynamic = int8 weights with float activations, int8 = full integer),
   calibrated with `representative_dataset`; `export` writes it through the model cache;
2. reading the result back through `labkit.tflite` to check it against the arithmetic of
   `labkit/quantizers.py` (scales, codes, activation ranges, where the bytes go);
3. `quantize_aware(model, scheme)` and `qat(model, splits, plan, scheme=...)`: tfmot's
   quantization-aware training, one of `QAT_SCHEMES`, cached by the input model's weights;
4. `benchmark()` (``python -m labkit.quantization``): the notebook's targets, measured in one run.

The quantizer math by hand (uniform, k-means, calibration) is in `labkit/quantizers.py`.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import labkit  # sets the legacy-Keras switch before TensorFlow loads
import numpy as np
import pandas as pd

from labkit import ARTIFACTS_DIR, folding, machine, measure, models, quantizers, tflite

QUANT_DIR = ARTIFACTS_DIR / "quantization"
MODES = ("float32", "float16", "dynamic", "int8")      # post-training converter modes
QAT_SCHEMES = ("qat", "pcqat", "cqat", "pqat")         # plain; prune+cluster, cluster, prune preserving
QAT_PLAN = models.FineTune(train_subset=20_000, learning_rate=1e-4)   # notebook 04's QAT: one pass, 20,000 images
BYTES_PER_SCALE = 4        # a .tflite stores each scale as float32 ...
BYTES_PER_ZERO_POINT = 8   # ... and each zero point as int64


# ============================================================================ 1. the converter

def representative_dataset(x: np.ndarray, num_samples: int = 500, seed: int = 0):
    """A generator function for the converter: `num_samples` images of x (all of them, in order, if fewer)."""
    x = np.asarray(x, np.float32)
    if x.ndim < 2 or len(x) == 0:
        raise ValueError(f"the representative dataset needs at least one image, got an array of shape "
                         f"{x.shape}: the converter calibrates the int8 activation ranges on it")
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    pick = np.sort(np.random.default_rng(seed).choice(len(x), min(num_samples, len(x)), replace=False))

    def images():
        for i in pick:
            yield [x[i:i + 1]]
    return images


def is_quantize_aware(model) -> bool:
    """True for a tfmot QAT model (it carries its own activation ranges, so int8 needs no calibration)."""
    return any(type(layer).__name__ in ("QuantizeWrapper", "QuantizeWrapperV2", "QuantizeLayer")
               for layer in model.layers)


def converter(model, mode: str, calibration: np.ndarray | None = None, *, int8_io: bool = True,
              sparse: bool = False, num_samples: int = 500):
    """The TFLite converter for one mode; write its file with models.save_tflite (or use `export`).

    float32: no optimization. float16: float16 weights, widened to float32 when the model loads.
    dynamic: int8 weights, float activations quantized on the fly at run time.
    int8: int8 weights and activations (integer ops only), ranges calibrated on `calibration`
    (not needed for a quantization-aware model, which learned them); int8 input and output, or
    float32 ones (a QUANTIZE op first, a DEQUANTIZE op last) with int8_io=False.
    sparse: also store sparse weights compactly (EXPERIMENTAL_SPARSITY).
    """
    import tensorflow as tf
    if mode not in MODES:
        hint = ' ("dynamic-range" is now called "dynamic")' if mode == "dynamic-range" else ""
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}{hint}")
    aware = is_quantize_aware(model)
    if mode != "int8" and calibration is not None:
        raise ValueError(f"only int8 mode uses calibration images; {mode!r} needs none")
    if mode == "int8" and calibration is None and not aware:
        raise ValueError("int8 mode needs calibration images (for example from the training split) to "
                         "set the activation ranges; only a quantization-aware model can do without")
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = ([] if mode == "float32" else [tf.lite.Optimize.DEFAULT]) + \
        ([tf.lite.Optimize.EXPERIMENTAL_SPARSITY] if sparse else [])
    if mode == "float16":
        conv.target_spec.supported_types = [tf.float16]
    if mode == "int8":
        if calibration is not None:   # (a QAT model without it: the converter refuses integer-only ops)
            conv.representative_dataset = representative_dataset(calibration, num_samples)
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if int8_io:
            conv.inference_input_type = conv.inference_output_type = tf.int8
    return conv


def _data_key(x) -> str | None:
    """Ten hex digits of an image array's bytes (which calibration images a file was made with)."""
    if x is None:
        return None
    x = np.ascontiguousarray(x, np.float32)
    return hashlib.sha256(str(x.shape).encode() + x.tobytes()).hexdigest()[:10]


def export(model, mode: str, calibration: np.ndarray | None = None, *, name: str | None = None,
           directory: Path = QUANT_DIR, int8_io: bool = True, sparse: bool = False,
           num_samples: int = 500) -> Path:
    """The model converted in `mode`, as a .tflite file from the model cache (built on the first call).

    The entry is keyed by the model's weights, the settings and the calibration images, so a
    different model or other images never get a stale file.
    """
    settings = {"mode": mode, "int8_io": int8_io, "sparse": sparse, "num_samples": num_samples,
                "calibration": _data_key(calibration)}

    def build():
        return converter(model, mode, calibration, int8_io=int8_io, sparse=sparse,
                         num_samples=num_samples), {"mode": mode}
    path, _ = models.cached(name or mode, settings, [model], build, directory, kind="tflite")
    return path


# ============================================================================ 2. reading the file back

def deployed_kernels(model) -> dict:
    """The float kernels the converter quantizes: each batch norm folded into its conv (folding.fold_batchnorm)."""
    folded = folding.fold_batchnorm(model)
    return {name: models.kernel(folded, name) for name in models.weight_layers(folded)}


def _tflite_layout(kernel: np.ndarray) -> np.ndarray:
    """Keras kernel to the .tflite layout: output channels first."""
    if kernel.ndim == 4:   # (kh, kw, in, out) -> (out, kh, kw, in)
        return np.transpose(kernel, (3, 0, 1, 2))
    return kernel.T        # dense (in, out) -> (out, in)


def compare_with_converter(model, path) -> pd.DataFrame:
    """Per layer: labkit's own symmetric per-channel int8 scales and codes against the converter's."""
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
        row = {"layer": name, "stored_dtype": str(theirs["dtype"]), "channels": len(theirs["scales"]),
               "scale_max_rel_diff": float(np.max(np.abs(p.scale - theirs["scales"]) / theirs["scales"])),
               "zero_points_all_0": bool(np.all(theirs["zero_points"] == 0)),
               "codes_equal": float(np.mean(q == theirs["values"])),
               "codes_max_abs_diff": int(np.max(np.abs(q.astype(int) - theirs["values"].astype(int)))),
               "bias_dtype": str(bias["dtype"]) if bias is not None else None, "bias_scale_max_rel_diff": None}
        if bias is not None and len(bias["scales"]) and len(input_scales):
            # an int32 bias counts in units of (input scale x weight scale), channel by channel
            expected = float(input_scales[0]) * theirs["scales"]
            row["bias_scale_max_rel_diff"] = float(np.max(np.abs(bias["scales"] - expected) / expected))
        rows.append(row)
    return pd.DataFrame(rows)


def activation_quantization(path) -> pd.DataFrame:
    """Scale, zero point and the real range they cover, for every tensor an op produces (int8 models)."""
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
    """Where the bytes of a .tflite file go: constant data by dtype, quantization parameters, the rest.

    Constant data are the tensors stored in the file (weights, biases, shape constants).
    Quantization parameters are estimated at 4 bytes per scale and 8 per zero point, for every
    tensor an op uses. The rest is the flatbuffer's structure: ops, tensor names, shapes,
    signatures and metadata.
    """
    ops, tensors = tflite.ops(path), tflite.tensors(path)
    used = {i for column in ("inputs", "outputs") for indices in ops[column] for i in indices if i >= 0}
    tensors = tensors.loc[sorted(used)]   # a kernel's scratch buffers are made at run time, not stored
    parts: dict = {}
    for _, t in tensors[tensors["constant"]].iterrows():
        label = f"{t['dtype'].name} constants"
        parts[label] = parts.get(label, 0) + int(t["bytes"])
    total = measure.size_bytes(path)
    parts["quantization parameters (est.)"] = int(sum(len(s) * BYTES_PER_SCALE + len(z) * BYTES_PER_ZERO_POINT
                                                      for s, z in zip(tensors["scales"], tensors["zero_points"])))
    parts["structure and metadata"] = total - sum(parts.values())
    parts["file"] = total
    return pd.Series(parts, name=Path(path).name)


def size_table(paths: dict) -> pd.DataFrame:
    """size_breakdown of several files side by side ({column name: path}), constants first, file last."""
    table = pd.concat([size_breakdown(path).rename(name) for name, path in paths.items()], axis=1)
    table = table.fillna(0).astype(int)
    constants = sorted(label for label in table.index if label.endswith("constants"))
    return table.loc[constants + ["quantization parameters (est.)", "structure and metadata", "file"]]


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


# ============================================================================ 3. quantization-aware training

def _cluster_preserving_scheme(preserve_sparsity: bool):
    """tfmot's cluster-preserving QAT scheme, with one weight quantizer per layer.

    tfmot's registry hands one weight quantizer to every layer of a kind, and a layer without
    zeros (an unpruned conv1) switches sparsity preservation off on it, for every later conv too:
    conv2 then loses its zeros in training. Each layer gets its own copy here.
    """
    import copy
    from tensorflow_model_optimization.python.core.quantization.keras.collab_opts.cluster_preserve import (
        cluster_preserve_quantize_registry as registry,
        default_8bit_cluster_preserve_quantize_scheme as cluster_preserve)

    class PerLayerRegistry(registry.Default8bitClusterPreserveQuantizeRegistry):
        def get_quantize_config(self, layer):
            config = super().get_quantize_config(layer)
            if hasattr(config, "weight_quantizer"):
                config.weight_quantizer = copy.copy(config.weight_quantizer)
            return config

    class Scheme(cluster_preserve.Default8BitClusterPreserveQuantizeScheme):
        def get_quantize_registry(self):
            return PerLayerRegistry(self.preserve_sparsity)

    return Scheme(preserve_sparsity=preserve_sparsity)


def quantize_aware(model, scheme: str = "qat"):
    """tfmot's QAT model of a *copy* of `model` (the wrappers reuse layers, so never hand over the original).

    qat: tfmot's default 8-bit scheme. cqat keeps the clusters (a clustered model's few shared
    values), pqat keeps the zeros (a pruned model's), pcqat keeps both.
    """
    import tensorflow_model_optimization as tfmot
    from tensorflow_model_optimization.python.core.quantization.keras.collab_opts.prune_preserve import (
        default_8bit_prune_preserve_quantize_scheme as prune_preserve)
    if scheme not in QAT_SCHEMES:
        raise ValueError(f"scheme must be one of {QAT_SCHEMES}, got {scheme!r}")
    schemes = {"qat": None,
               "pcqat": lambda: _cluster_preserving_scheme(preserve_sparsity=True),
               "cqat": lambda: _cluster_preserving_scheme(preserve_sparsity=False),
               "pqat": lambda: prune_preserve.Default8BitPrunePreserveQuantizeScheme()}
    annotated = tfmot.quantization.keras.quantize_annotate_model(models.clone_with_weights(model))
    with labkit.quiet_stderr():
        if schemes[scheme] is None:
            return tfmot.quantization.keras.quantize_apply(annotated)
        return tfmot.quantization.keras.quantize_apply(annotated, schemes[scheme]())


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
        lo_v, hi_v = quantizers.calibrate(quantizers.layer_outputs(float_model, name, x), "minmax")
        lo.assign(lo_v)
        hi.assign(hi_v)
    return activation_ranges(qat_model)


def _write_json(record: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    tmp.replace(path)


def qat(model, splits, plan: models.FineTune = QAT_PLAN, *, scheme: str = "qat", seed_ranges: bool = True,
        calibration_size: int = 1000, name: str | None = None, directory: Path = QUANT_DIR,
        progress: bool = True, callbacks=()):
    """The QAT copy of `model` fine-tuned by `plan`, and its record: from the cache or trained now.

    seed_ranges: start the activation ranges from a min/max calibration of the float model on
    `calibration_size` training images instead of tfmot's [-6, 6]. The cache entry is keyed like
    models.cached (the settings and the input model's weights), but stores the weights only
    (<name>-<key>.weights.h5 and .json): a tfmot QAT model does not load back from a .keras file,
    so it is rebuilt with quantize_aware and the weights are loaded into it.
    """
    if scheme not in QAT_SCHEMES:
        raise ValueError(f"scheme must be one of {QAT_SCHEMES}, got {scheme!r}")
    settings = {"plan": asdict(plan), "scheme": scheme, "seed_ranges": seed_ranges,
                "calibration_size": calibration_size, "weight_quantizers": "per layer"}
    inputs = [models.weights_key(model)]
    key = models.settings_key({"settings": settings, "inputs": inputs})
    stem = Path(directory) / f"{name or scheme}-{key}"
    weights_path, record_path = stem.with_name(stem.name + ".weights.h5"), stem.with_suffix(".json")
    qat_model = quantize_aware(model, scheme)
    if weights_path.is_file() and record_path.is_file():
        qat_model.load_weights(weights_path)
        return qat_model, {**json.loads(record_path.read_text()), "cached": True}
    start = time.perf_counter()
    if seed_ranges:
        x, _ = plan.subset(splits.x_train, splits.y_train)
        seed_activation_ranges(qat_model, model, x[:calibration_size])
    fit = models.fine_tune(qat_model, splits, plan, callbacks=callbacks, progress=progress,
                           description=f"{scheme} fine-tune")
    record = {**fit, "settings": settings, "inputs": inputs, "build_seconds": time.perf_counter() - start,
              "trained_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = weights_path.with_name(stem.name + ".tmp.weights.h5")
    qat_model.save_weights(tmp)
    tmp.replace(weights_path)
    _write_json(record, record_path)   # last: an entry counts only when both files exist
    return qat_model, {**record, "cached": False}


# ============================================================================ 4. the targets, in one run

def benchmark(repeats: int = 300, warmup: int = 30, threads: int = 1, progress: bool = False) -> dict:
    """Build (or reuse) the float, PTQ and QAT models, measure them in one run and print the targets."""
    from labkit.data import load_mnist
    splits = load_mnist()
    baseline, _ = models.load_or_train_baseline(progress=progress)
    paths = {"baseline-float32-tflite": models.baseline_tflite()}
    for mode in ("dynamic", "int8", "float16"):
        paths[f"quantization-ptq-{mode}"] = export(baseline, mode, splits.x_train if mode == "int8" else None,
                                                   name=f"ptq-{mode}")
    qat_model, _ = qat(baseline, splits, QAT_PLAN, progress=progress)
    paths["quantization-qat-int8"] = export(qat_model, "int8", name="qat-int8")
    base, int8, qat_label = "baseline-float32-tflite", "quantization-ptq-int8", "quantization-qat-int8"
    table, _ = measure.side_by_side(paths, splits.x_test, splits.y_test, latency_images=splits.x_test[:200],
                                    reference=base, repeats=repeats, warmup=warmup, threads=threads)
    figures = {
        "size_ratio": table.loc[base, "size_bytes"] / table.loc[int8, "size_bytes"],
        "accuracy_drop_points": 100 * (table.loc[base, "accuracy"] - table.loc[int8, "accuracy"]),
        "p50_ratio": table.loc[int8, "speedup_p50"],
        "qat_minus_ptq_points": 100 * (table.loc[qat_label, "accuracy"] - table.loc[int8, "accuracy"]),
    }
    breakdown = size_table({"float32": paths[base], "int8": paths[int8]})
    print(f"machine: {machine.machine_string()}")
    print(f"LiteRT, {threads} thread(s), batch 1, {repeats} interleaved calls each; accuracy on the "
          f"{len(splits.y_test)} test images")
    with pd.option_context("display.width", 200):
        print(table.drop(columns="artifact").round(4).to_string())
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
