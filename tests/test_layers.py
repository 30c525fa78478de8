"""The house rules, read off the code: imports point down, nothing imports the command line, no import
cycles (lazy imports count), no private name crosses a package, and files and functions stay small.

`make lint` checks the layers with import-linter (``[tool.importlinter]`` in pyproject.toml); these tests
check what a layers contract cannot say. `tools/import_graph.py` prints the graph they read.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
SRC = ROOT / "src" / "peering"
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80
CALLBACK = SRC / "lightning" / "callback.py"
MAX_CALLBACK_LINES = 400
MAX_HOOK_LINES = 25


def _tool():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "tools" / "import_graph.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    pytest.importorskip("grimp")
    return _tool().module_graph()


def _sources() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_cycles(graph):
    edges = {m: {t for t in ts if t != "peering"} for m, ts in graph.items() if m != "peering"}
    found = _tool().cycles(edges)
    assert not found, f"import cycles (lazy imports count): {found}"


def test_nothing_imports_the_command_line_or_the_demo(graph):
    for app in ("peering.cli", "peering.demo"):
        outside = {
            m for m, targets in graph.items()
            if not m.startswith(app) and any(t == app or t.startswith(app + ".") for t in targets)
        }
        allowed = {"peering.cli"} | {m for m in outside if m.startswith("peering.cli.")}
        assert outside <= allowed, f"{sorted(outside - allowed)} import {app}"


def test_report_and_lightning_share_runs_only(graph):
    for a, b in (("peering.report", "peering.lightning"), ("peering.lightning", "peering.report")):
        bad = {m for m, ts in graph.items() if m.startswith(a) and any(t.startswith(b) for t in ts)}
        assert not bad, f"{sorted(bad)} import {b}"


def _package(module: str) -> str:
    """The package a module belongs to: ``peering.render.tokens`` -> ``peering.render``; a top-level
    module is its own package (``peering.store``), and ``peering._model`` is peering's shared core."""
    parts = module.split(".")
    return ".".join(parts[:2])


def test_no_private_name_crosses_a_package():
    crossings = []
    for path in _sources():
        here = _module_name(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith("peering"):
                continue
            assert node.module is not None
            private_module = any(p.startswith("_") for p in node.module.split(".")[2:])
            names = [a.name for a in node.names if a.name.startswith("_")]
            if (names or private_module) and _package(node.module) != _package(here):
                crossings.append(f"{here}: from {node.module} import {', '.join(a.name for a in node.names)}")
    assert not crossings, "private names imported across packages:\n" + "\n".join(crossings)


def test_no_file_over_the_limit():
    lengths = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in _sources()}
    long = {name: n for name, n in lengths.items() if n > MAX_FILE_LINES}
    assert not long, f"files over {MAX_FILE_LINES} lines: {long}"


def _body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of a function's body, its docstring left out."""
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        if isinstance(body[0].value.value, str):
            body = body[1:]
    if not body:
        return 0
    return (body[-1].end_lineno or body[-1].lineno) - body[0].lineno + 1


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_no_function_body_over_the_limit():
    long = {
        f"{p.relative_to(ROOT)}:{f.lineno} {f.name}": n
        for p in _sources()
        for f in _functions(p)
        if (n := _body_lines(f)) > MAX_FUNCTION_LINES
    }
    assert not long, f"function bodies over {MAX_FUNCTION_LINES} lines (docstrings aside): {long}"


def test_the_callback_is_its_hooks():
    lines = len(CALLBACK.read_text().splitlines())
    assert lines <= MAX_CALLBACK_LINES, f"{CALLBACK.name} has {lines} lines"
    hooks = {
        f.name: n for f in _functions(CALLBACK)
        if (f.name.startswith("on_") or f.name in ("setup", "teardown", "state_dict", "load_state_dict"))
        and (n := _body_lines(f)) > MAX_HOOK_LINES
    }
    assert not hooks, f"hooks over {MAX_HOOK_LINES} lines: {hooks}"
