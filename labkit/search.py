"""Mixed precision, and an automated multi-objective search of the trade-off space (notebook 08).

Read top to bottom:

1. quantization modes for a Keras model: float16, dynamic-range, full int8, and *mixed*:
   int8 everywhere except the layers a sensitivity analysis marks as fragile, which stay in
   float32 (the TFLite quantization debugger's denylist);
2. one search point (``Settings``): a parent model (the baseline, or the low-rank model of
   notebook 08's second section), magnitude sparsity, weight clusters and the quantization
   mode. ``build`` turns settings into a .tflite: prune while fine-tuning, cluster, convert;
3. ``run_search``: Optuna's multi-objective TPE sampler minimises gzip size and latency subject
   to a validation-accuracy floor (accuracy is kept as a third objective). Trials live in a
   SQLite file under artifacts/search/, so an interrupted search resumes where it stopped and
   loses no finished trial; each trial's .tflite is cached by its settings;
4. the Pareto front (our own, checked against Optuna's), measured beside notebook 07's
   hand-made variants, and ``benchmark()`` (``python -m labkit.search``).
"""
from __future__ import annotations

import hashlib
import io
import json
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import labkit  # sets the legacy-Keras switch before TensorFlow loads
import numpy as np
import pandas as pd

labkit._import_tensorflow_quietly()   # quiet start-up for `python -m labkit.search` too
import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

from labkit import ARTIFACTS_DIR, measure, models  # noqa: E402

SEARCH_DIR = ARTIFACTS_DIR / "search"
NOTEBOOK = "08_search"
QUANT_MODES = ("float32", "float16", "dynamic", "int8", "mixed")
CALIBRATION_IMAGES = 200


# ============================================================================ 1. quantization modes

def _representative(x: np.ndarray, n: int = CALIBRATION_IMAGES):
    x = np.asarray(x[:n], np.float32)

    def images():
        for i in range(len(x)):
            yield [x[i:i + 1]]
    return images


def converter(model, mode: str, calibration: np.ndarray | None = None):
    """A TFLite converter for float32, float16, dynamic (int8 weights) or int8 (float I/O kept)."""
    if mode not in QUANT_MODES or mode == "mixed":
        raise ValueError(f"mode must be one of {QUANT_MODES[:-1]} here (mixed: use mixed_tflite), got {mode!r}")
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    if mode != "float32":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "float16":
        conv.target_spec.supported_types = [tf.float16]
    if mode == "int8":
        if calibration is None:
            raise ValueError("int8 needs calibration images to set the activation ranges")
        conv.representative_dataset = _representative(calibration)
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return conv


def write(content_or_converter, path) -> Path:
    """Write a .tflite from a converter or from bytes, quietly."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with labkit.quiet_stderr(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        content = content_or_converter if isinstance(content_or_converter, bytes) \
            else content_or_converter.convert()
    tmp = path.with_name(path.stem + ".tmp.tflite")
    tmp.write_bytes(content)
    tmp.replace(path)
    return path


def debugger(model, calibration: np.ndarray, debug_images: int = 50):
    """TFLite's quantization debugger on a calibrated int8 conversion, and its per-op statistics.

    The debugger keeps the calibrated model: `denylist` then reconverts it with chosen nodes
    left in float, without calibrating again.
    """
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = _representative(calibration)
    with labkit.quiet_stderr(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        debug = tf.lite.experimental.QuantizationDebugger(
            converter=conv, debug_dataset=_representative(calibration, debug_images))
        debug.run()
    return debug, layer_statistics(debug, weight_layers(model))


def denylist(debug, nodes) -> bytes:
    """The debugger's model quantized to int8 except the graph nodes `nodes`, which stay float32.

    The names are the graph's node names, as in the statistics' tensor_name column. A name the
    graph does not have is ignored without a word: see nodes_of.
    """
    with labkit.quiet_stderr(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        debug.options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=list(nodes))
        return debug.get_nondebug_quantized_model()


def nodes_of(stats: pd.DataFrame, layers) -> list:
    """The graph node names of Keras layers, read from the debugger's statistics."""
    unknown = set(layers) - set(stats["layer"])
    if unknown:
        raise ValueError(f"layers {sorted(unknown)} have no conv or fully-connected op in the converted "
                         f"graph; its layers are {sorted(set(stats['layer']) - {''})}")
    return list(stats.loc[stats["layer"].isin(list(layers)), "tensor_name"])


def layer_statistics(debug, layer_names) -> pd.DataFrame:
    """The debugger's per-op statistics, each row with the Keras layer of its op ('' for ops without weights).

    RMSE is in units of the int8 step (scale): a uniform quantizer's own rounding noise is
    1/sqrt(12) = 0.29 steps, so a layer well above that loses more than rounding.
    """
    buffer = io.StringIO()
    debug.layer_statistics_dump(buffer)
    buffer.seek(0)
    stats = pd.read_csv(buffer)
    interpreter = debug._quant_interpreter            # the debugger has no public op list
    details = {t["index"]: t for t in interpreter.get_tensor_details()}
    layer_of_output = {}
    for op in interpreter._get_ops_details():
        if op["op_name"] in ("CONV_2D", "FULLY_CONNECTED"):
            weight = details[op["inputs"][1]]["name"]
            hits = [name for name in layer_names if f"/{name}/" in weight]
            for index in op["outputs"]:
                layer_of_output[index] = hits[0] if hits else ""
    stats["layer"] = stats["tensor_idx"].map(layer_of_output).fillna("")
    stats["rmse_in_steps"] = np.sqrt(stats["mean_squared_error"]) / stats["scale"]
    return stats


def op_precisions(path, layer_names) -> pd.DataFrame:
    """Per conv / fully-connected op of a .tflite: its Keras layer and the dtypes of its weights and input."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    with labkit.quiet_stderr():
        interpreter = Interpreter(model_path=str(path),
                                  experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        interpreter.allocate_tensors()
    details = {t["index"]: t for t in interpreter.get_tensor_details()}
    ops = interpreter._get_ops_details()
    # float16 files keep weights in float16 and widen them with a DEQUANTIZE op: follow it back
    widened = {op["outputs"][0]: op["inputs"][0] for op in ops if op["op_name"] == "DEQUANTIZE"}
    rows = []
    for op in ops:
        if op["op_name"] not in ("CONV_2D", "FULLY_CONNECTED"):
            continue
        weight = details[widened.get(op["inputs"][1], op["inputs"][1])]
        hits = [name for name in layer_names if f"/{name}/" in weight["name"]]
        rows.append({"layer": hits[0] if hits else weight["name"], "op": op["op_name"],
                     "weights": np.dtype(weight["dtype"]).name,
                     "input": np.dtype(details[op["inputs"][0]]["dtype"]).name})
    return pd.DataFrame(rows).set_index("layer")


def mixed_tflite(model, calibration: np.ndarray, float_layers, path) -> Path:
    """int8 everywhere except `float_layers` (Keras names), which keep float32 weights and activations."""
    debug, stats = debugger(model, calibration)
    return write(denylist(debug, nodes_of(stats, float_layers)), path)


def weight_layers(model) -> list:
    """Names of the Conv2D and Dense layers, in order."""
    return [layer.name for layer in model.layers if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))]


def sensitivity(model, calibration, x_val, y_val, directory: Path, progress: bool = True) -> pd.DataFrame:
    """Which layers int8 hurts. Per conv / dense layer: its weights, the debugger's error in int8 steps,
    and the validation accuracy when that layer alone stays float (gain: against all-int8)."""
    directory = Path(directory)
    debug, stats = debugger(model, calibration, debug_images=len(calibration))
    all_int8 = write(denylist(debug, []), directory / "all-int8.tflite")
    base = measure.accuracy(measure.litert(all_int8), x_val, y_val)
    rows = []
    for layer in labkit.progress_bar(weight_layers(model), desc="one layer in float", disable=not progress):
        path = write(denylist(debug, nodes_of(stats, [layer])), directory / f"float-{layer}.tflite")
        rows.append({"layer": layer, "weights": int(model.get_layer(layer).get_weights()[0].size),
                     "rmse_in_steps": float(stats.loc[stats["layer"] == layer, "rmse_in_steps"].max()),
                     "val_accuracy": measure.accuracy(measure.litert(path), x_val, y_val)})
    table = pd.DataFrame(rows).set_index("layer")
    table["gain"] = table["val_accuracy"] - base
    table.attrs["all_int8_val_accuracy"] = base
    return table


def fragile_layers(table: pd.DataFrame, max_layers: int = 2) -> list:
    """The layers to keep in float: largest validation gain first, ties broken by the larger error in
    int8 steps; at most `max_layers`, and only layers whose float copy gains anything (else the one
    with the largest error, so that mixed differs from all-int8)."""
    if max_layers < 1:
        raise ValueError(f"max_layers must be >= 1, got {max_layers}")
    ranked = table.sort_values(["gain", "rmse_in_steps"], ascending=False)
    chosen = list(ranked[ranked["gain"] > 0].index[:max_layers])
    return chosen or list(ranked.index[:1])


# ============================================================================ 2. one search point

@dataclass(frozen=True)
class Settings:
    """One point of the search space: which parent model, and what is done to it."""
    model: str = "lowrank"      # a key of the parents handed to the search (e.g. baseline, lowrank)
    sparsity: float = 0.5       # fraction of zeros in every large kernel
    clusters: int = 0           # 0: no clustering; else shared values per large kernel (zeros kept)
    quantization: str = "int8"

    def __post_init__(self):
        if self.quantization not in QUANT_MODES:
            raise ValueError(f"quantization must be one of {QUANT_MODES}, got {self.quantization!r}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity is a fraction of zeros in [0, 1), got {self.sparsity}")
        if self.clusters != 0 and not 2 <= self.clusters <= 256:
            raise ValueError(f"clusters must be 0 (none) or 2..256, got {self.clusters}")

    @property
    def name(self) -> str:
        k = f"k{self.clusters}" if self.clusters else "nok"
        return f"search-{self.model}-s{round(100 * self.sparsity)}-{k}-{self.quantization}"


@dataclass(frozen=True)
class FineTune:
    """The fine-tune that follows pruning (on labels: the parents are already trained)."""
    train_subset: int | None = None   # all 55k images: about 0.1 points better than 20k here
    epochs: int = 1
    learning_rate: float = 5e-4
    batch_size: int = 128
    seed: int = 0


PRUNE_MIN_WEIGHTS = 4000   # smaller kernels (conv1, logits, thin factors) are not worth the accuracy


def prunable(model) -> list:
    """The Conv2D and Dense layers with at least PRUNE_MIN_WEIGHTS weights: the ones pruned and clustered."""
    return [layer.name for layer in model.layers
            if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))
            and layer.get_weights()[0].size >= PRUNE_MIN_WEIGHTS]


def prune(model, sparsity: float, splits, plan: FineTune = FineTune(), progress: bool = False):
    """tfmot magnitude pruning of the large layers while fine-tuning; returns the stripped model."""
    import tensorflow_model_optimization as tfmot
    x, y = splits.x_train[:plan.train_subset], splits.y_train[:plan.train_subset]   # None: all
    steps = plan.epochs * int(np.ceil(len(x) / plan.batch_size))
    # reach the target halfway, then let the surviving weights settle
    schedule = tfmot.sparsity.keras.PolynomialDecay(0.0, sparsity, 0, max(steps // 2, 1),
                                                    frequency=max(steps // 10, 1))
    large = prunable(model)
    fresh = models.clone_with_weights(model)   # tfmot wrappers reuse layers: never wrap the parent's
    wrapped = keras.models.clone_model(fresh, clone_function=lambda layer: tfmot.sparsity.keras.prune_low_magnitude(
        layer, pruning_schedule=schedule) if layer.name in large else layer)
    models.train(wrapped, x, y, epochs=plan.epochs, batch_size=plan.batch_size, learning_rate=plan.learning_rate,
                 seed=plan.seed, progress=progress, callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
    return tfmot.sparsity.keras.strip_pruning(wrapped)


def cluster(model, k: int, preserve_sparsity: bool) -> keras.Model:
    """One-shot k-means++ weight sharing of the large layers (no fine-tune: trials stay short)."""
    import tensorflow_model_optimization as tfmot
    init = tfmot.clustering.keras.CentroidInitialization.KMEANS_PLUS_PLUS
    large = prunable(model)
    fresh = models.clone_with_weights(model)
    wrapped = keras.models.clone_model(fresh, clone_function=lambda layer: tfmot.clustering.keras.cluster_weights(
        layer, number_of_clusters=k, cluster_centroids_init=init, preserve_sparsity=preserve_sparsity)
        if layer.name in large else layer)
    return tfmot.clustering.keras.strip_clustering(wrapped)


def load_or_prune(parent, sparsity: float, splits, plan: FineTune, directory: Path, progress: bool = False):
    """prune(), cached under `directory` by the parent's weights, the sparsity and the plan."""
    settings = {"parent": weights_key(parent), "sparsity": sparsity, "plan": asdict(plan)}
    path = Path(directory) / f"pruned-s{round(100 * sparsity)}-{models.settings_key(settings)}.keras"
    if (cached := models.load_cached(path, compile=False)) is not None:
        return cached[0]
    model = prune(parent, sparsity, splits, plan, progress)
    models.save_cached(model, settings, path)
    return model


def weights_key(model) -> str:
    """A short hash of a model's weights: names a parent in the trial cache."""
    digest = hashlib.sha256()
    for w in model.get_weights():
        digest.update(np.ascontiguousarray(w).tobytes())
    return digest.hexdigest()[:10]


def build(settings: Settings, parents: dict, splits, plan: FineTune = FineTune(), float_layers=("conv1", "logits"),
          directory: Path = SEARCH_DIR / "trials", progress: bool = False) -> dict:
    """The .tflite of one search point and its validation accuracy, cached by settings and parent.

    `parents` is {name: Keras model}; `float_layers` ({parent name: layers}, or one list for all)
    are the layers the mixed mode keeps in float (names a parent lacks are skipped).
    Returns {"artifact", "val_accuracy", "macs", "build_seconds"} and the build record.
    """
    if settings.model not in parents:
        raise ValueError(f"model {settings.model!r} is not among the parents {sorted(parents)}")
    parent = parents[settings.model]
    if isinstance(float_layers, dict):
        float_layers = float_layers.get(settings.model, ())
    float_layers = [name for name in float_layers if name in weight_layers(parent)]
    key = models.settings_key({"settings": asdict(settings), "plan": asdict(plan), "float_layers": float_layers,
                               "parent": weights_key(parent)})
    path = Path(directory) / f"{settings.name}-{key}.tflite"
    record_path = path.with_suffix(".json")
    if path.is_file() and record_path.is_file():
        return {**json.loads(record_path.read_text()), "artifact": str(path), "build_seconds": 0.0}
    start = time.perf_counter()
    model = parent
    if settings.sparsity > 0:   # trials that differ only after pruning share one pruned model
        model = load_or_prune(parent, settings.sparsity, splits, plan, Path(directory).parent / "pruned", progress)
    if settings.clusters:
        model = cluster(model, settings.clusters, preserve_sparsity=settings.sparsity > 0)
    calibration = splits.x_train[:CALIBRATION_IMAGES]
    if settings.quantization == "mixed":
        mixed_tflite(model, calibration, float_layers, path)
    else:
        write(converter(model, settings.quantization, calibration), path)
    record = {"settings": asdict(settings), "plan": asdict(plan), "float_layers": float_layers,
              "val_accuracy": measure.accuracy(measure.litert(path), splits.x_val, splits.y_val),
              "macs": measure.count_macs(model), "seconds": time.perf_counter() - start}
    record_path.write_text(json.dumps(record, indent=1))
    return {**record, "artifact": str(path), "build_seconds": record["seconds"]}


def latency_us(path, images: np.ndarray, repeats: int = 200, threads: int = 1) -> float:
    """Median batch-1 LiteRT latency of one model: the search's objective. Figures that are compared
    in the notebook are timed again, interleaved with the variants they are compared with."""
    runner = measure.litert(path, num_threads=threads, name="trial")
    return measure.measure_latency([runner], images, warmup=20, repeats=repeats).p50("trial")


# ============================================================================ 3. the search

@dataclass(frozen=True)
class SearchSpace:
    """The choices the sampler may make (small: the book's default budget is a dozen trials)."""
    model: tuple = ("baseline", "lowrank")
    sparsity: tuple = (0.0, 0.5, 0.7, 0.8, 0.9)
    clusters: tuple = (0, 16, 32)
    quantization: tuple = ("float16", "dynamic", "int8", "mixed")

    def suggest(self, trial) -> Settings:
        return Settings(**{name: trial.suggest_categorical(name, list(getattr(self, name)))
                           for name in ("model", "sparsity", "clusters", "quantization")})


def check_floor(accuracy_floor) -> float:
    if isinstance(accuracy_floor, bool) or not isinstance(accuracy_floor, (int, float, np.floating)) \
            or not 0.0 <= accuracy_floor <= 1.0:
        raise ValueError(f"accuracy_floor is a validation accuracy in [0, 1] (for example 0.985), "
                         f"got {accuracy_floor!r}")
    return float(accuracy_floor)


def check_budget(n_trials) -> int:
    if isinstance(n_trials, bool) or not isinstance(n_trials, (int, np.integer)) or n_trials < 1:
        raise ValueError(f"n_trials is the number of finished trials wanted, a whole number >= 1, got {n_trials!r}")
    return int(n_trials)


# Minimise size and latency; accuracy is a floor (a constraint) and also a third objective, so that
# the front keeps the accurate variants in view instead of only those just above the floor.
OBJECTIVES = {"val_accuracy": "max", "gzip_bytes": "min", "latency_p50_us": "min"}


def _constraint(trial) -> list:
    """Optuna's convention: feasible when every value is <= 0."""
    return [trial.user_attrs.get("accuracy_floor", 1.0) - trial.user_attrs.get("val_accuracy", 0.0)]


def open_study(name: str, storage: str | None = None, seed: int = 0):
    """Create or reopen a study; trials left RUNNING by an interrupted run are marked FAIL."""
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if storage is None:
        SEARCH_DIR.mkdir(parents=True, exist_ok=True)
        storage = f"sqlite:///{SEARCH_DIR / 'search.db'}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # multivariate TPE is marked experimental
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=6, multivariate=True,
                                             constraints_func=_constraint)
        study = optuna.create_study(study_name=name, storage=storage, load_if_exists=True, sampler=sampler,
                                    directions=[{"max": "maximize", "min": "minimize"}[sense]
                                                for sense in OBJECTIVES.values()])
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    return study


def finished(study) -> list:
    import optuna
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def optimize(study, evaluate, n_trials: int, accuracy_floor: float, space: SearchSpace = SearchSpace(),
             progress: bool = True):
    """Run trials until the study holds `n_trials` finished ones; `evaluate(settings) -> dict` with
    val_accuracy and the OBJECTIVES. Optuna commits each finished trial to the storage at once."""
    n_trials, accuracy_floor = check_budget(n_trials), check_floor(accuracy_floor)
    done = len(finished(study))
    bar = labkit.progress_bar(total=n_trials, initial=min(done, n_trials), desc="search trials", unit="trial",
                              disable=not progress)

    def objective(trial):
        settings = space.suggest(trial)
        out = evaluate(settings)
        trial.set_user_attr("accuracy_floor", accuracy_floor)
        for key, value in out.items():
            trial.set_user_attr(key, value)
        return tuple(float(out[name]) for name in OBJECTIVES)

    def tick(study, trial):
        bar.update(1)
        bar.set_postfix(val_acc=f"{trial.user_attrs.get('val_accuracy', float('nan')):.4f}")

    try:
        if done < n_trials:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                study.optimize(objective, n_trials=n_trials - done, callbacks=[tick])
    finally:
        bar.close()
    return study


def trials_table(study) -> pd.DataFrame:
    """One row per finished trial: settings, validation accuracy, objectives, feasibility."""
    rows = [{"trial": t.number, **t.params, **t.user_attrs, "feasible": _constraint(t)[0] <= 0}
            for t in finished(study)]
    return pd.DataFrame(rows).set_index("trial") if rows else pd.DataFrame()


def run_search(parents: dict, splits, *, n_trials: int = 12, accuracy_floor: float = 0.985,
               space: SearchSpace = SearchSpace(), plan: FineTune = FineTune(), float_layers=("conv1", "logits"),
               study_name: str | None = None, storage: str | None = None, progress: bool = True):
    """The book's search: build and measure each sampled variant; returns the Optuna study.

    The study's name hashes the space, the parents, the fine-tune plan and the floor: changing any
    of them starts a new study, and calling again with a larger n_trials continues the same one.
    """
    accuracy_floor, n_trials = check_floor(accuracy_floor), check_budget(n_trials)
    missing = set(space.model) - set(parents)
    if missing:
        raise ValueError(f"the space names models {sorted(missing)} that are not among the parents {sorted(parents)}")
    if study_name is None:
        study_name = "search-" + models.settings_key(
            {"space": asdict(space), "plan": asdict(plan), "floor": accuracy_floor,
             "float_layers": float_layers if isinstance(float_layers, dict) else sorted(float_layers),
             "parents": {name: weights_key(m) for name, m in sorted(parents.items())}})
    study = open_study(study_name, storage)
    timing_images = splits.x_val[:100]

    def evaluate(settings: Settings) -> dict:
        built = build(settings, parents, splits, plan, float_layers)
        path = built["artifact"]
        return {"name": settings.name, "artifact": path, "val_accuracy": built["val_accuracy"],
                "size_bytes": measure.size_bytes(path), "gzip_bytes": measure.gzip_bytes(path),
                "latency_p50_us": latency_us(path, timing_images), "macs": built["macs"],
                "build_seconds": built["build_seconds"]}
    return optimize(study, evaluate, n_trials, accuracy_floor, space, progress)


# ============================================================================ 4. the Pareto front

def non_dominated(values: np.ndarray) -> np.ndarray:
    """Mask of the rows no other row dominates; every column is 'smaller is better'.

    Row a dominates row b when a <= b everywhere and a < b somewhere; equal rows both stay.
    """
    values = np.asarray(values, np.float64)
    if values.ndim != 2:
        raise ValueError(f"values must be a 2-D array (points x objectives), got shape {values.shape}")
    no_worse = (values[:, None, :] <= values[None, :, :]).all(axis=2)    # [a, b]: a <= b everywhere
    better = (values[:, None, :] < values[None, :, :]).any(axis=2)
    return ~(no_worse & better).any(axis=0)


def pareto_front(table: pd.DataFrame, objectives: dict = OBJECTIVES, feasible_only: bool = True) -> pd.DataFrame:
    """The rows of a trials table on the front of `objectives` ({column: "max" or "min"})."""
    if table.empty:
        return table
    candidates = table[table["feasible"]] if feasible_only else table
    if candidates.empty:
        return candidates
    for column, sense in objectives.items():
        if sense not in ("max", "min"):
            raise ValueError(f"objective sense must be 'max' or 'min', got {sense!r} for {column}")
    signs = np.array([-1.0 if sense == "max" else 1.0 for sense in objectives.values()])
    mask = non_dominated(candidates[list(objectives)].to_numpy(dtype=float) * signs)
    return candidates[mask].sort_values(list(objectives)[1:])


SENSES = {"accuracy": "max", "gzip_bytes": "min", "latency_p50_us": "min"}


def beats(a: pd.Series, b: pd.Series, senses: dict = SENSES) -> tuple[int, int]:
    """(objectives where a is strictly better than b, objectives where a is worse)."""
    better = worse = 0
    for column, sense in senses.items():
        diff = (a[column] - b[column]) * (1 if sense == "max" else -1)
        better += diff > 0
        worse += diff < 0
    return int(better), int(worse)


def dominance(found: pd.DataFrame, hand_made: pd.DataFrame, senses: dict = SENSES, at_least: int = 2) -> pd.DataFrame:
    """For every pair: does the found variant win on >= `at_least` objectives and lose on none?"""
    rows = []
    for f_name, f in found.iterrows():
        for h_name, h in hand_made.iterrows():
            better, worse = beats(f, h, senses)
            rows.append({"found": f_name, "hand_made": h_name, "better_on": better, "worse_on": worse,
                         "dominates": better >= at_least and worse == 0})
    return pd.DataFrame(rows)


def pipeline_variants(table: pd.DataFrame | None = None) -> pd.DataFrame:
    """Notebook 07's hand-made variants from the results store (technique 'pipeline', not ours)."""
    from labkit import results
    table = results.load() if table is None else table
    rows = table[(table["technique"] == "pipeline") & (table["notebook"] != NOTEBOOK)]
    return rows[rows["artifact"].fillna("") != ""]


def measure_side_by_side(paths: dict, splits, repeats: int = 300, threads: int = 1):
    """Test accuracy, sizes and interleaved batch-1 LiteRT latency of {name: .tflite}; returns (table, latency)."""
    runners = [measure.litert(p, num_threads=threads, name=name) for name, p in paths.items()]
    latency = measure.measure_latency(runners, splits.x_val[:200], warmup=30, repeats=repeats)
    rows = [{"variant": r.name, "accuracy": measure.accuracy(r, splits.x_test, splits.y_test),
             "size_bytes": measure.size_bytes(paths[r.name]), "gzip_bytes": measure.gzip_bytes(paths[r.name]),
             "latency_p50_us": latency.p50(r.name), "latency_p95_us": latency.p95(r.name),
             "artifact": str(paths[r.name])} for r in runners]
    return pd.DataFrame(rows).set_index("variant"), latency


def record(table: pd.DataFrame, latency, technique: str = "search") -> pd.DataFrame:
    """Store the rows of a side-by-side table (index: variant name)."""
    from labkit import results
    rows = [results.make_row(name, technique, NOTEBOOK, accuracy=float(row["accuracy"]), latency=latency,
                             runner_name=name, artifact=row["artifact"]) for name, row in table.iterrows()]
    return results.upsert(rows)


# ============================================================================ 5. the book's run and the benchmark

ACCURACY_FLOOR = 0.988    # validation accuracy; the baseline scores 0.9894 on the same 5000 images
BOOK_TRIALS = 12          # about three minutes on two cores; BOOK_TRIALS_LARGE for a fuller front
BOOK_TRIALS_LARGE = 60


def parents(splits, teacher=None, progress: bool = True) -> dict:
    """The search's starting points: the baseline and its fine-tuned low-rank version (cached)."""
    from labkit import lowrank
    if teacher is None:
        teacher, _ = models.load_or_train_baseline()
    low, _ = lowrank.load_or_fine_tune(teacher, lowrank.BOOK_RANKS, splits, progress=progress)
    return {"baseline": teacher, "lowrank": low}


def book_float_layers(parent_models: dict, splits, progress: bool = True) -> tuple[dict, dict]:
    """Each parent's fragile layers from the sensitivity analysis; returns ({parent: layers}, {parent: table})."""
    tables = {name: sensitivity(model, splits.x_train[:CALIBRATION_IMAGES], splits.x_val, splits.y_val,
                                SEARCH_DIR / "sensitivity" / name, progress=progress)
              for name, model in parent_models.items()}
    return {name: fragile_layers(table) for name, table in tables.items()}, tables


def compare_with_pipeline(front: pd.DataFrame, splits, store: pd.DataFrame | None = None, repeats: int = 300):
    """Front and notebook 07's variants (and the float baseline) measured side by side.

    Returns (table, latency, dominance); dominance is None when the store has no variant of
    notebook 07 yet (run notebook 07 first).
    """
    hand_made = pipeline_variants(store)
    paths = {"baseline-float32-tflite": models.baseline_tflite()}
    paths.update({row["name"]: row["artifact"] for _, row in front.iterrows()})
    from labkit import ROOT
    paths.update({row["variant"]: ROOT / row["artifact"] for _, row in hand_made.iterrows()
                  if (ROOT / row["artifact"]).is_file()})
    table, latency = measure_side_by_side(paths, splits, repeats=repeats)
    table["source"] = ["baseline"] + ["search"] * len(front) + ["notebook 07"] * (len(paths) - 1 - len(front))
    if len(paths) == 1 + len(front):
        return table, latency, None
    found, made = table[table["source"] == "search"], table[table["source"] == "notebook 07"]
    return table, latency, dominance(found, made)


def dominance_summary(pairs: pd.DataFrame) -> pd.DataFrame:
    """Per found variant: how many of notebook 07's variants it dominates, and whether it dominates all."""
    summary = pairs.groupby("found")["dominates"].agg(["sum", "count"])
    summary.columns = ["dominated", "hand_made"]
    summary["dominates_all"] = summary["dominated"] == summary["hand_made"]
    return summary.sort_values("dominated", ascending=False)


def coverage(pairs: pd.DataFrame) -> pd.Series:
    """Per hand-made variant: the found variants that dominate it (empty when none does)."""
    return pairs.groupby("hand_made").apply(lambda g: ", ".join(g.loc[g["dominates"], "found"]),
                                            include_groups=False).rename("dominated_by")


def benchmark(n_trials: int = BOOK_TRIALS, accuracy_floor: float = ACCURACY_FLOOR, repeats: int = 300,
              progress: bool = False) -> dict:
    """Both targets of notebook 08, measured in one run: distillation, and the search against notebook 07."""
    from labkit import distill
    from labkit.data import load_mnist
    splits = load_mnist()
    teacher, _ = models.load_or_train_baseline()
    config = distill.StudentConfig()
    students, _ = distill.compare(splits, config, temperatures=(config.temperature,), teacher=teacher,
                                  progress=progress)
    labels = students.loc[replace(config, alpha=0.0).name, "test_accuracy"]
    distilled = students.loc[config.name, "test_accuracy"]
    start = parents(splits, teacher, progress)
    float_layers, _ = book_float_layers(start, splits, progress)
    study = run_search(start, splits, n_trials=n_trials, accuracy_floor=accuracy_floor, float_layers=float_layers,
                       progress=progress)
    front = pareto_front(trials_table(study))
    table, _, pairs = compare_with_pipeline(front, splits, repeats=repeats)
    print(f"machine: {measure.machine_string()}")
    print(f"LiteRT 1 thread, batch 1, {repeats} interleaved calls each; "
          f"accuracy on the {len(splits.y_test)} test images")
    with pd.option_context("display.width", 200):
        print(students.to_string())
        print(table.drop(columns=["artifact"]).round(4).to_string())
    print(f"[{'met   ' if distilled > labels else 'MISSED'}] distilled student beats the label-trained one: "
          f"test accuracy {distilled:.4f} vs {labels:.4f}")
    out = {"students": students, "table": table, "front": front, "study": study, "pairs": pairs}
    if pairs is None:
        print("[skip  ] notebook 07 has recorded no 'pipeline' variant in the results store: run notebook 07 "
              "first for the comparison")
        return out
    summary = dominance_summary(pairs)
    out["summary"] = summary
    with pd.option_context("display.width", 200):
        print(summary.to_string())
        print(coverage(pairs).to_string())
    best, n_made = summary.index[0], summary["hand_made"].iloc[0]
    met = bool(summary["dominates_all"].any())
    print(f"[{'met   ' if met else 'MISSED'}] a searched variant dominates every hand-made variant of notebook 07 "
          f"on at least two of accuracy, gzip size, latency without losing on the third: {best} dominates "
          f"{summary.loc[best, 'dominated']} of {n_made}; {int((coverage(pairs) != '').sum())} of {n_made} "
          "are dominated by some found variant")
    return out


if __name__ == "__main__":
    benchmark()
