"""peering: look inside a classifier with input gradients.

- `explain`: the input gradients (or another attribution) of a batch's top-k classes, in one batched pass.
- `morph`: gradient-ascent steps on the input until the model is confident of a chosen class, with priors
  (`peering.priors`) that keep the change on the data; `agreement` checks it with independent judges.
- `portraits`: what the model thinks each class looks like, all classes in one batch.
- `select_confused`: the samples whose top two classes are nearly tied.
- `peering.lightning.ConfusedLogitCallback`: watch what confuses a model while it trains.
- `peering.lightning.AttributionWriter` and `load_attributions`: a whole dataset's attributions, on every
  device, as shards on disk read back in dataset order.
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
from peering.store import DatasetAttributions, load_attributions

__version__ = "0.2.0"

__all__ = [
    "Agreement",
    "AttributionMethod",
    "ConfusedSamples",
    "DatasetAttributions",
    "Explanation",
    "Gradient",
    "InputXGradient",
    "IntegratedGradients",
    "MorphResult",
    "SmoothGrad",
    "agreement",
    "explain",
    "load_attributions",
    "morph",
    "portraits",
    "priors",
    "render",
    "select_confused",
]
