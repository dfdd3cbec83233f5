"""Run the whole lab book headless: `python -m labkit.book`.

Owns the headless book run and its report (no notebook imports it; the README points to it).
Executes every notebook in notebooks/ in order, each in a fresh kernel, writes the executed
copies and a report (Markdown and HTML, with the measurements table and a plot) to
build/book/, and exits non-zero if any notebook failed.
"""
from __future__ import annotations

import argparse
import html
import os
import sys
import time
from datetime import datetime
from pathlib import Path

import matplotlib
import nbformat
import pandas as pd
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

import labkit
from labkit import NOTEBOOKS_DIR, ROOT, files, machine, plots, results

BUILD_DIR = ROOT / "build" / "book"


def notebooks(directory: Path = NOTEBOOKS_DIR) -> list[Path]:
    """The book's notebooks in reading order (their names start with the chapter number)."""
    return sorted(p for p in Path(directory).glob("[0-9][0-9]*_*.ipynb"))   # 04b sorts after 04


def section_times(nb) -> list[dict]:
    """Seconds of cell execution per section (a markdown cell's `## ` heading starts one), read
    from the timing nbclient records in each executed cell's metadata. WORKSHOP.md's timings come
    from here."""
    rows, section = [], "opening"
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            heading = next((line[3:].strip() for line in cell.source.splitlines()
                            if line.startswith("## ")), None)
            section = heading or section
            continue
        timing = cell.get("metadata", {}).get("execution", {})
        start, end = timing.get("iopub.execute_input"), timing.get("shell.execute_reply")
        if not (start and end):
            continue
        seconds = (datetime.fromisoformat(end.replace("Z", "+00:00"))
                   - datetime.fromisoformat(start.replace("Z", "+00:00"))).total_seconds()
        if rows and rows[-1]["section"] == section:
            rows[-1]["seconds"] += seconds
        else:
            rows.append({"section": section, "seconds": seconds})
    return rows


CLAIM_NOTE = "Claim not met:"


def claim_notes(nb) -> list[str]:
    """The notes of claims that did not hold in an executed notebook (labkit.claim, learner
    mode)."""
    notes = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            text = output.get("text", "") or output.get("data", {}).get("text/plain", "")
            notes += [line.strip() for line in text.splitlines() if CLAIM_NOTE in line]
    return notes


def run_notebook(path: Path, out_dir: Path, timeout_s: int = 1800) -> dict:
    """Execute one notebook in a fresh kernel; save the executed copy even when it fails."""
    nb = nbformat.read(path, as_version=4)
    # The kernel is local and short-lived: its log level hides the start-up notice about TCP on
    # localhost. Once the last cell has run, the kernel and its process group are ended at once:
    # a graceful shutdown waited about three seconds per notebook for a kernel whose work is done
    # (each notebook stops its own servers and writes its files atomically in its cells).
    client = NotebookClient(nb, timeout=timeout_s, kernel_name="python3",
                            extra_arguments=["--IPKernelApp.log_level=ERROR"],
                            shutdown_kernel="immediate",
                            resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    error = None
    try:
        client.execute()
    except CellExecutionError as exc:
        error = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
    except Exception as exc:  # kernel died, timeout
        error = f"{type(exc).__name__}: {exc}"
    seconds = time.perf_counter() - start
    out_dir.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, out_dir / path.name)
    return {"notebook": path.name, "ok": error is None, "seconds": seconds, "error": error,
            "claims_not_met": len(claim_notes(nb)),
            "sections": [{"notebook": path.name, **row} for row in section_times(nb)]}


def markdown_table(frame) -> str:
    frame = frame.reset_index(drop=True)
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    body = ["| " + " | ".join("" if pd.isna(v) else str(v) for v in row) + " |"
            for row in frame.values]
    return "\n".join([header, rule, *body])


def write_report(runs: list[dict], out_dir: Path) -> Path:
    """report.md, report.html, section_times.csv and the figures into `out_dir`; returns the
    path of report.md."""
    matplotlib.use("Agg")
    table = results.load()
    figures = []
    targets, stages = draw_store(table, out_dir, figures)
    serving = draw_serving(out_dir, figures)
    status, sections = run_tables(runs, out_dir)
    shown = measurements(table)
    report = files.write_text(out_dir / "report.md", markdown_report(
        status, sections, shown, targets, stages, serving, figures))
    files.write_text(out_dir / "report.html", html_report(
        status, sections, shown, targets, stages, serving, figures))
    return report


def measurements(table: pd.DataFrame) -> pd.DataFrame:
    """The results store as the report shows it: no machine column, figures rounded."""
    shown = table.drop(columns=["machine"]).copy()
    for column in ("latency_p50_us", "latency_p95_us", "throughput_ips"):
        shown[column] = shown[column].round(1)
    shown["accuracy"] = shown["accuracy"].round(4)
    return shown


def draw_store(table: pd.DataFrame, out_dir: Path, figures: list):
    """tradeoff.png and the pipeline's pareto.png (names added to `figures`); the pipeline's
    (targets, stages) tables, None where it has not run."""
    # pipeline loads TensorFlow, which book must not import at import time (tests/test_book.py)
    from labkit import pipeline
    if not table.empty:
        plots.tradeoff(table).savefig(out_dir / "tradeoff.png", dpi=110)
        figures.append("tradeoff.png")
    pareto, targets, stages = pipeline.report_figures(table)
    if pareto is not None:
        pareto.savefig(out_dir / "pareto.png", dpi=110)
        figures.append("pareto.png")
    return targets, stages


def draw_serving(out_dir: Path, figures: list):
    """serving.png from the serving study's load runs, and (the highest load within the SLO, the
    SLO's p99 in ms); None when no load run is stored."""
    # the serving study loads the models it serves: kept out of book's import (tests/test_book.py)
    from labkit.serving import study
    if not study.SERVING_TABLE.is_file():
        return None
    runs = pd.read_csv(study.SERVING_TABLE)
    if not len(runs):
        return None
    plots.latency_against_load(runs, study.SLO_P99_MS).savefig(out_dir / "serving.png", dpi=110)
    figures.append("serving.png")
    return study.at_slo(runs).reset_index(), study.SLO_P99_MS   # the setting is the first column


def run_tables(runs: list[dict], out_dir: Path):
    """(one row per notebook run, seconds per section); the sections go to section_times.csv."""
    status = pd.DataFrame(runs).drop(columns=["sections"], errors="ignore")
    status["seconds"] = status["seconds"].round(1)
    sections = pd.DataFrame([row for run in runs for row in run.get("sections", [])],
                            columns=["notebook", "section", "seconds"])
    sections["seconds"] = sections["seconds"].round(1)
    files.write_atomic(out_dir / "section_times.csv",
                       lambda tmp: sections.to_csv(tmp, index=False))
    return status, sections


def markdown_report(status, sections, shown, targets, stages, serving, figures) -> str:
    lines = ["# Lab book report", "",
             f"Machine: {machine.machine_string()}", "",
             f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')}.", "",
             "## Notebooks", "", markdown_table(status), "",
             "## Time per section (cell execution, seconds; section_times.csv)", "",
             markdown_table(sections), "",
             "## Measurements (results/measurements.csv)", "", markdown_table(shown), ""]
    if targets is not None:
        lines += ["## The combined pipeline (07_pipeline.ipynb)", "",
                  markdown_table(targets.round(4)), "",
                  markdown_table(stages.reset_index().round(4)), ""]
    if serving is not None:
        at_slo, slo_p99_ms = serving
        lines += [f"## Serving under load (09_serving.ipynb): the highest load with p99 under "
                  f"{slo_p99_ms:g} ms", "", markdown_table(at_slo.round(2)), ""]
    lines += [f"![{name}]({name})" for name in figures]
    return "\n".join(lines) + "\n"


def html_report(status, sections, shown, targets, stages, serving, figures) -> str:
    page = ["<html><head><meta charset='utf-8'><title>Lab book report</title></head><body>",
            "<h1>Lab book report</h1>",
            f"<p>Machine: {html.escape(machine.machine_string())}</p>",
            "<h2>Notebooks</h2>", status.to_html(index=False),
            "<h2>Time per section</h2>", sections.to_html(index=False),
            "<h2>Measurements</h2>", shown.to_html(index=False)]
    if targets is not None:
        page += ["<h2>The combined pipeline (07_pipeline.ipynb)</h2>",
                 targets.round(4).to_html(index=False), stages.round(4).to_html()]
    if serving is not None:
        page += ["<h2>Serving under load (09_serving.ipynb)</h2>",
                 serving[0].round(2).to_html(index=False)]
    page += [f"<img src='{name}' alt='{name}'>" for name in figures]
    return "\n".join(page + ["</body></html>"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="run only notebooks whose names contain these")
    parser.add_argument("--out", type=Path, default=BUILD_DIR,
                        help="where executed copies and the report go")
    parser.add_argument("--strict", action="store_true",
                        help="a claim that does not hold fails its notebook, as in the tests and "
                             "CI (by default it shows a note, as in a learner's session, and the "
                             "report counts them)")
    args = parser.parse_args(argv)
    if args.strict:
        os.environ["LABKIT_STRICT"] = "1"   # the kernels inherit it
    labkit.setup(seed=0)  # the report below loads the store and plots in this process
    chosen = [p for p in notebooks() if not args.names or any(n in p.name for n in args.names)]
    if not chosen:
        print(f"No notebooks matched in {NOTEBOOKS_DIR}", file=sys.stderr)
        return 2
    runs = []
    for path in chosen:
        print(f"running {path.name} ...", flush=True)
        run = run_notebook(path, args.out)
        runs.append(run)
        print(f"  {'ok' if run['ok'] else 'FAILED'} in {run['seconds']:.0f} s"
              + ("" if run["ok"] else f": {run['error']}"), flush=True)
    report = write_report(runs, args.out)
    failed = [r["notebook"] for r in runs if not r["ok"]]
    print(f"report: {report}")
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"all {len(runs)} notebooks ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
