"""A smoke check for a learner's machine: `python -m labkit.doctor` (about 20 seconds).

One line per check, "ok", "warn" or "FAIL", and the fix when something is wrong. Run it the day
before a workshop; the instructor reads the FAIL lines. Exits 1 if any check fails.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import psutil

from labkit import ARTIFACTS_DIR, ROOT, GiB, data
from labkit.machine import cpu_model, usable_cores

SUPPORTED_PYTHON = ((3, 11), (3, 13))   # oldest and newest supported minor versions
PACKAGES = ("tensorflow", "tf-keras", "tensorflow-model-optimization", "ai-edge-litert",
            "ai-edge-quantizer", "ray", "optuna", "jupyterlab", "ipywidgets", "onnxruntime")
MEMORY_GIB = 8       # the book trains and serves in one kernel at a time: 8 GiB is enough
DISK_GIB = 2         # artifacts/ and build/ grow to about 1 GiB over the whole book
REINSTALL = 'reinstall: pip install -e ".[dev]" (README, set-up)'


def line(status: str, what: str, detail: str, fix: str = "") -> dict:
    return {"status": status, "check": what, "detail": detail, "fix": fix}


def check_python() -> dict:
    version = sys.version_info[:2]
    detail = f"Python {platform.python_version()} ({sys.executable})"
    low, high = SUPPORTED_PYTHON
    if low <= version <= high:
        return line("ok", "python", detail)
    return line("FAIL", "python", detail,
                f"use Python {low[0]}.{low[1]} to {high[0]}.{high[1]}: install one (python.org, "
                "your package manager, or pyenv) and create the virtual environment with it")


def check_packages() -> list[dict]:
    rows = []
    for name in PACKAGES:
        try:
            rows.append(line("ok", name, importlib.metadata.version(name)))
        except importlib.metadata.PackageNotFoundError:
            optional = name == "onnxruntime"
            rows.append(line("warn" if optional else "FAIL", name, "not installed",
                             "05_graph.ipynb skips ONNX Runtime without it; " + REINSTALL
                             if optional else REINSTALL))
    return rows


def check_resources() -> list[dict]:
    rows = []
    memory = psutil.virtual_memory()
    detail = f"{memory.available / GiB:.1f} GiB free of {memory.total / GiB:.1f} GiB"
    rows.append(line("ok" if memory.total >= MEMORY_GIB * GiB * 0.9 else "warn", "memory", detail,
                     "" if memory.total >= MEMORY_GIB * GiB * 0.9 else
                     "below 8 GiB: close the browser tabs and programs you do not need, run one "
                     "notebook at a time (Kernel > Shut Down All Kernels), and skip the Ray "
                     "cluster of 06_distributed.ipynb"))
    free = shutil.disk_usage(ROOT).free
    enough = free >= DISK_GIB * GiB
    rows.append(line("ok" if enough else "FAIL", "disk", f"{free / GiB:.1f} GiB free in {ROOT}",
                     "" if enough else f"free at least {DISK_GIB} GiB on this disk"))
    cores = usable_cores()
    rows.append(line("ok" if cores >= 2 else "warn", "cpu",
                     f"{cpu_model()}, {cores} usable core(s)", "" if cores >= 2 else
                     "one core: the two-thread and multi-worker cells show no speed-up"))
    return rows


def check_data() -> dict:
    try:
        data.read_mnist_arrays()
    except Exception as error:   # missing, corrupt or wrong shapes: DataError says how to restore
        return line("FAIL", "data", str(error)[:200], "restore it: git checkout -- data/mnist.npz")
    return line("ok", "data", f"{data.MNIST_PATH.name}: sha256 and shapes as expected")


def run_probe(code: str, timeout_s: int = 120) -> tuple[bool, str]:
    """Run `code` in a fresh Python; (worked, last line of its output)."""
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=timeout_s, cwd=str(ROOT))
    except subprocess.TimeoutExpired:
        return False, f"no answer within {timeout_s} s"
    text = (done.stdout.strip() or done.stderr.strip() or "(no output)").splitlines()[-1]
    return done.returncode == 0, text[:200]


TENSORFLOW_PROBE = ("import labkit; labkit.setup(seed=0); import numpy as np\n"
                    "from labkit import models\n"
                    "m = models.build_cnn((4, 8), 16)\n"
                    "print('tf_keras', m(np.zeros((1, 28, 28, 1), 'float32')).shape)")
LITERT_PROBE = ("import labkit, tempfile, pathlib, numpy as np; labkit.setup(seed=0)\n"
                "from labkit import models, measure\n"
                "p = pathlib.Path(tempfile.mkdtemp()) / 'm.tflite'\n"
                "models.save_tflite(models.build_cnn((4, 8), 16), p)\n"
                "r = measure.litert(p)\n"
                "print('LiteRT', r(np.zeros((1, 28, 28, 1), 'float32')).shape)")
RAY_PROBE = ("import ray\n"
             "ray.init(address='local', num_cpus=1, include_dashboard=False, log_to_driver=False,"
             " _node_ip_address='127.0.0.1')\n"
             "print('ray', ray.get(ray.put(41)) + 1); ray.shutdown()")
ONNX_PROBE = "import onnxruntime; print('onnxruntime', onnxruntime.get_device())"


def check_runtimes() -> list[dict]:
    rows = []
    for what, code, fix, optional in (
            ("tensorflow", TENSORFLOW_PROBE, REINSTALL, False),
            ("litert", LITERT_PROBE, REINSTALL, False),
            ("ray", RAY_PROBE, "06_distributed.ipynb and 09_serving.ipynb need Ray: README, "
             "Troubleshooting ('Ray cannot start')", True),
            ("onnxruntime", ONNX_PROBE, "05_graph.ipynb skips ONNX Runtime without it", True)):
        worked, text = run_probe(code)
        rows.append(line("ok" if worked else ("warn" if optional else "FAIL"), f"{what} runs", text,
                         "" if worked else fix))
    return rows


def check_chromium() -> dict:
    found = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser")
                  if Path(p).is_file()), None)
    if found:
        return line("ok", "chromium", found)
    return line("warn", "chromium", "not found (only the browser test needs it)",
                "Debian/Ubuntu: sudo apt-get install chromium; the test skips without it")


def check_artifacts() -> dict:
    trained = sorted(ARTIFACTS_DIR.glob("baseline-*.keras"))
    manifest = ARTIFACTS_DIR / "kit-manifest.json"
    if manifest.is_file():
        return line("ok", "models", f"the instructor's bundle is unpacked in "
                    f"{ARTIFACTS_DIR.name}/ ({manifest.name})")
    if trained:
        return line("ok", "models",
                    f"trained models in {ARTIFACTS_DIR.name}/ (baseline {trained[0].stem})")
    return line("warn", "models", f"{ARTIFACTS_DIR.name}/ holds no trained model yet",
                "the notebooks will train (about 15 minutes in all on 2 cores); in a workshop, "
                "unpack the instructor's bundle: python -m labkit.kit unpack <bundle>")


def checks(probes: bool = True) -> list[dict]:
    rows = [check_python(), *check_packages(), *check_resources(), check_data()]
    if probes:
        rows += check_runtimes()
    return rows + [check_chromium(), check_artifacts()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labkit.doctor",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="skip the probes that start TensorFlow, LiteRT and Ray")
    args = parser.parse_args(argv)
    rows = checks(probes=not args.quick)
    width = max(len(r["check"]) for r in rows)
    for row in rows:
        print(f"{row['status']:<4}  {row['check']:<{width}}  {row['detail']}"
              + (f"\n      fix: {row['fix']}" if row["fix"] else ""))
    failed = [r["check"] for r in rows if r["status"] == "FAIL"]
    print(f"\n{len(rows)} checks: {len(failed)} failed"
          + (f" ({', '.join(failed)})" if failed else ", ready for the book"))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
