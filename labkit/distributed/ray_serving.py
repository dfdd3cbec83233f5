"""Batch inference of the int8 .tflite with Ray Data: a pool of actors, each one LiteRT interpreter.

`map_batches` streams batches of images to long-lived actors that load the model once; the same
code runs on a local Ray (bound to 127.0.0.1) and on a cluster given its address. The job runs in
a fresh process, `python -m labkit.distributed.ray_serving`, so that a Ray that hangs is stopped by
a timeout with every process it started. That entry point skips labkit.setup(): the driver and
its actors run LiteRT and NumPy, never TensorFlow, and draw no random number.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil

from labkit import ARTIFACTS_DIR, ROOT, files
from labkit.data import load_mnist, read_mnist_arrays
from labkit.measure import LiteRTModel

# Ray is imported inside the functions that run it: a missing or broken Ray raises RayUnavailable
# there, and importing this module (as labkit.serving does) stays quick.

OUT_DIR = ARTIFACTS_DIR / "distributed"
CALIBRATION_IMAGES = 500  # validation images the converter sees to choose the int8 ranges


class RayUnavailable(RuntimeError):
    """Ray is not installed, or its runtime did not start; the message says which."""


# ----------------------------------------------------------------------------- the int8 model

def int8_tflite(model=None, directory: Path = OUT_DIR) -> Path:
    """The baseline (or `model`) as a full-integer int8 .tflite: int8 weights, activations, I/O.

    Converted by quantization.converter, calibrated on the first CALIBRATION_IMAGES validation
    images, and cached in `directory` by models.cached: the file name's key covers the model's
    weights, so another model never gets this one's file, and the file is written atomically.
    Distributed inference therefore does not depend on the quantization chapter's files.
    """
    from labkit import models, quantization  # not at the top: they load TensorFlow
    if model is None:
        model, _ = models.load_or_train_baseline()
    calibration = np.asarray(load_mnist().x_val[:CALIBRATION_IMAGES])
    settings = {"mode": "int8", "int8_io": True, "calibration": f"x_val[:{CALIBRATION_IMAGES}]"}
    path, _ = models.cached(
        "ray-int8", settings, [model],
        lambda: (quantization.converter(model, "int8", calibration, int8_io=True,
                                        num_samples=CALIBRATION_IMAGES), {}),
        directory, kind="tflite")
    return path


# ----------------------------------------------------------------------------- one actor

class LiteRTPredictor:
    """A Ray Data actor: one LiteRT interpreter, loaded once, reused for every batch."""

    def __init__(self, model_path: str, threads: int = 1):
        self.model = LiteRTModel(model_path, num_threads=threads)
        self.pid = os.getpid()

    def __call__(self, batch: dict) -> dict:
        return {"index": batch["index"], "logits": predict_pixels(self.model, batch["pixels"]),
                "actor_pid": np.full(len(batch["index"]), self.pid)}


def predict_pixels(model, pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels (n, 28, 28) -> logits: the one conversion that both Ray and one process use."""
    x = (pixels.astype(np.float32) / 255.0)[..., np.newaxis]
    return model(x)


def single_process(model_path, pixels: np.ndarray, batch_size: int = 1000,
                   threads: int = 1) -> tuple:
    """The reference: the same predictor in this process, batch by batch: (logits, seconds)."""
    model = LiteRTModel(model_path, num_threads=threads)
    predict_pixels(model, pixels[:batch_size])  # warm-up at this batch size (LiteRT resizes)
    start = time.perf_counter()
    logits = np.concatenate([predict_pixels(model, pixels[i:i + batch_size])
                             for i in range(0, len(pixels), batch_size)])
    return logits, time.perf_counter() - start


# ----------------------------------------------------------------------------- the Ray job

def start_ray(address: str | None = None, num_cpus: int = 2) -> None:
    """ray.init on a cluster given its address, or a Ray of our own on this machine.

    Address "local" always starts a new Ray: a bare ray.init() would join any Ray already running
    on this machine (another notebook's) and refuse our num_cpus. A busy machine can make Ray's
    agents miss their start-up deadline once, so a local start is tried twice.
    """
    import ray  # not at the top: see the note under the imports
    init = dict(address=address or "local", include_dashboard=False, log_to_driver=False,
                configure_logging=False)
    if address is None:
        init.update(num_cpus=num_cpus, object_store_memory=256 * 1024 ** 2)
    for attempt in (1, 2):
        try:
            ray.init(**init)
            return
        except Exception as error:  # Ray raises a bare Exception when its node does not come up
            ray.shutdown()
            if attempt == 2 or address is not None:
                raise RayUnavailable(f"Ray did not start ({type(error).__name__}: {error})") \
                    from None


def batch_inference(model_path, pixels: np.ndarray, *, address: str | None = None, actors: int = 2,
                    batch_size: int = 1000, threads: int = 1) -> dict:
    """Predict `pixels` with Ray Data and an actor pool, the same code on a local Ray or a cluster.

    address None starts a local Ray on this machine (num_cpus=actors); an address such as
    'ray://head-node:10001' or 'head-node:6379' joins that cluster instead, whose nodes need
    labkit installed and the .tflite file at the same path.
    """
    try:
        import ray  # not at the top: see the note under the imports
    except ImportError:
        raise RayUnavailable("Ray is not installed: pip install 'ray[data]' to run this part") \
            from None
    if actors < 1 or batch_size < 1:
        raise ValueError(f"actors and batch_size must be >= 1, got {actors} and {batch_size}")
    start = time.perf_counter()
    start_ray(address, num_cpus=actors)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        made = time.perf_counter()
        dataset = _dataset(ray, pixels, block_size=batch_size)  # in real use: ray.data.read_parquet
        dataset_seconds = time.perf_counter() - made
        started = time.perf_counter()  # from here on: actors start, then stream every batch
        predictions = dataset.map_batches(
            LiteRTPredictor,
            fn_constructor_kwargs={"model_path": str(model_path), "threads": threads},
            batch_size=batch_size, batch_format="numpy", num_cpus=1,
            compute=ray.data.ActorPoolStrategy(size=actors))
        index, logits, pids = [], [], []
        first_seconds = None
        for batch in predictions.iter_batches(batch_size=None, batch_format="numpy"):
            if first_seconds is None:  # the first batch back marks the end of the actors' start-up
                first_seconds, first_rows = time.perf_counter() - started, len(batch["index"])
            index.append(batch["index"])
            logits.append(batch["logits"])
            pids.append(batch["actor_pid"])
        seconds = time.perf_counter() - started
        nodes = len(ray.nodes())
        resources = ray.cluster_resources()
    finally:
        _join_ray_data_threads()
        ray.shutdown()
    index = np.concatenate(index)
    order = np.argsort(index, kind="stable")
    steady = ((len(index) - first_rows) / (seconds - first_seconds) if seconds > first_seconds
              else float("nan"))
    return {"index": index[order], "logits": np.concatenate(logits)[order],
            "actor_pids": sorted(set(np.concatenate(pids).tolist())), "seconds": seconds,
            "throughput_ips": len(index) / seconds, "first_batch_seconds": first_seconds,
            "steady_throughput_ips": steady, "dataset_seconds": dataset_seconds,
            "seconds_with_startup": time.perf_counter() - start,
            "nodes": nodes, "cpus": resources.get("CPU", 0.0), "address": address or "local"}


# Ray Data winds its executor down on background threads after the last batch. One of them still
# calling into Ray after ray.shutdown() makes Ray end the whole process (a notebook's kernel too).
RAY_DATA_THREADS = ("StreamingExecutor-", "ray-data-metadata-prefetch")


def _join_ray_data_threads(timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and thread.name.startswith(RAY_DATA_THREADS):
            thread.join(max(0.0, deadline - time.monotonic()))


def _dataset(ray, pixels: np.ndarray, block_size: int):
    """A Ray Dataset with 'index' and 'pixels' (a tensor column), in blocks of `block_size` rows.

    The pixels stay uint8 (4x less to move than float32). Several blocks let Ray hand work to
    every actor at once; one big block would keep all but one actor idle.
    """
    from ray.data.extensions import TensorArray  # not at the top: see the note under the imports
    frames = [pd.DataFrame({"index": np.arange(i, min(i + block_size, len(pixels))),
                            "pixels": TensorArray(np.ascontiguousarray(pixels[i:i + block_size]))})
              for i in range(0, len(pixels), block_size)]
    return ray.data.from_pandas(frames)


# ------------------------------------------------------------------------ run it in a fresh process

def job_pixels(repeat: int = 1, limit: int = 0) -> np.ndarray:
    """The test set's uint8 pixels, `repeat` times over (image i of copy r has index r * n + i)."""
    pixels = read_mnist_arrays()["x_test"]
    if limit:
        pixels = pixels[:limit]
    return np.tile(pixels, (repeat, 1, 1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Ray Data batch inference of the int8 .tflite.")
    parser.add_argument("--model", required=True,
                        help="the .tflite file (at the same path on every node)")
    parser.add_argument("--out", required=True,
                        help="directory for ray_predictions.npz and ray_report.json")
    parser.add_argument("--address", default=None,
                        help="a Ray cluster's address; default: start a local Ray")
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--limit", type=int, default=0)
    args = parser.parse_args(argv)
    pixels = job_pixels(args.repeat, args.limit)
    try:
        result = batch_inference(args.model, pixels, address=args.address, actors=args.actors,
                                 batch_size=args.batch_size)
    except RayUnavailable as error:
        print(json.dumps({"event": "error", "message": str(error)}), flush=True)
        return 3
    out = Path(args.out)
    index, logits = result.pop("index"), result.pop("logits")
    files.write_atomic(out / "ray_predictions.npz",
                       lambda tmp: np.savez(tmp, index=index, logits=logits))
    result.update(images=len(pixels), actors=args.actors, batch_size=args.batch_size)
    files.write_json(out / "ray_report.json", result)
    print(json.dumps({"event": "done", **result}), flush=True)
    return 0


def run(model_path, *, address: str | None = None, actors: int = 2, repeat: int = 1, limit: int = 0,
        batch_size: int = 1000, out=None, timeout_s: float = 300.0) -> dict:
    """Run the Ray job in a fresh process and return its report with its predictions.

    Without an address, Ray runs on this machine only: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes
    every Ray process bind and advertise 127.0.0.1 instead of the machine's network address.
    Raises RayUnavailable if Ray is missing or did not start, and stops the job (all of its
    processes) if it has not finished within `timeout_s`.
    """
    if importlib.util.find_spec("ray") is None:
        raise RayUnavailable("Ray is not installed: pip install 'ray[data]' to run this part")
    out = Path(out) if out else OUT_DIR / "ray"
    for stale in ("ray_predictions.npz", "ray_report.json"):
        (out / stale).unlink(missing_ok=True)
    tag = f"{os.getpid()}-{time.time_ns()}"  # every process of this job inherits it: see _stop_job
    env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0", LABKIT_RAY_JOB=tag)
    if address is None:
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    cmd = [sys.executable, "-m", "labkit.distributed.ray_serving", "--model", str(model_path),
           "--out", str(out), "--actors", str(actors), "--repeat", str(repeat),
           "--limit", str(limit), "--batch-size", str(batch_size)]
    if address:
        cmd += ["--address", address]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "ray_job.log", "w") as log:
        process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env,
                                   cwd=str(ROOT), start_new_session=True)
        try:
            stdout, _ = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise RayUnavailable(f"the Ray job did not finish within {timeout_s:.0f} s and was "
                                 f"stopped (log: {out / 'ray_job.log'})") from None
        finally:
            _stop_job(process, tag)
    events = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    error = next((e for e in events if e.get("event") == "error"), None)
    if error or process.returncode != 0:
        why = error["message"] if error else (out / "ray_job.log").read_text()[-1500:]
        raise RayUnavailable(f"the Ray job failed (exit code {process.returncode}): {why}")
    report = json.loads((out / "ray_report.json").read_text())
    with np.load(out / "ray_predictions.npz") as npz:
        report["index"], report["logits"] = npz["index"], npz["logits"]
    report["tag"] = tag
    return report


def job_processes(tag: str) -> list:
    """The processes of one Ray job on this machine: those whose environment carries its tag.

    Ray's raylet starts its workers in sessions of their own, so the job's process group does
    not reach them; the environment, which they all inherit from the driver, does.
    """
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("LABKIT_RAY_JOB") == tag:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _stop_job(process: subprocess.Popen, tag: str, grace_s: float = 10.0) -> None:
    """Stop the driver, give Ray's processes `grace_s` to exit on their own, kill the rest by id."""
    if process.poll() is None:
        process.kill()
    process.wait()
    left = job_processes(tag)
    _, alive = psutil.wait_procs(left, timeout=grace_s)  # they exit once their raylet is gone
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


if __name__ == "__main__":
    sys.exit(main())
