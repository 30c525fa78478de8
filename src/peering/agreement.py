"""The older path of `peering.checks.agreement`, kept so that existing imports go on working
(its names are resolved on first use)."""

from typing import TYPE_CHECKING

from peering._lazy import exports

if TYPE_CHECKING:
    from peering.checks.agreement import Agreement, agreement, noise_like

__all__ = [
    "Agreement",
    "agreement",
    "noise_like",
]

__getattr__ = exports(dict.fromkeys(__all__, "peering.checks.agreement"), __name__)
