"""The clustering chapter's targets in one run: the test accuracy lost by k clusters (LiteRT,
float32 files) and how much smaller the gzipped file is than the gzipped baseline.

`python -m labkit.targets.clustering` prints them against clustering.TARGET_DROP_POINTS and
clustering.TARGET_GZIP_SMALLER.
"""
from __future__ import annotations

import labkit  # sets the legacy-Keras switch before TensorFlow loads
from labkit import clustering, machine, measure, models
from labkit.clustering import PLAN, TARGET_DROP_POINTS, TARGET_GZIP_SMALLER
from labkit.data import load_mnist


def measure_targets(k: int = 16, progress: bool = False, plan: models.FineTune = PLAN) -> dict:
    """The clustered model at k against the baseline: test accuracies, gzipped sizes, ratio."""
    splits = load_mnist()
    baseline, _ = models.load_or_train_baseline(splits=splits, progress=progress)
    clustered, _ = clustering.cached_cluster(baseline, clustering.ClusterSettings(k, plan), splits,
                                             progress=progress)
    paths = {"baseline": models.baseline_tflite(),
             f"k={k}": clustering.export_tflite(
                 clustered, f"clustered-k{k}-{models.weights_key(clustered)}")}
    table, _ = measure.side_by_side(paths, splits.x_test, splits.y_test,
                                    latency_images=splits.x_test[:100], reference="baseline",
                                    repeats=50)
    base, clus = table.loc["baseline"], table.loc[f"k={k}"]
    return {"k": k, "baseline_test_accuracy": base["accuracy"],
            "clustered_test_accuracy": clus["accuracy"],
            "accuracy_drop_points": 100 * (base["accuracy"] - clus["accuracy"]),
            "baseline_gzip_bytes": int(base["gzip_bytes"]),
            "clustered_gzip_bytes": int(clus["gzip_bytes"]),
            "gzip_smaller": float(clus["gzip_ratio"])}


def benchmark(k: int = 16, progress: bool = False, plan: models.FineTune = PLAN) -> dict:
    """Print and return the chapter's targets, measured in one run (`measure_targets`)."""
    out = measure_targets(k, progress, plan)
    drop_met = out["accuracy_drop_points"] <= TARGET_DROP_POINTS
    gzip_met = out["gzip_smaller"] >= TARGET_GZIP_SMALLER
    print(f"machine: {machine.machine_string()}")
    print(f"test accuracy: baseline {100 * out['baseline_test_accuracy']:.2f}%, {k} clusters "
          f"{100 * out['clustered_test_accuracy']:.2f}% -> drop "
          f"{out['accuracy_drop_points']:.2f} points (target <= {TARGET_DROP_POINTS:.2f}): "
          f"{'met' if drop_met else 'MISSED'}")
    print(f"gzipped .tflite: baseline {out['baseline_gzip_bytes']:,} B, {k} clusters "
          f"{out['clustered_gzip_bytes']:,} B -> {out['gzip_smaller']:.2f}x smaller "
          f"(target >= {TARGET_GZIP_SMALLER:g}x): {'met' if gzip_met else 'MISSED'}")
    return out


if __name__ == "__main__":
    labkit.setup(seed=0)
    benchmark()
