"""peering: look inside a classifier with input gradients.

- `explain`: the input gradients (or another attribution) of a batch's top-k classes, in one batched pass.
- `morph`: gradient-ascent steps on the input until the model is confident of a chosen class, with priors
  (`peering.priors`) that keep the change on the data; `agreement` checks it with independent judges.
- `portraits`: what the model thinks each class looks like, all classes in one batch.
- `select_confused`: the samples whose top two classes are nearly tied.
- `peering.lightning.ConfusedLogitCallback`: watch what confuses a model while it trains.
- `peering.render`: pictures of all of the above.
"""

from peering import priors, render
from peering.agreement import Agreement, agreement
from peering.confusion import ConfusedSamples, select_confused
from peering.explain import Explanation, explain
from peering.methods import (
    AttributionMethod,
    Gradient,
    InputXGradient,
    IntegratedGradients,
    SmoothGrad,
)
from peering.morph import MorphResult, morph
from peering.portraits import portraits

__version__ = "0.1.0"

__all__ = [
    "Agreement",
    "AttributionMethod",
    "ConfusedSamples",
    "Explanation",
    "Gradient",
    "InputXGradient",
    "IntegratedGradients",
    "MorphResult",
    "SmoothGrad",
    "agreement",
    "explain",
    "morph",
    "portraits",
    "priors",
    "render",
    "select_confused",
]
