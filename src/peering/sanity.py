"""The older path of `peering.checks.sanity`, kept so that existing imports go on working."""

from peering.checks.sanity import (
    SanityResult,
    randomisation_check,
    spearman,
)

__all__ = [
    "SanityResult",
    "randomisation_check",
    "spearman",
]
