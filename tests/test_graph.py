"""Tests for labkit.graph (notebook 05): freezing, Grappler, batch-norm folding, XLA, runtimes, compute floor."""
import labkit

labkit.setup(seed=0)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

from labkit import graph, measure, models  # noqa: E402


def randomize_batchnorm(model, seed=0):
    """Give every BatchNormalization non-trivial statistics, so that folding has something to fold."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            shapes = [w.shape for w in layer.get_weights()]
            values = {"gamma": rng.uniform(0.5, 1.5, shapes[0]), "beta": rng.normal(0, 0.5, shapes[0]),
                      "moving_mean": rng.normal(0, 0.5, shapes[0]),
                      "moving_variance": rng.uniform(0.5, 2.0, shapes[0])}
            layer.set_weights([values[w.name.split("/")[-1].split(":")[0]].astype(np.float32)
                               for w in layer.weights])
    return model


@pytest.fixture(scope="module")
def tiny():
    model = models.build_baseline(models.BaselineConfig(conv_filters=(4, 8), dense_units=16))
    rng = np.random.default_rng(6)
    for layer in model.layers:  # untrained biases are zero, and Grappler would fold their BiasAdd away
        if isinstance(layer, keras.layers.Dense):
            layer.bias.assign(rng.normal(0, 0.1, layer.bias.shape).astype(np.float32))
    return randomize_batchnorm(model)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).random((16, 28, 28, 1), dtype=np.float32)


@pytest.fixture(scope="module")
def frozen(tiny):
    return graph.freeze(tiny)


# ----------------------------------------------------------------------------- freezing and Grappler

def test_freeze_turns_variable_reads_into_constants(tiny, frozen, images):
    before, function = frozen
    after = function.graph.as_graph_def()
    counts_before, counts_after = graph.op_counts(before), graph.op_counts(after)
    n_variables = len(tiny.weights)  # every weight is read once, optimizer-free inference graph
    assert counts_before["ReadVariableOp"] == n_variables
    assert counts_before["Placeholder"] == 1 + n_variables  # the image and one resource handle per variable
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
    # conv, bn, relu x2 blocks + pools + flatten + two dense (MatMul, BiasAdd, one Relu) = 14 kernels
    assert graph.compute_op_count(function.graph.as_graph_def()) == 14
    assert graph.compute_op_count(optimized) == 7  # 2 fused convs, 2 pools, reshape, 2 fused matmuls
    gone = graph.disappeared(function.graph.as_graph_def(), optimized)["gone"]
    assert {"FusedBatchNormV3", "Conv2D", "NoOp"} <= set(gone)
    runner = graph.graph_runner(optimized, function.inputs, function.outputs, "grappler")
    np.testing.assert_allclose(runner(images), tiny(images, training=False).numpy(), atol=1e-4)


def test_constant_folding_drops_an_add_of_zeros():
    model = models.build_baseline(models.BaselineConfig(conv_filters=(4,), dense_units=8))  # biases all zero
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
    gamma, variance = rng.uniform(0.5, 2, 5).astype(np.float32), rng.uniform(0.1, 3, 5).astype(np.float32)
    reference = tf.nn.batch_normalization(tf.nn.conv2d(x, kernel, 1, "SAME") + bias,
                                          mean, variance, beta, gamma, 1e-3).numpy()
    new_kernel, new_bias = graph.fold_conv_bn(kernel, bias, gamma, beta, mean, variance, 1e-3)
    folded = (tf.nn.conv2d(x, new_kernel, 1, "SAME") + new_bias).numpy()
    np.testing.assert_allclose(folded, reference, atol=1e-5)


def test_fold_batchnorm_removes_every_bn_and_keeps_the_outputs(tiny, images):
    folded = graph.fold_batchnorm(tiny)
    assert not any(isinstance(l, keras.layers.BatchNormalization) for l in folded.layers)
    convs = [l for l in folded.layers if isinstance(l, keras.layers.Conv2D)]
    assert len(convs) == 2 and all(c.use_bias for c in convs)
    bn_params = sum(l.count_params() for l in tiny.layers if isinstance(l, keras.layers.BatchNormalization))
    conv_biases = sum(c.filters for c in convs)
    assert folded.count_params() == tiny.count_params() - bn_params + conv_biases
    assert graph.max_abs_diff(tiny, folded, images, batch_size=5) <= 1e-4


def test_fold_handles_a_conv_bias_and_a_bn_without_scale_or_center(images):
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Conv2D(3, 3, use_bias=True),
                              keras.layers.BatchNormalization(scale=False),
                              keras.layers.Conv2D(2, 3, use_bias=False),
                              keras.layers.BatchNormalization(center=False),
                              keras.layers.Flatten(), keras.layers.Dense(4)])
    model.layers[0].set_weights([model.layers[0].kernel.numpy(), np.arange(3, dtype=np.float32)])
    randomize_batchnorm_partial(model)
    folded = graph.fold_batchnorm(model)
    assert [type(l).__name__ for l in folded.layers[1:]] == ["Conv2D", "Conv2D", "Flatten", "Dense"]
    assert graph.max_abs_diff(model, folded, images) <= 1e-4


def randomize_batchnorm_partial(model):
    rng = np.random.default_rng(4)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.set_weights([rng.uniform(0.5, 2, w.shape).astype(np.float32) for w in layer.get_weights()])


def test_fold_leaves_a_conv_with_an_activation_alone(images):
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Conv2D(3, 3, activation="relu"),
                              keras.layers.BatchNormalization(), keras.layers.GlobalAveragePooling2D()])
    randomize_batchnorm_partial(model)
    folded = graph.fold_batchnorm(model)
    assert any(isinstance(l, keras.layers.BatchNormalization) for l in folded.layers)
    assert graph.max_abs_diff(model, folded, images) <= 1e-5


def test_fold_refuses_a_model_with_branches():
    inputs = keras.Input((28, 28, 1))
    a = keras.layers.Conv2D(2, 3, padding="same")(inputs)
    b = keras.layers.Conv2D(2, 1)(inputs)
    model = keras.Model(inputs, keras.layers.Add()([a, b]))
    with pytest.raises(ValueError, match="chain"):
        graph.fold_batchnorm(model)


def test_the_tflite_converter_folds_batchnorm_like_we_do(tiny, tmp_path):
    path = models.save_tflite(tiny, tmp_path / "tiny.tflite")
    ops = graph.tflite_ops(path)
    assert not ops["op"].str.contains("NORM|BATCH|RELU$", regex=True).any(), ops["op"].tolist()
    convs = ops[ops["op"] == "CONV_2D"]
    assert len(convs) == 2 and (convs["fused_activation"] == "RELU").all()
    folded = graph.fold_batchnorm(tiny)
    ours = [l.get_weights() for l in folded.layers if isinstance(l, keras.layers.Conv2D)]
    theirs = graph.tflite_conv_weights(path)
    assert len(theirs) == len(ours)
    for (k_ours, b_ours), (k_theirs, b_theirs) in zip(ours, theirs):
        np.testing.assert_allclose(k_theirs, k_ours, atol=1e-5)
        np.testing.assert_allclose(b_theirs, b_ours, atol=1e-5)


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


# ----------------------------------------------------------------------------- runtimes

def test_runtime_runners_agree_with_the_model(tiny, images, tmp_path):
    paths = {"keras": tmp_path / "tiny.keras", "savedmodel": tmp_path / "tiny_savedmodel",
             "tflite": tmp_path / "tiny.tflite"}
    tiny.save(paths["keras"])
    tf.saved_model.save(tiny, str(paths["savedmodel"]))
    models.save_tflite(tiny, paths["tflite"])
    onnx_path = graph.export_onnx(tiny, tmp_path / "tiny.onnx") if graph.onnx_status()[0] else None
    if onnx_path is not None:
        ops = graph.onnx_ops(onnx_path)
        assert ops.count("Conv") == 2 and "BatchNormalization" not in ops, ops
    runners = graph.runtime_runners(tiny, paths, onnx_path)
    names = [r.name for r in runners]
    assert len(set(names)) == len(names) and len({graph.variant_name(n) for n in names}) == len(names)
    assert any("without" in r.name or "built-in" in r.name for r in runners)
    reference = tiny(images, training=False).numpy()
    for runner in runners:
        np.testing.assert_allclose(runner(images[:3]), reference[:3], atol=1e-4, err_msg=runner.name)


def test_variant_name():
    assert graph.variant_name("LiteRT XNNPACK 2 threads") == "runtime-litert-xnnpack-2-threads"
    assert graph.variant_name("tf.function, BN folded", "graph") == "graph-tf-function-bn-folded"


@pytest.mark.skipif(graph.tensorrt_status()[0], reason="TensorRT is available here: the GPU test runs instead")
def test_tftrt_says_why_it_cannot_run(tmp_path):
    ok, why = graph.tensorrt_status()
    assert not ok and why
    with pytest.raises(RuntimeError, match="TF-TRT cannot run"):
        graph.tftrt_convert(tmp_path, tmp_path / "out", np.zeros((1, 28, 28, 1), np.float32))
    with pytest.raises(ValueError, match="FP16"):
        graph.tftrt_convert(tmp_path, tmp_path / "out", np.zeros((1, 28, 28, 1), np.float32), precision="INT4")


@pytest.mark.skipif(not graph.tensorrt_status()[0], reason=f"TF-TRT unavailable: {graph.tensorrt_status()[1]}")
def test_tftrt_converts_and_agrees(tiny, images, tmp_path):
    tf.saved_model.save(tiny, str(tmp_path / "sm"))
    out = graph.tftrt_convert(tmp_path / "sm", tmp_path / "trt", images[:4], precision="FP32")
    runner = measure.saved_model(out, "TF-TRT")
    np.testing.assert_allclose(runner(images[:4]), tiny(images[:4], training=False).numpy(), atol=1e-3)


@pytest.mark.skipif(not graph.onnx_status()[0], reason="tf2onnx/onnxruntime not installed")
def test_onnx_runner_rejects_a_bad_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"nope")
    with pytest.raises(ValueError, match="ONNX Runtime"):
        graph.onnx_runner(bad)
    with pytest.raises(FileNotFoundError):
        graph.onnx_runner(tmp_path / "missing.onnx")


# ----------------------------------------------------------------------------- the compute floor

def test_probes_count_their_macs_and_int8_is_integer(tmp_path):
    assert measure.count_macs(graph.conv_probe(8, 8, 3)) == 8 * 8 * 8 * 8 * 3 * 3
    probes = graph.export_probes(8, 8, 3, directory=tmp_path)
    assert [p.precision for p in probes] == ["fp32", "int8"]
    from ai_edge_litert.interpreter import Interpreter
    dtypes = []
    for probe in probes:
        interpreter = Interpreter(model_path=str(probe.path))
        dtypes.append(interpreter.get_input_details()[0]["dtype"])
    assert dtypes == [np.float32, np.int8]
    peak = graph.peak_mac_rate(probes, threads=(1,), repeats=3, warmup=1)
    assert len(peak) == 2 and (peak["gmacs_per_s"] > 0).all()
    with pytest.raises(ValueError):
        graph.conv_probe(4, 8, 5)


def test_compute_floor_arithmetic():
    latency = measure.Latency(samples_us={"one": np.array([100.0, 100.0, 100.0]),
                                          "two": np.array([50.0, 50.0, 50.0]),
                                          "all": np.array([200.0, 200.0, 200.0])},
                              timed={}, threads={"one": 1, "two": 2, "all": None}, machine={})
    throughput = {"one": 20_000.0, "two": 40_000.0, "all": 10_000.0}
    import pandas as pd
    peak = pd.DataFrame({"precision": ["fp32", "fp32", "int8"], "threads": [1, 2, 1],
                         "gmacs_per_s": [10.0, 8.0, 40.0]})
    macs = 1_000_000
    floor = graph.compute_floor(macs, latency, pd.Series(throughput), peak, batch_size=64)
    # 1e6 MACs in 100 us = 10 GMAC/s = the 1-thread fp32 peak
    assert floor.loc["one", "fraction_of_peak_batch1"] == pytest.approx(1.0)
    assert floor.loc["one", "fraction_of_peak_b64"] == pytest.approx(20_000 * 1e6 / 1e9 / 10.0)
    # two threads measured slower than one (a busy machine): the 1-thread rate is the floor of the peak
    assert floor.loc["two", "peak_gmacs_per_s"] == pytest.approx(10.0)
    assert floor.loc["all", "peak_threads"] == 2
    assert floor.loc["one", "overhead_us"] == pytest.approx(100.0 - 50.0)
