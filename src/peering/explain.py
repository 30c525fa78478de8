"""The older path of `peering.attribution.explanation`, kept so that existing imports go on working
(its names are resolved on first use)."""

from typing import TYPE_CHECKING

from peering._lazy import exports

if TYPE_CHECKING:
    from peering.attribution.explanation import Explanation, explain

__all__ = [
    "Explanation",
    "explain",
]

__getattr__ = exports(dict.fromkeys(__all__, "peering.attribution.explanation"), __name__)
