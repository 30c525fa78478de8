"""Pictures of morphs: a film strip of one sample's frames, and the same frames as an animated GIF."""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, TYPE_CHECKING

import torch
from PIL import Image
from torch import Tensor

from peering._files import atomic_write
from peering.render._draw import _compose, _rgb

if TYPE_CHECKING:  # only for type hints: render never imports the modules that produce these
    from peering.morph import MorphResult

__all__ = ["film_strip", "save_gif"]


def _frame_indices(n_frames: int, max_frames: int) -> list[int]:
    """At most ``max_frames`` evenly spread indices into ``n_frames``, always the first and the last."""
    if n_frames <= max_frames:
        return list(range(n_frames))
    if max_frames < 2:
        raise ValueError(f"max_frames must be at least 2 (first and last frame), got {max_frames}")
    return torch.linspace(0, n_frames - 1, max_frames).round().to(torch.int64).unique().tolist()


def _morph_frames(result: MorphResult, index: int) -> tuple[Tensor, int, list[int], str]:
    """(frames [F, ...] of one sample, picture dims, step of each frame, suffix for the last caption)."""
    frames = result.frames
    n = frames.shape[1]
    if not -n <= index < n:
        raise IndexError(f"index {index} out of range for {n} samples")
    index %= n
    steps = result.frame_steps.reshape(-1).tolist()
    if len(steps) != frames.shape[0]:
        raise ValueError(f"{frames.shape[0]} frames but {len(steps)} frame_steps")
    suffix = ""
    probs, targets = getattr(result, "probabilities", None), getattr(result, "targets", None)
    if probs is not None and targets is not None:
        target = int(targets.reshape(-1)[index])
        if target >= 0:
            suffix = f" →{target} p={float(probs[index, target]):.2f}"
    return frames[:, index], frames.ndim - 2, steps, suffix


def film_strip(result: MorphResult, index: int, *, zoom: int = 4, max_frames: int = 12) -> Image.Image:
    """One sample's morph as a row of frames captioned "step s"; the last adds "→t p=0.93", the target
    class and its probability for the final input.

    Args:
        result: a `MorphResult` (or any object with ``.frames`` [F, B, ...], ``.frame_steps`` [F], and
            optionally ``.targets`` [B] and ``.probabilities`` [B, C]).
        index: which sample of the batch.
        zoom: integer nearest-neighbour magnification.
        max_frames: at most this many frames, evenly subsampled, always with the first and the last.

    >>> import torch
    >>> from types import SimpleNamespace
    >>> from peering.render import film_strip
    >>> res = SimpleNamespace(frames=torch.rand(20, 2, 1, 28, 28), frame_steps=torch.arange(20) * 5,
    ...                       targets=torch.tensor([3, 8]), probabilities=torch.rand(2, 10).softmax(1))
    >>> film_strip(res, 0, max_frames=6).size
    (686, 130)
    """
    frames, sample_ndim, steps, suffix = _morph_frames(result, index)
    keep = _frame_indices(frames.shape[0], max_frames)
    titles = [f"step {steps[i]}" for i in keep]
    titles[-1] += suffix
    tiles = _rgb(frames[keep], sample_ndim)[None]  # [1, F', H, W, 3]
    return Image.fromarray(_compose(tiles, [titles], zoom=zoom)[0])


def save_gif(
    result: MorphResult,
    index: int,
    path: str | os.PathLike[str],
    *,
    zoom: int = 4,
    duration_ms: int = 80,
) -> Path:
    """All kept frames of one sample's morph as an animated GIF (looping forever), written atomically.

    Each frame is the zoomed input under a "step s" caption (the last also shows the target's
    probability, as in `film_strip`). Returns the path written.

    >>> import tempfile, torch
    >>> from types import SimpleNamespace
    >>> from peering.render import save_gif
    >>> res = SimpleNamespace(frames=torch.rand(5, 2, 1, 28, 28), frame_steps=torch.arange(5),
    ...                       targets=torch.tensor([3, 8]), probabilities=torch.rand(2, 10).softmax(1))
    >>> save_gif(res, 1, tempfile.mkdtemp() + "/morph.gif").suffix
    '.gif'
    """
    frames, sample_ndim, steps, suffix = _morph_frames(result, index)
    titles = [[f"step {s}"] for s in steps]
    titles[-1][0] += suffix
    panels = _compose(_rgb(frames, sample_ndim)[:, None], titles, zoom=zoom)  # [F, H', W', 3]
    images = [Image.fromarray(p) for p in panels]

    def write(f: IO[bytes]) -> None:
        images[0].save(f, format="GIF", save_all=True, append_images=images[1:], duration=duration_ms, loop=0)

    return atomic_write(path, write, fsync=True)
