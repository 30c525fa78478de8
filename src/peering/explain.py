"""The older path of `peering.attribution.explanation`, kept so that existing imports go on working."""

from peering.attribution.explanation import (
    Explanation,
    explain,
)

__all__ = [
    "Explanation",
    "explain",
]
