"""The combined pipeline's targets in one run: `python -m labkit.targets.pipeline` builds (or
loads) every stage and prints the final stage's figures against pipeline.TARGETS."""
from __future__ import annotations

import pandas as pd

import labkit
from labkit import machine, pipeline
from labkit.data import load_mnist


def benchmark(config: pipeline.PipelineConfig = pipeline.PipelineConfig(),
              repeats: int = 500) -> pd.DataFrame:
    """Build (or load) the pipeline and print the three target figures, measured in one run."""
    splits = load_mnist()
    run = pipeline.run_pipeline(config, splits)
    table, _ = pipeline.measure_stages(run, splits, repeats=repeats)
    print(f"machine: {machine.machine_string()}")
    print(table.drop(columns=["artifact"]).round(4).to_string())
    for _, row in pipeline.targets_met(table).iterrows():
        print(f"{row['figure']:>12}: measured {row['measured']:.4f}, target {row['target']}, "
              f"{'met' if row['met'] else 'MISSED'}")
    return table


if __name__ == "__main__":
    labkit.setup(seed=0)
    benchmark()
