"""The trade-off explorer and the build-your-own panel, in ipywidgets 8: the widgets only.

`Explorer` plots the results store with its Pareto frontier (`results.pareto_front`,
`plots.pareto_plot`): choose the axes, filter by technique, read a variant's row. `BuildPanel`
builds a pipeline variant from three settings (`pipeline.build_and_measure`), with a progress bar
per stage, stores it and adds it to the plot; a setting built before is never built again. Both
keep their state in plain attributes (`figure`, `visible()`, `cache`, `builds`), so tests drive
them by setting widget values and clicking, without a browser.
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Callable

import ipywidgets as w
import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import display

from labkit import pipeline, results
from labkit.pipeline import QUANTIZATION, STAGES
from labkit.plots import pareto_plot
from labkit.results import OBJECTIVES, pareto_front

AXES = ("accuracy", "latency_p50_us", "latency_p95_us", "throughput_ips", "size_bytes",
        "gzip_bytes")
SIZES = ("gzip_bytes", "size_bytes")
CLUSTER_CHOICES = (("no clustering", 0), ("4", 4), ("8", 8), ("16", 16), ("32", 32))


def _figure_in(output: w.Output, figure) -> None:
    """Show a Matplotlib figure inside an Output widget (nothing is shown outside a kernel)."""
    output.clear_output(wait=True)
    with output:
        display(figure)
    plt.close(figure)


class Explorer:
    """Pick axes and techniques, see every variant and the Pareto frontier, read a variant's row."""

    def __init__(self, table: pd.DataFrame | None = None, path: Path | None = None):
        self.path = results.store_path(path)
        self.table = results.load(self.path) if table is None else table.copy()
        self.figure = None
        self.x = w.Dropdown(options=AXES, value="latency_p50_us", description="x axis")
        self.y = w.Dropdown(options=AXES, value="accuracy", description="y axis")
        self.size = w.Dropdown(options=SIZES, value="gzip_bytes", description="marker area")
        self.techniques = w.SelectMultiple(description="techniques", rows=6)
        self.variant = w.Dropdown(description="variant", layout=w.Layout(width="460px"))
        self.details = w.HTML()
        self.plot = w.Output(layout=w.Layout(min_height="380px"))
        self._known, self._updating = set(), False
        self._set_technique_options()
        for control in (self.x, self.y, self.size, self.techniques):
            control.observe(self._redraw, names="value")
        self.variant.observe(self._select, names="value")
        controls = w.VBox([self.x, self.y, self.size, self.techniques])
        self.widget = w.VBox([w.HBox([controls, w.VBox([self.variant, self.details])]), self.plot],
                             layout=w.Layout(border="1px solid #ccc", padding="6px"))
        self.widget.add_class("labkit-explorer")
        self._redraw()

    def _set_technique_options(self):
        """Offer the store's techniques; keep the user's choice, and select those new to it."""
        present = sorted(set(self.table["technique"].dropna()))
        chosen = [t for t in present if t in self.techniques.value or t not in self._known]
        self._known = set(present)
        self._updating = True
        try:
            self.techniques.options = present
            self.techniques.value = tuple(chosen)
        finally:
            self._updating = False

    def visible(self) -> pd.DataFrame:
        """The rows shown: the chosen techniques, both axes measured; `pareto` over all rows."""
        table = self.table.copy()
        table["pareto"] = pareto_front(table) if len(table) else pd.Series(dtype=bool)
        table = table[table["technique"].isin(self.techniques.value)]
        return table.dropna(subset=[self.x.value, self.y.value])

    def _redraw(self, change=None):
        if self._updating:
            return
        names = list(self.visible()["variant"])
        self._updating = True
        try:
            current = self.variant.value
            self.variant.options = names
            self.variant.value = current if current in names else (names[0] if names else None)
        finally:
            self._updating = False
        self._select()

    def _select(self, change=None):
        """Draw the plot with the selected variant starred, and show its row."""
        if self._updating:
            return
        name = self.variant.value
        self.figure = pareto_plot(self.table, x=self.x.value, y=self.y.value, size=self.size.value,
                                  techniques=self.techniques.value, highlight=name)
        _figure_in(self.plot, self.figure)
        if name is None:
            self.details.value = "<i>no variant matches the filter</i>"
            return
        row = self.visible().set_index("variant").loc[name]
        shown = {k: v for k, v in row.items() if k != "pareto" and not pd.isna(v) and v != ""}
        cells = "".join(f"<tr><th style='text-align:left'>{html.escape(str(k))}</th>"
                        f"<td>{html.escape(_fmt(v))}</td></tr>" for k, v in shown.items())
        on_front = "yes" if row["pareto"] else ("no (another variant is at least as good on all "
                                                "three and strictly better on one)")
        objectives = ", ".join(f"{c} ({s})" for c, s in OBJECTIVES)
        run = f"notebook {row.get('notebook', '?')}, {row.get('measured_at', '?')}"
        self.details.value = (f"<b>{html.escape(name)}</b><br>on the Pareto frontier of "
                              f"{objectives}: {on_front}<br><i>as stored: test accuracy; latency "
                              f"from the timing run of {html.escape(run)}, so compare latencies "
                              "across notebooks with care (pipeline.measure_stages re-times every "
                              f"file in one run)</i><table>{cells}</table>")

    def reload(self, select: str | None = None):
        """Re-read the results store (after a build) and redraw, optionally selecting a variant."""
        self.table = results.load(self.path)
        self._set_technique_options()
        if select is not None:
            technique = self.table.loc[self.table["variant"] == select, "technique"]
            if len(technique) and technique.iloc[0] not in self.techniques.value:
                self._updating = True
                self.techniques.value = (*self.techniques.value, technique.iloc[0])
                self._updating = False
        self._redraw()
        if select is not None and select in self.variant.options:
            self.variant.value = select

    def _ipython_display_(self):
        display(self.widget)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.4f}" if abs(value) < 10 else f"{value:,.1f}"
    return str(value)


# builder(sparsity, clusters, quantization, on_progress) -> results row
Builder = Callable[..., dict]


def pipeline_builder(sparsity: float, clusters: int, quantization: str, on_progress=None) -> dict:
    """The real builder: the pipeline's recipe with these settings, built, measured, as a row."""
    return pipeline.build_and_measure(pipeline.custom_config(sparsity, clusters, quantization),
                                      on_progress=on_progress)


class BuildPanel:
    """Three settings, one button: build the variant, measure it, add it to the plot."""

    def __init__(self, explorer: Explorer | None = None, builder: Builder = pipeline_builder,
                 path: Path | None = None):
        self.explorer, self.builder, self.path = explorer, builder, results.store_path(path)
        self.cache: dict = {}     # settings -> results row
        self.builds: list = []    # settings actually built, in order
        self.sparsity = w.FloatSlider(value=0.8, min=0.0, max=0.95, step=0.05,
                                      description="sparsity", readout_format=".2f")
        self.clusters = w.Dropdown(options=CLUSTER_CHOICES, value=16, description="clusters")
        self.quantization = w.Dropdown(options=QUANTIZATION, value="pcqat-int8",
                                       description="quantization")
        self.button = w.Button(description="Build and measure", button_style="primary", icon="cogs")
        self.bar = w.FloatProgress(value=0.0, min=0.0, max=1.0, description="idle")
        self.status = w.HTML("<i>choose settings, then build</i>")
        self.button.on_click(self.build)
        help_text = w.HTML("<b>Build your own</b>: one sparsity for conv2 and dense1 of the "
                           "thinned model, a cluster count and a quantization mode; each fine-tune "
                           "is one epoch on 10,000 images. Settings built before are taken from "
                           "the cache.")
        self.widget = w.VBox([help_text, w.HBox([self.sparsity, self.clusters, self.quantization]),
                              w.HBox([self.button, self.bar]), self.status],
                             layout=w.Layout(border="1px solid #ccc", padding="6px"))
        self.widget.add_class("labkit-build-panel")

    def settings(self) -> tuple:
        """(sparsity rounded to 0.01, clusters, quantization): the cache key."""
        return (round(float(self.sparsity.value), 2), int(self.clusters.value),
                str(self.quantization.value))

    def _progress(self, stage: str, fraction: float):
        index = STAGES.index(stage) if stage in STAGES else len(STAGES) - 1
        self.bar.value = min((index + min(max(fraction, 0.0), 1.0)) / len(STAGES), 1.0)
        self.bar.description = stage

    def build(self, _button=None) -> dict | None:
        """Build and measure the current settings once; return their store row (None on failure)."""
        key = self.settings()
        if key in self.cache:
            self.status.value = (f"already built: <b>{html.escape(self.cache[key]['variant'])}</b> "
                                 "(from the cache)")
            if self.explorer is not None:
                self.explorer.reload(select=self.cache[key]["variant"])
            return self.cache[key]
        self.button.disabled = True
        self.bar.value, self.bar.bar_style = 0.0, ""
        self.status.value = f"building sparsity={key[0]}, clusters={key[1]}, {key[2]} ..."
        try:
            row = self.builder(*key, on_progress=self._progress)
        except Exception as error:  # shown in the panel: a click must not lose the message
            self.bar.bar_style = "danger"
            self.status.value = ("<span style='color:#b00'>build failed: "
                                 f"{html.escape(str(error))}</span>")
            return None
        finally:
            self.button.disabled = False
        self.builds.append(key)
        self.cache[key] = row
        results.upsert(row, self.path)
        self.bar.value, self.bar.bar_style, self.bar.description = 1.0, "success", "done"
        self.status.value = (f"built <b>{html.escape(row['variant'])}</b>: accuracy "
                             f"{row['accuracy']:.4f}, p50 "
                             f"{row.get('latency_p50_us', float('nan')):.1f} µs, "
                             f"{row.get('gzip_bytes', 0):,} bytes gzipped")
        if self.explorer is not None:
            self.explorer.reload(select=row["variant"])
        return row

    def _ipython_display_(self):
        display(self.widget)


def explorer_app(path: Path | None = None, builder: Builder = pipeline_builder):
    """The explorer above the build panel, wired together: returns (explorer, panel, box)."""
    explorer = Explorer(path=path)
    panel = BuildPanel(explorer, builder=builder, path=path)
    return explorer, panel, w.VBox([explorer.widget, panel.widget])
