"""``--model package.module:factory`` and ``--model path/to/file.py:factory``: the user's own model class,
imported so that processes started by ``ddp_spawn`` can import it too (they unpickle the model by its
module's name, with the parent's ``sys.path``)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from peering.checkpoints.loaded import one_line
from peering.errors import CheckpointError

__all__ = ["import_factory"]


def import_factory(spec: str) -> Callable[[], Any]:
    """The callable named by ``"package.module:factory"`` or ``"path/to/file.py:factory"``.

    The current directory is searched too (as ``python -m`` would), so a module beside the user's data
    works without installing it. A ``file.py`` is imported under its own name, with its folder added to
    the end of ``sys.path`` (as ``python file.py`` would add it), so that the processes
    ``--devices N`` starts can import it as well; only when that name is already another module's is it
    imported under a private name (then it works in this process only).

    >>> import_factory("peering.models:DigitCNN").__name__
    'DigitCNN'
    >>> import_factory("peering.models")
    Traceback (most recent call last):
    ...
    peering.errors.CheckpointError: --model must look like package.module:factory, got 'peering.models'
    """
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise CheckpointError(f"--model must look like package.module:factory, got {spec!r}")
    try:
        if module_name.endswith(".py"):
            module = _import_file(spec, Path(module_name))
        else:
            module = _import_module(module_name)
    except CheckpointError:
        raise
    except Exception as err:  # ImportError, or anything the module raises while importing
        raise CheckpointError(f"--model {spec}: cannot import {module_name}: {one_line(err)}") from err
    factory: Any = module
    for part in attr.split("."):
        try:
            factory = getattr(factory, part)
        except AttributeError:
            raise CheckpointError(f"--model {spec}: {module_name} has no attribute {attr!r}") from None
    if not callable(factory):
        raise CheckpointError(f"--model {spec}: {attr} is not callable")
    return factory


def _import_module(name: str) -> ModuleType:
    """Import ``name`` with the current directory searched first; the directory stays on ``sys.path``
    (at its end) when the module came from it, for the processes ``ddp_spawn`` starts."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(name)
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)
    origin = getattr(module, "__file__", None)
    if origin and Path(origin).resolve().is_relative_to(Path(cwd).resolve()) and cwd not in sys.path:
        sys.path.append(cwd)
    return module


def _import_file(spec: str, file: Path) -> ModuleType:
    if not file.is_file():
        raise CheckpointError(f"--model {spec}: file {file} not found")
    file = file.resolve()
    folder, name = str(file.parent), file.stem
    if name.isidentifier():
        existing = sys.modules.get(name)
        if existing is not None and _same_file(existing, file):
            return existing
        if existing is None:
            found = importlib.util.find_spec(name)
            if found is None and folder not in sys.path:
                sys.path.append(folder)
                importlib.invalidate_caches()
                found = importlib.util.find_spec(name)
            if found is not None and found.origin and Path(found.origin).resolve() == file:
                return importlib.import_module(name)
    private = f"_peering_user_{name}"
    module_spec = importlib.util.spec_from_file_location(private, file)
    if module_spec is None or module_spec.loader is None:
        raise CheckpointError(f"--model {spec}: cannot import {file}")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[private] = module
    module_spec.loader.exec_module(module)
    return module


def _same_file(module: ModuleType, file: Path) -> bool:
    origin = getattr(module, "__file__", None)
    return origin is not None and Path(origin).resolve() == file
