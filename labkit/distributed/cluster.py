"""Start N inference workers on this machine, watch them, gather and check their predictions.

The launcher gives each worker a free port on 127.0.0.1 and its own TF_CONFIG, then watches
the JSON status lines the workers print. Every wait has a deadline: a port already taken, a
worker that dies, or a worker that never joins raises `ClusterError`, after every process it
started is stopped. On a real cluster you start the same worker on each machine yourself
(`shell_commands`); nothing here talks to another host.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from labkit import ARTIFACTS_DIR, ROOT, progress_bar

LOCALHOST = "127.0.0.1"
OUT_DIR = ARTIFACTS_DIR / "distributed"


class ClusterError(RuntimeError):
    """The local cluster could not run the job; the message says which worker and why.

    `pids` lists the worker processes the launcher had started (all stopped by then); each error
    has its own list.
    """

    def __init__(self, *args, pids=()):
        super().__init__(*args)
        self.pids = list(pids)


# ----------------------------------------------------------------------------- ports and TF_CONFIG

def free_ports(count: int) -> list[int]:
    """`count` distinct ports on 127.0.0.1 that were free a moment ago (the OS picks them)."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    sockets = []
    try:
        for _ in range(count):  # hold every socket open until all are chosen, so none repeats
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((LOCALHOST, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def port_in_use(port: int, host: str = LOCALHOST) -> bool:
    """True if something already holds `port` on 127.0.0.1 (we try to bind it ourselves)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def is_listening(port: int, host: str = LOCALHOST, timeout_s: float = 0.2) -> bool:
    """True if a server accepts connections on 127.0.0.1:`port` (to name a worker never joined)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(timeout_s)
        return s.connect_ex((host, port)) == 0


def tf_configs(addresses: list[str]) -> list[dict]:
    """One TF_CONFIG per worker for a cluster of `addresses` ('host:port'); worker 0 is the chief.

    Every worker gets the same cluster list and differs only in its task index, which is
    what changes between a laptop (127.0.0.1:port each) and a cluster (one host each).
    """
    if not addresses:
        raise ValueError("addresses must list at least one 'host:port'")
    bad = [a for a in addresses if ":" not in a or not a.rsplit(":", 1)[1].isdigit()]
    if bad:
        raise ValueError(f"addresses must be 'host:port' with a numeric port, got {bad}")
    if len(set(addresses)) != len(addresses):
        raise ValueError(f"addresses must be distinct, got {addresses}")
    return [{"cluster": {"worker": list(addresses)}, "task": {"type": "worker", "index": i}}
            for i in range(len(addresses))]


def shell_commands(addresses: list[str], model: str, extra: str = "") -> list[str]:
    """The command to type on each machine of a cluster, one per address."""
    commands = []
    for config in tf_configs(addresses):
        commands.append(f"TF_CONFIG='{json.dumps(config)}' python -m labkit.distributed.worker "
                        f"--model {model}{' ' + extra if extra else ''}")
    return commands


# ----------------------------------------------------------------------------- launching

@dataclass(frozen=True)
class Launch:
    """One local job: how many workers, what each one predicts, and how long the launcher waits.

    Each worker predicts its shard of the `split` images (the first `limit`, 0: all, `repeat`
    times over) `passes` times, in batches of `batch_size`, on `threads` TensorFlow threads.
    `lockstep` keeps TensorFlow's default of one collective per batch (the slow way).
    """
    workers: int = 1
    repeat: int = 1
    passes: int = 1
    limit: int = 0
    split: str = "test"
    batch_size: int = 256
    threads: int = 1
    lockstep: bool = False
    connect_timeout_s: float = 90.0
    run_timeout_s: float = 300.0
    poll_s: float = 0.1

    def __post_init__(self):
        counts = {"workers": self.workers, "repeat": self.repeat, "passes": self.passes,
                  "batch_size": self.batch_size, "threads": self.threads}
        if min(counts.values()) < 1 or self.limit < 0:
            raise ValueError(f"{', '.join(counts)} must be >= 1 and limit >= 0, got {counts} "
                             f"and limit={self.limit}")
        if self.connect_timeout_s <= 0 or self.run_timeout_s <= 0:
            raise ValueError("connect_timeout_s and run_timeout_s must be > 0 "
                             "(a wait without a deadline can hang)")

    def worker_args(self, model: Path, out: Path) -> list[str]:
        """The command-line options every worker of this job gets (`python -m ...worker`)."""
        args = ["--model", str(model), "--out", str(out), "--split", self.split,
                "--limit", str(self.limit), "--repeat", str(self.repeat),
                "--passes", str(self.passes), "--batch-size", str(self.batch_size),
                "--threads", str(self.threads), "--connect-timeout-s", str(self.connect_timeout_s)]
        return args + (["--lockstep"] if self.lockstep else [])


@dataclass
class _Worker:
    index: int
    port: int
    process: subprocess.Popen
    log_path: Path
    events: list = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"{LOCALHOST}:{self.port}"

    def seen(self, event: str) -> dict | None:
        return next((e for e in list(self.events) if e.get("event") == event), None)

    def log_tail(self, lines: int = 6) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        noise = ("WARNING: All log", "I0000", "W0000")
        kept = [line for line in text if not line.startswith(noise)]
        return "\n".join(kept[-lines:])


def _read_events(worker: _Worker) -> None:
    for line in worker.process.stdout:
        line = line.strip()
        if line.startswith("{"):
            try:
                worker.events.append(json.loads(line))
            except json.JSONDecodeError:
                pass


def _stop(workers: list[_Worker], grace_s: float = 1.0) -> None:
    """Stop every worker still running: SIGTERM to its process group, SIGKILL after a grace period.

    The SIGKILL is needed: once a worker has joined a cluster, TensorFlow's coordination service
    catches SIGTERM (it takes it for a preemption notice) and the process carries on.
    """
    for w in workers:
        if w.process.poll() is None:
            try:
                os.killpg(w.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace_s
    for w in workers:
        try:
            w.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(w.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            w.process.wait()
        if w.process.stdout:
            w.process.stdout.close()


def _describe_exit(w: _Worker) -> str:
    error = w.seen("error")
    why = error["message"] if error else (w.log_tail() or "no output")
    return (f"worker {w.index} ({w.address}) exited with code {w.process.returncode} "
            f"before finishing: {why}")


def run_local(model, launch: Launch = Launch(), *, out=None, ports: list[int] | None = None,
              faults: dict | None = None) -> dict:
    """Run the data-parallel job `launch` on local workers; return their reports and timings.

    Each worker predicts its shard `launch.passes` times, every pass started together on a
    barrier; a pass lasts until its slowest worker ends, and the timings are those of the
    fastest pass (`pass_seconds` lists them all).

    Raises ClusterError (after stopping every worker) if a port is taken, a worker exits with
    an error, the cluster has not formed within `launch.connect_timeout_s` of the launch, or
    the job has not finished within `launch.run_timeout_s`. `faults` maps a worker index to a
    fault to inject ('exit-early' or 'never-connect'), to see those errors on purpose.
    """
    out, commands = _prepare(Path(model), launch, out, ports, faults)
    workers: list[_Worker] = []
    load_before = os.getloadavg()
    started = time.monotonic()
    try:
        for i, (port, env, argv) in enumerate(commands):
            workers.append(_start(i, port, env, argv, out))
        _wait(workers, launch, started)
        reports = _collect(workers, out)
    except ClusterError as error:
        error.pids = [w.process.pid for w in workers]
        raise
    finally:
        _stop(workers)
    return {"num_workers": launch.workers, "out": out, "reports": reports,
            **_timings(reports, launch), "threads": launch.threads,
            "wall_seconds": time.monotonic() - started, "load_before": load_before[0],
            "addresses": [w.address for w in workers], "pids": [w.process.pid for w in workers]}


def _prepare(model: Path, launch: Launch, out, ports, faults) -> tuple[Path, list]:
    """Check everything before any process starts; (out, [(port, env, argv) per worker])."""
    n = launch.workers
    faults = dict(faults or {})
    known = ("exit-early", "never-connect")
    if any(i not in range(n) or f not in known for i, f in faults.items()):
        raise ValueError(f"faults maps worker indices in [0, {n - 1}] to 'exit-early' or "
                         f"'never-connect', got {faults}")
    if not model.is_file():
        raise FileNotFoundError(f"No model at {model}; save one with model.save(path) "
                                "(a .keras file)")
    if ports is None:
        ports = free_ports(n)
    if len(ports) != n or len(set(ports)) != n:
        raise ValueError(f"need {n} distinct ports, got {ports}")
    taken = [p for p in ports if port_in_use(p)]
    if taken:
        raise ClusterError(f"port(s) {taken} on {LOCALHOST} already in use (another program, or a "
                           "worker left over from an earlier run). Choose other ports, or pass "
                           "ports=None to let the launcher pick free ones.")
    out = Path(out) if out is not None else OUT_DIR / f"run-{n}w"
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("predictions-worker*.npz"), *out.glob("worker*.json")]:
        stale.unlink()  # a file from an earlier run must never pass for this run's output
    configs = tf_configs([f"{LOCALHOST}:{p}" for p in ports])
    args = launch.worker_args(model, out)
    commands = [(port, dict(os.environ, TF_CONFIG=json.dumps(config), PYTHONUNBUFFERED="1"),
                 [sys.executable, "-m", "labkit.distributed.worker", *args,
                  "--fault", faults.get(i, "none")])
                for i, (port, config) in enumerate(zip(ports, configs))]
    return out, commands


def _start(index: int, port: int, env: dict, argv: list, out: Path) -> _Worker:
    """Start one worker, its stderr to <out>/worker<i>.log, and a thread reading its events."""
    log_path = out / f"worker{index}.log"
    with open(log_path, "w") as log:   # its own process group, so _stop reaches its children
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True, env=env,
                                   cwd=str(ROOT), start_new_session=True)
    worker = _Worker(index, port, process, log_path)
    threading.Thread(target=_read_events, args=(worker,), daemon=True).start()
    return worker


def _wait(workers: list[_Worker], launch: Launch, started: float) -> None:
    """Until every worker has exited cleanly; ClusterError on a failure or a missed deadline."""
    while True:
        time.sleep(launch.poll_s)
        elapsed = time.monotonic() - started
        for w in workers:
            code = w.process.poll()
            if code is not None and code != 0:
                raise ClusterError(_describe_exit(w))
        if all(w.process.poll() == 0 for w in workers):
            return
        connected = [w for w in workers if w.seen("connected")]
        if len(connected) < len(workers) and elapsed > launch.connect_timeout_s:
            silent = [f"worker {w.index} ({w.address})" for w in workers
                      if not is_listening(w.port)]
            raise ClusterError(
                f"the cluster did not form within {launch.connect_timeout_s:.0f} s: "
                f"{len(connected)} of {len(workers)} workers joined. "
                + (f"Not listening: {', '.join(silent)}. " if silent else "")
                + "A worker that is up but never starts its server, a wrong address in "
                  "TF_CONFIG or a firewall between machines all look like this.")
        if elapsed > launch.run_timeout_s:
            unfinished = [w.index for w in workers if w.process.poll() is None]
            raise ClusterError(f"the job did not finish within {launch.run_timeout_s:.0f} s "
                               f"(workers still running: {unfinished}); raise run_timeout_s "
                               "for a bigger job")


def _collect(workers: list[_Worker], out: Path) -> list[dict]:
    """Each worker's report (<out>/worker<i>.json), in worker order."""
    reports = []
    for w in workers:
        path = out / f"worker{w.index}.json"
        if not path.is_file():
            raise ClusterError(f"worker {w.index} exited cleanly but wrote no {path.name}")
        reports.append(json.loads(path.read_text()))
    return reports


def _timings(reports: list[dict], launch: Launch) -> dict:
    """The job's figures from the workers' reports: its fastest pass counts (the least disturbed).

    A pass ends when its slowest worker ends.
    """
    pass_seconds = [max(r["pass_seconds"][p] for r in reports) for p in range(launch.passes)]
    best = int(np.argmin(pass_seconds))
    seconds = pass_seconds[best]
    images = sum(r["images"] for r in reports)
    cpu_seconds = sum(r["pass_cpu_seconds"][best] for r in reports)
    return {"images": images, "seconds": seconds, "pass_seconds": pass_seconds,
            "throughput_ips": images / seconds,
            "cpu_share": cpu_seconds / (seconds * launch.workers * launch.threads),
            "images_per_cpu_second": images / cpu_seconds}


# -------------------------------------------------------------------------- gathering and checking

def gather(out, num_workers: int, total: int) -> tuple[np.ndarray, np.ndarray]:
    """Every worker's predictions, checked and put back in image order: (indices, logits).

    Raises ClusterError if any image was predicted twice or not at all.
    """
    out = Path(out)
    parts = []
    for i in range(num_workers):
        path = out / f"predictions-worker{i}.npz"
        if not path.is_file():
            raise ClusterError(f"missing {path}: worker {i} did not write its predictions")
        with np.load(path) as npz:
            parts.append((npz["index"], npz["logits"]))
    indices = np.concatenate([p[0] for p in parts]).astype(np.int64)
    logits = np.concatenate([p[1] for p in parts])
    check_each_once(indices, total)
    order = np.argsort(indices, kind="stable")
    return indices[order], logits[order]


def check_each_once(indices: np.ndarray, total: int) -> None:
    """Raise ClusterError unless `indices` holds every integer in [0, total) exactly once."""
    indices = np.asarray(indices)
    outside = indices[(indices < 0) | (indices >= total)]
    if outside.size:
        raise ClusterError(f"{outside.size} predictions have indices outside [0, {total}), "
                           f"e.g. {outside[:5]}")
    counts = np.bincount(indices, minlength=total)
    missing, repeated = np.flatnonzero(counts == 0), np.flatnonzero(counts > 1)
    if missing.size or repeated.size:
        raise ClusterError(f"each image must be predicted exactly once: {missing.size} missing "
                           f"(e.g. {missing[:5].tolist()}), {repeated.size} predicted more "
                           f"than once (e.g. {repeated[:5].tolist()})")


# ----------------------------------------------------------------------------- scaling

# (workers, TensorFlow threads per worker): the three ways to spend one or two cores.
ONE_WORKER, TWO_WORKERS, ONE_PROCESS_TWO_THREADS = (1, 1), (2, 1), (1, 2)
SCALING_JOB = Launch(repeat=5)   # the test set 5 times over, one timed pass per launch


def configuration_name(workers: int, threads: int) -> str:
    """'1 worker x 1 thread', '2 workers x 1 thread', '1 worker x 2 threads': a scaling row."""
    return (f"{workers} worker{'s' if workers > 1 else ''} x "
            f"{threads} thread{'s' if threads > 1 else ''}")


def scaling(model, launch: Launch = SCALING_JOB, *,
            configurations=(ONE_WORKER, TWO_WORKERS, ONE_PROCESS_TWO_THREADS), rounds: int = 2,
            progress: bool = True):
    """Throughput of the job `launch` in each (workers, threads per worker) configuration.

    The default compares two ways of using two cores, two one-thread worker processes and one
    process with two TensorFlow threads, with one one-thread worker. Every configuration runs
    the same worker program (`python -m labkit.distributed.worker`; a single worker is a cluster
    of one) on the same images and the same model, timed the same way: `launch` with its
    workers and threads set by the configuration.

    Each round runs every configuration once, in alternating order, so a burst of load from
    another program is shared between them; a configuration's figure is its best round (the
    least disturbed). Within a round each launch times `launch.passes` passes and reports its
    fastest (`run_local`): a pass costs the job's seconds, a launch also costs the workers'
    start-up. Returns (table indexed by `configuration_name`, runs); `scaling_table` says
    what its columns mean.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    configurations = [tuple(c) for c in configurations]
    if not configurations or any(len(c) != 2 or min(c) < 1 for c in configurations) \
            or len(set(configurations)) != len(configurations):
        raise ValueError(f"configurations must be distinct (workers, threads) pairs of positive "
                         f"counts, got {configurations}")
    runs = []
    plan = [(r, c) for r in range(rounds)
            for c in (configurations if r % 2 == 0 else configurations[::-1])]
    for r, (n, threads) in progress_bar(plan, desc="data-parallel runs", disable=not progress):
        run = run_local(model, replace(launch, workers=n, threads=threads))
        runs.append({"round": r, "configuration": configuration_name(n, threads),
                     "threads": threads, **run})
    return scaling_table(runs, [configuration_name(*c) for c in configurations]), runs


def scaling_table(runs: list[dict], names: list[str]) -> pd.DataFrame:
    """One row per configuration (in the order of `names`): its best round, against the first.

    `speedup` is against the first configuration; `efficiency` is the speedup per core used
    (workers x threads) relative to it. `cpu_share` is the CPU time the workers got over their
    wall time and cores (1.0: every thread had a core to itself; lower: other programs took the
    cores, or, for a multi-threaded worker, its threads waited on each other).
    `images_per_cpu_second` is the work done per CPU second, which load barely moves.
    """
    frame = pd.DataFrame([{k: run[k] for k in (
        "round", "configuration", "num_workers", "threads", "images", "seconds", "throughput_ips",
        "cpu_share", "images_per_cpu_second", "load_before")} for run in runs])
    best = frame.loc[frame.groupby("configuration")["throughput_ips"].idxmax()]
    best = best.set_index("configuration")
    by_name = frame.groupby("configuration")
    table = pd.DataFrame({"workers": best["num_workers"], "threads_per_worker": best["threads"],
                          "cores": best["num_workers"] * best["threads"],
                          "images": best["images"], "best_round": best["round"],
                          "best_seconds": best["seconds"], "throughput_ips": best["throughput_ips"],
                          "median_throughput_ips": by_name["throughput_ips"].median(),
                          "cpu_share": best["cpu_share"],  # of the run that counts
                          "images_per_cpu_second": by_name["images_per_cpu_second"].median(),
                          "load_before": best["load_before"]}).loc[names]
    table.index.name = "configuration"
    first = table.iloc[0]
    table["speedup"] = table["throughput_ips"] / first["throughput_ips"]
    table["efficiency"] = table["speedup"] / (table["cores"] / first["cores"])
    return table


def baseline_model_path() -> Path:
    """The cached baseline's .keras file (trained first if need be): what every worker loads."""
    from labkit import models  # not at the top: it loads TensorFlow (the launcher never does)
    models.load_or_train_baseline()
    return models.model_path("baseline", models.BaselineConfig())
