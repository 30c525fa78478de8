"""Argument checks shared by every public entry point: each returns the checked value or raises one
`peering.errors.PeeringValueError` (or `PeeringTypeError`) that names the argument and what it takes.

>>> int_at_least("steps", 3, 0)
3
>>> int_at_least("top_k", True, 1)
Traceback (most recent call last):
...
peering.errors.PeeringValueError: top_k must be a positive int, got True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from peering.errors import PeeringTypeError, PeeringValueError

__all__ = ["callable_or_none", "int_at_least", "number", "one_of", "optional"]

T = TypeVar("T")


def int_at_least(name: str, value: Any, least: int) -> int:
    """``value`` when it is an int (not a bool) >= ``least``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        what = "a positive int" if least == 1 else f"an int >= {least}"
        raise PeeringValueError(f"{name} must be {what}, got {value!r}")
    return value


def number(
    name: str,
    value: Any,
    *,
    least: float | None = None,
    above: float | None = None,
    most: float | None = None,
    finite: bool = True,
) -> float:
    """``value`` as a float when it is a real number (not a bool) in the given range: ``least <= value``,
    ``above < value``, ``value <= most``; finite unless ``finite=False`` (NaN is never accepted)."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and not math.isnan(value)
    ok = ok and (not finite or math.isfinite(value))
    ok = ok and (least is None or value >= least) and (above is None or value > above)
    ok = ok and (most is None or value <= most)
    if not ok:
        bounds = [f">= {least:g}" if least is not None else "", f"> {above:g}" if above is not None else "",
                  f"<= {most:g}" if most is not None else ""]
        kind = "a finite number" if finite else "a number"
        raise PeeringValueError(f"{name} must be {' '.join([kind, *filter(None, bounds)])}, got {value!r}")
    return float(value)


def one_of(name: str, value: T, choices: Iterable[T]) -> T:
    """``value`` when it is one of ``choices``."""
    options = tuple(choices)
    if value not in options:
        listed = ", ".join(repr(c) for c in options)
        raise PeeringValueError(f"{name} must be one of {listed}; got {value!r}")
    return value


def optional(check: Callable[..., T], name: str, value: Any, *args: Any, **kwargs: Any) -> T | None:
    """None, or ``check(name, value, ...)``: ``optional(int_at_least, "cap", cap, 1)``."""
    return None if value is None else check(name, value, *args, **kwargs)


def callable_or_none(name: str, value: Any, takes: str) -> Any:
    """``value`` when it is None or callable; ``takes`` says what the callable maps (for the error)."""
    if value is not None and not callable(value):
        raise PeeringTypeError(f"{name} must be a callable {takes}, or None; got {value!r}")
    return value
