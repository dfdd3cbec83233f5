"""labkit.distributed: TF_CONFIG, the local launcher and its failures, DTensor sharding, Ray.

The worker processes run a small model on a few hundred images, with short timeouts, so the
whole file stays near a minute; the timings of 06_distributed.ipynb are not asserted here.
"""
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import tensorflow as tf  # tests/conftest.py imported labkit first: the legacy-Keras switch is set
import tf_keras as keras

from labkit import measure, models, tflite
from labkit.data import load_mnist
from labkit.distributed import cluster, worker

TINY = models.BaselineConfig(conv_filters=(4, 8), dense_units=16)


@pytest.fixture(scope="module")
def tiny_model_path(tmp_path_factory):
    """An untrained small model with the baseline's layer names and non-trivial batch norms."""
    model = models.build_baseline(TINY)
    rng = np.random.default_rng(0)
    for layer in (model.get_layer("bn1"), model.get_layer("bn2")):
        gamma, beta, mean, variance = layer.get_weights()
        layer.set_weights([gamma * rng.uniform(0.5, 1.5, gamma.shape),
                           rng.normal(0, 0.1, beta.shape), rng.normal(0, 0.1, mean.shape),
                           rng.uniform(0.5, 2.0, variance.shape)])
    path = tmp_path_factory.mktemp("tiny") / "tiny.keras"
    model.save(path)
    return path


def gone(pids):
    return all(not psutil.pid_exists(p) or psutil.Process(p).status() == psutil.STATUS_ZOMBIE
               for p in pids)


# ----------------------------------------------------------------------------- TF_CONFIG and ports

def test_read_tf_config_accepts_a_cluster_and_rejects_mistakes():
    good = {"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}}
    assert worker.read_tf_config({"TF_CONFIG": json.dumps(good)}) == {"workers": ["a:1", "b:2"],
                                                                      "index": 1}
    bad = [({}, "not set"), ({"TF_CONFIG": "{oops"}, "not valid JSON"),
           ({"TF_CONFIG": json.dumps({**good, "task": {"type": "worker", "index": 2}})},
            "task.index"),
           ({"TF_CONFIG": json.dumps({**good, "task": {"type": "chief", "index": 0}})},
            "task.type"),
           ({"TF_CONFIG": json.dumps({**good, "cluster": {"worker": ["nohost"]}})},
            "host:port")]
    for environ, message in bad:
        with pytest.raises(ValueError, match=message):
            worker.read_tf_config(environ)


def test_tf_configs_differ_only_in_the_task_index():
    configs = cluster.tf_configs(["worker-0.example.internal:12345",
                                  "worker-1.example.internal:12345"])
    assert [c["task"]["index"] for c in configs] == [0, 1]
    assert configs[0]["cluster"] == configs[1]["cluster"]
    commands = cluster.shell_commands(["h0:1", "h1:1"], "m.keras")
    assert all("python -m labkit.distributed.worker --model m.keras" in c for c in commands)
    for bad in ([], ["h:1", "h:1"], ["h:port"]):
        with pytest.raises(ValueError):
            cluster.tf_configs(bad)


def test_free_ports_are_distinct_and_bindable_and_a_taken_port_is_seen():
    ports = cluster.free_ports(4)
    assert len(set(ports)) == 4 and not any(cluster.port_in_use(p) for p in ports)
    with socket.socket() as s:
        s.bind((cluster.LOCALHOST, 0))
        s.listen()
        taken = s.getsockname()[1]
        assert cluster.port_in_use(taken) and cluster.is_listening(taken)


def test_shard_rule_matches_tf_data_and_check_each_once_catches_gaps_and_repeats():
    for workers in (1, 2, 3):
        for index in range(workers):
            shard = tf.data.Dataset.range(10).shard(workers, index)
            expected = list(shard.as_numpy_iterator())
            assert worker.shard_indices(10, workers, index).tolist() == expected
    cluster.check_each_once(np.random.default_rng(0).permutation(50), 50)
    for broken, message in (([0, 1, 1, 3], "1 predicted more than once"),
                            ([0, 1, 3], "1 missing"), ([0, 1, 2, 7], "outside")):
        with pytest.raises(cluster.ClusterError, match=message):
            cluster.check_each_once(np.array(broken), 4)


def test_each_cluster_error_has_its_own_pids():
    first, second = cluster.ClusterError("first"), cluster.ClusterError("second", pids=(11, 12))
    first.pids.append(99)
    assert second.pids == [11, 12] and str(second) == "second"
    assert cluster.ClusterError("third").pids == []


def test_scaling_keeps_each_configurations_best_round_and_alternates_the_order(monkeypatch):
    # round 0 disturbed the 2-worker run; (workers, threads) -> seconds in round 0 and round 1
    seconds = {(1, 1): (8.0, 10.0), (2, 1): (9.0, 4.0), (1, 2): (5.0, 6.0)}
    calls = []

    def fake_run(model, launch):
        n, threads = launch.workers, launch.threads
        s = seconds[(n, threads)][sum(1 for c in calls if c == (n, threads))]
        calls.append((n, threads))
        assert launch.repeat == 3 and launch.passes == 2   # the job itself is the one asked for
        return {"num_workers": n, "threads": threads, "images": 800, "seconds": s,
                "throughput_ips": 800 / s, "cpu_share": 1.0 if s < 9 else 0.5,
                "images_per_cpu_second": 100.0, "load_before": 0.0}
    monkeypatch.setattr(cluster, "run_local", fake_run)
    job = cluster.Launch(repeat=3, passes=2)
    table, runs = cluster.scaling("model.keras", job, rounds=2, progress=False)
    assert calls == [(1, 1), (2, 1), (1, 2), (1, 2), (2, 1), (1, 1)]
    one, two = cluster.configuration_name(1, 1), cluster.configuration_name(2, 1)
    threads = cluster.configuration_name(1, 2)
    assert list(table.index) == [one, two, threads] == [
        "1 worker x 1 thread", "2 workers x 1 thread", "1 worker x 2 threads"]
    assert table.loc[one, "throughput_ips"] == 100 and table.loc[two, "throughput_ips"] == 200
    assert table.loc[two, "speedup"] == 2 and table.loc[two, "efficiency"] == 1
    assert table.loc[two, "cpu_share"] == 1.0
    assert table.loc[threads, "throughput_ips"] == 160 and table.loc[threads, "cores"] == 2
    assert table.loc[threads, "speedup"] == 1.6 and table.loc[threads, "efficiency"] == 0.8
    with pytest.raises(ValueError, match="distinct"):
        cluster.scaling("model.keras", configurations=[(1, 1), (1, 1)], progress=False)
    with pytest.raises(ValueError, match="passes"):
        cluster.Launch(workers=2, passes=0)


# ----------------------------------------------------------------------------- the launcher

def test_two_workers_predict_each_image_once_and_match_one_process(tiny_model_path, tmp_path):
    limit, repeat = 300, 2
    job = cluster.Launch(workers=2, limit=limit, repeat=repeat, passes=2, batch_size=64,
                         connect_timeout_s=60, run_timeout_s=120)
    run = cluster.run_local(tiny_model_path, job, out=tmp_path)
    index, logits = cluster.gather(run["out"], 2, limit * repeat)
    assert [r["images"] for r in run["reports"]] == [limit, limit]  # each did half, in each pass
    assert all(len(r["pass_seconds"]) == 2 for r in run["reports"])
    # a pass lasts until its slowest worker ends, and the fastest pass is the job's time
    assert run["pass_seconds"] == [max(r["pass_seconds"][p] for r in run["reports"])
                                   for p in (0, 1)]
    assert run["seconds"] == min(run["pass_seconds"])
    assert run["throughput_ips"] == limit * repeat / run["seconds"]
    assert all(r["predicted_total"] == limit * repeat for r in run["reports"])  # all-reduce agrees
    x = np.asarray(load_mnist().x_test[:limit])
    model = keras.models.load_model(tiny_model_path, compile=False)
    expected = model(x, training=False).numpy()[index % limit]
    assert np.max(np.abs(logits - expected)) <= 1e-5
    assert np.array_equal(np.argmax(logits, 1), np.argmax(expected, 1))
    assert len(run["pids"]) == 2 and gone(run["pids"])


def test_a_port_in_use_fails_at_once(tiny_model_path):
    with socket.socket() as s:
        s.bind((cluster.LOCALHOST, 0))
        s.listen()
        taken = s.getsockname()[1]
        start = time.monotonic()
        with pytest.raises(cluster.ClusterError, match=f"{taken}.*already in use") as info:
            cluster.run_local(tiny_model_path, cluster.Launch(workers=2),
                              ports=[taken, cluster.free_ports(1)[0]])
        assert time.monotonic() - start < 2
        assert info.value.pids == []  # checked before any worker started: nothing left behind


def test_a_worker_that_exits_early_stops_the_job_quickly_and_cleanly(tiny_model_path, tmp_path):
    start = time.monotonic()
    with pytest.raises(cluster.ClusterError, match="worker 1 .* exited with code 3") as info:
        cluster.run_local(tiny_model_path, cluster.Launch(workers=2, limit=64, connect_timeout_s=60,
                                                          run_timeout_s=60),
                          out=tmp_path, faults={1: "exit-early"})
    assert time.monotonic() - start < 30
    assert len(info.value.pids) == 2 and gone(info.value.pids)


def test_a_worker_that_never_connects_gives_a_clear_error_in_bounded_time(tiny_model_path,
                                                                          tmp_path):
    start = time.monotonic()
    joined = "did not form within 3 s: 0 of 2 workers joined"
    with pytest.raises(cluster.ClusterError, match=joined) as info:
        cluster.run_local(tiny_model_path, cluster.Launch(workers=2, limit=64, connect_timeout_s=3,
                                                          run_timeout_s=60),
                          out=tmp_path, faults={1: "never-connect"})
    assert time.monotonic() - start < 3 + 6  # the deadline, the poll and the SIGKILL grace
    assert gone(info.value.pids)


def test_a_bad_tf_config_makes_the_worker_exit_with_a_message():
    config = {"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 5}}
    env = dict(os.environ, TF_CONFIG=json.dumps(config))
    done = subprocess.run([sys.executable, "-m", "labkit.distributed.worker", "--model", "x.keras"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == worker.EXIT_BAD_CONFIG
    assert "task.index" in json.loads(done.stdout.strip().splitlines()[-1])["message"]


# ----------------------------------------------------------------------------- DTensor

def test_dtensor_meshes_match_the_unsharded_model(tiny_model_path, tmp_path):
    from labkit.distributed import dtensor
    report = dtensor.run(limit=64, throughput_images=64, model_path=tiny_model_path, out=tmp_path,
                         timeout_s=180)
    x = np.asarray(load_mnist().x_test[:64])
    reference = keras.models.load_model(tiny_model_path, compile=False)(x, training=False).numpy()
    for name, mesh in report["meshes"].items():
        assert mesh["max_abs_diff"] <= 1e-5, name
        assert np.max(np.abs(np.load(tmp_path / f"logits-{name}.npy") - reference)) <= 1e-5, name
        kernel = [r for r in mesh["shards"] if r["weight"] == "dense1/kernel"]
        model_size = dict(mesh["axes"])["model"]
        assert {tuple(r["shard_shape"]) for r in kernel} == {(392, 16 // model_size)}
        assert len(kernel) == 4  # one piece on each logical device
    hybrid = report["meshes"]["hybrid"]["dense1_output"]
    assert hybrid["layout"] == ["batch", "model"] and hybrid["shard_shapes"][0] == [4, 8]
    trap = report["trap_conv_sharding"]
    assert "Filter for convolution must have fully replicated layout" in trap
    assert report["trap_fused_batchnorm"]


def test_logical_devices_cannot_be_added_once_tensorflow_runs():
    from labkit.distributed import dtensor
    with pytest.raises(RuntimeError, match="fresh process"):
        dtensor.split_cpu(2)


# ----------------------------------------------------------------------------- Ray and LiteRT

@pytest.fixture(scope="module")
def tiny_int8(tiny_model_path, tmp_path_factory):
    from labkit.distributed import ray_serving
    model = keras.models.load_model(tiny_model_path, compile=False)
    return ray_serving.int8_tflite(model, directory=tmp_path_factory.mktemp("int8"))


def test_int8_model_is_cached_by_its_weights(tiny_model_path, tiny_int8):
    from labkit.distributed import ray_serving
    model = keras.models.load_model(tiny_model_path, compile=False)
    written = tiny_int8.stat().st_mtime_ns
    # the same weights: the file is reused
    assert ray_serving.int8_tflite(model, directory=tiny_int8.parent) == tiny_int8
    assert tiny_int8.stat().st_mtime_ns == written
    logits = model.get_layer("logits")
    logits.set_weights([w * 1.5 for w in logits.get_weights()])
    other = ray_serving.int8_tflite(model, directory=tiny_int8.parent)
    assert other != tiny_int8 and other.is_file()  # other weights: another file, not the stale one


def test_int8_model_is_integer_and_the_actor_matches_litert(tiny_int8, splits):
    from labkit.distributed import ray_serving
    assert tflite.io_dtypes(tiny_int8) == (np.int8, np.int8)
    # The reference takes data.load_mnist's float images, not ray_serving's uint8 pixel conversion.
    reference = measure.litert(tiny_int8)(np.asarray(splits.x_test[:100]))
    pixels = ray_serving.job_pixels(limit=100)
    actor = ray_serving.LiteRTPredictor(str(tiny_int8))
    out = actor({"index": np.arange(100), "pixels": pixels})
    np.testing.assert_array_equal(out["logits"], reference)
    assert np.array_equal(out["index"], np.arange(100)) and set(out["actor_pid"]) == {os.getpid()}
    one_process, _ = ray_serving.single_process(tiny_int8, pixels, batch_size=32)
    np.testing.assert_array_equal(one_process, reference)


def test_ray_data_actor_pool_matches_one_process(tiny_int8, tmp_path):
    pytest.importorskip("ray")
    from labkit.distributed import ray_serving
    report = ray_serving.run(tiny_int8, limit=400, repeat=1, batch_size=50, actors=2, out=tmp_path,
                             timeout_s=150)
    pixels = ray_serving.job_pixels(limit=400)
    reference, _ = ray_serving.single_process(tiny_int8, pixels, batch_size=50)
    cluster.check_each_once(report["index"], 400)
    assert np.array_equal(report["logits"], reference)
    assert len(report["actor_pids"]) == 2  # both actors got batches
    assert ray_serving.job_processes(report["tag"]) == []  # Ray's processes are all gone
