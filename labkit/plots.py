"""Plots the notebooks, the explorer and the book report share (the spine draws; techniques do not).

Each function returns its matplotlib Figure.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd


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


def tradeoff(table: pd.DataFrame, x: str = "latency_p50_us", y: str = "accuracy",
             size: str = "gzip_bytes", title: str = "Every measured variant"):
    """Scatter of the results store: one colour per technique, marker area by `size`."""
    table = table.dropna(subset=[x, y])
    fig, ax = plt.subplots(figsize=(8, 5))
    if not table.empty:
        area = 20 + 300 * table[size].fillna(0) / max(table[size].max(), 1)
        for technique, group in table.groupby("technique"):
            ax.scatter(group[x], group[y], s=area[group.index], alpha=0.6, label=technique)
            for _, row in group.iterrows():
                ax.annotate(row["variant"], (row[x], row[y]), fontsize=7, alpha=0.8)
        ax.legend(title="technique")
    ax.set_xscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(f"{title} (marker area: {size})")
    fig.tight_layout()
    return fig


def pareto_plot(table: pd.DataFrame, x: str = "latency_p50_us", y: str = "accuracy", size: str = "gzip_bytes",
                techniques=None, highlight: str | None = None, ylim=None, ax=None):
    """Every variant of the store, one colour per technique, the Pareto frontier ringed and numbered.

    The frontier is computed over all three objectives (accuracy, latency, gzip size) and over
    the whole table, so a ringed point can look beaten in this two-axis view: it wins on the
    third axis. `ylim` zooms in; the title says how many variants the zoom leaves out.
    """
    from labkit.results import TECHNIQUES, pareto_front
    table = table.copy()
    table["pareto"] = pareto_front(table)
    if techniques is not None:
        table = table[table["technique"].isin(list(techniques))]
    table = table.dropna(subset=[x, y])
    if ax is None:
        fig, ax = plt.subplots(figsize=(11, 5.5))
    else:
        fig = ax.figure
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    lines = []
    if not table.empty:
        sizes = table[size].astype(float) if size in table else pd.Series(0.0, index=table.index)
        scale = max(float(sizes.max()), 1.0) if sizes.notna().any() else 1.0
        for technique, group in table.groupby("technique"):
            colour = colours[TECHNIQUES.index(technique) % len(colours)] if technique in TECHNIQUES else None
            ax.scatter(group[x], group[y], s=25 + 400 * sizes[group.index].fillna(0) / scale, alpha=0.6,
                       label=technique, color=colour)
        front = table[table["pareto"]].sort_values(x)
        ax.scatter(front[x], front[y], s=160, facecolors="none", edgecolors="black", linewidths=1.5,
                   label="Pareto frontier")
        for number, (_, row) in enumerate(front.iterrows(), start=1):
            ax.annotate(str(number), (row[x], row[y]), fontsize=8, weight="bold", xytext=(5, 4),
                        textcoords="offset points")
            lines.append(f"{number:>2}  {row['variant']}")
        if highlight is not None and highlight in set(table["variant"]):
            row = table[table["variant"] == highlight].iloc[0]
            ax.scatter([row[x]], [row[y]], s=300, marker="*", color="red", label=f"selected: {highlight}")
        ax.legend(fontsize=8, loc="lower left", bbox_to_anchor=(1.01, 0.0), borderaxespad=0)
    ax.text(1.01, 1.0, "Pareto frontier\n" + "\n".join(lines), transform=ax.transAxes, va="top",
            fontsize=7, family="monospace")
    spans_decades = ("latency_p50_us", "latency_p95_us", "size_bytes", "gzip_bytes", "throughput_ips")
    if x in spans_decades:
        ax.set_xscale("log")
    if y in spans_decades:
        ax.set_yscale("log")
    title = f"Every variant in the results store (marker area: {size})"
    if ylim is not None:
        ax.set_ylim(*ylim)
        low, high = ax.get_ylim()
        hidden = int(((table[y] < low) | (table[y] > high)).sum())
        title += f"; {hidden} outside this view" if hidden else ""
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def latency_against_load(runs: pd.DataFrame, slo_p99_ms: float | None = None):
    """Load runs of a served model (notebook 09): p99 and answered throughput against offered load.

    One line per setting; the knee of a p99 curve is where the queue starts to build.
    """
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for setting, group in runs.groupby("setting", sort=False):
        group = group.sort_values("offered_rps")
        line, = left.plot(group["offered_rps"], group["p99_ms"], "o-", label=setting)
        left.plot(group["offered_rps"], group["p50_ms"], "--", lw=0.8, color=line.get_color())
        right.plot(group["offered_rps"], group["throughput_rps"], "o-", label=setting, color=line.get_color())
    if slo_p99_ms is not None:
        left.axhline(slo_p99_ms, color="grey", ls=":", label=f"SLO: p99 < {slo_p99_ms:g} ms")
    if len(runs):
        top = float(runs["offered_rps"].max())
        right.plot([0, top], [0, top], color="grey", ls=":", label="answered = offered")
    left.set(xlabel="offered load (requests/s)", ylabel="latency (ms, log): p99 solid, p50 dashed",
             yscale="log", title="Latency against load")
    right.set(xlabel="offered load (requests/s)", ylabel="answered (requests/s)", title="Throughput")
    left.legend(fontsize=7)
    fig.tight_layout()
    return fig
