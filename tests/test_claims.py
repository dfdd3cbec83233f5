"""labkit.claim: strict in the tests and CI, a note that explains in a learner's session."""

import pytest

import labkit
from labkit import ROOT, claims


def test_the_test_suite_runs_strict():
    assert claims.strict(), \
        "conftest sets LABKIT_STRICT=1 so that notebooks and tests fail on a missed claim"


def test_a_claim_that_holds_says_nothing_and_one_that_misses_fails_in_strict_mode(capsys):
    # a cell ending with it prints nothing
    assert labkit.claim(3.2 > 3, "gzip makes it 3x smaller", "3.20x") is None
    with pytest.raises(labkit.ClaimError,
                       match=r"claim did not hold: gzip makes it 3x smaller \(measured: 2.10x; "
                                                r"the book expects: > 3x\)"):
        labkit.claim(2.1 > 3, "gzip makes it 3x smaller", "2.10x", expected="> 3x")
    assert capsys.readouterr().out == ""


def test_a_learner_sees_a_note_with_the_likely_reason_and_goes_on(monkeypatch, capsys):
    monkeypatch.setenv("LABKIT_STRICT", "0")
    knobs = labkit.knobs(sparsity=0.8, schedule="polynomial")
    labkit.claim(False, "the pruned model loses accuracy", "0.1 points", knobs=knobs)
    assert "machine or library versions" in capsys.readouterr().out   # at the book's values
    knobs.sparsity = 0.5
    assert knobs.changed() == {"sparsity": (0.5, 0.8)} and not knobs.at_book_values()
    labkit.claim(False, "the pruned model loses accuracy", "0.1 points", knobs=knobs)
    out = capsys.readouterr().out
    assert "Claim not met: the pruned model loses accuracy. Measured: 0.1 points." in out
    assert "sparsity = 0.5 (book: 0.8)" in out and "The notebook goes on." in out
    labkit.claim(False, "int8 is faster", "1.1x", timing=True)
    assert "run this cell again" in capsys.readouterr().out


def test_knobs_refuse_a_setting_the_section_does_not_have():
    knobs = labkit.knobs(k=16)
    with pytest.raises(AttributeError, match=r"no setting 'clusters'; its settings are \['k'\]"):
        knobs.clusters = 8
    knobs.k = 8
    assert repr(knobs) == "knobs(k=8)  # book: k=16"


def test_in_a_kernel_the_note_is_highlighted_html_with_a_plain_text_copy():
    import nbformat
    from nbclient import NotebookClient
    code = ("import labkit\nknobs = labkit.knobs(k=16)\nknobs.k = 4\n"
            "labkit.claim(False, 'k=16 keeps the accuracy', '0.97', knobs=knobs)\nprint('went on')")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
    env_note = "import os; os.environ['LABKIT_STRICT'] = '0'\n"
    nb.cells.insert(0, nbformat.v4.new_code_cell(env_note))
    NotebookClient(nb, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = nb.cells[1].outputs
    shown = [o for o in outputs if o.output_type == "display_data"]
    assert shown and "Likely reason" in shown[0].data["text/html"]
    assert "k = 4 (book: 16)" in shown[0].data["text/plain"]
    assert any("went on" in o.get("text", "") for o in outputs)
