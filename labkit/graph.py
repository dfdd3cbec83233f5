"""Graph optimization: what happens between a Keras model and the graph a runtime executes.

Freezing (variables become constants), Grappler (TensorFlow's graph optimizer folds constants
and fuses op patterns), what the TFLite converter makes of the graph in its own MLIR passes
(`converter_passes`, `tflite_conv_weights`: the batch-norm folding of `labkit/folding.py` seen in
the file) and XLA (compile cost at each new shape, then the steady state; shape buckets). Other
runtimes and the compute floor are in `labkit/runtimes.py`; `python -m labkit.targets.graph`
measures the chapter's figures. Functions return models, graphs and numbers; the notebook draws.
"""
from __future__ import annotations

import collections
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

import labkit  # sets the legacy-Keras switch before TensorFlow loads

tf = labkit.import_tensorflow_quietly(start_runtime=False)  # its C++ start-up lines, kept quiet
import tf_keras as keras  # noqa: E402
from tensorflow.core.protobuf import config_pb2, meta_graph_pb2, rewriter_config_pb2  # noqa: E402
from tensorflow.python.framework.convert_to_constants import (  # noqa: E402
    convert_variables_to_constants_v2,
)
from tensorflow.python.grappler import tf_optimizer  # noqa: E402

from labkit import files, measure, models, tflite  # noqa: E402

GRAPH_DIR = labkit.ARTIFACTS_DIR / "graph"
LARGE_BATCH = 256            # "a large batch" in every batch-size comparison of the chapter
CPU_DEVICE = "/device:CPU:0"


# ----------------------------------------------------------------------------- 1. freezing

def concrete_function(model: keras.Model):
    """The model's inference graph (training=False) for any batch size, as a ConcreteFunction."""
    spec = tf.TensorSpec([None, *model.input_shape[1:]], tf.float32, name="image")
    return tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)


def freeze(model: keras.Model):
    """(the traced graph, the frozen function): every variable read becomes a Const node."""
    function = concrete_function(model)
    return function.graph.as_graph_def(), convert_variables_to_constants_v2(function)


def op_counts(graph_def) -> collections.Counter:
    """How many nodes of each op type a GraphDef holds, nested function bodies included."""
    counts = collections.Counter(node.op for node in graph_def.node)
    for function in graph_def.library.function:
        counts.update(node.op for node in function.node_def)
    return counts


BOOKKEEPING_OPS = frozenset({"Const", "Placeholder", "Identity", "NoOp"})


def compute_op_count(graph_def) -> int:
    """Nodes that do work when the graph runs: every op except Const, Placeholder, Identity and
    NoOp."""
    return sum(n for op, n in op_counts(graph_def).items() if op not in BOOKKEEPING_OPS)


def op_table(**graphs) -> pd.DataFrame:
    """Op counts of several GraphDefs side by side (keyword = column name), with a total row."""
    counts = {name: op_counts(g) for name, g in graphs.items()}
    ops = sorted(set().union(*counts.values()))
    table = pd.DataFrame({name: [c.get(op, 0) for op in ops] for name, c in counts.items()},
                         index=ops)
    table.index.name = "op"
    table.loc["total"] = table.sum()
    return table


def disappeared(before, after) -> dict:
    """Op types (with counts) present in `before` and absent from `after`, and those that are
    new."""
    b, a = op_counts(before), op_counts(after)
    return {"gone": {op: n for op, n in b.items() if op not in a},
            "new": {op: n for op, n in a.items() if op not in b}}


# ----------------------------------------------------------------------------- 2. Grappler

GRAPPLER_PASSES = {
    "pruning": "removes nodes that no output depends on",
    "constfold": "evaluates every subgraph whose inputs are all constants, once, offline",
    "arithmetic": ("rewrites arithmetic into cheaper equivalents (x*1, double negation, "
                   "repeated adds)"),
    "dependency": "removes Identity and NoOp nodes that only pass a value or a control edge along",
    "layout": "picks NCHW or NHWC per device",
    "remap": "fuses op patterns into one kernel (Conv2D+BatchNorm+Relu -> _FusedConv2D)",
}


def grappler(frozen, passes=("constfold", "arithmetic", "dependency", "remap"),
             device: str | None = CPU_DEVICE):
    """Run a frozen function's graph through Grappler's passes and return the optimized GraphDef.

    `device` places every node first, as TensorFlow does before it optimizes a graph at run time:
    the remapper fuses only nodes it knows are on a CPU (or GPU), so device=None shows the trap.
    This calls tf_optimizer.OptimizeGraph, Grappler's internal Python entry point. (The TFLite
    converter calls it only for its legacy converter or SELECT_TF_OPS-only models; by default it
    folds and fuses in its own MLIR passes: see `converter_passes`.)
    """
    unknown = [p for p in passes if p not in GRAPPLER_PASSES]
    if unknown or not passes:
        raise ValueError(f"unknown Grappler passes {unknown or '(none given)'}; "
                         f"choose from {sorted(GRAPPLER_PASSES)}")
    graph_def = tf.compat.v1.GraphDef()
    graph_def.CopyFrom(frozen.graph.as_graph_def())
    if device:
        for node in graph_def.node:
            node.device = device
    graph = tf.Graph()
    with graph.as_default():
        tf.graph_util.import_graph_def(graph_def, name="")
    meta_graph = tf.compat.v1.train.export_meta_graph(graph_def=graph_def, graph=graph)
    fetch = meta_graph_pb2.CollectionDef()  # Grappler keeps the nodes listed as "train_op" alive
    fetch.node_list.value.extend(t.name for t in frozen.outputs)
    meta_graph.collection_def["train_op"].CopyFrom(fetch)
    config = config_pb2.ConfigProto()
    rewrite = config.graph_options.rewrite_options
    rewrite.optimizers.extend(passes)
    rewrite.meta_optimizer_iterations = rewriter_config_pb2.RewriterConfig.ONE
    return tf_optimizer.OptimizeGraph(config, meta_graph)


def graph_runner(graph_def, inputs, outputs, name: str) -> measure.Runner:
    """A GraphDef (frozen or optimized) as a runner; `inputs`/`outputs` are tensor names like
    'image:0'."""
    input_name = inputs[0] if isinstance(inputs[0], str) else inputs[0].name
    output_name = outputs[0] if isinstance(outputs[0], str) else outputs[0].name
    wrapped = tf.compat.v1.wrap_function(
        lambda: tf.graph_util.import_graph_def(graph_def, name=""), [])
    inputs_tensor = wrapped.graph.get_tensor_by_name(input_name)
    pruned = wrapped.prune(inputs_tensor, wrapped.graph.get_tensor_by_name(output_name))
    # Called bare, a pruned function takes a slower Python call path; inside a tf.function it is
    # one function call, like every other TensorFlow runner of measure.
    function = tf.function(pruned, input_signature=[tf.TensorSpec(inputs_tensor.shape,
                                                                  inputs_tensor.dtype)])
    runner = measure.Runner(name, lambda x: function(x).numpy(),
                            "the imported GraphDef inside a tf.function, called from Python, plus "
                            ".numpy()")
    runner.function = function
    return runner


def max_abs_diff(model_a, model_b, x, batch_size: int = 500) -> float:
    """Largest absolute difference between two models' outputs over x (inference mode)."""
    worst = 0.0
    for start in range(0, len(x), batch_size):
        batch = tf.constant(x[start:start + batch_size])
        a = model_a(batch, training=False).numpy()
        b = model_b(batch, training=False).numpy()
        worst = max(worst, float(np.max(np.abs(a - b))))
    return worst


def export(model: keras.Model, stem: str, directory: Path = GRAPH_DIR) -> dict:
    """The model as .keras and float32 .tflite files under artifacts/graph/ (rewritten each
    call)."""
    directory = Path(directory)
    paths = {"keras": directory / f"{stem}.keras", "tflite": directory / f"{stem}_float32.tflite"}
    files.write_atomic(paths["keras"], model.save)
    models.save_tflite(model, paths["tflite"])
    return paths


# ----------------------------------------------------------------- 3. what the converter made of it

def tflite_ops(path) -> pd.DataFrame:
    """Every operator of a .tflite file in execution order: op, fused activation, output shape."""
    return tflite.ops(path)[["op", "fused_activation", "output_shape"]]


def tflite_conv_weights(path) -> list:
    """(kernel in Keras HWIO layout, bias) of every float32 CONV_2D in a .tflite file, in order."""
    out = []
    for layer, w in tflite.weights(path).items():
        if w["op"] != "CONV_2D":
            continue
        if w["dtype"] != np.float32 or w["bias"] is None:
            raise ValueError(f"{layer} of {path} is not a float32 convolution with a bias "
                             f"(stored {w['dtype']})")
        out.append((w["values"].transpose(1, 2, 3, 0), w["bias"]))   # the file stores OHWI
    return out


# The TFLite converter's MLIR passes that take a TensorFlow graph to TFLite ops, in the order they
# run: PrepareTF (batch norm -> multiply and add, the multiply folded into the conv filter),
# LegalizeTF (every remaining TF op -> its TFLite op) and Optimize (bias adds into their conv/fully
# connected op, ReLUs into fused_activation_function).
CONVERTER_PASSES = ("PrepareTFPass", "LegalizeTFPass", "OptimizePass")
_MLIR_OP = re.compile(r'= "?((?:tf|tfl)\.[A-Za-z0-9_]+)"?[ (]')
_MLIR_CONSTANTS = frozenset({"tf.Const", "tfl.pseudo_const", "tfl.no_value"})


def mlir_op_counts(text: str) -> collections.Counter:
    """Op counts of an MLIR dump in the TF and TFLite dialects (tf.X, tfl.x), constants left out."""
    return collections.Counter(op for op in _MLIR_OP.findall(text) if op not in _MLIR_CONSTANTS)


def converter_passes(model: keras.Model, passes=CONVERTER_PASSES) -> dict:
    """What the default TFLite converter does to `model`, pass by pass.

    Converts the model as models.save_tflite does, with the converter's IR dump switched on for
    `passes`, and returns {"grappler_passes": the passes the converter hands Grappler (none, with
    the default MLIR converter: TensorFlow's lite.py skips Grappler when the list is empty),
    "ops": a table of op counts (rows: ops, `tf.` TensorFlow's and `tfl.` TFLite's; columns: the
    graph as the first pass receives it, then after each pass)}.
    """
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    # lite.py's own rule: "MLIR converter will take care of constant folding instead of grappler".
    grappler_passes = list(converter._grappler_config().graph_options.rewrite_options.optimizers)
    with tempfile.TemporaryDirectory() as directory:
        converter.ir_dump_dir = directory
        converter.ir_dump_pass_regex = "|".join(passes)
        with labkit.quiet_stderr():
            converter.convert()
        dumps = sorted(Path(directory).rglob("*.mlir"))
        columns = {}
        first = next((d for d in dumps if d.name.endswith(f"{passes[0]}_before.mlir")), None)
        if first is None:
            raise RuntimeError(f"the converter wrote no IR dump for {passes[0]} in {directory}: "
                               f"found {[d.name for d in dumps]}")
        columns["TF graph in"] = mlir_op_counts(first.read_text())
        # a pass that runs more than once (Optimize does) counts by its last run
        for name in passes:
            after = [d for d in dumps if d.name.endswith(f".{name}_after.mlir")]
            if after:
                label = f"after {name.removesuffix('Pass')}"
                columns[label] = mlir_op_counts(after[-1].read_text())
    ops = sorted(set().union(*columns.values()), key=lambda op: (op.startswith("tfl."), op))
    table = pd.DataFrame({name: [c.get(op, 0) for op in ops] for name, c in columns.items()},
                         index=ops)
    table.index.name = "op"
    return {"grappler_passes": grappler_passes, "ops": table}


# ----------------------------------------------------------------------------- 4. XLA

def time_call_ms(fn, x) -> float:
    """Wall time of one call of fn(x), in milliseconds."""
    start = time.perf_counter()
    fn(x)
    return (time.perf_counter() - start) * 1e3


def xla_compile_costs(model: keras.Model, images: np.ndarray, batch_sizes=(1, LARGE_BATCH),
                      steady_calls: int = 10) -> pd.DataFrame:
    """First call against steady state, for tf.function without and with jit_compile, batch by
    batch.

    The first call at a batch size pays for tracing (first size only, thanks to the None batch
    dimension) and, with XLA, for compiling: XLA compiles once per distinct input shape.
    """
    if not batch_sizes or min(batch_sizes) < 1 or max(batch_sizes) > len(images):
        raise ValueError(f"batch sizes must be between 1 and len(images)={len(images)}, "
                         f"got {batch_sizes}")
    if steady_calls < 1:
        raise ValueError(f"steady_calls must be >= 1, got {steady_calls}")
    runners = [measure.tf_function(model, "tf.function"),
               measure.tf_function(model, "tf.function + XLA", jit_compile=True)]
    rows = []
    for batch_size in batch_sizes:
        x = np.ascontiguousarray(images[:batch_size])
        for runner in runners:
            first = time_call_ms(runner, x)
            steady = float(np.median([time_call_ms(runner, x) for _ in range(steady_calls)]))
            rows.append({"runner": runner.name, "batch_size": batch_size, "first_call_ms": first,
                         "steady_ms": steady, "first_minus_steady_ms": first - steady})
    return pd.DataFrame(rows)


def bucketed(runner: measure.Runner, buckets, name: str | None = None) -> measure.Runner:
    """The runner with every batch zero-padded up to the next bucket size (and the padding cut off).

    XLA compiles once per input shape; with a few fixed buckets it compiles a few times, not once
    per batch size a server happens to see.
    """
    buckets = sorted(int(b) for b in buckets)
    if not buckets or buckets[0] < 1:
        raise ValueError(f"buckets must be positive batch sizes, got {buckets}")

    def run(x):
        n = len(x)
        size = next((b for b in buckets if b >= n), None)
        if size is None:
            raise ValueError(f"a batch of {n} is larger than the largest bucket, {buckets[-1]}")
        if size > n:
            x = np.concatenate([x, np.zeros((size - n, *x.shape[1:]), x.dtype)])
        return runner(x)[:n]
    return measure.Runner(name or f"{runner.name}, padded to {buckets}", run,
                          f"{runner.timed}; zero-padded up to the next of {buckets}",
                          runner.threads)
