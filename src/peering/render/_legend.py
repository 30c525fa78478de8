"""What every picture says besides its maps: what was differentiated (and by which method), a colour legend
with the scale, and the signed overlay view (the map over the greyed input).

Private to `peering.render`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from peering.render._draw import _ASCII, _BACKGROUND, _PAD, _band_height, _font, _lut_np, _wrap, format_scale

METHOD_NAMES = {
    "gradient": "gradient",
    "input_x_gradient": "input × gradient",
    "smoothgrad": "SmoothGrad",
    "integrated_gradients": "integrated gradients",
}
QUANTITIES = {
    "probability": "p (softmax probability)",
    "log_probability": "log p (log-softmax)",
    "logit": "the logit",
    "sigmoid": "σ (each class's own sigmoid probability)",
    "raw": "the output itself",
}
SHORT = {"probability": "p", "log_probability": "log p", "logit": "logit", "sigmoid": "σ", "raw": "out"}

_BAR = 160  # pixels of colour bar in a legend
_BAR_HEIGHT = 10


def differentiated(output: str | None, method: str | None = None) -> str:
    """What a map shows: "gradient of p (softmax probability)", "input × gradient of the logit", ...; ""
    when neither is known.

    >>> differentiated("sigmoid", "integrated_gradients")
    "integrated gradients of σ (each class's own sigmoid probability)"
    """
    if output is None and method is None:
        return ""
    name = METHOD_NAMES.get(method or "gradient", str(method))
    quantity = QUANTITIES.get(output or "", "the class score" if output is None else str(output))
    return f"{name} of {quantity}"


def value_caption(output: str | None, probability: float, logit: float | None = None) -> str:
    """A class's caption value: "p=0.91"; "σ=0.48" for sigmoid; "out=3.21" (the output) for "raw".

    >>> value_caption("sigmoid", 0.481), value_caption("raw", float("nan"), -3.2109)
    ('σ=0.48', 'out=-3.21')
    """
    if output == "raw":
        return "out=?" if logit is None or not math.isfinite(logit) else f"out={logit:.3g}"
    return f"{'σ' if output == 'sigmoid' else 'p'}={probability:.2f}"


def overlay_tiles(values: np.ndarray, grey: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The signed overlay view: uint8 [N, K, H, W, 3] of signed maps [N, K, H, W] over the greyed inputs
    [N, H, W] (in [0, 1]). The input is shown as grey between 0.3 and 0.9 (so that colour shows on black
    and on white), and each pixel takes the diverging colour of ``value / scale`` with an opacity that
    grows with its size: 0 leaves the input as it is, the full scale covers it (Captum's
    ``blended_heat_map`` blends at a constant opacity, which also hides where nothing happens)."""
    safe = np.maximum(np.nan_to_num(scale, nan=0.0), np.finfo(np.float32).tiny)[:, None, None, None]
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        v = np.clip(np.nan_to_num(values, nan=0.0) / safe, -1.0, 1.0)
    idx = np.clip(np.floor((v + 1.0) * 128.0).astype(np.intp), 0, 255)
    colour = _lut_np()[idx].astype(np.float32)  # [N, K, H, W, 3]
    alpha = (np.abs(v) ** 0.6 * 0.9)[..., None]
    base = (0.3 + 0.6 * np.clip(np.nan_to_num(grey, nan=0.0), 0.0, 1.0)) * 255.0  # [N, H, W]
    out = base[:, None, :, :, None] * (1.0 - alpha) + colour * alpha
    return np.rint(out).astype(np.uint8)


def _bar(view: str) -> tuple[np.ndarray, str, str, str]:
    """(colour bar uint8 [_BAR_HEIGHT, _BAR, 3], left label kind, right label kind, its meaning)."""
    t = np.linspace(-1.0, 1.0, _BAR)
    if view == "magnitude":
        colours = _lut_np()[128 + np.clip(np.floor((t + 1.0) * 64.0), 0, 127).astype(np.intp)]
        return np.broadcast_to(colours, (_BAR_HEIGHT, _BAR, 3)), "0", "+", "brighter: larger |attribution|"
    if view == "colour":  # three thin bars: red, green and blue from less to more
        rows = []
        for c in range(3):
            rgb = np.full((_BAR, 3), 127.5)
            rgb[:, c] = 127.5 + 127.5 * t
            rows.append(np.broadcast_to(np.rint(rgb).astype(np.uint8), (_BAR_HEIGHT // 2 + 1, _BAR, 3)))
        meaning = "each channel (R, G, B): darker where the class wants less of it, brighter where more"
        return np.concatenate(rows), "-", "+", meaning
    colours = _lut_np()[np.clip(np.floor((t + 1.0) * 128.0), 0, 255).astype(np.intp)]
    if view == "overlay":
        a = (np.abs(t) ** 0.6 * 0.9)[:, None]
        colours = np.rint(0.6 * 255.0 * (1 - a) + colours * a).astype(np.uint8)
    meaning = "dark: the class wants less here, bright: more"
    return np.broadcast_to(colours, (_BAR_HEIGHT, _BAR, 3)), "-", "+", meaning


def legend_band(
    view: str, scales: Sequence[float | None], width: int, what: str = "", meaning: str | None = None
) -> np.ndarray:
    """One legend per row, uint8 [R, h, w, 3] (w >= ``width``): the view's colour bar, the values at its
    ends and middle (each row's own scale; None: each map's, stated under it), and beside it what was
    differentiated (``what``) and what the colours mean (``meaning``, else the view's own words), wrapped
    to the width."""
    font, unicode_ok = _font()
    line = _band_height(font)
    bar, left, right, colours = _bar(view)
    meaning = meaning or colours
    meaning = f"{what}: {meaning}" if what else meaning
    bar_h = bar.shape[0]
    labels = []
    for s in scales:
        if s is None:
            labels.append((f"{left}scale" if left != "0" else "0", "" if left == "0" else "0", "+scale"))
            continue
        if not s > 0:
            labels.append(("", "all zero", ""))
            continue
        value = format_scale(s)
        labels.append((f"{left}{value}" if left != "0" else "0", "" if left == "0" else "0", f"+{value}"))
    if not unicode_ok:
        meaning = meaning.translate(_ASCII)
    beside = width >= _PAD + _BAR + 14 + 220  # the words beside the bar, or under it in a narrow picture
    width = max(width, 2 * _PAD + _BAR)
    text_x = _PAD + _BAR + 14 if beside else _PAD
    words = _wrap(meaning, font, width - text_x - _PAD)
    text_y = 0 if beside else bar_h + line
    height = _PAD + max(bar_h + line, text_y + line * len(words)) + _PAD
    out = np.full((len(scales), height, width, 3), _BACKGROUND, dtype=np.uint8)
    out[:, _PAD : _PAD + bar_h, _PAD : _PAD + _BAR] = bar
    sheet = Image.new("L", (width, len(scales) * height), 0)
    draw = ImageDraw.Draw(sheet)
    for r, (lo, mid, hi) in enumerate(labels):
        y = r * height + _PAD + bar_h
        # the ends' labels inside the bar's span (left-aligned, right-aligned), the middle one centred
        # when it has room between them
        lo_w, mid_w, hi_w = (font.getlength(t) for t in (lo, mid, hi))
        draw.text((_PAD, y), lo, fill=255, font=font)
        draw.text((_PAD + _BAR - hi_w, y), hi, fill=255, font=font)
        if mid and _PAD + lo_w + 6 < _PAD + (_BAR - mid_w) / 2 and (_BAR + mid_w) / 2 + 6 < _BAR - hi_w:
            draw.text((_PAD + (_BAR - mid_w) / 2, y), mid, fill=255, font=font)
        for k, text in enumerate(words):
            draw.text((text_x, r * height + _PAD + text_y + k * line), text, fill=255, font=font)
    out[:] = np.minimum(out, _BACKGROUND - np.asarray(sheet).reshape(len(scales), height, width, 1))
    return out


def above(rows: np.ndarray, band: np.ndarray) -> np.ndarray:
    """Rows [R, H, W, 3] with ``band`` [R, h, w, 3] on top of each: [R, h + H, max(W, w), 3] (white
    filled). A legend goes on top, so that the tiles stay at the bottom of their row."""
    r, h, w, _ = rows.shape
    width = max(w, band.shape[2])
    out = np.full((r, band.shape[1] + h, width, 3), _BACKGROUND, dtype=np.uint8)
    out[:, : band.shape[1], : band.shape[2]] = band
    out[:, band.shape[1] :, :w] = rows
    return out


def below(rows: np.ndarray, band: np.ndarray) -> np.ndarray:
    """Rows [R, H, W, 3] with ``band`` [R, h, w, 3] under each (white filled to the wider of the two)."""
    width = max(rows.shape[2], band.shape[2])
    return np.concatenate([_widen(rows, width), _widen(band, width)], axis=1)


def _widen(a: np.ndarray, width: int) -> np.ndarray:
    if a.shape[2] >= width:
        return a
    out = np.full((*a.shape[:2], width, 3), _BACKGROUND, dtype=np.uint8)
    out[:, :, : a.shape[2]] = a
    return out


def headed(panels: np.ndarray, headers: Sequence[str]) -> np.ndarray:
    """Panels [N, H, W, 3] with a line of text above each: [N, H + band, W', 3] (W' fits the widest)."""
    font, unicode_ok = _font()
    headers = [t if unicode_ok else t.translate(_ASCII) for t in headers]
    band = _band_height(font) + 2
    n, h, w, _ = panels.shape
    width = max([w] + [int(math.ceil(font.getlength(t))) + 2 * _PAD for t in headers])
    out = np.full((n, band + h, width, 3), _BACKGROUND, dtype=np.uint8)
    out[:, band:, :w] = panels
    sheet = Image.new("L", (width, max(1, n * band)), 0)
    draw = ImageDraw.Draw(sheet)
    for i, text in enumerate(headers):
        draw.text((_PAD, i * band + 2), text, fill=255, font=font)
    out[:, :band] = _BACKGROUND - np.asarray(sheet)[: n * band].reshape(n, band, width, 1)
    return out
