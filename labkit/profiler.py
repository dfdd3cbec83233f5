"""Where a model's time goes, op by op, on LiteRT and on ONNX Runtime.

LiteRT's Python interpreter has no profiler, so `litert_ops` cuts each op of a .tflite file out
into a model of its own (`one_op_model`) and times every one of them, the whole model and an
almost empty model in one interleaved run. ONNX Runtime has a profiler: `onnx_ops` reads its
trace. `where_time_goes` sets the per-op times against the whole model's time.
"""
from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import flatbuffers
import numpy as np
import pandas as pd
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.interpreter import Interpreter, OpResolverType

import labkit
from labkit import measure, tflite

OVERHEAD_OP = "(invoke and inter-op overhead)"   # the op name of where_time_goes' last row


# ----------------------------------------------------------------------------- cutting a file

def _load(path) -> schema.ModelT:
    """The file as LiteRT's object API sees it, with buffers stored after the flatbuffer read in."""
    raw = tflite.check(path).read_bytes()
    model = schema.ModelT.InitFromPackedBuf(bytearray(raw), 0)
    if len(model.subgraphs) != 1:
        raise ValueError(f"{path} has {len(model.subgraphs)} subgraphs; the profiler cuts "
                         "single-subgraph models only")
    for buffer in model.buffers:
        if buffer.data is None and buffer.offset > 1 and buffer.size:
            buffer.data = np.frombuffer(raw, np.uint8, count=buffer.size, offset=buffer.offset)
            buffer.offset = buffer.size = 0
    return model


def _ops_for(graph, op_index: int) -> list:
    """op_index after the ops that compute its inputs from stored tensors only (a DEQUANTIZE of a
    weight), in execution order: those run once (LiteRT keeps a DEQUANTIZE of a constant after the
    first invoke, XNNPACK folds it into packed weights at init), so they stay with the op; fed as
    a runtime input, the weight would be repacked at every call."""
    if not 0 <= op_index < len(graph.operators):
        raise IndexError(f"op_index {op_index} is out of range: the file has "
                         f"{len(graph.operators)} ops")
    producer = {int(t): i for i, op in enumerate(graph.operators) for t in op.outputs}
    constant_derived = {}   # tensor -> whether it depends on constants only

    def derived(tensor: int) -> bool:
        if tensor < 0 or tensor in graph.inputs:
            return tensor < 0
        if tensor not in producer:
            return True   # stored in the file
        if tensor not in constant_derived:
            op = graph.operators[producer[tensor]]
            constant_derived[tensor] = all(derived(int(t)) for t in op.inputs)
        return constant_derived[tensor]

    chosen, todo = {op_index}, [int(t) for t in graph.operators[op_index].inputs]
    while todo:
        tensor = todo.pop()
        if tensor in producer and derived(tensor) and producer[tensor] not in chosen:
            chosen.add(producer[tensor])
            todo.extend(int(t) for t in graph.operators[producer[tensor]].inputs)
    return sorted(chosen)


def _cut(model: schema.ModelT, op_index: int) -> tuple:
    """(a ModelT that runs op `op_index` alone, its input tensors and output tensors as indices
    of the original file). `model` is left as it was."""
    graph = model.subgraphs[0]
    ops = [graph.operators[i] for i in _ops_for(graph, op_index)]
    produced = {int(t) for op in ops for t in op.outputs}
    used = sorted({int(t) for op in ops for t in [*op.inputs, *op.outputs,
                                                  *(op.intermediates or [])] if t >= 0})

    def stored(t: int) -> bool:   # a weight or other constant the file holds
        buffer = graph.tensors[t].buffer
        return t not in produced and buffer > 0 and model.buffers[buffer].data is not None

    inputs = [t for t in used if t not in produced and not stored(t)]
    outputs = [int(t) for t in graph.operators[op_index].outputs]
    new_index = {old: new for new, old in enumerate(used)}

    def renumber(ts) -> list:   # -1 marks an optional input left out, in any numbering
        return [new_index[int(t)] if t >= 0 else -1 for t in ts]

    buffers, new_buffer, tensors = [schema.BufferT()], {}, []
    for old in used:
        tensor = copy.copy(graph.tensors[old])
        q = tensor.quantization
        if q is not None and q.detailsType == schema.QuantizationDetails.BlockwiseQuantization:
            raise ValueError(f"tensor {old} is blockwise-quantized: its scales live in another "
                             "tensor, which this cutter does not carry over")
        if stored(old):
            if tensor.buffer not in new_buffer:
                new_buffer[tensor.buffer] = len(buffers)
                buffers.append(schema.BufferT(data=model.buffers[tensor.buffer].data))
            tensor.buffer = new_buffer[tensor.buffer]
        else:
            tensor.buffer = 0   # the empty buffer: an activation, planned in the arena
        tensors.append(tensor)
    operators = []
    for op in ops:
        op = copy.copy(op)
        op.inputs, op.outputs = renumber(op.inputs), renumber(op.outputs)
        op.intermediates = renumber(op.intermediates) if op.intermediates is not None else None
        op.debugMetadataIndex = -1
        operators.append(op)
    subgraph = schema.SubGraphT(tensors=tensors, inputs=renumber(inputs),
                                outputs=renumber(outputs), operators=operators,
                                name=f"op{op_index}")
    cut = schema.ModelT(version=model.version, operatorCodes=model.operatorCodes,
                        subgraphs=[subgraph], description=f"op {op_index} of a model",
                        buffers=buffers)
    return cut, inputs, outputs


def _pack(model: schema.ModelT) -> bytes:   # a ModelT as a .tflite flatbuffer
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def one_op_model(path, op_index: int) -> bytes:
    """The flatbuffer of a model that runs op `op_index` of the .tflite file at `path` alone.

    Its inputs are the op's non-constant inputs, its outputs the op's outputs; weights, operator
    codes and quantization come from the file, signature defs and metadata are dropped. An op fed
    by a DEQUANTIZE of a stored weight keeps that DEQUANTIZE in front of it (see `_ops_for`).
    """
    return _pack(_cut(_load(path), op_index)[0])


def trivial_model() -> bytes:
    """The overhead probe: one RELU on a single float32, a model that costs only its invoke.

    XNNPACK takes it, as it takes most ops of the book's files, so it pays what every one-op model
    pays besides its op: Python's call into invoke(), the interpreter's loop and one kernel
    dispatch. Its p50 is what litert_ops subtracts from each one-op model's.
    """
    code, relu = schema.OperatorCodeT(), schema.BuiltinOperator.RELU
    code.builtinCode, code.deprecatedBuiltinCode, code.version = relu, relu, 1
    tensors = [schema.TensorT(), schema.TensorT()]
    for tensor, name in zip(tensors, (b"x", b"y")):
        tensor.shape, tensor.type, tensor.name = [1], schema.TensorType.FLOAT32, name
    op = schema.OperatorT(opcodeIndex=0, inputs=[0], outputs=[1])
    graph = schema.SubGraphT(tensors=tensors, inputs=[0], outputs=[1], operators=[op])
    return _pack(schema.ModelT(version=3, operatorCodes=[code], subgraphs=[graph],
                               buffers=[schema.BufferT()], description="overhead probe"))


# ----------------------------------------------------------------------------- timing LiteRT

def _open(content: bytes, threads: int | None = None, xnnpack: bool = True, **kwargs):
    resolver = OpResolverType.AUTO if xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    with labkit.quiet_stderr():   # "INFO: Created TensorFlow Lite XNNPACK delegate"
        return Interpreter(model_content=content, num_threads=threads,
                           experimental_op_resolver_type=resolver, **kwargs)


def example_input(path, batch: int = 1, seed: int = 0) -> np.ndarray:
    """A batch of random pixels in [0, 1) for the file's input, quantized if the input is."""
    detail = tflite.interpreter(path).get_input_details()[0]
    x = np.random.default_rng(seed).random((batch, *detail["shape"][1:]), dtype=np.float32)
    dtype = np.dtype(detail["dtype"])
    if dtype.kind in "iu":
        scale, zero_point = detail["quantization"]
        info = np.iinfo(dtype)
        x = np.clip(np.round(x / scale + zero_point), info.min, info.max)
    return x.astype(dtype)


def intermediates(path, x: np.ndarray) -> dict:
    """Every tensor's value (by tensor index) after the whole file runs on `x` with built-in
    kernels: what each one-op model is fed, and what its output must equal."""
    found = _open(tflite.check(path).read_bytes(), xnnpack=False,
                  experimental_preserve_all_tensors=True)
    detail = found.get_input_details()[0]
    try:
        found.resize_tensor_input(detail["index"], x.shape)
        found.allocate_tensors()
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"{path} does not run at input shape {x.shape} (a fixed-shape RESHAPE "
                         f"allows batch 1 only): {error}") from None
    found.set_tensor(detail["index"], x)
    found.invoke()
    return {t["index"]: found.get_tensor(t["index"]).copy() for t in found.get_tensor_details()}


def invoke_runner(name: str, content: bytes, feeds: list, threads: int,
                   xnnpack: bool = True) -> measure.Runner:
    """A runner that only invokes, on inputs set once (the ceilings' probes and each one-op
    model are timed so); measure_latency's image is ignored."""
    found = _open(content, threads, xnnpack)
    details = found.get_input_details()
    for detail, value in zip(details, feeds):
        found.resize_tensor_input(detail["index"], value.shape)
    found.allocate_tensors()
    for detail, value in zip(details, feeds):
        found.set_tensor(detail["index"], value)
    runner = measure.Runner(name, lambda _: found.invoke(), "invoke only (inputs set once)",
                            threads=threads)
    runner.interpreter = found
    return runner


def litert_ops(path, *, threads: int = 1, repeats: int = 200, warmup: int = 20,
               batch: int = 1) -> pd.DataFrame:
    """One row per op of the file, in execution order: op_index, op, measured_us, invoke_us.

    invoke_us is the p50 of invoking that op's one-op model (XNNPACK applied, as by default);
    measured_us is it minus the overhead probe's p50 (`trivial_model`), floored at 0. The one-op
    models, the whole model and the probe are timed interleaved in one run. Each one-op model is
    fed what the whole model computes there from `example_input`, at `batch` images (any batch
    the whole file can be resized to). An op whose inputs are all stored in the file (DEQUANTIZE
    of a weight) runs on built-in kernels, which compute it once and keep it, as the whole model
    does (XNNPACK folds it into the next op's weights at init): its row comes out near 0.
    `.attrs`: whole_us, overhead_us, threads, batch.
    """
    if batch < 1 or threads < 1:
        raise ValueError(f"batch and threads must be >= 1, got {batch} and {threads}")
    model, names = _load(path), tflite.op_names(path)
    values = intermediates(path, example_input(path, batch))
    runners = [invoke_runner("whole model", tflite.check(path).read_bytes(),
                              [values[int(model.subgraphs[0].inputs[0])]], threads),
               invoke_runner("overhead probe", trivial_model(),
                              [np.zeros(1, np.float32)], threads)]
    for i in range(len(names)):
        cut, inputs, _ = _cut(model, i)
        # no runtime input (a stored weight's DEQUANTIZE): XNNPACK cannot set up such a graph
        runners.append(invoke_runner(f"op {i}", _pack(cut), [values[t] for t in inputs],
                                      threads, xnnpack=bool(inputs)))
    latency = measure.measure_latency(runners, np.zeros((1, 1), np.float32), warmup=warmup,
                                      repeats=repeats)
    overhead_us = latency.p50("overhead probe")
    table = pd.DataFrame({"op_index": range(len(names)), "op": names,
                          "invoke_us": [latency.p50(f"op {i}") for i in range(len(names))]})
    table.insert(2, "measured_us", (table["invoke_us"] - overhead_us).clip(lower=0.0))
    table.attrs.update(whole_us=latency.p50("whole model"), overhead_us=overhead_us,
                       threads=threads, batch=batch)
    return table


def where_time_goes(path, *, threads: int = 1, repeats: int = 200) -> pd.DataFrame:
    """Per-op time (litert_ops) and a last row, op_index -1, for what the ops do not explain.

    That row is whole_us minus the sum of measured_us: one invoke's overhead plus the cost of
    moving between ops. It can come out negative: an op timed alone follows whatever model the
    interleaved loop ran before it, not its own predecessor, and can inherit a colder cache or
    CPU state. `share` is each row's part of whole_us; `.attrs` holds whole_us, overhead_us,
    inter_op_us, threads, batch.
    """
    table = litert_ops(path, threads=threads, repeats=repeats)
    whole_us = table.attrs["whole_us"]
    rest_us = whole_us - float(table["measured_us"].sum())
    rows = table[["op_index", "op", "measured_us"]]
    rest = pd.DataFrame({"op_index": [-1], "op": [OVERHEAD_OP], "measured_us": [rest_us]})
    out = pd.concat([rows, rest], ignore_index=True)
    out["share"] = out["measured_us"] / whole_us
    out.attrs = {**table.attrs, "inter_op_us": rest_us}
    return out


# ----------------------------------------------------------------------------- ONNX Runtime

def onnx_ops(onnx_path, images: np.ndarray, *, runs: int = 100, threads: int = 1,
             warmup: int = 10) -> pd.DataFrame:
    """Per-node time from ONNX Runtime's own profiler, one image per run: node, op_type,
    measured_us.

    measured_us is the median of the node's kernel_time events over `runs` runs after `warmup`
    runs; `.attrs["model_run_us"]` is the median of the same runs' model_run events, so the time
    outside the nodes (feeds, fetches, the executor) shows as model_run_us minus the sum.
    """
    from labkit import runtimes  # here, not at the top: it loads TensorFlow
    ok, why = runtimes.onnx_status()
    if not ok:
        raise RuntimeError(f"ONNX Runtime cannot profile here: {why}")
    import onnxruntime as ort  # optional: see runtimes.onnx_status
    images = np.ascontiguousarray(images, dtype=np.float32)
    with tempfile.TemporaryDirectory() as directory:
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(directory) / "onnx_profile")
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        session = ort.InferenceSession(str(onnx_path), options,
                                       providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        for i in range(warmup + runs):
            session.run(None, {name: images[i % len(images)][None]})
        trace = json.loads(Path(session.end_profiling()).read_text())
    runs_us = [e["dur"] for e in trace if e.get("cat") == "Session" and e["name"] == "model_run"]
    nodes = {}
    for e in trace:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            node = e["name"][:-len("_kernel_time")]
            nodes.setdefault(node, (e["args"].get("op_name", ""), []))[1].append(e["dur"])
    table = pd.DataFrame([{"node": node, "op_type": op_type,
                           "measured_us": float(np.median(durs[-runs:]))}
                          for node, (op_type, durs) in nodes.items()],
                         columns=["node", "op_type", "measured_us"])
    table.attrs.update(model_run_us=float(np.median(runs_us[-runs:])), runs=runs,
                       threads=threads)
    return table
