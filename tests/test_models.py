import json

import numpy as np
import pytest
import tf_keras as keras

from labkit import measure, models


def test_training_is_deterministic(tmp_path, tiny_config, splits):
    first, _ = models.load_or_train_baseline(tiny_config, splits, directory=tmp_path / "a",
                                             progress=False)
    second, _ = models.load_or_train_baseline(tiny_config, splits, directory=tmp_path / "b",
                                              progress=False)
    for w1, w2 in zip(first.get_weights(), second.get_weights()):
        np.testing.assert_array_equal(w1, w2)


def test_cache_is_reused_and_keyed_by_config(tmp_path, tiny_config, splits):
    model, record = models.load_or_train_baseline(tiny_config, splits, directory=tmp_path,
                                                  progress=False)
    path = models.model_path("baseline", tiny_config, tmp_path)
    assert path.is_file()
    assert json.loads(path.with_suffix(".json").read_text())["config"]["epochs"] == 1
    again, record_again = models.load_or_train_baseline(tiny_config, splits, directory=tmp_path,
                                                        progress=False)
    assert record_again["trained_at"] == record["trained_at"]  # loaded, not retrained
    np.testing.assert_array_equal(model(splits.x_test[:8]).numpy(),
                                  again(splits.x_test[:8]).numpy())
    other = models.BaselineConfig(conv_filters=(4, 8), dense_units=16, epochs=1, batch_size=64,
                                  train_subset=512, seed=1)
    assert other.key() != tiny_config.key()


def test_settings_key_names_the_settings_not_their_order(tmp_path):
    key = models.settings_key({"sparsity": 0.5, "layers": ("conv2", "dense1")})
    assert len(key) == 10 and key == models.settings_key({"layers": ["conv2", "dense1"],
                                                          "sparsity": 0.5})
    assert key != models.settings_key({"sparsity": 0.6, "layers": ("conv2", "dense1")})
    assert models.settings_key({"x": np.float32(0.5)}) == models.settings_key({"x": 0.5})
    assert models.settings_key({"dir": tmp_path}) == models.settings_key({"dir": str(tmp_path)})
    config = models.BaselineConfig()
    assert config.key() == models.settings_key(models.asdict(config))


def test_cache_entry_counts_only_when_complete(tmp_path, tiny_model):
    path = tmp_path / "entry.keras"
    assert models.load_cached(path) is None
    models.save_cached(tiny_model,
                       {"accuracy": np.float32(0.5), "shape": np.arange(3), "sizes": (1, 2)}, path)
    assert not list(tmp_path.glob("*.tmp.keras"))
    model, record = models.load_cached(path, compile=False)
    assert record == {"accuracy": 0.5, "shape": [0, 1, 2], "sizes": [1, 2]}
    assert model.count_params() == tiny_model.count_params()
    path.with_suffix(".json").unlink()   # a save cut short before its record: not an entry
    assert models.load_cached(path) is None
    with pytest.raises(TypeError, match="JSON cannot store"):
        models.save_cached(tiny_model, {"bad": object()}, tmp_path / "bad.keras")


def test_baseline_architecture():
    model = models.build_baseline()
    names = [layer.name for layer in model.layers]
    assert {"conv1", "bn1", "conv2", "bn2", "dense1", "logits"} <= set(names)
    assert model.output_shape == (None, 10)
    assert not model.get_layer("conv1").use_bias
    with pytest.raises(ValueError, match="conv_filters"):
        models.build_baseline(models.BaselineConfig(conv_filters=(8, 0)))


def test_clone_with_weights_is_independent(tiny_model):
    copy = models.clone_with_weights(tiny_model)
    assert copy.layers[1] is not tiny_model.layers[1]
    copy.get_layer("dense1").kernel.assign(np.zeros(copy.get_layer("dense1").kernel.shape))
    assert np.count_nonzero(tiny_model.get_layer("dense1").kernel.numpy()) > 0


def test_export_baseline_writes_three_formats(tmp_path, tiny_model, tiny_config, images):
    paths = models.export_baseline(tiny_model, tiny_config, directory=tmp_path)
    assert paths["keras"].is_file() and (paths["savedmodel"] / "saved_model.pb").is_file()
    reference = tiny_model(images, training=False).numpy()
    lite = measure.litert(paths["tflite"])(images)
    np.testing.assert_allclose(lite, reference, atol=1e-4)
    loaded = keras.models.load_model(paths["keras"])
    np.testing.assert_allclose(loaded(images).numpy(), reference, atol=1e-6)


def test_build_cnn_layouts():
    with_bn = models.build_cnn((4, 8), 16)
    plain = models.build_cnn((4, 8), 16, batchnorm=False, dropout=0.0)
    names = [layer.name for layer in plain.layers]
    assert "bn1" not in names and "dropout" not in names and plain.get_layer("conv1").use_bias
    assert {"bn1", "relu1", "dropout"} <= {layer.name for layer in with_bn.layers}
    assert models.weight_layers(plain) == ["conv1", "conv2", "dense1", "logits"]
    assert models.weight_layers(plain, min_weights=200) == ["conv2", "dense1"]
    assert models.kernel(plain, "conv2").shape == (3, 3, 4, 8)
    with pytest.raises(ValueError, match="weight layers"):
        models.kernel(plain, "pool1")
    with pytest.raises(ValueError, match="dropout"):
        models.build_cnn((4,), 8, dropout=1.0)


def test_fine_tune_plan_subset_and_steps(splits):
    plan = models.FineTune(train_subset=300, epochs=2, batch_size=100)
    x, y = plan.subset(splits.x_train, splits.y_train)
    assert len(x) == len(y) == 300 and plan.steps(len(splits.x_train)) == 6
    assert models.FineTune().steps(1000) == 8          # None: every image
    with pytest.raises(ValueError, match="train_subset"):
        models.FineTune(train_subset=0)


def test_weights_key_follows_the_weights(tiny_model, tmp_path):
    copy = models.clone_with_weights(tiny_model)
    assert models.weights_key(copy) == models.weights_key(tiny_model)
    copy.get_layer("logits").bias.assign(copy.get_layer("logits").bias + 1e-3)
    assert models.weights_key(copy) != models.weights_key(tiny_model)
    file = tmp_path / "f.bin"
    file.write_bytes(b"abc")
    assert (models.weights_key(file) == models.weights_key(str(file))
            != models.weights_key("abc-not-a-file"))


def test_cached_keys_on_settings_and_input_weights(tiny_model, tmp_path):
    calls = []

    def build(model):
        calls.append(1)
        return models.clone_with_weights(model), {"note": "built"}

    other = models.clone_with_weights(tiny_model)
    other.get_layer("logits").bias.assign(other.get_layer("logits").bias + 1.0)
    first, record = models.cached("m", {"s": 1}, [tiny_model], lambda: build(tiny_model), tmp_path)
    again, again_record = models.cached("m", {"s": 1}, [tiny_model],
                                        lambda: build(tiny_model), tmp_path)
    assert len(calls) == 1 and again_record["cached"] and not record["cached"]
    assert models.weights_key(again) == models.weights_key(tiny_model)
    # another input model
    models.cached("m", {"s": 1}, [other], lambda: build(other), tmp_path)
    # other settings
    models.cached("m", {"s": 2}, [tiny_model], lambda: build(tiny_model), tmp_path)
    assert len(calls) == 3 and len(list(tmp_path.glob("m-*.keras"))) == 3
    path, record = models.cached("t", {"s": 1}, tiny_model, lambda: (tiny_model, {}), tmp_path,
                                 kind="tflite")
    assert path.suffix == ".tflite" and record["inputs"] == [models.weights_key(tiny_model)]
    assert sorted(p.name for p in tmp_path.glob("t-*")) == sorted([path.name,
                                                                   path.with_suffix(".json").name])
    with pytest.raises(ValueError, match="kind"):
        models.cached("x", {}, [], lambda: None, tmp_path, kind="onnx")


def test_save_tflite_is_atomic_and_explains_failures(tiny_model, tmp_path):
    path = models.save_tflite(tiny_model, tmp_path / "m.tflite")
    assert path.read_bytes()[4:8] == b"TFL3"
    assert models.save_tflite(path.read_bytes(),
                              tmp_path / "copy.tflite").read_bytes() == path.read_bytes()

    class Failing:
        def convert(self):
            import os
            os.write(2, b"error: 'tfl.fake_op' op is neither a custom op nor a flex op\n")
            raise ValueError("conversion failed")
    with pytest.raises(RuntimeError, match="neither a custom op"):
        models.save_tflite(Failing(), tmp_path / "bad.tflite")
    assert not (tmp_path / "bad.tflite").exists() and not list(tmp_path.glob("*.tmp"))
    with pytest.raises(TypeError, match="Keras model, a TFLiteConverter or bytes"):
        models.save_tflite("model.keras", tmp_path / "x.tflite")
