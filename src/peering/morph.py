"""`morph`: walk inputs up the gradient of a target class until the model predicts it."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from peering._guard import (
    ForwardKwargs,
    check_inputs,
    check_output,
    check_targets,
    class_scores,
    gradient_context,
    num_classes,
    transform,
)

__all__ = ["MorphResult", "morph"]


@dataclass(frozen=True)
class MorphResult:
    """What `morph` returns.

    Attributes:
        inputs: the final inputs [B, ...].
        frames: the kept frames [F, B, ...]; the first is the original, the last the final inputs.
        frame_steps: int64 [F]: the step number of each frame.
        targets: int64 [B]: the class each sample was pushed toward.
        success: bool [B]: the model predicts the target for the final input.
        steps: int64 [B]: the step at which each sample was first predicted as its target (0 if it
            already was, -1 if never).
        distance: float [B]: L2 distance between the final and the original input.
        logits, probabilities: [B, C] for the final inputs.
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

    def __len__(self) -> int:
        return self.inputs.shape[0]


def morph(
    model: nn.Module,
    inputs: Tensor,
    target: int | Tensor,
    *,
    steps: int = 100,
    step_size: float | None = None,
    output: Literal["probability", "log_probability", "logit"] = "log_probability",
    norm: Literal["l2", "linf"] = "l2",
    budget: float | None = None,
    bounds: tuple[float | Tensor, float | Tensor] | None = (0.0, 1.0),
    early_stop: bool = True,
    keep_every: int = 1,
    output_fn: Callable[[Any], Tensor] | None = None,
    chunk_size: int = 64,
    progress: bool = False,
    forward_kwargs: Mapping[str, Any] | None = None,
) -> MorphResult:
    """Change inputs by normalised gradient-ascent steps until the model predicts ``target``.

    Each step moves every still-moving sample by ``step_size`` along its gradient of the target's
    ``output``, normalised per sample (unit L2 norm for ``norm="l2"``, its sign for ``"linf"``), then
    projects onto the ``budget`` ball around the original (if given) and clamps to ``bounds``. With
    ``early_stop``, a sample that the model predicts as its target stops moving while the others go on, and
    a chunk of samples that all arrived stops early. One forward and one backward pass per step for the
    whole (chunk of the) batch; no loop over samples.

    Args:
        model: a classifier mapping [B, ...] to class scores [B, C]; run in eval mode, state restored.
        inputs: float tensor [B, ...] inside ``bounds``.
        target: an int (one class for all) or an int64 tensor [B].
        steps: the most ascent steps.
        step_size: the length of each step in ``norm``. Default: for "l2", 0.005 * sqrt(numel per sample)
            * (hi - lo) (0.14 for 28x28 images in [0, 1]); for "linf", 0.01 * (hi - lo); with per-element
            bounds, (hi - lo) is their mean finite span.
        output: the quantity ascended: "log_probability" (default, does not vanish when the target's
            probability is tiny), "probability" or "logit".
        norm: "l2" or "linf": the step's normalisation and the budget's ball.
        budget: the largest distance from the original (in ``norm``), or None for no limit.
        bounds: the valid input range (lo, hi), or None for no clamping. Each end is a number or a tensor
            broadcastable to one sample (standardised tabular features each have their own range).
        early_stop: stop moving each sample once it is predicted as its target.
        keep_every: keep a frame every this many steps (the first and the final frame are always kept).
        output_fn: picks the class scores from a model output that is not a plain tensor.
        chunk_size: samples morphed together; the chunks run one after another.
        progress: show a tqdm progress bar over the chunks' steps.
        forward_kwargs: extra keyword arguments of the model, as in `peering.explain`: tensors whose
            first dimension is B follow their samples through chunks and early stops.

    >>> import torch, peering
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    >>> res = peering.morph(model, torch.rand(4, 1, 8, 8), target=3)
    >>> res.success.tolist(), res.steps.tolist()
    ([True, True, True, True], [48, 55, 26, 61])
    >>> res.frames.shape  # 100 steps and the original; the early-stopped samples stand still
    torch.Size([101, 4, 1, 8, 8])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_output(output)
    check_inputs(inputs)
    if norm not in ("l2", "linf"):
        raise ValueError(f"norm must be 'l2' or 'linf', got {norm!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if isinstance(keep_every, bool) or not isinstance(keep_every, int) or keep_every < 1:
        raise ValueError(f"keep_every must be an int >= 1, got {keep_every!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if budget is not None and not (budget >= 0 and math.isfinite(budget)):
        raise ValueError(f"budget must be a finite number >= 0 or None, got {budget}")
    clamp = _check_bounds(bounds, inputs)
    if step_size is None:
        spans = (clamp[1] - clamp[0]) if clamp is not None else torch.ones(1)
        spans = spans[torch.isfinite(spans)]
        span = float(spans.mean()) if spans.numel() else 1.0
        numel = math.prod(inputs.shape[1:])
        step_size = 0.005 * math.sqrt(numel) * span if norm == "l2" else 0.01 * span
    if not (step_size > 0 and math.isfinite(step_size)):
        raise ValueError(f"step_size must be a finite number > 0, got {step_size}")

    b = inputs.shape[0]
    frame_steps = list(range(0, steps + 1, keep_every))
    if frame_steps[-1] != steps:
        frame_steps.append(steps)
    with gradient_context(model):
        x0 = inputs.detach().clone()
        kwargs = ForwardKwargs(forward_kwargs, b)
        n_classes = num_classes(model, x0, output_fn, kwargs)
        targets = check_targets(target, b, n_classes)
        if targets.shape[1] != 1:
            raise ValueError(
                f"morph takes one target per sample (an int or a [B] tensor), got shape {list(targets.shape)}"
            )
        targets = targets[:, 0].to(x0.device)
        walker = _Walker(model, output, output_fn, step_size, norm, budget, clamp, early_stop)
        frames = x0.new_empty((len(frame_steps), *x0.shape))
        logits = x0.new_empty((b, n_classes))
        reached = torch.full((b,), -1, dtype=torch.int64, device=x0.device)
        bar = _progress_bar(progress, total=math.ceil(b / chunk_size) * steps)
        try:
            for start in range(0, b, chunk_size):
                stop = min(start + chunk_size, b)
                walker.run(
                    kwargs.select(slice(start, stop)),
                    x0[start:stop],
                    targets[start:stop],
                    steps,
                    frame_steps,
                    frames[:, start:stop],
                    logits[start:stop],
                    reached[start:stop],
                    bar,
                )
        finally:
            if bar is not None:
                bar.close()
    final = frames[-1]
    return MorphResult(
        inputs=final.clone(),
        frames=frames,
        frame_steps=torch.tensor(frame_steps, dtype=torch.int64),
        targets=targets,
        success=logits.argmax(dim=1) == targets if b else torch.zeros(0, dtype=torch.bool),
        steps=reached,
        distance=(final - x0).flatten(1).norm(dim=1),
        logits=logits,
        probabilities=logits.softmax(dim=1),
    )


@dataclass
class _Walker:
    model: nn.Module
    output: str
    output_fn: Callable[[Any], Tensor] | None
    step_size: float
    norm: str
    budget: float | None
    bounds: tuple[Tensor, Tensor] | None
    early_stop: bool

    def run(
        self,
        kwargs: ForwardKwargs,
        x0: Tensor,
        targets: Tensor,
        steps: int,
        frame_steps: list[int],
        frames: Tensor,
        logits: Tensor,
        reached: Tensor,
        bar: Any,
    ) -> None:
        """Morph one chunk in place: fills its slice of ``frames``, ``logits`` and ``reached``."""
        x = x0.clone()
        moving = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        frame = 0
        for t in range(steps + 1):
            if frame < len(frame_steps) and frame_steps[frame] == t:
                frames[frame] = x
                frame += 1
            everyone = bool(moving.all())
            idx = torch.arange(x.shape[0], device=x.device) if everyone else moving.nonzero().flatten()
            xa = (x if everyone else x[idx]).clone().requires_grad_(True)
            ta = targets if everyone else targets[idx]
            xa_kwargs = kwargs.rows(slice(None) if everyone else idx)
            scores = class_scores(self.model, xa, self.output_fn, xa_kwargs)
            hit = scores.detach().argmax(dim=1) == ta
            if everyone:
                logits.copy_(scores.detach())
                reached.masked_fill_(hit & (reached < 0), t)
            else:
                logits[idx] = scores.detach()
                first = hit & (reached[idx] < 0)
                reached[idx[first]] = t
            if t == steps:
                break
            if self.early_stop and bool(hit.any()):
                go = ~hit
                if everyone:
                    moving = go
                else:
                    moving[idx[hit]] = False
                if not bool(go.any()):
                    if bar is not None:
                        bar.update(steps - t)
                    break
            else:
                go = None
            (grad,) = torch.autograd.grad(transform(scores, self.output).gather(1, ta[:, None]).sum(), xa)
            new = self._step(xa.detach(), grad, x0 if everyone else x0[idx])
            if go is None and everyone:
                x = new
            else:
                rows = idx
                if go is not None:
                    rows, new = rows[go], new[go]
                x[rows] = new
            if bar is not None:
                bar.update(1)
        frames[frame:] = x  # the chunk stopped early: nothing moves any more

    def _step(self, x: Tensor, grad: Tensor, x0: Tensor) -> Tensor:
        shape = (-1, *([1] * (x.ndim - 1)))
        if self.norm == "l2":
            direction = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(shape)
        else:
            direction = grad.sign()
        new = x + self.step_size * direction
        if self.budget is not None:
            delta = new - x0
            if self.norm == "l2":
                length = delta.flatten(1).norm(dim=1).view(shape)
                delta = delta * (self.budget / length.clamp_min(1e-12)).clamp(max=1.0)
            else:
                delta = delta.clamp(-self.budget, self.budget)
            new = x0 + delta
        if self.bounds is not None:
            new = torch.minimum(torch.maximum(new, self.bounds[0]), self.bounds[1])
        return new


def _check_bounds(bounds: Any, inputs: Tensor) -> tuple[Tensor, Tensor] | None:
    """(lo, hi) as tensors broadcastable to one sample, checked against each other and the inputs."""
    if bounds is None:
        return None
    sample = inputs.shape[1:]
    try:
        lo, hi = bounds
        ends = [torch.as_tensor(v, dtype=inputs.dtype, device=inputs.device) for v in (lo, hi)]
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(
            f"bounds must be a (low, high) pair of numbers or of tensors broadcastable to one sample "
            f"{list(sample)}, or None; got {bounds!r}"
        ) from None
    try:
        lo_t, hi_t = (torch.broadcast_to(e, sample) for e in ends)
    except RuntimeError:
        raise ValueError(
            f"bounds of shapes {[list(e.shape) for e in ends]} do not broadcast to one sample "
            f"{list(sample)}"
        ) from None
    if not bool((lo_t < hi_t).all()):
        raise ValueError(f"bounds must have low < high everywhere, got {bounds!r}")
    if inputs.numel():
        outside = (inputs < lo_t) | (inputs > hi_t)
        if bool(outside.any()):
            rows = outside.flatten(1).any(dim=1).nonzero().flatten().tolist()
            raise ValueError(
                f"inputs lie outside bounds in {len(rows)} sample(s) (batch indices {rows[:10]}; min "
                f"{float(inputs.min()):.3g}, max {float(inputs.max()):.3g}); scale them into the range "
                "or pass bounds=None"
            )
    return lo_t, hi_t


def _progress_bar(enabled: bool, total: int) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="morph", unit="step", leave=False)
