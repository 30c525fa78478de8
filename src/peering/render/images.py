"""Pictures of attributions on images: colour maps, explanation rows, the callback's confusion panels.

- An *image* is a float tensor [C, H, W] with C = 1 or 3 and values in [0, 1] (values outside are
  clamped, NaN shows as 0). A *flat* input is a feature vector [D]: it is shown as a near-square grid
  when D is a perfect square (64 -> 8x8, 784 -> 28x28) and as a 1-row strip [1, D] otherwise.
- Attributions are shown with a diverging colour map: negative values (the class wants *less* intensity
  there) dark, positive values (it wants *more*) bright, zero the middle of the map.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from peering.render._draw import _colorize, _compose, _infer_sample_ndim, _maps, _numpy, _rgb

if TYPE_CHECKING:  # only for type hints: render never imports the modules that produce these
    from peering.explain import Explanation

__all__ = ["confusion_panels", "diverging", "explanation_image", "to_rgb"]


def diverging(
    attribution: Tensor, scale: float | Tensor | None = None, *, flat: bool | None = None
) -> Tensor:
    """Attribution maps as colour pictures: uint8 RGB [..., H, W, 3].

    Args:
        attribution: [..., C, H, W] (C = 1 or 3), [..., H, W], or a flat feature vector [D] (shown as a
            near-square grid when D is a perfect square, else as a 1-row strip). Channels are summed,
            signs kept, into one map per picture. NaN counts as 0.
        scale: the value drawn at full colour: maps are divided by it and clipped to [-1, 1]. A float, or
            a tensor broadcastable to the leading dims (e.g. [B, 1] for one scale per row of [B, K, ...]).
            Default: each map's own max |value|. Zero (an all-zero map) is guarded: it renders neutral.
        flat: True when the last dim is a feature vector and all leading dims are batch dims ([B, D]);
            by default only a 1-D tensor is read as flat, and [B, H, W] is told from [C, H, W] by C in
            {1, 3}.

    Colours: matplotlib's 'cividis' (built once into a 256-entry table): -1 (the class wants less
    intensity) is dark blue, 0 the neutral grey in the middle, +1 (it wants more) bright yellow. Cividis
    was chosen because its lightness rises (nearly) linearly and it reads the same with colour blindness,
    so the sign survives any viewer. Value v in [-1, 1] goes to entry floor(128 (v + 1)), clipped to 255.

    >>> import torch
    >>> from peering.render import diverging
    >>> diverging(torch.rand(2, 3, 28, 28) - 0.5).shape
    torch.Size([2, 28, 28, 3])
    >>> diverging(torch.rand(64) - 0.5).shape  # a flat 64-vector is drawn as 8x8
    torch.Size([8, 8, 3])
    """
    maps = _maps(attribution, _infer_sample_ndim(attribution, flat))
    return torch.from_numpy(_colorize(maps, scale))


def to_rgb(images: Tensor, *, flat: bool | None = None) -> Tensor:
    """Images in [0, 1] as uint8 RGB [..., H, W, 3] (grey images repeated over the three channels).

    Args:
        images: [..., C, H, W] with C = 1 or 3, [..., H, W] (grey), or a flat vector [D] (drawn as in
            `diverging`). Values are clamped to [0, 1]; NaN shows as black.
        flat: True for a batch of flat vectors [..., D]; see `diverging`.

    >>> import torch
    >>> from peering.render import to_rgb
    >>> to_rgb(torch.rand(4, 1, 28, 28)).shape
    torch.Size([4, 28, 28, 3])
    >>> to_rgb(torch.rand(784)).shape
    torch.Size([28, 28, 3])
    """
    return torch.from_numpy(_rgb(images, _infer_sample_ndim(images, flat)))


def explanation_image(
    explanation: Explanation,
    inputs: Tensor,
    *,
    zoom: int = 4,
    shared_scale: bool = True,
    max_samples: int | None = 16,
) -> Image.Image:
    """One row per sample: the input, then its K attribution maps, each captioned "class: p=prob".

    Args:
        explanation: an `Explanation` (or any object with ``.attributions`` [B, K, *input_shape],
            ``.targets`` int64 [B, K] and ``.probabilities`` [B, C]).
        inputs: the explained inputs [B, *input_shape] (images in [0, 1] or flat vectors).
        zoom: integer nearest-neighbour magnification.
        shared_scale: one colour scale per row (the row's max |value|), so the K maps of a sample compare
            directly; False scales every map to its own max.
        max_samples: draw at most this many samples (the first ones); None for all.

    Samples skipped by ``explain`` (target -1) are drawn neutral and captioned "skipped".

    >>> import torch
    >>> from types import SimpleNamespace
    >>> from peering.render import explanation_image
    >>> x = torch.rand(3, 1, 28, 28)
    >>> probs = torch.rand(3, 10).softmax(1)
    >>> exp = SimpleNamespace(attributions=torch.rand(3, 2, 1, 28, 28) - 0.5,
    ...                       targets=probs.topk(2).indices, probabilities=probs)
    >>> explanation_image(exp, x).mode
    'RGB'
    """
    attributions, targets = explanation.attributions, explanation.targets
    if targets.ndim != 2 or attributions.shape[:2] != targets.shape:
        raise ValueError(
            f"attributions {tuple(attributions.shape)} and targets {tuple(targets.shape)} must start [B, K]"
        )
    if inputs.shape[0] != attributions.shape[0] or inputs.shape[1:] != attributions.shape[2:]:
        raise ValueError(
            f"inputs {tuple(inputs.shape)} do not match attributions {tuple(attributions.shape)} "
            "([B, K, ...])"
        )
    n = attributions.shape[0] if max_samples is None else min(attributions.shape[0], max_samples)
    if n < 1:
        raise ValueError("no samples to draw")
    sample_ndim = inputs.ndim - 1

    maps = _maps(attributions[:n], sample_ndim)  # [n, K, H, W]
    scale = np.abs(maps).max(axis=(1, 2, 3), initial=0.0)[:, None] if shared_scale else None
    tiles = np.concatenate([_rgb(inputs[:n], sample_ndim)[:, None], _colorize(maps, scale)], axis=1)

    t = targets[:n].detach().cpu().to(torch.int64)
    p = explanation.probabilities[:n].detach().cpu().float().gather(1, t.clamp_min(0))
    titles = [
        ["input"] + [f"{k}: p={q:.2f}" if k >= 0 else "skipped" for k, q in zip(ks, qs, strict=True)]
        for ks, qs in zip(t.tolist(), p.tolist(), strict=True)
    ]
    rows = _compose(tiles, titles, zoom=zoom)
    return Image.fromarray(rows.reshape(-1, rows.shape[2], 3))


def confusion_panels(
    images: Tensor,
    grad_a: Tensor,
    grad_b: Tensor,
    *,
    class_a: Tensor,
    class_b: Tensor,
    prob_a: Tensor,
    prob_b: Tensor,
    labels: Tensor | None,
    projection_factor: float,
    zoom: int = 4,
) -> Tensor:
    """One panel per confused sample, uint8 [N, H', W', 3], all the same size so they stack.

    Each panel is five captioned tiles in a row:

    1. the input, captioned with its true label ("label 3", or "label ?" without labels or for -1);
    2. and 3. the input gradients toward class a and class b ("→4 p=0.41", "→9 p=0.39"), drawn with
       `diverging` on ONE scale per sample (the larger max |value| of the two), so their strengths compare;
    4. and 5. where following each gradient leads: clamp(input + projection_factor * grad, 0, 1),
       captioned "x+f·∇4" and "x+f·∇9".

    Args:
        images: [N, ...] inputs in [0, 1] (images [N, C, H, W] or flat vectors [N, D]).
        grad_a, grad_b: [N, ...] gradients of the two classes' outputs w.r.t. the inputs.
        class_a, class_b: int [N]: the two classes. prob_a, prob_b: [N]: their probabilities.
        labels: int [N] true labels, or None.
        projection_factor: the step ``f`` along each gradient for tiles 4 and 5.
        zoom: integer nearest-neighbour magnification.

    The tensor work is vectorised over N; only the captions are drawn in a loop.

    >>> import torch
    >>> from peering.render import confusion_panels
    >>> x, ga, gb = torch.rand(4, 1, 28, 28), torch.randn(4, 1, 28, 28), torch.randn(4, 1, 28, 28)
    >>> confusion_panels(x, ga, gb, class_a=torch.tensor([4, 1, 3, 7]), class_b=torch.tensor([9, 7, 5, 1]),
    ...                  prob_a=torch.full((4,), 0.41), prob_b=torch.full((4,), 0.39), labels=None,
    ...                  projection_factor=0.5).shape
    torch.Size([4, 130, 572, 3])
    """
    if grad_a.shape != images.shape or grad_b.shape != images.shape:
        raise ValueError(
            f"images {tuple(images.shape)}, grad_a {tuple(grad_a.shape)} and grad_b {tuple(grad_b.shape)} "
            "must have the same shape"
        )
    sample_ndim = images.ndim - 1
    x, ga, gb = _numpy(images), _numpy(grad_a), _numpy(grad_b)

    maps = _maps(np.stack([ga, gb], axis=1), sample_ndim)  # [N, 2, H, W]
    scale = np.abs(maps).max(axis=(1, 2, 3), initial=0.0)[:, None]  # one per sample, shared by both maps
    projected = np.stack([x + projection_factor * ga, x + projection_factor * gb], axis=1)
    tiles = np.concatenate(
        [_rgb(x, sample_ndim)[:, None], _colorize(maps, scale), _rgb(projected, sample_ndim)], axis=1
    )  # [N, 5, H, W, 3]; _rgb clamps the projections to [0, 1]

    n = x.shape[0]
    ca, cb = class_a.reshape(n).tolist(), class_b.reshape(n).tolist()
    pa, pb = prob_a.detach().reshape(n).float().tolist(), prob_b.detach().reshape(n).float().tolist()
    ls = [-1] * n if labels is None else labels.reshape(n).tolist()
    titles = [
        [
            f"label {y}" if y >= 0 else "label ?",
            f"→{a} p={qa:.2f}",
            f"→{b} p={qb:.2f}",
            f"x+f·∇{a}",
            f"x+f·∇{b}",
        ]
        for y, a, b, qa, qb in zip(ls, ca, cb, pa, pb, strict=True)
    ]
    return torch.from_numpy(_compose(tiles, titles, zoom=zoom))
