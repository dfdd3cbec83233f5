"""The low-rank figures in one run: the baseline factored at lowrank.BOOK_RANKS and fine-tuned,
against the baseline: test accuracy, size, MACs, parameters and LiteRT latency.

`python -m labkit.targets.lowrank` prints them.
"""
from __future__ import annotations

import pandas as pd

import labkit  # sets the legacy-Keras switch before TensorFlow loads
from labkit import lowrank, machine, measure, models
from labkit.data import load_mnist
from labkit.lowrank import BOOK_RANKS


def benchmark(ranks: dict = BOOK_RANKS, repeats: int = 300, threads: int = 1) -> pd.DataFrame:
    """Fine-tuned low-rank model against the baseline: accuracy, size, MACs, LiteRT latency."""
    splits = load_mnist()
    baseline, _ = models.load_or_train_baseline()
    tuned, record = lowrank.load_or_fine_tune(baseline, ranks, splits, progress=False)
    paths = {"baseline float32": models.baseline_tflite(),
             f"{record['name']} float32": lowrank.export_tflite(tuned, record["name"])}
    table, _ = measure.side_by_side(paths, splits.x_test, splits.y_test,
                                    latency_images=splits.x_val[:200],
                                    reference="baseline float32", repeats=repeats,
                                    threads=threads)
    described = pd.DataFrame([lowrank.describe(baseline), lowrank.describe(tuned)],
                             index=table.index)
    table = table.drop(columns=["artifact"]).join(described)
    print(f"machine: {machine.machine_string()}")
    print(table.round(4).to_string())
    base, low = table.iloc[0], table.iloc[1]
    print(f"MACs {base['macs'] / low['macs']:.2f}x fewer, params "
          f"{base['params'] / low['params']:.2f}x fewer, LiteRT p50 {low['speedup_p50']:.2f}x "
          f"faster, test accuracy {low['accuracy']:.4f} vs {base['accuracy']:.4f}")
    return table


if __name__ == "__main__":
    labkit.setup()
    benchmark()
