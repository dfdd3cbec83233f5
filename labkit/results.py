"""The one results store, results/measurements.csv, that every notebook writes to, and its
Pareto front.

Rows are keyed by `variant`: recording a variant again replaces its row. Every write goes
through `files.write_atomic` under a file lock, so an interrupted write leaves the previous store
whole. `pareto_front` marks the variants no other variant dominates (the pipeline and search
chapters, the explorer, the book report); `bench.frontier` re-measures the stored files.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
from filelock import FileLock

from labkit import RESULTS_DIR, ROOT, files, measure
from labkit.machine import machine_string

# LABKIT_RESULTS points a whole process (a test's kernel, say) at another store.
BASELINE_VARIANT = "baseline-float32-tflite"   # every speed-up is measured against it
RESULTS_PATH = Path(os.environ.get("LABKIT_RESULTS", RESULTS_DIR / "measurements.csv"))
COLUMNS = ["variant", "technique", "notebook", "accuracy", "latency_p50_us", "latency_p95_us",
           "throughput_ips", "size_bytes", "gzip_bytes", "artifact", "machine", "measured_at"]
TECHNIQUES = ("baseline", "pruning", "clustering", "quantization", "graph", "runtime",
              "distributed", "pipeline", "distillation", "lowrank", "search", "serving")


def store_path(path=None) -> Path:
    """`path`, or the store's default, RESULTS_PATH, read when called (so tests can point it
    elsewhere)."""
    return Path(RESULTS_PATH if path is None else path)


def load(path: Path | None = None) -> pd.DataFrame:
    """Every stored row (an empty table with the right columns if nothing is stored yet)."""
    path = store_path(path)
    if not path.is_file():
        return pd.DataFrame(columns=COLUMNS)
    try:
        table = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} cannot be read as a CSV table ({type(error).__name__}: "
                         f"{str(error).strip()[:200]}), so it is not a labkit results store. "
                         "Move it "
                         "aside; the notebooks will write a fresh one.") from None
    missing = set(COLUMNS) - set(table.columns)
    if missing:
        raise ValueError(f"{path} lacks the columns {sorted(missing)}: it is not a labkit results "
                         "store. Move it aside; the notebooks will write a fresh one.")
    return table[COLUMNS].astype({"size_bytes": "Int64", "gzip_bytes": "Int64"})


def relative_artifact(path) -> str:
    """An artifact path relative to the repository root, as the store keeps it."""
    if path is None or path == "":
        return ""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(ROOT.resolve()))
    except ValueError:
        return str(path)


def validate(row: dict) -> dict:
    unknown = set(row) - set(COLUMNS)
    if unknown:
        raise ValueError(f"unknown result columns {sorted(unknown)}; the columns are {COLUMNS}")
    if not row.get("variant"):
        raise ValueError("every result row needs a non-empty 'variant' name")
    if row.get("technique") not in TECHNIQUES:
        raise ValueError(f"technique must be one of {TECHNIQUES}, got {row.get('technique')!r}")
    accuracy = row.get("accuracy")
    if accuracy is not None and not pd.isna(accuracy) and not 0.0 <= float(accuracy) <= 1.0:
        raise ValueError(f"accuracy is a fraction in [0, 1], got {accuracy}")
    return row


def _locked(path: Path):
    """Serialise read-modify-write across processes, on every OS (filelock: POSIX and Windows)."""
    return FileLock(str(path.with_suffix(".lock")), timeout=120)


def upsert(rows, path: Path | None = None) -> pd.DataFrame:
    """Insert rows, replacing any stored row with the same variant; return the whole store."""
    if isinstance(rows, dict):
        rows = [rows]
    rows = [validate(dict(row)) for row in rows]
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    for row in rows:
        row.setdefault("measured_at", stamp)
        row["artifact"] = relative_artifact(row.get("artifact"))
    path = store_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        new = pd.DataFrame(rows).reindex(columns=COLUMNS)
        old = load(path)
        old = old[~old["variant"].isin(new["variant"])]
        table = new if old.empty else pd.concat([old, new], ignore_index=True)
        files.write_atomic(path, lambda tmp: table.to_csv(tmp, index=False))
    return table


def make_row(variant: str, technique: str, notebook: str, *, accuracy=None, latency=None,
             runner_name: str | None = None, throughput_ips=None, artifact=None,
             machine=None) -> dict:
    """A store row for one variant; sizes come from the artifact, latency from a
    `measure.Latency`."""
    row = {"variant": variant, "technique": technique, "notebook": notebook,
           "accuracy": accuracy, "throughput_ips": throughput_ips,
           "artifact": artifact, "machine": machine or machine_string()}
    if latency is not None:
        name = runner_name or variant
        row["latency_p50_us"] = latency.p50(name)
        row["latency_p95_us"] = latency.p95(name)
    if artifact:
        row["size_bytes"] = measure.size_bytes(artifact)
        row["gzip_bytes"] = measure.gzip_bytes(artifact)
    return row


def record_table(table: pd.DataFrame, latency, technique: str, notebook: str,
                 names: dict | None = None,
                 path: Path | None = None) -> pd.DataFrame:
    """Store the rows of a measure.side_by_side table; `names` ({label: variant}) picks and
    renames them.

    Without `names` every row is stored under its label. Returns the whole store.
    """
    names = {label: label for label in table.index} if names is None else names
    rows = [make_row(variant, technique, notebook, accuracy=float(table.loc[label, "accuracy"]),
                     latency=latency, runner_name=label, artifact=table.loc[label, "artifact"])
            for label, variant in names.items()]
    return upsert(rows, path)

# ----------------------------------------------------------------------------- the Pareto front

OBJECTIVES = (("accuracy", "max"), ("latency_p50_us", "min"), ("gzip_bytes", "min"))


def pareto_front(table: pd.DataFrame, objectives=OBJECTIVES) -> pd.Series:
    """True for each row that no other row dominates (rows missing an objective are False).

    Row a dominates row b when a is at least as good on every objective and strictly better on
    one. A row equal to another on every objective is kept (neither dominates). `objectives` is a
    sequence of (column, "max" | "min") pairs, or a {column: sense} dict.
    """
    objectives = list(objectives.items()) if isinstance(objectives, dict) else list(objectives)
    for column, sense in objectives:
        if sense not in ("max", "min"):
            raise ValueError(f"objective sense must be 'max' or 'min', got {sense!r} for {column}")
        if column not in table.columns:
            raise ValueError(f"no column {column!r} in the table; columns are "
                             f"{list(table.columns)}")
    columns = [column for column, _ in objectives]
    complete = table[columns].notna().all(axis=1)
    # Turn every objective into "smaller is better".
    values = np.stack([(-1 if sense == "max" else 1)
                       * table.loc[complete, column].astype(float).to_numpy()
                       for column, sense in objectives], axis=1)
    # [a, b]: a <= b everywhere
    at_least_as_good = (values[:, None, :] <= values[None, :, :]).all(axis=2)
    strictly_better = (values[:, None, :] < values[None, :, :]).any(axis=2)
    dominated = (at_least_as_good & strictly_better).any(axis=0)
    front = pd.Series(False, index=table.index)
    front[complete[complete].index] = ~dominated
    return front
