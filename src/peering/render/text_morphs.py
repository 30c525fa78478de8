"""Pictures of text morphs (`peering.morph.text`): one sentence per kept frame, the swapped tokens marked.

`token_strip` is what `peering.render.film_strip` draws for a morph whose frames are token ids: the frames
of one sample, top to bottom, each captioned with its step, the tokens that differ from the original on a
coloured background (those swapped since the frame above also underlined), padding left out.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageDraw
from torch import Tensor

from peering.errors import PeeringTypeError, PeeringValueError
from peering.render._draw import _ASCII, _BACKGROUND, _band_height, _font
from peering.render._frames import _frame_indices, _morph_frames
from peering.render._legend import SHORT
from peering.render.tokens import _converter, _pieces

if TYPE_CHECKING:
    from peering.morph.ascent import MorphResult

__all__ = ["token_strip"]

_CHANGED = (253, 220, 120)  # the background of a token that differs from the original
_OUTLINE = (150, 110, 0)
_CAPTION = 190  # pixels of the step captions' column
_PAD = 3


def token_strip(
    result: MorphResult | SimpleNamespace,
    index: int,
    *,
    tokenizer: Any = None,
    mask: Tensor | None = None,
    max_frames: int = 12,
    width: int = 900,
) -> Image.Image:
    """One sample's text morph as a strip of sentences, one per kept frame (at most ``max_frames``, always
    the first and the last), ending where the sample stopped as `film_strip` does.

    Args:
        result: a `peering.morph.text.TextMorphResult` (or any object with ``frames`` [F, B, L] of token
            ids, ``frame_steps``, and optionally ``steps``, ``targets``, ``probabilities``, ``output`` and
            ``padding`` [B, L]).
        index: which sample.
        tokenizer: turns ids into strings (``convert_ids_to_tokens``, or a function from a list of ids to
            strings); without one the ids are drawn.
        mask: [B, L], nonzero at the real tokens; default: ``result.padding`` (padding left out).
        max_frames: at most this many sentences.
        width: the picture's width in pixels (sentences wrap inside it).

    >>> import torch
    >>> from types import SimpleNamespace
    >>> from peering.render import token_strip
    >>> frames = torch.tensor([[[5, 6, 7]], [[5, 9, 7]], [[8, 9, 7]]])
    >>> res = SimpleNamespace(frames=frames, frame_steps=torch.arange(3), steps=torch.tensor([2]),
    ...                       targets=torch.tensor([1]), probabilities=torch.tensor([[0.1, 0.9]]))
    >>> token_strip(res, 0, tokenizer=lambda ids: [f"w{i}" for i in ids]).width
    900
    """
    frames = result.frames
    if not isinstance(frames, Tensor) or frames.is_floating_point() or frames.ndim != 3:
        raise PeeringValueError(
            f"token_strip draws text morphs, whose frames are token ids [F, B, L]; got "
            f"{getattr(frames, 'dtype', type(frames).__name__)} frames of shape "
            f"{list(getattr(frames, 'shape', []))}"
        )
    sample, _, captions = _morph_frames(result, index)
    keep = _frame_indices(sample.shape[0], max_frames)
    real = _real_positions(result, index, mask, sample.shape[1])
    convert = _converter(tokenizer)
    if tokenizer is not None and convert is None:
        raise PeeringTypeError("tokenizer must have convert_ids_to_tokens or map a list of ids to strings")
    original = sample[0, real].tolist()
    lines = []
    previous = original
    for i in keep:
        ids = sample[i, real].tolist()
        words = [str(w) for w in (convert(ids) if convert is not None else ids)]
        lines.append((captions[i], words, [a != b for a, b in zip(ids, original, strict=True)],
                      [a != b for a, b in zip(ids, previous, strict=True)]))
        previous = ids
    target = _target(result, index)
    output = getattr(result, "output", "log_probability")
    title = f"token swaps raising {SHORT.get(output, output)}({target})" if target >= 0 else "token swaps"
    return _draw(title, lines, width)


def _real_positions(result: Any, index: int, mask: Tensor | None, length: int) -> list[int]:
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.ndim != 2 or mask.shape[1] != length:
            raise PeeringValueError(f"mask must be [B, L] with L = {length}, nonzero at the real tokens")
        return (mask[index] != 0).nonzero().flatten().tolist()
    padding = getattr(result, "padding", None)
    if isinstance(padding, Tensor) and padding.ndim == 2 and padding.shape[1] == length:
        return (~padding[index].bool()).nonzero().flatten().tolist()
    return list(range(length))


def _target(result: Any, index: int) -> int:
    targets = getattr(result, "targets", None)
    return int(targets.reshape(-1)[index]) if targets is not None else -1


def _draw(title: str, lines: list[tuple[str, list[str], list[bool], list[bool]]], width: int) -> Image.Image:
    """The strip: a title, then per frame its caption (left column) and its tokens, wrapped."""
    font, unicode_ok = _font()
    band = _band_height(font)
    row = band + 2 * _PAD + 2
    text_w = width - _CAPTION - 8
    placed = []  # per frame: (caption lines, [(x, y, piece, changed, new)], height)
    for caption, words, changed, new in lines:
        x, y, boxes = 0.0, 0, []
        for word, c, n in zip(words, changed, new, strict=True):
            piece, new_word = _pieces(word)
            if not unicode_ok:
                piece = piece.encode("ascii", "replace").decode()
            w = font.getlength(piece) + 2 * _PAD
            gap = 6 if new_word and x > 0 else 0
            if x > 0 and x + gap + w > text_w:
                x, y, gap = 0.0, y + row, 0
            boxes.append((x + gap, y, piece, c, n))
            x += gap + w
        heads = [t if unicode_ok else t.translate(_ASCII) for t in caption.split("\n")]
        placed.append((heads, boxes, max(y + row, band * len(heads)) + 6))
    legend = "marked: changed from the original; underlined: changed since the line above"
    height = 4 + 2 * band + 6 + sum(h for _, _, h in placed)
    image = Image.new("RGB", (width, height), (_BACKGROUND,) * 3)
    draw = ImageDraw.Draw(image)
    draw.text((4, 2), title if unicode_ok else title.translate(_ASCII), fill=(0, 0, 0), font=font)
    draw.text((4, 2 + band), legend, fill=(90, 90, 90), font=font)
    y0 = 4 + 2 * band + 6
    for heads, boxes, h in placed:
        for k, text in enumerate(heads):
            draw.text((4, y0 + k * band), text, fill=(0, 0, 0), font=font)
        for x, y, piece, was_changed, fresh in boxes:
            left, top = _CAPTION + x, y0 + y
            w = font.getlength(piece) + 2 * _PAD
            if was_changed:
                draw.rectangle((left, top, left + w, top + row - 2), fill=_CHANGED, outline=_OUTLINE)
            draw.text((left + _PAD, top + _PAD), piece, fill=(0, 0, 0), font=font)
            if fresh:
                bottom = top + row - 4
                draw.line((left + _PAD, bottom, left + w - _PAD, bottom), fill=(0, 0, 0), width=2)
        y0 += h
    return image
