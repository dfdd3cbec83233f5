"""LiteRT's quantizer beside the converter, and the smallest models at 99%, in one run.

`python -m labkit.targets.litert_quant [--repeats N] [--threads N] [--no-smallest]` measures the
converter's and ai-edge-quantizer's variants side by side (size, gzip, test accuracy, p50, p95),
searches the smallest model at each accuracy floor (`search.smallest_at`), records the table in
the results store and says where the chosen files' bytes go.
"""
from __future__ import annotations

import argparse
import sys

import labkit  # sets the legacy-Keras switch before TensorFlow loads
from labkit import machine, measure, results, search, tflite
from labkit.data import load_mnist
from labkit.litert_quant import variants, weight_table

BASE = "baseline-float32-tflite"


def _describe_bytes(path) -> str:
    """Where a chosen file's bytes go: structure, tensor data, the weights and their zeros."""
    limits, weights = tflite.structure_bytes(path), weight_table(path)
    zeros = (weights["zeros"] * weights["weights"]).sum() / weights["weights"].sum()
    return (f"  its bytes: {limits['structure_bytes']} of graph, names and quantization parameters "
            f"({limits['structure_gzip_bytes']} gzipped, with no weight at all), "
            f"{limits['data_bytes']} of tensor data, of which "
            f"{int(weights['stored_bytes'].sum())} hold the {int(weights['weights'].sum())} "
            f"weights ({zeros:.0%} of them zero)")


def print_smallest(found: dict, table) -> None:
    """Per accuracy floor: the smallest file chosen on validation, against a choice made on test."""
    def gain(r):
        return f"{table.loc[BASE, 'gzip_bytes'] / r['gzip_bytes']:.1f}x"
    candidates = found["table"]
    for label, floor in found["floors"].items():
        # found with test_all=True: every candidate has a test accuracy
        seen = candidates[candidates["test_accuracy"] >= float(label.rstrip("%")) / 100]
        if len(seen):
            top = seen.iloc[0]
            print(f"for reference, picked on the test split (not a fair choice): at test >= "
                  f"{label} the smallest is {top['candidate']} + {top['recipe']}, {gain(top)} "
                  f"at {top['test_accuracy']:.4f}")
        if label not in found["chosen"]:
            best = candidates.sort_values("val_accuracy").iloc[-1]
            print(f"at test >= {label}: no candidate reaches the validation floor {floor}; the "
                  f"most accurate on validation is {best['candidate']} + {best['recipe']} "
                  f"({best['val_accuracy']:.4f}, {gain(best)})")
            continue
        row = found["chosen"][label]
        print(f"smallest at test >= {label}: {row['candidate']} + {row['recipe']}: "
              f"{row['gzip_bytes']} B gzipped = {gain(row)} smaller, validation "
              f"{row['val_accuracy']:.4f} (floor {floor}), test {row['test_accuracy']:.4f}")
        print(_describe_bytes(row["artifact"]))


def benchmark(repeats: int = 300, threads: int = 1, smallest_figures: bool = True) -> dict:
    """The converter's and the tool's variants and the smallest models at 99%
    (search.smallest_at), measured side by side in one run: size, gzip, test accuracy, p50, p95."""
    splits = load_mnist()
    paths, out = variants(splits), {}
    if smallest_figures:
        found = out["smallest"] = search.smallest_at(splits, test_all=True)
        paths.update({f"smallest-at-{label}": row["artifact"]
                      for label, row in found["chosen"].items()})
    table, latency = measure.side_by_side(paths, splits.x_test, splits.y_test,
                                          latency_images=splits.x_val[:200], reference=BASE,
                                          repeats=repeats, threads=threads)
    print(f"machine: {machine.machine_string()}\nLiteRT {threads} thread(s), batch 1, {repeats} "
          f"interleaved calls each; accuracy on {len(splits.y_test)} test images")
    print(table.drop(columns="artifact").round(4).to_string())
    out.update({"table": table, "latency": latency, "paths": paths})
    if not smallest_figures:
        return out
    results.record_table(table, latency, "quantization", "04b_litert_quantizer",
                         {f"smallest-at-{label}": f"litert-smallest-at-{label}"
                          for label in found["chosen"]})
    print("candidates by gzip size (validation accuracy only):")
    print(found["table"].drop(columns="artifact").head(15).round(4).to_string())
    print_smallest(found, table)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="ai-edge-quantizer's recipes beside the converter, and the smallest models")
    parser.add_argument("--repeats", type=int, default=300, help="timed calls per model")
    parser.add_argument("--threads", type=int, default=1, help="LiteRT interpreter threads")
    parser.add_argument("--no-smallest", action="store_true",
                        help="skip the smallest-model search")
    args = parser.parse_args(argv)
    labkit.setup(seed=0)
    benchmark(repeats=args.repeats, threads=args.threads, smallest_figures=not args.no_smallest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
