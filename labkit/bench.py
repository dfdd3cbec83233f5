"""Re-measure every artifact in the results store side by side: `python -m labkit.bench`.

All artifacts are loaded in one process and timed interleaved at batch 1, so the ratios
to the baseline's float32 .tflite are fair even on a noisy machine.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import labkit
from labkit import ROOT, measure, results

BASELINE_VARIANT = "baseline-float32-tflite"


def runner_for(artifact: Path, name: str, threads: int):
    """The default runner for an artifact: LiteRT for .tflite, the signature for a SavedModel,
    a tf.function for a .keras file."""
    if artifact.suffix == ".tflite":
        return measure.litert(artifact, num_threads=threads, name=name)
    if artifact.is_dir():
        return measure.saved_model(artifact, name=name)
    if artifact.suffix in (".keras", ".h5"):
        import tf_keras as keras
        return measure.tf_function(keras.models.load_model(artifact), name=name)
    return None  # a format bench does not run (e.g. .onnx): reported as skipped


def benchmark(table, *, repeats: int = 200, warmup: int = 20, threads: int = 1, x=None, y=None):
    """One row per distinct artifact: p50, p95 and their ratio to the baseline .tflite's."""
    import pandas as pd
    from labkit.data import load_mnist
    if x is None:
        splits = load_mnist()
        x, y = splits.x_test, splits.y_test
    table = table[table["artifact"].fillna("") != ""].drop_duplicates("artifact")
    runners, kept, missing = [], [], []
    for _, row in table.iterrows():
        path = ROOT / row["artifact"]
        if not path.exists():
            missing.append(row["artifact"])
            continue
        runner = runner_for(path, row["variant"], threads)
        if runner is None:
            missing.append(f"{row['artifact']} (no runner for this format)")
            continue
        runners.append(runner)
        kept.append(row)
    if not runners:
        raise SystemExit("Nothing to benchmark: run the notebooks first (they record their artifacts).")
    latency = measure.measure_latency(runners, x[:100], warmup=warmup, repeats=repeats)
    summary = latency.summary()
    out = pd.DataFrame(kept).set_index("variant")[["technique", "size_bytes", "gzip_bytes"]]
    out["latency_p50_us"] = summary["latency_p50_us"]
    out["latency_p95_us"] = summary["latency_p95_us"]
    if BASELINE_VARIANT in out.index:
        base = out.loc[BASELINE_VARIANT]
        out["speedup_p50"] = base["latency_p50_us"] / out["latency_p50_us"]
        out["gzip_smaller"] = base["gzip_bytes"] / out["gzip_bytes"]
    if y is not None:
        out["accuracy"] = [measure.accuracy(r, x, y) for r in runners]
    return out, missing


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200, help="timed calls per artifact")
    parser.add_argument("--threads", type=int, default=1, help="LiteRT interpreter threads")
    parser.add_argument("--no-accuracy", action="store_true", help="skip re-measuring test accuracy")
    args = parser.parse_args(argv)
    labkit.setup(seed=0)
    table = results.load()
    import pandas as pd
    from labkit.data import load_mnist
    splits = load_mnist()
    out, missing = benchmark(table, repeats=args.repeats, threads=args.threads, x=splits.x_test,
                             y=None if args.no_accuracy else splits.y_test)
    print(f"machine: {measure.machine_string()}")
    print(f"batch-1 latency, {args.repeats} interleaved calls each, LiteRT threads={args.threads}")
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(out.round(2).to_string())
    for artifact in missing:
        print(f"skipped: {artifact} (a missing file means: re-run its notebook)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
