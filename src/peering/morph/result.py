"""What a morph returns (`MorphResult`), and what image and text morphs share: the stopping rule and the
progress bar."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["MorphResult"]


@dataclass(frozen=True)
class MorphResult:
    """What `morph` returns.

    Attributes:
        inputs: the final inputs [B, ...].
        frames: the kept frames [F, B, ...]; the first is the original, the last the final inputs.
        frame_steps: int64 [F]: the step number of each frame.
        targets: int64 [B]: the class each sample was pushed toward.
        success: bool [B]: the final input meets the stopping rule: the model predicts the target, with
            probability >= ``confidence`` when one was asked for.
        steps: int64 [B]: the step at which each sample first met the stopping rule (0 if it already
            did, -1 if never).
        distance: float [B]: L2 distance between the final and the original input.
        logits, probabilities: [B, C] for the final inputs (for a list of models: the log of their mean
            probability, and that mean probability).
        confidence: the target probability the morph asked for, or None (the top class is enough).
        output: what was ascended ("probability", "log_probability", "logit" or "sigmoid").
    """

    inputs: Tensor
    frames: Tensor
    frame_steps: Tensor
    targets: Tensor
    success: Tensor
    steps: Tensor
    distance: Tensor
    logits: Tensor
    probabilities: Tensor
    confidence: float | None = None
    output: str = "log_probability"

    def __len__(self) -> int:
        return self.inputs.shape[0]


def _arrived(
    scores: Tensor, targets: Tensor, confidence: float | None, output: str = "log_probability"
) -> Tensor:
    """bool [B]: the stopping rule: the target is the top class (with probability >= confidence); with
    "sigmoid", the target's own sigmoid probability is >= confidence (>= 0.5 without one)."""
    if scores.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool, device=scores.device)
    if output == "sigmoid":
        own = scores.sigmoid().gather(1, targets[:, None])[:, 0]
        return own >= (0.5 if confidence is None else confidence)
    hit = scores.argmax(dim=1) == targets
    if confidence is not None:
        hit &= scores.softmax(dim=1).gather(1, targets[:, None])[:, 0] >= confidence
    return hit


def _progress_bar(enabled: bool, total: int) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="morph", unit="step", leave=False)
