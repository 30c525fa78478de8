"""The older path of `peering.morph.priors`, kept so that existing imports go on working."""

from peering.morph.priors import Jitter, Noise, Prior, PriorState, Prototypes, TotalVariation, smooth

__all__ = ["Jitter", "Noise", "Prior", "PriorState", "Prototypes", "TotalVariation", "smooth"]
