"""The book as a whole: clean notebooks, the headless runner and the benchmark command."""
import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest

import labkit
from labkit import NOTEBOOKS_DIR, ROOT, bench, book, models, results


def test_notebooks_are_committed_without_outputs():
    paths = book.notebooks()
    assert paths, "no notebooks found"
    for path in paths:
        nb = json.loads(path.read_text())
        for cell in nb["cells"]:
            if cell["cell_type"] == "code":
                assert not cell["outputs"], f"{path.name} has stored outputs: strip them"
                assert cell["execution_count"] is None, f"{path.name} has execution counts"


def test_every_notebook_starts_with_setup():
    for path in book.notebooks():
        nb = nbformat.read(path, as_version=4)
        first_code = next(c for c in nb.cells if c.cell_type == "code")
        assert "labkit.setup(seed=0)" in first_code.source, \
            f"{path.name} must call labkit.setup first"


def test_book_runs_notebooks_in_order_and_reports_failures(tmp_path, monkeypatch, results_path):
    for name, source in (("00_ok.ipynb", "x = 1 + 1\nassert x == 2"),
                         ("01_bad.ipynb", "assert False, 'boom'")):
        cells = [nbformat.v4.new_markdown_cell("Intro\n\n## 1 · The first section"),
                 nbformat.v4.new_code_cell(source),
                 nbformat.v4.new_code_cell("import time; time.sleep(0.3)")]
        nbformat.write(nbformat.v4.new_notebook(cells=cells), tmp_path / name)
    monkeypatch.setattr(book, "NOTEBOOKS_DIR", tmp_path)
    monkeypatch.setattr(book, "notebooks",
                        lambda directory=tmp_path: sorted(tmp_path.glob("[0-9][0-9]_*.ipynb")))
    results.upsert([results.make_row("only-in-the-temp-store", "baseline", "test", accuracy=0.5)])
    from labkit.serving import study
    serving = tmp_path / "serving.csv"   # two load runs of one setting, as notebook 09 writes them
    pd.DataFrame({"setting": ["int8-batch-off-1rep"] * 2, "offered_rps": [25, 75],
                  "sent": [50, 150],
                  "ok": [50, 150], "p50_ms": [8.0, 12.0], "p95_ms": [15.0, 40.0],
                  "p99_ms": [20.0, 150.0],
                  "throughput_rps": [25.0, 70.0]}).to_csv(serving, index=False)
    monkeypatch.setattr(study, "SERVING_TABLE", serving)
    out = tmp_path / "out"
    assert book.main(["--out", str(out)]) == 1
    assert (out / "00_ok.ipynb").is_file() and (out / "01_bad.ipynb").is_file()
    report = (out / "report.md").read_text()
    assert "00_ok.ipynb | True" in report and "01_bad.ipynb | False" in report
    # the report read the throw-away store, not the real one
    assert "only-in-the-temp-store" in report
    times = pd.read_csv(out / "section_times.csv")   # per-section timings, for WORKSHOP.md
    first = times[(times["notebook"] == "00_ok.ipynb")
                  & (times["section"] == "1 · The first section")]
    assert len(first) == 1 and 0.3 <= first["seconds"].iloc[0] < 30, times
    assert "Time per section" in report
    assert "Serving under load" in report and "int8-batch-off-1rep" in report
    assert (out / "serving.png").is_file()
    assert book.main(["--out", str(out), "00_ok"]) == 0


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model):
    """The tiny model as the four formats bench meets: .tflite, .keras, a SavedModel and an .onnx
    name."""
    import tensorflow as tf
    directory = tmp_path_factory.mktemp("bench")
    models.save_tflite(tiny_model, directory / "tiny.tflite")
    tiny_model.save(directory / "tiny.keras")
    tf.saved_model.save(tiny_model, str(directory / "tiny_savedmodel"))
    (directory / "tiny.onnx").write_bytes(b"not run by bench")
    return directory


def test_runner_for_picks_the_runner_by_format_and_each_computes_the_model(exported,
                                                                           tiny_model, images):
    reference = tiny_model(images, training=False).numpy()
    expected = {"tiny.tflite": "LiteRT XNNPACK 2 thread(s)", "tiny.keras": "tf.function",
                "tiny_savedmodel": "SavedModel"}
    for name, runner_name in expected.items():
        runner = bench.runner_for(exported / name, threads=2)
        assert runner.name == runner_name and runner.timed, name
        np.testing.assert_allclose(runner(images), reference, atol=1e-4, err_msg=name)
    assert bench.runner_for(exported / "tiny.onnx") is None


def test_bench_times_each_artifact_once_and_says_how(exported, splits, monkeypatch):
    """Rows sharing an artifact become one row that lists them all and names the runner it timed:
    a .keras file recorded as "keras predict" is timed as a tf.function, and its row says so."""
    monkeypatch.setattr(bench, "ROOT", exported)
    rows = [(results.BASELINE_VARIANT, "baseline", "tiny.tflite"),
            ("baseline-keras-predict", "baseline", "tiny.keras"),
            ("runtime-litert-again", "runtime", "tiny.tflite"),
            ("baseline-tf-function", "baseline", "tiny.keras"),
            ("gone", "pruning", "missing.tflite"), ("runtime-onnx", "runtime", "tiny.onnx"),
            ("no-file", "distributed", "")]
    table = pd.DataFrame([{"variant": v, "technique": t, "artifact": a, "size_bytes": 100,
                           "gzip_bytes": 80}
                          for v, t, a in rows])
    out, missing = bench.benchmark(table, repeats=5, warmup=1, x=splits.x_test[:64],
                                   y=splits.y_test[:64])
    assert list(out.index) == ["tiny.tflite", "tiny.keras"]
    assert out.loc["tiny.tflite", "variants"] == f"{results.BASELINE_VARIANT}, runtime-litert-again"
    assert out.loc["tiny.tflite", "technique"] == "baseline, runtime"
    assert out.loc["tiny.tflite", "runner"] == "LiteRT XNNPACK 1 thread(s)"
    assert out.loc["tiny.keras", "variants"] == "baseline-keras-predict, baseline-tf-function"
    assert out.loc["tiny.keras", "runner"] == "tf.function"
    assert "graph" in out.loc["tiny.keras", "timed"]
    assert missing == ["missing.tflite", "tiny.onnx (no runner for this format)"]
    assert out.loc["tiny.tflite", "speedup_p50"] == pytest.approx(1.0)
    assert (out["latency_p50_us"] > 0).all()
    # the same weights behind both runners: the same accuracy
    assert out.loc["tiny.keras", "accuracy"] == pytest.approx(out.loc["tiny.tflite", "accuracy"],
                                                              abs=1 / 64)


def test_lab_command_serves_notebooks_on_localhost():
    from labkit import lab
    cmd = lab.command(["--no-browser"])
    assert f"--ServerApp.root_dir={NOTEBOOKS_DIR}" in cmd and "--ServerApp.ip=127.0.0.1" in cmd
    assert cmd[-1] == "--no-browser" and not any("token=''" in c or "token=" in c for c in cmd)
    overrides = json.loads((lab.SETTINGS_DIR / "overrides.json").read_text())
    assert f"--LabApp.app_settings_dir={lab.SETTINGS_DIR}" in cmd
    assert overrides["@jupyterlab/apputils-extension:notification"]["fetchNews"] == "false"


def test_a_long_training_bar_sends_few_kernel_messages():
    """nbval drains a cell's messages only after it ends; ZeroMQ drops what overflows (some 7,000),
    the cell's result with it. A training bar must stay far below that however long it runs."""
    import queue

    from jupyter_client.manager import start_new_kernel
    code = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r})\n"
            "from labkit import models\n"
            "callback = models.TqdmCallback(50_000)\n"
            "callback.on_train_begin()\n"
            "for step in range(50_000):\n"
            "    callback.on_train_batch_end(step % 430, {'loss': 0.1, 'accuracy': 0.9})\n"
            "    if step % 500 == 0: time.sleep(0.02)\n"
            "callback.on_train_end()\n")
    manager, client = start_new_kernel(kernel_name="python3", cwd=str(ROOT))
    messages = 0
    try:
        msg_id = client.execute(code)
        reply = client.get_shell_msg(timeout=300)
        assert reply["content"]["status"] == "ok", reply["content"]
        while True:
            msg = client.get_iopub_msg(timeout=10)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            messages += 1
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
    except queue.Empty:
        pytest.fail(f"the kernel's messages stopped after {messages}: some were dropped")
    finally:
        manager.shutdown_kernel(now=True)
    assert messages < 500, f"{messages} kernel messages for one training bar"


# ------------------------------------------------------------------------- the package's promises

def labkit_modules() -> list[str]:
    names = ["labkit"] + [m.name for m in pkgutil.walk_packages(labkit.__path__, "labkit.")]
    return [n for n in names if not n.endswith(".__main__")]


# Modules that must not import TensorFlow at all: the distributed launcher, its workers before
# they configure the runtime, the Ray driver and its actors (LiteRT only: measure.LiteRTModel,
# tflite.check), the command-line tools, and the spine's light layers (files, machine, kmeans).
WITHOUT_TENSORFLOW = ("labkit", "labkit.files", "labkit.machine", "labkit.kmeans", "labkit.data",
                      "labkit.results", "labkit.tflite", "labkit.measure", "labkit.book",
                      "labkit.lab", "labkit.distributed", "labkit.distributed.cluster",
                      "labkit.distributed.worker", "labkit.distributed.dtensor",
                      "labkit.distributed.ray_serving", "labkit.serving", "labkit.serving.app",
                      "labkit.serving.load")

_IMPORT_PROBE = r"""
import importlib, json, sys

def runtime_started():  # TensorFlow's eager context exists and has been initialized
    context = sys.modules.get("tensorflow.python.eager.context")
    found = context.context_safe() if context else None
    return bool(found is not None and found._initialized)

for name in sys.argv[1:]:
    importlib.import_module(name)
    print(json.dumps({"module": name, "tensorflow": "tensorflow" in sys.modules,
                      "started": runtime_started()}), flush=True)
    if runtime_started():
        sys.exit(0)
# the public check the workers rely on: the runtime can still be configured
if "tensorflow" in sys.modules:
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(1)
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    print(json.dumps({"configurable": True}), flush=True)
"""


def test_no_labkit_import_starts_tensorflows_runtime():
    """Workers set threads, collectives and logical devices before TensorFlow's runtime starts, so
    importing any labkit module must leave it unstarted (and the light modules must not load TF at
    all).
    One fresh process imports the modules in turn; after a module that starts the runtime, the rest
    are checked in another fresh process, so every offender is named."""
    order = list(WITHOUT_TENSORFLOW) + [m for m in labkit_modules() if m not in WITHOUT_TENSORFLOW]
    seen, started, configurable = {}, [], False
    remaining = order
    while remaining:
        done = subprocess.run([sys.executable, "-c", _IMPORT_PROBE, *remaining],
                              capture_output=True, text=True,
                              timeout=300, cwd=str(ROOT))
        assert done.returncode == 0, done.stderr[-3000:]
        lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        configurable = configurable or any(line.get("configurable") for line in lines)
        for line in lines:
            if "module" in line:
                seen[line["module"]] = line
        last = lines[-1] if lines else {}
        if not last.get("started"):
            break
        started.append(last["module"])
        remaining = remaining[remaining.index(last["module"]) + 1:]
    assert set(seen) == set(order)
    assert not started, f"importing these labkit modules starts TensorFlow's runtime: {started}"
    loads_tf = [m for m in WITHOUT_TENSORFLOW if seen[m]["tensorflow"]]
    assert not loads_tf, f"these modules should not import TensorFlow at all: {loads_tf}"
    assert configurable, \
        "TensorFlow's runtime could not be configured after importing every labkit module"


# Entry points that may skip labkit.setup(), and why.
SETUP_EXEMPT = {
    "labkit.lab":
        "replaces its process with JupyterLab (os.execv): nothing setup() sets would survive",
    "labkit.distributed.ray_serving":
        "the Ray driver runs LiteRT, never TensorFlow, and draws no random numbers",
    "labkit.check": "reads notebooks and solution sources into a file; runs no model",
    "labkit.doctor":
        "its TensorFlow, LiteRT and Ray probes run in fresh processes that call setup() themselves",
    "labkit.kit": "copies and checks files; runs no model",
}


def _calls_setup(tree: ast.Module, start: list) -> bool:
    """Does code reachable from `start` (through this module's own functions) call
    labkit.setup()?"""
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    todo, visited = list(start), set()
    while todo:
        for node in ast.walk(todo.pop()):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            if (isinstance(func, ast.Attribute) and func.attr == "setup"
                    and getattr(func.value, "id", "") == "labkit"):
                return True
            if isinstance(func, ast.Name) and func.id in functions and func.id not in visited:
                visited.add(func.id)
                todo.append(functions[func.id])
    return False


def test_every_entry_point_calls_setup():
    package = Path(labkit.__file__).parent
    missing, entry_points = [], []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text())
        blocks = [node for node in tree.body if isinstance(node, ast.If)
                  and "__main__" in ast.unparse(node.test)]
        if not blocks:
            continue
        parts = path.relative_to(package.parent).with_suffix("").parts
        module = ".".join(parts).removesuffix(".__main__")
        entry_points.append(module)
        if module not in SETUP_EXEMPT and not _calls_setup(tree, blocks):
            missing.append(module)
    assert {"labkit.bench", "labkit.book", "labkit.distributed",
            "labkit.distributed.worker"} <= set(entry_points)
    assert set(SETUP_EXEMPT) <= set(entry_points), \
        "an exemption names a module that is no entry point"
    assert not missing, f"`python -m` entry points that never call labkit.setup(): {missing}"


def test_book_counts_the_claims_a_learner_would_see_as_notes(tmp_path, monkeypatch):
    """Without --strict a missed claim is a note and the notebook runs on; the report counts the
    notes."""
    source = "import labkit\nlabkit.claim(1 > 2, 'one is more than two', '1')\nprint('after')"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)]),
                   tmp_path / "00_note.ipynb")
    monkeypatch.setenv("LABKIT_STRICT", "0")
    run = book.run_notebook(tmp_path / "00_note.ipynb", tmp_path / "out")
    assert run["ok"] and run["claims_not_met"] == 1, run
    monkeypatch.setenv("LABKIT_STRICT", "1")
    strict = book.run_notebook(tmp_path / "00_note.ipynb", tmp_path / "out")
    assert not strict["ok"] and "one is more than two" in strict["error"], strict
