"""The exercises and questions as the notebooks ship them: blanks that report "not attempted", the
solutions filled in pass their checkers, and every question carries its folded answer."""
import subprocess
import sys

import nbformat
import pytest

from labkit import ROOT, book, check
from labkit.check import instructor

EXERCISE_NOTEBOOKS = ("01", "02", "03", "04", "05", "07", "08")
PREAMBLE = ("import labkit\nlabkit.setup(seed=0)\nimport math\nimport numpy as np\n"
            "from labkit import check")


def chapter(path) -> str:
    return path.name[:2] if path.name[2] == "_" else path.name.split("_")[0]


@pytest.fixture(scope="module")
def notebooks():
    return {chapter(path): nbformat.read(path, as_version=4) for path in book.notebooks()}


@pytest.fixture(scope="module")
def exercises(notebooks):
    """(chapter, cell, name) for every exercise cell, in book order."""
    return [(number, cell, instructor.exercise_name(cell))
            for number, nb in notebooks.items() for cell in instructor.tagged(nb, "exercise")]


def test_each_notebook_has_its_exercises_and_questions(notebooks):
    for number, nb in notebooks.items():
        asked = instructor.tagged(nb, "question")
        assert len(asked) >= 3, \
            f"notebook {number} has {len(asked)} question cells, at least 3 expected"
        if number in EXERCISE_NOTEBOOKS:
            found = instructor.tagged(nb, "exercise")
            assert len(found) >= 2, \
                f"notebook {number} has {len(found)} exercise cells, at least 2 expected"


def test_every_checker_has_its_blank_in_the_notebook_it_names(exercises):
    check._load_chapters()
    placed = {name: number for number, _, name in exercises}
    assert len(placed) == len(exercises), "an exercise appears twice"
    for name, entry in check.EXERCISES.items():
        assert placed.get(name) == entry.notebook, \
            f"{name} belongs in notebook {entry.notebook}, found in {placed.get(name)}"
    assert set(placed) <= set(check.EXERCISES), \
        f"cells without a checker: {set(placed) - set(check.EXERCISES)}"


def test_blanks_are_blank_and_match_the_solutions_signature(exercises):
    for number, cell, name in exercises:
        assert cell.cell_type == "code"
        assert "raise NotImplementedError" in cell.source, f"{name} in {number} is not a blank"
        assert instructor.blank_signature(cell, name) == instructor.solution_signature(name), \
            f"{name}: the blank's parameters differ from the solution's"


def test_every_question_folds_its_answer(notebooks):
    for number, nb in notebooks.items():
        for cell in instructor.tagged(nb, "question"):
            assert cell.cell_type == "markdown", \
                f"notebook {number}: a question cell must be markdown"
            assert instructor.DETAILS.search(cell.source), \
                f"notebook {number}: a question without a <details> answer: {cell.source[:80]!r}"


def run_cells(sources: list[str]) -> list[str]:
    """Execute the cells in one fresh kernel, as a notebook would; the text each printed."""
    from nbclient import NotebookClient
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s)
                                         for s in [PREAMBLE, *sources]])
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   extra_arguments=["--IPKernelApp.log_level=ERROR"],
                   resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    return ["".join(o.get("text", "") for o in cell.outputs) for cell in nb.cells[1:]]


def test_shipped_blanks_say_not_attempted_and_filled_solutions_pass(notebooks, exercises):
    """CI's two runs of the exercises: as shipped (every checker: not attempted, nothing raised)
    and with the instructor's solutions filled in (every checker: correct), each in a kernel like a
    notebook's."""
    blanks = [cell.source for _, cell, _ in exercises]
    names = [name for _, _, name in exercises]
    for name, printed in zip(names, run_cells(blanks)):
        assert f"○ {name}: not attempted" in printed, f"{name} as shipped printed: {printed!r}"
    filled = [cell.source for nb in notebooks.values()
              for cell in instructor.tagged(instructor.filled(nb), "exercise")]
    for name, printed in zip(names, run_cells(filled)):
        assert f"✓ {name}: correct" in printed, \
            f"{name} with the solution filled in printed: {printed!r}"


def test_solution_prints_one_and_names_the_exercises_when_asked_for_an_unknown_one(capsys):
    check.solution("magnitude_mask")
    assert "def magnitude_mask(weights, sparsity):" in capsys.readouterr().out
    with pytest.raises(ValueError, match="the exercises are"):
        check.solution("magnitude_musk")


def test_a_checker_reports_a_crash_with_its_inputs_and_refuses_a_non_function():
    def crashes(weights, sparsity):
        return weights.no_such_attribute
    with pytest.raises(check.ExerciseError, match="raised AttributeError.*\n  on \\("):
        check.magnitude_mask(crashes)
    with pytest.raises(check.ExerciseError, match="pass your function itself"):
        check.magnitude_mask(0.5)


def test_instructor_command_writes_every_solution_and_answer(tmp_path, exercises, notebooks):
    done = subprocess.run([sys.executable, "-m", "labkit.check", "solutions", "--out",
                           str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=str(ROOT))
    assert done.returncode == 0, done.stderr[-2000:]
    text = (tmp_path / "solutions.md").read_text()
    for _, _, name in exercises:
        assert f"def {name}(" in text
    questions = sum(len(instructor.tagged(nb, "question")) for nb in notebooks.values())
    assert text.count("### Question ") == questions
    filled = nbformat.read(tmp_path / "notebooks" / "02_pruning.ipynb", as_version=4)
    assert all("NotImplementedError" not in c.source for c in instructor.tagged(filled, "exercise"))
