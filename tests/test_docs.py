"""Every docstring example in the package runs, and so does the README's Python example."""

from __future__ import annotations

import dataclasses
import doctest
import importlib
import inspect
import pkgutil
import re
import warnings
from pathlib import Path

import pytest

import peering

MODULES = sorted(
    name
    for _, name, _ in pkgutil.walk_packages(peering.__path__, prefix="peering.")
    if not name.rsplit(".", 1)[-1].startswith("_")
)
README = Path(__file__).parents[1] / "README.md"


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples_run(module, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that train write lightning_logs/ or PNGs into the working dir
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def test_every_public_function_has_an_example():
    """The house rule: a runnable example in the docstring of every public function and of every class
    that does something (result records and exceptions are documented by their attributes instead)."""
    missing = []
    for module in MODULES:
        mod = importlib.import_module(module)
        for name in getattr(mod, "__all__", []):
            obj = getattr(mod, name)
            if getattr(obj, "__module__", None) != module or ">>>" in (obj.__doc__ or ""):
                continue
            record = inspect.isclass(obj) and (dataclasses.is_dataclass(obj) or issubclass(obj, Exception))
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and not record:
                missing.append(f"{module}.{name}")
    assert not missing, f"public callables without a >>> example: {missing}"


def test_readme_python_example_runs(tmp_path, monkeypatch):
    block = re.search(r"## In Python\n\n```python\n(.*?)```", README.read_text(), re.S)
    assert block, "README lost its Python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block.group(1), "README.md", "exec"), namespace)
    assert (tmp_path / "explain.png").stat().st_size > 0 and (tmp_path / "morph.png").stat().st_size > 0
    assert namespace["exp"].attributions.shape == (32, 2, 1, 8, 8)


def _readme_names() -> set[str]:
    """Every peering name the README uses: ``from peering.x import a, b`` in its code, and every
    ``peering.x.y`` path in its text and code (dotted attribute paths, not file names)."""
    text = README.read_text()
    names: set[str] = set()
    for module, imported in re.findall(r"from (peering(?:\.\w+)*) import ([\w, ]+)", text):
        names.update(f"{module}.{n.strip()}" for n in imported.split(",") if n.strip())
    for path in re.findall(r"(?<![\w/.])peering(?:\.[A-Za-z_]\w*)+", text):
        names.add(path)
    return {n for n in names if not n.endswith((".py", ".md", ".json", ".html", ".png", ".ckpt"))}


def test_every_name_in_the_readme_imports():
    """What the README tells people to import or call exists where it says (old paths included)."""
    missing = []
    for name in sorted(_readme_names()):
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):  # the longest importable module, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            try:
                for attr in parts[cut:]:
                    obj = getattr(obj, attr)
            except AttributeError:
                missing.append(name)
            break
        else:
            missing.append(name)
    assert len(_readme_names()) > 20, "the README's names were not found"
    assert not missing, f"README names that do not import: {missing}"
