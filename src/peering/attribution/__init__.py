"""Attributions: which input elements raise (or lower) each explained class's output.

- `peering.attribution.engine`: `ClassGradients`, the batched class-gradient engine every method uses;
- `peering.attribution.methods`: the methods (`Gradient`, `InputXGradient`, `SmoothGrad`,
  `IntegratedGradients`) and the `AttributionMethod` base class for your own;
- `peering.attribution.explanation`: `explain` and the `Explanation` it returns;
- `peering.attribution.confusion`: which samples confuse the model, which classes it mixes up, and the
  direction that turns one into the other.

>>> import torch
>>> from peering.attribution import explain
>>> explain(torch.nn.Linear(4, 3), torch.rand(2, 4)).targets.shape
torch.Size([2, 2])
"""

from peering.attribution.confusion import (
    ConfusedSamples,
    confusion_margins,
    pair_directions,
    select_confused,
    top_confused_pairs,
)
from peering.attribution.engine import ClassGradients, GradStrategy, top_classes
from peering.attribution.explanation import Explanation, explain
from peering.attribution.methods import (
    METHODS,
    AttributionMethod,
    Gradient,
    InputXGradient,
    IntegratedGradients,
    SmoothGrad,
    make_method,
)

__all__ = [
    "METHODS",
    "AttributionMethod",
    "ClassGradients",
    "ConfusedSamples",
    "confusion_margins",
    "Explanation",
    "GradStrategy",
    "Gradient",
    "InputXGradient",
    "IntegratedGradients",
    "SmoothGrad",
    "explain",
    "make_method",
    "pair_directions",
    "select_confused",
    "top_classes",
    "top_confused_pairs",
]
