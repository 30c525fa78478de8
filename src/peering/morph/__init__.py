"""Morphs: walk inputs up a class's gradient until the model is confident of it.

- `peering.morph.ascent`: `morph` and the `MorphResult` it returns;
- `peering.morph.priors`: what keeps a morph on the data (`Prototypes`, `TotalVariation`, `Jitter`, and
  the `Prior` base class for your own);
- `peering.morph.class_portraits`: `portraits`, what the model thinks each class looks like.

``peering.priors`` and ``peering.portraits`` are the same under their older names. The names are
resolved on first use (importing this package does not import torch).

>>> import torch
>>> from peering.morph import morph
>>> morph(torch.nn.Linear(64, 10), torch.rand(2, 64), 3, steps=2, confidence=None).inputs.shape
torch.Size([2, 64])
"""

from typing import TYPE_CHECKING

from peering._lazy import exports

if TYPE_CHECKING:
    from peering.morph import priors
    from peering.morph.ascent import MorphResult, morph
    from peering.morph.class_portraits import portraits

__all__ = ["MorphResult", "morph", "portraits", "priors"]

__getattr__ = exports(
    {
        "MorphResult": "peering.morph.ascent",
        "morph": "peering.morph.ascent",
        "portraits": "peering.morph.class_portraits",
        "priors": "peering.morph.priors",
    },
    __name__,
)
