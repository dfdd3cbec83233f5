"""python -m labkit.doctor: one line per check, the fix beside each failure."""
from labkit import data, doctor


def test_quick_doctor_passes_here_and_prints_one_line_per_check(capsys):
    assert doctor.main(["--quick"]) == 0
    out = capsys.readouterr().out
    for check in ("python", "tensorflow", "ai-edge-litert", "memory", "disk", "cpu", "data",
                  "chromium", "models"):
        assert any(line.split()[1:2] == [check] for line in out.splitlines()), check
    assert "0 failed" in out


def test_a_failure_names_the_fix_and_fails_the_run(monkeypatch, capsys):
    def corrupt():
        raise data.DataError("MNIST file data/mnist.npz is corrupt: sha256 0000 does not match")
    monkeypatch.setattr(data, "read_mnist_arrays", corrupt)
    monkeypatch.setattr(doctor, "SUPPORTED_PYTHON", ((3, 99), (3, 99)))
    assert doctor.main(["--quick"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  data" in out and "fix: restore it: git checkout -- data/mnist.npz" in out
    assert "FAIL  python" in out and "use Python 3.99 to 3.99" in out
    assert "2 failed (python, data)" in out


def test_the_probes_run_in_fresh_processes_and_report_a_broken_runtime():
    worked, text = doctor.run_probe("import sys; print('fine'); sys.exit(0)")
    assert worked and text == "fine"
    worked, text = doctor.run_probe("raise ImportError('no module named ray')")
    assert not worked and "no module named ray" in text
