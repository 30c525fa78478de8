"""The older path of `peering.morph.portraits`, kept so that existing imports go on working."""

from peering.morph.portraits import (
    portraits,
)

__all__ = [
    "portraits",
]
