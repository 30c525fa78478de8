"""The older path of `peering.morph.class_portraits`, kept so that existing imports go on working
(its names are resolved on first use)."""

from typing import TYPE_CHECKING

from peering._lazy import exports

if TYPE_CHECKING:
    from peering.morph.class_portraits import portraits

__all__ = [
    "portraits",
]

__getattr__ = exports(dict.fromkeys(__all__, "peering.morph.class_portraits"), __name__)
