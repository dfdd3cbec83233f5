"""Honest measurement: accuracy, latency, throughput, size, parameters, MACs.

Every model kind is wrapped in a *runner*: a callable that takes a float32 batch of shape
(n, 28, 28, 1) and returns logits as a NumPy array. A runner's ``timed`` says exactly what one
timed call includes. Variants that are compared are timed *interleaved* in one loop, so a
noisy neighbour or a clock change hits them all alike. TensorFlow is imported only by the
runners and counters that need it: LiteRT's side runs without it. Memory: labkit.memory.
"""
from __future__ import annotations

import functools
import gzip
import io
import json
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from ai_edge_litert.interpreter import Interpreter, OpResolverType

import labkit  # sets the legacy-Keras switch before TensorFlow loads
from labkit import ARTIFACTS_DIR, tflite
from labkit.files import content_key, sha256_of, write_json
from labkit.machine import machine_info, usable_cores, versions

# measured accuracies of .tflite files (no workshop bundle ships them)
ACCURACY_DIR = ARTIFACTS_DIR / "accuracy"


# ----------------------------------------------------------------------------- runners

@dataclass
class Runner:
    """A model behind one calling convention: ``runner(x) -> logits`` (NumPy in, NumPy out)."""
    name: str
    fn: Callable[[np.ndarray], np.ndarray]
    timed: str              # what one timed call includes
    threads: int | None = None
    artifact: str | None = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.fn(x)


def keras_predict(model, name: str = "keras predict") -> Runner:
    with labkit.quiet_stderr():  # the first predict logs a harmless tf.data attribute warning
        model.predict(np.zeros((1, *model.input_shape[1:]), np.float32), verbose=0)
    return Runner(name, lambda x: model.predict(x, verbose=0),
                  "model.predict(x): sets up a data adapter and predict loop on every call, "
                  "runs the graph, returns NumPy")


def keras_call(model, name: str = "keras call") -> Runner:
    return Runner(name, lambda x: model(x, training=False).numpy(),
                  "model(x, training=False) eagerly, op by op from Python, plus .numpy()")


def tf_function(model, name: str = "tf.function", jit_compile: bool = False) -> Runner:
    import tensorflow as tf  # here, not at the top: measure is imported without TensorFlow
    spec = tf.TensorSpec([None, *model.input_shape[1:]], tf.float32)
    graph_fn = tf.function(lambda x: model(x, training=False), input_signature=[spec],
                           jit_compile=jit_compile)
    return Runner(name, lambda x: graph_fn(x).numpy(),
                  "a traced graph called from Python (one dispatch per call), plus .numpy()")


def check_saved_model(path) -> Path:
    """The path, if it is a SavedModel directory; FileNotFoundError or ValueError saying what is
    wrong."""
    # here, not at the top: TensorFlow's protocol buffers load TensorFlow
    from google.protobuf.message import DecodeError
    from tensorflow.core.protobuf import saved_model_pb2
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No SavedModel at {path}. Export one with "
                                "tf.saved_model.save(model, path).")
    if not path.is_dir():
        raise ValueError(f"{path} is a file, but a SavedModel is a directory holding "
                         "saved_model.pb and variables/ (a single .tflite file: use "
                         "measure.litert).")
    pb = path / "saved_model.pb"
    if not pb.is_file():
        raise ValueError(f"{path} holds no saved_model.pb, so it is not a SavedModel directory.")
    try:
        parsed = saved_model_pb2.SavedModel.FromString(pb.read_bytes())
    except DecodeError as error:
        raise ValueError(f"{pb} is not a SavedModel protocol buffer ({error}).") from None
    if not parsed.meta_graphs:
        raise ValueError(f"{pb} holds no meta graph, so it is not a usable SavedModel.")
    return path


def saved_model(path, name: str = "SavedModel", signature: str = "serving_default") -> Runner:
    import tensorflow as tf  # here, not at the top: measure is imported without TensorFlow
    path = check_saved_model(path)
    loaded = tf.saved_model.load(str(path))
    fn = loaded.signatures[signature]
    input_name = list(fn.structured_input_signature[1].keys())[0]

    def run(x):
        outputs = fn(**{input_name: tf.constant(x)})
        return next(iter(outputs.values())).numpy()
    run.loaded = loaded  # keep the object alive as long as the runner
    return Runner(name, run, "the loaded signature function called from Python, plus .numpy()",
                  artifact=str(path))


class LiteRTModel:
    """A .tflite file in the LiteRT interpreter, taking float32 in and giving float32 out.

    An int8 model's input is quantized and its output dequantized with the model's own scale
    and zero-point, so it can be compared with float models on the same images.
    """

    def __init__(self, path, num_threads: int | None = None, xnnpack: bool = True):
        self.path = tflite.check(path)
        resolver = (OpResolverType.AUTO if xnnpack
                    else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        try:
            with labkit.quiet_stderr():  # "INFO: Created TensorFlow Lite XNNPACK delegate"
                self.interpreter = Interpreter(model_path=str(self.path), num_threads=num_threads,
                                               experimental_op_resolver_type=resolver)
                self.interpreter.allocate_tensors()
        except ValueError as error:
            raise ValueError(f"{self.path} is not a valid .tflite model: {error}") from None
        self.num_threads, self.xnnpack = num_threads, xnnpack
        self.digest = sha256_of(self.path)   # the file as it was when loaded
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self.batch = int(self.input["shape"][0])

    def _resize(self, batch: int):
        shape = list(self.input["shape"])
        shape[0] = batch
        self.interpreter.resize_tensor_input(self.input["index"], shape)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self.batch = batch

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if len(x) != self.batch:
            self._resize(len(x))
        dtype = self.input["dtype"]
        if dtype != np.float32:
            scale, zero_point = self.input["quantization"]
            info = np.iinfo(dtype)
            x = np.clip(np.round(x / scale + zero_point), info.min, info.max).astype(dtype)
        self.interpreter.set_tensor(self.input["index"], x)
        self.interpreter.invoke()
        y = self.interpreter.get_tensor(self.output["index"])
        if y.dtype != np.float32:
            scale, zero_point = self.output["quantization"]
            y = (y.astype(np.float32) - zero_point) * scale
        return y


def litert(path, num_threads: int | None = 1, xnnpack: bool = True,
           name: str | None = None) -> Runner:
    model = LiteRTModel(path, num_threads=num_threads, xnnpack=xnnpack)
    label = name or f"LiteRT {'XNNPACK' if xnnpack else 'built-in kernels'} {num_threads} thread(s)"
    runner = Runner(label, model, "set_tensor + invoke + get_tensor on a LiteRT interpreter "
                    "(input quantized / output dequantized for integer models)",
                    threads=num_threads, artifact=str(path))
    runner.model = model
    return runner


# ----------------------------------------------------------------------------- accuracy

def on_every_core(runner: Callable) -> Callable:
    """For an accuracy pass: a LiteRT runner re-opened with a thread per usable core, else `runner`.

    Latency is measured on one thread (a fair, quiet comparison); accuracy is not a timing, and
    LiteRT's kernels split a batch's outputs between threads without changing any sum, so the
    logits are the same bit for bit (tests/test_measure.py checks it) and the pass takes about
    half the time on two cores. A file rewritten since the runner loaded it is not re-opened.
    """
    model = getattr(runner, "model", runner)
    cores = usable_cores()
    if not isinstance(model, LiteRTModel) or cores == 1 or model.num_threads == cores \
            or sha256_of(model.path) != model.digest:
        return runner
    return LiteRTModel(model.path, num_threads=cores, xnnpack=model.xnnpack)


def accuracy(runner: Callable, x: np.ndarray, y: np.ndarray, batch_size: int = 500) -> float:
    """Top-1 accuracy over (x, y), run in batches (a LiteRT runner on every core: `on_every_core`).

    A .tflite model's accuracy on the same images is counted once on this machine, however many
    notebooks compare it (`_file_accuracy`); a Keras model's is counted at every call.
    """
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} images but y has {len(y)} labels")
    model = getattr(runner, "model", runner)
    if isinstance(model, LiteRTModel):
        return _file_accuracy(model, x, y, batch_size)
    return _count_correct(runner, x, y, batch_size) / len(x)


def _count_correct(runner: Callable, x: np.ndarray, y: np.ndarray, batch_size: int) -> int:
    correct = 0
    for start in range(0, len(x), batch_size):
        logits = runner(np.ascontiguousarray(x[start:start + batch_size]))
        correct += int(np.sum(np.argmax(logits, axis=-1) == y[start:start + batch_size]))
    return correct


def _file_accuracy(model: LiteRTModel, x: np.ndarray, y: np.ndarray, batch_size: int) -> float:
    """A LiteRT model's accuracy, kept as artifacts/accuracy/<key>.json (never in a workshop
    bundle).

    The key hashes everything the count depends on: the bytes of the file as the runner loaded it,
    its kernels, the LiteRT version, the batch size and the bytes of the images and labels.
    """
    settings = repr((model.digest, model.xnnpack, batch_size, versions()["ai-edge-litert"],
                     x.shape, x.dtype.str, y.dtype.str))
    path = ACCURACY_DIR / f"{content_key(settings, x, y, digits=32)}.json"
    try:
        return float(json.loads(path.read_text())["accuracy"])
    except (OSError, ValueError, KeyError, TypeError):   # not counted yet, or a damaged entry
        pass
    value = _count_correct(on_every_core(model), x, y, batch_size) / len(x)
    write_json(path, {"accuracy": value, "file": str(model.path), "images": len(x)})
    return value


# ----------------------------------------------------------------------------- latency

@dataclass
class Latency:
    """Per-call wall times in microseconds for each runner, measured interleaved."""
    samples_us: dict
    timed: dict
    threads: dict
    machine: dict = field(default_factory=machine_info)

    def summary(self) -> pd.DataFrame:
        rows = []
        for name, us in self.samples_us.items():
            rows.append({"runner": name, "calls": len(us),
                         "latency_p50_us": float(np.percentile(us, 50)),
                         "latency_p95_us": float(np.percentile(us, 95)),
                         "mean_us": float(np.mean(us)), "std_us": float(np.std(us)),
                         "min_us": float(np.min(us)), "max_us": float(np.max(us)),
                         "threads": self.threads[name]})  # None: TensorFlow's default, every core
        return pd.DataFrame(rows).set_index("runner")

    def p50(self, name: str) -> float:
        return float(np.percentile(self.samples_us[name], 50))

    def p95(self, name: str) -> float:
        return float(np.percentile(self.samples_us[name], 95))


def measure_latency(runners, images: np.ndarray, *, warmup: int = 10, repeats: int = 100,
                    budget_s: float | None = None, min_calls: int = 30, seed: int = 0) -> Latency:
    """Batch-1 latency of each runner, interleaved: each round calls every runner once, shuffled.

    Warm-up calls (first-call tracing, allocation, caches) are made and discarded first.
    One call is timed with time.perf_counter_ns around the runner, so Python's own call
    overhead is inside the figure, as it is for any Python program that uses the model.
    With `budget_s`, a runner whose timed calls have taken that many seconds in all, over at
    least `min_calls` calls, sits out the remaining rounds (a runner at tens of milliseconds a
    call would otherwise take most of the time); `Latency.summary()`'s `calls` says how many each
    got.
    """
    runners = list(runners)
    if not runners:
        raise ValueError("measure_latency needs at least one runner")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    if budget_s is not None and (not budget_s > 0 or min_calls < 1):
        raise ValueError(f"budget_s must be positive (None: no budget) and min_calls >= 1, got "
                         f"{budget_s} and {min_calls}")
    names = [r.name for r in runners]
    if len(set(names)) != len(names):
        raise ValueError(f"runner names must be unique, got {names}")
    images = np.ascontiguousarray(images, dtype=np.float32)
    singles = [images[i:i + 1] for i in range(len(images))]  # sliced once, outside the timed region
    rng = np.random.default_rng(seed)
    for i in range(warmup):
        for runner in runners:
            runner(singles[i % len(singles)])
    samples = {name: [] for name in names}
    spent_us = dict.fromkeys(names, 0.0)
    budget_us = None if budget_s is None else budget_s * 1e6
    for i in range(repeats):
        x = singles[i % len(singles)]
        for j in rng.permutation(len(runners)):
            runner = runners[j]
            if (budget_us is not None and spent_us[runner.name] >= budget_us
                    and len(samples[runner.name]) >= min_calls):
                continue
            start = time.perf_counter_ns()
            runner(x)
            us = (time.perf_counter_ns() - start) / 1e3
            samples[runner.name].append(us)
            spent_us[runner.name] += us
    return Latency({name: np.asarray(us) for name, us in samples.items()},
                   {r.name: r.timed for r in runners}, {r.name: r.threads for r in runners})


def first_calls(path, images: np.ndarray, calls: int = 50, xnnpack: bool = True) -> dict:
    """A fresh LiteRT interpreter's first call against its later ones, in us: work an op does
    once, at the first invoke (LiteRT's DEQUANTIZE of constant weights), shows as a slow first
    call."""
    if calls < 3:
        raise ValueError("calls must be at least 3 (the first, the second, and later ones), "
                         f"got {calls}")
    runner, images = litert(path, xnnpack=xnnpack), np.ascontiguousarray(images, dtype=np.float32)
    times = []
    for i in range(calls):
        x = images[i % len(images)][None]
        start = time.perf_counter_ns()
        runner(x)
        times.append((time.perf_counter_ns() - start) / 1e3)
    return {"first_call_us": times[0], "second_call_us": times[1],
            "later_p50_us": float(np.median(times[2:]))}


def measure_throughput(runners, images: np.ndarray, batch_size: int = 256, rounds: int = 3,
                       seed: int = 0) -> pd.Series:
    """Images per second at `batch_size` over all of `images`; the median of interleaved rounds."""
    runners = list(runners)
    images = np.ascontiguousarray(images, dtype=np.float32)
    batches = [images[i:i + batch_size] for i in range(0, len(images) - batch_size + 1, batch_size)]
    if not batches:
        raise ValueError(f"need at least batch_size={batch_size} images, got {len(images)}")
    rng = np.random.default_rng(seed)
    for runner in runners:  # warm-up at this batch size (LiteRT resizes its input here)
        runner(batches[0])
    rates = {r.name: [] for r in runners}
    for _ in range(rounds):
        for j in rng.permutation(len(runners)):
            runner = runners[j]
            start = time.perf_counter()
            for batch in batches:
                runner(batch)
            rates[runner.name].append(len(batches) * batch_size / (time.perf_counter() - start))
    return pd.Series({name: float(np.median(r)) for name, r in rates.items()},
                     name="throughput_ips")


def side_by_side(paths: dict, x: np.ndarray, y: np.ndarray, *, latency_images: np.ndarray,
                 reference: str | None = None, repeats: int = 300, warmup: int = 20,
                 threads: int = 1) -> tuple[pd.DataFrame, Latency]:
    """Several .tflite files measured in one run: accuracy on (x, y), size, gzip size, latency.

    `paths` is {label: .tflite path}. All latencies come from one interleaved loop, so their ratios
    are fair; with `reference` (a label) the table adds gzip_ratio and speedup_p50 against it.
    Returns (table indexed by label, the Latency samples).
    """
    if reference is not None and reference not in paths:
        raise ValueError(f"reference {reference!r} is not among the labels {list(paths)}")
    runners = [litert(path, num_threads=threads, name=label) for label, path in paths.items()]
    latency = measure_latency(runners, latency_images, warmup=warmup, repeats=repeats)
    rows = [{"variant": runner.name, "accuracy": accuracy(runner, x, y),
             "size_bytes": size_bytes(paths[runner.name]),
             "gzip_bytes": gzip_bytes(paths[runner.name]),
             "latency_p50_us": latency.p50(runner.name), "latency_p95_us": latency.p95(runner.name),
             "artifact": str(paths[runner.name])} for runner in runners]
    table = pd.DataFrame(rows).set_index("variant")
    if reference is not None:
        table["gzip_ratio"] = table.loc[reference, "gzip_bytes"] / table["gzip_bytes"]
        table["speedup_p50"] = table.loc[reference, "latency_p50_us"] / table["latency_p50_us"]
    return table, latency


def verdicts(measured: dict, targets: dict) -> pd.DataFrame:
    """One row per target: the measured figure, the target (a minimum) and whether it is met."""
    missing = set(targets) - set(measured)
    if missing:
        raise ValueError(f"no measured figure for the targets {sorted(missing)}")
    return pd.DataFrame([{"figure": name, "measured": float(measured[name]),
                          "target": float(target),
                          "met": bool(float(measured[name]) >= float(target))}
                         for name, target in targets.items()])


# ----------------------------------------------------------------------------- size

def size_bytes(path) -> int:
    """Bytes on disk of a file, or of every file under a directory (a SavedModel)."""
    path = Path(path)
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


@functools.lru_cache(maxsize=1024)
def _gzip_file_bytes(path: str, inode: int, size: int, mtime_ns: int) -> int:
    """gzip -9 bytes of one version of a file (the arguments name the version: notebooks ask
    again)."""
    return len(gzip.compress(Path(path).read_bytes(), compresslevel=9, mtime=0))


def gzip_bytes(path) -> int:
    """Bytes after gzip -9 of a file, or of a deterministic tar of a directory."""
    path = Path(path)
    if not path.is_dir():   # a file (a missing one raises FileNotFoundError here)
        stat = path.stat()
        return _gzip_file_bytes(str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            info = tar.gettarinfo(str(f), arcname=str(f.relative_to(path)))
            info.mtime = 0
            with open(f, "rb") as fh:
                tar.addfile(info, fh)
    return len(gzip.compress(buffer.getvalue(), compresslevel=9, mtime=0))


# ----------------------------------------------------------------------------- parameters and MACs

def _inner(layer):
    """The Keras layer inside a tfmot wrapper (pruning, clustering, QAT), or the layer itself."""
    while hasattr(layer, "layer"):
        layer = layer.layer
    return layer


def count_params(model) -> dict:
    """Parameters (every weight the model stores) and how many of them are non-zero."""
    total = nonzero = 0
    for weight in model.weights:
        values = weight.numpy()
        total += values.size
        nonzero += int(np.count_nonzero(values))
    return {"params": total, "nonzero_params": nonzero}


def layer_macs(model) -> pd.DataFrame:
    """Multiply-accumulates per image of each Conv2D, DepthwiseConv2D and Dense layer."""
    import tf_keras as keras  # here, not at the top: measure is imported without TensorFlow
    rows = []
    for wrapper in model.layers:
        layer = _inner(wrapper)
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            _, h, w, c = wrapper.output_shape
            kh, kw = layer.kernel_size
            macs = h * w * c * kh * kw
        elif isinstance(layer, keras.layers.Conv2D):
            _, h, w, c_out = wrapper.output_shape
            kh, kw = layer.kernel_size
            c_in = wrapper.input_shape[-1] // layer.groups
            macs = h * w * c_out * kh * kw * c_in
        elif isinstance(layer, keras.layers.Dense):
            shape = wrapper.output_shape
            positions = int(np.prod(shape[1:-1])) if len(shape) > 2 else 1
            macs = positions * wrapper.input_shape[-1] * layer.units
        else:
            continue
        rows.append({"layer": wrapper.name, "type": type(layer).__name__, "macs": int(macs)})
    return pd.DataFrame(rows, columns=["layer", "type", "macs"])


def count_macs(model) -> int:
    """Total multiply-accumulates for one image (batch 1)."""
    return int(layer_macs(model)["macs"].sum())
