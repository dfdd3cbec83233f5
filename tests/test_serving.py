"""labkit.serving: request checks, the endpoint against LiteRT, load runs, failures, clean shutdown.

One Ray Serve server on a tiny int8 model serves the module's HTTP tests; the last of them stops
it and checks that every process it started is gone. Load runs are a few seconds on loopback.
"""
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import psutil
import pytest
import requests

import labkit.serving  # noqa: F401  (its 127.0.0.1 switch, before anything imports Ray)
from labkit import measure, results

pytest.importorskip("ray.serve")

from labkit.distributed import ray_serving  # noqa: E402
from labkit.distributed.ray_serving import RayUnavailable, job_processes  # noqa: E402
from labkit.serving import MAX_BODY_BYTES, MAX_IMAGES, load, study  # noqa: E402
from labkit.serving.app import ClientError, parse_images  # noqa: E402
from labkit.serving.server import Server, free_port  # noqa: E402

LOOPBACK_IPS = ("127.0.0.1", "::ffff:127.0.0.1", "::1")


def test_a_process_that_imports_ray_builds_no_iri_parser():
    """Every Serve replica and Ray worker is a new process that imports Ray. jsonschema 4.25+
    makes that import build rfc3987-syntax's parsers (a second of CPU each); pyproject.toml
    keeps jsonschema below."""
    code = "import sys, ray; print('rfc3987_syntax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False", ("importing Ray loaded rfc3987_syntax: reinstall with "
                                           "pip install -e . so that jsonschema is below 4.25, "
                                           "as pyproject.toml asks")


def image_list(n=1, value=0.5):
    return np.full((n, 28, 28), value).tolist()


def body(obj) -> bytes:
    return json.dumps(obj).encode()


# Every client mistake the endpoint answers with a 4xx: (name, body, status, words in its message)
MISTAKES = [
    ("not JSON", b"{images: [", 400, "not JSON"),
    ("not UTF-8", b"\xff\xfe\x00", 400, "not JSON"),
    ("empty body", b"", 400, "empty"),
    ("a JSON list, not an object", body([1, 2]), 400, "object"),
    ("misspelt key", body({"imgaes": image_list()}), 400, "did you mean 'images'"),
    ("missing key", body({}), 400, "missing"),
    ("extra key", body({"images": image_list(), "model": "x"}), 400, "unknown key 'model'"),
    ("images not a list", body({"images": "0.5"}), 422, "must be a list"),
    ("empty list", body({"images": []}), 422, "empty"),
    ("wrong shape", body({"images": np.zeros((1, 28, 27)).tolist()}), 422, "28x28"),
    ("flat image", body({"images": [[0.5] * 784]}), 422, "28x28"),
    ("ragged rows", body({"images": [[[0.5] * 28] * 27 + [[0.5] * 3]]}), 422, "uneven"),
    ("non-numeric pixel", body({"images": [[["a"] * 28] * 28]}), 422, "numbers"),
    ("null pixel", body({"images": [[[None] * 28] * 28]}), 422, "numbers"),
    ("NaN pixel", body({"images": image_list()}).replace(b"0.5", b"NaN", 1), 422, "NaN"),
    ("infinite pixel", body({"images": image_list()}).replace(b"0.5", b"1e999", 1), 422, "finite"),
    ("pixel above 1", body({"images": image_list(value=255)}), 422, "[0, 1]"),
    ("negative pixel", body({"images": image_list(value=-0.1)}), 422, "[0, 1]"),
    ("too many images", body({"images": image_list(MAX_IMAGES + 1)}), 413,
     f"limit is {MAX_IMAGES}"),
    ("body over the size limit", b" " * (MAX_BODY_BYTES + 1), 413, "limit"),
]


@pytest.mark.parametrize("name,raw,status,words", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_parse_images_names_each_mistake(name, raw, status, words):
    with pytest.raises(ClientError) as caught:
        parse_images(raw)
    assert caught.value.status == status and 400 <= status < 500, (name, caught.value.status)
    assert words in str(caught.value), f"{name}: {caught.value}"


def test_parse_images_accepts_both_layouts(splits):
    x = np.asarray(splits.x_test[:3])
    for images in (x[..., 0].tolist(), x.tolist()):
        parsed = parse_images(body({"images": images}))
        assert parsed.shape == (3, 28, 28, 1) and parsed.dtype == np.float32
        np.testing.assert_array_equal(parsed, x)   # float32 -> JSON -> float32 is exact


def test_load_generator_sends_to_loopback_only():
    for url in ("http://example.com:8000", "http://10.0.0.1:8000", "http://192.0.2.2"):
        with pytest.raises(ValueError, match="loopback"):
            load.check_loopback(url)
    assert load.check_loopback("http://127.0.0.1:8000/") == "http://127.0.0.1:8000"
    with pytest.raises(ValueError, match="rate_rps"):
        load.open_loop("http://127.0.0.1:1", [b"{}"], [[0]], rate_rps=0, duration_s=1)


def test_serving_rows_go_to_the_store(tmp_path):
    assert "serving" in results.TECHNIQUES
    runs = pd.DataFrame({"setting": ["a", "a", "b"], "offered_rps": [10, 20, 10],
                         "throughput_rps": [9.9, 19.5, 9.8], "p50_ms": [5.0, 8.0, 50.0],
                         "p95_ms": [9.0, 40.0, 150.0], "p99_ms": [12.0, 120.0, 300.0],
                         "ok": [10, 20, 10], "sent": [10, 20, 10]})
    slo = study.at_slo(runs, slo_p99_ms=100.0)
    assert slo.loc["a", "rate_at_slo_rps"] == 10
    assert slo.loc["b", "rate_at_slo_rps"] == 0   # b never met it
    model = tmp_path / "m.tflite"
    model.write_bytes(b"0000TFL3")
    table = study.store_rows(slo, {"a": model, "b": model}, path=tmp_path / "store.csv")
    row = table.set_index("variant").loc["serving-a"]
    assert row["technique"] == "serving" and row["latency_p50_us"] == 5000.0
    assert row["throughput_ips"] == 9.9
    saved = pd.read_csv(study.save_table(runs, tmp_path / "serving.csv"))
    assert "p99_ms" in saved.columns and len(saved) == 3


# ----------------------------------------------------------------------------- one live server

@pytest.fixture(scope="module")
def tiny_int8(tiny_model, tmp_path_factory):
    return ray_serving.int8_tflite(tiny_model, directory=tmp_path_factory.mktemp("serving"))


@pytest.fixture(scope="module")
def server(tiny_int8):
    live = Server(tiny_int8, batching=True, max_batch_size=8, batch_wait_timeout_s=0.005)
    try:
        live.start()
    except RayUnavailable as error:
        pytest.skip(f"Ray Serve did not start on this machine: {error}")
    yield live
    live.stop()


@pytest.fixture(scope="module")
def traffic(tiny_int8, splits):
    x = np.asarray(splits.x_test[:100])
    return load.payloads(x), study.expected_labels(tiny_int8, x)


def test_endpoint_answers_equal_litert(server, tiny_int8, splits):
    x = np.asarray(splits.x_test[:MAX_IMAGES])
    answer = requests.post(server.url + "/predict", json={"images": x[..., 0].tolist()}, timeout=30)
    assert answer.status_code == 200, answer.text
    reply = answer.json()
    logits = measure.LiteRTModel(tiny_int8, num_threads=1)(x)
    np.testing.assert_array_equal(np.asarray(reply["logits"], np.float32), logits)
    assert reply["predictions"] == np.argmax(logits, axis=1).tolist()
    np.testing.assert_allclose(np.asarray(reply["probabilities"]).sum(axis=1), 1.0, atol=1e-4)
    health = server.wait_healthy(server.deployed["replicas"], timeout_s=10)   # the /health answer
    assert health["status"] == "ok" and health["model"] == tiny_int8.name


def test_every_client_mistake_gets_its_4xx(server, splits):
    pids = server.replica_pids()
    with requests.Session() as session:
        for name, raw, status, words in MISTAKES:
            answer = session.post(server.url + "/predict", data=raw,
                                  headers={"Content-Type": "application/json"}, timeout=30)
            assert answer.status_code == status, f"{name}: {answer.status_code} {answer.text[:200]}"
            assert words in answer.json()["error"], f"{name}: {answer.json()}"
        chunked = session.post(server.url + "/predict", data=iter([b" " * 65536] * 20),
                               timeout=30)  # no length
        assert chunked.status_code == 413, chunked.text[:200]
        assert session.get(server.url + "/predict", timeout=10).status_code == 405
        assert session.post(server.url + "/health", timeout=10).status_code == 405
        missing = session.get(server.url + "/nowhere", timeout=10)
        assert missing.status_code == 404 and "routes" in missing.json()["error"]
        one = np.asarray(splits.x_test[:1])[..., 0].tolist()
        good = session.post(server.url + "/predict", json={"images": one}, timeout=30)
    assert good.status_code == 200
    assert server.replica_pids() == pids, "a client mistake must never cost a replica"


def test_batched_open_loop_run_loses_nothing(server, traffic):
    bodies, expected = traffic
    run = load.open_loop(server.url, bodies, expected, rate_rps=60, duration_s=2.0, timeout_s=10.0)
    run.check_counts()
    s = run.summary()
    assert s["sent"] >= 60 and s["ok"] == s["sent"], s   # every request answered, and correctly
    assert s["wrong"] == s["error"] == s["timeout"] == s["refused"] == 0, s
    assert s["p50_ms"] <= s["p95_ms"] <= s["p99_ms"] <= s["max_ms"], s
    closed = load.closed_loop(server.url, bodies, expected, clients=8, duration_s=2.0,
                              timeout_s=10.0)
    assert closed.summary()["ok"] == len(closed.records)
    assert closed.summary()["mean_batch_requests"] > 1.0, \
        "with 8 clients at once, serve.batch should put more than one request in a model call"


def test_admission_control_refuses_excess_with_503(server, traffic):
    bodies, expected = traffic
    server.deploy(batching=False, max_ongoing_requests=1, max_queued_requests=1)
    run = load.closed_loop(server.url, bodies, expected, clients=16, duration_s=2.0, timeout_s=10.0)
    run.check_counts()
    s = run.summary()
    assert s["refused"] > 0 and s["ok"] > 0 and s["ok"] + s["refused"] == s["sent"], s


def test_a_killed_replica_is_replaced_and_retries_lose_nothing(server, traffic):
    bodies, expected = traffic
    table = study.replica_failure(server, bodies, expected, clients=4, duration_s=3.0,
                                  kill_after_s=1.0,
                                  retries=(3,), batching=True)
    row = table.loc[3]
    assert row["ok"] == row["sent"] > 0, row.to_dict()   # the client's retries lost nothing
    assert row["replicas_after"] == 2 and len(row["new_pids"]) == 1
    assert row["killed_pid"] not in row["new_pids"]


def test_listening_sockets_are_on_loopback(server):
    """Every port of the server's processes listens on 127.0.0.1, but one Ray Serve 2.60 hard-codes.

    Each replica's inter-deployment gRPC server binds [::]:0 (ray/serve/_private/replica.py,
    `add_port_to_grpc_server(self._server, "[::]:0")`), with no option to change it; this test pins
    that exception down so a new one cannot slip in.
    """
    wide = []
    for process in server.processes():
        try:
            title = " ".join(process.cmdline())
            listening = [c for c in process.net_connections(kind="inet")
                         if c.status == psutil.CONN_LISTEN]
        except psutil.Error:
            continue
        for c in listening:
            wide_replica = "ServeReplica" in title and c.laddr.ip in ("::", "0.0.0.0")
            if c.laddr.ip not in LOOPBACK_IPS and not wide_replica:
                wide.append((process.pid, title[:60], c.laddr))
    assert not wide, f"listening beyond loopback: {wide}"
    assert any(c.laddr.port == server.port and c.laddr.ip in LOOPBACK_IPS
               for p in server.processes() for c in _safe_listening(p)), \
        "the HTTP proxy is not on 127.0.0.1"


def _safe_listening(process):
    try:
        return [c for c in process.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    except psutil.Error:
        return []


def test_stop_leaves_no_process(server):
    assert server.processes(), "the server's Ray processes should be visible while it runs"
    killed = server.stop()
    assert server.processes() == [], "Ray or Serve processes outlived stop()"
    assert killed == [], f"processes had to be killed: {killed}"


# ---------------------------------------------------------------------- the command and the cluster

def _tagged(prefix: str) -> list:
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("LABKIT_RAY_JOB", "").startswith(prefix):
                found.append(p)
        except psutil.Error:
            continue
    return found


def test_command_serves_and_stops_cleanly(tiny_int8, splits):
    port = free_port()
    command = [sys.executable, "-m", "labkit.serving", "--model", str(tiny_int8),
               "--port", str(port), "--max-batch-size", "4"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True, start_new_session=True)
    try:
        ready = {}
        for line in process.stdout:   # the first JSON line: ready or error (Ray prints lines too)
            if line.startswith("{"):
                ready = json.loads(line)
                break
        if ready.get("event") == "error":
            pytest.skip(f"Ray Serve did not start: {ready['message']}")
        assert ready.get("event") == "ready" and ready["url"] == f"http://127.0.0.1:{port}", ready
        x = np.asarray(splits.x_test[:2])
        answer = requests.post(ready["url"] + "/predict", json={"images": x[..., 0].tolist()},
                               timeout=30)
        assert answer.status_code == 200 and len(answer.json()["predictions"]) == 2
        assert _tagged(f"serve-{process.pid}-"), "the command's Ray processes should carry its tag"
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    # Ray prints lines of its own
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    stopped = events[-1] if events else {}
    assert process.returncode == 0, (process.returncode, out)
    assert stopped == {"event": "stopped", "killed_stragglers": []}, out
    deadline = time.monotonic() + 20
    while _tagged(f"serve-{process.pid}-") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _tagged(f"serve-{process.pid}-") == []


def test_two_node_cluster_places_work_on_both_nodes(tiny_int8, traffic):
    bodies, expected = traffic
    try:
        demo = study.cluster_demo(tiny_int8, bodies, expected, clients=4, duration_s=1.5,
                                  images=4000)
    except RayUnavailable as error:
        pytest.skip(f"the two-node cluster did not start: {error}")
    assert demo["nodes"] == 2
    assert demo["serve"]["ok"] == demo["serve"]["sent"] > 0
    assert len(demo["answers_per_node"]) == 2, f"answers came from {demo['answers_per_node']}"
    actor_nodes = demo["ray_data_actor_nodes"]
    assert sorted(set(actor_nodes.values())) == ["node 0", "node 1"], actor_nodes
    reference, _ = ray_serving.single_process(tiny_int8, ray_serving.job_pixels(limit=4000),
                                               batch_size=250)
    assert np.array_equal(demo["ray_data_predictions"], np.argmax(reference, axis=1))
    assert job_processes(demo["tag"]) == []
