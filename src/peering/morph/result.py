"""What a morph returns (`MorphResult`), and what image and text morphs share: the checks of the target and
the confidence, the frames kept, the stopping rule and the progress bar."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from peering._model import check_head, check_targets
from peering.errors import PeeringValueError

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
            probability >= ``confidence`` when one was asked for, and every prior with a say lets it stop
            (`peering.priors.Prior.settled`; `Prototypes`: it is well nearer the target's reference images
            than any other class's).
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


def _check_confidence(confidence: Any) -> None:
    if confidence is not None and (isinstance(confidence, bool) or not 0 < confidence < 1):
        raise PeeringValueError(
            f"confidence must be a probability in (0, 1) or None (stop at the top class), got {confidence!r}"
        )


def _frame_steps(steps: int, keep_every: int) -> list[int]:
    """The steps whose frames are kept: every ``keep_every``-th, and always the first and the last."""
    kept = list(range(0, steps + 1, keep_every))
    if kept[-1] != steps:
        kept.append(steps)
    return kept


def _one_target(target: Any, b: int, n_classes: int, output: str, device: torch.device) -> Tensor:
    """int64 [B]: one target per sample (an int or a [B] tensor), checked against the classes; a softmax
    over one output refused (`peering._model.check_head`)."""
    check_head(n_classes, output)
    targets = check_targets(target, b, n_classes)
    if targets.shape[1] != 1:
        raise PeeringValueError(
            f"morph takes one target per sample (an int or a [B] tensor), got shape {list(targets.shape)}"
        )
    return targets[:, 0].to(device)
