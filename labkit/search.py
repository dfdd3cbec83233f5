"""An automated multi-objective search of the trade-off space, composed from the techniques.

A trial (`build`) prunes a parent (`pruning.cached_prune`), clusters it (`clustering.cluster`) and
quantizes it (`quantization.converter`, `mixed.mixed_tflite` or `litert_quant`); Optuna's
multi-objective TPE (`run_search`, resumable from SQLite) samples `SearchSpace`; `front` and
`dominance` (the one definition of results.pareto_front) compare it with the pipeline's hand-made
variants; `smallest_at` looks for the smallest model at a test accuracy.
"""
from __future__ import annotations

import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import optuna
import pandas as pd

import labkit
from labkit import (
    ARTIFACTS_DIR,
    clustering,
    litert_quant,
    lowrank,
    measure,
    mixed,
    models,
    pipeline,
    pruning,
    quantization,
    results,
)

SEARCH_DIR = ARTIFACTS_DIR / "search"
NOTEBOOK = "08_search"
QUANT_MODES = quantization.MODES + ("mixed", "int4")
INT4_MAX_DROP = 0.001      # "int4": int4 weights for a layer that alone costs at most this accuracy
PRUNE_MIN_WEIGHTS = 4000   # smaller kernels (conv1, logits, thin factors): not worth the accuracy
PRUNE_RAMP = 0.5           # the sparsity reaches its target halfway, then the survivors settle


# ============================================================================ one search point

@dataclass(frozen=True)
class Settings:
    """One point of the search space: which parent model, and what is done to it."""
    model: str = "lowrank"      # a key of the parents handed to the search (baseline, lowrank)
    sparsity: float = 0.5       # fraction of zeros in every large kernel
    clusters: int = 0           # 0: no clustering; else shared values per large kernel (zeros kept)
    quantization: str = "int8"

    def __post_init__(self):
        if self.quantization not in QUANT_MODES:
            raise ValueError(f"quantization must be one of {QUANT_MODES}, "
                             f"got {self.quantization!r}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity is a fraction of zeros in [0, 1), got {self.sparsity}")
        if self.clusters != 0 and not 2 <= self.clusters <= 256:
            raise ValueError(f"clusters must be 0 (none) or 2..256, got {self.clusters}")
        if self.clusters == 2 and self.sparsity > 0:
            raise ValueError("clusters=2 with sparsity > 0 leaves one value besides zero, which "
                             "clustering refuses when it preserves sparsity: use clusters >= 3")

    @property
    def name(self) -> str:
        k = f"k{self.clusters}" if self.clusters else "nok"
        return f"search-{self.model}-s{round(100 * self.sparsity)}-{k}-{self.quantization}"


def large_layers(model) -> list:
    """The weight layers with at least PRUNE_MIN_WEIGHTS weights: the ones pruned and clustered."""
    return models.weight_layers(model, min_weights=PRUNE_MIN_WEIGHTS)


# A trial's pruning fine-tune: pruning's own plan (one pass over the first 20,000 images).
PLAN = pruning.UNSTRUCTURED_PLAN


def pruned(parent, sparsity: float, splits, plan: models.FineTune, directory: Path,
           progress: bool = False):
    """pruning.prune of the large layers through pruning.cached_prune (keyed by parent weights).

    Trials that differ only after pruning share one pruned model. The schedule: polynomial, the
    target reached at PRUNE_RAMP of the steps, the masks updated ten times on the way.
    """
    frequency = max(plan.steps(len(splits.x_train)) // 10, 1)
    settings = pruning.PruneSettings(sparsity, plan, schedule="polynomial", ramp=PRUNE_RAMP,
                                     frequency=frequency, layers=large_layers(parent))
    model, _ = pruning.cached_prune(f"pruned-s{round(100 * sparsity)}", parent, settings, splits,
                                    directory=directory, progress=progress)
    return model


def _quantized_file(model, settings: Settings, splits, float_layers, path: Path) -> Path:
    """`model` in `settings.quantization`, written to `path` (int4: via a float .tflite)."""
    calibration = splits.x_train[:mixed.CALIBRATION_IMAGES]
    if settings.quantization == "mixed":
        mixed.mixed_tflite(model, calibration, float_layers, path)
    elif settings.quantization == "int4":
        float_path = models.save_tflite(model, path.with_name("float.tflite"))
        recipe, _ = litert_quant.tolerant_recipe(float_path, splits.x_val, splits.y_val,
                                                 INT4_MAX_DROP, directory=path.parent / "int4")
        models.save_tflite(litert_quant.apply(float_path, recipe), path)
    else:
        use = calibration if settings.quantization == "int8" else None
        models.save_tflite(quantization.converter(model, settings.quantization, use), path)
    return path


def build(settings: Settings, parents: dict, splits, plan: models.FineTune = PLAN,
          float_layers=("conv1", "logits"), directory: Path = SEARCH_DIR / "trials",
          progress: bool = False) -> dict:
    """The .tflite of one search point and its validation accuracy, cached by settings and parent.

    `parents` is {name: Keras model}; `float_layers` ({parent name: layers}, or one list for all)
    are the layers the mixed mode keeps in float (names a parent lacks are skipped). Returns the
    build record with "artifact", "val_accuracy", "macs" and "build_seconds" (0 when cached).
    """
    if settings.model not in parents:
        raise ValueError(f"model {settings.model!r} is not among the parents {sorted(parents)}")
    parent = parents[settings.model]
    if isinstance(float_layers, dict):
        float_layers = float_layers.get(settings.model, ())
    float_layers = [name for name in float_layers if name in models.weight_layers(parent)]
    directory = Path(directory)

    def make():
        model = parent
        if settings.sparsity > 0:
            model = pruned(parent, settings.sparsity, splits, plan, directory.parent / "pruned",
                           progress)
        if settings.clusters:   # one-shot: no fine-tune, so that trials stay short
            shared = clustering.ClusterSettings(settings.clusters, layers=large_layers(model),
                                                preserve_sparsity=settings.sparsity > 0)
            model, _ = clustering.cluster(model, shared, progress=False)
        with tempfile.TemporaryDirectory() as scratch:   # measured before the cache stores it
            path = _quantized_file(model, settings, splits, float_layers,
                                   Path(scratch) / "trial.tflite")
            record = {"val_accuracy": measure.accuracy(measure.litert(path), splits.x_val,
                                                       splits.y_val),
                      "macs": measure.count_macs(model)}
            return path.read_bytes(), record

    key = {"settings": asdict(settings), "plan": asdict(plan), "float_layers": float_layers}
    path, record = models.cached(settings.name, key, [parent], make, directory, kind="tflite")
    return {**record, "artifact": str(path),
            "build_seconds": 0.0 if record["cached"] else record["build_seconds"]}


def latency_us(path, images: np.ndarray, repeats: int = 200, threads: int = 1) -> float:
    """Median batch-1 LiteRT latency of one model: the search's objective. Figures that are
    compared are timed again, interleaved with the variants they are compared with."""
    runner = measure.litert(path, num_threads=threads, name="trial")
    return measure.measure_latency([runner], images, warmup=20, repeats=repeats).p50("trial")


# ============================================================================ the search

@dataclass(frozen=True)
class SearchSpace:
    """The choices the sampler may make (small: the book's default budget is a dozen trials).

    Each sparsity new to a parent costs one pruning fine-tune (10-20 s on two cores), the slow
    part of a trial; everything else about a trial takes a second or two. The book's three levels
    keep the search to a couple of minutes; 0.7 and 0.9 widen it (0.9 rarely stays above the
    floor)."""
    model: tuple = ("baseline", "lowrank")
    sparsity: tuple = (0.0, 0.5, 0.8)
    clusters: tuple = (0, 16, 32)
    quantization: tuple = ("float16", "dynamic", "int8", "mixed")

    def __post_init__(self):
        if 2 in self.clusters and any(s > 0 for s in self.sparsity):
            raise ValueError("the space pairs clusters=2 with a sparsity > 0, which clustering "
                             "refuses (sparsity-preserving clustering needs 3 clusters or more): "
                             "drop 2 from clusters")
        for mode in self.quantization:
            Settings(quantization=mode)   # raises on an unknown mode

    def suggest(self, trial) -> Settings:
        return Settings(**{name: trial.suggest_categorical(name, list(getattr(self, name)))
                           for name in ("model", "sparsity", "clusters", "quantization")})


def check_floor(accuracy_floor) -> float:
    if isinstance(accuracy_floor, bool) \
            or not isinstance(accuracy_floor, (int, float, np.floating)) \
            or not 0.0 <= accuracy_floor <= 1.0:
        raise ValueError(f"accuracy_floor is a validation accuracy in [0, 1] (for example 0.985), "
                         f"got {accuracy_floor!r}")
    return float(accuracy_floor)


def check_budget(n_trials) -> int:
    if isinstance(n_trials, bool) or not isinstance(n_trials, (int, np.integer)) or n_trials < 1:
        raise ValueError(f"n_trials is the number of finished trials wanted, a whole number >= 1, "
                         f"got {n_trials!r}")
    return int(n_trials)


# Minimise size and latency; accuracy is a floor (a constraint) and also a third objective, so that
# the front keeps the accurate variants in view instead of only those just above the floor.
OBJECTIVES = (("val_accuracy", "max"), ("gzip_bytes", "min"), ("latency_p50_us", "min"))


def _constraint(trial) -> list:
    """Optuna's convention: feasible when every value is <= 0."""
    return [trial.user_attrs.get("accuracy_floor", 1.0) - trial.user_attrs.get("val_accuracy", 0.0)]


def open_study(name: str, storage: str | None = None, seed: int = 0):
    """Create or reopen a study; trials left RUNNING by an interrupted run are marked FAIL."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if storage is None:
        SEARCH_DIR.mkdir(parents=True, exist_ok=True)
        storage = f"sqlite:///{SEARCH_DIR / 'search.db'}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # multivariate TPE is marked experimental
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=6, multivariate=True,
                                             constraints_func=_constraint)
        study = optuna.create_study(study_name=name, storage=storage, load_if_exists=True,
                                    sampler=sampler,
                                    directions=[{"max": "maximize", "min": "minimize"}[sense]
                                                for _, sense in OBJECTIVES])
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    return study


def finished(study) -> list:
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def optimize(study, evaluate, n_trials: int, accuracy_floor: float,
             space: SearchSpace = SearchSpace(), progress: bool = True):
    """Run trials until the study holds `n_trials` finished ones; `evaluate(settings) -> dict`
    with val_accuracy and the OBJECTIVES. Optuna commits each finished trial to the storage."""
    n_trials, accuracy_floor = check_budget(n_trials), check_floor(accuracy_floor)
    done = len(finished(study))
    bar = labkit.progress_bar(total=n_trials, initial=min(done, n_trials), desc="search trials",
                              unit="trial", disable=not progress)

    def objective(trial):
        out = evaluate(space.suggest(trial))
        trial.set_user_attr("accuracy_floor", accuracy_floor)
        for key, value in out.items():
            trial.set_user_attr(key, value)
        return tuple(float(out[name]) for name, _ in OBJECTIVES)

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
    """One row per finished trial: settings, validation accuracy, objectives, feasibility.

    `artifact` is the trial's file under this repository (the study stores it relative to root).
    """
    rows = [{"trial": t.number, **t.params, **t.user_attrs, "feasible": _constraint(t)[0] <= 0}
            for t in finished(study)]
    for row in rows:
        if row.get("artifact"):
            row["artifact"] = str(labkit.ROOT / row["artifact"])
    return pd.DataFrame(rows).set_index("trial") if rows else pd.DataFrame()


def front(trials: pd.DataFrame, objectives=OBJECTIVES) -> pd.DataFrame:
    """The feasible trials on results.pareto_front of `objectives`, smallest file first."""
    if trials.empty or not trials["feasible"].any():
        return trials.iloc[:0]
    feasible = trials[trials["feasible"]]
    on_front = results.pareto_front(feasible, objectives)
    return feasible[on_front].sort_values([c for c, _ in objectives][1:])


def _study_name(space: SearchSpace, parents: dict, plan: models.FineTune, accuracy_floor: float,
                float_layers) -> str:
    """The space, the parents' weights, the plan, the floor and the float layers, hashed."""
    layers = float_layers if isinstance(float_layers, dict) else sorted(float_layers)
    return "search-" + models.settings_key(
        {"space": asdict(space), "plan": asdict(plan), "floor": accuracy_floor,
         "float_layers": layers,
         "parents": {name: models.weights_key(m) for name, m in sorted(parents.items())}})


def run_search(parents: dict, splits, *, n_trials: int = 12, accuracy_floor: float = 0.985,
               space: SearchSpace = SearchSpace(), plan: models.FineTune = PLAN,
               float_layers=("conv1", "logits"), study_name: str | None = None,
               storage: str | None = None, progress: bool = True):
    """The book's search: build and measure each sampled variant; returns the Optuna study.

    The study's name hashes the space, the parents' weights, the fine-tune plan and the floor:
    changing any of them starts a new study, and calling again with a larger n_trials continues it.
    """
    accuracy_floor, n_trials = check_floor(accuracy_floor), check_budget(n_trials)
    missing = set(space.model) - set(parents)
    if missing:
        raise ValueError(f"the space names models {sorted(missing)} that are not among the "
                         f"parents {sorted(parents)}")
    if study_name is None:
        study_name = _study_name(space, parents, plan, accuracy_floor, float_layers)
    study = open_study(study_name, storage)
    timing_images = splits.x_val[:100]

    def evaluate(settings: Settings) -> dict:
        built = build(settings, parents, splits, plan, float_layers)
        path = built["artifact"]   # kept relative to the repository: a bundle unpacks anywhere
        return {"name": settings.name, "artifact": results.relative_artifact(path),
                "val_accuracy": built["val_accuracy"],
                "size_bytes": measure.size_bytes(path), "gzip_bytes": measure.gzip_bytes(path),
                "latency_p50_us": latency_us(path, timing_images), "macs": built["macs"],
                "build_seconds": built["build_seconds"]}
    return optimize(study, evaluate, n_trials, accuracy_floor, space, progress)


# ============================================================================ front vs. pipeline

# The comparison chooses on validation accuracy (the test split is kept for the final figures).
COMPARE_OBJECTIVES = (("val_accuracy", "max"), ("gzip_bytes", "min"), ("latency_p50_us", "min"))
HAND_MADE = "hand-made"   # the `source` of the pipeline's variants in compare_with_pipeline


def dominance(found: pd.DataFrame, hand_made: pd.DataFrame,
              objectives=COMPARE_OBJECTIVES) -> pd.DataFrame:
    """For every (found, hand-made) pair: on how many objectives the found variant is better and
    worse, and whether it dominates: the one definition of results.pareto_front (the `dominates`
    exercise), at least as good on every objective and strictly better on one. `better_on` alone
    decides nothing."""
    rows = []
    for f_name, f in found.iterrows():
        for h_name, h in hand_made.iterrows():
            signed = [(f[column] - h[column]) * (1 if sense == "max" else -1)
                      for column, sense in objectives]
            better, worse = sum(d > 0 for d in signed), sum(d < 0 for d in signed)
            rows.append({"found": f_name, "hand_made": h_name, "better_on": int(better),
                         "worse_on": int(worse), "dominates": worse == 0 and better > 0})
    return pd.DataFrame(rows)


def dominance_summary(pairs: pd.DataFrame) -> pd.DataFrame:
    """Per found variant: how many hand-made variants it dominates, and whether it dominates all."""
    summary = pairs.groupby("found")["dominates"].agg(["sum", "count"])
    summary.columns = ["dominated", "hand_made"]
    summary["dominates_all"] = summary["dominated"] == summary["hand_made"]
    return summary.sort_values("dominated", ascending=False)


def coverage(pairs: pd.DataFrame) -> pd.Series:
    """Per hand-made variant: the found variants that dominate it (empty when none does)."""
    return pairs.groupby("hand_made").apply(lambda g: ", ".join(g.loc[g["dominates"], "found"]),
                                            include_groups=False).rename("dominated_by")


def pipeline_variants(table: pd.DataFrame | None = None) -> pd.DataFrame:
    """The pipeline's hand-made variants in the results store (technique 'pipeline', not ours)."""
    table = results.load() if table is None else table
    rows = table[(table["technique"] == "pipeline") & (table["notebook"] != NOTEBOOK)]
    return rows[rows["artifact"].fillna("") != ""]


def record(table: pd.DataFrame, latency, technique: str = "search") -> pd.DataFrame:
    """Store the rows of a side-by-side table (index: variant name) as this chapter's."""
    return results.record_table(table, latency, technique, NOTEBOOK)


def compare_with_pipeline(found: pd.DataFrame, splits, store: pd.DataFrame | None = None,
                          repeats: int = 300):
    """The front and the pipeline's variants (and the float baseline) measured side by side.

    One interleaved timing loop for all; `val_accuracy` (what the comparison and its plot read)
    and `accuracy`, the test split's (the final figure, and what the results store records).
    Returns (table, latency, dominance); dominance is None when the store has no variant of
    the pipeline yet (run 07_pipeline.ipynb first). `source`: baseline, search or HAND_MADE.
    """
    hand_made = pipeline_variants(store)
    paths = {"baseline-float32-tflite": models.baseline_tflite()}
    paths.update({row["name"]: row["artifact"] for _, row in found.iterrows()})
    paths.update({row["variant"]: labkit.ROOT / row["artifact"] for _, row in hand_made.iterrows()
                  if (labkit.ROOT / row["artifact"]).is_file()})
    table, latency = measure.side_by_side(paths, splits.x_val, splits.y_val,
                                          latency_images=splits.x_val[:200], repeats=repeats)
    table = table.rename(columns={"accuracy": "val_accuracy"})
    table.insert(0, "accuracy", [measure.accuracy(measure.litert(path), splits.x_test,
                                                  splits.y_test) for path in paths.values()])
    table["source"] = (["baseline"] + ["search"] * len(found)
                       + [HAND_MADE] * (len(paths) - 1 - len(found)))
    if len(paths) == 1 + len(found):
        return table, latency, None
    return table, latency, dominance(table[table["source"] == "search"],
                                     table[table["source"] == HAND_MADE])


# ============================================================================ the book's run

ACCURACY_FLOOR = 0.988    # validation accuracy; the baseline scores 0.9894 on the same 5000 images
BOOK_TRIALS = 12          # minutes on two cores; BOOK_TRIALS_LARGE for a fuller front
BOOK_TRIALS_LARGE = 60


def parents(splits, teacher=None, progress: bool = True) -> dict:
    """The search's starting points: the baseline and its fine-tuned low-rank version (cached)."""
    if teacher is None:
        teacher, _ = models.load_or_train_baseline()
    low, _ = lowrank.load_or_fine_tune(teacher, lowrank.BOOK_RANKS, splits, progress=progress)
    return {"baseline": teacher, "lowrank": low}


def book_float_layers(parent_models: dict, splits, progress: bool = True) -> tuple[dict, dict]:
    """Each parent's fragile layers from mixed.sensitivity: ({parent: layers}, {parent: table})."""
    tables = {name: mixed.sensitivity(model, splits.x_train[:mixed.CALIBRATION_IMAGES],
                                      splits.x_val, splits.y_val, SEARCH_DIR / "sensitivity" / name,
                                      progress=progress)
              for name, model in parent_models.items()}
    return {name: mixed.fragile_layers(table) for name, table in tables.items()}, tables


# ============================================================================ the smallest at 99%

# The candidates for the smallest model at 99%: (name, fraction of zeros or {layer: fraction},
# fine-tune epochs), each pruned from the low-rank parent (polynomial, PRUNE_RAMP), then int4.
SMALLEST_PRUNING = (
    ("s80", 0.8, 3),                    # a number: `pruned` (the search's own), large kernels only
    ("s90", 0.9, 3),
    ("all-s85-50", {"dense1_a": 0.85, "conv2_kx1": 0.5, "conv2_1xk": 0.5, "dense1_b": 0.5,
                    "logits": 0.3}, 3),
)
SMALLEST_THIN = ({"conv2": 0.5, "dense1": 0.9}, 4)   # the pipeline's thinned model, pruned longer
SMALLEST_TARGETS = (0.990, 0.992)   # test accuracy; chosen on validation (validation_floor)


def _pruned_by_layer(name: str, model, targets: dict, epochs: int, splits):
    """`model` pruned to per-layer `targets` for `epochs` (cached under SEARCH_DIR / "pruned")."""
    plan = models.FineTune(epochs=epochs)
    settings = pruning.PruneSettings(targets, plan, ramp=PRUNE_RAMP,
                                     frequency=max(plan.steps(len(splits.x_train)) // 10, 1))
    pruned_model, _ = pruning.cached_prune(name, model, settings, splits,
                                           directory=SEARCH_DIR / "pruned", progress=False)
    return pruned_model


def _float_file(label: str, model, directory: Path) -> Path:
    path, _ = models.cached(label, {}, [model], lambda: (model, {}), directory, kind="tflite")
    return path


def smallest_candidates(splits, pruning_plans=SMALLEST_PRUNING, with_pipeline: bool = True,
                        directory: Path = SEARCH_DIR / "smallest") -> dict:
    """{name: float32 .tflite}: the low-rank parent pruned by each of `pruning_plans` (cached; the
    fine-tune is a few minutes each on two cores the first time), the pipeline's clustered stage
    and its thinned model pruned by SMALLEST_THIN."""
    low = parents(splits, progress=False)["lowrank"]
    found = {}
    for name, targets, epochs in pruning_plans:
        if isinstance(targets, dict):
            model = _pruned_by_layer(name, low, targets, epochs, splits)
        else:
            model = pruned(low, targets, splits, models.FineTune(epochs=epochs),
                           SEARCH_DIR / "pruned")
        label = f"lowrank-{name}-e{epochs}"
        found[label] = _float_file(label, model, directory)
    if with_pipeline:
        run = pipeline.run_pipeline(pipeline.PipelineConfig(), splits, progress=False,
                                    until="cluster")
        found["pipeline-cluster"] = run.tflite["cluster"]
        targets, epochs = SMALLEST_THIN
        name = "thin-" + "-".join(f"{layer}{round(100 * s)}" for layer, s in targets.items())
        model = _pruned_by_layer(name, run.models["thin"], targets, epochs, splits)
        label = f"pipeline-{name}-e{epochs}"
        found[label] = _float_file(label, model, directory)
    return found


def smallest_at(splits, targets=SMALLEST_TARGETS, candidates: dict | None = None,
                record_rows: bool = True, directory: Path | None = None,
                test_all: bool = False) -> dict:
    """The smallest gzipped file at each test-accuracy target, chosen on validation accuracy
    (litert_quant.smallest over smallest_candidates and its int4/int8 recipes); rows go to the
    store."""
    candidates = smallest_candidates(splits) if candidates is None else candidates
    floors = {f"{100 * t:.1f}%": litert_quant.validation_floor(t) for t in targets}
    table, chosen = litert_quant.smallest(candidates, splits, floors, test_all=test_all,
                                          directory=directory or litert_quant.LITERT_DIR)
    if record_rows and chosen:
        results.upsert([results.make_row(f"litert-smallest-at-{label}", "quantization",
                                         "04b_litert_quantizer", accuracy=row["test_accuracy"],
                                         artifact=row["artifact"])
                        for label, row in chosen.items()])
    return {"table": table, "chosen": chosen, "floors": floors, "candidates": candidates}
