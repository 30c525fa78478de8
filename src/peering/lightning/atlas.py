"""The confusion atlas: per validation run, which classes the model confuses with which, and why.

`ConfusionAtlas` is what `ConfusedLogitCallback` feeds with every validation batch (``atlas=True``):

- the confusion matrix of the validation predictions, accumulated with torchmetrics'
  `MulticlassConfusionMatrix` (rows: true class, columns: predicted class), whose ``compute`` sums the
  matrices of all DDP ranks;
- for every kind of mistake (true a, predicted b) a rank sees, the ``examples_per_pair`` examples closest
  to the a/b boundary (smallest logit(b) - logit(a)), kept on the model's device, at most ``max_cells``
  kinds of mistake per rank (beyond that, those seen most often on that rank so far).

At the end of the run the callback syncs the matrix (`ConfusionAtlas.compute`), takes its ``pairs`` most
frequent mistakes (`peering.confusion.top_confused_pairs`), gathers those pairs' examples from all ranks,
keeps the best ``examples_per_pair`` of each (`pick_examples`), and explains them on rank zero
(`peering.confusion.pair_directions`: the mean gradient of log p(b) - log p(a)).

Samples without a label (-1) or whose logits are not finite are not counted; their number is reported.
Everything here is vectorised: no loop over samples, pairs or classes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from peering._validate import int_at_least
from peering.errors import PeeringValueError

__all__ = ["AtlasMatrix", "ConfusionAtlas", "PairExamples", "pick_examples"]

IGNORE = -1
"""The label of samples that are not counted (no label, or non-finite logits)."""


@dataclass
class PairExamples:
    """Examples of mistakes.

    Attributes:
        inputs: [n, ...] the inputs (ordinary tensors, never inference tensors).
        true: int64 [n]: the true class a. predicted: int64 [n]: the predicted class b.
        gaps: float [n]: logit(b) - logit(a) (>= 0; small: close to the a/b boundary).
    """

    inputs: Tensor
    true: Tensor
    predicted: Tensor
    gaps: Tensor

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def select(self, index: Tensor) -> PairExamples:
        """The examples at ``index`` (an index or bool tensor)."""
        return PairExamples(self.inputs[index], self.true[index], self.predicted[index], self.gaps[index])

    def cat(self, other: PairExamples) -> PairExamples:
        """Both sets of examples, self first (``other`` is moved to self's device and input dtype)."""
        dev = self.inputs.device
        return PairExamples(
            torch.cat([self.inputs, other.inputs.to(dev, self.inputs.dtype)]),
            torch.cat([self.true, other.true.to(dev)]),
            torch.cat([self.predicted, other.predicted.to(dev)]),
            torch.cat([self.gaps, other.gaps.to(dev, self.gaps.dtype)]),
        )

    @staticmethod
    def empty(
        sample_shape: tuple[int, ...] | torch.Size = (0,),
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> PairExamples:
        """No examples, with inputs of shape [0, *sample_shape]."""
        return PairExamples(
            torch.zeros((0, *sample_shape), dtype=dtype, device=device),
            torch.zeros(0, dtype=torch.int64, device=device),
            torch.zeros(0, dtype=torch.int64, device=device),
            torch.zeros(0, dtype=torch.float32, device=device),
        )


@dataclass(frozen=True)
class AtlasMatrix:
    """What `ConfusionAtlas.compute` returns: the matrix of all ranks, or why there is none.

    Attributes:
        matrix: int64 [C, C] counts (rows: true class, columns: predicted class), or None.
        ignored: samples of all ranks not counted (no label, or non-finite logits).
        reason: why there is no matrix (None when there is one).
    """

    matrix: Tensor | None
    ignored: int = 0
    reason: str | None = None

    @property
    def samples(self) -> int:
        """The samples counted in the matrix (all ranks)."""
        return 0 if self.matrix is None else int(self.matrix.sum())


def _smallest_per_group(groups: Tensor, keys: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` smallest ``keys`` of each group (ties: the earlier first), ordered by group, then
    key. Vectorised: two stable sorts and a rank-within-run computed from run lengths."""
    if groups.numel() == 0 or k <= 0:
        return torch.zeros(0, dtype=torch.int64, device=groups.device)
    order = torch.sort(keys, stable=True).indices
    order = order[torch.sort(groups[order], stable=True).indices]
    sorted_groups = groups[order]
    _, counts = torch.unique_consecutive(sorted_groups, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(order), device=groups.device) - torch.repeat_interleave(starts, counts)
    return order[rank < k]


def pick_examples(examples: PairExamples, pairs: Tensor, per_pair: int) -> tuple[PairExamples, Tensor]:
    """The ``per_pair`` examples closest to the boundary (smallest gap) of each pair, and their pair index.

    Args:
        examples: candidates, e.g. gathered from all ranks (any order; ties keep that order).
        pairs: int64 [P, 2]: (true, predicted) per pair.
        per_pair: examples at most per pair.

    Returns:
        (examples ordered by pair, then gap; int64 [n]: the index into ``pairs`` of each).

    >>> import torch
    >>> ex = PairExamples(torch.rand(5, 2), torch.tensor([4, 4, 1, 4, 3]), torch.tensor([9, 9, 7, 9, 5]),
    ...                   torch.tensor([5.0, 1.0, 2.0, 3.0, 0.0]))
    >>> chosen, index = pick_examples(ex, torch.tensor([[4, 9], [1, 7]]), per_pair=2)
    >>> chosen.gaps.tolist(), index.tolist()
    ([1.0, 3.0, 2.0], [0, 0, 1])
    """
    device = examples.true.device
    pairs = pairs.to(device=device, dtype=torch.int64)
    if len(examples) == 0 or pairs.shape[0] == 0:
        return examples.select(torch.zeros(0, dtype=torch.int64, device=device)), torch.zeros(
            0, dtype=torch.int64, device=device
        )
    match = (examples.true[:, None] == pairs[None, :, 0]) & (examples.predicted[:, None] == pairs[None, :, 1])
    found, which = match.max(dim=1)  # [n]: whether the example is of a wanted pair, and of which
    rows = found.nonzero().flatten()
    keep = rows[_smallest_per_group(which[rows], examples.gaps[rows].float(), per_pair)]
    return examples.select(keep), which[keep]


class ConfusionAtlas:
    """Accumulates one validation run: the confusion matrix (torchmetrics, synced across DDP ranks) and
    examples of each kind of mistake.

    Args:
        pairs: how many of the most frequent mistakes the callback shows (used by `examples_for`).
        examples_per_pair: examples kept per kind of mistake (the closest to the a/b boundary).
        max_cells: kinds of mistake (off-diagonal cells) with examples kept per rank; beyond that, those
            seen most often on this rank so far. 256 covers every cell of up to 16 classes.

    `update` makes no collective call; `compute` does (under DDP every rank must call it, at the same
    point), and `reset` starts the next run.

    >>> import torch
    >>> atlas = ConfusionAtlas(pairs=1, examples_per_pair=2)
    >>> logits = torch.tensor([[3.0, 0, 0], [0, 2.0, 1], [2.5, 0, 0], [0, 0, 1.0], [1.0, 0.9, 0]])
    >>> labels = torch.tensor([0, 2, 1, 2, 1])        # 2 taken for 1, 1 taken for 0 (twice)
    >>> atlas.update(torch.rand(5, 4), labels, logits)
    >>> atlas.compute().matrix.tolist()
    [[1, 0, 0], [2, 0, 0], [0, 1, 1]]
    >>> pairs = torch.tensor([[1, 0]])
    >>> [round(g, 3) for g in atlas.examples_for(pairs).gaps.tolist()]  # closest to the boundary first
    [0.1, 2.5]
    """

    def __init__(self, pairs: int = 3, examples_per_pair: int = 4, *, max_cells: int = 256) -> None:
        for name, value, least in (
            ("pairs", pairs, 1),
            ("examples_per_pair", examples_per_pair, 0),
            ("max_cells", max_cells, 1),
        ):
            int_at_least(name, value, least)
        self.pairs = pairs
        self.examples_per_pair = examples_per_pair
        self.max_cells = max_cells
        self._metric: Any = None  # torchmetrics MulticlassConfusionMatrix, made at the first batch
        self._examples: PairExamples | None = None
        self._samples = 0  # samples given to `update` or `ignore` (counted or not)
        self._failed: str | None = None

    @property
    def num_classes(self) -> int | None:
        """The number of classes (from the first batch's logits), or None before any batch."""
        return None if self._metric is None else int(self._metric.num_classes)

    @property
    def failed(self) -> str | None:
        """Why this rank's matrix cannot be trusted (bad labels, a change of class count), or None."""
        return self._failed

    def update(self, inputs: Tensor, labels: Tensor, logits: Tensor) -> None:
        """Count one batch: ``labels`` int [B] (-1: not counted), ``logits`` [B, C] (non-finite rows are not
        counted). Keeps copies of the inputs of some mistakes.

        Raises:
            ValueError: a label outside [-1, C), or C differs from the first batch's. The atlas then counts
                nothing more in this run (`failed` says why) and `compute` returns no matrix.
        """
        if self._failed is not None:
            return
        with torch.inference_mode(False), torch.no_grad():  # states must not become inference tensors
            try:
                self._update(inputs, labels, logits)
            except ValueError as err:
                self._failed = str(err)
                raise

    def ignore(self, samples: int) -> None:
        """Note ``samples`` validation samples that cannot be counted (e.g. a batch without labels)."""
        self._samples += int(samples)

    def fail(self, reason: str) -> None:
        """Give up on this run's matrix (e.g. the model could not be run on a batch): a matrix with
        samples missing would be wrong, so `compute` then returns none, on every rank."""
        if self._failed is None:
            self._failed = reason

    def _update(self, inputs: Tensor, labels: Tensor, logits: Tensor) -> None:
        if logits.ndim != 2 or logits.shape[0] != inputs.shape[0] or labels.shape != (inputs.shape[0],):
            raise PeeringValueError(
                f"need logits [B, C] and labels [B] for inputs [B, ...]; got logits {list(logits.shape)}, "
                f"labels {list(labels.shape)}, inputs {list(inputs.shape)}"
            )
        classes = logits.shape[1]
        if self._metric is None:
            self._metric = _confusion_matrix(classes, logits.device)
        elif classes != self._metric.num_classes:
            raise PeeringValueError(
                f"the model gave {classes} class scores, but {self._metric.num_classes} in earlier batches"
            )
        labels = labels.to(logits.device, torch.int64)
        if labels.numel():
            low, high = torch.stack([labels.min(), labels.max()]).tolist()  # one device sync
            if low < IGNORE or high >= classes:
                raise PeeringValueError(
                    f"labels must be class indices in [0, {classes - 1}] (or -1 for unknown); got min "
                    f"{low}, max {high} for a model with {classes} classes"
                )
        finite = torch.isfinite(logits).all(dim=1)
        target = torch.where(finite, labels, torch.full_like(labels, IGNORE))
        self._samples += labels.shape[0]  # those not counted are the difference to the matrix's sum
        predicted = logits.argmax(dim=1)
        self._metric.update(predicted, target)
        if self.examples_per_pair == 0:
            return
        wrong = ((predicted != target) & (target != IGNORE)).nonzero().flatten()
        if len(wrong) == 0:
            return
        rows = logits[wrong].float()
        gaps = rows.gather(1, predicted[wrong, None])[:, 0] - rows.gather(1, target[wrong, None])[:, 0]
        new = PairExamples(
            inputs.detach()[wrong.to(inputs.device)].clone(),
            target[wrong].clone(),
            predicted[wrong].clone(),
            gaps,
        )
        self._keep(new if self._examples is None else self._examples.cat(new))

    def _keep(self, examples: PairExamples) -> None:
        """Keep the ``examples_per_pair`` smallest gaps of each cell, and at most ``max_cells`` cells."""
        classes = self._metric.num_classes
        cells = examples.true.to(examples.gaps.device) * classes + examples.predicted.to(examples.gaps.device)
        keep = _smallest_per_group(cells, examples.gaps, self.examples_per_pair)
        kept_cells = torch.unique(cells[keep])
        if len(kept_cells) > self.max_cells:
            seen = self._metric.confmat.flatten().to(kept_cells.device)[kept_cells]  # this rank's counts
            busiest = kept_cells[torch.sort(seen, descending=True, stable=True).indices[: self.max_cells]]
            keep = keep[torch.isin(cells[keep], busiest)]
        self._examples = examples.select(keep)

    def compute(self, strategy: Any = None) -> AtlasMatrix:
        """The matrix of all ranks (torchmetrics sums them), or why there is none.

        Args:
            strategy: the Trainer's strategy (``trainer.strategy``); with more than one process this makes
                one small ``all_gather`` first, so that every rank agrees on the number of classes and on
                whether any rank failed, then torchmetrics' own sync. None: this process only.

        Every rank must call it at the same point (it is a collective call under DDP), even one that saw
        no batch or failed; all get the same answer.
        """
        with torch.inference_mode(False), torch.no_grad():
            return self._compute(strategy)

    def _compute(self, strategy: Any) -> AtlasMatrix:
        counted = 0 if self._metric is None else int(self._metric.confmat.sum())  # this rank, before the sync
        classes, ignored, failed = self.num_classes or 0, self._samples - counted, self._failed is not None
        world = int(getattr(strategy, "world_size", 1) or 1)
        if world > 1:
            device = getattr(strategy, "root_device", torch.device("cpu"))
            header = torch.tensor([classes, int(failed), ignored], dtype=torch.float64, device=device)
            headers = strategy.all_gather(header).reshape(-1, 3)
            sizes = headers[:, 0].long()
            classes, ignored = int(sizes.max()), int(headers[:, 2].sum())
            if bool(headers[:, 1].any()):
                return AtlasMatrix(
                    None,
                    ignored,
                    self._failed
                    or "another rank could not count its validation batches (labels outside the classes, "
                    "a model that failed, or a change in the number of classes)",
                )
            if bool(((sizes != classes) & (sizes != 0)).any()):
                return AtlasMatrix(None, ignored, "the ranks' models gave different numbers of classes")
        elif failed:
            return AtlasMatrix(None, ignored, self._failed)
        if classes == 0:
            return AtlasMatrix(None, ignored, "no validation batch had labels and class scores")
        if self._metric is None:  # this rank saw no batch; it still takes part in the sync
            self._metric = _confusion_matrix(classes, getattr(strategy, "root_device", torch.device("cpu")))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*was called before the ``update`` method.*")
            matrix = self._metric.compute().detach().clone()
        return AtlasMatrix(matrix, ignored, None)

    def examples_for(self, pairs: Tensor) -> PairExamples:
        """This rank's kept examples of the given (true, predicted) pairs, at most ``examples_per_pair``
        each (see `pick_examples`); to be gathered across ranks."""
        if self._examples is None:
            return PairExamples.empty()
        chosen, _ = pick_examples(self._examples, pairs, self.examples_per_pair)
        return chosen

    @property
    def sample_shape(self) -> tuple[torch.Size, torch.dtype] | None:
        """(shape, dtype) of one kept input, or None when no example was kept."""
        if self._examples is None:
            return None
        return self._examples.inputs.shape[1:], self._examples.inputs.dtype

    def reset(self) -> None:
        """Forget the run (the matrix, the examples, the counters, a failure)."""
        if self._metric is not None:
            with torch.inference_mode(False):
                self._metric.reset()
        self._examples = None
        self._samples = 0
        self._failed = None


def _confusion_matrix(num_classes: int, device: str | torch.device) -> Any:
    from torchmetrics.classification import MulticlassConfusionMatrix

    # labels are checked in `update` (torchmetrics' own check lets some out-of-range labels through when
    # ignore_index is set), so its per-batch validation would only cost time
    metric = MulticlassConfusionMatrix(num_classes, ignore_index=IGNORE, validate_args=False)
    return metric.to(device)
