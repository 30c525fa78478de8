"""Do the maps point at what the model uses? Deletion and insertion curves (Petsiuk et al., 2018).

`deletion_insertion` ranks each sample's input elements by their attribution, most important first, and
watches the class score as they are replaced by a baseline in that order (*deletion*: a faithful map
makes the score fall fast, a small area under the curve) or restored from the baseline into an input that
starts as the baseline (*insertion*: the score should rise fast, a large area). The same run scores a
random ranking of the same elements, the control every map must beat.

DESIGN.md sketched the checks as one ``evaluate.py``; three were built in parallel, one idea per module:
``peering.sanity`` (model randomisation), ``peering.faithfulness`` (this) and ``peering.agreement`` (do
independent judges agree on a morph).

What these curves can and cannot tell:

- They measure one thing: whether the *ranking* of elements predicts the effect of *replacing* them by
  the baseline. Input x gradient and integrated gradients estimate exactly that effect (to first order, and
  along a path from that baseline); the plain gradient answers another question (where a *small change*
  moves the score), and ranks background pixels high where adding ink would help; deleting a background
  pixel that is already 0 changes nothing. A low score for the gradient is a fact about the question it
  answers, not proof that it is wrong.
- The perturbed inputs are out of the data: a digit with holes punched in it. The model's score on them
  also reflects how it treats holes, and the shape of the mask itself carries information (a deletion
  mask that follows the strokes draws the digit). Maps that are smooth blobs delete whole regions at once
  and can score well for that reason alone; compare methods at the same smoothness, and against the
  random control.
- Scores depend on the baseline (``"zero"``, ``"blur"``, ``"mean"``, a number or a tensor): report it
  with the numbers.

Elements: for images [B, C, H, W] the pixels (H x W positions, one mask for all channels, ranked by the
attribution summed over channels, as torchcam does); for any other input, every element of a sample.
Ties (input x gradient is exactly 0 on every blank pixel) are broken in a random order, seeded, so that
no spatial order (top-left first) sneaks into the curve. The x axis is the fraction of elements actually
perturbed at each point (``fractions``); areas are `torch.trapezoid` over it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peering._model import check_inputs, check_output, check_targets, class_scores, eval_mode, transform
from peering._validate import int_at_least, optional
from peering.attribution.explanation import Explanation
from peering.errors import PeeringTypeError, PeeringValueError
from peering.memory import MemoryBudget, forward_footprint

__all__ = ["DeletionInsertion", "deletion_insertion", "importance_ranks"]

BaselineName = Literal["zero", "blur", "mean"]


@dataclass(frozen=True)
class DeletionInsertion:
    """What `deletion_insertion` returns: curves [B, P] over ``fractions`` [P], and their areas [B].

    Attributes:
        fractions: float [P]: the fraction of elements perturbed at each point, from 0 to 1.
        deletion: [B, P]: the class score as the most important elements are replaced by the baseline
            (lower area: more faithful).
        insertion: [B, P]: the class score as they are put back, starting from the baseline (higher area:
            more faithful).
        random_deletion, random_insertion: [B, P]: the same for a random ranking (the control), or None
            when it was not asked for.
        deletion_area, insertion_area: [B]: `torch.trapezoid` of each curve over ``fractions``.
        random_deletion_area, random_insertion_area: [B] or None.
        targets: int64 [B]: the class scored for each sample.
        baseline: the baseline's name ("zero", "blur", "mean", "constant" or "tensor").
        output: the score: "probability", "log_probability" or "logit".
    """

    fractions: Tensor
    deletion: Tensor
    insertion: Tensor
    random_deletion: Tensor | None
    random_insertion: Tensor | None
    deletion_area: Tensor
    insertion_area: Tensor
    random_deletion_area: Tensor | None
    random_insertion_area: Tensor | None
    targets: Tensor
    baseline: str
    output: str

    def to_dict(self) -> dict[str, float]:
        """Mean areas over the samples: deletion, insertion and, with the control, random_deletion and
        random_insertion (JSON-ready; ``summary()`` is the same, under its older name).

        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
        >>> x = torch.rand(4, 1, 4, 4)
        >>> sorted(deletion_insertion(model, x, torch.rand(4, 1, 4, 4)).to_dict())
        ['deletion', 'insertion', 'random_deletion', 'random_insertion']
        """
        out = {"deletion": float(self.deletion_area.mean()), "insertion": float(self.insertion_area.mean())}
        if self.random_deletion_area is not None and self.random_insertion_area is not None:
            out["random_deletion"] = float(self.random_deletion_area.mean())
            out["random_insertion"] = float(self.random_insertion_area.mean())
        return out

    summary = to_dict


def deletion_insertion(
    model: nn.Module,
    inputs: Tensor,
    attributions: Tensor | Explanation,
    target: int | Tensor | None = None,
    *,
    steps: int = 20,
    baseline: BaselineName | float | Tensor = "zero",
    blur_sigma: float | None = None,
    output: Literal["probability", "log_probability", "logit"] = "probability",
    output_fn: Callable[[Any], Tensor] | None = None,
    random_control: bool = True,
    seed: int = 0,
    chunk_size: int | None = None,
    memory_budget: MemoryBudget | int | float | str | None = None,
) -> DeletionInsertion:
    """Deletion and insertion curves of any attribution, batched, with a random-ranking control.

    Args:
        model: the classifier (run in eval mode without gradients; its modes and the RNG are restored).
        inputs: the samples [B, ...] the attributions explain.
        attributions: [B, ...] (the inputs' shape, or [B, 1, ...]), or an `Explanation` from
            `peering.explain` (its first class per sample is used: ``attributions[:, 0]``, ``targets[:, 0]``).
        target: the class to score per sample (an int or int64 [B]). None: the Explanation's first class,
            or for a plain tensor the model's top-1 class.
        steps: perturbation steps from nothing to everything; each step perturbs about 1/steps of the
            elements (all of them when there are fewer elements than steps).
        baseline: what a removed element becomes: "zero"; "blur" (images only: a Gaussian blur of the
            sample, ``blur_sigma`` pixels, default a tenth of the image's larger side); "mean" (each
            sample's mean, per channel for images); a number; or a tensor broadcastable to the inputs.
        output: the score on the curves: "probability" (as in the paper), "log_probability" or "logit".
        output_fn: picks the class scores out of a model output that is not a plain tensor.
        random_control: also score a random ranking of the same elements (seeded by ``seed``).
        seed: seeds the random control and the random order among tied attributions.
        chunk_size: perturbed inputs per forward pass. Default None: as many as fit ``memory_budget``,
            from a forward pass of one sample (`peering.memory.forward_footprint`).
        memory_budget: as in `peering.explain`: bytes, a size string, a share of free memory or a
            `peering.memory.MemoryBudget`; default a quarter of the available RAM (half the free CUDA
            memory).

    Returns:
        A `DeletionInsertion`.

    Every perturbed input of every step goes through the model in chunks of ``chunk_size``: there is no
    loop over samples. The scores at 0% and 100% are computed once and shared by the curves.

    >>> import torch
    >>> model = torch.nn.Linear(4, 2)
    >>> with torch.no_grad():
    ...     _ = model.weight.copy_(torch.tensor([[4.0, 3.0, 2.0, 1.0], [0.0, 0.0, 0.0, 0.0]]))
    ...     _ = model.bias.zero_()
    >>> x = torch.ones(1, 4)
    >>> result = deletion_insertion(model, x, model.weight[:1].detach(), target=0, steps=4, output="logit")
    >>> result.fractions
    tensor([0.0000, 0.2500, 0.5000, 0.7500, 1.0000])
    >>> result.deletion, result.insertion
    (tensor([[10.,  6.,  3.,  1.,  0.]]), tensor([[ 0.,  4.,  7.,  9., 10.]]))
    >>> result.deletion_area, result.insertion_area
    (tensor([3.7500]), tensor([6.2500]))
    """
    if not isinstance(model, nn.Module):
        raise PeeringTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_inputs(inputs)
    check_output(output)
    int_at_least("steps", steps, 1)
    optional(int_at_least, "chunk_size", chunk_size, 1)
    budget = MemoryBudget.parse(memory_budget)
    maps, target = _maps_and_target(attributions, target, inputs)
    x = inputs.detach()
    b = x.shape[0]
    if b == 0:
        raise PeeringValueError("inputs is an empty batch: there is nothing to perturb")
    elementwise = x.ndim != 4  # images: one mask per pixel position, shared by the channels
    importance = (maps.sum(dim=1) if not elementwise else maps).flatten(1)  # [B, N]
    n = importance.shape[1]
    generator = torch.Generator(device=x.device).manual_seed(seed)
    ranks = {"attribution": importance_ranks(importance, generator=generator)}
    if random_control:
        ranks["random"] = torch.rand(b, n, generator=generator, device=x.device).argsort(dim=1)
    if n == 0:
        raise PeeringValueError(f"the inputs have no elements to perturb (shape {list(x.shape)})")
    counts = torch.linspace(0, n, min(steps, n) + 1, dtype=torch.float64).round().long().unique()
    fractions = (counts.double() / n).to(x.dtype)

    with torch.no_grad(), eval_mode(model, tuple({x.device} - {torch.device("cpu")})):
        base = _baseline(baseline, x, blur_sigma)
        if chunk_size is None:  # a perturbed input is built with its mask: 2 more points each
            one = forward_footprint(lambda p: class_scores(model, p, output_fn), x[:1])
            chunk_size = budget.most(replace(one, point=2 * one.point), x.device)
        targets = _resolve_target(model, x, target, output_fn, chunk_size)
        score = _Scorer(model, output, output_fn, targets, chunk_size)
        ends = score(torch.cat([x, base]), torch.cat([torch.arange(b), torch.arange(b)]).to(x.device))
        original, emptied = ends[:b], ends[b:]
        curves = _interior(score, x, base, ranks, counts[1:-1].to(x.device), elementwise)

    def assemble(kind: str) -> tuple[Tensor, Tensor]:
        """The full deletion and insertion curves [B, P] of one ranking: shared ends, scored interior."""
        deletion = original.new_empty((b, counts.numel()))
        insertion = original.new_empty((b, counts.numel()))
        deletion[:, 0], deletion[:, -1] = original, emptied
        insertion[:, 0], insertion[:, -1] = emptied, original
        if counts.numel() > 2:
            deletion[:, 1:-1] = curves[kind, "deletion"].T
            insertion[:, 1:-1] = curves[kind, "insertion"].T
        return deletion, insertion

    def area(curve: Tensor) -> Tensor:
        return torch.trapezoid(curve, fractions.to(curve), dim=1)

    deletion, insertion = assemble("attribution")
    random_deletion = random_insertion = None
    if random_control:
        random_deletion, random_insertion = assemble("random")
    return DeletionInsertion(
        fractions=fractions,
        deletion=deletion,
        insertion=insertion,
        random_deletion=random_deletion,
        random_insertion=random_insertion,
        deletion_area=area(deletion),
        insertion_area=area(insertion),
        random_deletion_area=None if random_deletion is None else area(random_deletion),
        random_insertion_area=None if random_insertion is None else area(random_insertion),
        targets=targets,
        baseline=_baseline_name(baseline),
        output=output,
    )


def importance_ranks(importance: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """Each element's place in its row's order of importance, most important first: int64 [B, N].

    Ties are ordered at random (with ``generator``), never by position.

    >>> importance_ranks(torch.tensor([[0.1, 0.9, 0.5], [3.0, 1.0, 2.0]]))
    tensor([[2, 0, 1],
            [0, 2, 1]])
    """
    if importance.ndim != 2:
        raise PeeringValueError(f"importance must be [B, N], got shape {list(importance.shape)}")
    b, n = importance.shape
    shuffle = torch.rand(b, n, generator=generator, device=importance.device).argsort(dim=1)
    order = importance.gather(1, shuffle).argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(shuffle)
    positions = torch.arange(n, device=importance.device).expand(b, n)
    return ranks.scatter_(1, shuffle.gather(1, order), positions)


# ------------------------------------------------------------------------------------------------ private


class _Scorer:
    """The chosen output of each row's class, for inputs [R, ...] and sample indices [R], in chunks."""

    def __init__(
        self,
        model: nn.Module,
        output: str,
        output_fn: Callable[[Any], Tensor] | None,
        targets: Tensor,
        chunk_size: int,
    ) -> None:
        self.model, self.output, self.output_fn = model, output, output_fn
        self.targets, self.chunk_size = targets, chunk_size

    def __call__(self, x: Tensor, samples: Tensor) -> Tensor:
        out = []
        for start in range(0, x.shape[0], self.chunk_size):
            stop = start + self.chunk_size
            scores = transform(class_scores(self.model, x[start:stop], self.output_fn), self.output)
            out.append(scores.gather(1, self.targets[samples[start:stop], None])[:, 0])
        return torch.cat(out) if out else x.new_empty(0)


def _interior(
    score: _Scorer,
    x: Tensor,
    base: Tensor,
    ranks: dict[str, Tensor],
    counts: Tensor,
    elementwise: bool,
) -> dict[tuple[str, str], Tensor]:
    """Scores [steps, B] of every (ranking, deletion/insertion) curve at the interior ``counts``.

    The jobs (count, curve, sample) are laid out flat and scored ``score.chunk_size`` at a time, each
    chunk's perturbed inputs built in one vectorised ``torch.where``: every forward pass is full.
    """
    b = x.shape[0]
    kinds = [(kind, way) for kind in ranks for way in ("deletion", "insertion")]
    jobs = counts.numel() * len(kinds) * b
    all_ranks = torch.stack([ranks[kind] for kind, _ in kinds])  # [curves, B, N]
    deleting = torch.tensor([way == "deletion" for _, way in kinds], device=x.device)
    shape = (-1, 1, *x.shape[2:]) if not elementwise else (-1, *x.shape[1:])
    scores = []
    for start in range(0, jobs, score.chunk_size):
        job = torch.arange(start, min(start + score.chunk_size, jobs), device=x.device)
        step, rest = job // (len(kinds) * b), job % (len(kinds) * b)
        curve, sample = rest // b, rest % b
        chosen = all_ranks[curve, sample] < counts[step, None]  # [r, N]: the elements perturbed
        replace = (chosen == deleting[curve, None]).view(shape)  # take the baseline here
        perturbed = torch.where(replace, base[sample], x[sample])
        scores.append(score(perturbed, sample))
    grid = torch.cat(scores).view(counts.numel(), len(kinds), b) if scores else x.new_empty(0, len(kinds), b)
    return {kinds[i]: grid[:, i] for i in range(len(kinds))}


def _maps_and_target(
    attributions: Tensor | Explanation, target: int | Tensor | None, inputs: Tensor
) -> tuple[Tensor, int | Tensor | None]:
    if isinstance(attributions, Explanation):
        if not bool(attributions.valid.all()):
            bad = (~attributions.valid).nonzero().flatten().tolist()
            raise PeeringValueError(
                f"the explanation has invalid (skipped) samples {bad[:10]}; drop them first"
            )
        if target is None:
            target = attributions.targets[:, 0]
        maps = attributions.attributions[:, 0]
    elif isinstance(attributions, Tensor):
        maps = attributions
    else:
        raise PeeringTypeError(
            "attributions must be a tensor [B, ...] or a peering Explanation, got "
            f"{type(attributions).__name__}"
        )
    if maps.shape != inputs.shape and maps.shape[:1] + maps.shape[2:] == inputs.shape and maps.shape[1] == 1:
        maps = maps[:, 0]
    if maps.shape != inputs.shape:
        raise PeeringValueError(
            f"attributions must have the inputs' shape {list(inputs.shape)} (or [B, 1, ...]), got "
            f"{list(maps.shape)}"
        )
    if not maps.is_floating_point():
        raise PeeringTypeError(f"attributions must be floating point, got {maps.dtype}")
    bad_rows = ~torch.isfinite(maps.detach()).flatten(1).all(dim=1) if maps.shape[0] else None
    if bad_rows is not None and bad_rows.any():
        rows = bad_rows.nonzero().flatten().tolist()
        raise PeeringValueError(
            f"attributions contain NaN or Inf for samples {rows[:10]}; they cannot be ranked"
        )
    return maps.detach().to(inputs.device), target


def _resolve_target(
    model: nn.Module,
    x: Tensor,
    target: int | Tensor | None,
    output_fn: Callable[[Any], Tensor] | None,
    chunk_size: int,
) -> Tensor:
    if target is None:
        step = chunk_size
        chunks = [class_scores(model, x[i : i + step], output_fn) for i in range(0, x.shape[0], step)]
        return torch.cat(chunks).argmax(dim=1)
    n_classes = class_scores(model, x[:1], output_fn).shape[1]
    t = check_targets(target, x.shape[0], n_classes)
    if t.shape[1] != 1:
        raise PeeringValueError(
            f"target must give one class per sample (an int or a [B] tensor), got {t.shape[1]}"
        )
    return t[:, 0].to(x.device)


def _baseline(baseline: BaselineName | float | Tensor, x: Tensor, blur_sigma: float | None) -> Tensor:
    if isinstance(baseline, Tensor):
        try:
            return torch.broadcast_to(baseline.detach().to(x), x.shape)
        except RuntimeError:
            raise PeeringValueError(
                f"a baseline tensor must broadcast to the inputs' shape {list(x.shape)}, got "
                f"{list(baseline.shape)}"
            ) from None
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        if not math.isfinite(baseline):
            raise PeeringValueError(f"baseline must be finite, got {baseline}")
        return torch.full_like(x, float(baseline))
    if baseline == "zero":
        return torch.zeros_like(x)
    if baseline == "mean":
        dims = tuple(range(2, x.ndim)) if x.ndim == 4 else tuple(range(1, x.ndim))
        return x.mean(dim=dims, keepdim=True).expand_as(x)
    if baseline == "blur":
        if x.ndim != 4:
            raise PeeringValueError(
                f"baseline='blur' needs images [B, C, H, W], got shape {list(x.shape)}; use 'zero', "
                "'mean', a number or a tensor"
            )
        sigma = max(x.shape[2:]) / 10 if blur_sigma is None else blur_sigma
        if not sigma > 0 or not math.isfinite(sigma):
            raise PeeringValueError(f"blur_sigma must be a positive number, got {blur_sigma}")
        return _gaussian_blur(x, sigma)
    raise PeeringValueError(
        f"baseline must be 'zero', 'blur', 'mean', a number or a tensor, got {baseline!r}"
    )


def _baseline_name(baseline: BaselineName | float | Tensor) -> str:
    if isinstance(baseline, str):
        return baseline
    return "tensor" if isinstance(baseline, Tensor) else "constant"


def _gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """Blur images [B, C, H, W] with a Gaussian of ``sigma`` pixels (separable, edges replicated)."""
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = images.shape[1]
    padded = F.pad(images, (radius, radius, radius, radius), mode="replicate")
    horizontal = kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1)
    vertical = kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1)
    return F.conv2d(F.conv2d(padded, horizontal, groups=c), vertical, groups=c)
