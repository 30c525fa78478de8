"""Lazy exports: a package's public names resolved on first use, so that importing the package (as the
command line does for ``peering --help``) does not import torch.

>>> import types
>>> module = types.ModuleType("demo")
>>> module.__getattr__ = exports({"sqrt": "math"}, "demo")
>>> module.__getattr__("sqrt")(4.0)
2.0
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["exports"]


def exports(names: Mapping[str, str], package: str) -> Callable[[str], Any]:
    """A module ``__getattr__`` that resolves each of ``names`` (name -> the module that defines it, or
    the module itself when the name is one of its submodules) on first use, and caches it in the
    package's namespace."""

    def __getattr__(name: str) -> Any:
        source = names.get(name)
        if source is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(source)
        value = module if source == f"{package}.{name}" else getattr(module, name)
        namespace = sys.modules.get(package)
        if namespace is not None:
            setattr(namespace, name, value)
        return value

    return __getattr__
