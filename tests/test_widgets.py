"""labkit.widgets: drive the explorer and the build panel by setting values and clicking."""
import pandas as pd
import pytest

from labkit import pipeline, results, widgets

ROWS = [
    # variant, technique, accuracy, latency_p50_us, gzip_bytes
    ("baseline-float32-tflite", "baseline", 0.9916, 150.0, 1_560_000),
    ("baseline-keras-call", "baseline", 0.9916, 12_000.0, 4_600_000),
    ("pruning-unstructured-80", "pruning", 0.9910, 150.0, 400_000),
    ("quantization-int8", "quantization", 0.9912, 70.0, 300_000),
    ("quantization-dynamic", "quantization", 0.9905, 90.0, 350_000),
]


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "measurements.csv"
    rows = [{"variant": v, "technique": t, "notebook": "test", "accuracy": a, "latency_p50_us": l,
             "latency_p95_us": 1.5 * l, "gzip_bytes": g, "size_bytes": 2 * g,
             "machine": "test machine"}
            for v, t, a, l, g in ROWS]
    results.upsert(rows, path)
    return path


def plotted_points(explorer) -> int:
    ax = explorer.figure.axes[0]
    return sum(c.get_offsets().shape[0] for c in ax.collections
               if c.get_label() not in ("Pareto frontier",)
               and not c.get_label().startswith("selected"))


def test_explorer_axes_filter_and_details(store):
    explorer = widgets.Explorer(path=store)
    assert set(explorer.techniques.value) == {"baseline", "pruning", "quantization"}
    assert plotted_points(explorer) == len(ROWS)

    explorer.x.value = "gzip_bytes"
    explorer.y.value = "latency_p50_us"
    ax = explorer.figure.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("gzipped size (KiB, log scale)",
                                                  "p50 latency at batch 1 (µs, log scale)")

    explorer.techniques.value = ("quantization",)
    assert set(explorer.visible()["variant"]) == {"quantization-int8", "quantization-dynamic"}
    assert set(explorer.variant.options) == {"quantization-int8", "quantization-dynamic"}
    assert plotted_points(explorer) == 2

    explorer.variant.value = "quantization-dynamic"
    assert "quantization-dynamic" in explorer.details.value
    assert "0.9905" in explorer.details.value
    # quantization-int8 beats it on all three objectives, so it is not on the frontier
    assert "on the Pareto frontier" in explorer.details.value and ": no" in explorer.details.value
    explorer.variant.value = "quantization-int8"
    assert ": yes" in explorer.details.value
    starred = [c for c in explorer.figure.axes[0].collections
               if c.get_label().startswith("selected")]
    assert starred and starred[0].get_label() == "selected: quantization-int8"

    explorer.techniques.value = ()
    assert explorer.variant.value is None and "no variant" in explorer.details.value


def fake_builder(calls):
    def build(sparsity, clusters, quantization, on_progress=None):
        calls.append((sparsity, clusters, quantization))
        for stage in pipeline.STAGES:
            on_progress(stage, 0.5)
            on_progress(stage, 1.0)
        return {"variant": f"pipeline-custom-s{round(100 * sparsity)}-k{clusters}-{quantization}",
                "technique": "pipeline", "notebook": "test", "accuracy": 0.99 - sparsity / 100,
                "latency_p50_us": 60.0, "latency_p95_us": 80.0,
                "gzip_bytes": int(100_000 * (1 - sparsity)), "size_bytes": 250_000}
    return build


def test_build_panel_builds_once_per_setting_and_adds_to_the_plot(store):
    explorer = widgets.Explorer(path=store)
    calls = []
    panel = widgets.BuildPanel(explorer, builder=fake_builder(calls), path=store)
    panel.sparsity.value, panel.clusters.value, panel.quantization.value = 0.9, 8, "int8"
    panel.button.click()
    assert calls == [(0.9, 8, "int8")]
    assert panel.bar.value == pytest.approx(1.0) and panel.bar.bar_style == "success"
    name = "pipeline-custom-s90-k8-int8"
    assert name in set(results.load(store)["variant"])
    assert "pipeline" in explorer.techniques.value and explorer.variant.value == name
    assert plotted_points(explorer) == len(ROWS) + 1

    panel.button.click()  # same settings: taken from the cache, not rebuilt
    assert calls == [(0.9, 8, "int8")] and "already built" in panel.status.value

    panel.clusters.value = 16
    panel.button.click()
    panel.clusters.value = 8
    panel.button.click()
    assert calls == [(0.9, 8, "int8"), (0.9, 16, "int8")]
    assert panel.builds == calls
    assert len(results.load(store)) == len(ROWS) + 2


def test_build_panel_reports_progress_in_stage_order(store):
    seen = []
    panel = widgets.BuildPanel(builder=fake_builder([]), path=store)
    panel.bar.observe(lambda change: seen.append(change["new"]), names="value")
    panel.build()
    assert seen == sorted(seen) and seen[-1] == pytest.approx(1.0)
    assert pytest.approx(0.5 / len(pipeline.STAGES)) in seen  # half of the first stage (fold)
    assert widgets.STAGES is pipeline.STAGES  # one vocabulary: the pipeline's stages and modes
    assert panel.quantization.options == pipeline.QUANTIZATION


def test_build_panel_shows_errors_and_stays_usable(store):
    def failing(sparsity, clusters, quantization, on_progress=None):
        raise ValueError("sparsity must be between 0 and 0.97")
    panel = widgets.BuildPanel(builder=failing, path=store)
    assert panel.build() is None
    assert "build failed" in panel.status.value and "0.97" in panel.status.value
    assert not panel.button.disabled and panel.bar.bar_style == "danger"
    assert panel.cache == {} and len(results.load(store)) == len(ROWS)


def test_explorer_app_wires_explorer_and_panel(store):
    explorer, panel, box = widgets.explorer_app(path=store, builder=fake_builder([]))
    assert panel.explorer is explorer and box.children == (explorer.widget, panel.widget)
    panel.build()
    assert any(v.startswith("pipeline-custom") for v in explorer.variant.options)


def test_real_builder_rejects_bad_settings():
    with pytest.raises(ValueError, match="sparsity"):
        widgets.pipeline_builder(1.5, 16, "pcqat-int8")
    with pytest.raises(ValueError, match="quantization"):
        widgets.pipeline_builder(0.5, 16, "int3")


def test_empty_store(tmp_path):
    explorer = widgets.Explorer(path=tmp_path / "none.csv")
    assert explorer.variant.value is None and explorer.figure is not None
    assert isinstance(explorer.visible(), pd.DataFrame)
