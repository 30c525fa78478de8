"""Which samples `ConfusedLogitCallback` draws: candidates, merging, and gathering them across DDP ranks.

Internal to the callback (not part of peering's API). A check picks the most confused samples of a batch
(`choose`), keeps the ``capacity`` smallest margins over several batches (`Candidates.merge`) and, under
DDP, over all ranks (`gather`). Everything here returns ordinary tensors, never inference tensors, so the
chosen samples can be kept across hooks and explained with autograd.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from peering.confusion import select_confused

__all__: list[str] = []

Shape = tuple[torch.Size, torch.dtype]  # one sample's shape and dtype


@dataclass
class Candidates:
    """Samples chosen for pictures: inputs [n, ...], labels [n] (-1: unknown), classes [n, 2], margins [n]."""

    inputs: Tensor
    labels: Tensor
    classes: Tensor
    margins: Tensor

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def merge(self, other: Candidates | None, capacity: int) -> Candidates:
        """The ``capacity`` smallest margins of both, ties broken by order (self first)."""
        if other is None or len(other) == 0:
            joined = self
        elif len(self) == 0:
            joined = other
        else:
            dev = self.inputs.device
            joined = Candidates(
                torch.cat([self.inputs, other.inputs.to(dev, self.inputs.dtype)]),
                torch.cat([self.labels, other.labels.to(dev)]),
                torch.cat([self.classes, other.classes.to(dev)]),
                torch.cat([self.margins, other.margins.to(dev)]),
            )
        order = torch.sort(joined.margins, stable=True).indices[:capacity]
        return joined.select(order)

    def select(self, index: Tensor) -> Candidates:
        return Candidates(self.inputs[index], self.labels[index], self.classes[index], self.margins[index])

    def to(self, device: str | torch.device) -> Candidates:
        """On ``device``, as ordinary tensors (never inference tensors, which could not be kept as state)."""
        with torch.inference_mode(False):
            return Candidates(
                *(
                    t.detach().to(device).clone() if t.is_inference() else t.detach().to(device)
                    for t in (self.inputs, self.labels, self.classes, self.margins)
                )
            )


def empty_candidates(shape: Shape | None) -> Candidates:
    sample_shape, dtype = shape if shape is not None else (torch.Size([0]), torch.float32)
    return Candidates(
        torch.zeros((0, *sample_shape), dtype=dtype),
        torch.zeros(0, dtype=torch.int64),
        torch.zeros((0, 2), dtype=torch.int64),
        torch.zeros(0),
    )


@dataclass
class Stats:
    """Samples checked and, of those, confused."""

    samples: int = 0
    confused: int = 0

    def add(self, samples: int, confused: int) -> None:
        self.samples += samples
        self.confused += confused

    @property
    def fraction(self) -> float:
        return self.confused / self.samples if self.samples else 0.0


@dataclass(frozen=True)
class Thresholds:
    """The callback's selection settings: gap on the top two, how it is measured, least top logit."""

    max_difference: float
    margin: Literal["logit", "probability"]
    min_top_value: float | None

    def by_margin_alone(self) -> Thresholds:
        """The same margin measure without thresholds (the tracked samples are chosen so)."""
        return Thresholds(math.inf, self.margin, None)


def choose(
    inputs: Tensor,
    labels: Tensor | None,
    logits: Tensor,
    capacity: int,
    thresholds: Thresholds,
) -> tuple[Candidates, tuple[int, int], int]:
    """The ``capacity`` most confused samples of one batch under ``thresholds``, (samples, confused), and
    how many samples were skipped for NaN/Inf inputs or logits."""
    logits = logits.float()
    bad = ~torch.isfinite(inputs.detach()).flatten(1).all(dim=1) | ~torch.isfinite(logits).all(dim=1)
    skipped = int(bad.sum()) if bad.any() else 0
    if skipped:
        logits = logits.masked_fill(bad.unsqueeze(1), float("nan"))
    sel = select_confused(
        logits,
        max_difference=thresholds.max_difference,
        margin=thresholds.margin,
        top_n=capacity,
        min_top_value=thresholds.min_top_value,
    )
    with torch.inference_mode(False):  # validation batches are inference tensors: copy them out
        idx = sel.indices.to(inputs.device)
        chosen_labels = (
            labels.detach()[idx.to(labels.device)].to(torch.int64).clone()
            if labels is not None
            else torch.full((len(idx),), -1, dtype=torch.int64)
        )
        chosen = Candidates(
            inputs.detach()[idx].clone(),
            chosen_labels.to(inputs.device),
            sel.classes.clone().to(inputs.device),
            sel.margins.clone().to(inputs.device),
        )
    return chosen, (inputs.shape[0], sel.num_confused), skipped


def gather(
    trainer: pl.Trainer,
    local: Candidates | None,
    capacity: int,
    stats: tuple[int, int],
    shape: Shape | None,
) -> tuple[Candidates, tuple[int, int]]:
    """The ``capacity`` most confused candidates of all ranks, and the summed (samples, confused).

    Under DDP this is two ``all_gather`` calls (a header, then the candidates padded to ``capacity``),
    made by every rank at the same hooks and steps: ``capacity`` and the decision to gather depend only
    on counters that are identical on all ranks. The result is identical on all ranks too.
    """
    samples, confused = stats
    if trainer.world_size <= 1:
        chosen = empty_candidates(shape) if local is None else local.merge(None, capacity)
        return chosen, (samples, confused)

    device = trainer.strategy.root_device
    # 1) what each rank has: its flattened sample size (0 = no inputs seen), float64 or not, its counts
    width = int(np.prod(shape[0])) if shape is not None else 0
    wide = shape is not None and shape[1] == torch.float64
    header = torch.tensor([width, int(wide), samples, confused], dtype=torch.float64, device=device)
    headers = trainer.strategy.all_gather(header).reshape(-1, 4)
    widths = headers[:, 0].long()
    samples, confused = int(headers[:, 2].sum()), int(headers[:, 3].sum())
    width = int(widths.max())
    if width == 0 or capacity == 0:
        return empty_candidates(shape), (samples, confused)
    if bool(((widths != width) & (widths != 0)).any()):
        rank_zero_warn("peering: the ranks' inputs differ in size, so they cannot be compared; no pictures")
        return empty_candidates(shape), (samples, confused)
    dtype = torch.float64 if bool(headers[:, 1].any()) else torch.float32
    # 2) the candidates, one row each: inputs, margin, class a, class b, label, valid
    buf = torch.zeros(capacity, width + 5, dtype=dtype, device=device)
    if local is not None and len(local):
        n = min(len(local), capacity)
        buf[:n, :width] = local.inputs[:n].reshape(n, width).to(device, dtype)
        buf[:n, width] = local.margins[:n].to(device, dtype)
        buf[:n, width + 1 : width + 3] = local.classes[:n].to(device, dtype)
        buf[:n, width + 3] = local.labels[:n].to(device, dtype)
        buf[:n, width + 4] = 1
    rows = trainer.strategy.all_gather(buf).reshape(-1, width + 5)
    rows = rows[rows[:, width + 4] > 0.5]
    sample_shape, in_dtype = shape if shape is not None else (torch.Size([width]), dtype)
    merged = Candidates(
        rows[:, :width].reshape(-1, *sample_shape).to(in_dtype),
        rows[:, width + 3].round().long(),
        rows[:, width + 1 : width + 3].round().long(),
        rows[:, width].float(),
    )
    return merged.merge(None, capacity), (samples, confused)
