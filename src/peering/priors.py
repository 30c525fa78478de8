"""The older path of `peering.morph.priors`, kept so that existing imports go on working (the generative
prior's names, from `peering.morph.generative`, are resolved on first use)."""

from typing import TYPE_CHECKING

from peering._lazy import exports
from peering.morph.priors import (
    Generative,
    Jitter,
    Noise,
    Prior,
    PriorState,
    Prototypes,
    TotalVariation,
    smooth,
)

if TYPE_CHECKING:
    from peering.morph.generative import Autoencoder, LatentShift, train_autoencoder

__all__ = [
    "Autoencoder",
    "Generative",
    "Jitter",
    "LatentShift",
    "Noise",
    "Prior",
    "PriorState",
    "Prototypes",
    "TotalVariation",
    "smooth",
    "train_autoencoder",
]

__getattr__ = exports(
    dict.fromkeys(("Autoencoder", "LatentShift", "train_autoencoder"), "peering.morph.generative"), __name__
)
