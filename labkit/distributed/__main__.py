"""The data-parallel scaling benchmark: `python -m labkit.distributed [--repeat 8 --rounds 3]`.

Prints throughput of the same batch-inference job (the test set, repeated) on 1 and 2 local
workers with one thread each, and on one worker with two TensorFlow threads, and checks the
target: 2 one-thread workers reach >= 1.6x of 1 worker (06_distributed.ipynb runs a shorter job
and points here for the full one).
"""
import argparse
import os
import sys

import pandas as pd

import labkit
from labkit import machine
from labkit.distributed import cluster

TARGET_SPEEDUP = 1.6


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=8,
                        help="test-set copies per job (8: 80k images)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds; each configuration's best counts")
    parser.add_argument("--passes", type=int, default=2,
                        help="timed passes per launch; the fastest counts")
    parser.add_argument("--batch-size", type=int, default=256)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    labkit.setup(seed=0)  # the launcher may train the baseline; the workers call setup themselves
    model = cluster.baseline_model_path()
    load_before = os.getloadavg()
    job = cluster.Launch(repeat=args.repeat, passes=args.passes, batch_size=args.batch_size)
    table, runs = cluster.scaling(model, job, rounds=args.rounds)
    load_after = os.getloadavg()
    print(f"machine: {machine.machine_string()}")
    print(f"load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f} "
          f"on {os.cpu_count()} cores; cpu_share = CPU seconds the workers got / "
          "(seconds x workers x threads)")
    print(f"job: {table['images'].iloc[0]} images (test set x {args.repeat}), batch "
          f"{args.batch_size}, {args.rounds} interleaved rounds of {args.passes} timed passes each")
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(pd.DataFrame(runs)[["round", "configuration", "seconds", "throughput_ips",
                                  "cpu_share", "images_per_cpu_second", "load_before"]]
              .round(3).to_string(index=False))
        print(table.round(3).to_string())
    report(table)
    return 0


def report(table: pd.DataFrame) -> None:
    """The target's verdict, threads against workers, and a warning if the cores were busy."""
    one, two = (cluster.configuration_name(*c) for c in (cluster.ONE_WORKER, cluster.TWO_WORKERS))
    threads = cluster.configuration_name(*cluster.ONE_PROCESS_TWO_THREADS)
    speedup = float(table.loc[two, "speedup"])
    verdict = "met" if speedup >= TARGET_SPEEDUP else f"MISSED by {TARGET_SPEEDUP - speedup:.2f}x"
    print(f"target: 2 workers >= {TARGET_SPEEDUP}x the throughput of 1 worker: measured "
          f"{speedup:.2f}x (efficiency {speedup / 2:.0%}) -> {verdict}")
    over_threads = float(table.loc[two, "throughput_ips"] / table.loc[threads, "throughput_ips"])
    print(f"one process with 2 threads: {float(table.loc[threads, 'speedup']):.2f}x one worker; "
          f"2 workers reach {over_threads:.2f}x its throughput")
    one_thread_share = float(table.loc[[one, two], "cpu_share"].min())
    if one_thread_share < 0.8:
        per_cpu = table.loc[two, "images_per_cpu_second"] / table.loc[one, "images_per_cpu_second"]
        print(f"warning: the one-thread workers got only {one_thread_share:.0%} of their cores "
              "(other programs were running): the wall-clock speedup is not reliable; rerun on a "
              f"quiet machine. Work per CPU second, 2 workers vs 1: {per_cpu:.2f}")


if __name__ == "__main__":
    sys.exit(main())
