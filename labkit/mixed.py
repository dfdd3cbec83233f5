"""Mixed precision: int8 everywhere except the layers that int8 hurts, which stay float32.

TFLite's quantization debugger on a calibrated int8 conversion (`debugger`, `layer_statistics`),
its denylist (`denylist`, `nodes_of`: graph node names, not Keras names; an unknown one is ignored
without a word), a mixed model (`mixed_tflite`), each layer's precision (`op_precisions`), the
per-layer sensitivity (`sensitivity`) and the layers to keep in float (`fragile_layers`). The
conversion is quantization.converter's, int8 with float input and output (a float first or last
layer takes and gives floats); the search offers "mixed" as one of its quantization modes.
"""
from __future__ import annotations

import io
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

import labkit  # sets the legacy-Keras switch before TensorFlow loads

tf = labkit.import_tensorflow_quietly(start_runtime=False)  # its C++ start-up lines, kept quiet

from labkit import measure, models, quantization, tflite  # noqa: E402

CALIBRATION_IMAGES = 200   # images for the int8 ranges (the first of the training split)


def debugger(model, calibration: np.ndarray, debug_images: int = 50):
    """TFLite's quantization debugger on a calibrated int8 conversion, and its per-op statistics.

    The debugger keeps the calibrated model: `denylist` then reconverts it with chosen nodes
    left in float, without calibrating again. Returns (debugger, layer_statistics table).
    """
    conv = quantization.converter(model, "int8", calibration, int8_io=False,
                                  num_samples=len(calibration))
    with (models.converter_messages("the quantization debugger's calibration"),
          warnings.catch_warnings()):
        warnings.simplefilter("ignore")
        images = quantization.representative_dataset(calibration, num_samples=debug_images)
        debug = tf.lite.experimental.QuantizationDebugger(converter=conv, debug_dataset=images)
        debug.run()
    return debug, layer_statistics(debug, models.weight_layers(model))


def denylist(debug, nodes) -> bytes:
    """The debugger's model quantized to int8 except the graph nodes `nodes`, which stay float32.

    The names are the graph's node names, as in the statistics' tensor_name column. A name the
    graph does not have is ignored without a word: see nodes_of.
    """
    with (models.converter_messages(f"the conversion with {list(nodes)} left in float"),
          warnings.catch_warnings()):
        warnings.simplefilter("ignore")
        debug.options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=list(nodes))
        return debug.get_nondebug_quantized_model()


def nodes_of(stats: pd.DataFrame, layers) -> list:
    """The graph node names of Keras layers, read from the debugger's statistics."""
    unknown = set(layers) - set(stats["layer"])
    if unknown:
        raise ValueError(f"layers {sorted(unknown)} have no conv or fully-connected op in the "
                         f"converted graph; its layers are {sorted(set(stats['layer']) - {''})}")
    return list(stats.loc[stats["layer"].isin(list(layers)), "tensor_name"])


def layer_statistics(debug, layer_names) -> pd.DataFrame:
    """The debugger's per-op statistics, each row with the Keras layer of its op ('' for ops
    without weights).

    RMSE is in units of the int8 step (scale): a uniform quantizer's own rounding noise is
    1/sqrt(12) = 0.29 steps, so a layer well above that loses more than rounding. A layer is
    found by its op's weight tensor (tflite.layer_of): output tensors are not always named after
    their layer (the last one is the signature's StatefulPartitionedCall:0).
    """
    buffer = io.StringIO()
    debug.layer_statistics_dump(buffer)
    buffer.seek(0)
    stats = pd.read_csv(buffer)
    # the debug model, as a file labkit.tflite can read
    with tempfile.TemporaryDirectory() as scratch:
        path = models.save_tflite(debug.quant_model, Path(scratch) / "debug.tflite")
        names = tflite.tensors(path)["name"]
        layer_of_output = {}
        for _, op in tflite.ops(path).iterrows():
            if op["op"] in tflite.WEIGHT_OPS:
                layer = tflite.layer_of(names[op["inputs"][1]], layer_names) or ""
                layer_of_output.update({index: layer for index in op["outputs"]})
    stats["layer"] = stats["tensor_idx"].map(layer_of_output).fillna("")
    stats["rmse_in_steps"] = np.sqrt(stats["mean_squared_error"]) / stats["scale"]
    return stats


def op_precisions(path, layer_names) -> pd.DataFrame:
    """Per conv / fully-connected op of a .tflite: its Keras layer and the dtypes of its weights
    and input."""
    op_table, dtypes = tflite.ops(path), tflite.tensors(path)["dtype"]
    rows = [{"layer": layer, "op": w["op"], "weights": w["dtype"].name,
             "input": np.dtype(dtypes[op_table.loc[w["op_index"], "inputs"][0]]).name}
            for layer, w in tflite.weights(path, layer_names).items()]
    return pd.DataFrame(rows).set_index("layer")


def mixed_tflite(model, calibration: np.ndarray, float_layers, path) -> Path:
    """int8 everywhere except `float_layers` (Keras names), which keep float32 weights and
    activations."""
    debug, stats = debugger(model, calibration)
    return models.save_tflite(denylist(debug, nodes_of(stats, float_layers)), path)


def sensitivity(model, calibration, x_val, y_val, directory: Path,
                progress: bool = True) -> pd.DataFrame:
    """Which layers int8 hurts. Per conv / dense layer: its weights, the debugger's error in int8
    steps, and the validation accuracy when that layer alone stays float (gain: against
    all-int8)."""
    directory = Path(directory)
    debug, stats = debugger(model, calibration, debug_images=len(calibration))
    all_int8 = models.save_tflite(denylist(debug, []), directory / "all-int8.tflite")
    base = measure.accuracy(measure.litert(all_int8), x_val, y_val)
    rows = []
    for layer in labkit.progress_bar(models.weight_layers(model), desc="one layer in float",
                                     disable=not progress):
        path = models.save_tflite(denylist(debug, nodes_of(stats, [layer])),
                                  directory / f"float-{layer}.tflite")
        error = stats.loc[stats["layer"] == layer, "rmse_in_steps"].max()
        rows.append({"layer": layer, "weights": int(models.kernel(model, layer).size),
                     "rmse_in_steps": float(error),
                     "val_accuracy": measure.accuracy(measure.litert(path), x_val, y_val)})
    table = pd.DataFrame(rows).set_index("layer")
    table["gain"] = table["val_accuracy"] - base
    table.attrs["all_int8_val_accuracy"] = base
    return table


def fragile_layers(table: pd.DataFrame, max_layers: int = 2) -> list:
    """The layers to keep in float: largest validation gain first, ties broken by the larger
    error in int8 steps; at most `max_layers`, and only layers whose float copy gains anything
    (else the one with the largest error, so that mixed differs from all-int8)."""
    if max_layers < 1:
        raise ValueError(f"max_layers must be >= 1, got {max_layers}")
    ranked = table.sort_values(["gain", "rmse_in_steps"], ascending=False)
    chosen = list(ranked[ranked["gain"] > 0].index[:max_layers])
    return chosen or list(ranked.index[:1])
