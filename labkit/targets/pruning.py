"""The pruning chapter's targets in one run: the baseline, the unstructured model pruned to 80%
by the sensitivity-derived targets and the structured (thinned) model, measured side by side.

`python -m labkit.targets.pruning` prints them (test accuracy, gzip size, MACs, LiteRT p50).
"""
from __future__ import annotations

import pandas as pd

import labkit  # sets the legacy-Keras switch before TensorFlow loads
from labkit import machine, measure, models, pruning, structured
from labkit.data import load_mnist
from labkit.pruning import PRUNING_DIR


def headline_models(splits, baseline=None, progress: bool = True) -> dict:
    """The two models the targets are about, built (or loaded) with the same calls as the book."""
    if baseline is None:
        baseline = models.load_or_train_baseline(models.BaselineConfig(), splits)[0]
    sizes = {name: models.kernel(baseline, name).size for name in models.weight_layers(baseline)}
    sweep = pruning.cached_sweep(baseline, splits, progress=progress)
    targets = pruning.targets_from_sensitivity(sweep, sizes, pruning.HEADLINE_SPARSITY)
    settings = pruning.PruneSettings(targets, pruning.UNSTRUCTURED_PLAN,
                                     frequency=pruning.UNSTRUCTURED_FREQUENCY)
    unstructured, _ = pruning.cached_prune("unstructured-80", baseline, settings, splits,
                                           progress=progress)
    thin = structured.ThinSettings(structured.HEADLINE_KEEP, structured.HEADLINE_PLAN)
    small, _ = structured.cached_thin("structured-l1", baseline, thin, splits, progress=progress)
    return {"baseline": baseline, "unstructured": unstructured, "structured": small,
            "targets": targets}


def benchmark(repeats: int = 300, threads: int = 1) -> pd.DataFrame:
    """Print the targets measured in one run: test accuracy, gzip size, MACs, LiteRT p50 at
    batch 1."""
    found = headline_models(splits := load_mnist(), progress=False)
    paths = {"baseline": models.baseline_tflite(),
             "unstructured": pruning.export_tflite(found["unstructured"],
                                                   PRUNING_DIR / "unstructured-80.tflite"),
             "structured": pruning.export_tflite(found["structured"],
                                                 PRUNING_DIR / "structured-l1.tflite")}
    table, _ = measure.side_by_side(paths, splits.x_test, splits.y_test,
                                    latency_images=splits.x_test[:200], reference="baseline",
                                    repeats=repeats, warmup=30, threads=threads)
    table["macs"] = [measure.count_macs(found[n]) for n in table.index]
    checks = pruning.target_checks(table)
    print(f"machine: {machine.machine_string()}\nLiteRT XNNPACK, {threads} thread(s), batch 1, "
          f"{repeats} interleaved calls per model\n"
          f"{table.drop(columns=['artifact']).round(4).to_string()}\n"
          f"{checks.round(3).to_string()}")
    return checks


if __name__ == "__main__":
    labkit.setup(seed=0)
    benchmark()
