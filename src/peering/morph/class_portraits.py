"""Class portraits: what does the model think an 8 looks like?

`portraits` starts from one image (blank, noise, or the mean of some data) and morphs it toward every
class at once, one batch of as many samples as classes, with `morph`'s stopping rule and priors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from peering._model import check_inputs, class_scores, eval_mode
from peering.errors import PeeringTypeError, PeeringValueError
from peering.morph.ascent import MorphResult, morph

__all__ = ["portraits"]


def portraits(
    model: nn.Module | Sequence[nn.Module],
    start: Tensor,
    classes: Sequence[int] | Tensor | None = None,
    **options: Any,
) -> MorphResult:
    """Morph one start image toward each class, all classes in one batch.

    Args:
        model: the classifier (or a list of them, an ensemble), as for `peering.morph`.
        start: one input with a batch dimension of 1, e.g. ``images.mean(0, keepdim=True)`` (a blurry
            average digit: the usual choice), ``torch.zeros(1, 1, 28, 28)`` or noise.
        classes: the classes to portray (default: every class of the model), in that order.
        **options: passed on to `peering.morph` (``confidence``, ``smoothing``, ``prior``, ``steps``...).
            With the default ``confidence=0.99``, each portrait is the first image the model calls its
            class with 99% probability.

    Returns: the `MorphResult` of the batch: ``inputs[k]`` is the portrait of ``classes[k]``, ``frames``
    the way there.

    >>> import torch, peering
    >>> from peering.data import load_digits
    >>> from peering.models import DigitCNN, train_classifier
    >>> x, y = load_digits()
    >>> model = train_classifier(DigitCNN(image_size=8), x[:1500], y[:1500], epochs=10, lr=2e-3)
    >>> res = peering.portraits(model, x[:1500].mean(0, keepdim=True), steps=200)
    >>> res.inputs.shape, res.targets.tolist()
    (torch.Size([10, 1, 8, 8]), [0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    >>> bool(res.success.all())
    True
    """
    check_inputs(start)
    if start.shape[0] != 1:
        raise PeeringValueError(
            f"start must be one input with a batch dimension of 1, got shape {list(start.shape)}; e.g. "
            "images.mean(0, keepdim=True)"
        )
    if classes is None:
        first = model if isinstance(model, nn.Module) else next(iter(model), None)
        if not isinstance(first, nn.Module):
            raise PeeringTypeError(
                f"model must be a torch.nn.Module or a non-empty list of them, got {type(model).__name__}"
            )
        with eval_mode(first), torch.no_grad():
            n = class_scores(first, start, options.get("output_fn")).shape[1]
        targets = torch.arange(n, device=start.device)
    else:
        targets = torch.as_tensor(classes, device=start.device)
        if targets.ndim != 1 or targets.is_floating_point() or targets.dtype == torch.bool:
            raise PeeringTypeError(
                f"classes must be a list or 1-D integer tensor of classes, got {classes!r}"
            )
        targets = targets.to(torch.int64)
    inputs = start.expand(len(targets), *start.shape[1:]).contiguous()
    return morph(model, inputs, targets, **options)
