"""Faster runtimes and the compute floor: one trained model on every runtime at hand, and how
close each gets to the machine's limit.

ONNX Runtime (through tf2onnx), TF-TRT (where an NVIDIA GPU and TensorRT are present) and
`runtime_runners`, one `measure.Runner` per runtime for the same model; `compute_floor` sets
every runtime against the peak MAC rate LiteRT reaches here (`roofline.peak_mac_rate`). What
happens to the graph first is in `labkit/graph.py`; `python -m labkit.targets.graph` measures
both.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd

import labkit  # sets the legacy-Keras switch before TensorFlow loads

tf = labkit.import_tensorflow_quietly(start_runtime=False)  # its C++ start-up lines, kept quiet
import tf_keras as keras  # noqa: E402

from labkit import files, machine, measure  # noqa: E402
from labkit.graph import LARGE_BATCH  # noqa: E402

# onnx, onnxruntime, tf2onnx and TensorRT are optional: they are imported where they are used,
# and onnx_status and tensorrt_status say whether they are there.


# ----------------------------------------------------------------------------- 1. runtimes

def onnx_status() -> tuple:
    """(True, versions) where tf2onnx and onnxruntime import, else (False, why)."""
    try:
        import onnxruntime
        import tf2onnx
    except Exception as error:  # ImportError, or a broken install that fails while importing
        return False, (f"tf2onnx/onnxruntime unavailable ({type(error).__name__}: {error}); "
                       "`pip install tf2onnx onnxruntime` adds them")
    return True, f"tf2onnx {tf2onnx.__version__}, onnxruntime {onnxruntime.__version__}"


def export_onnx(model: keras.Model, path, opset: int = 17) -> Path:
    """The model converted by tf2onnx (any batch size) and written to path."""
    import tf2onnx  # optional: see the note at the top
    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    spec = (tf.TensorSpec([None, *model.input_shape[1:]], tf.float32, name="image"),)
    with labkit.quiet_stderr():
        proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=opset)
    content = proto.SerializeToString()
    return files.write_atomic(path, lambda tmp: tmp.write_bytes(content))


def onnx_ops(path) -> list:
    """The op types of an .onnx file's graph, in order (tf2onnx folds batch norm too)."""
    import onnx  # optional: see the note at the top
    return [node.op_type for node in onnx.load(str(path)).graph.node]


def onnx_runner(path, num_threads: int = 1, name: str | None = None) -> measure.Runner:
    """An .onnx file in ONNX Runtime's CPU provider with `num_threads` intra-op threads."""
    import onnxruntime as ort  # optional: see the note at the top
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No .onnx file at {path}. Convert one first (export_onnx).")
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = num_threads, 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:
        raise ValueError(f"{path} is not a model ONNX Runtime can load: {error}") from None
    input_name = session.get_inputs()[0].name
    runner = measure.Runner(name or f"ONNX Runtime {num_threads} thread(s)",
                            lambda x: session.run(None, {input_name: x})[0],
                            "InferenceSession.run with a NumPy feed, outputs as NumPy",
                            threads=num_threads)
    runner.session = session
    return runner


def tensorrt_status() -> tuple:
    """(True, version) where TF-TRT can run: an NVIDIA GPU and a TensorFlow built with TensorRT;
    else (False, why)."""
    if not tf.config.list_physical_devices("GPU"):
        return False, "no NVIDIA GPU is visible to TensorFlow"
    try:
        from tensorflow.compiler.tf2tensorrt import _pywrap_py_utils as trt_utils
    except ImportError as error:
        return False, f"this TensorFlow has no TF-TRT module ({error})"
    if not trt_utils.is_tensorrt_enabled():
        return False, ("this TensorFlow build has TensorRT support compiled out (the pip wheels "
                       "do; NVIDIA's TensorFlow containers keep it)")
    loaded = trt_utils.get_loaded_tensorrt_version()
    if not loaded or loaded[0] == 0:
        return False, "the TensorRT libraries (libnvinfer) could not be loaded"
    return True, "TensorRT " + ".".join(map(str, loaded))


def tftrt_convert(saved_model_dir, output_dir, images: np.ndarray, precision: str = "FP16") -> Path:
    """A SavedModel rewritten by TF-TRT (TensorRT engines built for images' batch size), saved to
    output_dir."""
    if precision not in ("FP32", "FP16"):
        raise ValueError(f"precision must be 'FP32' or 'FP16' (INT8 needs calibration), "
                         f"got {precision!r}")
    ok, why = tensorrt_status()
    if not ok:
        raise RuntimeError(f"TF-TRT cannot run here: {why}")
    # TensorRT only: see the note at the top
    from tensorflow.python.compiler.tensorrt import trt_convert as trt
    source = str(measure.check_saved_model(saved_model_dir))
    converter = trt.TrtGraphConverterV2(input_saved_model_dir=source, precision_mode=precision)
    converter.convert()

    # one batch of the shape to serve: TensorRT builds its engines now, not on the first call
    def input_fn():
        yield (tf.constant(images, tf.float32),)
    converter.build(input_fn=input_fn)
    converter.save(str(output_dir))
    return Path(output_dir)


def runtime_runners(model: keras.Model, paths: dict, onnx_path=None) -> list:
    """One runner per runtime for the same model: `paths` from models.export_baseline,
    `onnx_path` if any.

    TensorFlow runtimes use every core (threads None); LiteRT and ONNX Runtime state their threads.
    """
    runners = [measure.keras_predict(model), measure.keras_call(model), measure.tf_function(model),
               measure.tf_function(model, "tf.function + XLA", jit_compile=True)]
    for runner in runners:
        runner.artifact = str(paths["keras"])
    runners.append(measure.saved_model(paths["savedmodel"]))
    cores = machine.machine_info()["usable_cores"]
    for threads in sorted({1, min(2, cores)}):
        label = f"LiteRT XNNPACK {threads} thread{'s' if threads > 1 else ''}"
        runners.append(measure.litert(paths["tflite"], threads, name=label))
    runners.append(measure.litert(paths["tflite"], 1, xnnpack=False,
                                  name="LiteRT built-in kernels 1 thread"))
    if onnx_path is not None:
        runners.append(onnx_runner(onnx_path, 1, name="ONNX Runtime 1 thread"))
    return runners


def variant_name(runner_name: str, prefix: str = "runtime") -> str:
    """'LiteRT XNNPACK 2 threads' -> 'runtime-litert-xnnpack-2-threads': a results-store variant
    name."""
    return f"{prefix}-" + re.sub(r"[^a-z0-9]+", "-", runner_name.lower()).strip("-")


# ----------------------------------------------------------------------------- 2. the compute floor

def compute_floor(macs_per_image: int, latency, throughput: pd.Series, peak: pd.DataFrame,
                  batch_size: int = LARGE_BATCH) -> pd.DataFrame:
    """Per runtime: the MAC rate reached at batch 1 and at a large batch, as a fraction of the fp32
    peak (`peak`: the wide probe's rows of roofline.peak_mac_rate, XNNPACK).

    A runner is compared with the best fp32 rate measured at its thread count or fewer;
    threads=None (TensorFlow, every core) counts as the most threads measured.
    `overhead_us` = batch-1 p50 minus the per-image time at the large batch: the fixed cost of one
    call (Python, argument conversion, dispatch, thread wake-up) that a large batch spreads thin.
    """
    keep = peak["precision"] == "fp32"
    for column, value in (("probe", "wide"), ("engine", "XNNPACK")):   # roofline's columns
        if column in peak:
            keep &= peak[column] == value
    fp32 = peak[keep].set_index("threads")["gmacs_per_s"]
    summary = latency.summary()
    rows = []
    for name, row in summary.iterrows():
        threads = int(row["threads"]) if pd.notna(row["threads"]) else int(fp32.index.max())
        # n threads can do at least what fewer threads did: on a busy machine 2 threads may
        # measure slower
        peak_gmacs = float(fp32[fp32.index <= threads].max())
        ips = float(throughput[name])
        gmacs_1 = macs_per_image / row["latency_p50_us"] / 1e3
        gmacs_n = macs_per_image * ips / 1e9
        rows.append({"runner": name, "latency_p50_us": row["latency_p50_us"],
                     "latency_p95_us": row["latency_p95_us"], f"throughput_ips_b{batch_size}": ips,
                     "peak_threads": threads, "peak_gmacs_per_s": peak_gmacs,
                     "gmacs_batch1": gmacs_1, f"gmacs_b{batch_size}": gmacs_n,
                     "fraction_of_peak_batch1": gmacs_1 / peak_gmacs,
                     f"fraction_of_peak_b{batch_size}": gmacs_n / peak_gmacs,
                     "overhead_us": row["latency_p50_us"] - 1e6 / ips})
    return pd.DataFrame(rows).set_index("runner")
