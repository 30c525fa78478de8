"""Shared drawing helpers of `peering.render`: the colour table, the font, array plumbing, captioned panels.

Private to the package: every picture module builds on these, nothing outside `peering.render` should.

The pixel work runs in NumPy, single-threaded, on purpose: torch hands arrays this size to its intra-op
thread pool, and on a machine whose cores are busy training that hand-off costs more than the work
(measured: 10x slower per panel with two busy cores). Tensors are converted once on the way in and out.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from peering.errors import PeeringTypeError, PeeringValueError

_PAD = 2  # pixels of white between and around the tiles of a panel
_GAP = 8  # pixels of white between the cells of a row, so that neighbouring captions never touch
_NOTE_WIDTH = 560  # a panel with a note is at least this wide, so the note wraps into few lines
_FONT_SIZE = 16  # pixels: digits 12 px tall, readable at 100% zoom (the report asks for >= 11 px)
_BACKGROUND = 255  # white; captions are black on it
_ASCII = str.maketrans({"→": "->", "∇": "grad ", "·": "*", "±": "+-", "…": "...", "≥": ">="})  # fallback font

ChannelView = Literal["overlay", "colour", "sum", "each", "magnitude"]
CHANNEL_VIEWS: tuple[str, ...] = ("overlay", "colour", "sum", "each", "magnitude")
Display = Callable[[Tensor], Tensor] | tuple[float | Sequence[float], float | Sequence[float]] | None
"""How inputs become pictures: None (they are already in [0, 1]), ``(mean, std)`` to undo a normalisation
(shown: ``x * std + mean``, per channel when they are sequences), or any callable from a batch of model
inputs to images in [0, 1] of the same batch size."""

SATURATED = 0.99
"""With ``output="probability"`` (or "sigmoid"), a class whose probability is above this, or below 1 - this,
is saturated: its softmax (sigmoid) gradient is tiny, and the pictures say so."""


# --------------------------------------------------------------------------------------------- cached assets


# matplotlib's 'cividis' sampled at 256 levels (``colormaps["cividis"](np.linspace(0, 1, 256))``, rounded
# to uint8), written out so that drawing a map does not import matplotlib (1-3 s of a command's start-up);
# tests/test_render.py checks it against matplotlib's
_CIVIDIS = (
    "00224e00234f00245100255300255400265600275800285900285b00295d002a5f002a61002b62002c64002c66002d68"
    "002e6a002e6c002f6d00306f0030700031700031710132710533710833700c34700f357012357014367016377018376f"
    "1a386f1c396f1e3a6f203a6f213b6e233c6e243c6e263d6e273e6e293f6e2a3f6d2b406d2d416d2e416d2f426d31436d"
    "32436d33446d34456c35456c36466c38476c39486c3a486c3b496c3c4a6c3d4a6c3e4b6c3f4c6c404c6c414d6c424e6c"
    "434e6c444f6c45506c46516c47516c48526c49536c4a536c4b546c4c556c4d556c4e566c4f576c50576c51586d52596d"
    "535a6d545a6d555b6d555c6d565c6d575d6d585e6d595e6e5a5f6e5b606e5c616e5d616e5e626e5e636f5f636f60646f"
    "61656f62656f636670646770656870656870666970676a71686a71696b716a6c716b6d726c6d726c6e726d6f726e6f73"
    "6f70737071737172747272747273747374757474757575757676767777767777777878777979777a7a787b7a787c7b78"
    "7d7c787e7c787e7d787f7e78807f78817f788280798381798482798582798683798784788885788985788a86788b8778"
    "8c88788d88788e89788f8a78908b78918b78928c78928d78938e78948e77958f779690779791779892779992779a9376"
    "9b94769c95769d95769e96769f9775a09875a19975a29975a39a74a49b74a59c74a69c74a79d73a89e73a99f73aaa073"
    "aba072aca172ada272aea371afa471b0a571b1a570b3a670b4a76fb5a86fb6a96fb7a96eb8aa6eb9ab6dbaac6dbbad6d"
    "bcae6cbdae6cbeaf6bbfb06bc0b16ac1b26ac2b369c3b369c4b468c5b568c6b667c7b767c8b866c9b965cbb965ccba64"
    "cdbb63cebc63cfbd62d0be62d1bf61d2c060d3c05fd4c15fd5c25ed6c35dd7c45cd9c55cdac65bdbc75adcc859ddc858"
    "dec958dfca57e0cb56e1cc55e2cd54e4ce53e5cf52e6d051e7d150e8d24fe9d34eead34cebd44bedd54aeed649efd748"
    "f0d846f1d945f2da44f3db42f5dc41f6dd3ff7de3ef8df3cf9e03afbe138fce236fde334fee434fee535fee636fee838"
)


@functools.lru_cache(maxsize=1)
def _lut_np() -> np.ndarray:
    """The diverging colour map: matplotlib's 'cividis' sampled at 256 levels, uint8 [256, 3].

    Cividis runs from dark blue through a neutral grey to bright yellow with (nearly) linearly increasing
    lightness, and is readable with every common form of colour blindness. Mapping attribution -1 to its
    dark end and +1 to its bright end keeps the sign readable in grey-scale prints too, and zero lands on
    the unobtrusive grey in the middle.
    """
    lut = np.frombuffer(bytes.fromhex(_CIVIDIS), dtype=np.uint8).reshape(256, 3).copy()
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
    try:  # found without importing matplotlib (its data folder sits in the package)
        spec = importlib.util.find_spec("matplotlib")
        if spec is not None and spec.origin is not None:
            path = Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
            return ImageFont.truetype(str(path), size), True
    except (ImportError, OSError, ValueError):
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
        raise PeeringValueError("expected a tensor with at least one dimension, got a scalar")
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
        raise PeeringValueError(
            f"each picture must be [D], [H, W] or [C, H, W]; "
            f"got {sample_ndim} picture dims in {tuple(x.shape)}"
        )
    a = _numpy(x)
    if sample_ndim == 1:
        d = a.shape[-1]
        if d == 0:
            raise PeeringValueError("cannot draw an empty feature vector")
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
            raise PeeringValueError(
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
        raise PeeringValueError(f"images must have 1 or 3 channels, got {c} (shape {tuple(images.shape)})")
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
        raise PeeringValueError(f"zoom must be a positive integer, got {zoom}")
    if zoom == 1:
        return tiles
    *lead, h, w, c = tiles.shape
    out = np.broadcast_to(tiles[..., :, None, :, None, :], (*lead, h, zoom, w, zoom, c))
    return out.reshape(*lead, h * zoom, w * zoom, c)


def _wrap(text: str, font: Any, width: float) -> list[str]:
    """``text`` broken into lines no wider than ``width`` pixels, at spaces (a longer word gets its own
    line); explicit newlines are kept."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if line and font.getlength(candidate) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


def _text_sheet(lines: Sequence[tuple[float, float, str]], width: int, height: int, font: Any) -> np.ndarray:
    """Coverage uint8 [height, width] of text lines drawn at (x, y): 255 where a glyph covers a pixel."""
    sheet = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(sheet)
    for x, y, text in lines:
        if text:
            draw.text((x, y), text, fill=255, font=font)
    return np.asarray(sheet)


def _compose(
    tiles: np.ndarray,
    titles: Sequence[Sequence[str]],
    *,
    zoom: int,
    notes: Sequence[str] | None = None,
) -> np.ndarray:
    """Panels uint8 [R, H', W', 3] from tiles uint8 [R, T, h, w, 3]: per row, T tiles side by side, each
    under its caption (one or more lines, separated by "\n"), and optionally a note under the row.

    Every cell is as wide as the widest caption line or the zoomed tile, whichever is more, and every
    caption band as tall as the most caption lines, so all R panels have the same size; tiles are centred
    in their cells. ``notes`` (one per row, "" for none) are wrapped to the panel's width in a band under
    the tiles, as tall as the longest note (no band when every note is empty). Only the text drawing loops.
    """
    n_rows, n_tiles, h, w, _ = tiles.shape
    h, w = h * zoom, w * zoom
    font, unicode_ok = _font()
    if not unicode_ok:
        titles = [[t.translate(_ASCII) for t in row] for row in titles]
        notes = None if notes is None else [n.translate(_ASCII) for n in notes]
    split = [[t.split("\n") if t else [] for t in row] for row in titles]
    widths = [[[font.getlength(x) for x in lines] for lines in row] for row in split]
    cell_w = max([w] + [math.ceil(x) + 2 for row in widths for lines in row for x in lines])
    line_h = _band_height(font)
    n_lines = max([1] + [len(lines) for row in split for lines in row])
    band = line_h * n_lines
    if notes is not None and len(notes) != n_rows:
        raise PeeringValueError(f"{len(notes)} notes for {n_rows} rows")
    step = cell_w + (_GAP if n_tiles > 1 else _PAD)
    width = _PAD + n_tiles * step - (_GAP - _PAD if n_tiles > 1 else 0)
    if notes is not None and any(notes):
        width = max(width, _NOTE_WIDTH)
    wrapped = [_wrap(n, font, width - 2 * _PAD) if n else [] for n in (notes or [])]
    note_lines = max([0] + [len(lines) for lines in wrapped])
    note_band = line_h * note_lines + (_PAD if note_lines else 0)
    height = _PAD + band + h + _PAD + note_band

    canvas = np.full((n_rows, height, max(width, _PAD + n_tiles * step), 3), _BACKGROUND, dtype=np.uint8)
    cells = canvas[:, :, _PAD : _PAD + n_tiles * step].reshape(n_rows, height, n_tiles, step, 3)  # a view
    canvas = canvas[:, :, :width]
    x0 = (cell_w - w) // 2
    # write the nearest-neighbour zoom straight into the canvas: split each zoomed axis into (pixel, copy)
    # (a view, as splitting one axis always is) and broadcast the tiles over the copies
    target = cells[:, _PAD + band : _PAD + band + h, :, x0 : x0 + w]
    target = target.reshape(n_rows, h // zoom, zoom, n_tiles, w // zoom, zoom, 3)
    target[...] = tiles.transpose(0, 2, 1, 3, 4)[:, :, None, :, :, None]
    if n_rows == 0:
        return np.ascontiguousarray(canvas)

    # text goes on small grey-scale sheets (cheap to draw and convert), then is blended in as dark text on
    # the white bands: pixel = 255 - coverage
    if any(any(row) for row in titles):
        placed = [
            (_PAD + t * step + (cell_w - tw) / 2, r * band + k * line_h, text)
            for r, (row, row_widths) in enumerate(zip(split, widths, strict=True))
            for t, (lines, line_widths) in enumerate(zip(row, row_widths, strict=True))
            for k, (text, tw) in enumerate(zip(lines, line_widths, strict=True))
        ]
        coverage = _text_sheet(placed, width, n_rows * band, font).reshape(n_rows, band, width, 1)
        canvas[:, _PAD : _PAD + band] = _BACKGROUND - coverage
    if note_lines:
        placed = [
            (_PAD, r * note_band + k * line_h, text)
            for r, lines in enumerate(wrapped)
            for k, text in enumerate(lines)
        ]
        coverage = _text_sheet(placed, width, n_rows * note_band, font).reshape(n_rows, note_band, width, 1)
        canvas[:, height - note_band :] = _BACKGROUND - coverage
    return np.ascontiguousarray(canvas)


# ---------------------------------------------------------------------------------------------- the scale


def format_scale(value: float) -> str:
    """A scale as a short string: 3 significant digits between 0.01 and 1000, else "3.7e-4"."""
    v = abs(float(value))
    if v == 0.0 or not math.isfinite(v):
        return "0" if v == 0.0 else str(v)
    if 0.01 <= v < 1000.0:
        return f"{v:.3g}"
    mantissa, exponent = f"{v:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def scale_caption(scale: float, signed: bool = True) -> str:
    """The caption line that states a picture's scale (the value drawn at full colour)."""
    if not scale > 0:
        return "all zero"
    return f"scale {'±' if signed else ''}{format_scale(scale)}"


PYTHON_HINT = 'output="log_probability" or "logit"'
"""How a saturation note says what shows more, in Python; the command line passes its own options."""


def saturation_note(
    classes: Sequence[int], probabilities: Sequence[float], output: str | None, hint: str = PYTHON_HINT
) -> str:
    """The note for a row whose explained classes have a saturated probability, or ""."""
    if output not in ("probability", "sigmoid"):
        return ""
    name = "σ" if output == "sigmoid" else "p"
    hit = [
        f"{name}({k})={q:.3f}"
        for k, q in zip(classes, probabilities, strict=True)
        if k >= 0 and (q > SATURATED or q < 1.0 - SATURATED)
    ]
    if not hit:
        return ""
    if output == "sigmoid":
        logit = "--output logit" if hint.startswith("--") else 'output="logit"'
        return f"{', '.join(hit)}: saturated, the sigmoid's gradient is tiny there; {logit} shows more."
    return (
        f"{', '.join(hit)}: saturated, the probability's gradient is tiny there; {hint} shows more."
    )


# --------------------------------------------------------------------------------------- channel views


def channel_view(channels: str | None, n_channels: int) -> str:
    """The view to draw: ``channels`` checked, None -> "overlay" for 3 channels, "sum" otherwise.

    Colour images default to the overlay (the signed map over the greyed input, the view Captum's
    ``blended_heat_map`` made familiar): shown side by side on a colour CNN (docs/img/colour_views.png),
    the "colour" view of input gradients is a speckle of every hue in which neither the input nor the
    evidence can be made out, while the overlay shows both. A 1-channel attribution has no colour to show:
    "colour" draws it as "sum" (the same map).
    """
    if channels is not None and channels not in CHANNEL_VIEWS:
        raise PeeringValueError(f"channels must be one of {CHANNEL_VIEWS} or None, got {channels!r}")
    if channels is None:
        return "overlay" if n_channels == 3 else "sum"
    if channels == "colour" and n_channels != 3:
        return "sum"
    return channels


def _view_values(attr: np.ndarray, view: str) -> np.ndarray:
    """What the view draws, [N, K, M, H, W] from attributions [N, K, C, H, W] (NaN -> 0)."""
    a = np.nan_to_num(attr, nan=0.0, posinf=0.0, neginf=0.0)
    if view == "sum":
        return a.sum(axis=2, keepdims=True)
    if view == "magnitude":
        return np.sqrt((a * a).sum(axis=2, keepdims=True))
    return a  # "colour" and "each": every channel


def attribution_tiles(
    attr: np.ndarray, view: str, scale: np.ndarray | None = None
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(tiles uint8 [N, K * m, H, W, 3], the m tile suffixes, the scale [N]) for attributions
    [N, K, C, H, W] drawn in ``view``, on one scale per sample (its K maps compare directly).

    ``scale`` [N] (default: each sample's max |value| of what the view draws) is the value drawn at
    full colour. "sum" and "each" use the diverging colour table; "magnitude" its upper half (grey for 0
    to bright yellow); "colour" draws the three channels as a colour picture around grey: each channel
    brighter where the class wants more of it, darker where it wants less.
    """
    n, k, c, h, w = attr.shape
    values = _view_values(attr, view)
    if scale is None:
        scale = np.abs(values).reshape(n, -1).max(axis=1, initial=0.0)
    scale = np.asarray(scale, dtype=np.float32).reshape(n)
    safe = np.maximum(np.nan_to_num(scale, nan=0.0), np.finfo(np.float32).tiny)[:, None, None, None, None]
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        v = np.clip(values / safe, -1.0, 1.0)
    if view == "colour":
        rgb = np.rint(127.5 + 127.5 * v).astype(np.uint8)  # [N, K, 3, H, W]
        return np.moveaxis(rgb, 2, -1), [""], scale
    if view == "magnitude":
        idx = 128 + np.floor(v * 128.0).astype(np.intp)
    else:
        idx = np.floor((v + 1.0) * 128.0).astype(np.intp)
    np.clip(idx, 0, 255, out=idx)
    tiles = _lut_np()[idx].reshape(n, k * values.shape[2], h, w, 3)
    suffixes = [""] if values.shape[2] == 1 else (["R", "G", "B"] if c == 3 else [f"ch{i}" for i in range(c)])
    return tiles, suffixes, scale


# ------------------------------------------------------------------------------------------------ display


def display_images(x: Tensor | np.ndarray, display: Display, sample_ndim: int) -> np.ndarray:
    """Model inputs [N, ...] as the images a person would see, float32 NumPy (not yet clamped).

    ``display`` is None (unchanged), ``(mean, std)`` (``x * std + mean``, per channel of [C, H, W]
    images, per feature of flat [D] inputs, or one number for all), or a callable on the tensor.
    """
    if display is None:
        return _numpy(x)
    if callable(display):
        t = x if isinstance(x, Tensor) else torch.from_numpy(np.asarray(x))
        out = display(t)
        if not isinstance(out, (Tensor, np.ndarray)) or out.shape[0] != t.shape[0]:
            got = tuple(out.shape) if isinstance(out, (Tensor, np.ndarray)) else type(out).__name__
            raise PeeringValueError(
                f"display must return images with the batch's {t.shape[0]} samples first, got {got}"
            )
        return _numpy(out)
    if not (isinstance(display, (tuple, list)) and len(display) == 2):
        raise PeeringTypeError(f"display must be None, (mean, std) or a callable, got {display!r}")
    a = _numpy(x)
    mean, std = (np.asarray(v, dtype=np.float32).reshape(-1) for v in display)
    axis_len = a.shape[-3] if sample_ndim == 3 else a.shape[-1]
    for name, v in (("mean", mean), ("std", std)):
        if v.size not in (1, axis_len):
            what = ("channel" if sample_ndim == 3 else "feature") + "s" * (axis_len != 1)
            allowed = "1" if axis_len == 1 else f"1 or {axis_len}"
            raise PeeringValueError(
                f"display {name} has {v.size} values; the inputs have {axis_len} {what} (give {allowed})"
            )
    shape = (-1, 1, 1) if sample_ndim == 3 else (-1,) if sample_ndim == 1 else (1, 1)
    return a * std.reshape(shape) + mean.reshape(shape)


def range_notes(images: np.ndarray, display: Display) -> list[str]:
    """Per sample of inputs [N, ...] drawn without a display transform: a note when its values fall
    outside [0, 1] (they are clamped), else ""."""
    n = images.shape[0]
    if display is None and images.size:
        flat = images.reshape(n, -1)
        finite = np.isfinite(flat)
        lo = np.where(finite, flat, np.inf).min(axis=1)
        hi = np.where(finite, flat, -np.inf).max(axis=1)
        out = (lo < -1e-3) | (hi > 1.0 + 1e-3)
        if out.any():
            return [
                f"Inputs span [{a:.3g}, {b:.3g}], shown clamped to [0, 1]; "
                "pass display=(mean, std) or a function to show them as seen."
                if o
                else ""
                for a, b, o in zip(lo.tolist(), hi.tolist(), out.tolist(), strict=True)
            ]
    return [""] * n


def join_notes(*notes: Sequence[str]) -> list[str]:
    """Per row, the non-empty notes joined by a space."""
    return [" ".join(n for n in row if n) for row in zip(*notes, strict=True)]
