"""Reading .tflite files: ops, input/output types, tensors and weights (notebooks 01-08).

The spine's one reader of the flatbuffer a converter writes. Every notebook that asks "what is
in the file?" (which ops run, in which dtype; the int8 weights and their scales; how big the
activation arena is) asks it here, and this is the only module that calls the interpreter's
private helpers (`_get_ops_details`). A weight tensor belongs to a layer by one rule,
`layer_of`, so every notebook names the weights of a file the same way.
"""
from __future__ import annotations

import re
from pathlib import Path

import labkit
import numpy as np
import pandas as pd

WEIGHT_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
# Layer-like parts of a tensor name: the book's conv1, conv2, dense1, logits, factor layers such as
# dense1_a, and any other name a Keras layer gave the tensor.
_LAYER_LIKE = re.compile(r"^(conv\d+|dense\d+|logits)(_[a-z0-9]+)?$")


def check(path) -> Path:
    """The path, if it is a .tflite flatbuffer; FileNotFoundError or ValueError saying what is wrong."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No .tflite file at {path}. Convert one first (labkit.models.save_tflite).")
    if not path.is_file():
        raise ValueError(f"{path} is a directory, but a .tflite model is one file "
                         "(a directory with saved_model.pb is a SavedModel: use measure.saved_model).")
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8 or head[4:8] != b"TFL3":
        raise ValueError(f"{path} is not a TFLite model: a .tflite flatbuffer carries the identifier "
                         f"b'TFL3' at bytes 4-8, this file has {head[4:8]!r}.")
    return path


def interpreter(path, num_threads: int | None = None):
    """A LiteRT interpreter on `path` with tensors allocated and no delegate, so every tensor stays readable."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    path = check(path)
    try:
        with labkit.quiet_stderr():
            found = Interpreter(model_path=str(path), num_threads=num_threads,
                                experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
            found.allocate_tensors()
    except ValueError as error:
        raise ValueError(f"{path} is not a valid .tflite model: {error}") from None
    return found


def layer_of(tensor_name: str, layers) -> str | None:
    """The layer a tensor belongs to: the first part of its name (split at '/' and ';') in `layers`.

    Converters name tensors after the Keras layers they come from, e.g.
    "baseline_cnn/conv2/Conv2D;baseline_cnn/bn2/FusedBatchNormV3": that tensor is conv2's. A
    quantization-aware model wraps each layer as quant_<layer>: "quant_conv2/..." is conv2's too.
    """
    layers = set(layers)
    for part in re.split(r"[/;]", tensor_name):
        name = part[len("quant_"):] if part.startswith("quant_") else part
        if name in layers:
            return name
    return None


def _layer_like(tensor_name: str) -> str | None:
    for part in re.split(r"[/;]", tensor_name):
        name = part[len("quant_"):] if part.startswith("quant_") else part
        if _LAYER_LIKE.match(name):
            return name
    return None


def _op_details(found) -> list:
    return found._get_ops_details()


def _flatbuffer(path):
    """The parsed flatbuffer (LiteRT's generated schema classes): what the interpreter does not expose."""
    from ai_edge_litert import schema_py_generated as schema
    return schema.ModelT.InitFromPackedBuf(bytearray(check(path).read_bytes()), 0)


def _enum_names(enum_class) -> dict:
    return {v: k for k, v in vars(enum_class).items() if not k.startswith("_")}


def ops(path) -> pd.DataFrame:
    """One row per op in execution order: op name, fused activation, output shape, tensor indices."""
    from ai_edge_litert import schema_py_generated as schema
    model = _flatbuffer(path)
    names, activations = _enum_names(schema.BuiltinOperator), _enum_names(schema.ActivationFunctionType)
    graph = model.subgraphs[0]
    rows = []
    for op in graph.operators:
        code = model.operatorCodes[op.opcodeIndex]
        # Codes above 127 live in builtinCode; older files keep the rest in deprecatedBuiltinCode.
        builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
        fused = getattr(op.builtinOptions, "fusedActivationFunction", None)
        rows.append({"op": names.get(builtin, f"custom/{builtin}"),
                     "fused_activation": activations[fused] if fused is not None else "",
                     "output_shape": tuple(int(d) for d in graph.tensors[op.outputs[0]].shape),
                     "inputs": [int(i) for i in op.inputs], "outputs": [int(i) for i in op.outputs]})
    return pd.DataFrame(rows, columns=["op", "fused_activation", "output_shape", "inputs", "outputs"])


def delegated_ops(path, num_threads: int = 1) -> pd.DataFrame:
    """The ops as an interpreter with XNNPACK (LiteRT's default CPU delegate) runs them.

    Each op XNNPACK takes over disappears into a DELEGATE op; what stays outside runs on LiteRT's
    built-in kernels. Columns op, inputs, outputs (tensor indices), in execution order.
    """
    from ai_edge_litert.interpreter import Interpreter
    path = check(path)
    with labkit.quiet_stderr():
        found = Interpreter(model_path=str(path), num_threads=num_threads)
        found.allocate_tensors()
    return pd.DataFrame([{"op": d["op_name"], "inputs": [int(i) for i in d["inputs"]],
                          "outputs": [int(i) for i in d["outputs"]]} for d in _op_details(found)],
                        columns=["op", "inputs", "outputs"])


def op_names(path) -> list[str]:
    """The ops of a .tflite model in execution order (no delegate applied)."""
    return list(ops(path)["op"])


def io_dtypes(path) -> tuple:
    """(input dtype, output dtype) of a .tflite model, as NumPy dtypes."""
    found = interpreter(path)
    return (np.dtype(found.get_input_details()[0]["dtype"]),
            np.dtype(found.get_output_details()[0]["dtype"]))


def tensors(path) -> pd.DataFrame:
    """Every tensor of the file: name, dtype, shape, bytes, quantization, and whether it is stored in it.

    A tensor is `constant` (a weight or bias, stored in the file) when no op produces it and it
    is not a graph input.
    """
    found = interpreter(path)
    produced = {i for d in _op_details(found) for i in d["outputs"]}
    graph_inputs = {d["index"] for d in found.get_input_details()}
    rows = []
    for t in found.get_tensor_details():
        q = t["quantization_parameters"]
        shape = tuple(int(s) for s in t["shape"])
        rows.append({"index": int(t["index"]), "name": t["name"], "dtype": np.dtype(t["dtype"]),
                     "shape": shape, "bytes": int(np.prod(shape)) * np.dtype(t["dtype"]).itemsize,
                     "scales": q["scales"], "zero_points": q["zero_points"],
                     "quantized_dimension": int(q["quantized_dimension"]),
                     "constant": t["index"] not in produced and t["index"] not in graph_inputs})
    return pd.DataFrame(rows).set_index("index")


def weights(path, layers=None) -> dict:
    """The weight operand of every conv and fully connected op, as the file stores it, by layer.

    Each entry: values (output channel first), dtype, scales, zero_points, quantized_dimension,
    op, tensor (its name), op_index, and bias (the bias values, or None). Keyed by `layer_of` over
    `layers` (None: layer-like names such as conv2, dense1, dense1_a, logits), or by the tensor
    name when no layer matches. A float16 file widens its weights with a DEQUANTIZE op; the
    stored float16 tensor is followed back and returned.
    """
    found = interpreter(path)
    details = {t["index"]: t for t in found.get_tensor_details()}
    op_list = _op_details(found)
    widened = {d["outputs"][0]: d["inputs"][0] for d in op_list if d["op_name"] == "DEQUANTIZE"}
    out = {}
    for op_index, d in enumerate(op_list):
        if d["op_name"] not in WEIGHT_OPS:
            continue
        index = widened.get(d["inputs"][1], d["inputs"][1])
        t = details[index]
        name = layer_of(t["name"], layers) if layers is not None else _layer_like(t["name"])
        bias_index = d["inputs"][2] if len(d["inputs"]) > 2 and d["inputs"][2] >= 0 else None
        q = t["quantization_parameters"]
        out[name or t["name"]] = {
            "values": found.get_tensor(index).copy(), "dtype": np.dtype(t["dtype"]),
            "scales": q["scales"], "zero_points": q["zero_points"],
            "quantized_dimension": int(q["quantized_dimension"]), "op": d["op_name"], "tensor": t["name"],
            "op_index": op_index,
            "bias": None if bias_index is None else found.get_tensor(widened.get(bias_index, bias_index)).copy()}
    return out


def arena_bytes(path) -> dict:
    """Activation memory a LiteRT model needs: every non-constant tensor, and the peak of those alive at once.

    LiteRT's arena planner places tensors whose lifetimes do not overlap in the same bytes,
    so its arena sits between `planned_peak_bytes` (the best any plan can do) and
    `all_activations_bytes` (no reuse at all).
    """
    found = interpreter(path)
    op_list = _op_details(found)
    details = {t["index"]: t for t in found.get_tensor_details()}
    produced = {i for op in op_list for i in op["outputs"]}
    graph_inputs = {d["index"] for d in found.get_input_details()}
    activations = produced | graph_inputs

    def nbytes(index):
        t = details[index]
        return int(np.prod(t["shape"])) * np.dtype(t["dtype"]).itemsize

    first = {i: -1 for i in graph_inputs}
    last = {}
    for step, op in enumerate(op_list):
        for i in op["outputs"]:
            first.setdefault(i, step)
        for i in op["inputs"]:
            if i in activations:
                last[i] = step
    for d in found.get_output_details():
        last[d["index"]] = len(op_list)
    peak = max(sum(nbytes(i) for i in activations if first.get(i, -1) <= step <= last.get(i, first.get(i, -1)))
               for step in range(len(op_list)))
    return {"all_activations_bytes": sum(nbytes(i) for i in activations), "planned_peak_bytes": peak}
