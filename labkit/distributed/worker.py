"""One data-parallel inference worker: `python -m labkit.distributed.worker` (notebook 06).

The same entry point runs on a laptop (the launcher in `cluster.py` starts N of them on
127.0.0.1) and on a real cluster (one per machine, each with its own TF_CONFIG). It

1. reads and checks TF_CONFIG (the cluster's worker addresses and this worker's index),
2. joins the cluster through MultiWorkerMirroredStrategy, which starts this worker's gRPC
   server and waits, with a bounded watchdog, until every peer has answered,
3. takes its shard of the images (worker i predicts images i, i+N, i+2N, ...) through
   `strategy.distribute_datasets_from_function`,
4. predicts them with the model named by --model and writes the logits with their image indices to
   `<out>/predictions-worker<i>.npz` and its timing to `<out>/worker<i>.json`.

It prints one JSON line per stage on stdout ("started", "connected", "done") so that a
launcher can tell a slow worker from a dead one. Exit codes: 0 done, 2 bad TF_CONFIG or
arguments, 3 asked to fail (--fault exit-early), 4 the cluster did not form in time, 5 the
workers' all-reduced image count is not the job's size.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

EXIT_BAD_CONFIG, EXIT_FAULT, EXIT_CONNECT_TIMEOUT, EXIT_COUNT_MISMATCH = 2, 3, 4, 5
FAULTS = ("none", "exit-early", "never-connect")


def emit(event: str, **fields) -> None:
    """One status line for the launcher (stdout is line-buffered JSON, nothing else goes there)."""
    print(json.dumps({"event": event, **fields}), flush=True)


def read_tf_config(environ=os.environ) -> dict:
    """TF_CONFIG parsed and checked: {'workers': [host:port, ...], 'index': i}."""
    raw = environ.get("TF_CONFIG")
    if not raw:
        raise ValueError("TF_CONFIG is not set. It must be JSON like "
                         '{"cluster": {"worker": ["host1:port", "host2:port"]}, '
                         '"task": {"type": "worker", "index": 0}}')
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(f"TF_CONFIG is not valid JSON ({error}): {raw[:200]!r}") from None
    workers = config.get("cluster", {}).get("worker")
    task = config.get("task", {})
    if not isinstance(workers, list) or not workers or not all(isinstance(w, str) and ":" in w for w in workers):
        raise ValueError(f"TF_CONFIG cluster.worker must be a non-empty list of 'host:port', got {workers!r}")
    if set(config["cluster"]) - {"worker"}:
        raise ValueError(f"this worker only uses the 'worker' job, TF_CONFIG has {sorted(config['cluster'])}")
    if task.get("type") != "worker":
        raise ValueError(f"TF_CONFIG task.type must be 'worker', got {task.get('type')!r}")
    index = task.get("index")
    if not isinstance(index, int) or not 0 <= index < len(workers):
        raise ValueError(f"TF_CONFIG task.index must be an integer in [0, {len(workers) - 1}], got {index!r}")
    return {"workers": workers, "index": index}


def shard_indices(total: int, num_workers: int, index: int):
    """The global indices worker `index` predicts: the same rule as Dataset.shard (for tests and docs)."""
    import numpy as np
    return np.arange(index, total, num_workers)


def _watchdog(seconds: float, connected: threading.Event, peers: list) -> None:
    """Exit the process if the cluster has not formed in time: a missing peer must not hang us."""
    if not connected.wait(seconds):
        emit("error", reason="connect-timeout",
             message=f"the cluster did not form within {seconds:.0f} s: some of {peers} never answered")
        os._exit(EXIT_CONNECT_TIMEOUT)  # the strategy's wait is in C++ and cannot be interrupted


def run(args, config: dict) -> dict:
    """Join the cluster, predict this worker's shard, write it; `config` comes from read_tf_config()."""
    index, workers = config["index"], config["workers"]
    emit("started", worker=index, pid=os.getpid(), address=workers[index])
    if args.fault == "exit-early":
        emit("error", reason="fault", message="asked to exit early (--fault exit-early)")
        sys.exit(EXIT_FAULT)
    if args.fault == "never-connect":
        time.sleep(10 ** 6)  # a machine that never comes up: alive, but never joins the cluster

    import labkit
    from labkit.data import load_mnist
    with labkit.quiet_stderr():
        import tensorflow as tf
    import numpy as np
    import tf_keras as keras

    # Threads and collectives must be set before TensorFlow starts its runtime, so no op may run
    # before the strategy exists: labkit.setup() (which runs one) comes right after it.
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    tf.get_logger().setLevel("ERROR")

    connected = threading.Event()
    threading.Thread(target=_watchdog, args=(args.connect_timeout_s, connected, workers), daemon=True).start()
    with labkit.quiet_stderr():  # gRPC server start-up lines
        strategy = tf.distribute.MultiWorkerMirroredStrategy()  # blocks until every peer answers
    connected.set()
    labkit.setup(seed=0)  # seeds, op determinism, quiet logs: the runtime is configured by now
    emit("connected", worker=index, num_workers=len(workers), replicas=strategy.num_replicas_in_sync)

    splits = load_mnist()
    images = np.asarray(getattr(splits, f"x_{args.split}"))
    if args.limit:
        images = images[:args.limit]
    total = len(images) * args.repeat
    with strategy.scope():
        model = keras.models.load_model(args.model, compile=False)
        images_const = tf.constant(images)

    def dataset_fn(context: tf.distribute.InputContext):
        # Shard the *indices*, then look the images up: each worker reads only its own images,
        # and every prediction keeps the global index it belongs to.
        ds = tf.data.Dataset.range(total)
        ds = ds.shard(context.num_input_pipelines, context.input_pipeline_id)
        ds = ds.batch(context.get_per_replica_batch_size(args.batch_size * context.num_input_pipelines))
        ds = ds.map(lambda idx: (idx, tf.gather(images_const, idx % len(images)))).prefetch(2)
        one_core = tf.data.Options()  # tf.data has its own thread pool: keep it to this worker's share
        one_core.threading.private_threadpool_size = args.threads
        one_core.threading.max_intra_op_parallelism = 1
        return ds.with_options(one_core)

    # By default each next(iterator) is itself a collective: the workers agree on whether anyone
    # still has data, so a training step's all-reduce never waits for a worker that ran out.
    # Inference has no collective in its step, so each worker can simply run until its own
    # shard ends, without meeting the others at every batch.
    strategy.extended.experimental_enable_get_next_as_optional = args.lockstep
    options = tf.distribute.InputOptions(experimental_fetch_to_device=False)
    dist_ds = strategy.distribute_datasets_from_function(dataset_fn, options)

    @tf.function
    def predict_step(batch):
        idx, x = batch
        return idx, strategy.run(lambda x: model(x, training=False), args=(x,))

    # Warm up (traces the step) on this worker's first batch, then start together on a barrier.
    for first in dist_ds:
        predict_step(first)
        break
    barrier = lambda: strategy.reduce("SUM", strategy.run(lambda: tf.ones([])), axis=None)  # noqa: E731

    # Each pass predicts the whole shard again, timed from a barrier: a second pass costs seconds,
    # a second launch (importing TensorFlow, joining the cluster, loading the model) costs more.
    pass_seconds, pass_cpu_seconds = [], []
    for _ in range(args.passes):
        barrier()
        start, cpu_start = time.perf_counter(), time.process_time()
        indices, logits = [], []
        for batch in dist_ds:
            idx, out = predict_step(batch)
            for i, y in zip(strategy.experimental_local_results(idx), strategy.experimental_local_results(out)):
                indices.append(i.numpy())
                logits.append(y.numpy())
        pass_seconds.append(time.perf_counter() - start)
        pass_cpu_seconds.append(time.process_time() - cpu_start)

    indices = np.concatenate(indices) if indices else np.zeros(0, np.int64)
    logits = np.concatenate(logits) if logits else np.zeros((0, 10), np.float32)
    # A collective over all workers: the images predicted in total (every worker must agree).
    predicted_total = strategy.reduce("SUM", strategy.run(lambda: tf.constant(float(len(indices)))), axis=None)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / f"predictions-worker{index}.npz", index=indices, logits=logits)
    report = {"worker": index, "num_workers": len(workers), "address": workers[index],
              "images": int(len(indices)), "predicted_total": int(predicted_total.numpy()),
              "expected_total": int(total), "pass_seconds": pass_seconds, "pass_cpu_seconds": pass_cpu_seconds,
              "threads": args.threads, "lockstep": args.lockstep, "batch_size": args.batch_size,
              "tensorflow": tf.__version__}
    if report["predicted_total"] != total:
        emit("error", reason="count", message=f"the workers predicted {report['predicted_total']} images "
             f"in total, expected {total}")
        sys.exit(EXIT_COUNT_MISMATCH)
    (out / f"worker{index}.json").write_text(json.dumps(report, indent=1))
    emit("done", **report)
    return report


def parse_args(argv=None):
    from labkit import ARTIFACTS_DIR
    parser = argparse.ArgumentParser(description="Data-parallel batch inference worker (reads TF_CONFIG).")
    parser.add_argument("--model", required=True, help="a .keras model file present on every machine")
    parser.add_argument("--out", default=str(ARTIFACTS_DIR / "distributed" / "run"),
                        help="where predictions-worker<i>.npz and worker<i>.json go (shared or per machine)")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--limit", type=int, default=0, help="use only the first LIMIT images (0: all)")
    parser.add_argument("--repeat", type=int, default=1, help="predict the images REPEAT times (a longer job)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per batch on each worker")
    parser.add_argument("--passes", type=int, default=1,
                        help="timed passes over the shard (the launcher keeps the fastest)")
    parser.add_argument("--threads", type=int, default=1, help="TensorFlow intra- and inter-op threads")
    parser.add_argument("--connect-timeout-s", type=float, default=60.0,
                        help="give up if the cluster has not formed after this many seconds")
    parser.add_argument("--lockstep", action="store_true",
                        help="keep TensorFlow's default of one collective per batch (the slow way, for comparison)")
    parser.add_argument("--fault", default="none", choices=FAULTS, help="inject a failure (tests, notebook 06)")
    args = parser.parse_args(argv)
    for name in ("repeat", "batch_size", "threads", "passes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.limit < 0 or args.connect_timeout_s <= 0:
        parser.error("--limit must be >= 0 and --connect-timeout-s > 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        config = read_tf_config()
    except ValueError as error:  # a bad TF_CONFIG: say so and exit, do not wait for anyone
        emit("error", reason="bad-config", message=str(error))
        print(f"labkit.distributed.worker: {error}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    run(args, config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
