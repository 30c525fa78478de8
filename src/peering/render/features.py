"""Pictures of attributions on tabular inputs: one diverging horizontal bar chart per sample and class.

Flat inputs [B, D] are drawn as bar charts ("features") unless they look like a flattened square image:
`input_kind` says which, and every picture function takes ``kind=`` to force it. A chart lists the
``top_n`` features with the largest |attribution|, largest first, each labelled "name = input value" with
a bar to the right (the class wants more of that feature: bright) or to the left (less: dark), on one
scale shared by the K classes of a sample; the axis under the bars is labelled with that scale, and the
features left out are summarised in one line (how many, and the sum of their attributions).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from torch import Tensor

from peering.errors import PeeringValueError
from peering.render._draw import _BACKGROUND, _font, _lut_np, _text_sheet, format_scale

__all__ = ["input_kind"]

InputKind = Literal["image", "features"]
MIN_IMAGE_SIDE = 8
"""A flat input of D = s * s values is drawn as an s x s image only when s is at least this."""

_BAR_WIDTH = 200  # pixels for the bars: 100 on each side of zero
_VALUE_WIDTH = 64  # pixels at least for the value printed after each bar (more when a value needs it)
_MAX_LABEL = 260  # pixels: longer feature names are cut with "…" (the input value never is)
_POSITIVE = 235  # colour-table entries of the bars (bright yellow: more; dark blue: less)
_NEGATIVE = 20


def input_kind(sample_shape: Sequence[int]) -> InputKind:
    """How inputs of this shape (one sample, no batch dim) are drawn: "image" or "features".

    [C, H, W] and [H, W] are images. A flat vector [D] is an image only when D = s * s with
    s >= `MIN_IMAGE_SIDE` (64 -> 8x8 digits, 784 -> 28x28); anything else flat (30 features, or 25,
    which would be a meaningless 5x5 "image") is drawn as bar charts of named features. Force either
    with ``kind="image"`` or ``kind="features"`` where a picture function takes it.

    >>> from peering.render import input_kind
    >>> input_kind([1, 28, 28]), input_kind([784]), input_kind([30]), input_kind([25])
    ('image', 'image', 'features', 'features')
    """
    shape = tuple(int(d) for d in sample_shape)
    if len(shape) != 1:
        return "image"
    side = math.isqrt(shape[0])
    return "image" if side * side == shape[0] and side >= MIN_IMAGE_SIDE else "features"


def resolve_kind(kind: str, sample_shape: Sequence[int]) -> InputKind:
    """``kind`` ("auto", "image" or "features") checked, "auto" resolved by `input_kind`."""
    if kind == "auto":
        return input_kind(sample_shape)
    if kind not in ("image", "features"):
        raise PeeringValueError(f"kind must be 'auto', 'image' or 'features', got {kind!r}")
    if kind == "features" and len(sample_shape) != 1:
        raise PeeringValueError(
            f"kind='features' needs flat inputs [B, D], got samples of shape {tuple(sample_shape)}"
        )
    return kind  # type: ignore[return-value]


def _labels(d: int, feature_names: Sequence[str] | None) -> list[str]:
    if feature_names is None:
        return [f"feature {i}" for i in range(d)]
    names = [str(n) for n in feature_names]
    if len(names) != d:
        raise PeeringValueError(f"feature_names has {len(names)} names, the inputs have {d} features")
    return names


def _fit(text: str, font: object, width: float) -> str:
    """``text`` cut with "…" to at most ``width`` pixels."""
    if font.getlength(text) <= width:  # type: ignore[attr-defined]
        return text
    while text and font.getlength(text + "…") > width:  # type: ignore[attr-defined]
        text = text[:-1]
    return text + "…"


def bar_tiles(
    attributions: Tensor | np.ndarray,
    inputs: Tensor | np.ndarray | None,
    *,
    feature_names: Sequence[str] | None,
    top_n: int,
    scale: np.ndarray,
) -> np.ndarray:
    """Bar charts uint8 [N, K, h, w, 3] of attributions [N, K, D] (inputs [N, D] label the features).

    ``scale`` [N] is the |attribution| drawn as a full half-bar (100 pixels). Every chart has the same
    size; sorting and the bars are vectorised, only the text is drawn in a loop.
    """
    if top_n < 1:
        raise PeeringValueError(f"top_n must be >= 1, got {top_n}")
    a = np.nan_to_num(
        attributions.detach().cpu().float().numpy() if isinstance(attributions, Tensor) else attributions,
        nan=0.0,
    ).astype(np.float32)
    n, k, d = a.shape
    names = _labels(d, feature_names)
    x = None
    if inputs is not None:
        x = inputs.detach().cpu().float().numpy() if isinstance(inputs, Tensor) else np.asarray(inputs)
        x = x.reshape(n, d)
    rows = min(top_n, d)
    rest = d > rows
    order = np.argsort(-np.abs(a), axis=2, kind="stable")[..., :rows]  # [N, K, rows]
    top = np.take_along_axis(a, order, axis=2)
    rest_sum = a.sum(axis=2) - top.sum(axis=2)  # [N, K]

    font, _ = _font()
    line = font.getmetrics()[0] + font.getmetrics()[1] + 4 if hasattr(font, "getmetrics") else 16
    values_of = [
        [["" if x is None else f" = {float(x[i, j]):.3g}" for j in order[i, c].tolist()] for c in range(k)]
        for i in range(n)
    ]
    label_w = min(
        _MAX_LABEL,
        max(
            [40.0]
            + [
                font.getlength(names[j] + v)
                for i in range(n)
                for c in range(k)
                for j, v in zip(order[i, c].tolist(), values_of[i][c], strict=True)
            ]
        ),
    )
    label_w = math.ceil(label_w) + 8
    shown = [_value_text(float(v)) for v in top.reshape(-1)]  # every number printed whole, never cut
    value_w = max([_VALUE_WIDTH] + [math.ceil(font.getlength(t)) + 10 for t in shown])
    width = label_w + _BAR_WIDTH + value_w
    axis_rows = 1  # the scale labels under the bars
    height = line * (rows + int(rest) + axis_rows) + 4
    half = _BAR_WIDTH // 2
    zero = label_w + half

    tiles = np.full((n, k, height, width, 3), _BACKGROUND, dtype=np.uint8)
    # the bars: row r covers y in [r * line + 3, (r + 1) * line - 3), |length| pixels beside the zero line
    safe = np.maximum(np.nan_to_num(scale.reshape(n, 1, 1), nan=0.0), np.finfo(np.float32).tiny)
    length = np.rint(np.clip(top / safe, -1.0, 1.0) * half).astype(np.intp)  # [N, K, rows]
    xs = np.arange(width)
    # a positive bar starts right of the zero line, a negative one ends left of it: the line stays visible
    lo = np.where(length >= 0, zero + 1, zero + length)[..., None]
    hi = np.where(length >= 0, zero + 1 + length, zero)[..., None]
    covered = (xs >= lo) & (xs < hi)  # [N, K, rows, W]
    colour = np.where(top >= 0, _POSITIVE, _NEGATIVE)  # [N, K, rows]
    bars = np.where(covered[..., None], _lut_np()[colour][..., None, :], np.uint8(_BACKGROUND))
    band = np.zeros(line, dtype=bool)
    band[3 : line - 3] = True
    ys = rows * line
    body = tiles[:, :, :ys].reshape(n, k, rows, line, width, 3)
    body[:, :, :, band] = bars[:, :, :, None].astype(np.uint8)
    # the axis: a grey line at zero through the bars, and ticks at the ends of the scale
    tiles[:, :, : ys + 2, zero] = 150
    tiles[:, :, ys : ys + 2, label_w : label_w + _BAR_WIDTH] = 150

    # the text, on one grey-scale sheet for all charts: pixel = 255 - coverage
    placed = _placed_text(names, values_of, order, top, rest_sum, scale, font, line, label_w, height, d)
    coverage = _text_sheet(placed, width, n * k * height, font).reshape(n, k, height, width, 1)
    return np.minimum(tiles, _BACKGROUND - coverage)


def _value_text(v: float) -> str:
    """An attribution printed after its bar: 2 significant digits, "+3.7e-10" for small ones."""
    return f"{v:+.2g}" if v == 0 or abs(v) >= 1e-3 else f"{v:+.1e}"


def _placed_text(
    names: list[str],
    values_of: list[list[list[str]]],
    order: np.ndarray,
    top: np.ndarray,
    rest_sum: np.ndarray,
    scale: np.ndarray,
    font: Any,
    line: int,
    label_w: int,
    height: int,
    d: int,
) -> list[tuple[float, float, str]]:
    """(x, y, text) of every label, value and axis tick of the charts [N, K] stacked in one sheet."""
    n, k, rows = order.shape
    zero = label_w + _BAR_WIDTH // 2
    value_x = label_w + _BAR_WIDTH + 4
    placed: list[tuple[float, float, str]] = []
    for i in range(n):
        s = format_scale(float(scale[i])) if scale[i] > 0 else "0"
        for c in range(k):
            y0 = (i * k + c) * height
            for r, j in enumerate(order[i, c].tolist()):
                value = values_of[i][c][r]
                text = _fit(names[j], font, label_w - 8 - font.getlength(value)) + value
                placed.append((label_w - 6 - font.getlength(text), y0 + r * line, text))
                placed.append((value_x, y0 + r * line, _value_text(float(top[i, c, r]))))
            y = y0 + rows * line
            if d > rows:
                summary = f"{d - rows} more: sum {float(rest_sum[i, c]):+.2g}"
                placed.append((max(2.0, label_w - 6 - font.getlength(summary)), y + 2, summary))
                y += line
            for text, at in ((f"-{s}", label_w), ("0", zero), (f"+{s}", label_w + _BAR_WIDTH)):
                placed.append((at - font.getlength(text) / 2, y + 2, text))
    return placed
