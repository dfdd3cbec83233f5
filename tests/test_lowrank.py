"""labkit.lowrank: SVD factors against NumPy's norms, exact reproduction at full rank for dense
and convolution layers, MACs of the factored model, the sweep, the cached fine-tune (a different
input model, a different entry) and bad ranks (tiny models, seconds)."""
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
import tf_keras as keras

from labkit import lowrank, measure, models


def test_svd_full_rank_is_exact_and_truncation_is_eckart_young():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((40, 12))
    a, b = lowrank.svd_factors(w, 12)
    np.testing.assert_allclose(a @ b, w, atol=1e-5)
    s = np.linalg.svd(w, compute_uv=False)
    for r in (1, 4, 9):
        a, b = lowrank.svd_factors(w, r)
        assert a.shape == (40, r) and b.shape == (r, 12)
        # the best rank-r error in the Frobenius norm is the norm of the dropped singular values
        assert np.isclose(np.linalg.norm(w - a @ b), np.sqrt(np.sum(s[r:] ** 2)), rtol=1e-4)


def test_conv_as_matrix_layout():
    k = np.random.default_rng(1).standard_normal((3, 3, 4, 5))
    m = lowrank.conv_as_matrix(k)
    assert m.shape == (12, 15)
    for a, b, c, o in [(0, 0, 0, 0), (2, 1, 3, 4), (1, 2, 0, 3)]:
        assert m[a * 4 + c, b * 5 + o] == k[a, b, c, o]


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_spatial_pair_reproduces_the_convolution_at_full_rank(padding):
    rng = np.random.default_rng(2)
    k = rng.standard_normal((3, 3, 4, 6)).astype(np.float32)
    x = rng.standard_normal((2, 9, 9, 4)).astype(np.float32)
    first, second = lowrank.spatial_factors(k, 12)
    assert first.shape == (3, 1, 4, 12) and second.shape == (1, 3, 12, 6)
    def conv(images, kernel):
        return tf.nn.conv2d(images, kernel, 1, padding.upper())
    whole = conv(x, k).numpy()
    pair = conv(conv(x, first), second).numpy()
    np.testing.assert_allclose(pair, whole, atol=1e-4)
    # below full rank it is an approximation, and a better one as the rank grows
    errors = []
    for r in (2, 6, 10):
        f, s = lowrank.spatial_factors(k, r)
        errors.append(np.abs(conv(conv(x, f), s).numpy() - whole).max())
    assert errors[0] > errors[1] > errors[2] > 1e-4


def test_factorized_model_is_exact_at_full_rank(tiny_model, images):
    ranks = {name: lowrank.full_rank(tiny_model.get_layer(name)) for name in ("conv2", "dense1")}
    assert ranks == {"conv2": 12, "dense1": 16}   # min(3*4, 3*8) and min(392, 16)
    factored = lowrank.factorize(tiny_model, ranks)
    names = [layer.name for layer in factored.layers]
    assert {"conv2_kx1", "conv2_1xk", "dense1_a", "dense1_b"} <= set(names) and "conv2" not in names
    np.testing.assert_allclose(factored(images, training=False).numpy(),
                               tiny_model(images, training=False).numpy(), atol=1e-4)
    # the original is untouched
    assert "conv2" in [layer.name for layer in tiny_model.layers]


def test_macs_and_params_of_the_factored_model(tiny_model):
    r_conv, r_dense = 3, 5
    factored = lowrank.factorize(tiny_model, {"conv2": r_conv, "dense1": r_dense})
    macs = measure.layer_macs(factored).set_index("layer")["macs"]
    # conv2 sees 14x14 positions (after pool1) with 4 channels in and 8 out
    assert macs["conv2_kx1"] == 14 * 14 * r_conv * 3 * 4
    assert macs["conv2_1xk"] == 14 * 14 * 8 * 3 * r_conv
    assert macs["dense1_a"] == 392 * r_dense and macs["dense1_b"] == r_dense * 16
    before = measure.count_params(tiny_model)["params"]
    after = measure.count_params(factored)["params"]
    removed = ((3 * 3 * 4 * 8 - (3 * 4 * r_conv + 3 * r_conv * 8))
               + (392 * 16 - (392 * r_dense + r_dense * 16)))
    assert before - after == removed


def test_bad_ranks(tiny_model):
    with pytest.raises(ValueError, match="from 1 to 16"):
        lowrank.factorize(tiny_model, {"dense1": 17})
    with pytest.raises(ValueError, match="from 1 to 12"):
        lowrank.factorize(tiny_model, {"conv2": 13})
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="rank"):
            lowrank.factorize(tiny_model, {"dense1": bad})
    with pytest.raises(ValueError, match="no layer"):
        lowrank.factorize(tiny_model, {"dense7": 2})
    with pytest.raises(ValueError, match="only Dense and Conv2D"):
        lowrank.full_rank(tiny_model.get_layer("bn1"))
    with pytest.raises(ValueError, match="rank"):
        lowrank.svd_factors(np.ones((3, 4)), 4)


def test_strided_convolution_is_refused():
    inputs = keras.Input((8, 8, 2))
    model = keras.Model(inputs, keras.layers.Conv2D(3, 3, strides=2, name="c")(inputs))
    with pytest.raises(ValueError, match="stride 1"):
        lowrank.factorize(model, {"c": 2})


def test_sweep_and_choice(tiny_model, splits):
    x, y = splits.x_val[:300], splits.y_val[:300]
    sweep = lowrank.rank_sweep(tiny_model, x, y, {"dense1": (1, 16)}, progress=False)
    assert list(sweep["layer"]) == ["(none)", "dense1", "dense1"]
    full = sweep[(sweep["layer"] == "dense1") & (sweep["rank"] == 16)].iloc[0]
    # full rank: the same predictions, up to float ties
    assert full["drop"] == pytest.approx(0.0, abs=1 / 300)
    assert sweep.iloc[1]["macs"] < sweep.iloc[0]["macs"]
    assert lowrank.choose_rank(sweep, "dense1", 1.0) == 1
    fake = pd.DataFrame({"layer": ["dense1", "dense1"], "rank": [1, 2], "drop": [0.2, 0.1]})
    assert lowrank.choose_rank(fake, "dense1", 0.15) == 2
    with pytest.raises(ValueError, match="no swept rank"):
        lowrank.choose_rank(fake, "dense1", 0.05)
    with pytest.raises(ValueError, match="max_drop"):
        lowrank.choose_rank(sweep, "dense1", 1.5)


def test_fine_tune_is_cached_by_the_input_weights(tiny_model, tiny_plain_model, splits, tmp_path):
    plan = models.FineTune(train_subset=256, batch_size=64)
    ranks = {"dense1": 4}
    tuned, record = lowrank.load_or_fine_tune(tiny_model, ranks, splits, plan, directory=tmp_path,
                                              progress=False)
    assert not record["cached"] and record["name"] == "lowrank-dense1r4"
    assert {"dense1_a", "dense1_b"} <= {layer.name for layer in tuned.layers}
    assert record["params"] == measure.count_params(tuned)["params"]
    again, record2 = lowrank.load_or_fine_tune(tiny_model, ranks, splits, plan, directory=tmp_path,
                                               progress=False)
    assert record2["cached"] and models.weights_key(again) == models.weights_key(tuned)
    # same ranks and plan, another model: a new entry, not the first model's factors
    other, record3 = lowrank.load_or_fine_tune(tiny_plain_model, ranks, splits, plan,
                                               directory=tmp_path, progress=False)
    assert not record3["cached"] and record3["inputs"] != record["inputs"]
    assert models.weights_key(other) != models.weights_key(tuned)
    assert len(list(tmp_path.glob("lowrank-dense1r4-*.keras"))) == 2
    # the float32 export is written once per model
    path = lowrank.export_tflite(tuned, record["name"], tmp_path)
    assert path == lowrank.export_tflite(again, record["name"], tmp_path)
    x = splits.x_val[:64]
    np.testing.assert_allclose(measure.litert(path)(x), tuned(x, training=False).numpy(), atol=1e-4)
