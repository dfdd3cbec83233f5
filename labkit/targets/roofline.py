"""The performance model's figures in one run: this machine's ceilings, where the baseline's and
the int8 model's time goes (predicted and measured per op), and every stored .tflite variant's
measured batch-1 p50 beside the roofline's prediction.

`python -m labkit.targets.roofline [--refresh] [--alone]` prints them.
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import pandas as pd

import labkit  # sets the legacy-Keras switch before TensorFlow loads
from labkit import machine, measure, models, quantization, results, roofline
from labkit.data import load_mnist


def measured_alone(table: pd.DataFrame, repeats: int = 200) -> pd.Series:
    """Batch-1 p50 of each variant's file timed alone (measure.litert, as the notebooks call
    it), with nothing else run between its calls: the conditions the roofline assumes."""
    images = load_mnist().x_test[:100]
    out = {}
    for variant, artifact in zip(table["variant"], table["artifact"]):
        runner = measure.litert(labkit.ROOT / artifact, **{
            "num_threads": roofline.runs_as(variant)["threads"],
            "xnnpack": roofline.runs_as(variant)["xnnpack"]})
        out[variant] = measure.measure_latency([runner], images, warmup=20,
                                               repeats=repeats).p50(runner.name)
    return pd.Series(out)


def per_layer(found: roofline.Ceilings) -> dict:
    """where_time_goes for the float32 baseline and its full-int8 conversion."""
    model, _ = models.load_or_train_baseline()
    # the int8 file of the quantization chapter and the serving chapter, from the model cache
    paths = {"baseline float32": models.baseline_tflite(),
             "baseline int8": quantization.export(model, "int8", load_mnist().x_train,
                                                  name="ptq-int8")}
    return {name: roofline.where_time_goes(path, found) for name, path in paths.items()}


def benchmark(refresh: bool = False, alone: bool = False) -> dict:
    """Print the ceilings, the per-layer tables and the predicted-against-measured table."""
    found = roofline.ceilings(refresh=refresh)
    print(f"machine: {machine.machine_string()}; load average {os.getloadavg()[0]:.2f}")
    with pd.option_context("display.width", 200, "display.max_columns", 20,
                           "display.max_rows", 200):
        print("\nceilings:\n" + found.table().round(2).to_string(index=False))
        layers = per_layer(found)
        for name, table in layers.items():
            print(f"\nwhere the time goes, {name} (invoke only, 1 thread): whole "
                  f"{table.attrs['whole_us']:.1f} µs measured, {table.attrs['predicted_us']:.1f} "
                  "µs predicted")
            print(table.round(2).to_string(index=False))
        stored = results.load()
        compared = roofline.against_measured(stored, found)
        if alone and len(compared):
            kept = stored.set_index("variant").loc[compared["variant"]].reset_index()
            compared["measured_us"] = measured_alone(kept).loc[compared["variant"]].values
            compared["ratio"] = compared["measured_us"] / compared["predicted_us"]
            compared["error"] = ((compared["measured_us"] - compared["predicted_us"]).abs()
                                 / compared["measured_us"])
        where = "each file timed alone" if alone else "as each notebook measured them"
        print(f"\nbatch-1 p50, {where}, against the roofline ({len(compared)} variants):")
        print(compared.round(2).to_string(index=False))
        if len(compared):
            print(f"median absolute error {np.median(compared['error']):.1%}; within 30%: "
                  f"{(compared['error'] <= 0.3).sum()} of {len(compared)}")
    return {"ceilings": found, "layers": layers, "compared": compared}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labkit.targets.roofline",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--refresh", action="store_true",
                        help="measure the ceilings again instead of reading them back")
    parser.add_argument("--alone", action="store_true",
                        help="time every stored file again, alone, instead of using the "
                             "notebooks' figures from the results store")
    args = parser.parse_args(argv)
    labkit.setup(seed=0)
    benchmark(refresh=args.refresh, alone=args.alone)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
