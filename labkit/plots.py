"""Plots the notebooks and the book report share. Each returns its matplotlib Figure."""
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
