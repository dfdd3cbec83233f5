"""One data-parallel inference worker, `python -m labkit.distributed.worker`: the same program on
a laptop (cluster.run_local starts N on 127.0.0.1) and on a cluster (one per machine).

It reads TF_CONFIG, joins the cluster (MultiWorkerMirroredStrategy, with a watchdog), predicts
its shard (images i, i+N, i+2N, ...), and writes <out>/predictions-worker<i>.npz and
<out>/worker<i>.json. One JSON line per stage on stdout ("started", "connected", "done") tells a
launcher a slow worker from a dead one; the exit codes are the EXIT_* constants.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

import labkit
from labkit import ARTIFACTS_DIR, files
from labkit.data import load_mnist

# 0 done, 2 a bad TF_CONFIG or arguments, 3 asked to fail (--fault exit-early), 4 the cluster did
# not form in time, 5 the workers' all-reduced image count is not the job's size
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
    if not isinstance(workers, list) or not workers \
            or not all(isinstance(w, str) and ":" in w for w in workers):
        raise ValueError("TF_CONFIG cluster.worker must be a non-empty list of 'host:port', "
                         f"got {workers!r}")
    if set(config["cluster"]) - {"worker"}:
        raise ValueError("this worker only uses the 'worker' job, "
                         f"TF_CONFIG has {sorted(config['cluster'])}")
    if task.get("type") != "worker":
        raise ValueError(f"TF_CONFIG task.type must be 'worker', got {task.get('type')!r}")
    index = task.get("index")
    if not isinstance(index, int) or not 0 <= index < len(workers):
        raise ValueError(f"TF_CONFIG task.index must be an integer in [0, {len(workers) - 1}], "
                         f"got {index!r}")
    return {"workers": workers, "index": index}


def shard_indices(total: int, num_workers: int, index: int):
    """The global indices worker `index` predicts: Dataset.shard's rule (for tests and docs)."""
    return np.arange(index, total, num_workers)


def _watchdog(seconds: float, connected: threading.Event, peers: list) -> None:
    """Exit the process if the cluster has not formed in time: a missing peer must not hang us."""
    if not connected.wait(seconds):
        emit("error", reason="connect-timeout",
             message=f"the cluster did not form within {seconds:.0f} s: "
                     f"some of {peers} never answered")
        os._exit(EXIT_CONNECT_TIMEOUT)  # the strategy's wait is in C++ and cannot be interrupted


def run(args, config: dict) -> dict:
    """Join the cluster, predict this worker's shard, write it (`config`: read_tf_config()'s)."""
    index, workers = config["index"], config["workers"]
    emit("started", worker=index, pid=os.getpid(), address=workers[index])
    inject_fault(args.fault)
    tf, strategy = join_cluster(args, workers)
    emit("connected", worker=index, num_workers=len(workers),
         replicas=strategy.num_replicas_in_sync)
    images = np.asarray(getattr(load_mnist(), f"x_{args.split}"))
    if args.limit:
        images = images[:args.limit]
    total = len(images) * args.repeat
    import tf_keras as keras  # not at the top: see join_cluster
    with strategy.scope():
        model = keras.models.load_model(args.model, compile=False)
        images_const = tf.constant(images)
    dataset = shard_dataset(tf, strategy, images_const, total, args)
    indices, logits, timings = predict_passes(tf, strategy, model, dataset, args.passes)
    # A collective over all workers: the images predicted in total (every worker must agree).
    predicted_total = strategy.reduce("SUM", strategy.run(lambda: tf.constant(float(len(indices)))),
                                      axis=None)
    report = {"worker": index, "num_workers": len(workers), "address": workers[index],
              "images": int(len(indices)), "predicted_total": int(predicted_total.numpy()),
              "expected_total": int(total), **timings, "threads": args.threads,
              "lockstep": args.lockstep, "batch_size": args.batch_size,
              "tensorflow": tf.__version__}
    if report["predicted_total"] != total:
        emit("error", reason="count", message=f"the workers predicted {report['predicted_total']} "
             f"images in total, expected {total}")
        sys.exit(EXIT_COUNT_MISMATCH)
    write(Path(args.out), index, indices, logits, report)
    emit("done", **report)
    return report


def inject_fault(fault: str) -> None:
    """--fault: exit at once, or stay alive and never join (a machine that never comes up)."""
    if fault == "exit-early":
        emit("error", reason="fault", message="asked to exit early (--fault exit-early)")
        sys.exit(EXIT_FAULT)
    if fault == "never-connect":
        time.sleep(10 ** 6)


def join_cluster(args, workers: list):
    """Configure TensorFlow's runtime, then join the cluster: (tf, strategy).

    TensorFlow is imported here, not at the top: threads and collectives must be set before it
    starts its runtime, so no op may run before the strategy exists; labkit.setup() (which runs
    one) comes right after it.
    """
    with labkit.quiet_stderr():
        import tensorflow as tf  # not at the top: see above
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    tf.get_logger().setLevel("ERROR")
    connected = threading.Event()
    threading.Thread(target=_watchdog, args=(args.connect_timeout_s, connected, workers),
                     daemon=True).start()
    with labkit.quiet_stderr():  # gRPC server start-up lines
        strategy = tf.distribute.MultiWorkerMirroredStrategy()  # blocks until every peer answers
    connected.set()
    labkit.setup(seed=0)  # seeds, op determinism, quiet logs: the runtime is configured by now
    return tf, strategy


def shard_dataset(tf, strategy, images_const, total: int, args):
    """This worker's shard of the `total` images, as the strategy's distributed dataset."""
    def dataset_fn(context: tf.distribute.InputContext):
        # Shard the *indices*, then look the images up: each worker reads only its own images,
        # and every prediction keeps the global index it belongs to.
        ds = tf.data.Dataset.range(total)
        ds = ds.shard(context.num_input_pipelines, context.input_pipeline_id)
        ds = ds.batch(context.get_per_replica_batch_size(args.batch_size
                                                         * context.num_input_pipelines))
        n = int(images_const.shape[0])
        ds = ds.map(lambda idx: (idx, tf.gather(images_const, idx % n))).prefetch(2)
        one_core = tf.data.Options()  # tf.data has its own thread pool: keep it to our share
        one_core.threading.private_threadpool_size = args.threads
        one_core.threading.max_intra_op_parallelism = 1
        return ds.with_options(one_core)

    # By default each next(iterator) is itself a collective: the workers agree on whether anyone
    # still has data, so a training step's all-reduce never waits for a worker that ran out.
    # Inference has no collective in its step, so each worker can simply run until its own
    # shard ends, without meeting the others at every batch.
    strategy.extended.experimental_enable_get_next_as_optional = args.lockstep
    options = tf.distribute.InputOptions(experimental_fetch_to_device=False)
    return strategy.distribute_datasets_from_function(dataset_fn, options)


def predict_passes(tf, strategy, model, dataset, passes: int):
    """Predict the shard `passes` times, each pass timed from a barrier: (indices, logits, timings).

    A second pass costs seconds; a second launch (importing TensorFlow, joining the cluster,
    loading the model) costs more. The indices and logits are the last pass's.
    """
    @tf.function
    def predict_step(batch):
        idx, x = batch
        return idx, strategy.run(lambda x: model(x, training=False), args=(x,))

    for first in dataset:  # warm up (traces the step) on this worker's first batch
        predict_step(first)
        break
    pass_seconds, pass_cpu_seconds = [], []
    for _ in range(passes):
        strategy.reduce("SUM", strategy.run(lambda: tf.ones([])), axis=None)  # a barrier
        start, cpu_start = time.perf_counter(), time.process_time()
        indices, logits = [], []
        for batch in dataset:
            idx, out = predict_step(batch)
            for i, y in zip(strategy.experimental_local_results(idx),
                            strategy.experimental_local_results(out)):
                indices.append(i.numpy())
                logits.append(y.numpy())
        pass_seconds.append(time.perf_counter() - start)
        pass_cpu_seconds.append(time.process_time() - cpu_start)
    indices = np.concatenate(indices) if indices else np.zeros(0, np.int64)
    logits = np.concatenate(logits) if logits else np.zeros((0, 10), np.float32)
    return indices, logits, {"pass_seconds": pass_seconds, "pass_cpu_seconds": pass_cpu_seconds}


def write(out: Path, index: int, indices, logits, report: dict) -> None:
    """<out>/predictions-worker<i>.npz (logits with their image indices), then worker<i>.json."""
    files.write_atomic(out / f"predictions-worker{index}.npz",
                       lambda tmp: np.savez(tmp, index=indices, logits=logits))
    files.write_json(out / f"worker{index}.json", report)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Data-parallel batch inference worker (reads TF_CONFIG).")
    parser.add_argument("--model", required=True,
                        help="a .keras model file present on every machine")
    parser.add_argument("--out", default=str(ARTIFACTS_DIR / "distributed" / "run"),
                        help="where predictions-worker<i>.npz and worker<i>.json go "
                             "(shared or per machine)")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--limit", type=int, default=0,
                        help="use only the first LIMIT images (0: all)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="predict the images REPEAT times (a longer job)")
    parser.add_argument("--batch-size", type=int, default=256,
                        help="images per batch on each worker")
    parser.add_argument("--passes", type=int, default=1,
                        help="timed passes over the shard (the launcher keeps the fastest)")
    parser.add_argument("--threads", type=int, default=1,
                        help="TensorFlow intra- and inter-op threads")
    parser.add_argument("--connect-timeout-s", type=float, default=60.0,
                        help="give up if the cluster has not formed after this many seconds")
    parser.add_argument("--lockstep", action="store_true",
                        help="keep TensorFlow's default of one collective per batch "
                             "(the slow way, for comparison)")
    parser.add_argument("--fault", default="none", choices=FAULTS,
                        help="inject a failure (to see the launcher's errors on purpose)")
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
