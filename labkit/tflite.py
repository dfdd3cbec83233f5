"""Reading .tflite files: ops, input/output types, tensors and weights.

The spine's one reader of the flatbuffer a converter writes. Every notebook that asks "what is
in the file?" (which ops run, in which dtype; the int8 weights and their scales; how big the
activation arena is) asks it here, and this is the only module that calls the interpreter's
private helpers (`_get_ops_details`). A weight tensor belongs to a layer by one rule,
`layer_of`, so every notebook names the weights of a file the same way.
"""
from __future__ import annotations

import gzip
import re
from pathlib import Path

import flatbuffers
import ml_dtypes
import numpy as np
import pandas as pd
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.interpreter import Interpreter, OpResolverType

import labkit

WEIGHT_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
# Layer-like parts of a tensor name: the book's conv1, conv2, dense1, logits, factor layers such as
# dense1_a, and any other name a Keras layer gave the tensor.
_LAYER_LIKE = re.compile(r"^(conv\d+|dense\d+|logits)(_[a-z0-9]+)?$")


def check(path) -> Path:
    """The path, if it is a .tflite flatbuffer; FileNotFoundError or ValueError saying what is
    wrong."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No .tflite file at {path}. Convert one first "
                                "(labkit.models.save_tflite).")
    if not path.is_file():
        raise ValueError(f"{path} is a directory, but a .tflite model is one file "
                         "(a directory with saved_model.pb is a SavedModel: use "
                         "measure.saved_model).")
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8 or head[4:8] != b"TFL3":
        raise ValueError(f"{path} is not a TFLite model: a .tflite flatbuffer carries the "
                         f"identifier b'TFL3' at bytes 4-8, this file has {head[4:8]!r}.")
    return path


def interpreter(path, num_threads: int | None = None):
    """A LiteRT interpreter on `path` with tensors allocated and no delegate, so every tensor
    stays readable."""
    path = check(path)
    builtin = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    try:
        with labkit.quiet_stderr():
            found = Interpreter(model_path=str(path), num_threads=num_threads,
                                experimental_op_resolver_type=builtin)
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


def layer_like(tensor_name: str) -> str | None:
    """The layer a tensor belongs to without a list of layers: its first layer-like name part
    (conv2, dense1, dense1_a, logits), or None; the rule `weights` uses when given no layers."""
    return _layer_like(tensor_name)


def _op_details(found) -> list:
    return found._get_ops_details()


def _flatbuffer(path):
    """The parsed flatbuffer (LiteRT's generated schema classes): what the interpreter does not
    expose."""
    return schema.ModelT.InitFromPackedBuf(bytearray(check(path).read_bytes()), 0)


def _enum_names(enum_class) -> dict:
    return {v: k for k, v in vars(enum_class).items() if not k.startswith("_")}


def ops(path) -> pd.DataFrame:
    """One row per op in execution order: op name, fused activation, output shape, tensors."""
    model = _flatbuffer(path)
    names = _enum_names(schema.BuiltinOperator)
    activations = _enum_names(schema.ActivationFunctionType)
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
                     "inputs": [int(i) for i in op.inputs],
                     "outputs": [int(i) for i in op.outputs]})
    return pd.DataFrame(rows, columns=["op", "fused_activation", "output_shape", "inputs",
                                       "outputs"])


def delegated_ops(path, num_threads: int = 1) -> pd.DataFrame:
    """The ops as an interpreter with XNNPACK (LiteRT's default CPU delegate) runs them.

    The interpreter still lists every original op, plus one DELEGATE op per partition XNNPACK took
    over; which ops a partition holds follows from its inputs and outputs (litert_quant.xnnpack_ops
    works it out). Columns op, inputs, outputs (tensor indices), in execution order.
    """
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
    """Every tensor of the file: name, dtype, shape, bytes, quantization, whether the file
    stores it.

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
            "quantized_dimension": int(q["quantized_dimension"]), "op": d["op_name"],
            "tensor": t["name"], "op_index": op_index,
            "bias": None if bias_index is None
            else found.get_tensor(widened.get(bias_index, bias_index)).copy()}
    return out


def arena_bytes(path) -> dict:
    """Activation memory a LiteRT model needs: every non-constant tensor, and the peak of those
    alive at once.

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
    peak = max(sum(nbytes(i) for i in activations
                   if first.get(i, -1) <= step <= last.get(i, first.get(i, -1)))
               for step in range(len(op_list)))
    return {"all_activations_bytes": sum(nbytes(i) for i in activations),
            "planned_peak_bytes": peak}


# ------------------------------------------------------------------------- as stored in the file

def _unpack_int4(data: np.ndarray, count: int) -> np.ndarray:
    """Signed 4-bit codes, two to a byte (low nibble first), as int8."""
    low, high = (data & 0x0F).astype(np.int8), (data >> 4).astype(np.int8)
    codes = np.stack([low, high], axis=1).reshape(-1)[:count]
    return np.where(codes > 7, codes - 16, codes).astype(np.int8)


def _buffer_data(model, raw: bytes, buffer: int) -> np.ndarray | None:
    """A buffer's bytes: inside the flatbuffer, or (files over 2 GB, and ai-edge-quantizer's output)
    appended after it and found by offset and size."""
    if buffer >= len(model.buffers):
        return None
    b = model.buffers[buffer]
    if b.data is not None:
        return np.asarray(b.data, np.uint8)
    if b.offset > 1 and b.size:
        return np.frombuffer(raw, np.uint8, count=b.size, offset=b.offset)
    return None


def stored_tensors(path) -> pd.DataFrame:
    """Every tensor as the flatbuffer stores it, which the interpreter does not say.

    The interpreter reports an INT4 tensor as int8 with one byte per weight; the file packs two
    codes to a byte. Columns: name, type (the schema's name: FLOAT32, INT8, INT4, ...), shape,
    stored_bytes (the tensor's buffer; 0 for activations), scales, zero_points,
    quantized_dimension, block_size (blockwise quantization: weights per scale; 0 otherwise) and
    scales_tensor (the tensor index holding a blockwise tensor's scales, else -1).
    """
    model, raw = _flatbuffer(path), check(path).read_bytes()
    names = _enum_names(schema.TensorType)
    rows = []
    for index, t in enumerate(model.subgraphs[0].tensors):
        data = _buffer_data(model, raw, t.buffer)
        q, block_size, scales_tensor = t.quantization, 0, -1
        if q is not None and q.detailsType == schema.QuantizationDetails.BlockwiseQuantization:
            block_size, scales_tensor = int(q.details.blockSize), int(q.details.scales)
        scales = q.scale if q is not None and q.scale is not None else []
        zero_points = q.zeroPoint if q is not None and q.zeroPoint is not None else []
        rows.append({"index": index,
                     "name": t.name.decode() if isinstance(t.name, bytes) else t.name,
                     "type": names.get(t.type, str(t.type)),
                     "shape": tuple(int(d) for d in (t.shape if t.shape is not None else ())),
                     "stored_bytes": 0 if data is None else len(data),
                     "scales": np.asarray(scales, np.float32),
                     "zero_points": np.asarray(zero_points, np.int64),
                     "quantized_dimension": int(q.quantizedDimension) if q is not None else 0,
                     "block_size": block_size, "scales_tensor": scales_tensor})
    return pd.DataFrame(rows).set_index("index")


def stored_values(path, index: int) -> np.ndarray:
    """The values of constant tensor `index` as stored: INT4 codes unpacked to int8, others as
    their dtype."""
    model = _flatbuffer(path)
    t = model.subgraphs[0].tensors[index]
    data = _buffer_data(model, check(path).read_bytes(), t.buffer)
    if data is None:
        raise ValueError(f"tensor {index} ({t.name!r}) has no data in the file: "
                         "it is an activation")
    shape = tuple(int(d) for d in t.shape)
    dtypes = {schema.TensorType.FLOAT32: np.float32, schema.TensorType.FLOAT16: np.float16,
              schema.TensorType.INT32: np.int32, schema.TensorType.INT8: np.int8,
              schema.TensorType.UINT8: np.uint8,
              schema.TensorType.INT64: np.int64, schema.TensorType.INT16: np.int16,
              schema.TensorType.BFLOAT16: ml_dtypes.bfloat16}
    if t.type == schema.TensorType.INT4:
        return _unpack_int4(data, int(np.prod(shape))).reshape(shape)
    if t.type not in dtypes:
        raise ValueError(f"tensor {index} has type {_enum_names(schema.TensorType)[t.type]}, "
                         "which this reader does not decode")
    return data.view(dtypes[t.type]).reshape(shape)


def structure_bytes(path) -> dict:
    """Bytes of a file that are not tensor data (graph, names, quantization parameters), raw and
    gzipped.

    Measured by writing the same flatbuffer with every buffer emptied: what no weight
    compression can remove.
    """
    model = _flatbuffer(path)
    data_bytes = sum(len(b.data) if b.data is not None else b.size for b in model.buffers)
    for b in model.buffers:
        b.data, b.offset, b.size = None, 0, 0
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    empty = bytes(builder.Output())
    return {"file_bytes": check(path).stat().st_size, "data_bytes": data_bytes,
            "structure_bytes": len(empty),
            "structure_gzip_bytes": len(gzip.compress(empty, compresslevel=9, mtime=0))}
