"""Distributed inference on TensorFlow's own runtime, and serving the int8 model with Ray (notebook 06).

    worker.py       one data-parallel worker: `python -m labkit.distributed.worker`, reads TF_CONFIG
    cluster.py      starts N local workers on 127.0.0.1, watches them, gathers and checks predictions
    dtensor.py      model and hybrid parallelism with DTensor on logical CPU devices (fresh process)
    ray_serving.py  Ray Data batch inference of the int8 .tflite with a pool of LiteRT actors
    __main__.py     `python -m labkit.distributed`: the scaling benchmark (1 vs 2 workers, 1 vs 2 threads)

Nothing here imports TensorFlow at import time: a worker must configure TensorFlow's runtime
(threads, collectives, logical devices) before anything starts it.
"""
