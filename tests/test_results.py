import pandas as pd
import pytest

from labkit import results


def row(variant, accuracy=0.99, technique="baseline"):
    return {"variant": variant, "technique": technique, "notebook": "01_baseline",
            "accuracy": accuracy,
            "latency_p50_us": 100.0, "latency_p95_us": 150.0, "machine": "test machine"}


def test_upsert_replaces_and_never_duplicates(tmp_path):
    store = tmp_path / "measurements.csv"
    results.upsert([row("a"), row("b")], store)
    results.upsert(row("a", accuracy=0.5), store)
    table = results.load(store)
    assert list(table.columns) == results.COLUMNS
    assert sorted(table["variant"]) == ["a", "b"]
    assert table.set_index("variant").loc["a", "accuracy"] == 0.5
    assert table["measured_at"].notna().all()


def test_interrupted_write_keeps_the_old_store(tmp_path, monkeypatch):
    store = tmp_path / "measurements.csv"
    results.upsert([row("a"), row("b")], store)
    before = store.read_bytes()

    def crash(self, *args, **kwargs):
        raise KeyboardInterrupt("interrupted in the middle of the write")
    monkeypatch.setattr(pd.DataFrame, "to_csv", crash)
    with pytest.raises(KeyboardInterrupt):
        results.upsert(row("c"), store)
    assert store.read_bytes() == before
    # no temp left
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".csv"] == ["measurements.csv"]


def test_bad_rows_are_rejected(tmp_path):
    store = tmp_path / "measurements.csv"
    with pytest.raises(ValueError, match="technique"):
        results.upsert(row("a", technique="magic"), store)
    with pytest.raises(ValueError, match="accuracy"):
        results.upsert(row("a", accuracy=99.1), store)
    with pytest.raises(ValueError, match="unknown result columns"):
        results.upsert({**row("a"), "speed": 3}, store)
    with pytest.raises(ValueError, match="variant"):
        results.upsert(row(""), store)
    assert not store.exists()


def test_a_foreign_csv_is_not_mistaken_for_the_store(tmp_path):
    other = tmp_path / "measurements.csv"
    other.write_text("x,y\n1,2\n")
    with pytest.raises(ValueError, match="not a labkit results store"):
        results.load(other)


def test_a_garbage_file_gets_the_stores_own_message(tmp_path):
    garbage = tmp_path / "measurements.csv"
    garbage.write_bytes(b'variant,technique\n"unclosed,1\n\x00\xff,2,3,4\n')
    with pytest.raises(ValueError, match="not a labkit results store"):
        results.load(garbage)


def test_the_default_store_is_read_when_called(results_path):
    results.upsert(row("a"))                       # no path: the (monkeypatched) default
    assert results_path.is_file() and list(results.load()["variant"]) == ["a"]


def test_make_row_reads_sizes_and_relative_artifact(tmp_path, monkeypatch):
    artifact = tmp_path / "m.tflite"
    artifact.write_bytes(bytes(1000))
    monkeypatch.setattr(results, "ROOT", tmp_path)
    made = results.make_row("v", "quantization", "04_quantization", accuracy=0.9, artifact=artifact,
                            machine="m")
    assert made["size_bytes"] == 1000 and made["gzip_bytes"] < 1000
    store = tmp_path / "s.csv"
    results.upsert(made, store)
    assert results.load(store).loc[0, "artifact"] == "m.tflite"
    assert results.relative_artifact(tmp_path / "artifacts" / "x.tflite") == "artifacts/x.tflite"
    outside = tmp_path.parent.resolve() / "elsewhere.tflite"   # outside the root: kept absolute
    assert results.relative_artifact(outside) == str(outside)
    assert results.relative_artifact(None) == results.relative_artifact("") == ""


def test_writers_in_several_processes_lose_no_row(tmp_path):
    """The store's lock (filelock, on POSIX and Windows) serialises read-modify-write across
    processes."""
    import subprocess
    import sys
    store = tmp_path / "measurements.csv"
    writer = ("import sys\nfrom labkit import results\n"
              "for i in range(15):\n"
              "    row = results.make_row(f'{sys.argv[1]}-{i}', 'baseline', 'test', accuracy=0.5)\n"
              "    results.upsert([row], sys.argv[2])\n")
    processes = [subprocess.Popen([sys.executable, "-c", writer, name, str(store)])
                 for name in ("a", "b", "c")]
    assert all(p.wait(timeout=120) == 0 for p in processes)
    assert len(results.load(store)) == 45


def test_environment_yml_pins_what_pyproject_pins():
    import tomllib

    from labkit import ROOT
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = set(project["dependencies"]) | set(project["optional-dependencies"]["dev"])
    conda = {line.strip()[2:] for line in (ROOT / "environment.yml").read_text().splitlines()
             if line.startswith("      - ") and not line.strip().startswith("- -e")}
    assert conda == pins, (f"only in pyproject: {pins - conda}; "
                           f"only in environment.yml: {conda - pins}")
    assert "python>=3.11,<3.14" in (ROOT / "environment.yml").read_text()
    assert project["requires-python"] == ">=3.11,<3.14"
