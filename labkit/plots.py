"""Plots the notebooks, the explorer and the book report share (the spine draws; techniques
do not).

Each function returns its matplotlib Figure.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from labkit import results


def latency_distribution(latency, title: str = "Batch-1 latency, interleaved runs"):
    """One row per runner: every timed call as a dot, with p50 and p95 marked (log scale)."""
    names = list(latency.samples_us)
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(names) + 1.5))
    rng = np.random.default_rng(0)
    for row, name in enumerate(names):
        us = latency.samples_us[name]
        ax.scatter(us, row + rng.uniform(-0.2, 0.2, len(us)), s=6, alpha=0.4)
        for q, style in ((50, "-"), (95, "--")):
            ax.vlines(np.percentile(us, q), row - 0.35, row + 0.35, colors="k", linestyles=style)
    ax.set_yticks(range(len(names)), names)
    ax.set_xscale("log")
    ax.set_xlabel("latency per call (µs, log scale); solid line p50, dashed p95")
    ax.set_title(title)
    fig.tight_layout()
    return fig


# One colour per technique, the same in every plot of the book, the explorer and the report.
TECHNIQUE_COLOURS = {"baseline": "#000000", "pruning": "#1f77b4", "clustering": "#2ca02c",
                     "quantization": "#d62728", "graph": "#9467bd", "runtime": "#8c564b",
                     "distributed": "#e377c2", "pipeline": "#ff7f0e", "distillation": "#17becf",
                     "lowrank": "#bcbd22", "search": "#7f7f7f", "serving": "#aec7e8"}

# Axis labels with units; sizes are stored in bytes and plotted in KiB.
AXES = {"latency_p50_us": ("p50 latency at batch 1 (µs, log scale)", 1.0),
        "latency_p95_us": ("p95 latency at batch 1 (µs, log scale)", 1.0),
        "accuracy": ("accuracy (fraction of images right)", 1.0),
        "gzip_bytes": ("gzipped size (KiB, log scale)", 1 / 1024),
        "size_bytes": ("size on disk (KiB, log scale)", 1 / 1024),
        "throughput_ips": ("throughput (images/s, log scale)", 1.0)}


def technique_colour(technique: str) -> str:
    return TECHNIQUE_COLOURS.get(technique, "#333333")


def axis(column: str) -> tuple[str, float]:
    """(label with unit, factor from stored value to plotted value) for a results column."""
    return AXES.get(column, (column, 1.0))


def tradeoff(table: pd.DataFrame, x: str = "latency_p50_us", y: str = "accuracy",
             size: str = "gzip_bytes"):
    """The book report's overview: every variant, coloured by technique; only the Pareto frontier
    (numbered, listed beside the plot) and the baseline are labelled; the report's table lists
    the rest."""
    return pareto_plot(table, x, y, size, title="Every measured variant: up and left is better")


# Columns whose values span decades: drawn on a log axis.
SPANS_DECADES = ("latency_p50_us", "latency_p95_us", "size_bytes", "gzip_bytes", "throughput_ips")


def pareto_plot(table: pd.DataFrame, x: str = "latency_p50_us", y: str = "accuracy",
                size: str = "gzip_bytes", techniques=None, highlight: str | None = None, ylim=None,
                ax=None, title: str | None = None, labels: dict | None = None):
    """Every variant of the store, one colour per technique, the Pareto frontier ringed, numbered.

    The frontier is computed over all three objectives (accuracy, latency, gzip size) and over
    the whole table, so a ringed point can look beaten in this two-axis view: it wins on the
    third axis. `ylim` zooms in; the title says how many variants the zoom leaves out. `labels`
    renames axes, e.g. {"accuracy": "validation accuracy"} when that column holds validation
    figures.
    """
    table = table.copy()
    table["pareto"] = results.pareto_front(table)
    if techniques is not None:
        table = table[table["technique"].isin(list(techniques))]
    table = table.dropna(subset=[x, y])
    if ax is None:
        fig, ax = plt.subplots(figsize=(11, 5.5))
    else:
        fig = ax.figure
    lines = []
    if not table.empty:
        px, py = table[x].astype(float) * axis(x)[1], table[y].astype(float) * axis(y)[1]
        _scatter_techniques(ax, table, px, py, size)
        lines = _ring_frontier(ax, table, px, py, x)
        _mark_baseline_and_choice(ax, table, px, py, highlight)
        ax.legend(fontsize=8, loc="lower left", bbox_to_anchor=(1.01, 0.0), borderaxespad=0)
    ax.text(1.01, 1.0, "Pareto frontier\n" + "\n".join(lines), transform=ax.transAxes, va="top",
            fontsize=7, family="monospace")
    _label_axes(ax, table, x, y, size, ylim, title, labels)
    fig.tight_layout()
    return fig


def _scatter_techniques(ax, table, px, py, size: str) -> None:
    """One colour per technique; a marker's area grows with the `size` column."""
    sizes = table[size].astype(float) if size in table else pd.Series(0.0, index=table.index)
    scale = max(float(sizes.max()), 1.0) if sizes.notna().any() else 1.0
    for technique, group in table.groupby("technique"):
        ax.scatter(px[group.index], py[group.index],
                   s=25 + 400 * sizes[group.index].fillna(0) / scale,
                   alpha=0.6, label=technique, color=technique_colour(technique))


def _ring_frontier(ax, table, px, py, x: str) -> list[str]:
    """Ring and number the Pareto frontier from left to right; one line per number for the list."""
    front = table[table["pareto"]].sort_values(x)
    ax.scatter(px[front.index], py[front.index], s=160, facecolors="none", edgecolors="black",
               linewidths=1.5, label="Pareto frontier")
    lines = []
    for number, (index, row) in enumerate(front.iterrows(), start=1):
        ax.annotate(str(number), (px[index], py[index]), fontsize=8, weight="bold", xytext=(5, 4),
                    textcoords="offset points")
        lines.append(f"{number:>2}  {row['variant']}")
    return lines


def _mark_baseline_and_choice(ax, table, px, py, highlight: str | None) -> None:
    """Name the baseline, and star the variant a learner selected (`highlight`)."""
    for index in table.index[table["variant"] == results.BASELINE_VARIANT]:
        ax.annotate("baseline (LiteRT float32)", (px[index], py[index]), fontsize=8,
                    xytext=(6, -12), textcoords="offset points")
    if highlight is not None and highlight in set(table["variant"]):
        index = table.index[table["variant"] == highlight][0]
        ax.scatter([px[index]], [py[index]], s=300, marker="*", color="red",
                   label=f"selected: {highlight}")


def _label_axes(ax, table, x: str, y: str, size: str, ylim, title, labels) -> None:
    """Log scales where values span decades, axis labels with units, the zoom and the title."""
    (x_label, _), (y_label, y_factor) = axis(x), axis(y)
    x_label, y_label = (labels or {}).get(x, x_label), (labels or {}).get(y, y_label)
    if x in SPANS_DECADES:
        ax.set_xscale("log")
    if y in SPANS_DECADES:
        ax.set_yscale("log")
    title = title or "Every variant in the results store: up and to the left is better"
    title += f" (marker area: {axis(size)[0].split(' (')[0]})"
    if ylim is not None:
        ax.set_ylim(*ylim)
        low, high = ax.get_ylim()
        hidden = int(((table[y] * y_factor < low) | (table[y] * y_factor > high)).sum())
        title += f"; {hidden} outside this view" if hidden else ""
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(title, fontsize=10)


def latency_against_load(runs: pd.DataFrame, slo_p99_ms: float | None = None):
    """Load runs of a served model (`serving.study`): p99 and answered throughput against load.

    One line per setting; the knee of a p99 curve is where the queue starts to build.
    """
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for setting, group in runs.groupby("setting", sort=False):
        group = group.sort_values("offered_rps")
        line, = left.plot(group["offered_rps"], group["p99_ms"], "o-", label=setting)
        left.plot(group["offered_rps"], group["p50_ms"], "--", lw=0.8, color=line.get_color())
        right.plot(group["offered_rps"], group["throughput_rps"], "o-", label=setting,
                   color=line.get_color())
    if slo_p99_ms is not None:
        left.axhline(slo_p99_ms, color="grey", ls=":", label=f"SLO: p99 < {slo_p99_ms:g} ms")
    if len(runs):
        top = float(runs["offered_rps"].max())
        right.plot([0, top], [0, top], color="grey", ls=":", label="answered = offered")
    left.set(xlabel="offered load (requests/s)", ylabel="latency (ms, log): p99 solid, p50 dashed",
             yscale="log", title="Latency against load")
    right.set(xlabel="offered load (requests/s)", ylabel="answered (requests/s)",
              title="Throughput")
    left.legend(fontsize=7)
    fig.tight_layout()
    return fig


def roofline(levels: pd.DataFrame, peaks: dict, points: pd.DataFrame | None = None,
             title: str = "Roofline of this machine"):
    """Log-log: attainable GFLOP/s against arithmetic intensity (FLOPs per byte).

    `levels`: level, bytes_per_s (one slanted ceiling each); `peaks`: {label: FLOP/s} (one flat
    ceiling each); `points`: label, intensity, flops_per_s and group (one marker per group).
    """
    fig, ax = plt.subplots(figsize=(8, 5))
    x = np.logspace(-2, 3, 200)
    top = max(peaks.values())
    for row in levels.itertuples():
        ax.plot(x, np.minimum(x * row.bytes_per_s, top) / 1e9, lw=1,
                label=f"{row.level} {row.bytes_per_s / 1e9:.0f} GB/s")
    for label, flops in peaks.items():
        ax.axhline(flops / 1e9, color="k", lw=0.8, ls="--")
        ax.text(x[0], flops / 1e9 * 1.08, f"{label} {flops / 1e9:.0f} GFLOP/s", fontsize=8)
    if points is not None and len(points):
        for (group, rows), marker in zip(points.groupby("group", sort=False), "os^Dv"):
            ax.scatter(rows["intensity"], rows["flops_per_s"] / 1e9, marker=marker, s=40,
                       zorder=3, label=group)
            for row in rows.itertuples():
                ax.annotate(row.label, (row.intensity, row.flops_per_s / 1e9), fontsize=7,
                            xytext=(4, -10), textcoords="offset points")
    ax.set(xscale="log", yscale="log", xlabel="arithmetic intensity (FLOPs per byte moved)",
           ylabel="GFLOP/s (log scale)", title=title, ylim=(0.1, top / 1e9 * 3))
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def predicted_against_measured(table: pd.DataFrame, notebook: str | None = None,
                               band: float = 0.3):
    """One dot per variant (roofline.against_measured's table), log-log, with the line where
    prediction and measurement agree and a band of +-`band` around it; the rows of `notebook`
    are labelled, the others drawn small."""
    fig, ax = plt.subplots(figsize=(7.5, 6))
    mine = table["notebook"] == notebook
    for technique, rows in table.groupby("technique", sort=False):
        ax.scatter(rows["predicted_us"], rows["measured_us"], color=technique_colour(technique),
                   s=np.where(rows["notebook"] == notebook, 45, 14), label=technique, zorder=3)
    placed = []   # one label per spot: files with the same prediction share a point
    for row in table[mine].itertuples():
        near = [p for p in placed if abs(np.log(p[0] / row.predicted_us)) < 0.05
                and abs(np.log(p[1] / row.measured_us)) < 0.05]
        if near:
            near[0][2].append(row.variant)
            continue
        placed.append((row.predicted_us, row.measured_us, [row.variant]))
    for x, y, names in placed:
        label = names[0] + (f" (+{len(names) - 1} more)" if len(names) > 1 else "")
        ax.annotate(label, (x, y), fontsize=7, xytext=(4, -3), textcoords="offset points")
    values = table[["predicted_us", "measured_us"]]
    span = np.array([values.min().min() / 1.5, values.max().max() * 1.5])
    ax.plot(span, span, color="k", lw=1, label="measured = predicted")
    # |measured - predicted| / measured <= band: measured between p / (1 + band) and p / (1 - band)
    ax.fill_between(span, span / (1 + band), span / (1 - band), color="grey", alpha=0.2,
                    label=f"within {band:.0%}")
    within = float((table["error"] <= band).mean())
    ax.set(xscale="log", yscale="log", xlim=span, ylim=span,
           xlabel="predicted p50 at batch 1 (µs, log scale)",
           ylabel="measured p50 at batch 1 (µs, log scale)",
           title=f"Roofline against measurement: {within:.0%} of {len(table)} files within "
                 f"{band:.0%}")
    for axis_ in (ax.xaxis, ax.yaxis):   # plain numbers at 1, 2 and 5 times a power of ten
        axis_.set_major_locator(LogLocator(subs=(1, 2, 5)))
        axis_.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axis_.set_minor_formatter(NullFormatter())
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig


def bandwidth_steps(sweep: pd.DataFrame, caches: dict):
    """The bandwidth sweep (working set against GB/s, log x) with each cache's size marked: the
    memory hierarchy seen as steps."""
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    ax.plot(sweep["working_set_bytes"] / 1024, sweep["bytes_per_s"] / 1e9, "o-")
    for level, size in sorted(caches.items()):
        ax.axvline(size / 1024, color="grey", ls=":", lw=1)
        ax.text(size / 1024, ax.get_ylim()[1] * 0.95, f" {level} {size / 1024:,.0f} KiB",
                fontsize=8, va="top")
    ax.set(xscale="log", xlabel="working set: source + destination (KiB, log scale)",
           ylabel="GB/s (read + write)", title="A NumPy copy's bandwidth: the caches as steps",
           ylim=(0, None))
    fig.tight_layout()
    return fig
