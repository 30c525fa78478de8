"""Which samples confuse the model, and which classes it confuses with which.

- `select_confused`: the samples whose two highest class scores are nearly tied (for a multi-label model:
  one of whose classes has a probability near 0.5; `confusion_margins` defines both).
- `top_confused_pairs`: the most frequent mistakes (true a, predicted b) of a confusion matrix.
- `pair_directions`: for each such pair, the mean input gradient of log p(b) - log p(a) over examples of
  the mistake: what, for this model, turns an a into a b.

These are the pure parts of the callback's confusion atlas (`peering.lightning.atlas`); they know nothing
of Lightning.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from peering._validate import int_at_least
from peering.errors import PeeringValueError
from peering.memory import MemoryBudget

__all__ = ["ConfusedSamples", "confusion_margins", "pair_directions", "select_confused", "top_confused_pairs"]

Head = Literal["softmax", "sigmoid"]
"""How a classifier's scores become probabilities: one softmax over the classes, or a sigmoid per class."""


@dataclass(frozen=True)
class ConfusedSamples:
    """What `select_confused` returns.

    Attributes:
        indices: int64 [N]: batch indices of the selected samples, most confused (smallest margin) first.
        classes: int64 [N, 2]: each one's top class and runner-up.
        margins: float [N]: the gap between the two (in logits or probabilities).
        num_confused: how many samples of the batch were confused before the ``top_n`` cut.
        num_candidates: how many samples were considered (finite scores, top score >= ``min_top_value``).
    """

    indices: Tensor
    classes: Tensor
    margins: Tensor
    num_confused: int
    num_candidates: int

    def __len__(self) -> int:
        return self.indices.shape[0]


def confusion_margins(
    logits: Tensor, margin: Literal["logit", "probability"] = "logit", head: Head = "softmax"
) -> tuple[Tensor, Tensor]:
    """Each sample's gap between its two closest alternatives, and those two classes: (gaps [B],
    classes int64 [B, 2]).

    - ``head="softmax"`` (one class per sample): the gap between the top two classes, in logits or in
      softmax probabilities; the classes are the top one and the runner-up.
    - ``head="sigmoid"`` (multi-label: each class its own yes/no decision): a class is in doubt when its
      probability is near 0.5. Its gap is that between its "yes" and its "no", ``|logit|`` (the log-odds,
      so ``max_difference=1`` means within a factor e, as for softmax) or ``|p - (1 - p)| = |2p - 1|`` in
      probability; a sample's gap is that of its class nearest 0.5, and its classes are that class and the
      next nearest (the same class twice for a one-output model).

    Rows with NaN or Inf get a NaN gap.

    >>> import torch
    >>> gaps, classes = confusion_margins(torch.tensor([[3.0, -0.2, 1.0]]), head="sigmoid")
    >>> round(float(gaps[0]), 3), classes.tolist()   # class 1 is the least sure: p = 0.45
    (0.2, [[1, 2]])
    """
    logits = logits.detach().float()
    if head == "sigmoid":
        doubt = logits.abs() if margin == "logit" else (2 * logits.sigmoid() - 1).abs()
        k = min(2, logits.shape[1])
        near = doubt.topk(k, dim=1, largest=False)
        classes = near.indices if k == 2 else near.indices.expand(-1, 2)
        gaps = near.values[:, 0]
    else:
        top = logits.topk(2, dim=1)
        scores = top.values if margin == "logit" else logits.softmax(dim=1).gather(1, top.indices)
        gaps, classes = scores[:, 0] - scores[:, 1], top.indices
    return gaps.masked_fill(~torch.isfinite(logits).all(dim=1), float("nan")), classes


def select_confused(
    logits: Tensor,
    *,
    max_difference: float = 0.1,
    margin: Literal["logit", "probability"] = "logit",
    top_n: int | None = None,
    min_top_value: float | None = None,
    head: Head = "softmax",
) -> ConfusedSamples:
    """Pick the samples whose top two classes are within ``max_difference`` of each other (with
    ``head="sigmoid"``: one of whose classes has its yes and no that close, i.e. a probability near 0.5;
    see `confusion_margins`).

    Args:
        logits: class scores [B, C] (C >= 2; C >= 1 with ``head="sigmoid"``).
        max_difference: the largest gap between the top two that counts as confused.
        margin: measure the gap on "logit"s or on "probability" (softmax, or each class's sigmoid).
        top_n: keep only the ``top_n`` most confused (smallest gaps); None keeps all.
        min_top_value: only consider samples whose top logit is at least this (Bolts' ``min_logit_value``).
        head: "softmax" (one class per sample) or "sigmoid" (independent classes: multi-label).

    Rows with NaN or Inf are never selected.

    >>> import torch
    >>> logits = torch.tensor([[2.0, 1.95, 0.0], [3.0, 0.0, 0.0], [0.0, 1.0, 1.02]])
    >>> sel = select_confused(logits, max_difference=0.1)
    >>> sel.indices.tolist(), sel.classes.tolist()
    ([2, 0], [[2, 1], [0, 1]])
    """
    least = 1 if head == "sigmoid" else 2
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[1] < least:
        shape = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise PeeringValueError(f"logits must be a [B, C] tensor with C >= {least}, got {shape}")
    if margin not in ("logit", "probability"):
        raise PeeringValueError(f"margin must be 'logit' or 'probability', got {margin!r}")
    if head not in ("softmax", "sigmoid"):
        raise PeeringValueError(f"head must be 'softmax' or 'sigmoid', got {head!r}")
    if not max_difference >= 0:
        raise PeeringValueError(f"max_difference must be >= 0, got {max_difference}")
    if top_n is not None and top_n < 0:
        raise PeeringValueError(f"top_n must be >= 0 or None, got {top_n}")
    logits = logits.detach().float()
    gaps, classes = confusion_margins(logits, margin, head)
    candidate = torch.isfinite(logits).all(dim=1)
    if min_top_value is not None:
        candidate &= logits.amax(dim=1) >= min_top_value
    confused = candidate & (gaps <= max_difference)
    indices = confused.nonzero().flatten()
    order = torch.sort(gaps[indices], stable=True).indices
    indices = indices[order]
    num_confused = indices.shape[0]
    if top_n is not None:
        indices = indices[:top_n]
    return ConfusedSamples(
        indices=indices,
        classes=classes[indices],
        margins=gaps[indices],
        num_confused=num_confused,
        num_candidates=int(candidate.sum()),
    )


def top_confused_pairs(matrix: Tensor, n: int) -> Tensor:
    """The ``n`` most frequent mistakes of a confusion matrix, as (true class, predicted class) pairs.

    Args:
        matrix: counts [C, C], rows the true class, columns the predicted class (torchmetrics' layout).
        n: how many pairs at most.

    Returns:
        int64 [P, 2] with P <= n: the off-diagonal cells with the largest counts, largest first, ties in
        row-major order; cells with a count of zero are never returned (a model that makes fewer than n
        kinds of mistakes gets fewer pairs).

    >>> import torch
    >>> matrix = torch.tensor([[5, 2, 0], [0, 6, 3], [2, 0, 4]])
    >>> top_confused_pairs(matrix, 2).tolist()
    [[1, 2], [0, 1]]
    """
    if not isinstance(matrix, Tensor) or matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        shape = list(matrix.shape) if isinstance(matrix, Tensor) else type(matrix).__name__
        raise PeeringValueError(f"matrix must be a square [C, C] tensor of counts, got {shape}")
    int_at_least("n", n, 0)
    classes = matrix.shape[0]
    off = matrix.detach().clone()
    off.fill_diagonal_(0)
    flat = off.flatten()
    k = min(n, int((flat > 0).sum()))
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    return torch.stack([order // classes, order % classes], dim=1).to(torch.int64)


def pair_directions(
    model: nn.Module,
    inputs: Tensor,
    pairs: Tensor,
    pair_index: Tensor,
    *,
    output_fn: Callable[[Any], Tensor] | None = None,
    chunk_size: int | None = None,
    memory_budget: MemoryBudget | int | float | str | None = None,
) -> Tensor:
    """For each confused pair (a, b), the mean over its examples of the input gradient of
    log p(b) - log p(a): the direction in input space that, for this model, turns an a into a b.

    Args:
        model: the classifier (run in eval mode; everything is restored, as in `peering.explain`).
        inputs: the examples [N, ...], all pairs together.
        pairs: int64 [P, 2]: (true class a, predicted class b) per pair, e.g. from `top_confused_pairs`.
        pair_index: int64 [N]: which pair each example belongs to (0 <= pair_index < P).
        output_fn: picks the class scores out of a model output that is not a [B, C] tensor.
        chunk_size, memory_budget: as in `peering.explain` (chunks sized from the budget by default).

    Returns:
        [P, ...] (the inputs' sample shape and dtype): the mean gradient per pair; NaN for a pair with no
        (finite) example, since there is nothing to average.

    One batched `peering.explain` call (``output="log_probability"``, targets [b, a] per example) for all
    pairs, then a per-pair mean (``index_add_``): no loop over samples or pairs. log p(b) - log p(a)
    equals logit(b) - logit(a) (the normaliser cancels), so this is also the logit-difference gradient.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3, bias=False))
    >>> with torch.no_grad():
    ...     _ = model[1].weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]]))
    >>> pairs = torch.tensor([[0, 1], [2, 0]])          # a 0 taken for a 1, a 2 taken for a 0
    >>> d = pair_directions(model, torch.rand(3, 4), pairs, torch.tensor([0, 0, 1]))
    >>> d.tolist()
    [[-1.0, 1.0, 0.0, 0.0], [1.0, 0.0, -1.0, 0.0]]
    """
    from peering.attribution.explanation import (
        explain,  # explain imports nothing from here; kept local all the same
    )

    if not isinstance(pairs, Tensor) or pairs.ndim != 2 or pairs.shape[1] != 2:
        raise PeeringValueError(f"pairs must be an int64 [P, 2] tensor of (true, predicted), got {pairs!r}")
    if not isinstance(pair_index, Tensor) or pair_index.ndim != 1 or pair_index.shape[0] != inputs.shape[0]:
        raise PeeringValueError(
            f"pair_index must be an int64 [N] tensor with N = {inputs.shape[0]} (one pair per example)"
        )
    num_pairs = pairs.shape[0]
    pair_index = pair_index.to(device=pairs.device, dtype=torch.int64)
    if pair_index.numel() and (int(pair_index.min()) < 0 or int(pair_index.max()) >= num_pairs):
        raise PeeringValueError(f"pair_index must be in [0, {num_pairs - 1}], got {pair_index.tolist()[:10]}")
    shape = inputs.shape[1:]
    if inputs.shape[0] == 0:
        return inputs.new_full((num_pairs, *shape), float("nan"))
    targets = pairs[pair_index].flip(1)  # [N, 2]: (b, a)
    exp = explain(
        model,
        inputs,
        targets,
        output="log_probability",
        output_fn=output_fn,
        chunk_size=chunk_size,
        memory_budget=memory_budget,
        nonfinite="skip",
    )
    toward = exp.attributions[:, 0] - exp.attributions[:, 1]  # [N, ...]
    valid = exp.valid.to(toward.device)
    where = pair_index.to(toward.device)[valid]
    sums = toward.new_zeros((num_pairs, *shape)).index_add_(0, where, toward[valid])
    counts = torch.bincount(where, minlength=num_pairs).to(toward.dtype)
    return sums / counts.view(-1, *([1] * len(shape)))  # 0 / 0 = NaN for a pair without examples
