"""Check a morph with models that had no part in it: do independent judges also call it the target?

A morph that only the morphed model believes is an adversarial example, not an explanation. `agreement`
shows each morph to judge models (trained on other data, never used in the morph) and reports how often
each calls it the target, beside two controls: the originals (how often a judge already called them the
target) and random noise of the same L2 size added to the originals (how often noise alone would do).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from peering._model import class_scores, eval_mode
from peering._validate import int_at_least, optional
from peering.errors import PeeringTypeError, PeeringValueError
from peering.memory import MemoryBudget, forward_footprint
from peering.morph.ascent import MorphResult

__all__ = ["Agreement", "agreement", "noise_like"]


@dataclass(frozen=True)
class Agreement:
    """What `agreement` returns. Rates are over the counted morphs: those that met the morph's stopping
    rule (``MorphResult.success``); the per-sample calls cover every sample.

    Attributes:
        names: the judges' names.
        morphs: float [J]: fraction of the counted morphs each judge calls the target.
        noise: float [J]: the same for the originals plus random noise of each morph's L2 distance.
        originals: float [J]: fraction of the counted samples each judge called the target before the
            morph (near 0 when targets differ from the labels).
        calls, noise_calls: bool [J, B]: judge j calls sample b's morph / noisy original the target.
        counted: bool [B]: the samples counted in the rates.
        noise_distance: float [B]: the L2 distance of each noisy original (equal to the morph's, unless
            ``bounds`` left no room for that much noise).
    """

    names: tuple[str, ...]
    morphs: Tensor
    noise: Tensor
    originals: Tensor
    calls: Tensor
    noise_calls: Tensor
    counted: Tensor
    noise_distance: Tensor

    def __str__(self) -> str:
        width = max(len(n) for n in self.names)
        lines = [f"{'judge':<{width}}  morphs  noise  originals   ({int(self.counted.sum())} morphs)"]
        for j, name in enumerate(self.names):
            lines.append(
                f"{name:<{width}}  {float(self.morphs[j]):6.1%}  {float(self.noise[j]):5.1%}  "
                f"{float(self.originals[j]):9.1%}"
            )
        return "\n".join(lines)


def agreement(
    result: MorphResult,
    judges: Mapping[str, nn.Module] | Sequence[nn.Module] | nn.Module,
    *,
    bounds: tuple[float, float] | None = (0.0, 1.0),
    seed: int = 0,
    output_fn: Callable[[Any], Tensor] | None = None,
    chunk_size: int | None = None,
    memory_budget: MemoryBudget | int | float | str | None = None,
) -> Agreement:
    """How often judge models call the morphs their target, beside random noise of the same size.

    Judges should be trained on data that does not contain the morphed samples, and must not be the
    morphed model or take part in the morph (or the check proves nothing). Each judge runs in eval mode
    under ``torch.no_grad()``, its state restored; the morphs, the noisy originals and the originals of
    the whole batch go through it in chunks of ``chunk_size``.

    Args:
        result: what `peering.morph` returned.
        judges: a classifier, a list of them, or a dict of name -> classifier.
        bounds: the inputs' valid range, as given to `morph`: the noise is clamped to it (and scaled so its
            L2 distance still equals the morph's), or None.
        seed: seed of the noise's own generator (the global RNG is never used).
        output_fn: picks the class scores from a judge's output that is not a plain tensor.
        chunk_size: samples per judge forward pass. Default None: as many as fit ``memory_budget``, from
            a forward pass of one sample through each judge (`peering.memory.forward_footprint`).
        memory_budget: as in `peering.explain`: bytes, a size string, a share of free memory or a
            `peering.memory.MemoryBudget`.

    >>> import torch, peering
    >>> from peering.data import load_digits
    >>> from peering.models import DigitCNN, DigitMLP, train_classifier
    >>> x, y = load_digits()
    >>> model = train_classifier(DigitCNN(image_size=8), x[:700], y[:700], epochs=10, lr=2e-3)
    >>> judge = train_classifier(DigitMLP(image_size=8), x[700:1400], y[700:1400], epochs=30)
    >>> res = peering.morph(model, x[1400:1464], (y[1400:1464] + 1) % 10,
    ...                     prior=peering.priors.Prototypes(x[:700], y[:700]))
    >>> check = peering.agreement(res, {"mlp": judge})
    >>> float(check.morphs[0]) > float(check.noise[0])
    True
    """
    names, models = _judges(judges)
    if not isinstance(result, MorphResult):
        raise PeeringTypeError(
            f"result must be a MorphResult (what peering.morph returns), got {type(result).__name__}"
        )
    optional(int_at_least, "chunk_size", chunk_size, 1)
    budget = MemoryBudget.parse(memory_budget)
    counted = result.success
    if len(result) and not bool(counted.any()):
        raise PeeringValueError(
            "no morph met its stopping rule (result.success is all False), so there is nothing for the "
            "judges to agree with; morph with more steps or a lower confidence first"
        )
    originals = result.frames[0]
    noisy, noise_distance = noise_like(originals, result.distance, bounds=bounds, seed=seed)
    targets = result.targets
    calls, noise_calls, before = [], [], []
    for judge in models:
        with eval_mode(judge), torch.no_grad():
            size = chunk_size or 1
            if chunk_size is None and len(originals):
                one = forward_footprint(functools.partial(_scores, judge, output_fn), originals[:1])
                size = budget.most(one, originals.device)
            calls.append(_calls(judge, result.inputs, targets, output_fn, size))
            noise_calls.append(_calls(judge, noisy, targets, output_fn, size))
            before.append(_calls(judge, originals, targets, output_fn, size))
    stack = [torch.stack(c) if c else torch.zeros(0, len(result), dtype=torch.bool) for c in
             (calls, noise_calls, before)]
    n = counted.sum().clamp_min(1)

    def rate(c: Tensor) -> Tensor:
        return (c & counted).sum(dim=1).float() / n if len(result) else torch.full((len(models),), math.nan)

    return Agreement(
        names=names,
        morphs=rate(stack[0]),
        noise=rate(stack[1]),
        originals=rate(stack[2]),
        calls=stack[0],
        noise_calls=stack[1],
        counted=counted,
        noise_distance=noise_distance,
    )


def noise_like(
    inputs: Tensor,
    distance: Tensor,
    *,
    bounds: tuple[float, float] | None = (0.0, 1.0),
    seed: int = 0,
    iterations: int = 30,
) -> tuple[Tensor, Tensor]:
    """Add Gaussian noise of a given L2 size to each input, inside ``bounds``, batched.

    Clamping to ``bounds`` shrinks the noise, so the scale is found per sample by a few fixed-point
    iterations until the clamped noise has the asked-for L2 norm. Returns the noisy inputs and the L2
    distance reached (smaller than asked only where the bounds leave no more room).

    >>> x = torch.zeros(2, 1, 8, 8)
    >>> noisy, reached = noise_like(x, torch.tensor([1.0, 2.0]))
    >>> [round(float(d), 4) for d in reached]
    [1.0, 2.0]
    """
    if distance.shape != inputs.shape[:1]:
        raise PeeringValueError(f"distance must be [B] = [{inputs.shape[0]}], got {list(distance.shape)}")
    generator = torch.Generator(device=inputs.device).manual_seed(seed)
    direction = torch.randn(inputs.shape, generator=generator, device=inputs.device, dtype=inputs.dtype)
    shape = (-1, *([1] * (inputs.ndim - 1)))
    want = distance.to(inputs.dtype).view(shape)
    scale = want / direction.flatten(1).norm(dim=1).clamp_min(1e-12).view(shape)

    def noisy(s: Tensor) -> Tensor:
        out = inputs + s * direction
        return out.clamp(*bounds) if bounds is not None else out

    for _ in range(iterations if bounds is not None else 0):
        reached = (noisy(scale) - inputs).flatten(1).norm(dim=1).view(shape)
        scale = torch.where(reached > 0, scale * want / reached.clamp_min(1e-12), scale)
    out = noisy(scale)
    return out, (out - inputs).flatten(1).norm(dim=1)


def _scores(judge: nn.Module, output_fn: Any, x: Tensor) -> Tensor:
    return class_scores(judge, x, output_fn)


def _calls(judge: nn.Module, x: Tensor, targets: Tensor, output_fn: Any, chunk_size: int) -> Tensor:
    starts = range(0, len(x), chunk_size)
    out = [class_scores(judge, x[i : i + chunk_size], output_fn).argmax(dim=1) for i in starts]
    top = torch.cat(out) if out else targets.new_zeros(0)
    return top.to(targets.device) == targets


def _judges(judges: Any) -> tuple[tuple[str, ...], list[nn.Module]]:
    if isinstance(judges, nn.Module):
        judges = [judges]
    if isinstance(judges, Mapping):
        names, models = tuple(str(k) for k in judges), list(judges.values())
    elif isinstance(judges, Sequence):
        models = list(judges)
        base = [type(m).__name__ for m in models]
        names = tuple(f"{b} {i}" if base.count(b) > 1 else b for i, b in enumerate(base))
    else:
        raise PeeringTypeError(f"judges must be a model, a list of models or a dict of name -> model, got "
                        f"{type(judges).__name__}")
    if not models or not all(isinstance(m, nn.Module) for m in models):
        raise PeeringTypeError("judges must be torch.nn.Module classifiers (at least one)")
    return names, models
