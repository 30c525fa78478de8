"""Pictures of a whole dataset's attributions: the mean attribution map of each class."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image
from torch import Tensor

from peering._validate import int_at_least
from peering.errors import PeeringValueError
from peering.render._draw import _colorize, _compose, _maps

__all__ = ["class_mean_maps"]


def class_mean_maps(
    means: Tensor,
    counts: Sequence[int] | Tensor,
    *,
    zoom: int = 4,
    per_row: int = 10,
) -> Image.Image:
    """One tile per class: its mean attribution map, captioned "class: n=count".

    Args:
        means: [C, *sample_shape]: for each class, the mean of the attributions toward it (e.g. over the
            samples whose top class it is): images [C, ch, H, W] (channels summed), maps [C, H, W], or
            flat vectors [C, D] (drawn as in `diverging`).
        counts: how many samples each mean is over; a class with 0 is drawn neutral, captioned "none".
        zoom: integer nearest-neighbour magnification.
        per_row: tiles per row.

    Each tile has its own colour scale (its max |value|): the pictures show where each class's evidence
    lies, not how strong it is compared with the other classes'.

    >>> import torch
    >>> from peering.render import class_mean_maps
    >>> class_mean_maps(torch.rand(10, 1, 8, 8) - 0.5, [3] * 9 + [0]).mode
    'RGB'
    """
    int_at_least("zoom", zoom, 1)
    if per_row < 1:
        raise PeeringValueError(f"per_row must be >= 1, got {per_row}")
    n = means.shape[0]
    counts = [int(c) for c in (counts.tolist() if isinstance(counts, Tensor) else counts)]
    if len(counts) != n or n == 0:
        raise PeeringValueError(f"need one count per class and at least one class, got {len(counts)} for {n}")
    if means.ndim not in (2, 3, 4):
        raise PeeringValueError(f"means must be [C, D], [C, H, W] or [C, ch, H, W], got {tuple(means.shape)}")
    maps = _maps(means, means.ndim - 1)
    maps[np.asarray(counts) == 0] = 0.0
    tiles = _colorize(maps, None)  # [C, H, W, 3], each its own scale
    rows = -(-n // per_row)
    cols = min(n, per_row)
    padded = np.full((rows * cols, *tiles.shape[1:]), 255, dtype=np.uint8)
    padded[:n] = tiles
    titles = [f"{c}: n={k}" if k else f"{c}: none" for c, k in enumerate(counts)]
    titles += [""] * (rows * cols - n)
    grid = _compose(
        padded.reshape(rows, cols, *tiles.shape[1:]),
        [titles[r * cols : (r + 1) * cols] for r in range(rows)],
        zoom=zoom,
    )
    return Image.fromarray(grid.reshape(-1, grid.shape[2], 3))
