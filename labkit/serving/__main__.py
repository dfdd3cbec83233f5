"""`python -m labkit.serving`: serve a book model over HTTP on 127.0.0.1 with Ray Serve.

    python -m labkit.serving                         # the int8 .tflite on http://127.0.0.1:8000
    python -m labkit.serving --model artifacts/baseline-<key>_savedmodel --replicas 2 --no-batching
    python -m labkit.serving --address 127.0.0.1:6379   # on a running Ray cluster (its head)
It calls labkit.setup() first (the default model may need the baseline), prints one JSON line
when the server answers, serves until Ctrl-C or SIGTERM, then stops Serve and Ray and checks
that none of their processes is left.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading

import labkit
from labkit.distributed.ray_serving import RayUnavailable
from labkit.serving import MAX_BODY_BYTES, MAX_IMAGES, study


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m labkit.serving",
        description=f"Serve a .tflite or SavedModel of the book on 127.0.0.1 with Ray Serve. "
                    f"POST /predict with {{\"images\": [...]}} (at most {MAX_IMAGES} 28x28 "
                    f"images, pixels in [0, 1], a body of at most {MAX_BODY_BYTES} bytes); "
                    "GET /health.")
    parser.add_argument("--model", default=None,
                        help="a .tflite file or a SavedModel directory (default: the int8 model "
                             "that quantization.export caches as ptq-int8)")
    parser.add_argument("--port", type=int, default=8000,
                        help="HTTP port on 127.0.0.1 (default 8000)")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--no-batching", dest="batching", action="store_false",
                        help="one model call per request")
    parser.add_argument("--max-batch-size", type=int, default=16,
                        help="requests per model call (default 16)")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0,
                        help="how long a batch waits for more requests (default 5 ms)")
    parser.add_argument("--max-ongoing-requests", type=int, default=32,
                        help="requests one replica holds at once")
    parser.add_argument("--max-queued-requests", type=int, default=-1,
                        help="requests waiting beyond those; the excess gets 503 "
                             "(default -1: no limit)")
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS") or None,
                        help="a running Ray cluster's address, e.g. head-node:6379 "
                             "(default: $RAY_ADDRESS, else a local Ray on 127.0.0.1)")
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="logical CPUs of the local Ray (default: replicas)")
    args = parser.parse_args(argv)
    if args.replicas < 1 or not 0 < args.port < 65536:
        parser.error(f"--replicas must be >= 1 and --port in 1-65535, "
                     f"got {args.replicas} and {args.port}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.address and args.address.split(":")[0] not in ("127.0.0.1", "localhost"):
        # Another machine's cluster: Ray (not imported yet) must advertise this machine's address.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1"
    labkit.setup(seed=0)
    # Not at the top: it imports Ray, which reads the switch above once, at import.
    from labkit.serving.server import Server
    model = args.model or study.book_models()["int8"]
    server = Server(model, port=args.port, address=args.address,
                    num_cpus=args.num_cpus or max(2, args.replicas), batching=args.batching,
                    max_batch_size=args.max_batch_size,
                    batch_wait_timeout_s=args.batch_wait_ms / 1e3, replicas=args.replicas,
                    max_ongoing_requests=args.max_ongoing_requests,
                    max_queued_requests=args.max_queued_requests)
    try:
        server.start()
    except (RayUnavailable, ValueError, FileNotFoundError) as error:
        print(json.dumps({"event": "error", "message": str(error)}), flush=True)
        server.stop()
        return 3
    serve_until_stopped(server, model)
    return 0


def serve_until_stopped(server, model) -> None:
    """Print the ready line, wait for SIGINT or SIGTERM, then stop and print what was left."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):   # after ray.init, which installs its own SIGTERM
        signal.signal(sig, lambda *_: stop.set())
    try:
        print(json.dumps({"event": "ready", "url": server.url, "pid": os.getpid(),
                          **server.deployed}), flush=True)
        print(f"serving {model} on {server.url} (POST /predict, GET /health); Ctrl-C stops it",
              file=sys.stderr, flush=True)
        stop.wait()
    finally:
        killed = server.stop()
        print(json.dumps({"event": "stopped", "killed_stragglers": killed}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
