"""The house rules of labkit, read from its syntax trees: imports point down, and every module
stays readable in one sitting. Function-level imports count like the ones at the top."""
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "labkit"
SPINE = {"labkit", "labkit.claims", "labkit.files", "labkit.machine", "labkit.data",
         "labkit.models", "labkit.measure", "labkit.memory", "labkit.results", "labkit.plots",
         "labkit.bench", "labkit.tflite"}
COMPOSERS = {"labkit.pipeline", "labkit.search", "labkit.widgets", "labkit.book"}
ENTRY_POINTS = ("labkit.targets", "labkit.check", "labkit.doctor", "labkit.kit", "labkit.lab")


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(package: Path = PACKAGE) -> dict:
    """{module: {labkit modules it imports anywhere in its file}}."""
    modules = {module_name(p, package): p for p in package.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = here.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + [base])
                    base = base.strip(".")
                for alias in node.names:   # `from labkit import measure` names a module
                    found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def kind(module: str) -> str:
    if module in SPINE:
        return "spine"
    if module in COMPOSERS:
        return "composer"
    if module.startswith(ENTRY_POINTS):
        return "entry point"
    return "technique"


ALLOWED = {"spine": {"spine"}, "technique": {"spine", "technique"},
           "composer": {"spine", "technique", "composer"},
           "entry point": {"spine", "technique", "composer", "entry point"}}


def wrong_way(graph: dict) -> list:
    return sorted(f"{a} ({kind(a)}) imports {b} ({kind(b)})" for a, bs in graph.items() for b in bs
                  if kind(b) not in ALLOWED[kind(a)])


def circles(graph: dict) -> list:
    """Every strongly connected group of two or more modules (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while not group or v not in group:
                group.add(stack.pop())
            on_stack.difference_update(group)
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_imports_point_down_and_close_no_circle():
    graph = imports()
    assert not wrong_way(graph), "\n".join(wrong_way(graph))
    assert not circles(graph), circles(graph)


def test_the_rules_catch_a_circle_and_an_upward_import():
    graph = {"labkit.results": {"labkit.bench"}, "labkit.bench": {"labkit.results"},
             "labkit.pruning": {"labkit.search"}, "labkit.search": set()}
    assert circles(graph) == [["labkit.bench", "labkit.results"]]
    assert wrong_way(graph) == ["labkit.pruning (technique) imports labkit.search (composer)"]


MAX_FUNCTION_LINES, MAX_PARAMETERS, MAX_DOCSTRING_LINES = 60, 10, 8
CHAPTER_NUMBER = re.compile(r"\b(notebooks? \d\d[ab]?|section \d+|§\s?\d)", re.IGNORECASE)


def sources():
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_reads_in_one_sitting():
    too_long = []
    for path in sources():
        tree = ast.parse(path.read_text())
        name = path.relative_to(PACKAGE.parent)
        doc = ast.get_docstring(tree) or ""
        if len(doc.splitlines()) > MAX_DOCSTRING_LINES:
            too_long.append(f"{name}: a module docstring of {len(doc.splitlines())} lines")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                args = node.args
                count = (len(args.posonlyargs) + len(args.args) + len(args.kwonlyargs)
                         + bool(args.vararg) + bool(args.kwarg))
                count -= bool(args.args and args.args[0].arg in ("self", "cls"))
                if lines > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}:{node.lineno} {node.name}: {lines} lines")
                if count > MAX_PARAMETERS:
                    too_long.append(f"{name}:{node.lineno} {node.name}: {count} parameters")
    assert not too_long, "\n".join(too_long)


def test_code_names_functions_not_notebook_or_section_numbers():
    """The book moves; a function's name does not: labkit's code and docstrings point to
    functions, and the notebooks name the functions they use."""
    found = [f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}"
             for path in sources() for number, line in enumerate(path.read_text().splitlines(), 1)
             if CHAPTER_NUMBER.search(line)]
    assert not found, f"{len(found)} lines:\n" + "\n".join(found[:40])


def test_ruff_is_green():
    """Lines of at most 100 characters and the rule set in pyproject.toml, over labkit and tests."""
    pytest.importorskip("ruff", reason="ruff comes with the dev extras: pip install -e '.[dev]'")
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "labkit", "tests",
                           "conftest.py"], cwd=PACKAGE.parent, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
