"""labkit: the helper package of the inference-optimization lab book.

Every notebook starts with ``labkit.setup(seed=0)``. Importing labkit sets the
two TensorFlow switches that must be set before TensorFlow is first imported:
legacy Keras (tfmot does not support Keras 3) and quiet C++ logs. It imports no TensorFlow
itself, and hands on `claim`, `knobs` and `ClaimError` from labkit.claims.
"""
import os
import sys
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

from tqdm.auto import tqdm

# every notebook states its claims with these (claims imports nothing of labkit)
from labkit.claims import ClaimError, claim, knobs

__all__ = ["ClaimError", "claim", "knobs", "setup", "import_tensorflow_quietly", "progress_bar",
           "quiet_stderr", "redirect_stderr", "filter_native_stderr", "ROOT", "DATA_DIR",
           "ARTIFACTS_DIR", "RESULTS_DIR", "NOTEBOOKS_DIR", "KiB", "MiB", "GiB"]

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")   # tf.keras -> tf_keras, as tfmot needs
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep red C++ log blocks out of notebooks

__version__ = "0.1.0"

ROOT = Path(os.environ.get("LABKIT_ROOT", Path(__file__).resolve().parent.parent))
DATA_DIR = ROOT / "data"
ARTIFACTS_DIR = ROOT / "artifacts"   # trained and exported models, git-ignored
RESULTS_DIR = ROOT / "results"       # measurements.csv, git-ignored
NOTEBOOKS_DIR = ROOT / "notebooks"

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


@contextmanager
def redirect_stderr(target):
    """Send the process's stderr (file descriptor 2) to an open file `target` for the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(target.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


@contextmanager
def quiet_stderr():
    """Silence the process's stderr (file descriptor 2) for the block.

    TensorFlow 2.21 and LiteRT print C++ start-up lines (oneDNN, CUDA probes, "Created
    XNNPACK delegate") before any log level is read, so TF_CPP_MIN_LOG_LEVEL cannot hide them.
    """
    with open(os.devnull, "w") as devnull, redirect_stderr(devnull):
        yield


# C++ lines that TensorFlow and LiteRT print straight to file descriptor 2 and that say nothing
# a learner can act on; they would show up as red blocks in every notebook.
NATIVE_NOISE = (b"use_unbounded_threadpool", b"XNNPACK delegate for CPU", b"absl::InitializeLog",
                b"cudart_stub", b"cuInit", b"oneDNN custom operations", b"Could not find cuda",
                b"oneDNN supports DT_INT64 only on platforms with AVX-512")
_stderr_filter_on = False


def filter_native_stderr() -> None:
    """In a Jupyter kernel, drop NATIVE_NOISE lines from fd 2 and pass every other line through.

    Only in a kernel: there Python's own errors reach the notebook by messages, not fd 2, so
    nothing else is lost; in a terminal a pumping thread could drop a traceback at exit.
    """
    global _stderr_filter_on
    if _stderr_filter_on or "ipykernel" not in sys.modules:
        return
    read_end, write_end = os.pipe()
    forward_to = os.dup(2)
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump():
        pending = b""
        while chunk := os.read(read_end, 65536):
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                if not any(noise in line for noise in NATIVE_NOISE):
                    os.write(forward_to, line + b"\n")

    threading.Thread(target=pump, name="labkit-stderr-filter", daemon=True).start()
    _stderr_filter_on = True


PROGRESS_REDRAWS = 50   # per bar, however many steps it counts


def progress_bar(iterable=None, *, total=None, **options):
    """A tqdm bar (a widget in Jupyter) that redraws at most about PROGRESS_REDRAWS times.

    Each redraw in a notebook is a few kernel messages. nbval reads none of them until the cell
    ends, and ZeroMQ drops what overflows its buffers (some 7,000 messages), the cell's result
    with it: an unthrottled bar over a long training fails the test run.
    """
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if total:
        options.setdefault("miniters", max(1, -(-total // PROGRESS_REDRAWS)))
    options.setdefault("mininterval", 0.5)
    return tqdm(iterable, total=total, **options)


def import_tensorflow_quietly(start_runtime: bool = True):
    """Import TensorFlow without its C++ start-up noise; with start_runtime, start its CPU device.

    Modules import it with start_runtime=False: importing a labkit module never starts
    TensorFlow's runtime (the distributed workers configure it first); setup() starts it.
    """
    with quiet_stderr():
        import tensorflow as tf  # here: importing labkit loads no TensorFlow
        if start_runtime:
            tf.config.list_physical_devices()
            (tf.constant(1.0) + 1.0).numpy()
    return tf



def setup(seed: int = 0, quiet: bool = True) -> dict:
    """Set seeds, op determinism and quiet logs; return the versions in use (every notebook)."""
    if quiet:
        filter_native_stderr()
    tf = import_tensorflow_quietly() if quiet else __import__("tensorflow")
    # these come with TensorFlow, which importing labkit does not load
    import absl.logging
    import tf_keras
    if not tf.keras.__name__.startswith("tf_keras"):
        raise RuntimeError(
            f"tf.keras is {tf.keras.__name__} (Keras 3), but tfmot needs legacy Keras 2 "
            "(tf_keras). TensorFlow was imported before labkit: restart the kernel and call "
            "labkit.setup() before importing TensorFlow, or set TF_USE_LEGACY_KERAS=1 in the "
            "environment.")

    if quiet:
        tf.get_logger().setLevel("ERROR")
        absl.logging.set_verbosity(absl.logging.ERROR)
        warnings.filterwarnings("ignore", module="tensorflow_model_optimization")
    # Same seed, same weights, same numbers: Python, NumPy and TensorFlow seeds in one call.
    tf_keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    # imported here, when first needed; machine.py imports nothing of labkit, so this is no circle
    from labkit.machine import machine_info
    return machine_info()
