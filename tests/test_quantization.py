"""labkit.quantizers and labkit.quantization: the NumPy quantizers against TensorFlow and the
TFLite converter, the converter's modes, and QAT with its cache, on the conftest tiny models."""
import hashlib

import numpy as np
import pytest
import tensorflow as tf

from labkit import files, models, tflite
from labkit import quantization as quant
from labkit import quantizers as qz

RNG = np.random.default_rng(0)
# QAT in tests: 4 steps
PLAN = models.FineTune(train_subset=256, batch_size=64, learning_rate=1e-4)


def noise_images(n, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, (n, 28, 28, 1)).astype(np.float32)


@pytest.fixture(scope="module")
def tiny_int8(tiny_bn_model, splits, tmp_path_factory):
    representative = np.ascontiguousarray(splits.x_train[:24])
    path = quant.export(tiny_bn_model, "int8", representative,
                        directory=tmp_path_factory.mktemp("q"))
    return path, representative


# ----------------------------------------------------------------------------- bad settings

@pytest.mark.parametrize("bits", [0, 17, -3, 2.5, True, "8"])
def test_bits_outside_1_to_16_raise(bits):
    x = RNG.normal(size=(5, 3)).astype(np.float32)
    for call in (lambda: qz.check_bits(bits), lambda: qz.affine_params(x, bits),
                 lambda: qz.fake_quantize(x, bits, "kmeans"), lambda: qz.calibrate(x, "mse", bits)):
        with pytest.raises(ValueError, match="from 1 to 16"):
            call()


@pytest.mark.parametrize("axis", [2, -3, 1.0])
def test_nonexistent_axis_raises(axis):
    x = np.ones((3, 4), np.float32)
    for scheme in qz.SCHEMES:
        with pytest.raises(ValueError, match="does not exist"):
            qz.fake_quantize(x, 8, scheme, axis=axis)


def test_nan_has_no_code_and_raises():
    x = np.array([0.5, -1.0, 2.0], np.float32)
    p = qz.affine_params(x, 8)
    for bad in (np.array([0.5, np.nan], np.float32), np.array([np.inf, 1.0], np.float32)):
        with pytest.raises(ValueError, match="no integer code"):
            qz.quantize(bad, p)
        with pytest.raises(ValueError, match="no integer code"):
            qz.affine_params(bad, 8)
        for scheme in qz.SCHEMES:
            with pytest.raises(ValueError, match="no integer code"):
                qz.fake_quantize(bad, 4, scheme)
        with pytest.raises(ValueError, match="no integer code"):
            qz.calibrate(bad, "minmax")


def test_other_bad_settings_raise(tiny_model):
    x = RNG.normal(size=(10,)).astype(np.float32)
    with pytest.raises(ValueError, match="bits >= 2"):
        qz.symmetric_params(x, 1)
    with pytest.raises(ValueError, match="scheme must be one of"):
        qz.fake_quantize(x, 8, "log")
    with pytest.raises(ValueError, match="method must be one of"):
        qz.calibrate(x, "entropy")
    with pytest.raises(ValueError, match="percentile"):
        qz.calibrate(x, "percentile", percentile=30)
    with pytest.raises(ValueError, match="mode must be one of"):
        quant.converter(tiny_model, "int4")
    with pytest.raises(ValueError, match='now called "dynamic"'):
        quant.converter(tiny_model, "dynamic-range")
    with pytest.raises(ValueError, match="only int8"):
        quant.converter(tiny_model, "float16", noise_images(2))
    with pytest.raises(ValueError, match="needs calibration images"):
        quant.converter(tiny_model, "int8", None)
    with pytest.raises(ValueError, match="scheme must be one of"):
        quant.quantize_aware(tiny_model, "int4-qat")


def test_empty_representative_dataset_raises(tiny_model):
    with pytest.raises(ValueError, match="at least one image"):
        quant.converter(tiny_model, "int8", np.zeros((0, 28, 28, 1), np.float32))
    with pytest.raises(ValueError, match="at least one image"):
        quant.representative_dataset(np.zeros((0, 28, 28, 1), np.float32))


def test_representative_dataset_takes_all_of_a_small_set_in_order_and_samples_a_large_one():
    x = noise_images(10)
    every = quant.representative_dataset(x)()
    np.testing.assert_array_equal(np.concatenate([b[0] for b in every]), x)
    some = quant.representative_dataset(noise_images(50), num_samples=7)()
    picked = np.concatenate([b[0] for b in some])
    assert len(picked) == 7


# ----------------------------------------------------------------------------- uniform quantizers

def _disagreements(ours, theirs, step):
    """Elements that differ, after checking each differs by exactly one step (a rounding tie)."""
    off = np.abs(ours - theirs) > 1e-6
    np.testing.assert_allclose(np.abs(ours - theirs)[off], np.broadcast_to(step, ours.shape)[off],
                               rtol=1e-3)
    return off.mean()


@pytest.mark.parametrize("bits", [8, 5, 3])
def test_affine_matches_tensorflow_fake_quant(bits):
    x = (RNG.normal(size=(500, 6)) * np.array([0.01, 0.1, 1, 3, 0.5, 2])
         + np.array([0, 0.2, -1, 0, 0.1, 5])).astype(np.float32)
    ours = qz.fake_quantize(x, bits, "affine")
    theirs = tf.quantization.fake_quant_with_min_max_vars(x, min(x.min(), 0.0), max(x.max(), 0.0),
                                                          num_bits=bits).numpy()
    assert _disagreements(ours, theirs, qz.affine_params(x, bits).scale) < 1e-3
    ours_c = qz.fake_quantize(x, bits, "affine", axis=-1)
    theirs_c = tf.quantization.fake_quant_with_min_max_vars_per_channel(
        x, np.minimum(x.min(0), 0.0), np.maximum(x.max(0), 0.0), num_bits=bits).numpy()
    assert _disagreements(ours_c, theirs_c, qz.affine_params(x, bits, axis=-1).scale) < 1e-3


@pytest.mark.parametrize("scheme", ["affine", "symmetric"])
@pytest.mark.parametrize("axis", [None, 0, -1])
@pytest.mark.parametrize("bits", [2, 4, 8, 12])
def test_uniform_error_bound_zero_exact_and_code_range(scheme, axis, bits):
    x = (RNG.normal(size=(7, 9)) * RNG.uniform(0.01, 3, size=(1, 9))).astype(np.float32)
    x[0, 0] = 0.0
    p = (qz.affine_params if scheme == "affine" else qz.symmetric_params)(x, bits, axis)
    q = qz.quantize(x, p)
    assert q.dtype == (np.int8 if bits <= 8 else np.int16)
    assert q.min() >= p.qmin and q.max() <= p.qmax
    error = np.abs(qz.dequantize(q, p) - x)
    scale = qz.along(p.scale, x.ndim, p.axis)
    assert np.all(error <= scale / 2 * (1 + 1e-5)), \
        "every value lies inside the range, so error <= half a step"
    assert qz.dequantize(q, p)[0, 0] == 0.0, "zero must be exactly representable"
    if scheme == "symmetric":
        assert np.all(p.zero_point == 0) and p.qmin == -p.qmax
        assert np.abs(q).max() == p.qmax, "the largest |x| maps to the last code"


def test_integer_matmul_terms_add_up_and_zero_point_0_drops_the_per_call_term():
    rng = np.random.default_rng(0)
    x_q, w_q = rng.integers(-128, 128, (3, 20)), rng.integers(-127, 128, (20, 5))
    for w_zero_point in (0, 4):
        terms = qz.integer_matmul_terms(x_q, -7, w_q, w_zero_point)
        assert all(t.shape == (3, 5) for t in terms.values())
        np.testing.assert_array_equal(sum(terms.values()), (x_q + 7) @ (w_q - w_zero_point))
    per_call = [name for name in terms if "each call" in name]
    assert not qz.integer_matmul_terms(x_q, -7, w_q, 0)[per_call[0]].any()
    with pytest.raises(ValueError, match="must be"):
        qz.integer_matmul_terms(x_q, 0, w_q.T)


def test_per_channel_beats_per_tensor_on_unequal_channels():
    x = (RNG.normal(size=(300, 8)) * np.geomspace(0.01, 1, 8)).astype(np.float32)
    for scheme in qz.SCHEMES:
        per_tensor = qz.sqnr_db(x, qz.fake_quantize(x, 4, scheme))
        per_channel = qz.sqnr_db(x, qz.fake_quantize(x, 4, scheme, axis=1))
        assert per_channel > per_tensor + 3, (scheme, per_tensor, per_channel)


def test_about_6_db_per_bit():
    x = RNG.uniform(-1, 1, 200_000).astype(np.float32)
    def sqnr(bits):
        return qz.sqnr_db(x, qz.fake_quantize(x, bits, "symmetric"))
    gains = [sqnr(b + 1) - sqnr(b) for b in (5, 6, 7)]
    assert np.allclose(gains, 20 * np.log10(2), atol=0.3), gains


# ----------------------------------------------------------------------------- k-means codebook

def test_kmeans_is_exact_with_few_distinct_values_and_uses_at_most_2_pow_bits_levels():
    x = RNG.choice([-0.5, 0.0, 0.25, 1.0], size=200).astype(np.float32)
    np.testing.assert_array_equal(qz.fake_quantize(x, 2, "kmeans"), x)
    y = RNG.normal(size=1000).astype(np.float32)
    assert len(np.unique(qz.fake_quantize(y, 3, "kmeans"))) <= 8


def test_kmeans_levels_are_the_means_of_their_members_and_beat_even_levels():
    y = RNG.normal(size=5000).astype(np.float32)
    approx = qz.fake_quantize(y, 3, "kmeans")
    for level in np.unique(approx):   # Lloyd's fixed point, up to its last small steps
        assert np.isclose(level, y[approx == level].mean(), atol=5e-3)
    for bits in (2, 3, 4, 6):
        kmeans = np.mean((qz.fake_quantize(y, bits, "kmeans") - y) ** 2)
        uniform = np.mean((qz.fake_quantize(y, bits, "affine") - y) ** 2)
        assert kmeans <= uniform, (bits, kmeans, uniform)


def test_kmeans_per_channel_keeps_channels_apart():
    x = np.stack([RNG.normal(0, 0.01, 100), RNG.normal(5, 1, 100)], axis=1).astype(np.float32)
    out = qz.fake_quantize(x, 2, "kmeans", axis=1)
    assert np.abs(out[:, 0]).max() < 0.1 and out[:, 1].min() > 1, \
        "a channel's codebook must only see that channel"


# ----------------------------------------------------------------------------- calibration

def test_calibration_methods_and_one_outlier():
    values = np.abs(RNG.normal(size=100_000)).astype(np.float32)
    spiked = np.append(values, 10 * values.max()).astype(np.float32)
    assert qz.calibrate(values, "minmax") == (0.0, pytest.approx(values.max()))
    assert qz.calibrate(spiked, "minmax")[1] == pytest.approx(10 * values.max())
    clean_hi = qz.calibrate(values, "percentile")[1]
    assert qz.calibrate(spiked, "percentile")[1] == pytest.approx(clean_hi, rel=0.01)
    lo, hi = qz.calibrate(values, "mse", bits=4)
    assert 0 < hi <= values.max()
    assert qz.range_mse(values, lo, hi, 4) <= qz.range_mse(values, 0, values.max(), 4)


def test_weight_sweep_rows(tiny_model, images, splits):
    sweep = qz.weight_sweep(tiny_model, images, splits.y_test[:len(images)], bits_list=(8, 2),
                            schemes=("symmetric",), progress=False)
    assert len(sweep) == 1 + 2 * 2
    sq = sweep.set_index(["granularity", "bits"])["sqnr_db"]
    assert sq["per-channel", 8] > sq["per-channel", 2] and sq["per-tensor", 8] > sq["per-tensor", 2]
    assert sq["per-channel", 8] >= sq["per-tensor", 8]
    with pytest.raises(ValueError, match="from 1 to 16"):
        qz.weight_sweep(tiny_model, images, splits.y_test[:len(images)], bits_list=(0,),
                        progress=False)


# ----------------------------------------------------------------------------- the converter

@pytest.mark.parametrize("mode, int8_io, expected", [
    ("float32", True, np.float32), ("float16", True, np.float32), ("dynamic", True, np.float32),
    ("int8", True, np.int8), ("int8", False, np.float32)])
def test_converter_modes_give_the_expected_io_and_weight_dtypes(tiny_model, images, tmp_path,
                                                                mode, int8_io, expected):
    calibration = images if mode == "int8" else None
    path = models.save_tflite(quant.converter(tiny_model, mode, calibration, int8_io=int8_io),
                              tmp_path / "m.tflite")
    assert tflite.io_dtypes(path) == (np.dtype(expected), np.dtype(expected))
    # small kernels stay float in dynamic mode
    stored = tflite.weights(path)["dense1"]["dtype"].name
    assert stored == {"float32": "float32", "float16": "float16"}.get(mode, "int8"), (mode, stored)
    ops = tflite.op_names(path)
    wrapped = ops[0] == "QUANTIZE" and ops[-1] == "DEQUANTIZE"
    assert wrapped == (mode == "int8" and not int8_io), ops


def test_export_keys_calibration_by_content_key_as_before(tiny_model, images, tmp_path):
    """The calibration images' key is files.content_key of their float32 bytes: the digits the
    cache used before content_key existed, so existing entries stay valid."""
    x = np.ascontiguousarray(images, np.float32)
    before = hashlib.sha256(str(x.shape).encode() + x.tobytes()).hexdigest()[:10]
    assert files.content_key(x) == before
    path = quant.export(tiny_model, "int8", images.astype(np.float64), directory=tmp_path)
    assert models.cached("int8", {"mode": "int8", "int8_io": True, "sparse": False,
                                  "num_samples": 500, "calibration": before},
                         [tiny_model], None, tmp_path, kind="tflite")[0] == path


def test_export_is_cached_by_model_weights_settings_and_calibration(tiny_model, tiny_plain_model,
                                                                    images, tmp_path):
    first = quant.export(tiny_model, "int8", images, directory=tmp_path)
    stamp = first.stat().st_mtime_ns
    assert quant.export(tiny_model, "int8", images, directory=tmp_path) == first
    assert first.stat().st_mtime_ns == stamp, "a cached file must not be rewritten"
    others = {quant.export(tiny_plain_model, "int8", images, directory=tmp_path),
              quant.export(tiny_model, "int8", images[::-1], directory=tmp_path),
              quant.export(tiny_model, "int8", images, directory=tmp_path, int8_io=False),
              quant.export(tiny_model, "dynamic", directory=tmp_path)}
    assert first not in others and len(others) == 4


def test_int8_file_matches_labkit_arithmetic(tiny_bn_model, tiny_int8):
    path, _ = tiny_int8
    assert tflite.io_dtypes(path) == (np.dtype(np.int8), np.dtype(np.int8))
    check = quant.compare_with_converter(tiny_bn_model, path)
    assert list(check["layer"]) == ["conv1", "conv2", "dense1", "logits"]
    assert (check["stored_dtype"] == "int8").all() and (check["bias_dtype"] == "int32").all()
    assert check["scale_max_rel_diff"].max() < 1e-5
    assert check["zero_points_all_0"].all()
    assert check["codes_equal"].min() > 0.999 and check["codes_max_abs_diff"].max() <= 1
    assert check["bias_scale_max_rel_diff"].max() < 1e-5


def test_deployed_kernels_fold_the_batch_norm(tiny_bn_model, images):
    """Folded conv (no BN) must give the same pre-activation as conv followed by BN, up to the BN
    shift."""
    x = images[:3]
    conv, bn = tiny_bn_model.get_layer("conv1"), tiny_bn_model.get_layer("bn1")
    gamma, beta, mean, var = bn.get_weights()
    folded = quant.deployed_kernels(tiny_bn_model)["conv1"]
    assert not np.allclose(folded, conv.kernel.numpy(), atol=1e-3), \
        "this batch norm must change the kernel"
    reference = bn(conv(x), training=False).numpy()
    shift = beta - mean * gamma / np.sqrt(var + bn.epsilon)
    ours = tf.nn.conv2d(x, folded, strides=1, padding="SAME").numpy() + shift
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_converter_calibrates_activations_with_min_max(tiny_bn_model, tiny_int8):
    path, representative = tiny_int8
    table = quant.activation_quantization(path)
    logits_row = table[table["op"] == "FULLY_CONNECTED"].iloc[-1]
    lo, hi = qz.calibrate(tiny_bn_model(representative, training=False).numpy(), "minmax")
    ours = qz.params_from_range(lo, hi, 8)
    assert float(ours.scale) == pytest.approx(logits_row["scale"], rel=1e-5)
    assert int(ours.zero_point) == logits_row["zero_point"]


def test_size_breakdown_adds_up(tiny_bn_model, tiny_int8):
    path, _ = tiny_int8
    parts = quant.size_breakdown(path)
    assert parts.drop("file").sum() == parts["file"] == path.stat().st_size
    assert parts["int8 constants"] == sum(models.kernel(tiny_bn_model, n).size
                                          for n in models.weight_layers(tiny_bn_model))
    assert parts["quantization parameters (est.)"] > 0


# ----------------------------------------------------------------------------- QAT

@pytest.mark.parametrize("scheme", quant.QAT_SCHEMES)
def test_quantize_aware_wraps_a_copy_for_every_scheme(tiny_plain_model, scheme):
    before = [w.copy() for w in tiny_plain_model.get_weights()]
    qat_model = quant.quantize_aware(tiny_plain_model, scheme)
    assert quant.is_quantize_aware(qat_model) and not quant.is_quantize_aware(tiny_plain_model)
    wrapped = {layer.layer.name for layer in qat_model.layers if hasattr(layer, "layer")}
    assert set(models.weight_layers(tiny_plain_model)) <= wrapped
    for a, b in zip(before, tiny_plain_model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_qat_ranges_trap_seeding_and_int8_io(tiny_model, splits, tmp_path):
    before = [w.copy() for w in tiny_model.get_weights()]
    qat_model = quant.quantize_aware(tiny_model)
    x, y = splits.x_train[:64], splits.y_train[:64]
    models.train(qat_model, x, y, models.TrainSettings(epochs=1, batch_size=32, learning_rate=1e-4),
                 progress=False)
    ranges = quant.activation_ranges(qat_model).set_index("layer")
    assert ranges.loc["relu1", "min"] == pytest.approx(-6 * 0.999 ** 2, rel=1e-4), \
        "tfmot's EMA start at -6"
    for a, b in zip(before, tiny_model.get_weights()):
        np.testing.assert_array_equal(a, b)  # QAT trained a clone, not the model it was given

    seeded = quant.seed_activation_ranges(qat_model, tiny_model, x).set_index("layer")
    assert seeded.loc["relu1", "min"] == 0.0
    seen = float(qz.layer_outputs(tiny_model, "relu1", x).max())
    assert seeded.loc["relu1", "max"] == pytest.approx(seen, rel=1e-5)

    trap = models.save_tflite(quant.converter(qat_model, "int8", int8_io=False),
                              tmp_path / "trap.tflite")
    assert tflite.io_dtypes(trap) == (np.dtype(np.float32), np.dtype(np.float32))
    assert tflite.op_names(trap)[0] == "QUANTIZE" and tflite.op_names(trap)[-1] == "DEQUANTIZE"
    fixed = models.save_tflite(quant.converter(qat_model, "int8"), tmp_path / "fixed.tflite")
    assert tflite.io_dtypes(fixed) == (np.dtype(np.int8), np.dtype(np.int8))
    assert {w["dtype"].name for w in tflite.weights(fixed).values()} == {"int8"}


def test_qat_cache_is_reused_for_the_same_weights_and_not_for_other_weights(tiny_model, splits,
                                                                            tmp_path):
    qat_model, record = quant.qat(tiny_model, splits, PLAN, directory=tmp_path, progress=False)
    assert record["cached"] is False and record["settings"]["scheme"] == "qat"
    ranges = quant.activation_ranges(qat_model).set_index("layer")
    assert ranges.loc["relu1", "min"] == 0.0, "ranges seeded"
    again, record_again = quant.qat(tiny_model, splits, PLAN, directory=tmp_path, progress=False)
    assert record_again["cached"] is True and record_again["inputs"] == record["inputs"]
    for a, b in zip(qat_model.get_weights(), again.get_weights()):
        np.testing.assert_array_equal(a, b)

    other = models.clone_with_weights(tiny_model)   # same architecture and name, other weights
    kernel = other.get_layer("dense1").kernel
    kernel.assign(kernel.numpy() * 1.01)
    _, other_record = quant.qat(other, splits, PLAN, directory=tmp_path, progress=False)
    assert other_record["cached"] is False, \
        "a model with other weights must not get the first model's QAT"
    assert other_record["inputs"] != record["inputs"]
    _, unseeded = quant.qat(tiny_model, splits, PLAN, seed_ranges=False, directory=tmp_path,
                            progress=False)
    assert unseeded["cached"] is False
    weights, records = list(tmp_path.glob("qat-*.weights.h5")), list(tmp_path.glob("qat-*.json"))
    assert len(weights) == len(records) == 3


def test_pcqat_keeps_sparsity_per_layer(tiny_plain_model):
    """tfmot shares one weight quantizer between layers: an unpruned conv1 would switch sparsity
    preservation off for the pruned conv2 too. quantize_aware gives each layer its own."""
    model = models.clone_with_weights(tiny_plain_model)
    for name in ("conv2", "dense1"):
        kernel = models.kernel(model, name)
        kernel[np.abs(kernel) < np.median(np.abs(kernel))] = 0.0   # half zeros, as pruning leaves
        model.get_layer(name).kernel.assign(kernel)
    qat_model = quant.quantize_aware(model, "pcqat")
    preserve = {layer.name: getattr(layer.quantize_config.weight_quantizer, "preserve_sparsity",
                                    False)
                for layer in qat_model.layers
                if hasattr(getattr(layer, "quantize_config", None), "weight_quantizer")}
    assert preserve["quant_conv2"] and preserve["quant_dense1"], preserve
    assert not preserve["quant_conv1"], preserve
