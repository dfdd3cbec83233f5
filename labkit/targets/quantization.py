"""The quantization chapter's targets: PTQ and QAT int8 against the float .tflite, in one run.

`python -m labkit.targets.quantization [--repeats N] [--threads N]` builds (or reuses) the float,
PTQ and QAT models, measures them side by side, prints each target as met or missed, and shows
where the bytes of the int8 file go (why it is not 4x smaller).
"""
from __future__ import annotations

import argparse
import sys

import pandas as pd

import labkit  # sets the legacy-Keras switch before TensorFlow loads
from labkit import machine, measure, models
from labkit.data import load_mnist
from labkit.quantization import QAT_PLAN, export, qat, size_table

BASE, INT8, QAT_INT8 = "baseline-float32-tflite", "quantization-ptq-int8", "quantization-qat-int8"


def build_models(splits, progress: bool = False) -> dict:
    """{label: .tflite}: the float baseline, the converter's dynamic, int8 and float16, QAT int8."""
    baseline, _ = models.load_or_train_baseline(progress=progress)
    paths = {BASE: models.baseline_tflite()}
    for mode in ("dynamic", "int8", "float16"):
        calibration = splits.x_train if mode == "int8" else None
        paths[f"quantization-ptq-{mode}"] = export(baseline, mode, calibration, name=f"ptq-{mode}")
    qat_model, _ = qat(baseline, splits, QAT_PLAN, progress=progress)
    paths[QAT_INT8] = export(qat_model, "int8", name="qat-int8")
    return paths


def checks(figures: dict) -> list:
    """(target, met, measured value) for each of the chapter's targets."""
    return [
        ("int8 file >= 3.8x smaller than float", figures["size_ratio"] >= 3.8,
         f"{figures['size_ratio']:.3f}x"),
        ("int8 accuracy lost <= 0.2 points", figures["accuracy_drop_points"] <= 0.2,
         f"{figures['accuracy_drop_points']:+.2f} points"),
        ("int8 p50 >= 1.5x lower than float", figures["p50_ratio"] >= 1.5,
         f"{figures['p50_ratio']:.2f}x"),
        ("QAT int8 at least as accurate as PTQ int8", figures["qat_minus_ptq_points"] >= 0,
         f"{figures['qat_minus_ptq_points']:+.2f} points"),
    ]


def print_breakdown(breakdown) -> None:
    """Why not 4x: the bytes of the float and int8 files by what they hold."""
    constants_ratio = (breakdown.loc["float32 constants", "float32"]
                       / breakdown.loc[["int8 constants", "int32 constants"], "int8"].sum())
    print("why not 4x: bytes of each file by what they hold")
    print(breakdown.to_string())
    print(f"only the int8 weights shrink 4x: with the int32 biases the constant data shrink "
          f"{constants_ratio:.3f}x, and the scales, zero points and the file's structure come "
          "on top")


def benchmark(repeats: int = 300, warmup: int = 30, threads: int = 1,
              progress: bool = False) -> dict:
    """Build (or reuse) the float, PTQ and QAT models, measure them in one run and print the
    targets."""
    splits = load_mnist()
    paths = build_models(splits, progress)
    table, _ = measure.side_by_side(paths, splits.x_test, splits.y_test,
                                    latency_images=splits.x_test[:200], reference=BASE,
                                    repeats=repeats, warmup=warmup, threads=threads)
    figures = {
        "size_ratio": table.loc[BASE, "size_bytes"] / table.loc[INT8, "size_bytes"],
        "accuracy_drop_points": 100 * (table.loc[BASE, "accuracy"] - table.loc[INT8, "accuracy"]),
        "p50_ratio": table.loc[INT8, "speedup_p50"],
        "qat_minus_ptq_points": 100 * (table.loc[QAT_INT8, "accuracy"]
                                       - table.loc[INT8, "accuracy"]),
    }
    breakdown = size_table({"float32": paths[BASE], "int8": paths[INT8]})
    print(f"machine: {machine.machine_string()}")
    print(f"LiteRT, {threads} thread(s), batch 1, {repeats} interleaved calls each; accuracy on "
          f"the {len(splits.y_test)} test images")
    with pd.option_context("display.width", 200):
        print(table.drop(columns="artifact").round(4).to_string())
    found = checks(figures)
    for label, ok, value in found:
        print(f"[{'met   ' if ok else 'MISSED'}] {label}: {value}")
    print_breakdown(breakdown)
    return {"table": table, "figures": figures, "checks": found, "breakdown": breakdown,
            "paths": paths}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="The quantization chapter's targets: PTQ and "
                                                 "QAT int8 against the float .tflite")
    parser.add_argument("--repeats", type=int, default=300, help="timed calls per model")
    parser.add_argument("--threads", type=int, default=1, help="LiteRT interpreter threads")
    args = parser.parse_args(argv)
    labkit.setup(seed=0)
    benchmark(repeats=args.repeats, threads=args.threads, progress=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
