"""The graph chapter's figures in one run: batch-norm folding, XLA's compile cost, the runtimes
side by side and the compute floor.

`python -m labkit.targets.graph` prints them.
"""
from __future__ import annotations

import pandas as pd

import labkit  # sets the legacy-Keras switch before TensorFlow loads
from labkit import folding, machine, measure, models, roofline, runtimes
from labkit.data import load_mnist
from labkit.graph import GRAPH_DIR, LARGE_BATCH, max_abs_diff, xla_compile_costs


def folding_figures(model, splits, repeats: int) -> tuple:
    """(max |logit difference|, batch-1 latency table) of the model with and without its batch
    norms folded."""
    folded = folding.fold_batchnorm(model)
    fold_diff = max_abs_diff(model, folded, splits.x_test)
    print(f"BN folding: max |logit difference| on the {len(splits.x_test)} test images = "
          f"{fold_diff:.2e}")
    fold_runners = [measure.keras_call(model), measure.keras_call(folded, "keras call, BN folded"),
                    measure.tf_function(model),
                    measure.tf_function(folded, "tf.function, BN folded")]
    fold_latency = measure.measure_latency(fold_runners, splits.x_test[:100], warmup=10,
                                           repeats=repeats)
    fold_summary = fold_latency.summary()[["latency_p50_us", "latency_p95_us"]]
    print("\nbatch-1 latency with and without batch-norm folding (interleaved):")
    print(fold_summary.round(1).to_string())
    return fold_diff, fold_summary


def runtime_figures(model, paths: dict, splits, repeats: int, batch_size: int,
                    images: int) -> tuple:
    """(peak MAC rates, compute floor table): every runtime at batch 1 and at `batch_size`;
    `paths` from models.export_baseline."""
    ok, why = runtimes.onnx_status()
    onnx_file = GRAPH_DIR / f"baseline-{models.BaselineConfig().key()}.onnx"
    onnx_path = runtimes.export_onnx(model, onnx_file) if ok else None
    if not ok:
        print(f"\nONNX Runtime skipped: {why}")
    runners = runtimes.runtime_runners(model, paths, onnx_path)
    # model.predict's tf.data pipeline logs a harmless C++ line every few seconds
    with labkit.quiet_stderr():
        latency = measure.measure_latency(runners, splits.x_test[:100], warmup=10, repeats=repeats)
        throughput = measure.measure_throughput(runners, splits.x_test[:images],
                                                batch_size=batch_size)
    peak = roofline.ceilings().peaks
    floor = runtimes.compute_floor(measure.count_macs(model), latency, throughput, peak,
                                   batch_size)
    return peak, floor


def benchmark(repeats: int = 200, batch_size: int = LARGE_BATCH, images: int = 2048) -> dict:
    """Measure the graph chapter's target figures in one run and print them."""
    splits = load_mnist()
    model, _ = models.load_or_train_baseline()
    paths = models.export_baseline(model)
    print(f"machine: {machine.machine_string()}")
    fold_diff, fold_summary = folding_figures(model, splits, repeats)
    costs = xla_compile_costs(model, splits.x_test, batch_sizes=(1, batch_size))
    print("\nfirst call against steady state, tf.function with and without XLA:")
    print(costs.round(2).to_string(index=False))
    peak, floor = runtime_figures(model, paths, splits, repeats, batch_size, images)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print("\npeak rates on LiteRT (roofline.ceilings; wide probe: MACs, thin: outputs):")
        print(peak.round(1).to_string(index=False))
        print(f"\nruntimes, batch-1 latency ({repeats} interleaved calls) and throughput at "
              f"batch {batch_size}:")
        print(floor.round(3).to_string())
    ok, why = runtimes.tensorrt_status()
    print(f"\nTF-TRT: {'available, ' + why if ok else 'skipped: ' + why}")
    return {"fold_max_abs_diff": fold_diff, "fold_latency": fold_summary, "xla": costs,
            "peak": peak, "floor": floor}


if __name__ == "__main__":
    labkit.setup(seed=0)
    benchmark()
