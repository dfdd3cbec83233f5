"""The book as a whole: clean notebooks, the headless runner and the benchmark command."""
import json

import nbformat
import pandas as pd
import pytest

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
        assert "labkit.setup(seed=0)" in first_code.source, f"{path.name} must call labkit.setup first"


def test_book_runs_notebooks_in_order_and_reports_failures(tmp_path, monkeypatch):
    for name, source in (("00_ok.ipynb", "x = 1 + 1\nassert x == 2"), ("01_bad.ipynb", "assert False, 'boom'")):
        nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)]), tmp_path / name)
    monkeypatch.setattr(book, "NOTEBOOKS_DIR", tmp_path)
    monkeypatch.setattr(book, "notebooks", lambda directory=tmp_path: sorted(tmp_path.glob("[0-9][0-9]_*.ipynb")))
    monkeypatch.setattr(results, "RESULTS_PATH", tmp_path / "none.csv")
    out = tmp_path / "out"
    assert book.main(["--out", str(out)]) == 1
    assert (out / "00_ok.ipynb").is_file() and (out / "01_bad.ipynb").is_file()
    report = (out / "report.md").read_text()
    assert "00_ok.ipynb | True" in report and "01_bad.ipynb | False" in report
    assert book.main(["--out", str(out), "00_ok"]) == 0


def test_bench_compares_every_artifact_with_the_baseline(tmp_path, tiny_model, splits, monkeypatch):
    base = models.save_tflite(tiny_model, tmp_path / "base.tflite")
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    table = pd.DataFrame([
        {"variant": bench.BASELINE_VARIANT, "technique": "baseline", "artifact": "base.tflite",
         "size_bytes": 100, "gzip_bytes": 80},
        {"variant": "same-again", "technique": "runtime", "artifact": "base.tflite", "size_bytes": 100, "gzip_bytes": 80},
        {"variant": "gone", "technique": "pruning", "artifact": "missing.tflite", "size_bytes": 1, "gzip_bytes": 1},
    ])
    out, missing = bench.benchmark(table, repeats=5, warmup=1, x=splits.x_test[:64], y=splits.y_test[:64])
    assert list(out.index) == [bench.BASELINE_VARIANT]  # duplicates of one artifact are timed once
    assert missing == ["missing.tflite"]
    assert out.loc[bench.BASELINE_VARIANT, "speedup_p50"] == pytest.approx(1.0)
    assert 0 <= out.loc[bench.BASELINE_VARIANT, "accuracy"] <= 1


def test_lab_command_serves_notebooks_on_localhost():
    from labkit import lab
    cmd = lab.command(["--no-browser"])
    assert f"--ServerApp.root_dir={NOTEBOOKS_DIR}" in cmd and "--ServerApp.ip=127.0.0.1" in cmd
    assert cmd[-1] == "--no-browser" and not any("token=''" in c or "token=" in c for c in cmd)


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
