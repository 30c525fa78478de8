"""Shared drawing helpers of `peering.render`: the colour table, the font, array plumbing, captioned panels.

Private to the package: every picture module builds on these, nothing outside `peering.render` should.

The pixel work runs in NumPy, single-threaded, on purpose: torch hands arrays this size to its intra-op
thread pool, and on a machine whose cores are busy training that hand-off costs more than the work
(measured: 10x slower per panel with two busy cores). Tensors are converted once on the way in and out.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

_PAD = 2  # pixels of white between and around the tiles of a panel
_FONT_SIZE = 10  # pixels; captions stay readable at every zoom
_BACKGROUND = 255  # white; captions are black on it
_ASCII = str.maketrans({"→": "->", "∇": "grad ", "·": "*"})  # for a fallback font without these glyphs


# --------------------------------------------------------------------------------------------- cached assets


@functools.lru_cache(maxsize=1)
def _lut_np() -> np.ndarray:
    """The diverging colour map: matplotlib's 'cividis' sampled at 256 levels, uint8 [256, 3].

    Cividis runs from dark blue through a neutral grey to bright yellow with (nearly) linearly increasing
    lightness, and is readable with every common form of colour blindness. Mapping attribution -1 to its
    dark end and +1 to its bright end keeps the sign readable in grey-scale prints too, and zero lands on
    the unobtrusive grey in the middle.
    """
    import matplotlib  # lazy: only this table needs matplotlib

    rgba = matplotlib.colormaps["cividis"](np.linspace(0.0, 1.0, 256))
    lut = np.round(rgba[:, :3] * 255.0).astype(np.uint8)
    lut.flags.writeable = False
    return lut


def _lut() -> Tensor:
    """The colour table as a uint8 tensor [256, 3] (a copy)."""
    return torch.from_numpy(_lut_np().copy())


@functools.lru_cache(maxsize=4)
def _font(size: int = _FONT_SIZE) -> tuple[Any, bool]:
    """(font, has the arrows and nabla). DejaVu Sans (shipped with matplotlib) first, Pillow's default next.

    Pillow's ``ImageFont.load_default`` font has no glyphs for "→" or "∇" (they come out as boxes), so it
    is only the fallback, and with it captions are written in ASCII ("->4", "x+f*grad 4").
    """
    try:
        import matplotlib

        path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        return ImageFont.truetype(str(path), size), True
    except (ImportError, OSError):
        pass
    try:
        return ImageFont.load_default(size=size), False
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or no FreeType: the fixed bitmap font
        return ImageFont.load_default(), False


def _band_height(font: Any) -> int:
    """Height of the caption band above each tile."""
    if hasattr(font, "getmetrics"):
        ascent, descent = font.getmetrics()
        return ascent + descent + 1
    return font.getbbox("Ag→∇|")[3] + 2


# ------------------------------------------------------------------------------------------- pixel plumbing


def _infer_sample_ndim(x: Tensor, flat: bool | None) -> int:
    """How many trailing dims are one picture: 1 (flat [D]), 2 ([H, W]) or 3 ([C, H, W])."""
    if x.ndim == 0:
        raise ValueError("expected a tensor with at least one dimension, got a scalar")
    if flat:
        return 1
    if x.ndim == 1:
        return 1
    if x.ndim >= 3 and x.shape[-3] in (1, 3):
        return 3
    return 2


def _numpy(x: Tensor | np.ndarray) -> np.ndarray:
    """float32 NumPy view or copy of a tensor on any device (treat as read-only: it may share memory)."""
    if isinstance(x, Tensor):
        return x.detach().to(device="cpu", dtype=torch.float32).numpy()
    return np.asarray(x, dtype=np.float32)


def _canonical(x: Tensor | np.ndarray, sample_ndim: int) -> np.ndarray:
    """float32 [..., C, H, W] from pictures whose last ``sample_ndim`` dims are one picture."""
    if sample_ndim not in (1, 2, 3) or x.ndim < sample_ndim:
        raise ValueError(
            f"each picture must be [D], [H, W] or [C, H, W]; "
            f"got {sample_ndim} picture dims in {tuple(x.shape)}"
        )
    a = _numpy(x)
    if sample_ndim == 1:
        d = a.shape[-1]
        if d == 0:
            raise ValueError("cannot draw an empty feature vector")
        s = math.isqrt(d)
        h, w = (s, s) if s * s == d else (1, d)
        return a.reshape(*a.shape[:-1], 1, h, w)
    if sample_ndim == 2:
        return a[..., None, :, :]
    return a


def _maps(attribution: Tensor | np.ndarray, sample_ndim: int) -> np.ndarray:
    """Signed channel sums [..., H, W], float32, NaN -> 0 (so a skipped sample reads as neutral)."""
    return np.nan_to_num(_canonical(attribution, sample_ndim).sum(axis=-3), nan=0.0)


def _colorize(maps: np.ndarray, scale: float | Tensor | np.ndarray | None) -> np.ndarray:
    """uint8 [..., H, W, 3]: ``maps / scale`` clipped to [-1, 1] and looked up in the cividis table."""
    if scale is None:
        s = np.abs(maps).max(axis=(-2, -1), keepdims=True, initial=0.0)
    else:
        s = _numpy(scale) if isinstance(scale, Tensor) else np.asarray(scale, dtype=np.float32)
        lead = maps.shape[:-2]
        if s.ndim > len(lead) or np.broadcast_shapes(s.shape, lead) != lead:
            raise ValueError(
                f"scale {tuple(s.shape)} does not broadcast to the maps' leading dims {tuple(lead)}"
            )
        s = s[..., None, None]
    s = np.maximum(np.nan_to_num(s, nan=0.0), np.finfo(np.float32).tiny)  # zero map -> 0, not NaN
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        v = np.clip(maps / s, -1.0, 1.0)
    # 128 equal bins on each side: v in [k/128, (k+1)/128) -> entry 128 + k, so -v -> entry 255 - (128 + k)
    idx = np.floor((v + 1.0) * 128.0).astype(np.intp)
    np.clip(idx, 0, 255, out=idx)
    return _lut_np()[idx]


def _rgb(images: Tensor | np.ndarray, sample_ndim: int) -> np.ndarray:
    """uint8 [..., H, W, 3] from images in [0, 1]."""
    x = _canonical(images, sample_ndim)
    c = x.shape[-3]
    if c not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {c} (shape {tuple(images.shape)})")
    x = np.nan_to_num(x, nan=0.0)  # a copy: the caller's tensor is never written
    np.clip(x, 0.0, 1.0, out=x)
    x = np.rint(x * 255.0).astype(np.uint8)
    x = np.moveaxis(x, -3, -1)
    if c == 1:
        x = np.broadcast_to(x, (*x.shape[:-1], 3))
    return np.ascontiguousarray(x)


def _zoom(tiles: np.ndarray, zoom: int) -> np.ndarray:
    """Nearest-neighbour upscaling of [..., H, W, 3] by an integer factor, without loops."""
    if zoom < 1:
        raise ValueError(f"zoom must be a positive integer, got {zoom}")
    if zoom == 1:
        return tiles
    *lead, h, w, c = tiles.shape
    out = np.broadcast_to(tiles[..., :, None, :, None, :], (*lead, h, zoom, w, zoom, c))
    return out.reshape(*lead, h * zoom, w * zoom, c)


def _compose(tiles: np.ndarray, titles: Sequence[Sequence[str]], *, zoom: int) -> np.ndarray:
    """Panels uint8 [R, H', W', 3] from tiles uint8 [R, T, h, w, 3]: per row, T tiles side by side, each
    under its caption.

    Every cell is as wide as the widest caption or the zoomed tile, whichever is more, so all R panels
    have the same size; tiles are centred in their cells. Only the caption drawing loops.
    """
    n_rows, n_tiles, h, w, _ = tiles.shape
    h, w = h * zoom, w * zoom
    font, unicode_ok = _font()
    if not unicode_ok:
        titles = [[t.translate(_ASCII) for t in row] for row in titles]
    widths = [[font.getlength(t) for t in row] for row in titles]
    cell_w = max([w] + [math.ceil(x) + 2 for row in widths for x in row])
    band = _band_height(font)
    height = _PAD + band + h + _PAD
    step = cell_w + _PAD
    width = _PAD + n_tiles * step

    canvas = np.full((n_rows, height, width, 3), _BACKGROUND, dtype=np.uint8)
    cells = canvas[:, :, _PAD:].reshape(n_rows, height, n_tiles, step, 3)  # a view: splits one axis
    x0 = (cell_w - w) // 2
    # write the nearest-neighbour zoom straight into the canvas: split each zoomed axis into (pixel, copy)
    # (a view, as splitting one axis always is) and broadcast the tiles over the copies
    target = cells[:, _PAD + band : _PAD + band + h, :, x0 : x0 + w]
    target = target.reshape(n_rows, h // zoom, zoom, n_tiles, w // zoom, zoom, 3)
    target[...] = tiles.transpose(0, 2, 1, 3, 4)[:, :, None, :, :, None]
    if n_rows == 0 or not any(any(row) for row in titles):
        return canvas

    # captions go on a small grey-scale sheet of caption bands only (cheap to draw and convert), then are
    # blended in as dark text on the white bands: pixel = 255 - coverage
    sheet = Image.new("L", (width, n_rows * band), 0)
    draw = ImageDraw.Draw(sheet)
    for r, (row, row_widths) in enumerate(zip(titles, widths, strict=True)):
        for t, (text, tw) in enumerate(zip(row, row_widths, strict=True)):
            if text:
                draw.text((_PAD + t * step + (cell_w - tw) / 2, r * band), text, fill=255, font=font)
    coverage = np.asarray(sheet).reshape(n_rows, band, width, 1)
    canvas[:, _PAD : _PAD + band] = _BACKGROUND - coverage
    return canvas
