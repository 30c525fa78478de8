"""The older path of `peering.attribution.confusion`, kept so that existing imports go on working."""

from peering.attribution.confusion import (
    ConfusedSamples,
    pair_directions,
    select_confused,
    top_confused_pairs,
)

__all__ = [
    "ConfusedSamples",
    "pair_directions",
    "select_confused",
    "top_confused_pairs",
]
