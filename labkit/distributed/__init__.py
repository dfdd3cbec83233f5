"""Distributed inference on TensorFlow's own runtime, and batch inference with Ray.

    worker.py       one data-parallel worker, `python -m labkit.distributed.worker` (TF_CONFIG)
    cluster.py      N local workers on 127.0.0.1: launch, watch, gather and check predictions
    dtensor.py      model and hybrid parallelism with DTensor on logical CPUs (fresh process)
    ray_serving.py  Ray Data batch inference of the int8 .tflite with a pool of LiteRT actors
    __main__.py     `python -m labkit.distributed`: the scaling benchmark (1 vs 2 workers, threads)
Nothing here imports TensorFlow at import time: a worker configures its runtime first.
"""
