"""Serving the book's models under load with Ray Serve (notebook 09).

    app.py      the endpoint: request checks (4xx for every client mistake), the replica, serve.batch
    server.py   Ray and Serve on 127.0.0.1: start, redeploy, kill a replica, stop with no process left;
                a two-node cluster on one machine
    load.py     the load generator: open-loop (Poisson) and closed-loop, latency percentiles, outcomes
    study.py    notebook 09's measurements: where a request's time goes, load sweeps, the SLO, the store
    __main__.py python -m labkit.serving

Importing the package sets, before Ray is imported, the switch that makes a local Ray bind and
advertise 127.0.0.1 instead of the machine's address (Ray reads it once, at import). To join a
cluster on other machines, set Ray's own RAY_ADDRESS (or pass --address to python -m labkit.serving),
and Ray advertises the machine's address as usual.
"""
import os

MAX_IMAGES = 64                        # images in one request
MAX_BODY_BYTES = 1024 * 1024           # one request's body (1 MiB); 64 images as JSON floats take about 0.6 MiB

if not os.environ.get("RAY_ADDRESS"):
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
