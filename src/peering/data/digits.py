"""scikit-learn's bundled 8x8 digits, and a seeded train/test split.

Images come back as float32 tensors `[N, 1, H, W]` with pixels in `[0, 1]` and labels as int64 `[N]`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from peering.errors import PeeringValueError

__all__ = ["load_digits", "train_test_split"]


def load_digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's bundled 8x8 digits (1,797 of them; no download needed).

    Returns:
        `(images, labels)`: float32 `[1797, 1, 8, 8]` with pixels in `[0, 1]` (the 0-16 counts divided by
        16), and int64 `[1797]`.

    >>> x, y = load_digits()
    >>> tuple(x.shape), x.dtype, float(x.max()), tuple(y.shape), y.dtype
    ((1797, 1, 8, 8), torch.float32, 1.0, (1797,), torch.int64)
    """
    from sklearn.datasets import load_digits as sklearn_load_digits

    bunch = sklearn_load_digits()
    images = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / 16.0).unsqueeze(1)
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    return images.contiguous(), labels


def train_test_split(
    images: Tensor,
    labels: Tensor,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Shuffle deterministically and split into `(train_x, train_y, test_x, test_y)`.

    Uses its own `torch.Generator` seeded with `seed`, so the global RNG is neither used nor changed and
    the same `seed` always gives the same split.

    >>> x, y = load_digits()
    >>> train_x, train_y, test_x, test_y = train_test_split(x, y, test_fraction=0.25)
    >>> len(train_x), len(test_x)
    (1348, 449)
    """
    n = len(images)
    if len(labels) != n:
        raise PeeringValueError(f"images and labels differ in length: {n} vs {len(labels)}")
    if not 0.0 <= test_fraction <= 1.0:
        raise PeeringValueError(f"test_fraction must be in [0, 1], got {test_fraction}")
    n_test = int(round(n * test_fraction))
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    test_idx, train_idx = order[:n_test], order[n_test:]
    return images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]
