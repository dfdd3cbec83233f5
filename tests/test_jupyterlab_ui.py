"""Notebook 07's widgets in a real JupyterLab, driven by headless Chromium through Playwright.

The test copies the notebook's cells tagged `widgets` (set-up and the explorer) into a demo
notebook under a throw-away LABKIT_ROOT with a small hand-made results store, starts JupyterLab
with `python -m labkit.lab` on 127.0.0.1 with a token it chose, runs the cells in the browser,
waits for the widgets and the plot to render, picks a variant in the browser, and checks a
screenshot is not blank. The server and its kernels are stopped whatever happens.

Needs `pip install playwright` and Debian's `apt-get install chromium` (/usr/bin/chromium);
skipped with the reason otherwise. Nothing is written outside pytest's temporary directory: the
screenshot is kept there, under book/artifacts/pipeline/jupyterlab_ui.png (pytest keeps the last
three runs' directories; `--basetemp DIR` chooses where).
"""
from __future__ import annotations

import http.client
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import labkit

CHROMIUM = Path("/usr/bin/chromium")
NOTEBOOK = labkit.NOTEBOOKS_DIR / "07_pipeline.ipynb"

playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed "
                                     "(pip install playwright); the JupyterLab UI test needs it")
if not CHROMIUM.is_file():
    pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium); the JupyterLab UI "
                "test needs a browser", allow_module_level=True)

# The kernel is ready when the status bar says so ("Python 3 (ipykernel) | Idle").
KERNEL_IDLE = ("document.querySelector('.jp-StatusBar-Widget') && "
               "document.querySelector('.jp-StatusBar-Widget').innerText.includes('Idle')")
# 0.9912 is quantization-int8's accuracy: it shows only once the kernel answered.
KERNEL_ANSWERED = "document.querySelector('.labkit-explorer').innerText.includes('0.9912')"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_notebook(path: Path) -> int:
    """Write the notebook's `widgets` cells to `path`; return how many cells it has."""
    import nbformat
    source = nbformat.read(NOTEBOOK, as_version=4)
    cells = [cell for cell in source.cells if "widgets" in cell.get("metadata", {}).get("tags", [])]
    assert len(cells) >= 2, "notebook 07 should tag its set-up and explorer cells with 'widgets'"
    demo = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c.source) for c in cells],
                                    metadata=source.metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(demo, path)
    return len(cells)


def hand_made_store(root: Path) -> None:
    from labkit import results
    rows = [("baseline-float32-tflite", "baseline", 0.9916, 150.0, 1_560_000),
            ("pruning-unstructured-80", "pruning", 0.9910, 150.0, 400_000),
            ("quantization-int8", "quantization", 0.9912, 70.0, 300_000),
            ("pipeline-final", "pipeline", 0.9908, 65.0, 40_000)]
    results.upsert([{"variant": v, "technique": t, "notebook": "ui-test", "accuracy": a,
                     "latency_p50_us": l,
                     "latency_p95_us": 1.4 * l, "gzip_bytes": g, "size_bytes": 2 * g}
                    for v, t, a, l, g in rows], root / "results" / "measurements.csv")


def wait_for_server(port: int, path: str, process: subprocess.Popen, timeout_s: float = 90) -> None:
    """Poll the local server (127.0.0.1 only) until it answers 200."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with code {process.returncode}")
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            connection.request("GET", path)
            if connection.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.5)
        finally:
            connection.close()
    raise TimeoutError(f"JupyterLab did not answer http://127.0.0.1:{port}{path} "
                       f"within {timeout_s} s")


def stop(process: subprocess.Popen) -> None:
    """Stop the server and everything it started (its kernels) by its own process group id."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # kernels left behind in the group
    except ProcessLookupError:
        pass
    process.wait(timeout=15)


def test_widgets_render_in_jupyterlab(tmp_path):
    root = tmp_path / "book"
    demo_notebook(root / "notebooks" / "07_widgets_demo.ipynb")
    hand_made_store(root)
    port, token = free_port(), secrets.token_hex(16)
    env = {**os.environ, "LABKIT_ROOT": str(root), "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
           "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
           "JUPYTER_DATA_DIR": str(tmp_path / "data"),
           "IPYTHONDIR": str(tmp_path / "ipython"),
           "JUPYTER_PATH": os.pathsep.join(
               p for p in [os.environ.get("JUPYTER_PATH", ""),
                           str(Path(sys.prefix) / "share" / "jupyter")] if p)}
    log = open(tmp_path / "jupyterlab.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "labkit.lab", "--no-browser", f"--port={port}",
         f"--ServerApp.token={token}",
         "--ServerApp.port_retries=0", f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for_server(port, f"/api/status?token={token}", server)
        with playwright_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                        args=["--no-sandbox", "--disable-gpu",
                                              "--disable-dev-shm-usage"])
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1100})
                page.goto(f"{base}/lab/tree/07_widgets_demo.ipynb?token={token}")
                page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=90_000)
                page.wait_for_function(KERNEL_IDLE, timeout=90_000)
                page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
                page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
                explorer = page.wait_for_selector(".labkit-explorer", timeout=180_000)
                page.wait_for_selector(".labkit-build-panel", timeout=30_000)
                # the Matplotlib plot
                page.wait_for_selector(".labkit-explorer img", timeout=60_000)

                # A round trip through the kernel: choose a variant in the browser, read its
                # details.
                variant_select = page.locator(".labkit-explorer .widget-dropdown",
                                              has_text="variant").locator("select")
                variant_select.select_option(label="quantization-int8")
                page.wait_for_function(KERNEL_ANSWERED, timeout=30_000)
                details = page.locator(".labkit-explorer .widget-html",
                                       has_text="Pareto frontier").inner_text()
                assert details.startswith("quantization-int8") and "0.9912" in details, details

                # labkit.lab answers JupyterLab's "official Jupyter news?" question for every
                # learner
                assert not page.get_by_text("official Jupyter news").count(), \
                    "the news prompt is back"
                explorer.scroll_into_view_if_needed()
                # the throw-away root's
                shot = root / "artifacts" / "pipeline" / "jupyterlab_ui.png"
                shot.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(shot), full_page=True)
            finally:
                browser.close()
        import matplotlib.image
        pixels = matplotlib.image.imread(shot)[..., :3]
        grey = pixels.mean(axis=2)
        not_white = float((grey < 0.95).mean())
        assert grey.std() > 0.05, f"the screenshot looks blank (pixel std {grey.std():.3f})"
        assert not_white > 0.05, f"only {not_white:.1%} of the screenshot is not white"
        colours = np.unique((pixels * 15).round().reshape(-1, 3), axis=0)
        assert len(colours) > 20, \
            f"only {len(colours)} colours in the screenshot: no plot rendered?"
    finally:
        stop(server)
        log.close()
    assert server.poll() is not None
