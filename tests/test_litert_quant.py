"""labkit.litert_quant: ai-edge-quantizer's recipes on tiny models, the int4 file read back, bad
input."""
import numpy as np
import pytest

from labkit import litert_quant as lq
from labkit import measure, models, tflite


@pytest.fixture(scope="module")
def tiny_tflite(tmp_path_factory, tiny_model):
    return models.save_tflite(tiny_model, tmp_path_factory.mktemp("lq") / "tiny.tflite")


@pytest.fixture(scope="module")
def tiny_int4(tmp_path_factory, tiny_tflite):
    return lq.quantize(tiny_tflite, "weight-int4", directory=tmp_path_factory.mktemp("lq-out"))


def test_every_book_recipe_quantizes_a_tiny_model(tmp_path, tiny_tflite, splits, images):
    float_out = measure.litert(tiny_tflite)(images)
    # blocks of 32 do not divide 392 inputs: see test_blockwise_int4_has_one_scale_per_block
    for name in set(lq.RECIPES) - {"dynamic-int4-block32"}:
        path = lq.quantize(tiny_tflite, name, splits.x_train[:20], directory=tmp_path)
        assert path.suffix == ".tflite" and path.parent == tmp_path
        out = measure.litert(path)(images)
        assert out.shape == float_out.shape
        assert np.mean(np.argmax(out, 1) == np.argmax(float_out, 1)) >= 0.8, name
    # cached: the same recipe on the same bytes is the same file, not rebuilt
    again = lq.quantize(tiny_tflite, "weight-int4", directory=tmp_path)
    assert again == lq.quantize(tiny_tflite, lq.RECIPES["weight-int4"], directory=tmp_path)


def test_int4_tensors_are_really_int4_in_the_file(tiny_int4):
    table = lq.weight_table(tiny_int4)
    assert set(table["type"]) == {"INT4"}
    assert (table["stored_bytes"] == np.ceil(table["weights"] / 2)).all()   # two codes to a byte
    assert (table["max_codes_per_scale"] <= 16).all()
    assert table["code_min"].min() >= -8 and table["code_max"].max() <= 7
    assert table["dequantized_at_run_time"].all()
    # the interpreter would say int8 and one byte per weight: the file says otherwise
    stored = tflite.stored_tensors(tiny_int4)
    assert (stored["type"] == "INT4").sum() == len(table)


def test_int4_scales_and_codes_match_the_hand_written_symmetric_quantizer(tiny_tflite, tiny_int4):
    check = lq.check_against_quantizers(tiny_tflite, tiny_int4)
    assert len(check) == 4
    assert check["max_scale_difference"].max() <= 1e-7
    assert check["codes_differing"].sum() == 0


def test_blockwise_int4_has_one_scale_per_block(tmp_path, tiny_tflite):
    with pytest.raises(ValueError, match="32-weight blocks must divide each input dimension.*392"):
        lq.quantize(tiny_tflite, "dynamic-int4-block32", directory=tmp_path)   # 7 * 7 * 8 inputs
    # 1568 inputs
    wide = models.save_tflite(models.build_cnn((4, 32), 32, name="wide"),
                              tmp_path / "wide.tflite")
    table = lq.weight_table(lq.quantize(wide, "dynamic-int4-block32", directory=tmp_path))
    assert table.loc["dense1", "type"] == "INT4" and table.loc["dense1", "block_size"] == 32
    assert table.loc["dense1", "scales"] == table.loc["dense1", "weights"] // 32
    assert table.loc["dense1", "max_codes_per_scale"] <= 16
    assert table.loc["conv2", "type"] == "INT8"   # blockwise scales are for fully connected only


def test_op_precisions_say_what_computes_in_integers(tmp_path, tiny_tflite, splits):
    static = lq.op_precisions(lq.quantize(tiny_tflite, "static-int8", splits.x_train[:20],
                                          directory=tmp_path))
    weights = static[static["op"].isin(tflite.WEIGHT_OPS)]
    assert (weights["computes_in"] == "integer").all()
    dynamic = lq.op_precisions(lq.quantize(tiny_tflite, "dynamic-int8", directory=tmp_path))
    computes = dynamic[dynamic["op"].isin(tflite.WEIGHT_OPS)]["computes_in"]
    assert computes.str.startswith("hybrid").all()


def test_xnnpack_takes_int8_dequantize_but_leaves_int4_to_builtin_kernels(tmp_path, tiny_tflite,
                                                                          tiny_int4):
    """LiteRT 2.3: XNNPACK takes a weight-only int8 file whole; an int4 file's DEQUANTIZE ops stay
    outside, and so do the convolutions and matrix multiplies that read them (op_precisions)."""
    assert set(lq.op_precisions(tiny_tflite)["runs_on"]) == {"XNNPACK"}
    int8 = lq.op_precisions(lq.quantize(tiny_tflite, "weight-int8", directory=tmp_path))
    assert (int8["runs_on"] == "XNNPACK").all()
    int4 = lq.op_precisions(tiny_int4)
    outside = int4[int4["runs_on"] == "built-in kernel"]
    assert set(outside["op"]) == {"DEQUANTIZE", *tflite.WEIGHT_OPS} & set(int4["op"])
    assert set(int4.loc[int4["op"] == "MAX_POOL_2D", "runs_on"]) == {"XNNPACK"}
    assert not lq.xnnpack_ops(tiny_int4) & set(outside.index)


def test_validation_reports_worst_layer_matches_the_sensitivity(tmp_path, tiny_tflite, tiny_int4,
                                                                splits):
    report = lq.validation_report(tiny_tflite, tiny_int4, splits.x_val[:20])
    assert {"input", "output", "constant", "intermediate"} <= set(report["kind"])
    assert report["snr_db"].is_monotonic_increasing
    _, sensitivity = lq.tolerant_recipe(tiny_tflite, splits.x_val[:500], splits.y_val[:500],
                                        directory=tmp_path)
    assert lq.worst_layer(report) == sensitivity["output_snr_db"].idxmin()


def test_tolerant_recipe_keeps_fragile_layers_out_of_int4(tmp_path, tiny_tflite, splits):
    recipe, table = lq.tolerant_recipe(tiny_tflite, splits.x_val[:500], splits.y_val[:500],
                                       max_drop=-1.0, directory=tmp_path)
    assert not table["int4"].any() and recipe.name == "int4-none"   # nothing gains accuracy in int4
    recipe, table = lq.tolerant_recipe(tiny_tflite, splits.x_val[:500], splits.y_val[:500],
                                       max_drop=1.0, directory=tmp_path)
    assert table["int4"].all()
    types = lq.weight_table(lq.quantize(tiny_tflite, recipe, directory=tmp_path))["type"]
    assert {types[layer] for layer in table.index} == {"INT4"}


def test_bad_bits_and_granularities_are_refused_with_what_is_supported():
    with pytest.raises(ValueError,
                       match="no 3-bit weight-only weights; weight-only supports \\[4, 8\\] bits"):
        lq.Rule(bits=3)
    with pytest.raises(ValueError, match="no 2-bit weight-only"):
        lq.Rule(mode="weight-only", bits=2)           # the tool would skip it without a word
    with pytest.raises(ValueError, match="blockwise scales need the dynamic mode"):
        lq.Rule(mode="weight-only", bits=4, granularity="block32")
    with pytest.raises(ValueError, match="apply to \\('FULLY_CONNECTED',\\) only"):
        lq.Rule(op="CONV_2D", mode="dynamic", bits=4, granularity="block32")
    with pytest.raises(ValueError, match="mode must be one of"):
        lq.Rule(mode="int4")
    with pytest.raises(ValueError, match="needs at least one Rule"):
        lq.Recipe("empty", ())


def test_a_recipe_that_names_no_op_is_refused(tmp_path, tiny_tflite):
    recipe = lq.Recipe("typo", (lq.Rule("desne1", "*", "weight-only", 4),))
    with pytest.raises(ValueError,
                       match="names no op of tiny.tflite. Its weight ops are: .*CONV_2D"):
        lq.quantize(tiny_tflite, recipe, directory=tmp_path)
    with pytest.raises(ValueError, match="names no op"):
        lq.apply(tiny_tflite, lq.Recipe("no-such-op", (lq.Rule(op="DEPTHWISE_CONV_2D", bits=8),)))
    with pytest.raises(ValueError, match="recipe must be a Recipe or one of"):
        lq.quantize(tiny_tflite, "int4", directory=tmp_path)


def test_a_path_that_is_not_a_tflite_is_refused(tmp_path):
    keras_file = tmp_path / "model.keras"
    keras_file.write_bytes(b"PK\x03\x04 not a flatbuffer")
    with pytest.raises(ValueError, match="is not a TFLite model"):
        lq.quantize(keras_file, "weight-int4", directory=tmp_path)
    with pytest.raises(FileNotFoundError, match="No .tflite file"):
        lq.apply(tmp_path / "missing.tflite", lq.RECIPES["weight-int4"])


def test_static_recipe_without_calibration_is_refused(tiny_tflite):
    with pytest.raises(ValueError, match="pass calibration images"):
        lq.apply(tiny_tflite, lq.RECIPES["static-int8"])


def test_structure_bytes_is_what_remains_without_the_weights(tiny_int4):
    parts = tflite.structure_bytes(tiny_int4)
    assert 0 < parts["structure_gzip_bytes"] <= parts["structure_bytes"] < parts["file_bytes"]
    assert parts["data_bytes"] >= lq.weight_table(tiny_int4)["stored_bytes"].sum()
