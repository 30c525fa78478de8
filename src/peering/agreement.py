"""The older path of `peering.checks.agreement`, kept so that existing imports go on working."""

from peering.checks.agreement import (
    Agreement,
    agreement,
    noise_like,
)

__all__ = [
    "Agreement",
    "agreement",
    "noise_like",
]
