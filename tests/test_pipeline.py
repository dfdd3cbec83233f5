"""labkit.pipeline: settings and names, the tiny pipeline end to end, its
cache, measuring the stages."""
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from labkit import measure, models, pipeline, tflite
from labkit.data import Splits

# ----------------------------------------------------------------------------- settings and names

def test_config_validation_and_stage_settings():
    config = pipeline.PipelineConfig()
    with pytest.raises(ValueError, match="quantization"):
        pipeline.PipelineConfig(quantization="ptq-int8")  # the old word: quantization's is "int8"
    with pytest.raises(ValueError, match="sparsity"):
        pipeline.PipelineConfig(sparsity=(("dense1", 1.2),))
    with pytest.raises(ValueError, match="clusters"):
        pipeline.PipelineConfig(clusters=1)
    with pytest.raises(ValueError, match="conv2_filters"):
        pipeline.PipelineConfig(conv2_filters=100)
    with pytest.raises(ValueError, match="stage"):
        config.stage_settings("distilled")
    other_quantization = replace(config, quantization="int8")
    assert other_quantization.stage_settings("cluster") == config.stage_settings("cluster")
    assert other_quantization.stage_settings("quantize") != config.stage_settings("quantize")
    # PTQ: no training
    assert other_quantization.plan("quantize") is None and config.plan("quantize").epochs == 1
    other_sparsity = replace(config, sparsity=(("dense1", 0.5),))
    assert other_sparsity.stage_settings("thin") == config.stage_settings("thin")
    assert other_sparsity.stage_settings("prune") != config.stage_settings("prune")
    custom = pipeline.custom_config(0.8, 8, "int8")
    # the panel reuses the thinned model
    assert custom.stage_settings("thin") == config.stage_settings("thin")
    assert custom.sparsity_of == {"conv2": 0.8, "dense1": 0.8}


def test_one_vocabulary_for_stages_and_quantization():
    from labkit import quantization
    assert pipeline.STAGES == ("fold", "thin", "prune", "cluster", "quantize")
    names = pipeline.variant_names(pipeline.PipelineConfig())
    assert list(names) == list(pipeline.STAGES)
    assert all(name.startswith(f"pipeline-{stage}") for stage, name in names.items())
    assert names["quantize"].endswith("-k16-pcqat-int8")
    # The final stage's modes are quantization's own words: PTQ modes, and QAT schemes ending in
    # -int8; and "int4-weights", LiteRT's own quantizer (labkit.litert_quant).
    for mode in pipeline.QUANTIZATION:
        assert mode in quantization.MODES \
            or mode.removesuffix("-int8") in quantization.QAT_SCHEMES \
            or mode == "int4-weights", mode


# --------------------------------------------------------------------- the tiny pipeline end to end

@pytest.fixture(scope="module")
def tiny_splits(splits):
    return Splits(splits.x_train[:768], splits.y_train[:768], splits.x_val[:300],
                  splits.y_val[:300], splits.x_test[:300], splits.y_test[:300])


TINY = pipeline.PipelineConfig(conv2_filters=6, dense_units=12, thin_epochs=0,
                               sparsity=(("conv2", 0.5), ("dense1", 0.8)), prune_epochs=1,
                               clusters=4, cluster_epochs=1, qat_epochs=1, batch_size=64)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model, tiny_splits):
    directory = tmp_path_factory.mktemp("pipeline")
    run = pipeline.run_pipeline(TINY, tiny_splits, directory=directory, baseline=tiny_model,
                                progress=False)
    return directory, run


@pytest.fixture(scope="module")
def tiny_baseline_tflite(tmp_path_factory, tiny_model):
    return models.save_tflite(tiny_model,
                              tmp_path_factory.mktemp("baseline") / "tiny_float32.tflite")


def test_every_stage_is_built_in_order(tiny_run):
    _, run = tiny_run
    assert list(run.tflite) == list(pipeline.STAGES)
    assert list(run.models) == list(pipeline.STAGES[:-1])
    assert "bn1" not in [layer.name for layer in run.models["fold"].layers]
    assert run.models["thin"].get_layer("conv2").filters == 6
    assert run.models["thin"].get_layer("dense1").units == 12
    assert all(seconds > 0 for seconds in run.seconds.values())


def test_final_int8_weights_keep_sparsity_and_clusters(tiny_run):
    _, run = tiny_run
    report = pipeline.weight_report(run.tflite["quantize"], TINY.clusters, TINY.sparsity_of)
    assert set(report["dtype"]) == {"int8"}
    for layer in TINY.cluster_layers:
        assert report.loc[layer, "unique_nonzero_max_per_channel"] <= TINY.clusters, report
    # tfmot's QAT scheme quantizes Dense kernels per tensor: the k clusters are k int8 values in the
    # whole layer; Conv2D kernels get one scale per output channel.
    assert report.loc["dense1", "unique_nonzero_layer"] <= TINY.clusters
    assert report.loc["dense1", "scales"] == 1 and report.loc["logits", "scales"] == 1
    assert report.loc["conv2", "scales"] == report.loc["conv2", "channels"] == TINY.conv2_filters
    # The zeros are exactly the pruned model's zeros (Keras stores (in, out), the file (out, in)),
    # in conv2 too, although conv1 before it has none (tfmot shares one quantizer between layers).
    in_file = tflite.weights(run.tflite["quantize"], pipeline.WEIGHT_LAYERS)
    keras_zeros = models.kernel(run.models["prune"], "dense1").T == 0
    np.testing.assert_array_equal(in_file["dense1"]["values"] == 0, keras_zeros)
    assert abs(keras_zeros.mean() - 0.8) < 0.01
    # HWIO -> OHWI
    conv_zeros = models.kernel(run.models["prune"], "conv2").transpose(3, 0, 1, 2) == 0
    np.testing.assert_array_equal(in_file["conv2"]["values"] == 0, conv_zeros)


def test_codebooks_and_folding(tiny_bn_model, tiny_splits):
    """Clustering before folding spreads the codebook; folding first keeps k values in
    the layer; tfmot's cluster_per_channel skips a conv without a bias, and
    per-channel codebooks survive folding."""
    k = 4
    table = pipeline.codebooks_and_folding(tiny_bn_model, tiny_splits, k=k)
    spread = table.loc["cluster per layer, then fold"]
    book = table.loc["fold, then cluster per layer (the book)"]
    assert spread["values_per_channel_max"] <= k < spread["values_in_layer"]
    assert book["values_in_layer"] <= k and book["codebook_floats"] == k
    skipped = table.loc["cluster per channel, then fold"]
    assert not skipped["clustered"] and skipped["relative_error"] == 0.0
    assert skipped["codebook_floats"] == 0
    for recipe in ("zero bias, cluster per channel, then fold", "fold, then cluster per channel"):
        row = table.loc[recipe]
        assert row["clustered"] and row["values_per_channel_max"] <= k
        assert row["codebook_floats"] == 8 * k
    assert table.loc["fold, then cluster per channel", "relative_error"] < book["relative_error"]
    assert table["val_accuracy"].between(0, 1).all()


def test_stages_are_cached_by_their_settings(tiny_run, tiny_model, tiny_splits):
    directory, run = tiny_run
    again = pipeline.run_pipeline(TINY, tiny_splits, directory=directory, baseline=tiny_model,
                                  progress=False)
    assert set(again.seconds.values()) == {0.0} and again.tflite == run.tflite
    seen = []
    ptq = pipeline.run_pipeline(replace(TINY, quantization="int8"), tiny_splits,
                                directory=directory, baseline=tiny_model, progress=False,
                                on_progress=lambda *a: seen.append(a))
    assert ptq.seconds["cluster"] == 0.0 and ptq.seconds["quantize"] > 0.0
    assert ptq.tflite["quantize"] != run.tflite["quantize"]
    assert [stage for stage, _ in seen] == list(pipeline.STAGES)
    # The converter's full-integer PTQ gives every kernel one scale per output
    # channel, Dense included (`weight_report` shows it); tfmot's QAT scheme gives a
    # Dense kernel one scale (test above).
    report = pipeline.weight_report(ptq.tflite["quantize"], TINY.clusters)
    assert (report["scales"] == report["channels"]).all(), report[["op", "scales", "channels"]]
    assert report.loc["dense1", "channels"] == TINY.dense_units


def test_int4_weights_mode_calls_litert_quant_on_the_clustered_file(tiny_run, tiny_model,
                                                                    tiny_splits):
    from labkit import litert_quant
    directory, run = tiny_run
    int4 = pipeline.run_pipeline(replace(TINY, quantization="int4-weights"), tiny_splits,
                                 directory=directory, baseline=tiny_model, progress=False)
    # stages reused
    assert int4.seconds["cluster"] == 0.0 and int4.tflite["cluster"] == run.tflite["cluster"]
    table = litert_quant.weight_table(int4.tflite["quantize"])
    chosen = {row["layer"]: row["int4"] for row in int4.records["quantize"]["int4_layers"]}
    assert chosen and set(chosen) <= set(table.index)
    # int4 where validation accuracy tolerated it, int8 elsewhere
    for layer, in_int4 in chosen.items():
        assert table.loc[layer, "type"] == ("INT4" if in_int4 else "INT8"), (layer, table)
    # its output is the graph's: no rule can name it alone
    assert table.loc["logits", "type"] == "INT8"
    assert 0.1 < int4.val_accuracy["quantize"] <= 1
    # the graph weighs too
    assert int4.tflite["quantize"].stat().st_size < run.tflite["cluster"].stat().st_size / 2


def test_a_different_input_model_gets_its_own_cache_entries(tiny_run, tiny_model, tiny_splits):
    """The bug this redesign fixed: keys named the baseline's settings, so
    another model got a stale entry."""
    directory, run = tiny_run
    other = models.clone_with_weights(tiny_model)
    weights = other.get_weights()
    weights[0] = weights[0] * 1.5  # conv1's kernel
    other.set_weights(weights)
    mine = pipeline.run_pipeline(TINY, tiny_splits, directory=directory, baseline=other,
                                 progress=False, until="thin")
    assert list(mine.tflite) == ["fold", "thin"]
    assert not mine.records["fold"]["cached"] and not mine.records["thin"]["cached"]
    assert mine.records["thin"]["inputs"] != run.records["thin"]["inputs"]
    assert mine.tflite["thin"] != run.tflite["thin"]
    assert not np.allclose(models.kernel(mine.models["thin"], "conv1"),
                           models.kernel(run.models["thin"], "conv1"))
    assert len(list(directory.glob("thin-*.keras"))) == 2


def test_measure_stages_record_and_report(tiny_run, tiny_splits, tiny_baseline_tflite, results_path,
                                          tmp_path):
    _, run = tiny_run
    table, latency = pipeline.measure_stages(run, tiny_splits, tiny_baseline_tflite, repeats=20)
    assert list(table.index) == ["baseline", *pipeline.STAGES]
    assert table.loc["baseline", "gzip_ratio"] == 1.0
    assert table.loc["baseline", "speedup_p50"] == 1.0
    assert set(latency.samples_us) == set(table.index)
    # Folding changes nothing the file computes; a dense tensor stores its
    # zeros: only gzip sees pruning.
    assert table.loc["fold", "accuracy"] == pytest.approx(table.loc["baseline", "accuracy"],
                                                          abs=0.01)
    # the targets read it
    assert table.loc["quantize", "val_accuracy"] == pytest.approx(run.val_accuracy["quantize"])
    assert table.loc["prune", "size_bytes"] == table.loc["thin", "size_bytes"]
    assert table.loc["prune", "gzip_bytes"] < table.loc["thin", "gzip_bytes"]
    # int8 weights
    assert table.loc["quantize", "size_bytes"] < table.loc["cluster", "size_bytes"] / 2
    verdicts = pipeline.targets_met(table).set_index("figure")
    assert list(verdicts.index) == list(pipeline.TARGETS)
    gzip_ratio = table.loc["quantize", "gzip_ratio"]
    assert verdicts.loc["gzip_ratio", "measured"] == pytest.approx(gzip_ratio)
    assert (verdicts["met"] == (verdicts["measured"] >= verdicts["target"])).all()

    names = pipeline.variant_names(TINY)
    stages_csv = tmp_path / "stages.csv"
    store = pipeline.record(table, latency, {"quantize": names["quantize"]}, stages_csv=stages_csv)
    assert list(pd.read_csv(results_path)["variant"]) == [names["quantize"]]
    row = store.set_index("variant").loc[names["quantize"]]
    assert row["latency_p50_us"] == pytest.approx(table.loc["quantize", "latency_p50_us"])
    figure, targets, stages = pipeline.report_figures(store, stages_csv=stages_csv)
    assert figure is not None and list(stages.index) == ["baseline", *pipeline.STAGES]
    assert targets is not None and list(targets["figure"]) == list(pipeline.TARGETS)


def test_build_and_measure_reuses_the_cached_stages(tiny_run, tiny_model, tiny_splits,
                                                    tiny_baseline_tflite):
    directory, run = tiny_run
    seen = []
    row = pipeline.build_and_measure(TINY, tiny_splits, directory=directory, baseline=tiny_model,
                                     baseline_tflite=tiny_baseline_tflite, repeats=10,
                                     on_progress=lambda *a: seen.append(a))
    assert row["variant"] == f"pipeline-custom-{TINY.name()}" and row["technique"] == "pipeline"
    assert 0.0 < row["accuracy"] <= 1.0 and row["latency_p50_us"] > 0
    assert row["gzip_bytes"] == measure.gzip_bytes(run.tflite["quantize"])
    # every stage from the cache: no training
    assert seen == [(stage, 1.0) for stage in pipeline.STAGES]


# ----------------------------------------------------------------------------- reporting, hand-made

def test_report_figures_from_a_hand_made_stage_table(tmp_path):
    table = pd.DataFrame({"accuracy": [0.9916, 0.9908], "val_accuracy": [0.9894, 0.9890],
                          "size_bytes": [1_700_000, 250_000],
                          "gzip_bytes": [1_560_000, 40_000], "latency_p50_us": [150.0, 60.0],
                          "latency_p95_us": [200.0, 90.0], "artifact": ["", ""]},
                         index=pd.Index(["baseline", "quantize"], name="variant"))
    table["gzip_ratio"] = 1_560_000 / table["gzip_bytes"]
    table["speedup_p50"] = 150.0 / table["latency_p50_us"]

    class FakeLatency:
        def p50(self, name):
            return float(table.loc[name, "latency_p50_us"])

        def p95(self, name):
            return float(table.loc[name, "latency_p95_us"])

    stages_csv = tmp_path / "stages.csv"
    store = pipeline.record(table, FakeLatency(), {"quantize": "pipeline-test"},
                            stages_csv=stages_csv, results_path=tmp_path / "measurements.csv")
    assert list(store["variant"]) == ["pipeline-test"] and store["latency_p50_us"].iloc[0] == 60.0
    figure, targets, stages = pipeline.report_figures(store, stages_csv=stages_csv)
    assert figure is not None and len(stages) == 2
    targets = targets.set_index("figure")
    assert targets.loc["gzip_ratio", "measured"] == pytest.approx(39.0)
    assert targets.loc["speedup_p50", "measured"] == pytest.approx(2.5)
    assert targets["met"].all()
    # so the report can round them
    assert targets["measured"].dtype == float and targets["met"].dtype == bool
    missed = pipeline.targets_met(table.assign(val_accuracy=[0.99, 0.95])).set_index("figure")
    assert list(missed["met"]) == [False, True, True]
    assert pipeline.report_figures(store, stages_csv=tmp_path / "missing.csv")[1:] == (None, None)
