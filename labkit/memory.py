"""Memory: how much a process holds while a model runs (the baseline chapter measures it).

Two probes. `peak_rss_during` samples this process's resident set while a function runs: in a
notebook that includes TensorFlow's own hundreds of MiB. `litert_process_memory` starts a fresh
process with only NumPy, LiteRT and one model: what a deployment without TensorFlow pays.
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import psutil


def _rss() -> int:
    return psutil.Process().memory_info().rss


def peak_rss_during(fn: Callable, *args, interval_s: float = 0.0005, **kwargs) -> dict:
    """Run fn while a thread samples the process's resident set; return the peak and the growth.

    Sampling every 0.5 ms can miss a spike shorter than that, so the peak is a lower bound.
    """
    before = _rss()
    peak = [before]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(interval_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn(*args, **kwargs)
    finally:
        done.set()
        thread.join()
    peak[0] = max(peak[0], _rss())
    return {"rss_before_bytes": before, "rss_peak_bytes": peak[0],
            "rss_growth_bytes": peak[0] - before}


_LITERT_MEMORY_PROBE = r"""
import json, resource, sys
import numpy as np, psutil
rss = lambda: psutil.Process().memory_info().rss
from ai_edge_litert.interpreter import Interpreter
out = {"rss_runtime_bytes": rss()}
interpreter = Interpreter(model_path=sys.argv[1], num_threads=int(sys.argv[2]))
interpreter.allocate_tensors()
out["rss_after_allocate_bytes"] = rss()
detail = interpreter.get_input_details()[0]
interpreter.set_tensor(detail["index"], np.zeros(detail["shape"], detail["dtype"]))
for _ in range(10):
    interpreter.invoke()
out["rss_after_inference_bytes"] = rss()
out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(out))
"""


def litert_process_memory(path, num_threads: int = 1) -> dict:
    """Resident memory of a fresh process that holds only numpy, LiteRT and this model.

    This is what a deployment without TensorFlow pays: measured in a subprocess, since in a
    notebook TensorFlow's own hundreds of MiB and the allocator's reuse hide the model's share.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No .tflite model at {path}")
    done = subprocess.run([sys.executable, "-c", _LITERT_MEMORY_PROBE, str(path), str(num_threads)],
                          capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"memory probe failed for {path}: {done.stderr.strip()[-500:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["model_and_arena_bytes"] = out["rss_after_inference_bytes"] - out["rss_runtime_bytes"]
    return out
