"""The distillation targets in one run: the same student trained from labels alone and
distilled from the baseline, and `distill.verdict` (the distilled student needs at least
distill.MIN_MAC_RATIO x fewer MACs and beats the label-trained one by distill.MIN_GAIN).

`python -m labkit.targets.distill` prints them; labkit.targets.search runs it first.
"""
from __future__ import annotations

import pandas as pd

import labkit  # sets the legacy-Keras switch before TensorFlow loads
from labkit import distill, machine
from labkit.data import load_mnist
from labkit.distill import StudentConfig


def benchmark(config: StudentConfig = StudentConfig(), progress: bool = False) -> pd.DataFrame:
    """Print the students and the targets (verdict): the distilled student beats the
    label-trained one. Returns compare()'s table."""
    splits = load_mnist()
    table, _ = distill.compare(splits, config, temperatures=(config.temperature,),
                               progress=progress)
    print(f"machine: {machine.machine_string()}")
    with pd.option_context("display.width", 200):
        print(table.to_string())
    for _, row in distill.verdict(table, config).iterrows():
        print(f"[{'met   ' if row['met'] else 'MISSED'}] {row['figure']}: {row['measured']:.4f} "
              f"(target >= {row['target']:g})")
    return table


if __name__ == "__main__":
    labkit.setup()
    benchmark()
