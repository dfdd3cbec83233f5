"""Tests for labkit.pruning on tiny models: masks against tfmot, filter surgery, m:n, targets, errors."""
import labkit

labkit.setup(seed=0)

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from labkit import measure, models, pruning  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    """An untrained baseline-shaped model with random batch-norm statistics (so BN shifts are not zero)."""
    model = models.build_baseline(models.BaselineConfig(conv_filters=(4, 8), dense_units=16))
    rng = np.random.default_rng(0)
    for name in ("bn1", "bn2"):
        layer = model.get_layer(name)
        channels = layer.get_weights()[0].shape[0]
        layer.set_weights([rng.uniform(0.5, 1.5, channels), rng.normal(0, 0.5, channels),
                           rng.normal(0, 0.5, channels), rng.uniform(0.5, 2.0, channels)])
    return model


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).uniform(0, 1, (16, 28, 28, 1)).astype(np.float32)


class FakeSplits:
    """Just enough of data.Splits for fine_tune: a few random images and labels."""
    def __init__(self, n=256):
        rng = np.random.default_rng(2)
        self.x_train = rng.uniform(0, 1, (n, 28, 28, 1)).astype(np.float32)
        self.y_train = rng.integers(0, 10, n)


# ----------------------------------------------------------------------------- masks

def test_magnitude_mask_keeps_the_largest_weights():
    weights = np.random.default_rng(3).normal(size=(7, 11)).astype(np.float32)
    mask = pruning.magnitude_mask(weights, 0.6)
    assert mask.sum() == round(77 * 0.4)
    assert np.abs(weights[mask]).min() > np.abs(weights[~mask]).max()


@pytest.mark.parametrize("sparsity", [0.5, 0.8])
def test_numpy_masks_equal_tfmot_masks(tiny, sparsity):
    ours = pruning.layer_masks(tiny, sparsity)
    theirs = pruning.tfmot_masks(tiny, sparsity)
    assert set(ours) == set(theirs) == {"conv1", "conv2", "dense1", "logits"}
    for name in ours:
        assert ours[name].shape == theirs[name].shape
        assert np.array_equal(ours[name], theirs[name]), name


def test_global_masks_use_one_threshold(tiny):
    masks = pruning.global_masks(tiny, 0.7)
    kernels = {name: np.abs(pruning.kernel_of(tiny, name)) for name in masks}
    kept = np.concatenate([kernels[n][masks[n]] for n in masks])
    dropped = np.concatenate([kernels[n][~masks[n]] for n in masks])
    assert kept.min() > dropped.max()
    total = sum(m.size for m in masks.values())
    assert abs(dropped.size - 0.7 * total) <= 1
    # tfmot reproduces them when each layer gets the sparsity the global cut implies
    implied = pruning.mask_sparsity(masks).drop("all kernels").to_dict()
    theirs = pruning.tfmot_masks(tiny, implied)
    assert all(np.sum(masks[n] != theirs[n]) <= 1 for n in masks)


def test_apply_masks_zeroes_a_copy(tiny):
    masks = pruning.layer_masks(tiny, {"dense1": 0.5})
    pruned = pruning.apply_masks(tiny, masks)
    table = pruning.layer_sparsity(pruned)
    assert table.loc["dense1", "sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert table.loc["conv1", "zeros"] == 0
    assert np.count_nonzero(pruning.kernel_of(tiny, "dense1") == 0) == 0, "the original must stay dense"


# ----------------------------------------------------------------------------- tfmot fine-tuning

def test_fine_tune_reaches_the_schedule_and_spares_the_original(tiny):
    before = pruning.kernel_of(tiny, "conv2").copy()
    wrapped = pruning.wrap(tiny, pruning.constant_schedule(0.5, frequency=1), layers=["conv2", "dense1"])
    record = pruning.fine_tune(wrapped, FakeSplits(), pruning.FineTune(256, 1, 128, 1e-3), progress=False)
    stripped = pruning.strip(wrapped)
    table = pruning.layer_sparsity(stripped)
    assert table.loc["conv2", "sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert table.loc["dense1", "sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert table.loc["conv1", "zeros"] == 0
    assert np.array_equal(pruning.kernel_of(tiny, "conv2"), before)
    trace = pd.DataFrame(record["trace"])
    assert set(trace["layer"]) == {"conv2", "dense1"}
    assert trace["sparsity"].iloc[-1] == pytest.approx(0.5, abs=1e-3)


def test_two_of_four_pattern_after_tfmot(tiny):
    wrapped = pruning.wrap(tiny, pruning.constant_schedule(0.5), layers=["conv2", "dense1"], m_by_n=(2, 4))
    pruning.fine_tune(wrapped, FakeSplits(), pruning.FineTune(256, 1, 128, 1e-3), progress=False)
    stripped = pruning.strip(wrapped)
    for name in ("conv2", "dense1"):
        assert pruning.m_by_n_violations(pruning.kernel_of(stripped, name), 2, 4) == 0
        assert pruning.m_by_n_violations(pruning.kernel_of(tiny, name), 2, 4) > 0


def test_m_by_n_counts_groups_along_the_input_axis():
    dense = np.ones((8, 3))                     # (inputs, outputs): 2 groups of 4 per output
    assert pruning.m_by_n_violations(dense) == 6
    dense[[0, 1, 4, 5], :] = 0                   # 2 zeros in every group of 4 inputs
    assert pruning.m_by_n_violations(dense) == 0
    conv = np.ones((3, 3, 8, 2))                 # (h, w, inputs, outputs)
    conv[:, :, [1, 3, 5, 7], :] = 0
    assert pruning.m_by_n_violations(conv) == 0
    wrong_axis = np.ones((3, 3, 8, 4))
    wrong_axis[..., [0, 1]] = 0                  # half the zeros, but all in two output filters:
    assert pruning.m_by_n_violations(wrong_axis) == 3 * 3 * 2 * 2  # the other two filters' groups stay dense


# ----------------------------------------------------------------------------- structured surgery

KEPT = {"conv1": np.array([0, 2, 3]), "conv2": np.array([1, 4, 5, 7]), "dense1": np.arange(0, 16, 3)}


def test_removing_zeroed_filters_leaves_outputs_unchanged(tiny, images):
    zeroed = pruning.zero_filters(tiny, KEPT)
    small = pruning.shrink(zeroed, KEPT)
    expected = zeroed(images, training=False).numpy()
    np.testing.assert_allclose(small(images, training=False).numpy(), expected, atol=1e-5)
    assert [small.get_layer(n).kernel.shape[-1] for n in ("conv1", "conv2", "dense1")] == [3, 4, 6]
    assert measure.count_params(small)["params"] < measure.count_params(tiny)["params"]
    assert measure.count_macs(small) < measure.count_macs(tiny)
    # and the kept weights are the original ones (not retrained, not shuffled)
    np.testing.assert_array_equal(small.get_layer("conv1").kernel.numpy(),
                                  pruning.kernel_of(tiny, "conv1")[..., KEPT["conv1"]])


def test_a_zero_kernel_alone_is_not_a_dead_filter(tiny, images):
    """Batch norm adds its shift after a zero filter, so removing it changes the outputs."""
    copy = models.clone_with_weights(tiny)
    kernel = copy.get_layer("conv1").kernel.numpy()
    drop = np.setdiff1d(np.arange(4), KEPT["conv1"])
    kernel[..., drop] = 0
    copy.get_layer("conv1").kernel.assign(kernel)
    small = pruning.shrink(copy, {"conv1": KEPT["conv1"]})
    difference = np.abs(small(images, training=False).numpy() - copy(images, training=False).numpy()).max()
    assert difference > 1e-3


def test_strongest_keeps_largest_l1_filters(tiny):
    kept = pruning.strongest(tiny, {"conv2": 3})["conv2"]
    norms = np.abs(pruning.kernel_of(tiny, "conv2")).sum(axis=(0, 1, 2))
    assert sorted(kept) == sorted(np.argsort(norms)[-3:])


# ----------------------------------------------------------------------------- sensitivity targets

def synthetic_sweep():
    grid = [0.0, 0.5, 0.9]
    return pd.DataFrame({"layer": ["big"] * 3 + ["small"] * 3, "sparsity": grid * 2,
                         "accuracy": [0.99, 0.989, 0.98, 0.99, 0.90, 0.50]})


def test_targets_reach_the_overall_sparsity_and_spare_sensitive_layers():
    weights = {"big": 1000, "small": 10}
    targets = pruning.targets_from_sensitivity(synthetic_sweep(), weights, 0.5)
    overall = sum(weights[n] * targets[n] for n in weights) / sum(weights.values())
    assert overall == pytest.approx(0.5, abs=1e-6)
    assert targets["small"] == 0.0
    with pytest.raises(ValueError, match="beyond the swept range"):
        pruning.targets_from_sensitivity(synthetic_sweep(), weights, 0.95)
    with pytest.raises(ValueError, match="no sensitivity curve"):
        pruning.targets_from_sensitivity(synthetic_sweep(), {"other": 5}, 0.5)


def test_schedule_curves():
    polynomial = pruning.schedule_curve(pruning.polynomial_schedule(0.8, end_step=20, frequency=5), 30)
    assert polynomial["sparsity"].iloc[0] == 0.0
    assert polynomial["sparsity"].iloc[20:].eq(polynomial["sparsity"].iloc[20]).all()
    assert polynomial["sparsity"].iloc[20] == pytest.approx(0.8)
    assert polynomial["sparsity"].is_monotonic_increasing
    assert list(polynomial.index[polynomial["update"]]) == [0, 5, 10, 15, 20]
    constant = pruning.schedule_curve(pruning.constant_schedule(0.6, frequency=4), 9)
    assert np.allclose(constant["sparsity"], 0.6)
    assert list(constant.index[constant["update"]]) == [0, 4, 8]


def test_target_checks():
    table = pd.DataFrame({"accuracy": [0.99, 0.988, 0.984], "gzip_bytes": [300, 100, 150],
                          "macs": [400, 400, 150], "latency_p50_us": [100.0, 100.0, 70.0]},
                         index=["baseline", "unstructured", "structured"])
    checks = pruning.target_checks(table)
    assert checks["met"].tolist() == [True, True, True, False, False]
    assert checks["measured"].iloc[2] == pytest.approx(400 / 150)


# ----------------------------------------------------------------------------- cache and LiteRT

def test_cache_trains_once(tmp_path, tiny):
    calls = []

    def make():
        calls.append(1)
        return models.clone_with_weights(tiny), {"note": "made"}

    first, info = pruning.cached("tiny", {"a": 1}, make, directory=tmp_path)
    second, again = pruning.cached("tiny", {"a": 1}, make, directory=tmp_path)
    assert len(calls) == 1 and again["note"] == "made" and again["settings"] == {"a": 1}
    np.testing.assert_array_equal(first.get_weights()[0], second.get_weights()[0])
    pruning.cached("tiny", {"a": 2}, make, directory=tmp_path)
    assert len(calls) == 2


def test_xnnpack_report_sees_sparse_weights(tmp_path):
    model = pruning.sparse_ready_cnn(width=8)
    masks = pruning.layer_masks(model, {"pw1": 0.8, "pw2": 0.8, "pw3": 0.8})
    path = pruning.export_tflite(pruning.apply_masks(model, masks), tmp_path / "ready.tflite", sparse_encoding=True)
    report = pruning.xnnpack_report(path)
    assert report["DENSIFY ops"] >= 1 and report["sparse weights handed to XNNPACK"]
    assert report["XNNPACK sparse kernels enabled on this CPU"] == (not report["x86 CPU with AVX"])
    wrapped = pruning.prune_for_xnnpack(model, 0.75)  # the policy accepts this layout
    assert {layer.name for layer in wrapped.layers if layer.name.startswith("prune_low")} == {
        "prune_low_magnitude_pw1", "prune_low_magnitude_pw2", "prune_low_magnitude_pw3"}


# ----------------------------------------------------------------------------- bad settings

@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, "0.5", None, True])
def test_sparsity_outside_range_is_refused(bad):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        pruning.check_sparsity(bad)


def test_bad_settings_raise_clear_errors(tiny):
    with pytest.raises(ValueError, match="prunable layers"):
        pruning.wrap(tiny, pruning.constant_schedule(0.5), layers=["conv9"])
    with pytest.raises(ValueError, match="prunable layers"):
        pruning.layer_masks(tiny, {"flatten": 0.5})
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        pruning.constant_schedule(1.0)
    with pytest.raises(ValueError, match="0 < m < n"):
        pruning.wrap(tiny, pruning.constant_schedule(0.5), m_by_n=(4, 2))
    with pytest.raises(ValueError, match="removing every filter"):
        pruning.strongest(tiny, {"conv1": 0})
    with pytest.raises(ValueError, match="every filter"):
        pruning.shrink(tiny, {"conv2": []})
    with pytest.raises(ValueError, match="unknown layer"):
        pruning.shrink(tiny, {"logits": [0]})
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        pruning.sensitivity_sweep(tiny, np.zeros((2, 28, 28, 1), np.float32), np.zeros(2), sparsities=(0.5, 1.0))
    with pytest.raises(ValueError, match="input axis"):
        pruning.m_by_n_violations(np.ones((6, 2)))
    with pytest.raises(ValueError, match="Conv2D 3x3"):
        pruning.prune_for_xnnpack(tiny, 0.8)  # tfmot's own message: the layout does not fit
