"""Serving measurements, built on server.py and load.py: one request's time, load sweeps, the SLO.

Each function returns numbers and tables and draws nothing; 09_serving.ipynb plots and asserts.
The serving table (every load run of a sweep, with p50, p95 and p99) is saved to
results/serving.csv, and one row per setting, at the highest load that met the SLO, goes into
the results store with technique "serving" (p50 and p95 there; p99 in the serving table).
labkit.book imports this module for the table: what loads TensorFlow or Ray is imported inside
the functions that use it.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil

from labkit import RESULTS_DIR, files, measure, progress_bar, results
from labkit.data import load_mnist
from labkit.distributed import ray_serving
from labkit.serving import load

SERVING_TABLE = RESULTS_DIR / "serving.csv"
SLO_P99_MS = 100.0          # the service-level objective: p99 under 100 ms
DEFAULT_RATES_RPS = (25, 75, 150, 250)
ALONE = "the model alone, batch 1, in-process (as measure.measure_latency times it)"


# ----------------------------------------------------------------------------- the model itself

def book_models(progress: bool = False) -> dict:
    """The models served: the int8 .tflite and the baseline's SavedModel, from their caches.

    Trained or converted now only if missing: the int8 file is
    quantization.export(baseline, "int8", x_train, name="ptq-int8"), the very file the
    quantization chapter makes, and the SavedModel is models.export_baseline's.
    """
    from labkit import models, quantization  # not at the top: they load TensorFlow
    baseline, _ = models.load_or_train_baseline(progress=progress)
    int8 = quantization.export(baseline, "int8", load_mnist().x_train, name="ptq-int8")
    return {"int8": int8, "savedmodel": models.export_baseline(baseline)["savedmodel"]}


def expected_labels(model_path, images: np.ndarray, per_request: int = 1) -> list:
    """What each body of load.payloads(images, per_request) must get back (the model in-process)."""
    from labkit.serving.app import load_model  # not at the top: it imports Ray
    model = load_model(model_path)
    x = np.asarray(images, np.float32)
    x = x if x.ndim == 4 else x[..., np.newaxis]
    x = np.round(x, 4)   # the payloads carry 4 decimals; the answers must be for the same pixels
    return [np.argmax(model(x[i:i + per_request]), axis=1).tolist()
            for i in range(0, len(x) - per_request + 1, per_request)]


# -------------------------------------------------------------------- where one request's time goes

def request_breakdown(url: str, bodies: list, expected: list, model_path, images: np.ndarray,
                      requests_n: int = 150) -> pd.DataFrame:
    """p50 of each part of one request, sent one at a time, against the model's own batch-1 latency.

    The replica reports its parse, queue and model times; the rest of the round trip is the
    client, the network stack and Serve's HTTP proxy. The in-process line is the model's batch-1
    latency as measure.measure_latency times it.
    """
    from labkit.serving.app import load_model  # not at the top: it imports Ray
    run = load.closed_loop(url, bodies, expected, clients=1, duration_s=30.0,
                           max_requests=requests_n)
    run.check_counts()
    ok = run.records[run.records["outcome"] == "ok"]
    timing = pd.DataFrame(list(ok["timing_us"]))
    total_us = 1e6 * ok["latency_s"].to_numpy()
    x = np.asarray(images[:50], np.float32)
    encode_us = np.median([timed_us(lambda: json.dumps(
        {"images": np.round(x[i:i + 1, ..., 0], 4).tolist()})) for i in range(len(x))])
    runner = measure.Runner("in-process", load_model(model_path),
                            "the model called in this process")
    latency = measure.measure_latency([runner], x, warmup=10, repeats=200)
    p50 = lambda v: float(np.median(v))  # noqa: E731
    outside = total_us - timing["replica"].to_numpy()
    rows = [("client: JSON encoding of one image (done before timing in load runs)", encode_us),
            ("client, network and Serve's HTTP proxy (round trip minus replica)", p50(outside)),
            ("replica: reading and checking the JSON body", p50(timing["parse"])),
            ("replica: waiting for a batch and answering", p50(timing["queue"])),
            ("replica: the model call", p50(timing["model"])),
            ("one request, end to end (client's clock)", p50(total_us)),
            (ALONE, latency.p50("in-process"))]
    table = pd.DataFrame(rows, columns=["part", "p50_us"]).set_index("part")
    table["share_of_request"] = table["p50_us"] / p50(total_us)
    return table


def timed_us(fn) -> float:
    """Wall time of one call of fn(), in microseconds."""
    start = time.perf_counter_ns()
    fn()
    return (time.perf_counter_ns() - start) / 1e3


def _warm_up(server, bodies: list, expected: list) -> None:
    """A short closed-loop run: the replicas and the proxy open their connections untimed."""
    load.closed_loop(server.url, bodies, expected, clients=2, duration_s=0.5, max_requests=40)


# ----------------------------------------------------------------------------- latency against load

def sweep(server, name: str, bodies: list, expected: list, *, rates_rps=DEFAULT_RATES_RPS,
          duration_s: float = 1.5, timeout_s: float = 5.0, progress: bool = True,
          **deploy) -> pd.DataFrame:
    """Deploy one setting, then offer each Poisson rate for `duration_s`: a row per rate.

    `deploy` goes to Server.deploy (model_path, batching, replicas, ...). A short warm-up run
    first lets the replicas and the proxy open their connections before anything is timed.
    """
    deployed = server.deploy(**deploy)
    _warm_up(server, bodies, expected)
    rows = []
    for rate in progress_bar(rates_rps, desc=name, disable=not progress, leave=False):
        run = load.open_loop(server.url, bodies, expected, rate_rps=rate, duration_s=duration_s,
                             timeout_s=timeout_s)
        run.check_counts()
        rows.append({"setting": name, "model": Path(deployed["model_path"]).name,
                     "batching": deployed["batching"], "replicas": deployed["replicas"],
                     "max_batch_size": deployed["max_batch_size"],
                     "batch_wait_ms": 1e3 * deployed["batch_wait_timeout_s"], **run.summary()})
    return pd.DataFrame(rows)


def at_slo(table: pd.DataFrame, slo_p99_ms: float = SLO_P99_MS) -> pd.DataFrame:
    """Per setting, the highest offered rate whose p99 met the SLO with every answer right."""
    rows = []
    for setting, runs in table.groupby("setting", sort=False):
        good = runs[(runs["p99_ms"] <= slo_p99_ms) & (runs["ok"] == runs["sent"])]
        best = good.loc[good["offered_rps"].idxmax()] if len(good) else None
        met = best is not None
        rows.append({"setting": setting, "slo_p99_ms": slo_p99_ms,
                     "rate_at_slo_rps": float(best["offered_rps"]) if met else 0.0,
                     "throughput_at_slo_rps": float(best["throughput_rps"]) if met else 0.0,
                     "p50_ms": best["p50_ms"] if met else np.nan,
                     "p95_ms": best["p95_ms"] if met else np.nan,
                     "p99_ms": best["p99_ms"] if met else np.nan})
    return pd.DataFrame(rows).set_index("setting")


def save_table(table: pd.DataFrame, path=None) -> Path:
    """Write the serving table (every load run, p99 included) atomically: results/serving.csv."""
    stamped = table.assign(measured_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
    return files.write_atomic(Path(path or SERVING_TABLE),
                              lambda tmp: stamped.to_csv(tmp, index=False))


def store_rows(slo_table: pd.DataFrame, artifacts: dict, path=None) -> pd.DataFrame:
    """One results-store row per setting (technique "serving"): p50, p95, throughput at the SLO.

    `artifacts` maps each setting to the model it served. Throughput is requests per second,
    one image per request, so it is also images per second.
    """
    rows = []
    for setting, r in slo_table.iterrows():
        row = results.make_row(f"serving-{setting}", "serving", "09_serving",
                               throughput_ips=r["throughput_at_slo_rps"],
                               artifact=artifacts[setting])
        row["latency_p50_us"], row["latency_p95_us"] = 1e3 * r["p50_ms"], 1e3 * r["p95_ms"]
        rows.append(row)
    return results.upsert(rows, path)


# ---------------------------------------------------------------------------- overload and failures

def overload(server, bodies: list, expected: list, rate_rps: float, *, duration_s: float = 3.0,
             admission: dict, timeout_s: float = 10.0, **deploy) -> pd.DataFrame:
    """The same Poisson overload without and with admission control (`admission`: the limits)."""
    rows = []
    for name, limits in (("no admission control", {}), ("admission control", admission)):
        server.deploy(**deploy, **limits)
        _warm_up(server, bodies, expected)
        run = load.open_loop(server.url, bodies, expected, rate_rps=rate_rps, duration_s=duration_s,
                             timeout_s=timeout_s)
        run.check_counts()
        rows.append({"setting": name, **limits, **run.summary()})
    return pd.DataFrame(rows).set_index("setting")


def replica_failure(server, bodies: list, expected: list, *, clients: int = 4,
                    duration_s: float = 4.0, kill_after_s: float = 1.0, retries=(0, 3),
                    **deploy) -> pd.DataFrame:
    """Kill one of two replicas with SIGKILL during a closed-loop run, once per retry budget.

    Serve notices the dead replica and starts a new one; the table counts what failed and what
    was retried, and names the killed and the new replica processes.
    """
    rows = []
    server.deploy(replicas=2, **deploy)
    for budget in retries:
        server.wait_healthy(2)
        before = set(server.replica_pids())
        victim = min(before)

        def kill():
            time.sleep(kill_after_s)
            server.kill_replica(victim)

        run = load.closed_loop(server.url, bodies, expected, clients=clients,
                               duration_s=duration_s, retries=budget, timeout_s=10.0, during=kill)
        run.check_counts()
        started = time.perf_counter()
        after = _replaced(server, victim)
        rows.append({"retries": budget, **run.summary(), "killed_pid": victim,
                     "new_pids": sorted(after - before), "replicas_after": len(after),
                     "seconds_to_two_healthy_after_run": time.perf_counter() - started})
    return pd.DataFrame(rows).set_index("retries")


def _replaced(server, victim: int, timeout_s: float = 120.0) -> set:
    """The replica pids once Serve has replaced the killed one (two alive, the victim not one)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pids = set(server.replica_pids())
        if len(pids) == 2 and victim not in pids:
            server.wait_healthy(2)
            return pids
        time.sleep(0.2)
    raise RuntimeError(f"Serve did not replace replica {victim} within {timeout_s:.0f} s")


# --------------------------------------------------------------------------- two nodes, one machine

def cluster_demo(model_path, bodies: list, expected: list, *, clients: int = 8,
                 duration_s: float = 2.0, images: int = 6000) -> dict:
    """The serving app and the Ray Data job on a two-node Ray cluster on this machine.

    First the app with one replica per node, then ray_serving.batch_inference, unchanged, with
    two actors of one CPU on nodes of one CPU. Returns the load run's summary, the answers per
    node, the Ray Data report, and the node of every Ray Data actor, found by watching which
    node's raylet started each actor process.
    """
    from labkit.serving.server import Server, two_node_cluster  # not at the top: imports Ray
    with two_node_cluster(cpus_per_node=1) as cluster:
        address, tag = cluster.address, cluster.tag
        raylets = {_raylet_pid(node): f"node {i}"
                   for i, node in enumerate(cluster.list_all_nodes())}
        with Server(model_path, address=address, cluster_tag=tag, replicas=2,
                    max_replicas_per_node=1) as server:
            run = load.closed_loop(server.url, bodies, expected, clients=clients,
                                   duration_s=duration_s)
            run.check_counts()
        watching, placed = threading.Event(), {}
        watcher = threading.Thread(target=_watch_actors, args=(tag, raylets, placed, watching),
                                   daemon=True)
        watcher.start()
        try:
            job = ray_serving.batch_inference(model_path, ray_serving.job_pixels(limit=images),
                                              address=address, actors=2, batch_size=250)
        finally:
            watching.set()
            watcher.join()
    ok = run.records[run.records["outcome"] == "ok"]
    return {"nodes": len(raylets), "address": address, "serve": run.summary(),
            "answers_per_node": ok["node"].value_counts().to_dict(),
            "ray_data": {k: v for k, v in job.items() if k not in ("index", "logits")},
            "ray_data_actor_nodes": {pid: placed.get(pid, "?") for pid in job["actor_pids"]},
            "ray_data_actors_started": placed,
            "ray_data_predictions": np.argmax(job["logits"], axis=1), "tag": tag}


def _raylet_pid(node) -> int:
    from ray._private import ray_constants  # not at the top: see the module docstring
    return node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid


def _watch_actors(tag: str, raylets: dict, placed: dict, stop) -> None:
    """Until `stop`, note each Ray Data actor process (ray::MapWorker) and the node that started
    it (the node whose raylet is its parent)."""
    while not stop.wait(0.2):
        for process in ray_serving.job_processes(tag):
            try:
                if process.pid not in placed and "MapWorker" in " ".join(process.cmdline()):
                    placed[process.pid] = raylets.get(process.ppid(), f"parent {process.ppid()}")
            except psutil.Error:
                continue
