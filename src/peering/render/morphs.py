"""Pictures of morphs: a film strip of one sample's frames, the same frames as an animated GIF, and a row of
class portraits."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import IO, TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image
from torch import Tensor

from peering._files import atomic_write
from peering.errors import PeeringValueError
from peering.render._draw import Display, _compose, _numpy, _rgb, display_images, scale_caption
from peering.render._frames import _frame_indices, _morph_frames
from peering.render._legend import SHORT, headed
from peering.render.features import bar_tiles, resolve_kind

if TYPE_CHECKING:  # only for type hints: render never imports the modules that produce these
    from peering.morph.ascent import MorphResult

__all__ = ["film_strip", "portrait_row", "save_gif"]


def film_strip(
    result: MorphResult | SimpleNamespace,
    index: int,
    *,
    zoom: int = 4,
    max_frames: int = 12,
    display: Display = None,
    tokenizer: Any = None,
    kind: Literal["auto", "image", "features"] = "auto",
    feature_names: Sequence[str] | None = None,
    top_n: int = 10,
) -> Image.Image:
    """One sample's morph as a row of frames captioned "step s", ending where the sample stopped, under a
    line saying what was ascended ("steps up log p(8)").

    The strip ends at the sample's arrival step (``result.steps``: the first step the sample met morph's
    stopping rule: its target is the model's top class, with the asked-for confidence) and the last
    caption says so: "step 37: reached 8" (or "reached 8 at step 37" when frames
    were kept every few steps, "already 8" at step 0, "still not 8" when it never arrived, "8, not yet
    p ≥ 0.99" when it is the top class but below morph's ``confidence``), with the
    target's probability when the last frame is the final input.

    Token ids (a text morph, `peering.morph.text`) are drawn as sentences, one per frame, the swapped
    tokens marked (`peering.render.token_strip`, with ``tokenizer``). Tabular inputs (``kind``, see
    `peering.render.input_kind`) are drawn as bars of the features that changed most between the original
    and where the sample stopped, each named and labelled with its value before and after.

    Args:
        result: a `MorphResult` (or any object with ``.frames`` [F, B, ...], ``.frame_steps`` [F], and
            optionally ``.steps`` [B], ``.targets`` [B], ``.probabilities`` [B, C] and ``.output``).
        index: which sample of the batch.
        zoom: integer nearest-neighbour magnification.
        max_frames: at most this many frames, evenly subsampled, always with the first and the last.
        display: how inputs become pictures (None, ``(mean, std)`` or a function; see
            `explanation_image`).
        tokenizer: for text morphs: turns ids into the words drawn.
        kind, feature_names, top_n: for flat inputs: "image", "features" or "auto"; the features' names;
            how many changed features get a bar.

    >>> import torch
    >>> from types import SimpleNamespace
    >>> from peering.render import film_strip
    >>> res = SimpleNamespace(frames=torch.rand(20, 2, 1, 28, 28), frame_steps=torch.arange(20) * 5,
    ...                       steps=torch.tensor([12, -1]), targets=torch.tensor([3, 8]),
    ...                       probabilities=torch.rand(2, 10).softmax(1))
    >>> film_strip(res, 0).size  # frames at steps 0, 5, 10 and 15 (the sample arrived at step 12)
    (704, 178)
    """
    if isinstance(result.frames, Tensor) and not result.frames.is_floating_point():
        from peering.render.text_morphs import token_strip

        return token_strip(result, index, tokenizer=tokenizer, max_frames=max_frames)
    frames, sample_ndim, captions = _morph_frames(result, index)
    what = _ascended(result, index)
    if sample_ndim == 1 and resolve_kind(kind, frames.shape[1:]) == "features":
        return _feature_changes(frames, captions[-1], what, feature_names, top_n)
    keep = _frame_indices(frames.shape[0], max_frames)
    titles = [captions[i] for i in keep]
    shown = display_images(frames[keep], display, sample_ndim)
    tiles = _rgb(shown, sample_ndim)[None]  # [1, F', H, W, 3]
    return Image.fromarray(headed(_compose(tiles, [titles], zoom=zoom), [what])[0])


def _ascended(result: MorphResult | SimpleNamespace, index: int) -> str:
    """ "steps up log p(8)": what the morph of sample ``index`` ascended."""
    targets = getattr(result, "targets", None)
    output = getattr(result, "output", "log_probability")
    if targets is None:
        return "morph"
    return f"steps up {SHORT.get(output, output)}({int(targets.reshape(-1)[index])})"


def _feature_changes(
    frames: Tensor, last: str, what: str, feature_names: Sequence[str] | None, top_n: int
) -> Image.Image:
    """A tabular morph: bars of the features that changed most from the first frame to the last, each
    labelled "name: before → after" (the bar: the change)."""
    before, after = _numpy(frames[0]), _numpy(frames[-1])
    change = (after - before)[None, None]  # [1, 1, D]
    d = before.shape[0]
    names = list(feature_names) if feature_names is not None else [f"feature {j}" for j in range(d)]
    if len(names) != d:
        raise PeeringValueError(f"feature_names has {len(names)} names, the inputs have {d} features")
    pairs = zip(names, before.tolist(), after.tolist(), strict=True)
    labels = [f"{n}: {b:.3g} → {a:.3g}" for n, b, a in pairs]
    scale = np.abs(change).reshape(1, -1).max(axis=1, initial=0.0)
    tiles = bar_tiles(change, None, feature_names=labels, top_n=top_n, scale=scale)
    title = f"{last.replace(chr(10), ', ')}: change from step 0\n{scale_caption(float(scale[0]))}"
    rows = _compose(tiles, [[title]], zoom=1)
    return Image.fromarray(headed(rows, [what])[0])


def save_gif(
    result: MorphResult | SimpleNamespace,
    index: int,
    path: str | os.PathLike[str],
    *,
    zoom: int = 4,
    duration_ms: int = 80,
    display: Display = None,
) -> Path:
    """One sample's kept frames up to where it stopped as an animated GIF (looping), written atomically.

    Each frame is the zoomed input under its "step s" caption; the last one says where the sample
    stopped, as in `film_strip`. Returns the path written.

    >>> import tempfile, torch
    >>> from types import SimpleNamespace
    >>> from peering.render import save_gif
    >>> res = SimpleNamespace(frames=torch.rand(5, 2, 1, 28, 28), frame_steps=torch.arange(5),
    ...                       targets=torch.tensor([3, 8]), probabilities=torch.rand(2, 10).softmax(1))
    >>> save_gif(res, 1, tempfile.mkdtemp() + "/morph.gif").suffix
    '.gif'
    """
    frames, sample_ndim, captions = _morph_frames(result, index)
    shown = display_images(frames, display, sample_ndim)
    panels = _compose(_rgb(shown, sample_ndim)[:, None], [[c] for c in captions], zoom=zoom)  # [F, H', W', 3]
    images = [Image.fromarray(p) for p in panels]

    def write(f: IO[bytes]) -> None:
        images[0].save(f, format="GIF", save_all=True, append_images=images[1:], duration=duration_ms, loop=0)

    return atomic_write(path, write, fsync=True)


def portrait_row(
    result: MorphResult | SimpleNamespace,
    *,
    zoom: int = 4,
    names: Sequence[str] | None = None,
    display: Display = None,
) -> Image.Image:
    """Class portraits (what `peering.portraits` returns) side by side, each captioned with its class and
    the model's probability for it, e.g. "8" over "p=0.99".

    Args:
        result: a `MorphResult` (or any object with ``.inputs`` [K, ...], ``.targets`` [K] and optionally
            ``.probabilities`` [K, C] and ``.success`` [K]); a portrait that did not meet the stopping rule
            is captioned "(not reached)".
        zoom: integer nearest-neighbour magnification.
        names: a display name for each class index (default: the index).
        display: how inputs become pictures (see `explanation_image`).

    >>> import torch
    >>> from types import SimpleNamespace
    >>> from peering.render import portrait_row
    >>> res = SimpleNamespace(inputs=torch.rand(10, 1, 28, 28), targets=torch.arange(10),
    ...                       probabilities=torch.eye(10), success=torch.ones(10, dtype=torch.bool))
    >>> portrait_row(res, zoom=2).size
    (696, 100)
    """
    inputs = result.inputs
    targets = [int(t) for t in result.targets.reshape(-1).tolist()]
    if len(targets) != inputs.shape[0]:
        raise PeeringValueError(f"{inputs.shape[0]} portraits but {len(targets)} targets")
    probs = getattr(result, "probabilities", None)
    success = getattr(result, "success", None)
    captions = []
    for k, t in enumerate(targets):
        name = names[t] if names is not None else str(t)
        lines = [name]
        if probs is not None:
            lines.append(f"p={float(probs[k, t]):.2f}")
        if success is not None and not bool(success[k]):
            lines.append("(not reached)")
        captions.append("\n".join(lines))
    sample_ndim = inputs.ndim - 1
    shown = display_images(inputs, display, sample_ndim)
    tiles = _rgb(shown, sample_ndim)[None]  # [1, K, H, W, 3]
    return Image.fromarray(_compose(tiles, [captions], zoom=zoom)[0])
