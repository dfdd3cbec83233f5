"""results.pareto_front and plots.pareto_plot (moved from labkit.pipeline): hand-made tables,
brute force."""
import numpy as np
import pandas as pd
import pytest

from labkit import plots, results


def _table(rows):
    return pd.DataFrame(rows, columns=["variant", "accuracy", "latency_p50_us", "gzip_bytes"])


def test_pareto_front_on_a_hand_made_table():
    table = _table([
        ("fast-small", 0.990, 100.0, 1000),
        ("dominated", 0.980, 200.0, 2000),   # worse than fast-small on all three
        ("accurate", 0.995, 300.0, 5000),    # best accuracy: on the front
        ("tiny", 0.970, 400.0, 200),         # smallest: on the front
        ("half-dominated", 0.990, 100.0, 1500),  # equal on two, worse on size: dominated
        ("unmeasured", 0.999, np.nan, 100),  # cannot be compared
    ])
    front = results.pareto_front(table)
    assert list(table.loc[front, "variant"]) == ["fast-small", "accurate", "tiny"]


def test_pareto_front_keeps_exact_ties_and_checks_arguments():
    table = _table([("a", 0.99, 100.0, 10), ("b", 0.99, 100.0, 10), ("c", 0.98, 100.0, 10)])
    assert list(results.pareto_front(table)) == [True, True, False]
    with pytest.raises(ValueError, match="sense"):
        results.pareto_front(table, objectives=(("accuracy", "up"),))
    with pytest.raises(ValueError, match="column"):
        results.pareto_front(table, objectives=(("speed", "max"),))


def test_pareto_front_matches_brute_force():
    rng = np.random.default_rng(3)
    table = _table([(f"v{i}", rng.choice([0.97, 0.98, 0.99]), rng.choice([50.0, 100.0, 200.0]),
                     rng.choice([10, 20, 30])) for i in range(60)])

    def dominates(a, b):
        better_or_equal = (a.accuracy >= b.accuracy and a.latency_p50_us <= b.latency_p50_us
                           and a.gzip_bytes <= b.gzip_bytes)
        strictly = (a.accuracy > b.accuracy or a.latency_p50_us < b.latency_p50_us
                    or a.gzip_bytes < b.gzip_bytes)
        return better_or_equal and strictly

    rows = list(table.itertuples())
    expected = [not any(dominates(other, row) for other in rows) for row in rows]
    front = results.pareto_front(table)
    assert list(front) == expected
    assert 0 < front.sum() < len(table)


def test_pareto_plot_rings_the_front():
    table = _table([("fast", 0.99, 100.0, 1000), ("slow", 0.98, 200.0, 2000),
                    ("bad", 0.90, 300.0, 3000)])
    table["technique"] = ["pruning", "quantization", "pruning"]
    fig = plots.pareto_plot(table, ylim=(0.95, 1.0))
    ringed = [c for c in fig.axes[0].collections if c.get_label() == "Pareto frontier"]
    assert len(ringed) == 1 and ringed[0].get_offsets().shape[0] == 1
    assert fig.axes[0].get_xscale() == "log"
    assert "1 outside this view" in fig.axes[0].get_title()


def test_frontier_remeasures_every_file_on_validation_and_names_missing_notebooks(
        tmp_path, monkeypatch, tiny_model, tiny_plain_model, splits):
    """bench.frontier: one row per file (the baseline's name where it is among the file's variants),
    validation accuracy, latencies from one run; notes name the notebook to run first."""
    from labkit import bench, measure, models
    from labkit.data import Splits
    models.save_tflite(tiny_model, tmp_path / "a.tflite")
    models.save_tflite(tiny_plain_model, tmp_path / "b.tflite")
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    small = Splits(splits.x_train[:10], splits.y_train[:10], splits.x_val[:200], splits.y_val[:200],
                   splits.x_test[:10], splits.y_test[:10])
    rows = [("runtime-litert", "runtime", "05_graph", "a.tflite"),
            (results.BASELINE_VARIANT, "baseline", "01_baseline", "a.tflite"),
            ("plain", "pruning", "02_pruning", "b.tflite"),
            ("gone", "clustering", "03_clustering", "gone.tflite")]
    store = pd.DataFrame([{"variant": v, "technique": t, "notebook": n, "artifact": a,
                           "size_bytes": 100,
                           "gzip_bytes": 80 + i} for i, (v, t, n, a) in enumerate(rows)])
    table, notes = bench.frontier(small, store, repeats=5, warmup=1)
    assert list(table["variant"]) == [results.BASELINE_VARIANT, "plain"]
    assert table.loc[0, "shared_with"] == "runtime-litert"
    assert table.loc[0, "technique"] == "baseline"
    expected = np.mean(np.argmax(measure.litert(tmp_path / "a.tflite")(small.x_val),
                                 axis=1) == small.y_val)
    assert table.loc[0, "accuracy"] == pytest.approx(expected)    # validation, not test
    assert (table["latency_p50_us"] > 0).all() and table["pareto"].dtype == bool
    assert any("gone.tflite" in note and "03_clustering" in note for note in notes)
    assert any("run 04_quantization.ipynb first" in note for note in notes)
    assert not any("02_pruning.ipynb first" in note for note in notes)
    assert bench.missing_notebooks(store, ("01_baseline", "09_serving")) == ["09_serving"]
