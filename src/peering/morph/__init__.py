"""Morphs: walk inputs up a class's gradient until the model is confident of it.

- `peering.morph.ascent`: `morph` and the `MorphResult` it returns;
- `peering.morph.priors`: what keeps a morph on the data (`Prototypes`, `TotalVariation`, `Jitter`, and
  the `Prior` base class for your own);
- `peering.morph.portraits`: `portraits`, what the model thinks each class looks like.

``peering.priors`` and ``peering.portraits`` are the same modules under their older names.

>>> import torch
>>> from peering.morph import morph
>>> morph(torch.nn.Linear(64, 10), torch.rand(2, 64), 3, steps=2, confidence=None).inputs.shape
torch.Size([2, 64])
"""

from peering.morph import priors
from peering.morph.ascent import MorphResult, morph
from peering.morph.portraits import portraits

__all__ = ["MorphResult", "morph", "portraits", "priors"]
