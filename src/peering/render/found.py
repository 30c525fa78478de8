"""Pictures of what `peering.lightning.LabelIssues` and `ShortcutAlarm` found while a model trained.

- `headed_panels`: panels (e.g. `confusion_panels`' of the most suspect labels) with one line of text
  above each ("#4711 given 3, the model says 5 from epoch 2 on");
- `map_change`: one class's mean attribution map before training and now, on one scale, next to
  where the probe carries signal with the alarmed patch in red, and the alarm's sentence under them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from peering.errors import PeeringValueError
from peering.render._draw import _colorize, _compose, _numpy
from peering.render.confusion import _header

__all__ = ["headed_panels", "map_change"]

_PATCH = np.array([214, 39, 40], dtype=np.uint8)  # the alarmed patch (matplotlib's tab:red)
_SIGNAL = np.array([200, 200, 200], dtype=np.uint8)  # pixels where the probe carries signal


def headed_panels(panels: Tensor | np.ndarray, headers: Sequence[str]) -> Tensor:
    """Panels uint8 [N, H, W, 3] with a line of text above each: uint8 [N, H + band, W', 3].

    >>> import torch
    >>> headed_panels(torch.zeros(2, 10, 30, 3, dtype=torch.uint8), ["first", "second"]).shape[0]
    2
    """
    array = panels.numpy() if isinstance(panels, Tensor) else np.asarray(panels)
    if array.ndim != 4 or len(headers) != array.shape[0]:
        raise PeeringValueError(f"need one header per panel, got {len(headers)} for {array.shape[:1]}")
    return torch.from_numpy(_header(array.astype(np.uint8), list(headers)))


def map_change(
    before: Tensor,
    after: Tensor,
    *,
    signal: Tensor | None = None,
    patch: tuple[int, int, int, int] | None = None,
    titles: tuple[str, str] = ("before", "now"),
    note: str = "",
    zoom: int = 4,
) -> Tensor:
    """One class's mean map [H, W] before (training, say) and now, on ONE colour scale (the larger max
    |value| of the two), then the signal region (bool [H, W]: grey where the probe varies, white where it
    is constant) with ``patch`` ((row, column, height, width)) in red; ``note`` under the row. Returns
    uint8 [H', W', 3].

    >>> import torch
    >>> m = torch.rand(8, 8)
    >>> map_change(m, m, signal=torch.ones(8, 8, dtype=torch.bool), patch=(0, 0, 2, 2), zoom=2).dtype
    torch.uint8
    """
    if before.shape != after.shape or before.ndim != 2:
        raise PeeringValueError(f"before and after must be maps [H, W], got {tuple(before.shape)} and "
                                f"{tuple(after.shape)}")
    maps = np.nan_to_num(np.stack([_numpy(before), _numpy(after)]).astype(np.float32), nan=0.0)
    scale = float(np.abs(maps).max())
    tiles = [*_colorize(maps, np.full(2, scale, dtype=np.float32))]
    names = list(titles)
    if signal is not None or patch is not None:
        where = np.full((*maps.shape[1:], 3), 255, dtype=np.uint8)
        if signal is not None:
            where[_numpy(signal).astype(bool)] = _SIGNAL
        if patch is not None:
            r, c, h, w = patch
            where[r : r + h, c : c + w] = _PATCH
        tiles.append(where)
        names.append("patch (red)")
    stacked = np.stack(tiles)[None]  # [1, T, H, W, 3]
    panel = _compose(stacked, [names], zoom=zoom, notes=[note] if note else None)
    return torch.from_numpy(panel[0])
