"""labkit.profiler: one-op models cut from a .tflite file, per-op times, ONNX Runtime's profile."""
import numpy as np
import pytest
import tf_keras as keras
from ai_edge_litert import schema_py_generated as schema

from labkit import profiler, runtimes, tflite


@pytest.fixture(scope="module")
def tiny():
    """A small untrained CNN of the book's shape: conv, pool, conv, pool, flatten, dense, dense."""
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((28, 28, 1)),
                             keras.layers.Conv2D(4, 3, padding="same", activation="relu"),
                             keras.layers.MaxPooling2D(), keras.layers.Conv2D(8, 3),
                             keras.layers.MaxPooling2D(), keras.layers.Flatten(),
                             keras.layers.Dense(16, activation="relu"), keras.layers.Dense(10)])


@pytest.fixture(scope="module")
def files(tiny, tmp_path_factory, three_files):
    """The tiny model as float32, full int8 and float16 files."""
    return three_files(tiny, tmp_path_factory.mktemp("profiler"))


def _run(content: bytes, feeds: list, xnnpack: bool) -> np.ndarray:
    found = profiler._open(content, 1, xnnpack=xnnpack)
    found.allocate_tensors()
    for detail, value in zip(found.get_input_details(), feeds):
        found.set_tensor(detail["index"], value)
    found.invoke()
    return found.get_tensor(found.get_output_details()[0]["index"])


@pytest.mark.parametrize("kind", ["float32", "int8", "float16"])
def test_one_op_models_reproduce_the_intermediates(files, kind):
    path = files[kind]
    values = profiler.intermediates(path, profiler.example_input(path))
    model = profiler._load(path)
    for i, op in tflite.ops(path).iterrows():
        content = profiler.one_op_model(path, i)
        _, inputs, outputs = profiler._cut(model, i)
        assert outputs == op["outputs"]
        feeds, expected = [values[t] for t in inputs], values[op["outputs"][0]]
        # the same built-in kernels give the same numbers, bit for bit
        np.testing.assert_array_equal(_run(content, feeds, xnnpack=False), expected,
                                      err_msg=f"{kind} op {i} {op['op']}")
        if not inputs:   # a DEQUANTIZE of a stored weight: XNNPACK cannot run it alone
            continue
        # XNNPACK sums in another order (float) or rounds once differently (int8)
        got = _run(content, feeds, xnnpack=True).astype(np.float64)
        tolerance = 1.0 if kind == "int8" else 1e-4 * max(1.0, np.abs(expected).max())
        assert np.abs(got - expected).max() <= tolerance, f"{kind} op {i} {op['op']}"


def test_a_dequantized_weight_stays_with_its_op(files):
    path = files["float16"]
    ops = tflite.ops(path)
    dequantize = [i for i, op in enumerate(ops["op"]) if op == "DEQUANTIZE"]
    assert dequantize, "the float16 file should widen its weights with DEQUANTIZE"
    model = profiler._load(path)
    cut, inputs, _ = profiler._cut(model, dequantize[0])
    assert inputs == [] and len(cut.subgraphs[0].operators) == 1   # a stored weight: no input
    conv = next(i for i, op in enumerate(ops["op"]) if op == "CONV_2D")
    cut, inputs, _ = profiler._cut(model, conv)
    codes = [model.operatorCodes[o.opcodeIndex].builtinCode for o in cut.subgraphs[0].operators]
    # the kernel's and the bias's DEQUANTIZE, then the convolution itself
    assert codes == [schema.BuiltinOperator.DEQUANTIZE] * 2 + [schema.BuiltinOperator.CONV_2D]
    assert len(inputs) == 1, "the weight is computed in the cut model, not fed to it"


@pytest.mark.parametrize("kind", ["float32", "float16"])
def test_litert_ops_table(files, kind):
    path = files[kind]
    table = profiler.litert_ops(path, repeats=60, warmup=5)
    assert list(table["op"]) == tflite.op_names(path)
    assert list(table["op_index"]) == list(range(len(table)))
    assert (table["measured_us"] >= 0).all()
    assert (table["invoke_us"] >= table["measured_us"]).all()
    attrs = table.attrs
    assert attrs["threads"] == 1 and attrs["batch"] == 1
    assert attrs["overhead_us"] > 0 and attrs["whole_us"] > attrs["overhead_us"]
    # the parts add up to the whole, within what a shared machine's noise allows
    parts_us = table["measured_us"].sum() + attrs["overhead_us"]
    assert attrs["whole_us"] / 4 < parts_us < attrs["whole_us"] * 4, (parts_us, attrs)


def test_batch_and_where_time_goes(files):
    table = profiler.litert_ops(files["int8"], repeats=30, warmup=3, batch=3)
    assert table.attrs["batch"] == 3 and (table["measured_us"] >= 0).all()
    shares = profiler.where_time_goes(files["float32"], repeats=40)
    assert list(shares["op_index"])[-1] == -1 and shares["op"].iloc[-1] == profiler.OVERHEAD_OP
    np.testing.assert_allclose(shares["measured_us"].sum(), shares.attrs["whole_us"])
    np.testing.assert_allclose(shares["share"].sum(), 1.0)
    assert shares.attrs["inter_op_us"] == shares["measured_us"].iloc[-1]


def test_bad_arguments_say_what_is_wrong(files):
    with pytest.raises(IndexError, match="out of range"):
        profiler.one_op_model(files["float32"], 99)
    with pytest.raises(ValueError, match="batch and threads"):
        profiler.litert_ops(files["float32"], threads=0)


@pytest.mark.skipif(not runtimes.onnx_status()[0], reason=runtimes.onnx_status()[1])
def test_onnx_ops_reads_the_profile(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # any trace file left behind would land here
    path = runtimes.export_onnx(tiny, tmp_path / "tiny.onnx")
    images = np.random.default_rng(0).random((4, 28, 28, 1), dtype=np.float32)
    table = profiler.onnx_ops(path, images, runs=20, warmup=2)
    assert list(table.columns) == ["node", "op_type", "measured_us"]
    assert "Conv" in set(table["op_type"]) and (table["measured_us"] >= 0).all()
    assert table.attrs["model_run_us"] >= table["measured_us"].sum() / 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx"]
