"""Pictures of the confusion atlas: the confusion matrix, and the confused pairs with their directions.

- `confusion_matrix_image`: a [C, C] matrix of counts (rows: true class, columns: predicted class) as a
  heat map with the counts written in. Correct answers (the diagonal) are grey; each mistake is coloured
  by the share of its true class it takes, on its own scale (the largest mistake darkest), so the
  confusions stand out even when the diagonal holds nearly everything. Chosen pairs can be outlined.
- `confused_pair_panels`: one panel per pair (true a, predicted b): a line saying how often it happened,
  the examples with the probability the model gave b, and the pair's direction (the mean gradient of
  log p(b) - log p(a)) on the diverging map every attribution uses.

Drawn with NumPy and Pillow like the rest of `peering.render` (no matplotlib figure); only the text is
drawn in a loop.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from peering.errors import PeeringValueError
from peering.render._draw import (
    _ASCII,
    _BACKGROUND,
    _PAD,
    _colorize,
    _compose,
    _font,
    _maps,
    _numpy,
    _rgb,
    scale_caption,
)
from peering.render._legend import above, legend_band

__all__ = ["confused_pair_panels", "confusion_matrix_image"]

_HIGHLIGHT = (214, 39, 40)  # the outline of chosen cells (matplotlib's tab:red)
_GRID = 200  # grey of the lines between cells
_MUTED = (87, 96, 106)  # axis names
_MAX_NUMBERED = 30  # classes up to which counts are written in the cells


@functools.lru_cache(maxsize=1)
def _mistake_lut() -> np.ndarray:
    """The sequential map of the mistakes: matplotlib's 'OrRd' at 256 levels, uint8 [256, 3]."""
    import matplotlib  # lazy, as for the diverging table

    rgba = matplotlib.colormaps["OrRd"](np.linspace(0.0, 1.0, 256))
    lut = np.round(rgba[:, :3] * 255.0).astype(np.uint8)
    lut.flags.writeable = False
    return lut


def _text(font: Any, unicode_ok: bool, text: str) -> str:
    return text if unicode_ok else text.translate(_ASCII)


def _line_height(font: Any) -> int:
    if hasattr(font, "getmetrics"):
        ascent, descent = font.getmetrics()
        return int(ascent + descent)
    return int(font.getbbox("Ag")[3]) + 1


def confusion_matrix_image(
    matrix: Tensor,
    *,
    highlight: Tensor | None = None,
    title: str | None = None,
    class_names: Sequence[str] | None = None,
) -> Tensor:
    """A confusion matrix as a picture: uint8 RGB [H, W, 3].

    Args:
        matrix: int counts [C, C]; row i, column j: samples of true class i predicted as j (the layout of
            torchmetrics' ``MulticlassConfusionMatrix``).
        highlight: int [P, 2] (true, predicted) cells to outline in red, e.g. the top confused pairs.
        title: a line of text above the matrix.
        class_names: C names for the rows and columns (default: 0 .. C-1).

    Colours: the diagonal (correct) in greys, darker for a class the model gets more often right; every
    other non-zero cell on matplotlib's 'OrRd' map by the share of its row (true class) it holds, scaled
    so that the largest such share is the darkest; empty cells white. A line under the matrix says what
    the darkest colour stands for. Counts are written in the cells for up to 30 classes.

    >>> import torch
    >>> from peering.render import confusion_matrix_image
    >>> m = torch.tensor([[50, 3, 0], [1, 40, 9], [0, 2, 45]])
    >>> confusion_matrix_image(m, highlight=torch.tensor([[1, 2]]), title="epoch 3").shape[2]
    3
    """
    m, names = _checked(matrix, class_names)
    c = m.shape[0]
    font, unicode_ok = _font()
    line = _line_height(font)
    numbered = c <= _MAX_NUMBERED
    rows = m.sum(axis=1, keepdims=True)
    share = m / np.maximum(rows, 1)
    mistakes = share.copy()
    np.fill_diagonal(mistakes, 0.0)
    darkest = float(mistakes.max(initial=0.0))
    title = _text(font, unicode_ok, title) if title else None
    legend = (
        f"colour: share of the true class, darkest {darkest:.1%}"
        + (" · outlined: top pairs" if highlight is not None and len(highlight) else "")
        if darkest > 0
        else "no mistakes"
    )
    legend = _text(font, unicode_ok, legend)
    g = _geometry(m, names, font, line, numbered, title, legend)

    # cells: vectorised colours
    colours = _mistake_lut()[np.clip(np.rint(mistakes / max(darkest, 1e-12) * 255.0), 0, 255).astype(np.intp)]
    colours[m == 0] = _BACKGROUND
    diagonal = np.arange(c)
    grey = np.rint(235.0 - 100.0 * np.diag(share)).astype(np.uint8)
    colours[diagonal, diagonal] = np.where(rows[:, 0] > 0, grey, _BACKGROUND)[:, None]
    canvas = np.full((g.height, g.width, 3), _BACKGROUND, dtype=np.uint8)
    top, left, cell = g.top, g.left, g.cell
    canvas[top : top + c * cell, left : left + c * cell] = np.repeat(np.repeat(colours, cell, 0), cell, 1)
    edges = left + np.arange(c + 1) * cell
    canvas[top : top + c * cell + 1, edges] = _GRID
    canvas[top + np.arange(c + 1) * cell, left : left + c * cell + 1] = _GRID
    if highlight is not None:
        _outline(canvas, highlight, g, c)
    image = Image.fromarray(canvas)
    _write_text(image, m, names, colours if numbered else None, g, font, line, title, legend)
    return torch.from_numpy(np.asarray(image).copy())


def _checked(matrix: Any, class_names: Sequence[str] | None) -> tuple[np.ndarray, list[str]]:
    """The counts as an int64 array [C, C] and the C class names, or a clear error."""
    if not isinstance(matrix, Tensor) or matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        shape = tuple(matrix.shape) if isinstance(matrix, Tensor) else type(matrix).__name__
        raise PeeringValueError(f"matrix must be a square [C, C] tensor of counts, got {shape}")
    m = matrix.detach().to("cpu", torch.int64).numpy()
    c = m.shape[0]
    if c == 0:
        raise PeeringValueError("matrix has no classes")
    if (m < 0).any():
        raise PeeringValueError("matrix must hold counts (>= 0)")
    names = [str(i) for i in range(c)] if class_names is None else [str(n) for n in class_names]
    if len(names) != c:
        raise PeeringValueError(f"{len(names)} class names for {c} classes")
    return m, names


@dataclass(frozen=True)
class _Geometry:
    """Where the matrix's parts go: the cells' size, the matrix's top-left corner, the picture's size, the
    title's band."""

    cell: int
    left: int
    top: int
    width: int
    height: int
    title_h: int


def _geometry(
    m: np.ndarray, names: list[str], font: Any, line: int, numbered: bool, title: str | None, legend: str
) -> _Geometry:
    c = m.shape[0]
    widest = max(font.getlength(str(int(v))) for v in m.flatten()) if numbered else 0.0
    cell = max(int(math.ceil(widest)) + 6, line + 6) if numbered else max(6, line // 2 + 2)
    label_w = int(math.ceil(max(font.getlength(n) for n in names))) + 6
    title_h = line + 4 if title else 0
    left = _PAD + line + 4 + label_w  # "true", written upwards, then the row names
    top = _PAD + title_h + line + 2 + line + 2  # title, "predicted", the column names
    body_w = c * cell + 1
    width = max(
        left + body_w + _PAD,
        _PAD * 2 + int(math.ceil(font.getlength(legend))),
        _PAD * 2 + int(math.ceil(font.getlength(title))) if title else 0,
    )
    return _Geometry(cell, left, top, width, top + body_w + 4 + line + _PAD, title_h)


def _outline(canvas: np.ndarray, highlight: Tensor, g: _Geometry, c: int) -> None:
    """Outline the (true, predicted) cells ``highlight`` [P, 2] in red: a loop over P cells, not pixels."""
    cells = highlight.detach().to("cpu", torch.int64).reshape(-1, 2).numpy()
    if cells.size and (cells.min() < 0 or cells.max() >= c):
        raise PeeringValueError(f"highlight has cells outside the {c} x {c} matrix")
    cell = g.cell
    for a, b in cells:
        y0, x0 = g.top + a * cell, g.left + b * cell
        canvas[y0 : y0 + 2, x0 : x0 + cell + 1] = _HIGHLIGHT
        canvas[y0 + cell - 1 : y0 + cell + 1, x0 : x0 + cell + 1] = _HIGHLIGHT
        canvas[y0 : y0 + cell + 1, x0 : x0 + 2] = _HIGHLIGHT
        canvas[y0 : y0 + cell + 1, x0 + cell - 1 : x0 + cell + 1] = _HIGHLIGHT


def _write_text(
    image: Image.Image,
    m: np.ndarray,
    names: list[str],
    colours: np.ndarray | None,
    g: _Geometry,
    font: Any,
    line: int,
    title: str | None,
    legend: str,
) -> None:
    """The title, the axes' names, the class names and (with ``colours``: up to 30 classes) the counts."""
    c, cell, top, left = m.shape[0], g.cell, g.top, g.left
    draw = ImageDraw.Draw(image)
    if title:
        draw.text((_PAD, _PAD), title, fill=(0, 0, 0), font=font)
    y_axis = _PAD + g.title_h
    draw.text(
        (left + (c * cell - font.getlength("predicted")) / 2, y_axis), "predicted", fill=_MUTED, font=font
    )
    if colours is not None:  # beyond 30 classes the cells are too small for names; the axes stay named
        for j, name in enumerate(names):
            column = (left + j * cell + (cell - font.getlength(name)) / 2, y_axis + line + 2)
            draw.text(column, name, fill=(0, 0, 0), font=font)
        for i, name in enumerate(names):
            row = (left - 4 - font.getlength(name), top + i * cell + (cell - line) / 2)
            draw.text(row, name, fill=(0, 0, 0), font=font)
    word = Image.new("L", (int(math.ceil(font.getlength("true"))) + 2, line), 0)
    ImageDraw.Draw(word).text((0, 0), "true", fill=255, font=font)
    word = word.rotate(90, expand=True)
    image.paste(_MUTED, (_PAD, top + (c * cell - word.size[1]) // 2), word)
    if colours is not None:
        luminance = colours.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        for i, j in zip(*np.nonzero(m), strict=True):
            text = str(int(m[i, j]))
            ink = (255, 255, 255) if luminance[i, j] < 120 else (0, 0, 0)
            xy = (left + j * cell + (cell - font.getlength(text)) / 2, top + i * cell + (cell - line) / 2)
            draw.text(xy, text, fill=ink, font=font)
    draw.text((_PAD, top + c * cell + 4), legend, fill=_MUTED, font=font)


def _header(panels: np.ndarray, headers: Sequence[str]) -> np.ndarray:
    """Panels [N, H, W, 3] with a line of text above each: [N, H + band, W', 3] (W' fits the widest)."""
    font, unicode_ok = _font()
    headers = [_text(font, unicode_ok, t) for t in headers]
    band = _line_height(font) + 3
    n, h, w, _ = panels.shape
    width = max([w] + [int(math.ceil(font.getlength(t))) + 2 * _PAD for t in headers])
    out = np.full((n, band + h, width, 3), _BACKGROUND, dtype=np.uint8)
    out[:, band:, :w] = panels
    sheet = Image.new("L", (width, n * band), 0)
    draw = ImageDraw.Draw(sheet)
    for i, text in enumerate(headers):
        draw.text((_PAD, i * band + 2), text, fill=255, font=font)
    out[:, :band] = _BACKGROUND - np.asarray(sheet).reshape(n, band, width, 1)
    return out


def _direction_caption(a: int, b: int, scale: float, missing: bool) -> str:
    return "no example" if missing else f"∇ log p{b} - log p{a}\n{scale_caption(scale)}"


def confused_pair_panels(
    examples: Tensor,
    pair_index: Tensor,
    directions: Tensor,
    pairs: Tensor,
    *,
    counts: Tensor | None = None,
    totals: Tensor | None = None,
    probabilities: Tensor | None = None,
    per_pair: int | None = None,
    zoom: int = 4,
) -> Tensor:
    """One panel per confused pair, uint8 [P, H, W, 3], all the same size so they stack.

    Each panel is a line of text ("true 4, predicted 9: 23 samples (5.1% of the 4s)"), then ``per_pair``
    example tiles (captioned with p(b), the probability the model gave the wrong class; an empty slot
    when a pair has fewer examples) and the pair's direction drawn with the diverging map of
    `peering.render.diverging` on its own scale: bright where more intensity turns an a into a b, dark
    where less does, its scale stated under it ("scale ±0.012": the value drawn at full colour) and in a
    colour legend above. A direction that is all NaN (no example to average) is drawn neutral and captioned
    "no example".

    Args:
        examples: [n, ...] the examples of all pairs (images in [0, 1] or flat vectors).
        pair_index: int [n]: the pair of each example (0 <= index < P); an example's slot is its rank
            among its pair's examples in this order.
        directions: [P, ...] one map per pair (same sample shape as the examples).
        pairs: int [P, 2]: (true a, predicted b).
        counts: [P] how often each mistake happened; totals: [P] samples of each pair's true class.
        probabilities: [n] p(b) of each example.
        per_pair: example slots per panel (default: the most examples any pair has).
        zoom: integer nearest-neighbour magnification.

    >>> import torch
    >>> from peering.render import confused_pair_panels
    >>> panels = confused_pair_panels(torch.rand(3, 1, 8, 8), torch.tensor([0, 0, 1]),
    ...                               torch.randn(2, 1, 8, 8), torch.tensor([[4, 9], [7, 1]]),
    ...                               counts=torch.tensor([12, 5]), totals=torch.tensor([100, 98]))
    >>> panels.shape[0], panels.shape[3]
    (2, 3)
    """
    p = int(pairs.shape[0]) if isinstance(pairs, Tensor) and pairs.ndim == 2 else -1
    if p < 1 or pairs.shape[1] != 2:
        raise PeeringValueError(
            f"pairs must be an int [P, 2] tensor with P >= 1, got {getattr(pairs, 'shape', pairs)}"
        )
    if directions.shape[0] != p:
        raise PeeringValueError(f"{directions.shape[0]} directions for {p} pairs")
    n = int(examples.shape[0])
    if pair_index.shape != (n,) or (n and examples.shape[1:] != directions.shape[1:]):
        raise PeeringValueError(
            f"examples {tuple(examples.shape)}, pair_index {tuple(pair_index.shape)} and directions "
            f"{tuple(directions.shape)} do not fit: need [n, ...], [n] and [P, ...]"
        )
    which = pair_index.detach().to("cpu", torch.int64).numpy()
    if n and (which.min() < 0 or which.max() >= p):
        raise PeeringValueError(f"pair_index must be in [0, {p - 1}]")
    sample_ndim = directions.ndim - 1
    # each example's slot: its rank among the examples of its pair (stable), vectorised
    order = np.argsort(which, kind="stable")
    first = np.searchsorted(which[order], which[order], side="left")
    slot = np.empty(n, dtype=np.intp)
    slot[order] = np.arange(n) - first
    slots = int(per_pair) if per_pair is not None else int(slot.max(initial=-1) + 1)
    shown = slot < slots

    maps = _maps(directions, sample_ndim)
    scales = np.abs(maps).reshape(p, -1).max(axis=1, initial=0.0)
    direction_tiles = _colorize(maps, None)  # [P, h, w, 3], each on its own scale (stated under it)
    h, w = direction_tiles.shape[1:3]
    tiles = np.full((p, slots + 1, h, w, 3), _BACKGROUND, dtype=np.uint8)
    if n:
        tiles[which[shown], slot[shown]] = _rgb(_numpy(examples)[shown], sample_ndim)
    tiles[:, slots] = direction_tiles

    ab = pairs.detach().to("cpu", torch.int64).tolist()
    missing = np.isnan(_numpy(directions).reshape(p, -1)).all(axis=1)
    titles = [
        [""] * slots + [_direction_caption(a, b, float(scales[k]), bool(missing[k]))]
        for k, (a, b) in enumerate(ab)
    ]
    if probabilities is not None:
        probs = probabilities.detach().to("cpu", torch.float32).reshape(n).tolist()
        for i in np.nonzero(shown)[0].tolist():
            titles[which[i]][slot[i]] = f"p({ab[which[i]][1]})={probs[i]:.2f}"
    panels = _compose(tiles, titles, zoom=zoom)

    count_list = counts.detach().cpu().reshape(p).tolist() if counts is not None else None
    total_list = totals.detach().cpu().reshape(p).tolist() if totals is not None else None
    headers = []
    for k, (a, b) in enumerate(ab):
        text = f"true {a}, predicted {b}"
        if count_list is not None:
            text += f": {int(count_list[k]):,} sample{'s' if int(count_list[k]) != 1 else ''}"
            if total_list is not None and total_list[k]:
                text += f" ({count_list[k] / total_list[k]:.1%} of the {a}s)"
        headers.append(text)
    what = "direction, the mean gradient of log p(b) - log p(a) over the examples"
    meaning = "bright: more intensity here turns an a into a b, dark: less does"
    scale_of = [None if missing[k] else float(scales[k]) for k in range(p)]
    legend = legend_band("sum", scale_of, panels.shape[2], what, meaning)
    return torch.from_numpy(_header(above(panels, legend), headers))
