import gzip
import io
import os
import tarfile
import time

import numpy as np
import pytest
import tf_keras as keras

from labkit import machine, measure, memory, models


@pytest.fixture(scope="module")
def tflite_path(tmp_path_factory, tiny_model):
    return models.save_tflite(tiny_model, tmp_path_factory.mktemp("lite") / "tiny.tflite")


def test_every_runner_computes_the_same_logits(tiny_model, tflite_path, tmp_path, images):
    import tensorflow as tf
    tf.saved_model.save(tiny_model, str(tmp_path / "sm"))
    reference = tiny_model(images, training=False).numpy()
    runners = [measure.keras_predict(tiny_model), measure.keras_call(tiny_model),
               measure.tf_function(tiny_model),
               measure.saved_model(tmp_path / "sm"), measure.litert(tflite_path, 1),
               measure.litert(tflite_path, 2, xnnpack=False)]
    for runner in runners:
        np.testing.assert_allclose(runner(images), reference, atol=1e-4, err_msg=runner.name)
        assert runner.timed


def test_accuracy_matches_a_direct_count(tiny_model, splits):
    x, y = splits.x_test[:300], splits.y_test[:300]
    expected = np.mean(np.argmax(tiny_model(x).numpy(), axis=1) == y)
    assert measure.accuracy(measure.keras_call(tiny_model), x, y,
                            batch_size=64) == pytest.approx(expected)
    with pytest.raises(ValueError, match="labels"):
        measure.accuracy(measure.keras_call(tiny_model), x, y[:10])


def test_accuracy_runs_litert_on_every_core_with_the_same_logits(tflite_path, splits, monkeypatch):
    x, y = splits.x_test[:300], splits.y_test[:300]
    for xnnpack in (True, False):
        one = measure.litert(tflite_path, 1, xnnpack=xnnpack)
        every = measure.on_every_core(one)
        assert every.num_threads == machine.usable_cores() and every.xnnpack == xnnpack
        np.testing.assert_array_equal(every(x), one(x))   # bit for bit, not merely close
        assert measure.accuracy(one, x, y) == np.mean(np.argmax(one(x), axis=1) == y)
    other = measure.Runner("not LiteRT", lambda images: images, "nothing")   # left as it is
    assert measure.on_every_core(other) is other
    monkeypatch.setattr(measure, "usable_cores", lambda: 1)
    one = measure.litert(tflite_path, 1)
    assert measure.on_every_core(one) is one


def test_a_files_accuracy_is_counted_once_per_version_and_images(tiny_model, tflite_path,
                                                                 tmp_path, splits,
                                                                  monkeypatch):
    x, y = splits.x_test[:200], splits.y_test[:200]
    path = models.save_tflite(tiny_model, tmp_path / "copy.tflite")
    first = measure.accuracy(measure.litert(path, 1), x, y)
    counted = []
    count_correct = measure._count_correct
    monkeypatch.setattr(measure, "_count_correct",
                        lambda *args: counted.append(1) or count_correct(*args))
    assert measure.accuracy(measure.litert(path, 1, name="again"), x, y) == first and counted == []
    # other images
    assert measure.accuracy(measure.litert(path, 1), x[:100], y[:100]) >= 0 and len(counted) == 1
    flipped = y.copy()
    flipped[0] = (y[0] + 1) % 10
    measure.accuracy(measure.litert(path, 1), x, flipped)
    assert len(counted) == 2   # other labels
    # another version of the file at the same path (an atomic rewrite) is measured again, and a
    # runner loaded before the rewrite is still counted with the model it loaded
    loaded_before = measure.litert(path, 1)
    zeroed = models.clone_with_weights(tiny_model)
    zeroed.set_weights([np.zeros_like(w) for w in zeroed.get_weights()])
    models.save_tflite(zeroed, path)
    assert measure.accuracy(measure.litert(path, 1), x, y) == np.mean(y == 0) and len(counted) == 3
    old_model = np.mean(np.argmax(loaded_before(x[:150]), axis=1) == y[:150])
    assert old_model != np.mean(y[:150] == 0)   # the two versions are told apart on these images
    assert measure.accuracy(loaded_before, x[:150], y[:150]) == old_model and len(counted) == 4
    assert measure.accuracy(measure.litert(path, 1), x[:150], y[:150]) == np.mean(y[:150] == 0)
    # a damaged entry is counted again and rewritten
    for entry in measure.ACCURACY_DIR.glob("*.json"):
        entry.write_text("{not json")
    assert measure.accuracy(measure.litert(path, 1), x[:150],
                            y[:150]) == np.mean(y[:150] == 0) and len(counted) == 6
    # Keras models are counted every time: their weights can change in memory
    keras_runner = measure.keras_call(tiny_model)
    measure.accuracy(keras_runner, x, y)
    measure.accuracy(keras_runner, x, y)
    assert len(counted) == 8


def test_latency_is_interleaved_and_summarised(tiny_model, tflite_path, images):
    calls = []

    def counting(name):
        def fn(x):
            calls.append(name)
            return np.zeros((len(x), 10))
        return measure.Runner(name, fn, "a test stub")

    latency = measure.measure_latency([counting("a"), counting("b")], images, warmup=2, repeats=20)
    timed = calls[4:]  # after 2 warm-up rounds of 2 runners
    # every round holds one call of each runner: interleaved, never a block of one
    assert all(sorted(timed[i:i + 2]) == ["a", "b"] for i in range(0, 40, 2))
    summary = latency.summary()
    assert list(summary.index) == ["a", "b"] and (summary["calls"] == 20).all()
    assert (summary["latency_p50_us"] <= summary["latency_p95_us"]).all()
    assert (summary["min_us"] <= summary["latency_p50_us"]).all()
    real = measure.measure_latency([measure.litert(tflite_path, 1)], images, warmup=3, repeats=10)
    assert real.p50("LiteRT XNNPACK 1 thread(s)") > 0
    with pytest.raises(ValueError, match="unique"):
        measure.measure_latency([counting("a"), counting("a")], images)


def test_a_latency_budget_stops_only_the_slow_runner_after_its_minimum_calls(images):
    calls = []

    def stub(name, seconds):
        def fn(x):
            calls.append(name)
            time.sleep(seconds)
            return np.zeros((len(x), 10))
        return measure.Runner(name, fn, "a test stub")

    latency = measure.measure_latency([stub("slow", 0.004), stub("fast", 0.0)], images,
                                      warmup=1, repeats=40,
                                      budget_s=0.01, min_calls=5)
    summary = latency.summary()
    # 5 x 4 ms > 10 ms
    assert summary.loc["fast", "calls"] == 40 and summary.loc["slow", "calls"] == 5
    timed = calls[2:]
    # interleaved until its budget ran out
    assert timed[:10].count("slow") == 5 and "slow" not in timed[10:]
    assert summary.loc["slow", "latency_p50_us"] >= 4000
    # the minimum wins
    assert measure.measure_latency([stub("slow", 0.004)], images, warmup=0, repeats=8,
                                   budget_s=0.01, min_calls=8).summary().loc["slow", "calls"] == 8
    with pytest.raises(ValueError, match="budget_s"):
        measure.measure_latency([stub("fast", 0.0)], images, budget_s=0)


def test_first_calls_separate_the_first_invoke_from_the_later_ones(tflite_path, images):
    calls = measure.first_calls(tflite_path, images, calls=10)
    assert set(calls) == {"first_call_us", "second_call_us", "later_p50_us"}
    assert all(v > 0 for v in calls.values())
    assert measure.first_calls(tflite_path, images[:2], calls=5, xnnpack=False)["later_p50_us"] > 0
    with pytest.raises(ValueError, match="at least 3"):
        measure.first_calls(tflite_path, images, calls=2)


def test_throughput_counts_images(images):
    stub = measure.Runner("stub", lambda x: np.zeros((len(x), 10)), "stub")
    rates = measure.measure_throughput([stub], np.zeros((64, 28, 28, 1), np.float32),
                                       batch_size=16, rounds=2)
    assert rates["stub"] > 0
    with pytest.raises(ValueError, match="batch_size"):
        measure.measure_throughput([stub], images[:4], batch_size=16)


def test_litert_resizes_batches_and_rejects_bad_files(tflite_path, tmp_path, images):
    runner = measure.litert(tflite_path)
    assert runner(images[:1]).shape == (1, 10) and runner(images).shape == (len(images), 10)
    with pytest.raises(FileNotFoundError, match="No .tflite"):
        measure.litert(tmp_path / "missing.tflite")
    truncated = tmp_path / "truncated.tflite"   # the right identifier, but half a model
    data = tflite_path.read_bytes()
    truncated.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="not a valid .tflite"):
        measure.litert(truncated)


def test_bad_model_paths_raise_clear_errors(tmp_path):
    garbage = tmp_path / "notes.tflite"   # tflite.check's messages are tested in test_tflite
    garbage.write_text("this is not a model at all")
    with pytest.raises(ValueError, match="not a TFLite model"):
        measure.litert(garbage)
    with pytest.raises(FileNotFoundError, match="No SavedModel"):
        measure.saved_model(tmp_path / "missing_savedmodel")
    with pytest.raises(ValueError, match="is a file"):
        measure.check_saved_model(garbage)
    with pytest.raises(ValueError, match="no saved_model.pb"):
        measure.check_saved_model(tmp_path)
    fake = tmp_path / "fake_savedmodel"
    fake.mkdir()
    (fake / "saved_model.pb").write_bytes(b"\xff\xff\xff not a protocol buffer")
    with pytest.raises(ValueError, match="SavedModel"):
        measure.check_saved_model(fake)


def test_sizes(tmp_path):
    blob = np.random.default_rng(0).bytes(10000) + bytes(10000)
    (tmp_path / "f.bin").write_bytes(blob)
    assert measure.size_bytes(tmp_path / "f.bin") == 20000
    assert measure.gzip_bytes(tmp_path / "f.bin") == len(gzip.compress(blob, 9, mtime=0))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a").write_bytes(bytes(300))
    (tmp_path / "d" / "b").write_bytes(bytes(700))
    assert measure.size_bytes(tmp_path / "d") == 1000
    # a directory is gzipped as one tar of its files, in name order, with no time stamps: the
    # figure is the size of exactly that archive, so it is the same on every run and machine
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        for name in ("a", "b"):
            info = tar.gettarinfo(str(tmp_path / "d" / name), arcname=name)
            info.mtime = 0
            with open(tmp_path / "d" / name, "rb") as f:
                tar.addfile(info, f)
    assert measure.gzip_bytes(tmp_path / "d") == len(gzip.compress(archive.getvalue(), 9, mtime=0))
    os.utime(tmp_path / "d" / "a", (1, 1))  # a new time stamp changes nothing
    assert measure.gzip_bytes(tmp_path / "d") == len(gzip.compress(archive.getvalue(), 9, mtime=0))
    # a file is gzipped once per version: a file replaced at the same path is measured again
    other = np.random.default_rng(1).bytes(20000)
    (tmp_path / "g.bin").write_bytes(other)
    os.replace(tmp_path / "g.bin", tmp_path / "f.bin")
    assert measure.gzip_bytes(tmp_path / "f.bin") == len(gzip.compress(other, 9, mtime=0))


def test_params_and_macs_by_hand():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="valid", name="c")(inputs)           # 6x6x4, 3x3x3 kernel
    x = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(x)           # 6x6x4
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(5, name="d")(x)
    model = keras.Model(inputs, outputs)
    macs = measure.layer_macs(model).set_index("layer")["macs"]
    assert macs["c"] == 6 * 6 * 4 * 3 * 3 * 3
    assert macs["dw"] == 6 * 6 * 4 * 3 * 3
    assert macs["d"] == 144 * 5
    assert measure.count_macs(model) == macs.sum()
    counts = measure.count_params(model)
    assert counts["params"] == model.count_params()
    for layer in ("c", "dw", "d"):  # biases start at zero; make them count
        model.get_layer(layer).bias.assign(np.ones(model.get_layer(layer).bias.shape))
    assert measure.count_params(model)["nonzero_params"] == model.count_params()
    model.get_layer("d").kernel.assign(np.zeros((144, 5)))
    assert measure.count_params(model)["nonzero_params"] == model.count_params() - 144 * 5


def test_memory_probes(tflite_path):
    grow = memory.peak_rss_during(lambda: np.ones(50_000_000, np.uint8).sum())
    assert grow["rss_growth_bytes"] > 20_000_000
    # the LiteRT arena (tflite.arena_bytes) is tested in test_tflite
    process = memory.litert_process_memory(tflite_path)
    assert process["rss_after_inference_bytes"] >= process["rss_runtime_bytes"] > 0


def test_machine_info_names_cpu_and_versions():
    info = machine.machine_info()
    assert info["cores"] >= 1 and info["tensorflow"].startswith("2.21")
    line = machine.machine_string()
    assert "cores" in line and "TF 2.21" in line and "LiteRT" in line


def test_side_by_side_and_verdicts(tflite_path, tmp_path, splits, images):
    copy = tmp_path / "copy.tflite"
    copy.write_bytes(tflite_path.read_bytes())
    x, y = splits.x_test[:200], splits.y_test[:200]
    table, latency = measure.side_by_side({"a": tflite_path, "b": copy}, x, y,
                                          latency_images=images,
                                          reference="a", repeats=10, warmup=2)
    assert list(table.index) == ["a", "b"] and set(latency.samples_us) == {"a", "b"}
    assert table.loc["a", "accuracy"] == np.mean(np.argmax(measure.litert(tflite_path)(x),
                                                           axis=1) == y)
    assert table.loc["b", "accuracy"] == table.loc["a", "accuracy"]   # the same bytes
    assert table.loc["b", "gzip_bytes"] == measure.gzip_bytes(tflite_path)
    assert table.loc["b", "gzip_ratio"] == 1
    assert table.loc["a", "speedup_p50"] == 1
    assert table.loc["b", "latency_p50_us"] == latency.p50("b")
    with pytest.raises(ValueError, match="reference"):
        measure.side_by_side({"a": tflite_path}, x, y, latency_images=images, reference="z")
    verdicts = measure.verdicts({"accuracy": 0.99, "speedup": 1.2},
                                {"accuracy": 0.99, "speedup": 1.5})
    assert verdicts.set_index("figure")["met"].to_dict() == {"accuracy": True, "speedup": False}
    with pytest.raises(ValueError, match="gzip"):
        measure.verdicts({"accuracy": 1.0}, {"gzip": 30})
