"""The search chapter's targets in one run: `python -m labkit.targets.search` trains the students
(distillation's targets), runs the book's search and checks that a found variant Pareto-dominates
every hand-made variant of the pipeline, on validation accuracy, gzip size and latency."""
from __future__ import annotations

import pandas as pd

import labkit
from labkit import search
from labkit.data import load_mnist
from labkit.targets import distill as distill_targets


def _print_table(table: pd.DataFrame, splits, repeats: int) -> None:
    print(f"LiteRT 1 thread, batch 1, {repeats} interleaved calls each; val_accuracy on the "
          f"{len(splits.y_val)} validation images (the comparison), accuracy on the "
          f"{len(splits.y_test)} test images")
    with pd.option_context("display.width", 200):
        print(table.drop(columns=["artifact"]).round(4).to_string())


def _print_dominance(pairs: pd.DataFrame) -> pd.DataFrame:
    """The dominance summary and the target's verdict; returns the summary."""
    summary, covered = search.dominance_summary(pairs), search.coverage(pairs)
    with pd.option_context("display.width", 200):
        print(summary.to_string())
        print(covered.to_string())
    best, n_made = summary.index[0], summary["hand_made"].iloc[0]
    met = bool(summary["dominates_all"].any())
    print(f"[{'met   ' if met else 'MISSED'}] a searched variant dominates every hand-made variant "
          f"of the pipeline (at least as good on validation accuracy, gzip size and latency, "
          f"strictly better on one): {best} dominates {summary.loc[best, 'dominated']} of "
          f"{n_made}; {int((covered != '').sum())} of {n_made} are dominated by some found "
          f"variant")
    return summary


def benchmark(n_trials: int = search.BOOK_TRIALS, accuracy_floor: float = search.ACCURACY_FLOOR,
              repeats: int = 300, progress: bool = False) -> dict:
    """Both targets of the chapter in one run: distillation (`targets.distill.benchmark`), then
    the search against the pipeline's hand-made variants (on validation accuracy)."""
    students = distill_targets.benchmark(progress=progress)
    splits = load_mnist()
    start = search.parents(splits, progress=progress)
    float_layers, _ = search.book_float_layers(start, splits, progress)
    study = search.run_search(start, splits, n_trials=n_trials, accuracy_floor=accuracy_floor,
                              float_layers=float_layers, progress=progress)
    found = search.front(search.trials_table(study))
    table, _, pairs = search.compare_with_pipeline(found, splits, repeats=repeats)
    _print_table(table, splits, repeats)
    out = {"students": students, "table": table, "front": found, "study": study, "pairs": pairs}
    if pairs is None:
        print("[skip  ] the results store holds no 'pipeline' variant: run 07_pipeline.ipynb "
              "first for the comparison")
        return out
    out["summary"] = _print_dominance(pairs)
    return out


if __name__ == "__main__":
    labkit.setup()
    benchmark()
