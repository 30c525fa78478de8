"""Which samples `ConfusedLogitCallback` draws: candidates, merging, and gathering them across DDP ranks.

Internal to the callback (not part of peering's API). A check picks the most confused samples of a batch
(`choose`), keeps the ``capacity`` smallest margins over several batches (`Candidates.merge`) and, under
DDP, over all ranks (`gather`). Everything here returns ordinary tensors, never inference tensors, so the
chosen samples can be kept across hooks and explained with autograd.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from peering._model import ForwardKwargs
from peering.attribution.confusion import Head, confusion_margins, select_confused
from peering.lightning.batches import Batch

__all__: list[str] = []

Layout = tuple[tuple[str, torch.Size, torch.dtype], ...]
"""One sample's tensors: ("", shape, dtype) of the inputs, then (name, shape, dtype) of each per-sample
forward argument, sorted by name."""


@dataclass
class Candidates:
    """Samples chosen for pictures: inputs [n, ...], labels [n] (-1: unknown), classes [n, 2], margins
    [n], and their forward arguments (`ForwardKwargs`: the per-sample rows of these samples, the shared
    ones unchanged)."""

    inputs: Tensor
    labels: Tensor
    classes: Tensor
    margins: Tensor
    forward: ForwardKwargs = field(default_factory=lambda: ForwardKwargs(None, 0))

    def __post_init__(self) -> None:
        n = self.inputs.shape[0]
        if self.forward.batch != n and not self.forward.per_sample:  # none given, or only shared ones
            self.forward = ForwardKwargs.of({}, self.forward.shared, n)

    def __len__(self) -> int:
        return self.inputs.shape[0]

    @property
    def layout(self) -> Layout:
        return layout_of(self.inputs, self.forward)

    def merge(self, other: Candidates | None, capacity: int) -> Candidates:
        """The ``capacity`` smallest margins of both, ties broken by order (self first). Both must have the
        same `layout` (the same sample shapes)."""
        with torch.inference_mode(False):  # in a stand-alone validate()/test(): still ordinary tensors
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
                    self.forward.cat(other.forward),
                )
            order = torch.sort(joined.margins, stable=True).indices[:capacity]
            return joined.select(order)

    def select(self, index: Tensor) -> Candidates:
        """The rows ``index``, as ordinary tensors even inside ``torch.inference_mode``."""
        with torch.inference_mode(False):
            return Candidates(
                self.inputs[index],
                self.labels[index],
                self.classes[index],
                self.margins[index],
                self.forward.select(index),
            )

    def to(self, device: str | torch.device) -> Candidates:
        """On ``device``, as ordinary tensors (never inference tensors, which could not be kept as state)."""

        def move(t: Tensor) -> Tensor:
            return t.detach().to(device).clone() if t.is_inference() else t.detach().to(device)

        with torch.inference_mode(False):
            return Candidates(
                move(self.inputs), move(self.labels), move(self.classes), move(self.margins),
                self.forward.to(device),
            )

    def state_dict(self) -> dict[str, Any]:
        """The samples as CPU tensors (and the shared forward arguments as they are), for a checkpoint."""
        names = ("inputs", "labels", "classes", "margins")
        saved: dict[str, Any] = {k: getattr(self, k).detach().cpu() for k in names}
        saved["kwargs"] = {k: v.detach().cpu() for k, v in self.forward.per_sample.items()}
        saved["shared"] = dict(self.forward.shared)
        return saved

    @classmethod
    def from_state_dict(cls, saved: dict[str, Any]) -> Candidates:
        forward = ForwardKwargs.of(saved.get("kwargs", {}), saved.get("shared", {}), len(saved["inputs"]))
        return cls(saved["inputs"], saved["labels"], saved["classes"], saved["margins"], forward)


def layout_of(inputs: Tensor, forward: ForwardKwargs) -> Layout:
    """The `Layout` of a batch's inputs and per-sample forward arguments."""
    return (("", inputs.shape[1:], inputs.dtype),) + forward.layout


def empty_candidates(layout: Layout | None) -> Candidates:
    layout = layout if layout is not None else (("", torch.Size([0]), torch.float32),)
    (_, sample_shape, dtype), *rest = layout
    forward = ForwardKwargs.of({name: torch.zeros((0, *shape), dtype=dt) for name, shape, dt in rest}, {}, 0)
    return Candidates(
        torch.zeros((0, *sample_shape), dtype=dtype),
        torch.zeros(0, dtype=torch.int64),
        torch.zeros((0, 2), dtype=torch.int64),
        torch.zeros(0),
        forward,
    )


@dataclass
class Stats:
    """What checks saw: samples checked, of those the candidates (top logit >= ``min_logit_value``) and the
    confused (candidates whose top two are within ``max_logit_difference``); the highest top logit of any
    finite sample and the smallest top-two gap of any candidate (to say which threshold to loosen)."""

    samples: int = 0
    confused: int = 0
    candidates: int = 0
    top: float = -math.inf
    gap: float = math.inf

    def add(self, other: Stats) -> None:
        self.samples += other.samples
        self.confused += other.confused
        self.candidates += other.candidates
        self.top = max(self.top, other.top)
        self.gap = min(self.gap, other.gap)

    @property
    def fraction(self) -> float:
        return self.confused / self.samples if self.samples else 0.0

    def to_dict(self) -> dict[str, int | float | None]:
        """JSON-ready (infinities as None)."""
        return {
            "samples": self.samples,
            "candidates": self.candidates,
            "confused": self.confused,
            "max_top_logit": self.top if math.isfinite(self.top) else None,
            "min_gap": self.gap if math.isfinite(self.gap) else None,
        }


@dataclass(frozen=True)
class Thresholds:
    """The callback's selection settings: gap on the top two, how it is measured, least top logit."""

    max_difference: float
    margin: Literal["logit", "probability"]
    min_top_value: float | None
    head: Head = "softmax"

    def by_margin_alone(self) -> Thresholds:
        """The same margin measure without thresholds (the tracked samples are chosen so)."""
        return Thresholds(math.inf, self.margin, None, self.head)

    def why_none_confused(self, stats: Stats) -> str:
        """Which threshold left no confused sample among ``stats``, and what to loosen."""
        if stats.samples == 0:
            return "no sample was checked"
        if stats.candidates == 0:
            highest = f"the highest was {stats.top:.3g}" if math.isfinite(stats.top) else "none was finite"
            return (
                f"none of the {stats.samples} samples checked had a top logit >= min_logit_value="
                f"{self.min_top_value:g} ({highest}); lower min_logit_value or set it to None"
            )
        if self.head == "sigmoid":
            measure = "|logit|" if self.margin == "logit" else "|2p - 1|"
            return (
                f"none of the {stats.samples} samples checked had a class near a toss-up (p = 0.5): "
                f"{measure} <= max_logit_difference={self.max_difference:g} (the nearest was "
                f"{stats.gap:.3g}); raise max_logit_difference"
            )
        what = "logits" if self.margin == "logit" else "softmax probabilities"
        passed = (
            f"{stats.candidates} of the {stats.samples} samples checked had a top logit >= "
            f"min_logit_value={self.min_top_value:g}, but none"
            if self.min_top_value is not None
            else f"none of the {stats.samples} samples checked"
        )
        return (
            f"{passed} had its top two {what} within max_logit_difference={self.max_difference:g} (the "
            f"closest were {stats.gap:.3g} apart); raise max_logit_difference"
        )


def choose(
    batch: Batch, logits: Tensor, capacity: int, thresholds: Thresholds
) -> tuple[Candidates, Stats, int]:
    """The ``capacity`` most confused samples of one batch under ``thresholds`` (with their rows of the
    batch's forward arguments), what the check saw, and how many samples were skipped for NaN/Inf inputs
    or logits."""
    inputs, labels = batch.inputs, batch.labels
    logits = logits.float()
    bad = ~torch.isfinite(logits).all(dim=1)
    if inputs.is_floating_point():
        bad |= ~torch.isfinite(inputs.detach()).flatten(1).all(dim=1)
    skipped = int(bad.sum()) if bad.any() else 0
    if skipped:
        logits = logits.masked_fill(bad.unsqueeze(1), float("nan"))
    sel = select_confused(
        logits,
        max_difference=thresholds.max_difference,
        margin=thresholds.margin,
        top_n=capacity,
        min_top_value=thresholds.min_top_value,
        head=thresholds.head,
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
            batch.forward.select(idx),
        )
    return chosen, _stats(logits, sel.num_confused, sel.num_candidates, thresholds), skipped


def _stats(logits: Tensor, confused: int, candidates: int, thresholds: Thresholds) -> Stats:
    """`Stats` of one batch: counts from the selection, plus the highest top logit and the smallest gap."""
    stats = Stats(logits.shape[0], confused, candidates)
    finite = torch.isfinite(logits).all(dim=1)
    least = 1 if thresholds.head == "sigmoid" else 2
    if logits.shape[0] == 0 or logits.shape[1] < least or not bool(finite.any()):
        return stats
    gaps, _ = confusion_margins(logits[finite], thresholds.margin, thresholds.head)
    tops = logits[finite].amax(dim=1)
    if thresholds.min_top_value is not None:
        gaps = gaps[tops >= thresholds.min_top_value]
    stats.top = float(tops.max())
    stats.gap = float(gaps.min()) if gaps.numel() else math.inf
    return stats


def gather(
    trainer: pl.Trainer,
    local: Candidates | None,
    capacity: int,
    stats: Stats,
    layout: Layout | None,
) -> tuple[Candidates, Stats]:
    """The ``capacity`` most confused candidates of all ranks, and the `Stats` of all ranks together.

    Under DDP this is two ``all_gather`` calls (a header, then the candidates padded to ``capacity``, one
    row each: inputs and per-sample forward arguments flattened, margin, classes, label), made by every
    rank at the same hooks and steps: ``capacity`` and the decision to gather depend only on counters that
    are identical on all ranks. The result is identical on all ranks too (the ``shared`` forward arguments
    are each rank's own).
    """
    if trainer.world_size <= 1:
        chosen = empty_candidates(layout) if local is None else local.merge(None, capacity)
        return chosen, stats

    device = trainer.strategy.root_device
    # 1) what each rank has: its flattened sample size (0 = no inputs seen), float64 or not, its stats
    sizes = [int(np.prod(shape)) for _, shape, _ in layout] if layout is not None else []
    width = sum(sizes)
    # float32 holds integers exactly only up to 2**24 (token ids): integer tensors travel as float64
    wide = layout is not None and any(
        dt == torch.float64 or not (dt.is_floating_point or dt.is_complex) for _, _, dt in layout
    )
    header = torch.tensor(
        [width, int(wide), stats.samples, stats.confused, stats.candidates, stats.top, stats.gap],
        dtype=torch.float64,
        device=device,
    )
    headers = trainer.strategy.all_gather(header).reshape(-1, 7)
    widths = headers[:, 0].long()
    total = Stats(
        int(headers[:, 2].sum()),
        int(headers[:, 3].sum()),
        int(headers[:, 4].sum()),
        float(headers[:, 5].max()),
        float(headers[:, 6].min()),
    )
    width = int(widths.max())
    if width == 0 or capacity == 0:
        return empty_candidates(layout), total
    if bool(((widths != width) & (widths != 0)).any()):
        rank_zero_warn("peering: the ranks' inputs differ in size, so they cannot be compared; no pictures")
        return empty_candidates(layout), total
    dtype = torch.float64 if bool(headers[:, 1].any()) else torch.float32
    if layout is None:  # this rank saw no inputs: it takes the rows as flat inputs
        layout, sizes = (("", torch.Size([width]), dtype),), [width]
    # 2) the candidates, one row each: inputs and per-sample arguments, margin, class a, class b, label, valid
    buf = torch.zeros(capacity, width + 5, dtype=dtype, device=device)
    if local is not None and len(local):
        n = min(len(local), capacity)
        parts = [local.inputs[:n]] + [local.forward.per_sample[name][:n] for name, _, _ in layout[1:]]
        buf[:n, :width] = torch.cat([p.reshape(n, -1).to(device, dtype) for p in parts], dim=1)
        buf[:n, width] = local.margins[:n].to(device, dtype)
        buf[:n, width + 1 : width + 3] = local.classes[:n].to(device, dtype)
        buf[:n, width + 3] = local.labels[:n].to(device, dtype)
        buf[:n, width + 4] = 1
    rows = trainer.strategy.all_gather(buf).reshape(-1, width + 5)
    rows = rows[rows[:, width + 4] > 0.5]
    columns = rows[:, :width].split(sizes, dim=1)
    tensors = [c.reshape(-1, *shape).to(dt) for c, (_, shape, dt) in zip(columns, layout, strict=True)]
    per_sample = {name: t for (name, _, _), t in zip(layout[1:], tensors[1:], strict=True)}
    shared = local.forward.shared if local is not None else {}
    merged = Candidates(
        tensors[0],
        rows[:, width + 3].round().long(),
        rows[:, width + 1 : width + 3].round().long(),
        rows[:, width].float(),
        ForwardKwargs.of(per_sample, shared, len(tensors[0])),
    )
    return merged.merge(None, capacity), total
