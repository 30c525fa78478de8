"""Laying out finished pictures and writing them: `grid` of tiles, `save_png` (atomic)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from peering._files import atomic_write
from peering.errors import PeeringValueError
from peering.render._draw import _zoom
from peering.render.images import to_rgb

__all__ = ["grid", "save_png"]


def grid(tiles: Tensor, *, nrow: int, pad: int = 2, zoom: int = 1, pad_value: int = 255) -> Tensor:
    """Tiles uint8 [N, H, W, 3] laid out in one uint8 image [H', W', 3].

    ``nrow`` is the number of tiles per row (as in torchvision's ``make_grid``). Tiles are zoomed by
    nearest neighbour first, then separated and surrounded by ``pad`` pixels of ``pad_value``:
    H' = rows * (H * zoom + pad) + pad and W' = cols * (W * zoom + pad) + pad with cols = min(nrow, N)
    and rows = ceil(N / nrow). Unused cells of the last row are ``pad_value``.

    >>> import torch
    >>> from peering.render import diverging, grid
    >>> grid(diverging(torch.rand(10, 28, 28) - 0.5), nrow=4, zoom=2).shape
    torch.Size([176, 234, 3])
    """
    if tiles.ndim != 4:
        raise PeeringValueError(f"tiles must be [N, H, W, C], got shape {tuple(tiles.shape)}")
    if nrow < 1 or pad < 0:
        raise PeeringValueError(f"need nrow >= 1 and pad >= 0, got nrow={nrow}, pad={pad}")
    n, _, _, c = tiles.shape
    if n == 0:
        raise PeeringValueError("no tiles to lay out")
    zoomed = _zoom(tiles.detach().to(device="cpu", dtype=torch.uint8).numpy(), zoom)
    h, w = zoomed.shape[1:3]
    cols, rows = min(nrow, n), -(-n // nrow)
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), pad_value, dtype=np.uint8)
    body = out[: rows * (h + pad), : cols * (w + pad)].reshape(rows, h + pad, cols, w + pad, c)  # a view
    padded = np.full((rows * cols, h, w, c), pad_value, dtype=np.uint8)
    padded[:n] = zoomed
    body[:, pad:, :, pad:] = padded.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4)
    return torch.from_numpy(out)


def save_png(image: Image.Image | Tensor, path: str | os.PathLike[str]) -> Path:
    """Write a PNG atomically (temp file in the same folder, then ``os.replace``); create parent folders.

    ``image`` is a PIL image, a uint8 tensor [H, W, 3] or [H, W] (as `grid`, `diverging`, `to_rgb`
    return), or a float image [C, H, W] / [H, W] in [0, 1]. Returns the path written.

    >>> import tempfile, torch
    >>> from peering.render import diverging, save_png
    >>> save_png(diverging(torch.rand(28, 28) - 0.5), tempfile.mkdtemp() + "/map.png").name
    'map.png'
    """
    if isinstance(image, Tensor):
        t = image.detach().cpu()
        if t.dtype != torch.uint8:
            t = to_rgb(t)
        elif t.ndim == 3 and t.shape[-1] == 1:
            t = t[..., 0]
        image = Image.fromarray(t.contiguous().numpy())
    return atomic_write(path, lambda f: image.save(f, format="PNG", compress_level=3), fsync=True)
