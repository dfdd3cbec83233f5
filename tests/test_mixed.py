"""labkit.mixed: which precision each layer of a converted file ends up in, the debugger's denylist
trap (Keras names are ignored, node names work), a mixed model, the sensitivity table and the rule
that picks fragile layers (tiny model, seconds)."""
import numpy as np
import pandas as pd
import pytest

from labkit import measure, mixed, models, quantization, tflite


def test_op_precisions_per_mode(tiny_model, splits, tmp_path):
    layers = models.weight_layers(tiny_model)
    expected = {"float32": "float32", "float16": "float16", "dynamic": "int8", "int8": "int8"}
    for mode, dtype in expected.items():
        calibration = splits.x_train[:50] if mode == "int8" else None
        path = models.save_tflite(quantization.converter(tiny_model, mode, calibration),
                                  tmp_path / f"{mode}.tflite")
        precisions = mixed.op_precisions(path, layers)
        assert sorted(precisions.index) == sorted(layers)
        # dynamic range leaves tiny kernels (conv1 has 36 weights) in float: check the large ones
        big = ["dense1"] if mode == "dynamic" else layers
        assert set(precisions.loc[big, "weights"]) == {dtype}, (mode, precisions)
        inputs = {"int8"} if mode == "int8" else {"float32"}
        assert set(precisions["input"]) == inputs, (mode, precisions)


def test_denylist_trap_and_mixed_model(tiny_model, splits, tmp_path):
    layers = models.weight_layers(tiny_model)
    calibration = splits.x_train[:50]
    debug, stats = mixed.debugger(tiny_model, calibration)
    assert set(stats["layer"]) - {""} == set(layers)
    assert (stats.loc[stats["layer"] != "", "rmse_in_steps"] > 0).all()
    # the trap: a Keras name is not a node name, and the denylist ignores it silently
    naive = models.save_tflite(mixed.denylist(debug, ["logits"]), tmp_path / "naive.tflite")
    assert set(mixed.op_precisions(naive, layers)["weights"]) == {"int8"}
    path = mixed.mixed_tflite(tiny_model, calibration, ["conv1", "logits"],
                              tmp_path / "mixed.tflite")
    precisions = mixed.op_precisions(path, layers)
    assert precisions.loc[["conv1", "logits"], "weights"].tolist() == ["float32", "float32"]
    assert precisions.loc[["conv2", "dense1"], "weights"].tolist() == ["int8", "int8"]
    assert tflite.io_dtypes(path) == (np.float32, np.float32)   # a float first layer takes floats
    # the mixed model still computes the same function, within int8 error
    ref = tiny_model.predict(splits.x_val[:200], verbose=0).argmax(1)
    agree = np.mean(measure.litert(path)(splits.x_val[:200]).argmax(1) == ref)
    assert agree > 0.9, agree
    with pytest.raises(ValueError, match="no conv or fully-connected op"):
        mixed.nodes_of(stats, ["dense9"])


def test_sensitivity_table(tiny_model, splits, tmp_path):
    x, y = splits.x_val[:300], splits.y_val[:300]
    table = mixed.sensitivity(tiny_model, splits.x_train[:50], x, y, tmp_path, progress=False)
    assert list(table.index) == models.weight_layers(tiny_model)
    assert table.loc["dense1", "weights"] == 392 * 16
    all_int8 = np.mean(np.argmax(measure.litert(tmp_path / "all-int8.tflite")(x), axis=1) == y)
    assert table.attrs["all_int8_val_accuracy"] == all_int8
    np.testing.assert_allclose(table["gain"], table["val_accuracy"] - all_int8)
    for layer in table.index:   # each file keeps exactly its one layer in float
        precisions = mixed.op_precisions(tmp_path / f"float-{layer}.tflite", table.index)
        assert list(precisions.index[precisions["weights"] == "float32"]) == [layer]


def test_fragile_layers_rule():
    table = pd.DataFrame({"gain": [0.0, 0.002, 0.002, -0.001],
                          "rmse_in_steps": [0.5, 0.3, 0.4, 0.9]}, index=["a", "b", "c", "d"])
    assert mixed.fragile_layers(table, 2) == ["c", "b"]   # gains first, error breaks the tie
    assert mixed.fragile_layers(table, 1) == ["c"]
    no_gain = table.assign(gain=0.0)
    assert mixed.fragile_layers(no_gain) == ["d"]          # nothing gains: the largest error
    with pytest.raises(ValueError, match="max_layers"):
        mixed.fragile_layers(table, 0)
