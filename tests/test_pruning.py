"""labkit.pruning and labkit.structured on the tiny models: masks against tfmot, prune + fine-tune,
the cache, sensitivity, targets, m:n, filter surgery with and without batch norm, bad settings."""
import dataclasses

import numpy as np
import pandas as pd
import pytest

from labkit import measure, models, pruning, structured

PLAN = models.FineTune(train_subset=256, batch_size=64, learning_rate=1e-3)   # 4 steps


# ----------------------------------------------------------------------------- masks

def test_magnitude_mask_keeps_the_largest_weights_and_ties():
    weights = np.random.default_rng(3).normal(size=(7, 11)).astype(np.float32)
    mask = pruning.magnitude_mask(weights, 0.6)
    assert mask.sum() == round(77 * 0.4)
    assert np.abs(weights[mask]).min() > np.abs(weights[~mask]).max()
    # keep 2 of 4, but the second largest magnitude is tied: both ties are kept, as tfmot does
    mask = pruning.magnitude_mask(np.array([0.1, -0.5, 0.5, 0.9]), 0.5)
    assert mask.tolist() == [False, True, True, True]


@pytest.mark.parametrize("sparsity", [0.5, 0.8])
def test_numpy_masks_equal_tfmot_masks(tiny_model, sparsity):
    ours = pruning.layer_masks(tiny_model, sparsity)
    theirs = pruning.tfmot_masks(tiny_model, sparsity)
    assert set(ours) == set(theirs) == {"conv1", "conv2", "dense1", "logits"}
    for name in ours:
        assert np.array_equal(ours[name], theirs[name]), name


def test_global_masks_use_one_threshold(tiny_model):
    masks = pruning.global_masks(tiny_model, 0.7)
    kernels = {name: np.abs(models.kernel(tiny_model, name)) for name in masks}
    kept = np.concatenate([kernels[n][masks[n]] for n in masks])
    dropped = np.concatenate([kernels[n][~masks[n]] for n in masks])
    assert kept.min() > dropped.max()
    assert abs(dropped.size - 0.7 * sum(m.size for m in masks.values())) <= 1
    # tfmot reproduces them when each layer gets the sparsity the global cut implies
    implied = pruning.mask_sparsity(masks).drop("all kernels").to_dict()
    theirs = pruning.tfmot_masks(tiny_model, implied)
    assert all(np.sum(masks[n] != theirs[n]) <= 1 for n in masks)


def test_apply_masks_zeroes_a_copy(tiny_model):
    pruned = pruning.apply_masks(tiny_model, pruning.layer_masks(tiny_model, {"dense1": 0.5}))
    table = pruning.layer_sparsity(pruned)
    assert table.loc["dense1", "sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert table.loc["conv1", "zeros"] == 0
    assert np.count_nonzero(models.kernel(tiny_model, "dense1") == 0) == 0, \
        "the original must stay dense"


# ------------------------------------------------------------------------ prune + fine-tune + strip

def test_prune_reaches_per_layer_targets_and_spares_the_original(tiny_model, splits):
    before = models.kernel(tiny_model, "conv2").copy()
    # 8 steps: traced at 1 and 5
    plan = models.FineTune(train_subset=256, batch_size=32, learning_rate=1e-3)
    settings = pruning.PruneSettings({"conv2": 0.5, "dense1": 0.7}, plan, ramp=0.5, frequency=1)
    pruned, record = pruning.prune(tiny_model, settings, splits, progress=False)
    table = pruning.layer_sparsity(pruned)
    assert table.loc["conv2", "sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert table.loc["dense1", "sparsity"] == pytest.approx(0.7, abs=1e-3)
    assert table.loc["conv1", "zeros"] == 0 and table.loc["logits", "zeros"] == 0
    assert [layer.name for layer in pruned.layers] == [layer.name for layer in tiny_model.layers], \
        "stripped"
    assert np.array_equal(models.kernel(tiny_model, "conv2"), before)
    trace = pd.DataFrame(record["trace"])
    assert set(trace["layer"]) == {"conv2", "dense1"}
    # polynomial: the first mask update asks for less than the target, the last for the target
    dense1 = trace[trace["layer"] == "dense1"].sort_values("step")
    assert dense1["sparsity"].iloc[0] < 0.7
    assert dense1["sparsity"].iloc[-1] == pytest.approx(0.7, abs=1e-3)
    assert record["frequency"] == 1 and len(record["history"]["loss"]) == 1


def test_prune_one_sparsity_for_every_layer_and_2_of_4(tiny_model, splits):
    settings = pruning.PruneSettings(0.5, PLAN, schedule="constant")
    pruned, record = pruning.prune(tiny_model, settings, splits, progress=False)
    assert record["frequency"] == 1   # None: a twentieth of 4 steps, at least 1
    sparsity = pruning.layer_sparsity(pruned)["sparsity"].drop("all kernels")
    assert sparsity.round(2).tolist() == [0.5] * 4
    two_four_settings = pruning.PruneSettings(0.5, PLAN, schedule="constant",
                                              layers=["conv2", "dense1"], m_by_n=(2, 4))
    two_four, _ = pruning.prune(tiny_model, two_four_settings, splits, progress=False)
    for name in ("conv2", "dense1"):
        assert pruning.m_by_n_violations(models.kernel(two_four, name), 2, 4) == 0
        assert pruning.m_by_n_violations(models.kernel(tiny_model, name), 2, 4) > 0


def test_cached_prune_keys_on_the_input_models_weights(tmp_path, tiny_model, splits):
    settings = pruning.PruneSettings(0.5, PLAN)
    first, record = pruning.cached_prune("p", tiny_model, settings, splits, directory=tmp_path,
                                         progress=False)
    again, record_again = pruning.cached_prune("p", tiny_model, settings, splits,
                                               directory=tmp_path, progress=False)
    assert not record["cached"] and record_again["cached"]
    np.testing.assert_array_equal(models.kernel(first, "dense1"), models.kernel(again, "dense1"))
    other = models.clone_with_weights(tiny_model)   # same settings, different starting weights
    other.get_layer("dense1").kernel.assign(2 * other.get_layer("dense1").kernel)
    _, record_other = pruning.cached_prune("p", other, settings, splits, directory=tmp_path,
                                           progress=False)
    assert not record_other["cached"], \
        "a different input model must not load the first model's entry"
    assert record_other["inputs"] != record["inputs"]
    assert len(list(tmp_path.glob("p-*.keras"))) == 2
    assert record["settings"] == {"targets": 0.5, "plan": dataclasses.asdict(PLAN),
                                  "schedule": "polynomial", "ramp": 0.6, "frequency": None,
                                  "layers": None, "m_by_n": None}


def test_schedule_curves():
    schedule = pruning.polynomial_schedule(0.8, end_step=20, frequency=5)
    polynomial = pruning.schedule_curve(schedule, 30)
    assert polynomial["sparsity"].iloc[0] == 0.0
    assert polynomial["sparsity"].iloc[20:].eq(polynomial["sparsity"].iloc[20]).all()
    assert polynomial["sparsity"].iloc[20] == pytest.approx(0.8)
    assert polynomial["sparsity"].is_monotonic_increasing
    assert list(polynomial.index[polynomial["update"]]) == [0, 5, 10, 15, 20]
    constant = pruning.schedule_curve(pruning.constant_schedule(0.6, frequency=4), 9)
    assert np.allclose(constant["sparsity"], 0.6)
    assert list(constant.index[constant["update"]]) == [0, 4, 8]


# -------------------------------------------------------------------------- sensitivity and targets

def test_sensitivity_sweep_matches_pruning_by_hand(tiny_model, splits):
    x, y = splits.x_val[:300], splits.y_val[:300]
    before = [w.copy() for w in tiny_model.get_weights()]
    sweep = pruning.sensitivity_sweep(tiny_model, x, y, sparsities=(0.5, 0.95),
                                      layers=["conv1", "dense1"], progress=False)
    assert list(sweep.columns) == ["layer", "sparsity", "val_accuracy", "drop"]
    assert sweep.groupby("layer")["sparsity"].apply(list).to_dict() == {
        "conv1": [0.0, 0.5, 0.95], "dense1": [0.0, 0.5, 0.95]}
    base = measure.accuracy(measure.tf_function(tiny_model), x, y)
    assert (sweep.loc[sweep["sparsity"] == 0, "val_accuracy"] == base).all()
    np.testing.assert_allclose(sweep["drop"], base - sweep["val_accuracy"])
    by_hand = pruning.apply_masks(tiny_model, pruning.layer_masks(tiny_model, {"conv1": 0.95}))
    row = sweep[(sweep["layer"] == "conv1") & (sweep["sparsity"] == 0.95)].iloc[0]
    assert row["val_accuracy"] == measure.accuracy(measure.tf_function(by_hand), x, y)
    assert sweep["val_accuracy"].nunique() > 1, \
        "pruning changed no prediction: were the masks applied?"
    # the working copy was restored, the model untouched
    for w, w0 in zip(tiny_model.get_weights(), before):
        np.testing.assert_array_equal(w, w0)


def synthetic_sweep():
    grid = [0.0, 0.5, 0.9]
    accuracy = np.array([0.99, 0.989, 0.98, 0.99, 0.90, 0.50])
    return pd.DataFrame({"layer": ["big"] * 3 + ["small"] * 3, "sparsity": grid * 2,
                         "val_accuracy": accuracy, "drop": 0.99 - accuracy})


def test_targets_reach_the_overall_sparsity_and_spare_sensitive_layers():
    weights = {"big": 1000, "small": 10}
    targets = pruning.targets_from_sensitivity(synthetic_sweep(), weights, 0.5)
    overall = sum(weights[n] * targets[n] for n in weights) / sum(weights.values())
    assert overall == pytest.approx(0.5, abs=1e-6)
    assert targets["small"] == 0.0
    assert pruning.targets_from_sensitivity(synthetic_sweep(), weights, 0.0) == {"big": 0.0,
                                                                                 "small": 0.0}
    with pytest.raises(ValueError, match="beyond the swept range"):
        pruning.targets_from_sensitivity(synthetic_sweep(), weights, 0.95)
    with pytest.raises(ValueError, match="no sensitivity curve"):
        pruning.targets_from_sensitivity(synthetic_sweep(), {"other": 5}, 0.5)


def test_cached_sweep_is_keyed_by_the_model(tmp_path, tiny_model, splits, monkeypatch):
    class Small:   # the validation split cut down: the sweep itself is tested above
        x_val, y_val = splits.x_val[:100], splits.y_val[:100]
    first = pruning.cached_sweep(tiny_model, Small, (0.5,), ["logits"], directory=tmp_path,
                                 progress=False)
    monkeypatch.setattr(pruning, "sensitivity_sweep",
                        lambda *a, **k: pytest.fail("recomputed a cached sweep"))
    # read back from the CSV either way: the fresh and the cached sweep hold the same floats
    pd.testing.assert_frame_equal(pruning.cached_sweep(tiny_model, Small, (0.5,), ["logits"],
                                                       directory=tmp_path), first, check_exact=True)
    monkeypatch.undo()
    other = models.clone_with_weights(tiny_model)
    other.get_layer("logits").kernel.assign(-other.get_layer("logits").kernel)
    pruning.cached_sweep(other, Small, (0.5,), ["logits"], directory=tmp_path, progress=False)
    assert len(list(tmp_path.glob("sensitivity-*.csv"))) == 2
    assert not list(tmp_path.glob(".tmp-*")), "a temporary file was left behind"


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
    # the other two filters' groups stay dense
    assert pruning.m_by_n_violations(wrong_axis) == 3 * 3 * 2 * 2


def test_target_checks():
    table = pd.DataFrame({"accuracy": [0.99, 0.988, 0.984], "gzip_bytes": [300, 100, 150],
                          "macs": [400, 400, 150], "latency_p50_us": [100.0, 100.0, 70.0]},
                         index=["baseline", "unstructured", "structured"])
    checks = pruning.target_checks(table)
    assert checks["met"].tolist() == [True, True, True, False, False]
    assert checks["measured"].iloc[2] == pytest.approx(400 / 150)


# ----------------------------------------------------------------------------- structured surgery

KEPT = {"conv1": np.array([0, 2, 3]), "conv2": np.array([1, 4, 5, 7]),
        "dense1": np.arange(0, 16, 3)}


@pytest.mark.parametrize("fixture", ["tiny_bn_model", "tiny_plain_model"])
def test_removing_zeroed_filters_leaves_outputs_unchanged(fixture, request, images):
    model = request.getfixturevalue(fixture)
    zeroed = structured.zero_filters(model, KEPT)
    small = structured.shrink(zeroed, KEPT)
    # with or without batch norm, as given
    assert structured.layout(small) == structured.layout(model)
    np.testing.assert_allclose(small(images, training=False).numpy(),
                               zeroed(images, training=False).numpy(), atol=1e-5)
    assert [models.kernel(small, n).shape[-1] for n in ("conv1", "conv2", "dense1")] == [3, 4, 6]
    assert measure.count_macs(small) < measure.count_macs(model)
    # the kept weights are the original ones (not retrained, not shuffled)
    np.testing.assert_array_equal(models.kernel(small, "conv1"),
                                  models.kernel(model, "conv1")[..., KEPT["conv1"]])
    assert not np.allclose(small(images, training=False).numpy(),
                           model(images, training=False).numpy(), atol=1e-3)


def test_a_zero_kernel_alone_is_not_a_dead_filter(tiny_bn_model, images):
    """Batch norm adds its shift after a zero filter, so removing it changes the outputs."""
    copy = models.clone_with_weights(tiny_bn_model)
    kernel = copy.get_layer("conv1").kernel.numpy()
    kernel[..., np.setdiff1d(np.arange(4), KEPT["conv1"])] = 0
    copy.get_layer("conv1").kernel.assign(kernel)
    small = structured.shrink(copy, {"conv1": KEPT["conv1"]})
    difference = small(images, training=False).numpy() - copy(images, training=False).numpy()
    assert np.abs(difference).max() > 1e-3


def test_strongest_l1_keeps_the_largest_filters(tiny_model):
    kept = structured.strongest(tiny_model, {"conv2": 3})["conv2"]
    norms = np.abs(models.kernel(tiny_model, "conv2")).sum(axis=(0, 1, 2))
    assert sorted(kept) == sorted(np.argsort(norms)[-3:])


def test_strongest_io_ranks_as_the_pipeline_thinned(tiny_plain_model):
    """The in x out score, written out the way pipeline.thin computed it."""
    kernel2 = models.kernel(tiny_plain_model, "conv2")
    w1, w2 = models.kernel(tiny_plain_model, "dense1"), models.kernel(tiny_plain_model, "logits")
    by_channel = w1.reshape(-1, 8, w1.shape[1])            # flatten is (row, column, channel)
    filters = np.abs(kernel2).sum(axis=(0, 1, 2)) * np.linalg.norm(by_channel, axis=(0, 2))
    keep_filters = np.sort(np.argsort(-filters, kind="stable")[:5])
    inflow = by_channel[:, keep_filters, :].reshape(-1, w1.shape[1])
    units = np.linalg.norm(inflow, axis=0) * np.linalg.norm(w2, axis=1)
    kept = structured.strongest(tiny_plain_model, {"conv2": 5, "dense1": 9}, "io")
    np.testing.assert_array_equal(kept["conv2"], keep_filters)
    np.testing.assert_array_equal(kept["dense1"], np.sort(np.argsort(-units, kind="stable")[:9]))


def test_thin_fine_tunes_the_smaller_model_and_caches_it(tmp_path, tiny_plain_model, splits,
                                                         images):
    keep = {"conv2": 4, "dense1": 8}
    settings = structured.ThinSettings(keep, PLAN, score="io")
    small, record = structured.cached_thin("thin", tiny_plain_model, settings, splits,
                                           directory=tmp_path, progress=False)
    strongest = structured.strongest(tiny_plain_model, keep, "io")
    surgery_only = structured.shrink(tiny_plain_model, strongest)
    assert record["kept"]["conv2"] == strongest["conv2"].tolist()
    assert models.kernel(small, "conv2").shape[-1] == 4
    assert models.kernel(small, "dense1").shape[-1] == 8
    assert not np.allclose(models.kernel(small, "dense1"), models.kernel(surgery_only, "dense1")), \
        "fine-tuned"
    again, record_again = structured.cached_thin("thin", tiny_plain_model, settings, splits,
                                                 directory=tmp_path, progress=False)
    assert record_again["cached"]
    np.testing.assert_allclose(again(images).numpy(), small(images).numpy(), atol=1e-6)


# ----------------------------------------------------------------------------- LiteRT

def test_xnnpack_report_sees_sparse_weights(tmp_path):
    model = pruning.sparse_ready_cnn(width=8)
    masks = pruning.layer_masks(model, {"pw1": 0.8, "pw2": 0.8, "pw3": 0.8})
    path = pruning.export_tflite(pruning.apply_masks(model, masks), tmp_path / "ready.tflite",
                                 sparse_encoding=True)
    report = pruning.xnnpack_report(path)
    assert report["DENSIFY ops"] >= 1 and report["sparse weights handed to XNNPACK"]
    assert report["XNNPACK sparse kernels enabled on this CPU"] == (not report["x86 CPU with AVX"])
    dense = pruning.xnnpack_report(pruning.export_tflite(model, tmp_path / "dense.tflite"))
    assert dense["DENSIFY ops"] == 0 and not dense["sparse weights handed to XNNPACK"]
    wrapped = pruning.prune_for_xnnpack(model, 0.75)  # the policy accepts this layout
    assert {layer.name for layer in wrapped.layers if layer.name.startswith("prune_low")} == {
        "prune_low_magnitude_pw1", "prune_low_magnitude_pw2", "prune_low_magnitude_pw3"}


# ----------------------------------------------------------------------------- bad settings

@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, "0.5", None, True])
def test_sparsity_outside_range_is_refused(bad):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        pruning.check_sparsity(bad)


def test_bad_settings_raise_clear_errors(tiny_model, splits):
    with pytest.raises(ValueError, match="prunable layers"):
        pruning.wrap(tiny_model, pruning.constant_schedule(0.5), layers=["conv9"])
    with pytest.raises(ValueError, match="prunable layers"):
        pruning.layer_masks(tiny_model, {"flatten": 0.5})
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        pruning.constant_schedule(1.0)
    with pytest.raises(ValueError, match="0 < m < n"):
        pruning.wrap(tiny_model, pruning.constant_schedule(0.5), m_by_n=(4, 2))
    with pytest.raises(ValueError, match="schedule must be one of"):
        pruning.PruneSettings(0.5, PLAN, schedule="cubic")
    with pytest.raises(ValueError, match="ramp"):
        pruning.PruneSettings(0.5, PLAN, ramp=0.0)
    with pytest.raises(ValueError, match="layers only with one sparsity"):
        pruning.PruneSettings({"conv2": 0.5}, PLAN, layers=["conv2"])
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        pruning.prune(tiny_model, pruning.PruneSettings({"conv2": 1.0}, PLAN), splits)
    with pytest.raises(ValueError, match="prunable layers"):
        pruning.prune(tiny_model, pruning.PruneSettings({"flatten": 0.5}, PLAN), splits)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        pruning.sensitivity_sweep(tiny_model, np.zeros((2, 28, 28, 1), np.float32), np.zeros(2),
                                  sparsities=(0.5, 1.0))
    with pytest.raises(ValueError, match="input axis"):
        pruning.m_by_n_violations(np.ones((6, 2)))
    with pytest.raises(ValueError, match="Conv2D 3x3"):
        pruning.prune_for_xnnpack(tiny_model, 0.8)  # tfmot's own message: the layout does not fit


def test_bad_structured_settings_raise_clear_errors(tiny_model):
    with pytest.raises(ValueError, match="removing every filter"):
        structured.strongest(tiny_model, {"conv1": 0})
    with pytest.raises(ValueError, match="every filter"):
        structured.shrink(tiny_model, {"conv2": []})
    with pytest.raises(ValueError, match="unknown layer"):
        structured.shrink(tiny_model, {"logits": [0]})
    with pytest.raises(ValueError, match="distinct"):
        structured.zero_filters(tiny_model, {"conv1": [0, 0]})
    with pytest.raises(ValueError, match="score must be one of"):
        structured.filter_scores(tiny_model, "conv1", "l2")
    with pytest.raises(ValueError, match="score must be one of"):
        structured.ThinSettings({"conv1": 2}, score="l2")
    with pytest.raises(ValueError, match="layout"):
        structured.shrink(pruning.sparse_ready_cnn(width=8), {})
