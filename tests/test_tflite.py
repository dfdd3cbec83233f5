"""labkit.tflite: the one reader of .tflite files."""
import numpy as np
import pytest
import tensorflow as tf

from labkit import models, tflite


@pytest.fixture(scope="module")
def files(tiny_plain_model, splits, tmp_path_factory):
    directory = tmp_path_factory.mktemp("tflite")
    float_path = models.save_tflite(tiny_plain_model, directory / "float.tflite")
    converter = tf.lite.TFLiteConverter.from_keras_model(tiny_plain_model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    calibration = splits.x_train[:50]
    converter.representative_dataset = lambda: ([image[None]] for image in calibration)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = converter.inference_output_type = tf.int8
    return {"float": float_path, "int8": models.save_tflite(converter, directory / "int8.tflite")}


def test_check_says_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="No .tflite file"):
        tflite.check(tmp_path / "missing.tflite")
    garbage = tmp_path / "garbage.tflite"
    garbage.write_bytes(b"not a model at all")
    with pytest.raises(ValueError, match="TFL3"):
        tflite.check(garbage)
    with pytest.raises(ValueError, match="directory"):
        tflite.check(tmp_path)


def test_layer_of_is_one_rule():
    name = "baseline_cnn/conv2/Conv2D;baseline_cnn/bn2/FusedBatchNormV3"
    assert tflite.layer_of(name, ["conv1", "conv2"]) == "conv2"
    assert tflite.layer_of("cnn/dense1_a/MatMul", ["dense1", "dense1_a"]) == "dense1_a"
    assert tflite.layer_of("cnn/dense10/MatMul", ["dense1"]) is None   # no substring matches


def test_ops_io_and_weights_of_float_and_int8(files, tiny_plain_model):
    ops = tflite.ops(files["float"])
    assert list(ops["op"]).count("CONV_2D") == 2 and list(ops["op"]).count("FULLY_CONNECTED") == 2
    assert set(ops.loc[ops["op"] == "CONV_2D", "fused_activation"]) == {"RELU"}
    assert tflite.op_names(files["float"]) == list(ops["op"])
    assert tflite.io_dtypes(files["float"]) == (np.float32, np.float32)
    assert tflite.io_dtypes(files["int8"]) == (np.int8, np.int8)
    stored = tflite.weights(files["float"])
    assert sorted(stored) == ["conv1", "conv2", "dense1", "logits"]
    kernel = models.kernel(tiny_plain_model, "conv2")
    np.testing.assert_array_equal(stored["conv2"]["values"], kernel.transpose(3, 0, 1, 2))  # OHWI
    np.testing.assert_array_equal(stored["dense1"]["values"],
                                  models.kernel(tiny_plain_model, "dense1").T)
    np.testing.assert_array_equal(stored["conv2"]["bias"],
                                  tiny_plain_model.get_layer("conv2").bias.numpy())
    int8 = tflite.weights(files["int8"], layers=["conv2", "dense1"])
    # one per output channel
    assert int8["conv2"]["dtype"] == np.int8 and len(int8["conv2"]["scales"]) == 8
    assert set(int8) >= {"conv2", "dense1"}
    tensors = tflite.tensors(files["int8"])
    assert tensors["constant"].sum() >= 8 and (tensors["bytes"] > 0).all()


def test_arena_lies_between_the_peak_and_no_reuse(files):
    arena = tflite.arena_bytes(files["float"])
    largest = 28 * 28 * 4 * 4    # conv1's output, float32
    assert largest <= arena["planned_peak_bytes"] < arena["all_activations_bytes"]
