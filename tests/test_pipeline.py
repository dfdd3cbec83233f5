"""labkit.pipeline: folding, thinning, masks against tfmot, the tiny end-to-end pipeline, Pareto."""
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import tf_keras as keras

from labkit import models, pipeline
from labkit.data import Splits


# ----------------------------------------------------------------------------- fold and thin

@pytest.fixture(scope="module")
def tiny_with_batchnorm(tiny_model):
    """The tiny baseline with random batch-norm statistics, so that folding has work to do."""
    model = models.clone_with_weights(tiny_model)
    rng = np.random.default_rng(0)
    for name in ("bn1", "bn2"):
        bn = model.get_layer(name)
        n = bn.get_weights()[0].shape[0]
        bn.set_weights([rng.uniform(0.5, 2.0, n), rng.normal(0, 0.3, n), rng.normal(0, 0.3, n),
                        rng.uniform(0.2, 3.0, n)])
    return model


def test_fold_batchnorm_gives_the_same_logits(tiny_with_batchnorm, images):
    folded = pipeline.fold_batchnorm(tiny_with_batchnorm)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in folded.layers)
    expected = tiny_with_batchnorm(images, training=False).numpy()
    np.testing.assert_allclose(folded(images, training=False).numpy(), expected, atol=1e-4, rtol=1e-4)


def test_thin_keeping_everything_is_the_identity(tiny_with_batchnorm, images):
    folded = pipeline.fold_batchnorm(tiny_with_batchnorm)
    same = pipeline.thin(folded, folded.get_layer("conv2").filters, folded.get_layer("dense1").units)
    np.testing.assert_allclose(same(images).numpy(), folded(images).numpy(), atol=1e-5)


def test_thin_keeps_the_strongest_filters(tiny_with_batchnorm):
    folded = pipeline.fold_batchnorm(tiny_with_batchnorm)
    kernel = folded.get_layer("conv2").get_weights()[0]
    w1 = folded.get_layer("dense1").get_weights()[0]
    channels = kernel.shape[-1]
    # Independent computation with loops: score of filter c = sum|kernel[..., c]| * ||rows of dense1 fed by c||.
    scores = []
    for c in range(channels):
        rows = [w1[i] for i in range(w1.shape[0]) if i % channels == c]
        scores.append(np.abs(kernel[..., c]).sum() * np.sqrt(sum(float(r @ r) for r in rows)))
    best = sorted(np.argsort(scores)[::-1][:3])
    thin = pipeline.thin(folded, 3, 10)
    np.testing.assert_array_equal(thin.get_layer("conv2").get_weights()[0], kernel[..., best])
    assert thin.get_layer("dense1").get_weights()[0].shape == (7 * 7 * 3, 10)
    assert thin.get_layer("logits").get_weights()[0].shape == (10, 10)


# ----------------------------------------------------------------------------- masks

@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.93])
def test_magnitude_mask_matches_tfmot(sparsity):
    import tensorflow_model_optimization as tfmot
    rng = np.random.default_rng(1)
    kernel = rng.normal(size=(40, 24)).astype(np.float32)
    dense = keras.layers.Dense(24, use_bias=False, input_shape=(40,))
    schedule = tfmot.sparsity.keras.ConstantSparsity(sparsity, begin_step=0, frequency=1)
    model = keras.Sequential([tfmot.sparsity.keras.prune_low_magnitude(dense, pruning_schedule=schedule)])
    model.build((None, 40))
    dense.set_weights([kernel])
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")  # rate 0: only the mask changes
    model.fit(np.zeros((1, 40), np.float32), np.zeros((1, 24), np.float32), epochs=1, verbose=0,
              callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
    tfmot_kernel = tfmot.sparsity.keras.strip_pruning(model).layers[0].get_weights()[0]
    mask = pipeline.magnitude_mask(kernel, sparsity)
    np.testing.assert_array_equal(tfmot_kernel != 0, mask != 0)
    assert abs((mask == 0).mean() - sparsity) < 1.5 / kernel.size
    with pytest.raises(ValueError, match="sparsity"):
        pipeline.magnitude_mask(kernel, 1.0)


def test_sensitivity_table_shape(tiny_model, splits):
    folded = pipeline.thin(pipeline.fold_batchnorm(tiny_model), 8, 16)
    table = pipeline.sensitivity(folded, splits.x_val[:300], splits.y_val[:300], layers=("dense1",),
                                 sparsities=(0.5, 0.99))
    assert list(table["layer"]) == ["(none)", "dense1", "dense1"]
    assert table["drop"].iloc[0] == 0.0


# ----------------------------------------------------------------------------- settings

def test_config_validation_and_stage_keys():
    config = pipeline.PipelineConfig()
    with pytest.raises(ValueError, match="quantization"):
        pipeline.PipelineConfig(quantization="int4")
    with pytest.raises(ValueError, match="sparsity"):
        pipeline.PipelineConfig(sparsity=(("dense1", 1.2),))
    with pytest.raises(ValueError, match="clusters"):
        pipeline.PipelineConfig(clusters=1)
    with pytest.raises(ValueError, match="conv2_filters"):
        pipeline.PipelineConfig(conv2_filters=100)
    other_quantization = replace(config, quantization="ptq-int8")
    assert other_quantization.stage_key("clustered") == config.stage_key("clustered")
    assert other_quantization.stage_key("final") != config.stage_key("final")
    other_sparsity = replace(config, sparsity=(("dense1", 0.5),))
    assert other_sparsity.stage_key("thin") == config.stage_key("thin")
    assert other_sparsity.stage_key("pruned") != config.stage_key("pruned")
    custom = pipeline.custom_config(0.8, 8, "ptq-int8")
    assert custom.stage_key("thin") == config.stage_key("thin")  # the panel reuses the thinned model
    assert custom.sparsity_of == {"conv2": 0.8, "dense1": 0.8}
    with pytest.raises(ValueError, match="stage"):
        config.stage_key("distilled")


# ----------------------------------------------------------------------------- the tiny pipeline end to end

@pytest.fixture(scope="module")
def tiny_splits(splits):
    return Splits(splits.x_train[:768], splits.y_train[:768], splits.x_val[:300], splits.y_val[:300],
                  splits.x_test[:300], splits.y_test[:300])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model, tiny_splits):
    config = pipeline.PipelineConfig(conv2_filters=6, dense_units=12, thin_epochs=0,
                                     sparsity=(("conv2", 0.5), ("dense1", 0.8)), prune_epochs=1,
                                     clusters=4, cluster_epochs=1, qat_epochs=1, batch_size=64)
    directory = tmp_path_factory.mktemp("pipeline")
    run = pipeline.run_pipeline(config, tiny_splits, directory=directory, baseline=tiny_model, progress=False)
    return config, directory, run


def test_final_int8_weights_keep_sparsity_and_clusters(tiny_run):
    config, directory, run = tiny_run
    report = pipeline.weight_report(run.tflite["final"], config.clusters, config.sparsity_of)
    assert set(report["dtype"]) == {"int8"}
    for layer in config.cluster_layers:
        assert report.loc[layer, "unique_nonzero_max_per_channel"] <= config.clusters, report
    # Dense kernels are quantized per tensor: the k clusters are k int8 values in the whole layer.
    assert report.loc["dense1", "unique_nonzero_layer"] <= config.clusters
    # The zeros are exactly the pruned model's zeros (Keras stores (in, out), the file (out, in)).
    pruned = keras.models.load_model(directory / f"pruned-{config.stage_key('pruned')}.keras")
    keras_zeros = pruned.get_layer("dense1").get_weights()[0].T == 0
    file_zeros = pipeline.tflite_weights(run.tflite["final"])["dense1"]["values"] == 0
    np.testing.assert_array_equal(file_zeros, keras_zeros)
    assert abs(keras_zeros.mean() - 0.8) < 0.01


def test_stages_are_cached_by_settings(tiny_run, tiny_model, tiny_splits):
    config, directory, run = tiny_run
    again = pipeline.run_pipeline(config, tiny_splits, directory=directory, baseline=tiny_model, progress=False)
    assert set(again.seconds.values()) == {0.0} and again.tflite == run.tflite
    seen = []
    ptq = pipeline.run_pipeline(replace(config, quantization="ptq-int8"), tiny_splits, directory=directory,
                                baseline=tiny_model, progress=False, on_progress=lambda *a: seen.append(a))
    assert ptq.seconds["clustered"] == 0.0 and ptq.seconds["final"] > 0.0
    assert ptq.tflite["final"] != run.tflite["final"]
    assert [stage for stage, _ in seen] == ["thin", "prune", "cluster", "quantize"]


# ----------------------------------------------------------------------------- Pareto

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
    front = pipeline.pareto_front(table)
    assert list(table.loc[front, "variant"]) == ["fast-small", "accurate", "tiny"]


def test_pareto_front_keeps_exact_ties_and_checks_arguments():
    table = _table([("a", 0.99, 100.0, 10), ("b", 0.99, 100.0, 10), ("c", 0.98, 100.0, 10)])
    assert list(pipeline.pareto_front(table)) == [True, True, False]
    with pytest.raises(ValueError, match="sense"):
        pipeline.pareto_front(table, objectives=(("accuracy", "up"),))
    with pytest.raises(ValueError, match="column"):
        pipeline.pareto_front(table, objectives=(("speed", "max"),))


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
    assert list(pipeline.pareto_front(table)) == expected
    front = table[pipeline.pareto_front(table)]
    assert 0 < len(front) < len(table)


def test_pareto_plot_rings_the_front():
    table = _table([("fast", 0.99, 100.0, 1000), ("slow", 0.98, 200.0, 2000), ("bad", 0.90, 300.0, 3000)])
    table["technique"] = ["pruning", "quantization", "pruning"]
    fig = pipeline.pareto_plot(table, ylim=(0.95, 1.0))
    ringed = [c for c in fig.axes[0].collections if c.get_label() == "Pareto frontier"]
    assert len(ringed) == 1 and ringed[0].get_offsets().shape[0] == 1
    assert fig.axes[0].get_xscale() == "log"
    assert "1 outside this view" in fig.axes[0].get_title()


def test_record_and_report_figures(tmp_path):
    S = pipeline.STAGE_LABELS
    table = pd.DataFrame({"test_accuracy": [0.9916, 0.9908], "size_bytes": [1_700_000, 250_000],
                          "gzip_bytes": [1_560_000, 40_000], "latency_p50_us": [150.0, 60.0],
                          "latency_p95_us": [200.0, 90.0], "artifact": ["", ""]},
                         index=pd.Index([S["baseline"], S["final"]], name="stage"))
    table["gzip_ratio"] = 1_560_000 / table["gzip_bytes"]
    table["speedup_p50"] = 150.0 / table["latency_p50_us"]

    class FakeLatency:
        def p50(self, name):
            return float(table.loc[name, "latency_p50_us"])

        def p95(self, name):
            return float(table.loc[name, "latency_p95_us"])

    stages_csv = tmp_path / "stages.csv"
    store = pipeline.record(table, FakeLatency(), {S["final"]: "pipeline-test"}, stages_csv=stages_csv,
                            results_path=tmp_path / "measurements.csv")
    assert list(store["variant"]) == ["pipeline-test"] and store["latency_p50_us"].iloc[0] == 60.0
    figure, targets, stages = pipeline.report_figures(store, stages_csv=stages_csv)
    assert figure is not None and len(stages) == 2
    targets = targets.set_index("figure")
    assert targets.loc["min_gzip_ratio", "measured"] == pytest.approx(39.0)
    assert targets.loc["min_speedup_p50", "measured"] == pytest.approx(2.5)
    assert targets["met"].all()
    assert targets["measured"].dtype == float and targets["met"].dtype == bool  # so the report can round them
    assert pipeline.report_figures(store, stages_csv=tmp_path / "missing.csv")[1:] == (None, None)
