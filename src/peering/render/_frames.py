"""The frames of one morphed sample as the film strips show them: where the strip ends, and each frame's
caption. Private to `peering.render` (`peering.render.morphs` and `peering.render.text_morphs`)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from peering.errors import PeeringIndexError, PeeringValueError

if TYPE_CHECKING:  # only for type hints: render never imports the modules that produce these
    from peering.morph.ascent import MorphResult


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
    name = "σ" if getattr(result, "output", None) == "sigmoid" else "p"
    p = f"{name}({target})={float(probs[index, target]):.2f}" if probs is not None and final else ""
    s = steps[last]
    if arrival is None:
        outcome = ""
    elif arrival < 0:
        outcome = _unreached(result, index, target, final)
    elif arrival == 0:
        outcome = f"already {target}"
    elif arrival == s:
        outcome = f"reached {target}"
    else:
        outcome = f"reached {target} at step {arrival}"
    # short lines, so that the last frame's cell (and with it every cell) stays narrow
    captions[-1] = "\n".join(line for line in (f"step {s}", outcome, p) if line)
    return sample[: last + 1], frames.ndim - 2, captions


def _unreached(result: MorphResult | SimpleNamespace, index: int, target: int, final: bool) -> str:
    """What the last caption of a morph that never met the stopping rule says: "still not 8" while 8 is
    not the top class, "8, not yet p ≥ 0.99" when it is but below the asked-for confidence ("8: σ not yet
    ≥ 0.99" for a sigmoid)."""
    confidence = getattr(result, "confidence", None)
    probs = getattr(result, "probabilities", None)
    if getattr(result, "output", None) == "sigmoid":
        return f"{target}: σ not yet ≥ {0.5 if confidence is None else confidence:g}"
    if confidence is not None and probs is not None and final and int(probs[index].argmax()) == target:
        return f"{target}, not yet p ≥ {confidence:g}"
    return f"still not {target}"
