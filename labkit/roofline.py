"""The roofline: a performance model that predicts a speed result before it is measured.

An op takes at least as long as its arithmetic at the machine's peak rate, and at least as long
as moving its bytes at the bandwidth of the memory level its data lives in; the larger of the
two is its predicted time, and which one wins says whether it is compute-bound or memory-bound.
`ceilings()` measures the peaks and bandwidths here; `op_table(path, ceilings)` predicts each op
of a .tflite file and `predict(path, ceilings)` the whole call.
"""
from __future__ import annotations

import functools
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

import labkit  # sets the legacy-Keras switch before TensorFlow loads

tf = labkit.import_tensorflow_quietly(start_runtime=False)
import tf_keras as keras  # noqa: E402

from labkit import files, litert_quant, machine, measure, profiler, quantization, tflite  # noqa: E402

ROOFLINE_DIR = labkit.ARTIFACTS_DIR / "roofline"
KiB, MiB = labkit.KiB, labkit.MiB
FLOPS_PER_MAC = 2   # a multiply-accumulate is a multiply and an add
# Working sets of the bandwidth sweep: 8 KiB to 256 MiB, four times larger each step.
WORKING_SETS = tuple(8 * KiB * 4 ** i for i in range(11) if 8 * KiB * 4 ** i <= 256 * MiB)
ENGINES = ("XNNPACK", "built-in kernel")


# ----------------------------------------------------------------------------- 1. the model's math

def arithmetic_intensity(macs: int, weight_count: int, weight_bits: int, activation_count: int,
                         activation_bits: int = 32) -> float:
    """FLOPs per byte moved: 2 FLOPs per MAC, over the weights at their stored width plus the
    activations read and written."""
    counts = {"macs": macs, "weight_count": weight_count, "activation_count": activation_count}
    if min(counts.values()) < 0 or min(weight_bits, activation_bits) <= 0:
        raise ValueError(f"counts must be >= 0 and bit widths > 0, got {counts}, "
                         f"weight_bits={weight_bits}, activation_bits={activation_bits}")
    moved = weight_count * weight_bits / 8 + activation_count * activation_bits / 8
    if moved == 0:
        raise ValueError("no byte is moved, so the intensity is undefined: pass the weights or "
                         "activations the op reads and writes")
    return FLOPS_PER_MAC * macs / moved


def roofline_time(macs: float, bytes_moved: float, peak_flops_per_s: float,
                  bandwidth_bytes_per_s: float) -> float:
    """Seconds: the larger of the compute time at peak and the memory time at bandwidth."""
    if macs < 0 or bytes_moved < 0:
        raise ValueError(f"macs and bytes_moved must be >= 0, got {macs}, {bytes_moved}")
    if peak_flops_per_s <= 0 or bandwidth_bytes_per_s <= 0:
        raise ValueError(f"the peak and the bandwidth must be > 0, got {peak_flops_per_s}, "
                         f"{bandwidth_bytes_per_s}")
    return max(FLOPS_PER_MAC * macs / peak_flops_per_s, bytes_moved / bandwidth_bytes_per_s)


# ----------------------------------------------------------------------------- 2. memory bandwidth

def cache_sizes() -> dict:
    """{"L1": bytes, "L2": ..., "L3": ...} of one core's data caches, as Linux reports them
    (empty elsewhere)."""
    sizes = {}
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            kind = (index / "type").read_text().strip()
            level = int((index / "level").read_text())
            text = (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        if kind in ("Data", "Unified") and text[:-1].isdigit():
            sizes[f"L{level}"] = int(text[:-1]) * {"K": KiB, "M": MiB}.get(text[-1], 1)
    return sizes


def _copy_seconds(working_set: int, moved_per_trial: float = 64 * MiB, trials: int = 7) -> float:
    """Median seconds of one NumPy copy whose source and destination together take
    `working_set` bytes."""
    source = np.ones(max(working_set // 8, 16), np.float32)
    destination = np.empty_like(source)
    repeats = max(int(moved_per_trial // working_set), 1)
    times = []
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(repeats):
            np.copyto(destination, source)
        times.append((time.perf_counter() - start) / repeats)
    return float(np.median(times))


def bandwidth_sweep(working_sets=WORKING_SETS) -> pd.DataFrame:
    """Bytes per second a NumPy copy moves (read + write) at each working-set size, one thread.

    The cost of one NumPy call, measured on a 128-byte copy, is taken off each time first: at
    8 KiB it is as long as the copy itself.
    """
    call = _copy_seconds(128, moved_per_trial=128 * 20_000)
    rows = [{"working_set_bytes": int(size),
             "bytes_per_s": size / max(_copy_seconds(int(size)) - call, 1e-12)}
            for size in working_sets]
    return pd.DataFrame(rows)


def memory_levels(sweep: pd.DataFrame, caches: dict) -> pd.DataFrame:
    """One ceiling per level: the bandwidth at the largest swept working set that fits in half
    of that cache (L1, L2, L3), and at the largest one swept (DRAM)."""
    rows = []
    for level, size in sorted(caches.items()):
        fits = sweep[sweep["working_set_bytes"] <= size // 2]
        if len(fits):
            rows.append({"level": level, **fits.iloc[-1].to_dict()})
    rows.append({"level": "DRAM", **sweep.iloc[-1].to_dict()})
    table = pd.DataFrame(rows)
    table["working_set_bytes"] = table["working_set_bytes"].astype(int)
    return table


def bandwidth_at(sweep: pd.DataFrame, footprint: float) -> float:
    """The bandwidth of the smallest swept working set that holds `footprint` bytes."""
    holds = sweep[sweep["working_set_bytes"] >= footprint]
    return float((holds if len(holds) else sweep.tail(1))["bytes_per_s"].iloc[0])


# ----------------------------------------------------------------------------- 3. the peak MAC rate

@dataclass
class Probe:
    """A one-convolution .tflite model that measures a ceiling of LiteRT's convolutions: a
    "wide" one (many input channels) the peak MAC rate, a "thin" one (one input channel, 9 MACs
    per output) the rate at which a convolution can produce outputs at all."""
    path: Path
    precision: str
    kind: str
    macs: int
    outputs: int


def conv_probe(size: int = 56, channels: int = 64, kernel: int = 3,
               in_channels: int | None = None) -> keras.Model:
    """One size x size x in_channels -> channels convolution at batch 1, nothing else."""
    in_channels = channels if in_channels is None else in_channels
    if min(size, channels, kernel, in_channels) < 1 or kernel > size:
        raise ValueError(f"size, channels, in_channels and kernel must be positive with kernel "
                         f"<= size, got {size}, {channels}, {in_channels}, {kernel}")
    keras.utils.set_random_seed(0)
    inputs = keras.Input((size, size, in_channels), batch_size=1, name="probe_input")
    outputs = keras.layers.Conv2D(channels, kernel, padding="same", use_bias=False,
                                  name="probe_conv")(inputs)
    return keras.Model(inputs, outputs,
                       name=f"conv_probe_{size}x{size}x{in_channels}to{channels}_k{kernel}")


def export_probes(size: int = 56, channels: int = 64, kernel: int = 3,
                  in_channels: int | None = None, directory: Path = ROOFLINE_DIR) -> list:
    """The probe as float32 and full-int8 .tflite files (from the model cache): [Probe, Probe].

    The int8 file is made by quantization.export, calibrated on four random inputs (a probe
    measures speed, so any ranges do).
    """
    model = conv_probe(size, channels, kernel, in_channels)
    shape = model.input_shape[1:]
    calibration = np.random.default_rng(0).random((4, *shape), dtype=np.float32)
    kind = "thin" if shape[-1] == 1 else "wide"
    probes = []
    for precision, mode, images in (("fp32", "float32", None), ("int8", "int8", calibration)):
        path = quantization.export(model, mode, images, name=f"{model.name}_{precision}",
                                   directory=directory)
        probes.append(Probe(path, precision, kind, measure.count_macs(model),
                            size * size * channels))
    return probes


def peak_mac_rate(probes, threads=(1, 2), engines=("XNNPACK",), repeats: int = 40,
                  warmup: int = 3) -> pd.DataFrame:
    """MACs (and outputs) per second each probe reaches on LiteRT at each thread count and
    engine (XNNPACK, or LiteRT's built-in kernels), timed interleaved."""
    if not threads or min(threads) < 1:
        raise ValueError(f"threads must be positive counts, got {threads}")
    unknown = set(engines) - set(ENGINES)
    if unknown:
        raise ValueError(f"engines must be among {ENGINES}, got {sorted(unknown)}")
    cases = [(probe, n, engine) for probe in probes for n in threads for engine in engines]
    names = [f"probe {p.kind} {p.precision} {engine} {n} thread(s)" for p, n, engine in cases]
    runners = [profiler.invoke_runner(name, probe.path.read_bytes(),
                                      [profiler.example_input(probe.path)], n, engine == "XNNPACK")
               for name, (probe, n, engine) in zip(names, cases)]
    latency = measure.measure_latency(runners, np.zeros((1, 28, 28, 1), np.float32),
                                      warmup=warmup, repeats=repeats)
    rows = []
    for (probe, n, engine), runner in zip(cases, runners):
        p50 = latency.p50(runner.name)
        rows.append({"probe": probe.kind, "precision": probe.precision, "engine": engine,
                     "threads": n, "macs": probe.macs, "outputs": probe.outputs,
                     "latency_p50_us": p50, "gmacs_per_s": probe.macs / p50 / 1e3,
                     "goutputs_per_s": probe.outputs / p50 / 1e3})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- 4. all the ceilings

def call_models(directory: Path = ROOFLINE_DIR) -> dict:
    """Two .tflite models that do next to nothing (one reshape of an image), with float32 and
    with int8 input and output: what one call costs before any layer runs."""
    keras.utils.set_random_seed(0)
    image = keras.Input((28, 28, 1), batch_size=1, name="image")
    model = keras.Model(image, keras.layers.Reshape((784,), name="flat")(image), name="call")
    calibration = np.random.default_rng(0).random((4, 28, 28, 1), dtype=np.float32)
    return {"float32": quantization.export(model, "float32", name="call_float32",
                                           directory=directory),
            "int8": quantization.export(model, "int8", calibration, name="call_int8",
                                        directory=directory)}


def call_overhead(paths: dict, images: np.ndarray, repeats: int = 300) -> dict:
    """p50 us of one call, through the book's own LiteRT runner (set_tensor, invoke, get_tensor;
    NumPy quantizes an int8 model's input and dequantizes its output), by input type."""
    runners = [measure.litert(path, num_threads=1, name=f"call {io}") for io, path in paths.items()]
    latency = measure.measure_latency(runners, images, warmup=30, repeats=repeats)
    return {io: latency.p50(f"call {io}") for io in paths}


@dataclass
class Ceilings:
    """What this machine can do, measured: peak MAC rates, the bandwidth sweep, the bandwidth of
    each memory level and the cost of one call."""
    peaks: pd.DataFrame      # precision, engine, threads, gmacs_per_s
    sweep: pd.DataFrame      # working_set_bytes, bytes_per_s
    levels: pd.DataFrame     # level, working_set_bytes, bytes_per_s
    call_us: dict            # input type -> us
    machine: str

    def _best(self, probe: str, precision: str, engine: str, threads: int, column: str):
        rows = self.peaks[(self.peaks["probe"] == probe) & (self.peaks["precision"] == precision)
                          & (self.peaks["engine"] == engine) & (self.peaks["threads"] <= threads)]
        if rows.empty:
            measured = self.peaks[["probe", "precision", "engine", "threads"]].to_dict("records")
            raise ValueError(f"no {probe} probe measured for {precision} on {engine} with "
                             f"{threads} thread(s); measured: {measured}")
        return float(rows[column].max()) * 1e9

    def peak_flops(self, precision: str, engine: str = "XNNPACK", threads: int = 1) -> float:
        """FLOPs per second of the wide probe at `threads` threads or fewer."""
        return self._best("wide", precision, engine, threads, "gmacs_per_s") * FLOPS_PER_MAC

    def output_rate(self, precision: str, engine: str = "XNNPACK", threads: int = 1) -> float:
        """Outputs per second of the thin probe: a convolution's ceiling when it has few MACs
        per output (each output is gathered, summed, requantized and stored)."""
        return self._best("thin", precision, engine, threads, "goutputs_per_s")

    def table(self) -> pd.DataFrame:
        """Every ceiling as one row: what, value, unit, and how it was measured."""
        wide, thin = self.peaks["probe"] == "wide", self.peaks["probe"] == "thin"
        rows = [{"ceiling": f"peak {r.precision} {r.engine} {r.threads} thread(s)",
                 "value": r.gmacs_per_s * FLOPS_PER_MAC, "unit": "GFLOP/s",
                 "how": f"a {r.macs / 1e6:.0f} M-MAC convolution (64 input channels), invoke p50"}
                for r in self.peaks[wide].itertuples()]
        rows += [{"ceiling": f"outputs {r.precision} {r.engine} {r.threads} thread(s)",
                  "value": r.goutputs_per_s, "unit": "G outputs/s",
                  "how": f"a 3x3 convolution of a one-channel image, {r.outputs:,} outputs"}
                 for r in self.peaks[thin].itertuples()]
        rows += [{"ceiling": f"bandwidth {r.level}", "value": r.bytes_per_s / 1e9, "unit": "GB/s",
                  "how": f"NumPy copy, {r.working_set_bytes / KiB:,.0f} KiB working set"}
                 for r in self.levels.itertuples()]
        rows += [{"ceiling": f"one call, {io} input", "value": us, "unit": "us",
                  "how": "a one-reshape model through measure.litert"}
                 for io, us in self.call_us.items()]
        return pd.DataFrame(rows)

    def record(self) -> dict:
        return {key: value.to_dict("records") if isinstance(value, pd.DataFrame) else value
                for key, value in asdict(self).items()}


def measure_ceilings(threads=None, repeats: int = 40) -> Ceilings:
    """Measure every ceiling now: about 10 s the first time (the probes are converted), 4 s
    after."""
    cores = machine.usable_cores()
    threads = threads or sorted({1, min(2, cores), cores})
    # timed apart: the wide probe's 1.6 MB of activations would evict the thin probe's from L2
    peaks = pd.concat([peak_mac_rate(probes, threads=threads, engines=ENGINES, repeats=repeats)
                       for probes in (export_probes(), export_probes(channels=32, in_channels=1))],
                      ignore_index=True)
    sweep = bandwidth_sweep()
    images = np.random.default_rng(0).random((64, 28, 28, 1), dtype=np.float32)
    return Ceilings(peaks, sweep, memory_levels(sweep, cache_sizes()),
                    call_overhead(call_models(), images), machine.machine_string())


def ceilings(refresh: bool = False, directory: Path = ROOFLINE_DIR) -> Ceilings:
    """This machine's ceilings: measured once and kept in `directory`, measured again when the
    machine differs or `refresh` is set."""
    path = Path(directory) / f"ceilings-{files.content_key(machine.machine_string())}.json"
    if path.exists() and not refresh:
        record = pd.read_json(path, typ="series").to_dict()
        return Ceilings(pd.DataFrame(record["peaks"]), pd.DataFrame(record["sweep"]),
                        pd.DataFrame(record["levels"]), dict(record["call_us"]), record["machine"])
    found = measure_ceilings()
    files.write_json(path, found.record())
    return found


# ----------------------------------------------------------------------------- 5. predicting a file

DTYPE_BYTES = {"FLOAT32": 4, "INT32": 4, "FLOAT16": 2, "INT16": 2, "INT8": 1, "UINT8": 1,
               "INT64": 8, "BOOL": 1, "INT4": 0.5, "INT2": 0.25}


def op_macs(op: str, weight_shape: tuple, first_input_shape: tuple, output_count: int) -> int:
    """MACs of one op from its shapes (0 for ops that only move data)."""
    if op == "CONV_2D":            # weights [out, kh, kw, in]
        return output_count * int(np.prod(weight_shape[1:]))
    if op == "DEPTHWISE_CONV_2D":  # weights [1, kh, kw, channels]
        return output_count * int(np.prod(weight_shape[1:3]))
    if op == "FULLY_CONNECTED":    # weights [units, in]
        return output_count * int(weight_shape[-1])
    if op == "BATCH_MATMUL":
        return output_count * int(first_input_shape[-1])
    return 0


def _elements(shape: tuple, batch: int) -> int:
    """Elements of a tensor stored with batch 1, at `batch` (constants keep their shape)."""
    count = int(np.prod(shape)) if shape else 1
    return count * batch if shape and shape[0] == 1 else count


def _layer(op, stored: pd.DataFrame) -> str:
    """A readable name for an op: the layer its weight or output tensor names (conv2, dense1,
    pool1), else the op's type."""
    names = [stored.loc[t, "name"] for t in (*op.inputs[1:2], op.outputs[0]) if t >= 0]
    for name in names:
        if tflite.layer_like(name):
            return tflite.layer_like(name)
    parts = names[-1].split(";")[0].split("/")
    return parts[1] if len(parts) > 2 else op.op.lower()


def as_file(model_or_path) -> Path:
    """A .tflite path as given, or a Keras model as the float32 file LiteRT would run (the model
    cache's, keyed by its weights)."""
    if isinstance(model_or_path, keras.Model):
        return quantization.export(model_or_path, "float32", name=model_or_path.name,
                                   directory=ROOFLINE_DIR)
    return tflite.check(model_or_path)


def _op_rows(path, batch: int, xnnpack: bool) -> tuple:
    """Per op: MACs, precision, engine, and the bytes it reads and writes at run time; and the
    activation arena. Read once per file as it is on disk (the store's rows share files)."""
    path = as_file(path)
    stat = path.stat()
    return _read_ops(str(path), stat.st_mtime_ns, stat.st_size, batch, xnnpack)


@functools.lru_cache(maxsize=256)
def _read_ops(path: str, _mtime_ns: int, _size: int, batch: int, xnnpack: bool) -> tuple:
    stored, ops = tflite.stored_tensors(path), tflite.ops(path)
    kinds = litert_quant.op_precisions(path)
    # An op whose inputs are all stored in the file (DEQUANTIZE or DENSIFY of a weight) runs once,
    # at load or at the first call, and its result is kept: later ops read it as a weight.
    made_once, rows = set(), []
    for index, op in enumerate(ops.itertuples()):
        once = all(stored.loc[t, "stored_bytes"] > 0 or t in made_once
                   for t in op.inputs if t >= 0)
        made_once |= set(op.outputs) if once else set()
        weights = activations = 0.0
        for t in [i for i in op.inputs if i >= 0]:
            tensor = stored.loc[t]
            if t in made_once:         # widened (or densified) once, then read as it was left
                weights += _elements(tensor["shape"], 1) * DTYPE_BYTES[tensor["type"]]
            elif tensor["stored_bytes"] > 0:
                weights += tensor["stored_bytes"]
            else:
                activations += _elements(tensor["shape"], batch) * DTYPE_BYTES[tensor["type"]]
        outputs = [stored.loc[t] for t in op.outputs]
        activations += sum(_elements(t["shape"], batch) * DTYPE_BYTES[t["type"]] for t in outputs)
        weight_shape = stored.loc[op.inputs[1], "shape"] if len(op.inputs) > 1 else ()
        macs = op_macs(op.op, weight_shape, stored.loc[op.inputs[0], "shape"],
                       _elements(outputs[0]["shape"], batch))
        computes_in = kinds.loc[index, "computes_in"]
        rows.append({"op_index": index, "op": op.op, "layer": _layer(op, stored), "macs": macs,
                     "precision": "int8" if computes_in.startswith(("integer", "hybrid"))
                     else "fp32",
                     "engine": kinds.loc[index, "runs_on"] if xnnpack else "built-in kernel",
                     "outputs": _elements(outputs[0]["shape"], batch),
                     "weight_bytes": 0.0 if once else weights,
                     "activation_bytes": 0.0 if once else activations, "once": once})
    return tuple(rows), tflite.arena_bytes(path)["planned_peak_bytes"] * batch


def op_table(path, found: Ceilings, *, batch: int = 1, threads: int = 1,
             xnnpack: bool = True) -> pd.DataFrame:
    """The roofline's prediction for every op of a .tflite file (or a Keras model, as_file), in
    execution order.

    Columns: op_index, op, layer, macs, outputs, precision, engine, weight_bytes (as the runtime
    reads them: a weight widened to float32 once counts 4 bytes), activation_bytes (read and
    written), intensity (FLOPs per byte), compute_us (at the wide probe's peak), memory_us (at
    the bandwidth of the level that holds the whole model: weights + activation arena),
    outputs_us (at the thin probe's output rate), predicted_us (the largest), bound.
    """
    if batch < 1 or threads < 1:
        raise ValueError(f"batch and threads must be >= 1, got {batch} and {threads}")
    rows, arena = _op_rows(path, batch, xnnpack)
    table = pd.DataFrame(list(rows))
    footprint = table["weight_bytes"].sum() + arena
    bandwidth = bandwidth_at(found.sweep, footprint)
    moved = table["weight_bytes"] + table["activation_bytes"]
    kinds = list(zip(table["precision"], table["engine"]))
    peak = np.array([found.peak_flops(p, e, threads) for p, e in kinds])
    rate = np.array([found.output_rate(p, e, threads) for p, e in kinds])
    table["intensity"] = FLOPS_PER_MAC * table["macs"] / moved.where(moved > 0)
    table["compute_us"] = FLOPS_PER_MAC * table["macs"] / peak * 1e6
    table["memory_us"] = moved / bandwidth * 1e6
    table["outputs_us"] = np.where(table["macs"] > 0, table["outputs"] / rate * 1e6, 0.0)
    times = table[["compute_us", "memory_us", "outputs_us"]]
    table["predicted_us"] = times.max(axis=1)
    table["bound"] = np.where(table["once"], "once, at load",
                              times.idxmax(axis=1).str.replace("_us", "").replace("outputs",
                                                                                 "output"))
    table.attrs.update(footprint_bytes=float(footprint), bandwidth_bytes_per_s=bandwidth,
                       batch=batch, threads=threads)
    return table.drop(columns="once")


def plot_points(table: pd.DataFrame, group: str, time_column: str = "predicted_us"):
    """The ops with MACs as points of plots.roofline: label, intensity, flops_per_s (at
    `time_column`'s time), group."""
    ops = table[(table["macs"] > 0) & (table[time_column] > 0)]
    return pd.DataFrame({"label": ops["layer"], "intensity": ops["intensity"],
                         "flops_per_s": FLOPS_PER_MAC * ops["macs"] / (ops[time_column] * 1e-6),
                         "group": group})


def predict(path, found: Ceilings, *, batch: int = 1, threads: int = 1,
            xnnpack: bool = True) -> dict:
    """The predicted time of one call at `batch` images, and per image: the ops' roofline times
    plus the cost of one call for the file's input type."""
    path = as_file(path)
    table = op_table(path, found, batch=batch, threads=threads, xnnpack=xnnpack)
    io = "float32" if tflite.io_dtypes(path)[0] == np.float32 else "int8"
    ops_us = float(table["predicted_us"].sum())
    call_us = float(found.call_us[io])
    return {"ops_us": ops_us, "call_us": call_us, "predicted_us": ops_us + call_us,
            "per_image_us": (ops_us + call_us) / batch, "macs": int(table["macs"].sum()),
            "bound": table.groupby("bound")["predicted_us"].sum().idxmax()}


# ----------------------------------------------------------------------------- 6. measured

def runs_as(variant: str) -> dict:
    """How the book ran a stored variant, from its name: the runtime rows of the graph chapter
    name their thread count and engine; every other row is LiteRT, XNNPACK, 1 thread."""
    return {"threads": 2 if "2-threads" in variant else 1,
            "xnnpack": "built-in-kernels" not in variant}


def against_measured(table: pd.DataFrame, found: Ceilings) -> pd.DataFrame:
    """Every stored .tflite variant with a batch-1 p50 (serving rows aside: their latency is a
    round trip), beside the roofline's prediction.

    Columns: variant, technique, notebook, measured_us, predicted_us, ratio (measured over
    predicted), error (|measured - predicted| / measured), bound.
    """
    kept = table[table["artifact"].fillna("").str.endswith(".tflite")
                 & table["latency_p50_us"].notna() & (table["technique"] != "serving")]
    rows = []
    for row in kept.itertuples():
        path = labkit.ROOT / row.artifact
        if not path.exists():
            continue
        found_now = predict(path, found, **runs_as(row.variant))
        rows.append({"variant": row.variant, "technique": row.technique,
                     "notebook": row.notebook, "measured_us": row.latency_p50_us,
                     "predicted_us": found_now["predicted_us"], "bound": found_now["bound"]})
    out = pd.DataFrame(rows, columns=["variant", "technique", "notebook", "measured_us",
                                      "predicted_us", "bound"])
    out["ratio"] = out["measured_us"] / out["predicted_us"]
    out["error"] = (out["measured_us"] - out["predicted_us"]).abs() / out["measured_us"]
    return out


def where_time_goes(path, found: Ceilings, *, repeats: int = 200) -> pd.DataFrame:
    """Per op at batch 1, one thread: predicted (op_table) beside measured (profiler.litert_ops,
    each op cut out and timed alone), and a last row for the invoke and the steps between ops,
    which the roofline does not see. `.attrs`: whole_us, predicted_us (sum of the ops)."""
    predicted = op_table(path, found)
    measured = profiler.where_time_goes(path, repeats=repeats)
    out = predicted[["op_index", "op", "layer", "bound", "predicted_us"]].merge(
        measured[["op_index", "op", "measured_us"]], on=["op_index", "op"], how="outer")
    out["predicted_us"] = out["predicted_us"].fillna(0.0)
    out["bound"] = out["bound"].fillna("not modelled")
    out["layer"] = out["layer"].fillna("")
    last = out["op_index"].where(out["op_index"] >= 0, len(out))   # the overhead row last
    out = out.iloc[last.argsort()].reset_index(drop=True)
    out.attrs = {**measured.attrs, "predicted_us": float(predicted["predicted_us"].sum())}
    return out
