"""An automated multi-objective search of the trade-off space (notebook 08, section 4).

Owns the search's orchestration and nothing of the techniques it combines: one search point
(`Settings`), the space (`SearchSpace`), the study (Optuna's multi-objective TPE, resumable from
SQLite), the front's comparison with notebook 07 (`dominance`: Pareto dominance, the one
definition of results.pareto_front, on validation accuracy) and `benchmark()`
(``python -m labkit.search``). A trial is composed from the technique modules:

    parent  ->  pruning.prune (cached by models.cached)  ->  clustering.cluster
            ->  quantization.converter, or mixed.mixed_tflite  ->  models.cached(kind="tflite")

Quantization modes are quantization.MODES plus "mixed" (labkit/mixed.py) and "int4" (LiteRT's own
quantizer on the float .tflite, int4 weights where validation accuracy tolerates them:
labkit/litert_quant.py). "int8" is the one converter's default: int8 input and output, as in
notebook 07. The Pareto front is results.pareto_front; the interleaved measurement is
measure.side_by_side. `smallest_at` looks for the smallest model at 99% (notebook 04b).
"""
from __future__ import annotations

import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import labkit
import numpy as np
import pandas as pd

from labkit import ARTIFACTS_DIR, clustering, measure, mixed, models, pruning, quantization, results

SEARCH_DIR = ARTIFACTS_DIR / "search"
NOTEBOOK = "08_search"
QUANT_MODES = quantization.MODES + ("mixed", "int4")
INT4_MAX_DROP = 0.001      # "int4": a layer gets int4 weights if alone it costs at most this validation accuracy
PRUNE_MIN_WEIGHTS = 4000   # smaller kernels (conv1, logits, thin factors) are not worth the accuracy
PRUNE_RAMP = 0.5           # the sparsity reaches its target halfway, then the survivors settle


# ============================================================================ 1. one search point

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
        if self.clusters == 2 and self.sparsity > 0:
            raise ValueError("clusters=2 with sparsity > 0 leaves one value besides zero, which clustering "
                             "refuses when it preserves sparsity: use clusters >= 3")

    @property
    def name(self) -> str:
        k = f"k{self.clusters}" if self.clusters else "nok"
        return f"search-{self.model}-s{round(100 * self.sparsity)}-{k}-{self.quantization}"


def large_layers(model) -> list:
    """The weight layers with at least PRUNE_MIN_WEIGHTS weights: the ones pruned and clustered."""
    return models.weight_layers(model, min_weights=PRUNE_MIN_WEIGHTS)


# A trial's pruning fine-tune: notebook 02's plan (one pass over the first 20,000 training images).
PLAN = pruning.UNSTRUCTURED_PLAN


def pruned(parent, sparsity: float, splits, plan: models.FineTune, directory: Path, progress: bool = False):
    """pruning.prune of the large layers through pruning.cached_prune (keyed by the parent's weights).

    Trials that differ only after pruning share one pruned model. The schedule: polynomial, the
    target reached at PRUNE_RAMP of the steps, the masks updated ten times on the way.
    """
    frequency = max(plan.steps(len(splits.x_train)) // 10, 1)
    model, _ = pruning.cached_prune(f"pruned-s{round(100 * sparsity)}", parent, sparsity, splits, plan,
                                    schedule="polynomial", ramp=PRUNE_RAMP, frequency=frequency,
                                    layers=large_layers(parent), directory=directory, progress=progress)
    return model


def build(settings: Settings, parents: dict, splits, plan: models.FineTune = PLAN,
          float_layers=("conv1", "logits"), directory: Path = SEARCH_DIR / "trials", progress: bool = False) -> dict:
    """The .tflite of one search point and its validation accuracy, cached by settings and parent weights.

    `parents` is {name: Keras model}; `float_layers` ({parent name: layers}, or one list for all)
    are the layers the mixed mode keeps in float (names a parent lacks are skipped).
    Returns the build record with "artifact", "val_accuracy", "macs" and "build_seconds" (0 when cached).
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
            model = pruned(parent, settings.sparsity, splits, plan, directory.parent / "pruned", progress)
        if settings.clusters:   # one-shot: no fine-tune, so that trials stay short
            model, _ = clustering.cluster(model, settings.clusters, layers=large_layers(model),
                                          preserve_sparsity=settings.sparsity > 0, progress=False)
        calibration = splits.x_train[:mixed.CALIBRATION_IMAGES]
        with tempfile.TemporaryDirectory() as scratch:   # measured before the cache stores it
            path = Path(scratch) / "trial.tflite"
            if settings.quantization == "mixed":
                mixed.mixed_tflite(model, calibration, float_layers, path)
            elif settings.quantization == "int4":
                from labkit import litert_quant
                models.save_tflite(model, Path(scratch) / "float.tflite")
                recipe, _ = litert_quant.tolerant_recipe(Path(scratch) / "float.tflite", splits.x_val, splits.y_val,
                                                         INT4_MAX_DROP, directory=Path(scratch) / "int4")
                models.save_tflite(litert_quant.apply(Path(scratch) / "float.tflite", recipe), path)
            else:
                models.save_tflite(quantization.converter(
                    model, settings.quantization, calibration if settings.quantization == "int8" else None), path)
            record = {"val_accuracy": measure.accuracy(measure.litert(path), splits.x_val, splits.y_val),
                      "macs": measure.count_macs(model)}
            return path.read_bytes(), record

    path, record = models.cached(settings.name, {"settings": asdict(settings), "plan": asdict(plan),
                                                 "float_layers": float_layers}, [parent], make, directory,
                                 kind="tflite")
    return {**record, "artifact": str(path), "build_seconds": 0.0 if record["cached"] else record["build_seconds"]}


def latency_us(path, images: np.ndarray, repeats: int = 200, threads: int = 1) -> float:
    """Median batch-1 LiteRT latency of one model: the search's objective. Figures that are compared
    in the notebook are timed again, interleaved with the variants they are compared with."""
    runner = measure.litert(path, num_threads=threads, name="trial")
    return measure.measure_latency([runner], images, warmup=20, repeats=repeats).p50("trial")


# ============================================================================ 2. the search

@dataclass(frozen=True)
class SearchSpace:
    """The choices the sampler may make (small: the book's default budget is a dozen trials).

    Each sparsity new to a parent costs one pruning fine-tune (10-20 s on two cores), the slow part
    of a trial; everything else about a trial takes a second or two. The book's three levels keep
    the search to a couple of minutes; 0.7 and 0.9 widen it (0.9 rarely stays above the floor)."""
    model: tuple = ("baseline", "lowrank")
    sparsity: tuple = (0.0, 0.5, 0.8)
    clusters: tuple = (0, 16, 32)
    quantization: tuple = ("float16", "dynamic", "int8", "mixed")

    def __post_init__(self):
        if 2 in self.clusters and any(s > 0 for s in self.sparsity):
            raise ValueError("the space pairs clusters=2 with a sparsity > 0, which clustering refuses "
                             "(sparsity-preserving clustering needs 3 clusters or more): drop 2 from clusters")
        for mode in self.quantization:
            Settings(quantization=mode)   # raises on an unknown mode

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
OBJECTIVES = (("val_accuracy", "max"), ("gzip_bytes", "min"), ("latency_p50_us", "min"))


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
                                                for _, sense in OBJECTIVES])
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

    `artifact` is the trial's file under this repository (the study stores it relative to the root).
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
    return feasible[results.pareto_front(feasible, objectives)].sort_values([c for c, _ in objectives][1:])


def run_search(parents: dict, splits, *, n_trials: int = 12, accuracy_floor: float = 0.985,
               space: SearchSpace = SearchSpace(), plan: models.FineTune = PLAN,
               float_layers=("conv1", "logits"), study_name: str | None = None, storage: str | None = None,
               progress: bool = True):
    """The book's search: build and measure each sampled variant; returns the Optuna study.

    The study's name hashes the space, the parents' weights, the fine-tune plan and the floor:
    changing any of them starts a new study, and calling again with a larger n_trials continues it.
    """
    accuracy_floor, n_trials = check_floor(accuracy_floor), check_budget(n_trials)
    missing = set(space.model) - set(parents)
    if missing:
        raise ValueError(f"the space names models {sorted(missing)} that are not among the parents {sorted(parents)}")
    if study_name is None:
        study_name = "search-" + models.settings_key(
            {"space": asdict(space), "plan": asdict(plan), "floor": accuracy_floor,
             "float_layers": float_layers if isinstance(float_layers, dict) else sorted(float_layers),
             "parents": {name: models.weights_key(m) for name, m in sorted(parents.items())}})
    study = open_study(study_name, storage)
    timing_images = splits.x_val[:100]

    def evaluate(settings: Settings) -> dict:
        built = build(settings, parents, splits, plan, float_layers)
        path = built["artifact"]   # the study keeps it relative to the repository: a bundle unpacks anywhere
        return {"name": settings.name, "artifact": results.relative_artifact(path),
                "val_accuracy": built["val_accuracy"],
                "size_bytes": measure.size_bytes(path), "gzip_bytes": measure.gzip_bytes(path),
                "latency_p50_us": latency_us(path, timing_images), "macs": built["macs"],
                "build_seconds": built["build_seconds"]}
    return optimize(study, evaluate, n_trials, accuracy_floor, space, progress)


# ============================================================================ 3. the front against notebook 07

# The comparison chooses on validation accuracy (the test split is kept for the final figures).
COMPARE_OBJECTIVES = (("val_accuracy", "max"), ("gzip_bytes", "min"), ("latency_p50_us", "min"))


def dominance(found: pd.DataFrame, hand_made: pd.DataFrame, objectives=COMPARE_OBJECTIVES) -> pd.DataFrame:
    """For every (found, hand-made) pair: on how many objectives the found variant is better and worse,
    and whether it dominates: the one definition of results.pareto_front (exercise 7.1), at least as
    good on every objective and strictly better on one. `better_on` alone decides nothing."""
    rows = []
    for f_name, f in found.iterrows():
        for h_name, h in hand_made.iterrows():
            signed = [(f[column] - h[column]) * (1 if sense == "max" else -1) for column, sense in objectives]
            better, worse = sum(d > 0 for d in signed), sum(d < 0 for d in signed)
            rows.append({"found": f_name, "hand_made": h_name, "better_on": int(better), "worse_on": int(worse),
                         "dominates": worse == 0 and better > 0})
    return pd.DataFrame(rows)


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


def pipeline_variants(table: pd.DataFrame | None = None) -> pd.DataFrame:
    """Notebook 07's hand-made variants from the results store (technique 'pipeline', not ours)."""
    table = results.load() if table is None else table
    rows = table[(table["technique"] == "pipeline") & (table["notebook"] != NOTEBOOK)]
    return rows[rows["artifact"].fillna("") != ""]


def record(table: pd.DataFrame, latency, technique: str = "search") -> pd.DataFrame:
    """Store the rows of a side-by-side table (index: variant name) as notebook 08's."""
    return results.record_table(table, latency, technique, NOTEBOOK)


def compare_with_pipeline(found: pd.DataFrame, splits, store: pd.DataFrame | None = None, repeats: int = 300):
    """The front and notebook 07's variants (and the float baseline) measured side by side.

    One interleaved timing loop for all; `val_accuracy` (what the comparison and its plot read)
    and `accuracy`, the test split's (the final figure, and what the results store records).
    Returns (table, latency, dominance); dominance is None when the store has no variant of
    notebook 07 yet (run notebook 07 first).
    """
    hand_made = pipeline_variants(store)
    paths = {"baseline-float32-tflite": models.baseline_tflite()}
    paths.update({row["name"]: row["artifact"] for _, row in found.iterrows()})
    paths.update({row["variant"]: labkit.ROOT / row["artifact"] for _, row in hand_made.iterrows()
                  if (labkit.ROOT / row["artifact"]).is_file()})
    table, latency = measure.side_by_side(paths, splits.x_val, splits.y_val, latency_images=splits.x_val[:200],
                                          repeats=repeats)
    table = table.rename(columns={"accuracy": "val_accuracy"})
    table.insert(0, "accuracy", [measure.accuracy(measure.litert(path), splits.x_test, splits.y_test)
                                 for path in paths.values()])
    table["source"] = ["baseline"] + ["search"] * len(found) + ["notebook 07"] * (len(paths) - 1 - len(found))
    if len(paths) == 1 + len(found):
        return table, latency, None
    return table, latency, dominance(table[table["source"] == "search"], table[table["source"] == "notebook 07"])


# ============================================================================ 4. the book's run and the benchmark

ACCURACY_FLOOR = 0.988    # validation accuracy; the baseline scores 0.9894 on the same 5000 images
BOOK_TRIALS = 12          # minutes on two cores; BOOK_TRIALS_LARGE for a fuller front
BOOK_TRIALS_LARGE = 60


def parents(splits, teacher=None, progress: bool = True) -> dict:
    """The search's starting points: the baseline and its fine-tuned low-rank version (cached)."""
    from labkit import lowrank
    if teacher is None:
        teacher, _ = models.load_or_train_baseline()
    low, _ = lowrank.load_or_fine_tune(teacher, lowrank.BOOK_RANKS, splits, progress=progress)
    return {"baseline": teacher, "lowrank": low}


def book_float_layers(parent_models: dict, splits, progress: bool = True) -> tuple[dict, dict]:
    """Each parent's fragile layers from mixed.sensitivity; returns ({parent: layers}, {parent: table})."""
    tables = {name: mixed.sensitivity(model, splits.x_train[:mixed.CALIBRATION_IMAGES], splits.x_val, splits.y_val,
                                      SEARCH_DIR / "sensitivity" / name, progress=progress)
              for name, model in parent_models.items()}
    return {name: mixed.fragile_layers(table) for name, table in tables.items()}, tables


def benchmark(n_trials: int = BOOK_TRIALS, accuracy_floor: float = ACCURACY_FLOOR, repeats: int = 300,
              progress: bool = False) -> dict:
    """Both targets of notebook 08 in one run: distillation (distill.benchmark), then the search
    against notebook 07 (a found variant Pareto-dominates every hand-made one, on validation accuracy)."""
    from labkit import distill
    from labkit.data import load_mnist
    students = distill.benchmark(progress=progress)
    splits = load_mnist()
    start = parents(splits, progress=progress)
    float_layers, _ = book_float_layers(start, splits, progress)
    study = run_search(start, splits, n_trials=n_trials, accuracy_floor=accuracy_floor, float_layers=float_layers,
                       progress=progress)
    found = front(trials_table(study))
    table, _, pairs = compare_with_pipeline(found, splits, repeats=repeats)
    print(f"LiteRT 1 thread, batch 1, {repeats} interleaved calls each; val_accuracy on the {len(splits.y_val)} "
          f"validation images (the comparison), accuracy on the {len(splits.y_test)} test images")
    with pd.option_context("display.width", 200):
        print(table.drop(columns=["artifact"]).round(4).to_string())
    out = {"students": students, "table": table, "front": found, "study": study, "pairs": pairs}
    if pairs is None:
        print("[skip  ] notebook 07 has recorded no 'pipeline' variant in the results store: run notebook 07 "
              "first for the comparison")
        return out
    summary = out["summary"] = dominance_summary(pairs)
    with pd.option_context("display.width", 200):
        print(summary.to_string())
        print(coverage(pairs).to_string())
    best, n_made = summary.index[0], summary["hand_made"].iloc[0]
    met = bool(summary["dominates_all"].any())
    print(f"[{'met   ' if met else 'MISSED'}] a searched variant dominates every hand-made variant of notebook 07 "
          f"(at least as good on validation accuracy, gzip size and latency, strictly better on one): {best} "
          f"dominates {summary.loc[best, 'dominated']} of {n_made}; {int((coverage(pairs) != '').sum())} of "
          f"{n_made} are dominated by some found variant")
    return out


# ============================================================================ 5. the smallest model at 99%

# The candidates for the smallest model at 99%: (name, fraction of zeros or {layer: fraction}, fine-tune epochs),
# each pruned from notebook 08's low-rank parent (the polynomial schedule, PRUNE_RAMP), then int4.
SMALLEST_PRUNING = (
    ("s80", 0.8, 3),                    # a number: `pruned` (the search's own), the large kernels only
    ("s90", 0.9, 3),
    ("all-s85-50", {"dense1_a": 0.85, "conv2_kx1": 0.5, "conv2_1xk": 0.5, "dense1_b": 0.5, "logits": 0.3}, 3),
)
SMALLEST_THIN = ({"conv2": 0.5, "dense1": 0.9}, 4)   # notebook 07's thinned model, pruned longer
SMALLEST_TARGETS = (0.990, 0.992)       # test accuracy; chosen on validation (litert_quant.validation_floor)


def smallest_candidates(splits, pruning_plans=SMALLEST_PRUNING, with_pipeline: bool = True,
                        directory: Path = SEARCH_DIR / "smallest") -> dict:
    """{name: float32 .tflite}: the low-rank parent pruned by each of `pruning_plans` (cached; the
    fine-tune is a few minutes each on two cores the first time), notebook 07's clustered stage and
    its thinned model pruned by SMALLEST_THIN."""
    from labkit import pipeline
    low = parents(splits, progress=False)["lowrank"]
    found = {}
    for name, targets, epochs in pruning_plans:
        plan = models.FineTune(epochs=epochs)
        if isinstance(targets, dict):
            model, _ = pruning.cached_prune(name, low, targets, splits, plan, ramp=PRUNE_RAMP,
                                            frequency=max(plan.steps(len(splits.x_train)) // 10, 1),
                                            directory=SEARCH_DIR / "pruned", progress=False)
        else:
            model = pruned(low, targets, splits, plan, SEARCH_DIR / "pruned")
        label = f"lowrank-{name}-e{epochs}"
        found[label], _ = models.cached(label, {}, [model], lambda: (model, {}), directory, kind="tflite")
    if with_pipeline:
        run = pipeline.run_pipeline(pipeline.PipelineConfig(), splits, progress=False, until="cluster")
        found["pipeline-cluster"] = run.tflite["cluster"]
        targets, epochs = SMALLEST_THIN
        plan = models.FineTune(epochs=epochs)
        name = "thin-" + "-".join(f"{layer}{round(100 * s)}" for layer, s in targets.items())
        model, _ = pruning.cached_prune(name, run.models["thin"], targets, splits, plan, ramp=PRUNE_RAMP,
                                        frequency=max(plan.steps(len(splits.x_train)) // 10, 1),
                                        directory=SEARCH_DIR / "pruned", progress=False)
        found[f"pipeline-{name}-e{epochs}"], _ = models.cached(f"pipeline-{name}-e{epochs}", {}, [model],
                                                               lambda: (model, {}), directory, kind="tflite")
    return found


def smallest_at(splits, targets=SMALLEST_TARGETS, candidates: dict | None = None, record_rows: bool = True,
                directory: Path | None = None, test_all: bool = False) -> dict:
    """The smallest gzipped file at each test-accuracy target, chosen on validation accuracy
    (litert_quant.smallest over smallest_candidates and its int4/int8 recipes); rows go to the store."""
    from labkit import litert_quant
    candidates = smallest_candidates(splits) if candidates is None else candidates
    floors = {f"{100 * t:.1f}%": litert_quant.validation_floor(t) for t in targets}
    table, chosen = litert_quant.smallest(candidates, splits, floors, directory=directory or litert_quant.LITERT_DIR,
                                          test_all=test_all)
    if record_rows and chosen:
        results.upsert([results.make_row(f"litert-smallest-at-{label}", "quantization", "04b_litert_quantizer",
                                         accuracy=row["test_accuracy"], artifact=row["artifact"])
                        for label, row in chosen.items()])
    return {"table": table, "chosen": chosen, "floors": floors, "candidates": candidates}


if __name__ == "__main__":
    labkit.setup()
    benchmark()
