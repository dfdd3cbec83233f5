"""Tests for labkit.runtimes: runtimes side by side, ONNX, TF-TRT, the compute floor."""
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from labkit import measure, models, runtimes


def test_runtime_runners_agree_with_the_model(tiny_model, images, tmp_path):
    tiny = tiny_model
    paths = {"keras": tmp_path / "tiny.keras", "savedmodel": tmp_path / "tiny_savedmodel",
             "tflite": tmp_path / "tiny.tflite"}
    tiny.save(paths["keras"])
    tf.saved_model.save(tiny, str(paths["savedmodel"]))
    models.save_tflite(tiny, paths["tflite"])
    onnx_path = (runtimes.export_onnx(tiny, tmp_path / "tiny.onnx")
                 if runtimes.onnx_status()[0] else None)
    if onnx_path is not None:
        ops = runtimes.onnx_ops(onnx_path)
        assert ops.count("Conv") == 2 and "BatchNormalization" not in ops, ops
    runners = runtimes.runtime_runners(tiny, paths, onnx_path)
    names = [r.name for r in runners]
    assert len(set(names)) == len(names)
    assert len({runtimes.variant_name(n) for n in names}) == len(names)
    assert any("without" in r.name or "built-in" in r.name for r in runners)
    reference = tiny(images, training=False).numpy()
    for runner in runners:
        np.testing.assert_allclose(runner(images[:3]), reference[:3], atol=1e-4,
                                   err_msg=runner.name)


def test_variant_name():
    assert runtimes.variant_name("LiteRT XNNPACK 2 threads") == "runtime-litert-xnnpack-2-threads"
    assert runtimes.variant_name("tf.function, BN folded", "graph") == "graph-tf-function-bn-folded"


@pytest.mark.skipif(runtimes.tensorrt_status()[0],
                    reason="TensorRT is available here: the GPU test runs instead")
def test_tftrt_says_why_it_cannot_run(tmp_path):
    ok, why = runtimes.tensorrt_status()
    assert not ok and why
    with pytest.raises(RuntimeError, match="TF-TRT cannot run"):
        runtimes.tftrt_convert(tmp_path, tmp_path / "out", np.zeros((1, 28, 28, 1), np.float32))
    with pytest.raises(ValueError, match="FP16"):
        runtimes.tftrt_convert(tmp_path, tmp_path / "out", np.zeros((1, 28, 28, 1), np.float32),
                               precision="INT4")


@pytest.mark.skipif(not runtimes.tensorrt_status()[0],
                    reason=f"TF-TRT unavailable: {runtimes.tensorrt_status()[1]}")
def test_tftrt_converts_and_agrees(tiny_model, images, tmp_path):
    tiny = tiny_model
    tf.saved_model.save(tiny, str(tmp_path / "sm"))
    out = runtimes.tftrt_convert(tmp_path / "sm", tmp_path / "trt", images[:4], precision="FP32")
    runner = measure.saved_model(out, "TF-TRT")
    np.testing.assert_allclose(runner(images[:4]), tiny(images[:4], training=False).numpy(),
                               atol=1e-3)


@pytest.mark.skipif(not runtimes.onnx_status()[0], reason="tf2onnx/onnxruntime not installed")
def test_onnx_runner_rejects_a_bad_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"nope")
    with pytest.raises(ValueError, match="ONNX Runtime"):
        runtimes.onnx_runner(bad)
    with pytest.raises(FileNotFoundError):
        runtimes.onnx_runner(tmp_path / "missing.onnx")


# ----------------------------------------------------------------------------- the compute floor

def test_compute_floor_arithmetic():
    latency = measure.Latency(samples_us={"one": np.array([100.0, 100.0, 100.0]),
                                          "two": np.array([50.0, 50.0, 50.0]),
                                          "all": np.array([200.0, 200.0, 200.0])},
                              timed={}, threads={"one": 1, "two": 2, "all": None}, machine={})
    throughput = {"one": 20_000.0, "two": 40_000.0, "all": 10_000.0}
    peak = pd.DataFrame({"precision": ["fp32", "fp32", "int8"], "threads": [1, 2, 1],
                         "gmacs_per_s": [10.0, 8.0, 40.0]})
    macs = 1_000_000
    floor = runtimes.compute_floor(macs, latency, pd.Series(throughput), peak, batch_size=64)
    # 1e6 MACs in 100 us = 10 GMAC/s = the 1-thread fp32 peak
    assert floor.loc["one", "fraction_of_peak_batch1"] == pytest.approx(1.0)
    assert floor.loc["one", "fraction_of_peak_b64"] == pytest.approx(20_000 * 1e6 / 1e9 / 10.0)
    # two threads measured slower than one (a busy machine): the 1-thread rate is the floor of
    # the peak
    assert floor.loc["two", "peak_gmacs_per_s"] == pytest.approx(10.0)
    assert floor.loc["all", "peak_threads"] == 2
    assert floor.loc["one", "overhead_us"] == pytest.approx(100.0 - 50.0)
