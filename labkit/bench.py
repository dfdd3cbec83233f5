"""Re-measure every artifact in the results store side by side: `python -m labkit.bench`.

Owns the benchmark command (README, 00_setup.ipynb and 01_baseline.ipynb point to it) and the
re-measured frontier (`frontier`). All artifacts are loaded in one process and timed interleaved
at batch 1, so the ratios to the baseline's float32 .tflite are fair even on a noisy machine.
Each artifact is timed once, by the runner its format calls for (`runner_for`); its row names
the runner, which may differ from the one a variant's own stored figure came from (the baseline
records model.predict, an eager call and a tf.function for the same .keras file).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import pandas as pd

import labkit
from labkit import ROOT, machine, measure, results
from labkit.data import load_mnist

labkit.import_tensorflow_quietly(start_runtime=False)   # the legacy-Keras switch is set first
import tf_keras as keras  # noqa: E402


def runner_for(artifact: Path, threads: int = 1) -> measure.Runner | None:
    """How bench runs an artifact, by its format: LiteRT (XNNPACK, `threads` threads) for a .tflite
    file, its serving signature for a SavedModel directory, a tf.function for a .keras or .h5 file
    (the fastest way to call Keras weights, not model.predict); None for a format bench does not
    run (e.g. .onnx). The runner keeps its descriptive name ("tf.function", "SavedModel", ...)."""
    artifact = Path(artifact)
    if artifact.suffix == ".tflite":
        return measure.litert(artifact, num_threads=threads)
    if artifact.is_dir():
        return measure.saved_model(artifact)
    if artifact.suffix in (".keras", ".h5"):
        return measure.tf_function(keras.models.load_model(artifact, compile=False))
    return None


def benchmark(table, *, repeats: int = 200, warmup: int = 20, threads: int = 1, x=None, y=None):
    """One row per distinct artifact (index: the artifact as stored), timed by `runner_for`.

    Columns: variants (every variant naming the artifact, comma-separated), technique, runner,
    timed, size_bytes, gzip_bytes, latency_p50_us, latency_p95_us, and, when the baseline's
    float32 .tflite is among them, speedup_p50 and gzip_smaller against it; accuracy when `y` is
    given. Returns (table, missing): missing lists the artifacts not found or of no runnable format.
    """
    if x is None:
        splits = load_mnist()
        x, y = splits.x_test, splits.y_test
    table = table[table["artifact"].fillna("") != ""]
    runners, kept, missing = [], [], []
    for artifact, rows in table.groupby("artifact", sort=False):
        path = ROOT / artifact
        if not path.exists():
            missing.append(artifact)
            continue
        runner = runner_for(path, threads)
        if runner is None:
            missing.append(f"{artifact} (no runner for this format)")
            continue
        kept.append({"artifact": artifact, "variants": ", ".join(rows["variant"]),
                     "technique": ", ".join(rows["technique"].dropna().unique()),
                     "runner": runner.name, "timed": runner.timed,
                     "size_bytes": rows["size_bytes"].iloc[0],
                     "gzip_bytes": rows["gzip_bytes"].iloc[0]})
        # unique names for the latency loop
        runners.append(dataclasses.replace(runner, name=artifact))
    if not runners:   # nothing stored yet, or no file of a runnable format
        return pd.DataFrame(), missing
    latency = measure.measure_latency(runners, x[:100], warmup=warmup, repeats=repeats)
    summary = latency.summary()
    out = pd.DataFrame(kept).set_index("artifact")
    out["latency_p50_us"] = summary["latency_p50_us"]
    out["latency_p95_us"] = summary["latency_p95_us"]
    base = [a for a, names in out["variants"].items()
            if results.BASELINE_VARIANT in names.split(", ")]
    if base:
        out["speedup_p50"] = out.loc[base[0], "latency_p50_us"] / out["latency_p50_us"]
        out["gzip_smaller"] = out.loc[base[0], "gzip_bytes"] / out["gzip_bytes"]
    if y is not None:
        out["accuracy"] = [measure.accuracy(r, x, y) for r in runners]
    return out, missing


# ------------------------------------------------------------------------ the frontier, re-measured

# the notebooks before 07_pipeline that record variants
BOOK_NOTEBOOKS = ("01_baseline", "02_pruning", "03_clustering", "04_quantization",
                  "04b_litert_quantizer", "05_graph", "06_distributed")


def missing_notebooks(table: pd.DataFrame, notebooks=BOOK_NOTEBOOKS) -> list:
    """The notebooks in `notebooks` that have recorded no row in `table` yet (run them first)."""
    present = set(table["notebook"].dropna()) if "notebook" in table else set()
    return [notebook for notebook in notebooks if notebook not in present]


def frontier(splits, table: pd.DataFrame | None = None, *, repeats: int = 100, warmup: int = 10):
    """Every file the store names, re-measured in ONE interleaved run (`bench.benchmark`), with its
    accuracy on the VALIDATION split: the table the pipeline chapter draws its Pareto frontier
    from.

    Choices are made on validation (the test split is kept for final figures), and latencies compare
    only within one run. One row per file, named by a variant that records it (the baseline's name
    where it is among them; `shared_with` lists the others); `accuracy` is validation accuracy and
    `pareto` is `pareto_front`. Returns (table, notes): each note names the notebook to run first,
    for a notebook with no row yet or a file that has gone missing.
    """
    table = results.load() if table is None else table
    notes = [f"no variant of notebook {notebook} in the results store yet: run {notebook}.ipynb "
             "first to see its variants here" for notebook in missing_notebooks(table)]
    measured, missing = benchmark(table, repeats=repeats, warmup=warmup, x=splits.x_val,
                                  y=splits.y_val)
    if measured.empty:
        empty = pd.DataFrame(columns=[*results.COLUMNS, "runner", "shared_with", "pareto"])
        return empty, notes + ["the results store names no model file yet: run 01_baseline.ipynb "
                               "first"]
    for entry in missing:
        artifact, _, why = entry.partition(" (")
        owner = table.loc[table["artifact"] == artifact, "notebook"]
        owner = owner.iloc[0] if len(owner) else "its notebook"
        notes.append(f"{artifact}: no runner for this format, left out" if why else
                     f"{artifact} (recorded by {owner}) is missing: run {owner}.ipynb again to "
                     "write it")
    rows = []
    for artifact, row in measured.iterrows():
        names = row["variants"].split(", ")
        name = results.BASELINE_VARIANT if results.BASELINE_VARIANT in names else names[0]
        own = table[table["variant"] == name].iloc[0]
        rows.append({"variant": name, "technique": own["technique"], "notebook": own["notebook"],
                     "accuracy": row["accuracy"], "latency_p50_us": row["latency_p50_us"],
                     "latency_p95_us": row["latency_p95_us"], "size_bytes": row["size_bytes"],
                     "gzip_bytes": row["gzip_bytes"], "runner": row["runner"],
                     "shared_with": ", ".join(n for n in names if n != name), "artifact": artifact})
    out = pd.DataFrame(rows)
    out["pareto"] = results.pareto_front(out)
    return out, notes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200, help="timed calls per artifact")
    parser.add_argument("--threads", type=int, default=1, help="LiteRT interpreter threads")
    parser.add_argument("--no-accuracy", action="store_true",
                        help="skip re-measuring test accuracy")
    args = parser.parse_args(argv)
    labkit.setup(seed=0)
    table = results.load()
    splits = load_mnist()
    out, missing = benchmark(table, repeats=args.repeats, threads=args.threads, x=splits.x_test,
                             y=None if args.no_accuracy else splits.y_test)
    if out.empty:
        print("Nothing to benchmark: run the notebooks first (they record their artifacts).",
              file=sys.stderr)
        return 1
    print(f"machine: {machine.machine_string()}")
    print(f"batch-1 latency, {args.repeats} interleaved calls each, LiteRT threads={args.threads}; "
          "each artifact is timed once, by the runner named in its row")
    with pd.option_context("display.width", 250, "display.max_columns", 20,
                           "display.max_colwidth", 60):
        # the wide column last
        shown = out.drop(columns=["timed", "variants"]).assign(variants=out["variants"])
        print(shown.round(2).to_string())
    print("\nwhat one timed call includes:")
    for runner, timed in out.groupby("runner")["timed"].first().items():
        print(f"  {runner}: {timed}")
    for artifact in missing:
        print(f"skipped: {artifact} (a missing file means: re-run its notebook)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
