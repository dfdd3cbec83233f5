"""labkit.clustering: NumPy k-means against brute force and known answers, tfmot agreement,
whole-model clustering, sparsity preservation, sizes and bad settings (tiny models, seconds)."""
import math
import warnings

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_model_optimization as tfmot

from labkit import clustering, folding, kmeans, measure, models


def mixture(seed=0):
    """Four tight groups of scalar weights with known centres."""
    rng = np.random.default_rng(seed)
    centres = np.array([-1.0, -0.2, 0.5, 2.0])
    return centres, np.concatenate([c + 0.01 * rng.standard_normal(500) for c in centres])


# ----------------------------------------------------------------------------- NumPy k-means

def test_assign_is_the_nearest_centroid():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((40, 30))
    c = np.sort(rng.standard_normal(7))
    brute = np.argmin(np.abs(w[..., None] - c), axis=-1)
    np.testing.assert_array_equal(kmeans.assign(w, c), brute)


@pytest.mark.parametrize("init", kmeans.INITS)
def test_kmeans_recovers_known_centres(init):
    centres, w = mixture()
    codebook = kmeans.kmeans(w, 4, init, seed=0)
    np.testing.assert_allclose(codebook.centroids, centres, atol=0.01)
    history = codebook.mse_history
    assert all(b <= a + 1e-15 for a, b in zip(history, history[1:])), "Lloyd raised the error"
    # the recorded error is the error of the returned codebook, computed independently
    assert np.isclose(history[-1], np.mean((w - codebook.decode()) ** 2))


def test_starts():
    w = np.linspace(-1, 3, 1001)
    np.testing.assert_allclose(kmeans.init_centroids(w, 5, "linear"), [-1, 0, 1, 2, 3])
    # density: equal steps in probability, the last one at the largest weight
    density = kmeans.init_centroids(w, 5, "density")
    np.testing.assert_allclose(density, np.quantile(w, np.linspace(0.01, 1, 5)), atol=4 / 1000)
    # k-means++ reaches for an isolated far-away group (squared-distance sampling)
    rng = np.random.default_rng(0)
    far = np.concatenate([0.1 * rng.standard_normal(10000), np.full(10, 100.0)])
    assert kmeans.init_centroids(far, 2, "kmeans++", seed=0).max() == 100.0


def test_kmeans_leaves_an_empty_cluster_where_it_is():
    """A duplicate start (tfmot's density start has them) leaves a cluster empty; its centroid
    stays put."""
    x = np.random.default_rng(4).choice([-1.0, -0.9, 0.25, 1.0], size=200)
    codebook = kmeans.kmeans(x, 4, centroids=[-1.0, 0.6, 0.6, 1.0])
    np.testing.assert_allclose(codebook.centroids, [x[x < 0].mean(), 0.25, 0.6, 1.0], atol=1e-7)
    assert np.bincount(codebook.indices, minlength=4)[2] == 0


def test_codebook_storage_and_decode():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((100, 10)).astype(np.float32)
    codebook = kmeans.kmeans(w, 16, "linear")
    assert codebook.indices.shape == w.shape and codebook.indices.dtype == np.uint8
    np.testing.assert_array_equal(codebook.decode(), codebook.centroids[codebook.indices])
    assert codebook.index_bits() == 4
    assert codebook.storage_bytes() == 16 * 4 + 1000 * 4 // 8
    assert kmeans.kmeans(w, 5, "linear").index_bits() == 3


# ----------------------------------------------------------------------------- bad settings

@pytest.mark.parametrize("k", [1, 0, -3, 2.5, True, "8"])
def test_bad_cluster_counts(k):
    with pytest.raises(ValueError, match="k"):
        kmeans.check_clusters(k, 100)


def test_bad_settings_raise_clear_errors(tiny_model):
    n_conv1 = models.kernel(tiny_model, "conv1").size          # 3 * 3 * 1 * 4 = 36
    with pytest.raises(ValueError, match=f"more than the {n_conv1} weights of layer conv1"):
        clustering.cluster_model(tiny_model, n_conv1 + 1)
    with pytest.raises(ValueError, match="at least 2"):
        clustering.cluster_model(tiny_model, 1)
    with pytest.raises(ValueError, match="choose one of"):
        clustering.cluster_model(tiny_model, 4, init="random")
    with pytest.raises(ValueError, match="only Conv2D and Dense"):
        clustering.cluster_model(tiny_model, 4, layers=("bn1",))
    with pytest.raises(ValueError, match="at least one"):
        clustering.cluster_model(tiny_model, 4, layers=())
    with pytest.raises(ValueError, match="k >= 3"):
        clustering.cluster_model(tiny_model, 2, preserve_sparsity=True)
    with pytest.raises(ValueError, match="no layer named"):
        clustering.cluster_model(tiny_model, 4, layers=("dense9",))
    with pytest.raises(ValueError, match="splits"):
        clustering.cluster(tiny_model, clustering.ClusterSettings(
            4, models.FineTune(train_subset=64)))
    with pytest.raises(ValueError, match="choose one of"):
        clustering.ClusterSettings(4, init="random")
    with pytest.raises(ValueError, match="starting centroids"):
        kmeans.kmeans(np.arange(10.0), 3, centroids=[0.0, 1.0])


def test_sparse_check_predicts_tfmot_failure(tiny_model):
    """Too few negative weights for their share of centroids: our check and tfmot agree."""
    copy = models.clone_with_weights(tiny_model)
    layer = copy.get_layer("conv1")
    w = np.zeros(layer.kernel.shape, np.float32)
    # 3 negative, 7 positive
    w.flat[:3], w.flat[3:10] = -0.1 * np.arange(1, 4), 0.1 * np.arange(1, 8)
    layer.set_weights([w])
    assert clustering.sparse_split(w, 32) == (9, 22)
    with pytest.raises(ValueError, match="only 3 negative and 7 positive"):
        clustering.cluster_model(copy, 32, layers=("conv1",), preserve_sparsity=True)
    with pytest.raises(tf.errors.InvalidArgumentError, match="num_to_sample"):
        wrapper = tfmot.clustering.keras.cluster_weights(layer, number_of_clusters=32,
                                                         preserve_sparsity=True)
        wrapper.build(layer.input_shape)
    clustering.check_sparse_clusters(w, 4, "conv1")   # (1, 2) centroids: enough weights


# ----------------------------------------------------------------------------- against tfmot

def test_starts_agree_with_tfmot(tiny_model):
    table = clustering.compare_with_tfmot(tiny_model, "dense1", 8, iterations=30)
    for init in ("linear", "density"):
        assert table.loc[init, "centroid_gap_max"] <= table.loc[init, "tolerance"], table
    # tfmot's own gathered kernel has exactly the error our nearest-centroid assignment predicts
    np.testing.assert_allclose(table["tfmot_kernel_mse"], table["tfmot_start_mse"], rtol=1e-4)
    assert (table["numpy_kmeans_mse"] <= table["numpy_start_mse"]).all()


def test_tfmot_skips_a_conv_without_bias_per_channel_and_labkit_says_why(tiny_model):
    """tfmot 0.8.1 counts a Conv2D's channels with its last trainable weight, taken for the bias:
    a conv before a batch norm has none, so cluster_per_channel leaves it unwrapped with only a
    warning."""
    layer = models.clone_with_weights(tiny_model).get_layer("conv2")
    assert not layer.use_bias
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = tfmot.clustering.keras.cluster_weights(layer, number_of_clusters=4,
                                                        cluster_per_channel=True)
    assert type(result).__name__ == "Conv2D" and "per-channel" in str(caught[-1].message)
    with pytest.raises(ValueError, match="needs a Conv2D with a bias"):
        clustering.tfmot_layer_clusters(tiny_model, "conv2", 4, per_channel=True)
    with pytest.raises(ValueError, match="more than the 9 weights"):   # conv1: 3 x 3 x 1 a channel
        clustering.tfmot_layer_clusters(folding.fold_batchnorm(tiny_model), "conv1", 16,
                                        per_channel=True)


def test_folding_and_codebooks(tiny_bn_model):
    """Folding spreads a per-tensor codebook; folding first keeps k values in the file; per
    channel keeps k per channel, with k centroids for each channel."""
    k, channels = 4, models.kernel(tiny_bn_model, "conv2").shape[-1]
    table = clustering.folding_and_codebooks(tiny_bn_model, "conv2", k)
    spread, folded_first, per_channel = table.index
    assert table.loc[spread, "distinct_in_file_kernel"] > k
    assert table.loc[folded_first, "distinct_in_file_kernel"] <= k
    assert (table["most_distinct_per_channel"] <= k).all()
    assert table.loc[per_channel, "centroids_stored"] == k * channels
    mse = table["mse_vs_folded_float"]
    assert mse[per_channel] < mse[folded_first]


# ----------------------------------------------------------------------------- whole model

PLAN = models.FineTune(train_subset=256, batch_size=64, learning_rate=1e-3)   # 4 steps


def test_cluster_fine_tune_strip(tiny_model, splits):
    before = [w.copy() for w in tiny_model.get_weights()]
    # no plan: clustered, not fine-tuned
    start, record_start = clustering.cluster(tiny_model, clustering.ClusterSettings(4))
    stripped, record = clustering.cluster(tiny_model, clustering.ClusterSettings(4, PLAN), splits,
                                          progress=False)
    assert "history" not in record_start and len(record["history"]["loss"]) == 1
    assert record["layers"] == ["conv1", "conv2", "dense1", "logits"]
    assert all(n <= 4 for n in clustering.unique_values(start).values())
    assert all(n <= 4 for n in clustering.unique_values(stripped).values())
    assert [l.name for l in stripped.layers] == [l.name for l in tiny_model.layers]
    for w, w0 in zip(tiny_model.get_weights(), before):   # the caller's model is untouched
        np.testing.assert_array_equal(w, w0)
    assert not np.array_equal(models.kernel(stripped, "dense1"), models.kernel(start, "dense1")), \
        "fine-tuning should move the centroids"


def test_preserve_sparsity_keeps_zeros(tiny_model, splits):
    pruned = models.clone_with_weights(tiny_model)
    w = models.kernel(pruned, "dense1").copy()
    w[np.abs(w) < np.median(np.abs(w))] = 0.0
    pruned.get_layer("dense1").set_weights([w, pruned.get_layer("dense1").get_weights()[1]])
    results = {}
    for preserve in (False, True):
        settings = clustering.ClusterSettings(8, PLAN, layers=("dense1",),
                                              preserve_sparsity=preserve)
        clustered, _ = clustering.cluster(pruned, settings, splits, progress=False)
        results[preserve] = models.kernel(clustered, "dense1")
    kept = results[True]
    assert np.all(kept[w == 0] == 0) and np.unique(kept).size <= 8
    assert np.mean(results[False] == 0) < 0.1, \
        "without preserve_sparsity training should revive the zeros"


def test_cached_cluster_keys_on_the_input_models_weights(tmp_path, tiny_model, splits):
    settings = clustering.ClusterSettings(4, PLAN)
    model, record = clustering.cached_cluster(tiny_model, settings, splits, directory=tmp_path,
                                              progress=False)
    again, record_again = clustering.cached_cluster(tiny_model, settings, splits,
                                                    directory=tmp_path, progress=False)
    assert not record["cached"] and record_again["cached"]
    np.testing.assert_array_equal(models.kernel(model, "dense1"), models.kernel(again, "dense1"))
    other = models.clone_with_weights(tiny_model)   # same settings, different weights: a new entry
    other.get_layer("conv1").kernel.assign(2 * other.get_layer("conv1").kernel)
    _, record_other = clustering.cached_cluster(other, settings, splits, directory=tmp_path,
                                                progress=False)
    assert not record_other["cached"] and record_other["inputs"] != record["inputs"]
    names = sorted(p.name.rsplit("-", 1)[0] for p in tmp_path.glob("*.keras"))
    assert names == ["clustered-k4", "clustered-k4"]


def test_sizes(tmp_path, tiny_model):
    model = clustering.strip(clustering.cluster_model(tiny_model, 4))
    table = clustering.storage_table(model)
    n = models.kernel(model, "dense1").size
    assert table.loc["dense1", "codebook_index_bytes"] == 4 * 4 + math.ceil(n * 2 / 8)
    assert (table["entropy_coded_bytes"] <= table["codebook_index_bytes"]).all()
    assert table.loc["total", "weights"] == measure.count_params(model)["params"]

    plain = models.save_tflite(tiny_model, tmp_path / "plain.tflite")
    clustered = clustering.export_tflite(model, "clustered", directory=tmp_path)
    size_gap = abs(measure.size_bytes(clustered) - measure.size_bytes(plain))
    assert size_gap < 0.01 * measure.size_bytes(plain)
    assert measure.gzip_bytes(clustered) < measure.gzip_bytes(plain)
    in_file = clustering.tflite_unique_values(clustered, min_size=20)
    assert set(in_file.index) == {"conv1", "conv2", "dense1", "logits"}   # conv1: 36 weights >= 20
    assert (in_file.loc[["dense1", "logits"], "unique_values"] <= 4).all()
    # batch norm folded into the convolutions scales each output channel: more than k values in
    # the file
    assert (in_file.loc[["conv1", "conv2"], "unique_values"] > 4).all()
    assert "dense1" not in clustering.tflite_unique_values(clustered, min_size=n + 1).index
