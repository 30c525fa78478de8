"""Pictures of morphs: a film strip of one sample's frames, the same frames as an animated GIF, and a row of
class portraits."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import IO, TYPE_CHECKING

import torch
from PIL import Image
from torch import Tensor

from peering._files import atomic_write
from peering.errors import PeeringIndexError, PeeringValueError
from peering.render._draw import Display, _compose, _rgb, display_images

if TYPE_CHECKING:  # only for type hints: render never imports the modules that produce these
    from peering.morph.ascent import MorphResult

__all__ = ["film_strip", "portrait_row", "save_gif"]


def _frame_indices(n_frames: int, max_frames: int) -> list[int]:
    """At most ``max_frames`` evenly spread indices into ``n_frames``, always the first and the last."""
    if n_frames <= max_frames:
        return list(range(n_frames))
    if max_frames < 2:
        raise PeeringValueError(f"max_frames must be at least 2 (first and last frame), got {max_frames}")
    return torch.linspace(0, n_frames - 1, max_frames).round().to(torch.int64).unique().tolist()


def _morph_frames(result: MorphResult | SimpleNamespace, index: int) -> tuple[Tensor, int, list[str]]:
    """(frames [F', ...] of one sample up to where it stopped, picture dims, caption of each frame).

    With ``result.steps`` (the step each sample first reached its target, -1 never), the frames end at
    the first kept frame at or after that step: a sample that arrived at step 1 of 100 shows two frames,
    not a hundred identical ones. The last caption says what happened, and gives the target's probability
    when the last frame shown is the final input (the one ``result.probabilities`` describe).
    """
    frames = result.frames
    n = frames.shape[1]
    if not -n <= index < n:
        raise PeeringIndexError(f"index {index} out of range for {n} samples")
    index %= n
    steps = [int(s) for s in result.frame_steps.reshape(-1).tolist()]
    if len(steps) != frames.shape[0]:
        raise PeeringValueError(f"{frames.shape[0]} frames but {len(steps)} frame_steps")
    sample = frames[:, index]
    last = len(steps) - 1
    reached = getattr(result, "steps", None)
    arrival = None if reached is None else int(reached.reshape(-1)[index])
    if arrival is not None and arrival >= 0:
        last = next((i for i, s in enumerate(steps) if s >= arrival), last)
    captions = [f"step {s}" for s in steps[: last + 1]]
    probs, targets = getattr(result, "probabilities", None), getattr(result, "targets", None)
    target = int(targets.reshape(-1)[index]) if targets is not None else -1
    if target < 0:
        return sample[: last + 1], frames.ndim - 2, captions
    final = last == len(steps) - 1 or bool(torch.equal(sample[last], sample[-1]))
    p = f"p({target})={float(probs[index, target]):.2f}" if probs is not None and final else ""
    s = steps[last]
    if arrival is None:
        head, tail = f"step {s}", p
    elif arrival < 0:
        head, tail = f"step {s}: {_unreached(result, index, target, final)}", p
    elif arrival == 0:
        head, tail = f"step {s}: already {target}", p
    elif arrival == s:
        head, tail = f"step {s}: reached {target}", p
    else:
        head, tail = f"step {s}", f"reached {target} at step {arrival}" + (f", {p}" if p else "")
    captions[-1] = f"{head}\n{tail}" if tail else head
    return sample[: last + 1], frames.ndim - 2, captions


def _unreached(result: MorphResult | SimpleNamespace, index: int, target: int, final: bool) -> str:
    """What the last caption of a morph that never met the stopping rule says: "still not 8" while 8 is
    not the top class, "8, not yet p ≥ 0.99" when it is but below the asked-for confidence."""
    confidence = getattr(result, "confidence", None)
    probs = getattr(result, "probabilities", None)
    if confidence is not None and probs is not None and final and int(probs[index].argmax()) == target:
        return f"{target}, not yet p ≥ {confidence:g}"
    return f"still not {target}"


def film_strip(
    result: MorphResult | SimpleNamespace,
    index: int,
    *,
    zoom: int = 4,
    max_frames: int = 12,
    display: Display = None,
) -> Image.Image:
    """One sample's morph as a row of frames captioned "step s", ending where the sample stopped.

    The strip ends at the sample's arrival step (``result.steps``: the first step the sample met morph's
    stopping rule: its target is the model's top class, with the asked-for confidence) and the last
    caption says so: "step 37: reached 8" (or "reached 8 at step 37" when frames
    were kept every few steps, "already 8" at step 0, "still not 8" when it never arrived, "8, not yet
    p ≥ 0.99" when it is the top class but below morph's ``confidence``), with the
    target's probability when the last frame is the final input.

    Args:
        result: a `MorphResult` (or any object with ``.frames`` [F, B, ...], ``.frame_steps`` [F], and
            optionally ``.steps`` [B], ``.targets`` [B] and ``.probabilities`` [B, C]).
        index: which sample of the batch.
        zoom: integer nearest-neighbour magnification.
        max_frames: at most this many frames, evenly subsampled, always with the first and the last.
        display: how inputs become pictures (None, ``(mean, std)`` or a function; see
            `explanation_image`).

    >>> import torch
    >>> from types import SimpleNamespace
    >>> from peering.render import film_strip
    >>> res = SimpleNamespace(frames=torch.rand(20, 2, 1, 28, 28), frame_steps=torch.arange(20) * 5,
    ...                       steps=torch.tensor([12, -1]), targets=torch.tensor([3, 8]),
    ...                       probabilities=torch.rand(2, 10).softmax(1))
    >>> film_strip(res, 0).size  # frames at steps 0, 5, 10 and 15 (the sample arrived at step 12)
    (704, 156)
    """
    frames, sample_ndim, captions = _morph_frames(result, index)
    keep = _frame_indices(frames.shape[0], max_frames)
    titles = [captions[i] for i in keep]
    shown = display_images(frames[keep], display, sample_ndim)
    tiles = _rgb(shown, sample_ndim)[None]  # [1, F', H, W, 3]
    return Image.fromarray(_compose(tiles, [titles], zoom=zoom)[0])


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
