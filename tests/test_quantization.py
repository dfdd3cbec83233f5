"""labkit.quantization: the NumPy quantizers against TensorFlow and the TFLite converter, on tiny models."""
import labkit

labkit.setup(seed=0)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from labkit import models  # noqa: E402
from labkit import quantization as quant  # noqa: E402

RNG = np.random.default_rng(0)


def images(n, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, (n, 28, 28, 1)).astype(np.float32)


@pytest.fixture(scope="module")
def tiny_model():
    """One conv block (with a batch norm whose statistics are far from identity) and a dense head."""
    model = models.build_baseline(models.BaselineConfig(conv_filters=(4,), dense_units=8))
    bn = model.get_layer("bn1")
    rng = np.random.default_rng(1)
    bn.set_weights([rng.uniform(0.5, 2.0, 4), rng.normal(0, 0.1, 4), rng.normal(0, 0.1, 4), rng.uniform(0.01, 0.5, 4)])
    for name in ("dense1", "logits"):  # non-zero biases, or the converter leaves them out of the file
        layer = model.get_layer(name)
        layer.bias.assign(rng.normal(0, 0.1, layer.bias.shape).astype(np.float32))
    return model


@pytest.fixture(scope="module")
def tiny_int8(tiny_model, tmp_path_factory):
    representative = images(24, seed=2)
    path = quant.convert(quant.ptq_converter(tiny_model, "int8", representative, num_samples=100),
                         tmp_path_factory.mktemp("q") / "tiny_int8.tflite")
    return path, representative


# ----------------------------------------------------------------------------- bad settings

@pytest.mark.parametrize("bits", [0, 17, -3, 2.5, True, "8"])
def test_bits_outside_1_to_16_raise(bits):
    x = RNG.normal(size=(5, 3)).astype(np.float32)
    for call in (lambda: quant.check_bits(bits), lambda: quant.affine_params(x, bits),
                 lambda: quant.fake_quantize(x, bits, "kmeans"), lambda: quant.calibrate(x, "mse", bits)):
        with pytest.raises(ValueError, match="from 1 to 16"):
            call()


@pytest.mark.parametrize("axis", [2, -3, 1.0])
def test_nonexistent_axis_raises(axis):
    x = np.ones((3, 4), np.float32)
    for scheme in quant.SCHEMES:
        with pytest.raises(ValueError, match="does not exist"):
            quant.fake_quantize(x, 8, scheme, axis=axis)


def test_other_bad_settings_raise(tiny_model):
    x = RNG.normal(size=(10,)).astype(np.float32)
    with pytest.raises(ValueError, match="bits >= 2"):
        quant.symmetric_params(x, 1)
    with pytest.raises(ValueError, match="scheme must be one of"):
        quant.fake_quantize(x, 8, "log")
    with pytest.raises(ValueError, match="method must be one of"):
        quant.calibrate(x, "entropy")
    with pytest.raises(ValueError, match="percentile"):
        quant.calibrate(x, "percentile", percentile=30)
    with pytest.raises(ValueError, match="mode must be one of"):
        quant.ptq_converter(tiny_model, "int4")
    with pytest.raises(ValueError, match="only int8"):
        quant.ptq_converter(tiny_model, "float16", images(2))


def test_empty_representative_dataset_raises(tiny_model):
    with pytest.raises(ValueError, match="at least one image"):
        quant.ptq_converter(tiny_model, "int8", np.zeros((0, 28, 28, 1), np.float32))
    with pytest.raises(ValueError, match="at least one image"):
        quant.representative_dataset(np.zeros((0, 28, 28, 1), np.float32))
    with pytest.raises(ValueError, match="needs representative images"):
        quant.ptq_converter(tiny_model, "int8", None)


# ----------------------------------------------------------------------------- uniform quantizers

def _disagreements(ours, theirs, step):
    """Elements that differ, after checking each differs by exactly one step (a rounding tie)."""
    off = np.abs(ours - theirs) > 1e-6
    np.testing.assert_allclose(np.abs(ours - theirs)[off], np.broadcast_to(step, ours.shape)[off], rtol=1e-3)
    return off.mean()


@pytest.mark.parametrize("bits", [8, 5, 3])
def test_affine_matches_tensorflow_fake_quant(bits):
    x = (RNG.normal(size=(500, 6)) * np.array([0.01, 0.1, 1, 3, 0.5, 2]) + np.array([0, 0.2, -1, 0, 0.1, 5])).astype(np.float32)
    ours = quant.fake_quantize(x, bits, "affine")
    theirs = tf.quantization.fake_quant_with_min_max_vars(x, min(x.min(), 0.0), max(x.max(), 0.0), num_bits=bits).numpy()
    assert _disagreements(ours, theirs, quant.affine_params(x, bits).scale) < 1e-3
    ours_c = quant.fake_quantize(x, bits, "affine", axis=-1)
    theirs_c = tf.quantization.fake_quant_with_min_max_vars_per_channel(
        x, np.minimum(x.min(0), 0.0), np.maximum(x.max(0), 0.0), num_bits=bits).numpy()
    assert _disagreements(ours_c, theirs_c, quant.affine_params(x, bits, axis=-1).scale) < 1e-3


@pytest.mark.parametrize("scheme", ["affine", "symmetric"])
@pytest.mark.parametrize("axis", [None, 0, -1])
@pytest.mark.parametrize("bits", [2, 4, 8, 12])
def test_uniform_error_bound_zero_exact_and_code_range(scheme, axis, bits):
    x = (RNG.normal(size=(7, 9)) * RNG.uniform(0.01, 3, size=(1, 9))).astype(np.float32)
    x[0, 0] = 0.0
    p = (quant.affine_params if scheme == "affine" else quant.symmetric_params)(x, bits, axis)
    q = quant.quantize(x, p)
    assert q.dtype == (np.int8 if bits <= 8 else np.int16)
    assert q.min() >= p.qmin and q.max() <= p.qmax
    error = np.abs(quant.dequantize(q, p) - x)
    scale = quant._along(p.scale, x.ndim, p.axis)
    assert np.all(error <= scale / 2 * (1 + 1e-5)), "every value lies inside the range, so error <= half a step"
    assert quant.dequantize(q, p)[0, 0] == 0.0, "zero must be exactly representable"
    if scheme == "symmetric":
        assert np.all(p.zero_point == 0) and p.qmin == -p.qmax
        assert np.abs(q).max() == p.qmax, "the largest |x| maps to the last code"


def test_per_channel_beats_per_tensor_on_unequal_channels():
    x = (RNG.normal(size=(300, 8)) * np.geomspace(0.01, 1, 8)).astype(np.float32)
    for scheme in quant.SCHEMES:
        per_tensor = quant.sqnr_db(x, quant.fake_quantize(x, 4, scheme))
        per_channel = quant.sqnr_db(x, quant.fake_quantize(x, 4, scheme, axis=1))
        assert per_channel > per_tensor + 3, (scheme, per_tensor, per_channel)


def test_about_6_db_per_bit():
    x = RNG.uniform(-1, 1, 200_000).astype(np.float32)
    gains = [quant.sqnr_db(x, quant.fake_quantize(x, b + 1, "symmetric")) - quant.sqnr_db(x, quant.fake_quantize(x, b, "symmetric"))
             for b in (5, 6, 7)]
    assert np.allclose(gains, 20 * np.log10(2), atol=0.3), gains


# ----------------------------------------------------------------------------- k-means codebook

def test_kmeans_is_exact_with_few_distinct_values_and_uses_at_most_2_pow_bits_levels():
    x = RNG.choice([-0.5, 0.0, 0.25, 1.0], size=200).astype(np.float32)
    np.testing.assert_array_equal(quant.fake_quantize(x, 2, "kmeans"), x)
    y = RNG.normal(size=1000).astype(np.float32)
    assert len(np.unique(quant.fake_quantize(y, 3, "kmeans"))) <= 8


def test_kmeans_centroids_are_the_means_of_their_members_and_beat_even_levels():
    y = RNG.normal(size=5000)
    centroids, labels = quant.kmeans_1d(y, 8)
    for k in np.unique(labels):
        assert np.isclose(centroids[k], y[labels == k].mean(), atol=1e-9)
    for bits in (2, 3, 4, 6):
        kmeans = np.mean((quant.fake_quantize(y, bits, "kmeans") - y) ** 2)
        uniform = np.mean((quant.fake_quantize(y, bits, "affine") - y) ** 2)
        assert kmeans <= uniform, (bits, kmeans, uniform)


def test_kmeans_per_channel_keeps_channels_apart():
    x = np.stack([RNG.normal(0, 0.01, 100), RNG.normal(5, 1, 100)], axis=1).astype(np.float32)
    out = quant.fake_quantize(x, 2, "kmeans", axis=1)
    assert np.abs(out[:, 0]).max() < 0.1 and out[:, 1].min() > 1, "a channel's codebook must only see that channel"


# ----------------------------------------------------------------------------- calibration

def test_calibration_methods_and_one_outlier():
    values = np.abs(RNG.normal(size=100_000)).astype(np.float32)
    spiked = np.append(values, 10 * values.max()).astype(np.float32)
    assert quant.calibrate(values, "minmax") == (0.0, pytest.approx(values.max()))
    assert quant.calibrate(spiked, "minmax")[1] == pytest.approx(10 * values.max())
    assert quant.calibrate(spiked, "percentile")[1] == pytest.approx(quant.calibrate(values, "percentile")[1], rel=0.01)
    lo, hi = quant.calibrate(values, "mse", bits=4)
    assert 0 < hi <= values.max()
    assert quant.range_mse(values, lo, hi, 4) <= quant.range_mse(values, 0, values.max(), 4)


# ----------------------------------------------------------------------------- against the converter

def test_int8_file_matches_labkit_arithmetic(tiny_model, tiny_int8):
    path, representative = tiny_int8
    assert quant.io_dtypes(path) == (np.dtype(np.int8), np.dtype(np.int8))
    check = quant.compare_with_converter(tiny_model, path)
    assert list(check["layer"]) == ["conv1", "dense1", "logits"]
    assert (check["stored_dtype"] == "int8").all() and (check["bias_dtype"] == "int32").all()
    assert check["scale_max_rel_diff"].max() < 1e-5
    assert check["zero_points_all_0"].all()
    assert check["codes_equal"].min() > 0.999 and check["codes_max_abs_diff"].max() <= 1
    assert check["bias_scale_max_rel_diff"].max() < 1e-5


def test_deployed_kernels_fold_the_batch_norm(tiny_model):
    """Folded conv (no BN) must give the same pre-activation as conv followed by BN, up to the BN shift."""
    x = images(3, seed=5)
    conv = tiny_model.get_layer("conv1")
    bn = tiny_model.get_layer("bn1")
    gamma, beta, mean, var = bn.get_weights()
    folded = quant.deployed_kernels(tiny_model)["conv1"]
    reference = bn(conv(x), training=False).numpy()
    shift = beta - mean * gamma / np.sqrt(var + bn.epsilon)
    ours = tf.nn.conv2d(x, folded, strides=1, padding="SAME").numpy() + shift
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_converter_calibrates_activations_with_min_max(tiny_model, tiny_int8):
    path, representative = tiny_int8
    table = quant.activation_quantization(path)
    logits_row = table[table["op"] == "FULLY_CONNECTED"].iloc[-1]
    logits = tiny_model(representative, training=False).numpy()
    lo, hi = quant.calibrate(logits, "minmax")
    ours = quant.params_from_range(lo, hi, 8)
    assert float(ours.scale) == pytest.approx(logits_row["scale"], rel=1e-5)
    assert int(ours.zero_point) == logits_row["zero_point"]


def test_size_breakdown_adds_up(tiny_model, tiny_int8):
    path, _ = tiny_int8
    parts = quant.size_breakdown(path)
    assert parts.drop("file").sum() == parts["file"] == path.stat().st_size
    weight_count = sum(w.size for w in quant.kernels(tiny_model).values())
    assert parts["int8 constants"] == weight_count


# ----------------------------------------------------------------------------- QAT

def test_qat_ranges_trap_seeding_and_int8_io(tiny_model, tmp_path):
    before = [w.copy() for w in tiny_model.get_weights()]
    qat = quant.quantize_aware(tiny_model)
    x, y = images(64, seed=3), np.arange(64) % 10
    models.train(qat, x, y, epochs=1, batch_size=32, learning_rate=1e-3, progress=False)
    ranges = quant.activation_ranges(qat).set_index("layer")
    assert ranges.loc["relu1", "min"] == pytest.approx(-6 * 0.999 ** 2, rel=1e-4), "tfmot's EMA start at -6"
    for a, b in zip(before, tiny_model.get_weights()):
        np.testing.assert_array_equal(a, b)  # QAT trained a clone, not the model it was given

    seeded = quant.seed_activation_ranges(qat, tiny_model, x).set_index("layer")
    assert seeded.loc["relu1", "min"] == 0.0
    assert seeded.loc["relu1", "max"] == pytest.approx(float(quant.layer_outputs(tiny_model, "relu1", x).max()), rel=1e-5)

    trap = quant.convert(quant.qat_converter(qat, int8_io=False), tmp_path / "trap.tflite")
    assert quant.io_dtypes(trap) == (np.dtype(np.float32), np.dtype(np.float32))
    assert quant.op_names(trap)[0] == "QUANTIZE" and quant.op_names(trap)[-1] == "DEQUANTIZE"
    fixed = quant.convert(quant.qat_converter(qat, int8_io=True), tmp_path / "fixed.tflite")
    assert quant.io_dtypes(fixed) == (np.dtype(np.int8), np.dtype(np.int8))
    assert {str(t["dtype"]) for t in quant.weight_tensors(fixed) if t["role"] == "weights"} == {"int8"}


def test_weight_sweep_rows(tiny_model):
    x, y = images(32, seed=4), np.arange(32) % 10
    sweep = quant.weight_sweep(tiny_model, x, y, bits_list=(8, 2), schemes=("symmetric",), progress=False)
    assert len(sweep) == 1 + 2 * 2
    sq = sweep.set_index(["granularity", "bits"])["sqnr_db"]
    assert sq["per-channel", 8] > sq["per-channel", 2] and sq["per-tensor", 8] > sq["per-tensor", 2]
    assert sq["per-channel", 8] >= sq["per-tensor", 8]
    with pytest.raises(ValueError, match="from 1 to 16"):
        quant.weight_sweep(tiny_model, x, y, bits_list=(0,), progress=False)
