"""Tests for labkit.graph (notebook 05): freezing, Grappler, batch-norm folding, XLA."""
import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from labkit import folding, graph, measure, models


def randomize_batchnorm(model, seed=0):
    """Give every BatchNormalization non-trivial statistics, so that folding has something to
    fold."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            shapes = [w.shape for w in layer.get_weights()]
            values = {"gamma": rng.uniform(0.5, 1.5, shapes[0]),
                      "beta": rng.normal(0, 0.5, shapes[0]),
                      "moving_mean": rng.normal(0, 0.5, shapes[0]),
                      "moving_variance": rng.uniform(0.5, 2.0, shapes[0])}
            layer.set_weights([values[w.name.split("/")[-1].split(":")[0]].astype(np.float32)
                               for w in layer.weights])
    return model


@pytest.fixture(scope="module")
def tiny(tiny_model):
    """A copy of conftest's tiny_model (trained, so its biases are non-zero) with
    far-from-identity batch norms."""
    return randomize_batchnorm(models.clone_with_weights(tiny_model))


@pytest.fixture(scope="module")
def frozen(tiny):
    return graph.freeze(tiny)


# ---------------------------------------------------------------------------- freezing and Grappler

def test_freeze_turns_variable_reads_into_constants(tiny, frozen, images):
    before, function = frozen
    after = function.graph.as_graph_def()
    counts_before, counts_after = graph.op_counts(before), graph.op_counts(after)
    n_variables = len(tiny.weights)  # every weight is read once, optimizer-free inference graph
    assert counts_before["ReadVariableOp"] == n_variables
    # the image and one resource handle per variable
    assert counts_before["Placeholder"] == 1 + n_variables
    assert counts_after["ReadVariableOp"] == 0 and counts_after["Placeholder"] == 1
    assert counts_after["Const"] >= n_variables
    table = graph.op_table(before=before, after=after)
    assert table.loc["total", "after"] == len(after.node)
    runner = graph.graph_runner(after, function.inputs, function.outputs, "frozen")
    np.testing.assert_allclose(runner(images), tiny(images, training=False).numpy(), atol=1e-5)


def test_grappler_fuses_conv_batchnorm_relu_and_keeps_the_output(tiny, frozen, images):
    _, function = frozen
    optimized = graph.grappler(function)
    counts = graph.op_counts(optimized)
    assert counts["FusedBatchNormV3"] == 0 and counts["Conv2D"] == 0
    assert counts["_FusedConv2D"] == 2
    fused = [list(n.attr["fused_ops"].list.s) for n in optimized.node if n.op == "_FusedConv2D"]
    assert all(ops == [b"FusedBatchNorm", b"Relu"] for ops in fused), fused
    # conv, bn, relu x2 blocks + pools + flatten + two dense (MatMul, BiasAdd, one Relu) = 14
    assert graph.compute_op_count(function.graph.as_graph_def()) == 14
    # 2 fused convs, 2 pools, reshape, 2 fused matmuls
    assert graph.compute_op_count(optimized) == 7
    gone = graph.disappeared(function.graph.as_graph_def(), optimized)["gone"]
    assert {"FusedBatchNormV3", "Conv2D", "NoOp"} <= set(gone)
    runner = graph.graph_runner(optimized, function.inputs, function.outputs, "grappler")
    np.testing.assert_allclose(runner(images), tiny(images, training=False).numpy(), atol=1e-4)


def test_constant_folding_drops_an_add_of_zeros():
    model = models.build_cnn((4,), 8)  # untrained: its dense biases are all zero
    _, function = graph.freeze(model)
    assert graph.op_counts(function.graph.as_graph_def())["BiasAdd"] == 2
    assert graph.op_counts(graph.grappler(function, passes=("dependency",)))["BiasAdd"] == 2
    assert graph.op_counts(graph.grappler(function, passes=("constfold",)))["BiasAdd"] == 0


def test_grappler_rejects_unknown_passes(frozen):
    with pytest.raises(ValueError, match="constfold"):
        graph.grappler(frozen[1], passes=("constfold", "fold_everything"))
    with pytest.raises(ValueError):
        graph.grappler(frozen[1], passes=())


# ----------------------------------------------------------------------------- batch-norm folding

def test_fold_conv_bn_equals_tensorflow_conv_then_batchnorm():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 6, 6, 3)).astype(np.float32)
    kernel = rng.normal(size=(3, 3, 3, 5)).astype(np.float32)
    bias, beta, mean = (rng.normal(size=5).astype(np.float32) for _ in range(3))
    gamma = rng.uniform(0.5, 2, 5).astype(np.float32)
    variance = rng.uniform(0.1, 3, 5).astype(np.float32)
    reference = tf.nn.batch_normalization(tf.nn.conv2d(x, kernel, 1, "SAME") + bias,
                                          mean, variance, beta, gamma, 1e-3).numpy()
    new_kernel, new_bias = folding.fold_conv_bn(kernel, bias, gamma, beta, mean, variance, 1e-3)
    folded = (tf.nn.conv2d(x, new_kernel, 1, "SAME") + new_bias).numpy()
    np.testing.assert_allclose(folded, reference, atol=1e-5)


def test_fold_batchnorm_removes_every_bn_and_keeps_the_outputs(tiny, images):
    folded = folding.fold_batchnorm(tiny)
    assert not any(isinstance(l, keras.layers.BatchNormalization) for l in folded.layers)
    convs = [l for l in folded.layers if isinstance(l, keras.layers.Conv2D)]
    assert len(convs) == 2 and all(c.use_bias for c in convs)
    bn_params = sum(l.count_params() for l in tiny.layers
                    if isinstance(l, keras.layers.BatchNormalization))
    conv_biases = sum(c.filters for c in convs)
    assert folded.count_params() == tiny.count_params() - bn_params + conv_biases
    assert graph.max_abs_diff(tiny, folded, images, batch_size=5) <= 1e-4


def test_fold_batchnorm_gives_the_layout_of_build_cnn_without_batchnorm(tiny, images):
    folded = folding.fold_batchnorm(tiny)
    plain = models.build_cnn((4, 8), 16, batchnorm=False)
    def layout(model):
        return [(l.name, type(l).__name__) for l in model.layers]
    assert layout(folded) == layout(plain)
    for name in ("conv1", "conv2"):
        conv = folded.get_layer(name)
        assert conv.use_bias and conv.activation is keras.activations.relu, name
    # same shapes, same order: pipeline and structured rely on it
    plain.set_weights(folded.get_weights())
    assert graph.max_abs_diff(tiny, plain, images) <= 1e-4
    assert models.weight_layers(folded) == models.weight_layers(tiny)


def test_fold_keeps_a_relu_it_cannot_take_over(images):
    keras.utils.set_random_seed(2)
    model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Conv2D(3, 3, use_bias=False),
                              keras.layers.BatchNormalization(), keras.layers.ReLU(max_value=0.5),
                              keras.layers.Flatten(), keras.layers.Dense(4)])
    randomize_batchnorm_partial(model)
    folded = folding.fold_batchnorm(model)
    assert [type(l).__name__ for l in folded.layers[1:]] == ["Conv2D", "ReLU", "Flatten", "Dense"]
    assert folded.layers[1].activation is keras.activations.linear
    assert graph.max_abs_diff(model, folded, images) <= 1e-5


def test_fold_handles_a_conv_bias_and_a_bn_without_scale_or_center(images):
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Conv2D(3, 3, use_bias=True),
                              keras.layers.BatchNormalization(scale=False),
                              keras.layers.Conv2D(2, 3, use_bias=False),
                              keras.layers.BatchNormalization(center=False),
                              keras.layers.Flatten(), keras.layers.Dense(4)])
    model.layers[0].set_weights([model.layers[0].kernel.numpy(), np.arange(3, dtype=np.float32)])
    randomize_batchnorm_partial(model)
    folded = folding.fold_batchnorm(model)
    assert [type(l).__name__ for l in folded.layers[1:]] == ["Conv2D", "Conv2D", "Flatten", "Dense"]
    assert graph.max_abs_diff(model, folded, images) <= 1e-4


def randomize_batchnorm_partial(model):
    rng = np.random.default_rng(4)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.set_weights([rng.uniform(0.5, 2, w.shape).astype(np.float32)
                               for w in layer.get_weights()])


def test_fold_leaves_a_conv_with_an_activation_alone(images):
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((28, 28, 1)),
                              keras.layers.Conv2D(3, 3, activation="relu"),
                              keras.layers.BatchNormalization(),
                              keras.layers.GlobalAveragePooling2D()])
    randomize_batchnorm_partial(model)
    folded = folding.fold_batchnorm(model)
    assert any(isinstance(l, keras.layers.BatchNormalization) for l in folded.layers)
    assert graph.max_abs_diff(model, folded, images) <= 1e-5


def test_fold_refuses_a_model_with_branches():
    inputs = keras.Input((28, 28, 1))
    a = keras.layers.Conv2D(2, 3, padding="same")(inputs)
    b = keras.layers.Conv2D(2, 1)(inputs)
    model = keras.Model(inputs, keras.layers.Add()([a, b]))
    with pytest.raises(ValueError, match="chain"):
        folding.fold_batchnorm(model)


def test_the_tflite_converter_folds_batchnorm_like_we_do(tiny, tmp_path):
    path = models.save_tflite(tiny, tmp_path / "tiny.tflite")
    ops = graph.tflite_ops(path)
    assert not ops["op"].str.contains("NORM|BATCH|RELU$", regex=True).any(), ops["op"].tolist()
    convs = ops[ops["op"] == "CONV_2D"]
    assert len(convs) == 2 and (convs["fused_activation"] == "RELU").all()
    folded = folding.fold_batchnorm(tiny)
    ours = [l.get_weights() for l in folded.layers if isinstance(l, keras.layers.Conv2D)]
    theirs = graph.tflite_conv_weights(path)
    assert len(theirs) == len(ours)
    for (k_ours, b_ours), (k_theirs, b_theirs) in zip(ours, theirs):
        np.testing.assert_allclose(k_theirs, k_ours, atol=1e-5)
        np.testing.assert_allclose(b_theirs, b_ours, atol=1e-5)


def test_the_tflite_converter_folds_and_fuses_in_its_own_mlir_passes_not_grappler(tiny):
    report = graph.converter_passes(tiny)
    assert report["grappler_passes"] == []   # the default converter hands Grappler nothing to run
    ops = report["ops"]
    assert list(ops.columns) == ["TF graph in", "after PrepareTF", "after LegalizeTF",
                                 "after Optimize"]
    assert ops.loc["tf.FusedBatchNormV3", "TF graph in"] == 2
    assert ops.loc["tf.FusedBatchNormV3"].iloc[1:].sum() == 0
    # batch norm gone into the filter, in PrepareTF
    assert ops.loc["tfl.conv_2d", "after PrepareTF"] == 2
    after = ops["after Optimize"]
    # every op legalized to TFLite
    assert not any(op.startswith("tf.") and n for op, n in after.items())
    # fused into conv / fully connected
    assert after.get("tfl.relu", 0) == 0 and after.get("tfl.add", 0) == 0
    assert after["tfl.conv_2d"] == 2 and after["tfl.fully_connected"] == 2


def test_mlir_op_counts_reads_both_op_forms_and_skips_constants():
    text = ('%0 = "tfl.conv_2d"(%arg0, %cst) : ...\n'
            '%1 = tfl.add %0, %cst_1 {fused_activation_function = "NONE"}\n'
            '%cst = "tf.Const"() <{value = dense<1.0>}>\n'
            '%2 = "tfl.no_value"() {value} : () -> none\n'
            'attributes {tf.entry_function = {inputs = "x"}}')
    assert graph.mlir_op_counts(text) == {"tfl.conv_2d": 1, "tfl.add": 1}


# ----------------------------------------------------------------------------- XLA

def test_bucketed_pads_up_and_trims_back():
    seen = []

    def fake(x):
        seen.append(len(x))
        return x.reshape(len(x), -1)[:, :2] * 2
    runner = graph.bucketed(measure.Runner("fake", fake, "test"), buckets=(8, 1))
    x = np.random.default_rng(0).random((5, 28, 28, 1), dtype=np.float32)
    np.testing.assert_array_equal(runner(x), fake(x))
    assert runner(x[:1]).shape == (1, 2)
    assert seen == [8, 5, 1]
    with pytest.raises(ValueError, match="largest bucket"):
        runner(np.zeros((9, 28, 28, 1), np.float32))
    with pytest.raises(ValueError):
        graph.bucketed(runner, buckets=(0, 4))


def test_xla_compile_costs_has_one_row_per_runner_and_batch(tiny, images):
    table = graph.xla_compile_costs(tiny, images, batch_sizes=(1, 4), steady_calls=2)
    assert len(table) == 4 and set(table["batch_size"]) == {1, 4}
    assert (table[["first_call_ms", "steady_ms"]] > 0).all().all()
    with pytest.raises(ValueError):
        graph.xla_compile_costs(tiny, images, batch_sizes=(1, 999))
