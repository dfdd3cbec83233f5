"""labkit.roofline: the model's math, the ceilings, and the per-op prediction of a .tflite file."""
import json
import math

import numpy as np
import pandas as pd
import pytest
import tf_keras as keras

from labkit import files, machine, measure, roofline, tflite


def synthetic_ceilings(peak_gmacs=10.0, outputs_g=1.0, bandwidth=10e9) -> roofline.Ceilings:
    """Round ceilings that make every prediction easy to work by hand."""
    rows = [{"probe": probe, "precision": precision, "engine": engine, "threads": 1,
             "macs": 1, "outputs": 1, "latency_p50_us": 1.0,
             "gmacs_per_s": peak_gmacs * (4 if precision == "int8" else 1),
             "goutputs_per_s": outputs_g}
            for probe in ("wide", "thin") for precision in ("fp32", "int8")
            for engine in roofline.ENGINES]
    sweep = pd.DataFrame({"working_set_bytes": [8192, 2 ** 30], "bytes_per_s": [bandwidth] * 2})
    levels = pd.DataFrame({"level": ["L1", "DRAM"], "working_set_bytes": [8192, 2 ** 30],
                           "bytes_per_s": [bandwidth] * 2})
    return roofline.Ceilings(pd.DataFrame(rows), sweep, levels, {"float32": 2.0, "int8": 5.0},
                             "test machine")


@pytest.fixture(scope="module")
def small(tmp_path_factory, three_files):
    """A small CNN of the book's shape as float32, full-int8 and float16 .tflite files."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((28, 28, 1)),
                              keras.layers.Conv2D(4, 3, padding="same", activation="relu",
                                                  name="conv1"),
                              keras.layers.MaxPooling2D(), keras.layers.Flatten(),
                              keras.layers.Dense(16, activation="relu", name="dense1"),
                              keras.layers.Dense(10, name="logits")])
    return model, three_files(model, tmp_path_factory.mktemp("roofline"))


# ----------------------------------------------------------------------------- the math

def test_intensity_and_time_by_hand():
    # 1000 MACs over 100 float32 weights and 150 float32 activations: 2000 FLOPs / 1000 bytes
    assert roofline.arithmetic_intensity(1000, 100, 32, 150) == pytest.approx(2.0)
    assert roofline.arithmetic_intensity(1000, 100, 4, 0, 8) == pytest.approx(40.0)
    # compute: 2e9 FLOPs at 1e12 FLOP/s = 2 ms; memory: 1e6 bytes at 1e9 B/s = 1 ms
    assert roofline.roofline_time(1e9, 1e6, 1e12, 1e9) == pytest.approx(2e-3)
    assert roofline.roofline_time(0, 1e6, 1e12, 1e9) == pytest.approx(1e-3)
    for bad in [(-1, 1, 32, 1), (1, 1, 0, 1)]:
        with pytest.raises(ValueError):
            roofline.arithmetic_intensity(*bad)
    with pytest.raises(ValueError, match="no byte is moved"):
        roofline.arithmetic_intensity(10, 0, 32, 0)
    with pytest.raises(ValueError):
        roofline.roofline_time(1, 1, 0, 1)


def test_op_macs_by_hand():
    assert roofline.op_macs("CONV_2D", (8, 3, 3, 4), (1, 10, 10, 4), 10 * 10 * 8) == 800 * 36
    assert roofline.op_macs("DEPTHWISE_CONV_2D", (1, 3, 3, 8), (1, 10, 10, 8), 800) == 800 * 9
    assert roofline.op_macs("FULLY_CONNECTED", (16, 64), (1, 64), 16) == 16 * 64
    assert roofline.op_macs("BATCH_MATMUL", (), (1, 5, 32), 5 * 7) == 35 * 32
    assert roofline.op_macs("MAX_POOL_2D", (), (1, 8, 8, 4), 64) == 0


# ----------------------------------------------------------------------------- ceilings

def test_bandwidth_sweep_and_levels():
    sweep = roofline.bandwidth_sweep(working_sets=(8192, 65536, 1 << 20))
    assert list(sweep["working_set_bytes"]) == [8192, 65536, 1 << 20]
    assert (sweep["bytes_per_s"] > 1e8).all(), sweep   # any machine copies faster than 100 MB/s
    levels = roofline.memory_levels(sweep, {"L1": 32768, "L2": 1 << 21})
    assert list(levels["level"]) == ["L1", "L2", "DRAM"]
    assert list(levels["working_set_bytes"]) == [8192, 1 << 20, 1 << 20]
    assert roofline.bandwidth_at(sweep, 9000) == sweep["bytes_per_s"].iloc[1]
    assert roofline.bandwidth_at(sweep, 1e12) == sweep["bytes_per_s"].iloc[-1]


def test_probes_count_their_macs_and_outputs(tmp_path):
    assert measure.count_macs(roofline.conv_probe(8, 8, 3)) == 8 * 8 * 8 * 8 * 3 * 3
    assert measure.count_macs(roofline.conv_probe(8, 4, 3, in_channels=1)) == 8 * 8 * 4 * 9
    probes = roofline.export_probes(8, 8, 3, directory=tmp_path)
    assert [(p.precision, p.kind, p.outputs) for p in probes] == [("fp32", "wide", 512),
                                                                  ("int8", "wide", 512)]
    assert [tflite.io_dtypes(p.path)[0] for p in probes] == [np.float32, np.int8]
    assert roofline.export_probes(8, 8, 3, directory=tmp_path) == probes, "from the cache"
    thin = roofline.export_probes(8, 4, 3, in_channels=1, directory=tmp_path)
    assert {p.kind for p in thin} == {"thin"}
    peak = roofline.peak_mac_rate(probes + thin, threads=(1,), repeats=3, warmup=1)
    assert len(peak) == 4 and (peak["gmacs_per_s"] > 0).all() and (peak["goutputs_per_s"] > 0).all()
    with pytest.raises(ValueError):
        roofline.conv_probe(4, 8, 5)
    with pytest.raises(ValueError, match="engines"):
        roofline.peak_mac_rate(probes, engines=("GPU",))


def test_ceilings_are_kept_per_machine(tmp_path):
    found = synthetic_ceilings()
    path = tmp_path / f"ceilings-{files.content_key(machine.machine_string())}.json"
    files.write_json(path, found.record())
    again = roofline.ceilings(directory=tmp_path)
    assert again.machine == "test machine" and again.call_us == found.call_us
    assert again.peak_flops("int8") == pytest.approx(80e9)
    assert again.output_rate("fp32", "built-in kernel") == pytest.approx(1e9)
    table = again.table()
    assert {"GFLOP/s", "G outputs/s", "GB/s", "us"} == set(table["unit"])
    with pytest.raises(ValueError, match="no wide probe"):
        again.peak_flops("fp32", threads=0)
    json.loads(path.read_text())   # written as JSON, whole


# ----------------------------------------------------------------------------- one file

def test_op_table_by_hand(small):
    model, paths = small
    found = synthetic_ceilings()
    table = roofline.op_table(paths["float32"], found)
    assert list(table["op"]) == tflite.op_names(paths["float32"])
    keras_macs = measure.layer_macs(model).set_index("layer")["macs"]
    weight_ops = table[table["macs"] > 0]
    assert list(weight_ops["macs"]) == list(keras_macs), "the .tflite MACs are Keras's"
    conv = table.iloc[0]
    assert conv["weight_bytes"] == (4 * 9 + 4) * 4            # kernel and bias, float32
    assert conv["activation_bytes"] == (28 * 28 + 28 * 28 * 4) * 4
    assert conv["compute_us"] == pytest.approx(2 * conv["macs"] / 20e9 * 1e6)
    assert conv["outputs_us"] == pytest.approx(28 * 28 * 4 / 1e9 * 1e6)
    assert conv["memory_us"] == pytest.approx((conv["weight_bytes"] + conv["activation_bytes"])
                                              / 10e9 * 1e6)
    times = table[["compute_us", "memory_us", "outputs_us"]]
    np.testing.assert_allclose(table["predicted_us"], times.max(axis=1))
    assert set(table["bound"]) <= {"compute", "memory", "output"}
    pool = table[table["op"] == "MAX_POOL_2D"].iloc[0]
    assert pool["bound"] == "memory" and pool["macs"] == 0
    from_keras = roofline.op_table(model, found)   # a Keras model: predicted as its float32 file
    np.testing.assert_allclose(from_keras["predicted_us"], table["predicted_us"])
    batch = roofline.op_table(paths["float32"], found, batch=8)
    assert (batch["macs"] == 8 * table["macs"]).all()
    assert (batch["weight_bytes"] == table["weight_bytes"]).all(), "weights are read once a call"


def test_int8_and_float16_weights_as_the_runtime_reads_them(small):
    _, paths = small
    found = synthetic_ceilings()
    fp32, int8, fp16 = (roofline.op_table(paths[k], found) for k in ("float32", "int8",
                                                                     "float16"))
    dense = fp32["op"] == "FULLY_CONNECTED"
    assert (int8.loc[int8["op"] == "FULLY_CONNECTED", "precision"] == "int8").all()
    # int8 kernels are a quarter of float32's (the int32 biases stay 4 bytes)
    assert int8.loc[int8["op"] == "FULLY_CONNECTED", "weight_bytes"].iloc[0] < \
        fp32.loc[dense, "weight_bytes"].iloc[0] / 3
    # float16 weights are widened to float32 once, at load: read as float32 on every call
    once = fp16[fp16["bound"] == "once, at load"]
    assert len(once) and (once["predicted_us"] == 0).all()
    assert fp16["predicted_us"].sum() == pytest.approx(fp32["predicted_us"].sum())
    whole = roofline.predict(paths["int8"], found)
    assert whole["call_us"] == 5.0 and whole["predicted_us"] == pytest.approx(
        whole["ops_us"] + 5.0)
    with pytest.raises(ValueError):
        roofline.op_table(paths["float32"], found, batch=0)


def test_against_measured_reads_the_store(small, tmp_path):
    _, paths = small
    rows = pd.DataFrame([
        {"variant": "small-fp32", "technique": "baseline", "notebook": "01_baseline",
         "latency_p50_us": 50.0, "artifact": str(paths["float32"])},
        {"variant": "runtime-litert-built-in-kernels-1-thread", "technique": "runtime",
         "notebook": "05_graph", "latency_p50_us": 80.0, "artifact": str(paths["float32"])},
        {"variant": "served", "technique": "serving", "notebook": "09_serving",
         "latency_p50_us": 9000.0, "artifact": str(paths["float32"])},
        {"variant": "gone", "technique": "pruning", "notebook": "02_pruning",
         "latency_p50_us": 10.0, "artifact": str(tmp_path / "missing.tflite")}])
    out = roofline.against_measured(rows, synthetic_ceilings())
    assert list(out["variant"]) == ["small-fp32", "runtime-litert-built-in-kernels-1-thread"]
    assert math.isclose(out["ratio"].iloc[0], 50.0 / out["predicted_us"].iloc[0])
    assert roofline.runs_as("runtime-litert-xnnpack-2-threads") == {"threads": 2, "xnnpack": True}
