"""Serving the book's models under load with Ray Serve, on 127.0.0.1.

    app.py      the endpoint: request checks (a 4xx for every client mistake), the replica, batching
    server.py   Ray and Serve: start, redeploy, kill a replica, stop with no process left; two nodes
    load.py     the load generator: open loop (Poisson) and closed loop, percentiles, outcomes
    study.py    the measurements: one request's time, load sweeps, the SLO, failures, the store
Importing the package sets, before Ray loads, the switch that makes a local Ray bind 127.0.0.1
(Ray reads it once); with RAY_ADDRESS set (or --address), Ray joins that cluster as usual.
"""
import os

MAX_IMAGES = 64                  # images in one request
MAX_BODY_BYTES = 1024 * 1024     # one request's body (1 MiB); 64 images as JSON take about 0.6 MiB

if not os.environ.get("RAY_ADDRESS"):
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
