"""peering: look inside a classifier with input gradients.

- `explain`: the input gradients (or another attribution) of a batch's top-k classes, in one batched pass.
- `morph`: gradient-ascent steps on the input until the model is confident of a chosen class, with priors
  (`peering.priors`) that keep the change on the data; `agreement` checks it with independent judges.
- `portraits`: what the model thinks each class looks like, all classes in one batch.
- `select_confused`: the samples whose top two classes are nearly tied.
- `randomisation_check` and `deletion_insertion`: can the maps be trusted?
- `peering.lightning.ConfusedLogitCallback`: watch what confuses a model while it trains.
- `peering.lightning.AttributionWriter` and `load_attributions`: a whole dataset's attributions, on every
  device, as shards on disk read back in dataset order.
- `peering.render`: pictures of all of the above.
- `PeeringError`: the base class of every error peering raises on purpose.

Where things live: `peering.attribution` (the engine, the methods, `explain`), `peering.morph` (morphs,
priors, portraits), `peering.checks` (sanity, faithfulness, agreement), `peering.data` (MNIST, digits,
image files, normalisation), `peering.render` (pictures), `peering.lightning` (callbacks and the dataset
writer), `peering.report` (the HTML report), `peering.runs` (the run folder's files), `peering.cli` and
`peering.demo` (the command line and the demo, which nothing in the library imports).

The names below are resolved on first use, so ``import peering`` (and ``peering --help``) does not import
torch until something needs it.
"""

import importlib
from typing import TYPE_CHECKING

from peering._lazy import exports
from peering.errors import PeeringError

if TYPE_CHECKING:
    from peering import priors, render
    from peering.attribution import (
        AttributionMethod,
        ConfusedSamples,
        Explanation,
        Gradient,
        InputXGradient,
        IntegratedGradients,
        SmoothGrad,
        explain,
        select_confused,
    )
    from peering.checks import (
        Agreement,
        DeletionInsertion,
        SanityResult,
        agreement,
        deletion_insertion,
        randomisation_check,
    )
    from peering.memory import MemoryBudget
    from peering.morph import MorphResult, morph, portraits
    from peering.store import DatasetAttributions, load_attributions

__version__ = "0.2.0"

__all__ = [
    "Agreement",
    "AttributionMethod",
    "ConfusedSamples",
    "DatasetAttributions",
    "DeletionInsertion",
    "Explanation",
    "Gradient",
    "InputXGradient",
    "IntegratedGradients",
    "MemoryBudget",
    "MorphResult",
    "PeeringError",
    "SanityResult",
    "SmoothGrad",
    "agreement",
    "deletion_insertion",
    "explain",
    "load_attributions",
    "morph",
    "portraits",
    "priors",
    "randomisation_check",
    "render",
    "select_confused",
]

_WHERE = {
    **dict.fromkeys(
        ("AttributionMethod", "ConfusedSamples", "Explanation", "Gradient", "InputXGradient",
         "IntegratedGradients", "SmoothGrad", "explain", "select_confused"),
        "peering.attribution",
    ),
    **dict.fromkeys(
        ("Agreement", "DeletionInsertion", "SanityResult", "agreement", "deletion_insertion",
         "randomisation_check"),
        "peering.checks",
    ),
    **dict.fromkeys(("MorphResult", "morph"), "peering.morph.ascent"),
    "portraits": "peering.morph.class_portraits",
    "MemoryBudget": "peering.memory",
    **dict.fromkeys(("DatasetAttributions", "load_attributions"), "peering.store"),
    "priors": "peering.priors",
    "render": "peering.render",
}
# Four submodules share their name with the function they hold (peering.explain, morph, portraits,
# agreement). They are light (lazy themselves): load them first and drop the attribute the import set, so
# that ``peering.explain`` is always the function (from __getattr__), even after ``import peering.explain``.
for _name in ("agreement", "explain", "morph", "portraits"):
    importlib.import_module(f"{__name__}.{_name}")
    del globals()[_name]
del _name

__getattr__ = exports(_WHERE, __name__)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
