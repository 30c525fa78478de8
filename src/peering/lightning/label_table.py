"""`LabelIssues`' numbers: the per-sample margins of one epoch, the table they are summed into, the
per-class thresholds that calibrate them, and the ranking file.

Internal to `peering.lightning.labels` (its names are used by its own package only):

- `calibrated_margins`: margins of the given labels, optionally against per-class thresholds;
- `Thresholds`: the running per-class means of p(given label) (confident learning's t_j);
- `LabelTable`: the dense table over dataset indices (sums, epochs, given and predicted class, since
  when), filled once per epoch from every rank's records (`gather_records`), saved in checkpoints;
- `write_ranking`: ``<run>/peering/label_issues.csv``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor

from peering._files import atomic_write

__all__: list[str] = []  # internal: its names are used by its own package only

MIN_THRESHOLD_SAMPLES = 32
"""A class's threshold of this epoch is used once this many samples labelled with it have passed."""


def calibrated_margins(
    logits: Tensor, labels: Tensor, log_thresholds: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Margins of the given labels, ``(z_g - log t_g) - max_{j != g} (z_j - log t_j)``, and the model's
    predicted class (the argmax of the raw logits).

    ``log_thresholds`` [C] are the log per-class thresholds (None: zeros, the plain margin of AUM).

    >>> import torch
    >>> z = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    >>> m, p = calibrated_margins(z, torch.tensor([0, 2]))
    >>> m.tolist(), p.tolist()
    ([1.0, -2.0], [0, 1])
    """
    z = logits.float()
    if log_thresholds is not None:
        z = z - log_thresholds.to(z.device, z.dtype)
    given = z.gather(1, labels[:, None])[:, 0]
    others = z.scatter(1, labels[:, None], float("-inf")).amax(dim=1)
    return given - others, logits.argmax(dim=1)


@dataclass
class Thresholds:
    """Per-class thresholds t_j: the mean of p(j) over the samples labelled j (confident learning).

    This epoch's running sums on this rank; `log` gives this epoch's value for a class once
    `MIN_THRESHOLD_SAMPLES` of its samples have passed, the previous epoch's (all ranks') before.

    >>> t = Thresholds()
    >>> t.add(torch.tensor([[0.0, 0.0]]), torch.tensor([1]))
    >>> t.log(2).tolist()  # too few samples yet: the previous epoch's (none: log 1 = 0)
    [0.0, 0.0]
    """

    total: Tensor | None = None  # float64 [C]: summed p(label) per label
    count: Tensor | None = None  # float64 [C]
    previous: Tensor | None = None  # float32 [C]: the log thresholds of the previous epoch

    def reset(self, classes: int) -> None:
        self.total = torch.zeros(classes, dtype=torch.float64)
        self.count = torch.zeros(classes, dtype=torch.float64)

    def log(self, classes: int) -> Tensor:
        if self.total is None or self.count is None or self.total.numel() != classes:
            self.reset(classes)
        assert self.total is not None and self.count is not None
        ok = self.previous is not None and self.previous.numel() == classes
        before = self.previous if ok and self.previous is not None else torch.zeros(classes)
        now = (self.total / self.count.clamp_min(1)).clamp_min(1e-12).log().float()
        return torch.where(self.count >= MIN_THRESHOLD_SAMPLES, now, before)

    def add(self, logits: Tensor, labels: Tensor) -> None:
        """Count a batch's p(label) (after it was measured against the thresholds so far)."""
        classes = logits.shape[1]
        if self.total is None or self.count is None or self.total.numel() != classes:
            self.reset(classes)
        assert self.total is not None and self.count is not None
        p_given = logits.float().softmax(dim=1).gather(1, labels[:, None])[:, 0].double()
        self.total.index_add_(0, labels, p_given)
        self.count.index_add_(0, labels, torch.ones_like(p_given))

    def end_epoch(self, reduce: Any = None) -> None:
        """Make this epoch's thresholds (summed over ranks by ``reduce``, a function of a [2, C] tensor)
        the ones the next epoch starts from."""
        if self.total is None or self.count is None:
            return
        both = torch.stack([self.total, self.count])
        if reduce is not None:
            both = reduce(both)
        total, count = both[0], both[1]
        log_t = torch.zeros_like(total)
        known = count > 0
        log_t[known] = (total[known] / count[known]).clamp_min(1e-12).log()
        self.previous = log_t.float()
        self.total = self.count = None


def gather_records(records: list[tuple[Tensor, ...]], all_gather: Any = None) -> tuple[Tensor, ...]:
    """One epoch's records ``(index, score, predicted, label)`` of all ranks (``all_gather``: the
    strategy's, None on one process), one per sample: a sample the sampler repeated counts once (its
    first record). Identical on every rank."""
    if records:
        index, score, predicted, label = (torch.cat(t) for t in zip(*records, strict=True))
    else:
        index = predicted = label = torch.zeros(0, dtype=torch.int64)
        score = torch.zeros(0)
    if all_gather is not None:
        index, score, predicted, label = _gathered(all_gather, index, score, predicted, label)
    if index.numel():
        order = torch.argsort(index, stable=True)  # stable: keeps the order of the ranks and batches
        index, score, predicted, label = index[order], score[order], predicted[order], label[order]
        first = torch.ones_like(index, dtype=torch.bool)
        first[1:] = index[1:] != index[:-1]
        index, score, predicted, label = index[first], score[first], predicted[first], label[first]
    return index, score, predicted, label


def _gathered(all_gather: Any, *columns: Tensor) -> tuple[Tensor, ...]:
    """Every rank's rows: one all_gather of the sizes, one of the rows padded to the largest."""
    n = columns[0].numel()
    sizes = all_gather(torch.tensor([n])).reshape(-1).cpu()
    width = max(int(sizes.max()), 1)
    buf = torch.full((width, 4), -1.0, dtype=torch.float64)
    if n:
        buf[:n] = torch.stack([c.double() for c in columns], dim=1)
    rows = all_gather(buf).reshape(-1, width, 4).cpu()
    rows = torch.cat([rows[r, : int(sizes[r])] for r in range(rows.shape[0])])
    return rows[:, 0].long(), rows[:, 1].float(), rows[:, 2].long(), rows[:, 3].long()


@dataclass
class LabelTable:
    """Per dataset index: the summed score over the epochs after burn-in (and over the burn-in epochs),
    how many epochs, the given label, the model's class in the last epoch and since which epoch (from 1)
    it has said so. Dense over indices; identical on every rank after each epoch's gather.

    >>> table = LabelTable()
    >>> table.merge(torch.tensor([2, 0]), torch.tensor([-1.0, 2.0]), torch.tensor([5, 1]),
    ...             torch.tensor([3, 1]), epoch=1, burn_in=0)
    >>> indices, scores = table.ranking()
    >>> indices.tolist(), scores.tolist()
    ([2, 0], [-1.0, 2.0])
    """

    total: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    epochs: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int32))
    early_total: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    early_epochs: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int32))
    given: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    predicted: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    since: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))

    @property
    def seen(self) -> Tensor:
        """Bool [N]: the indices recorded at least once."""
        return (self.epochs + self.early_epochs) > 0

    def grow(self, size: int) -> None:
        extra = size - self.total.numel()
        if extra <= 0:
            return
        for f in dataclasses.fields(self):
            old = getattr(self, f.name)
            fill = -1 if f.name in ("given", "predicted", "since") else 0
            setattr(self, f.name, torch.cat([old, torch.full((extra,), fill, dtype=old.dtype)]))

    def merge(
        self, index: Tensor, score: Tensor, predicted: Tensor, label: Tensor, *, epoch: int, burn_in: int
    ) -> None:
        """Add one epoch's (counted from 1) records, one per index."""
        if index.numel() == 0:
            return
        self.grow(int(index.max()) + 1)
        if epoch > burn_in:
            self.total[index] += score.double()
            self.epochs[index] += 1
        else:
            self.early_total[index] += score.double()
            self.early_epochs[index] += 1
        self.given[index] = label
        changed = self.predicted[index] != predicted
        self.since[index] = torch.where(changed, torch.full_like(index, epoch), self.since[index])
        self.predicted[index] = predicted

    def ranking(self) -> tuple[Tensor, Tensor]:
        """``(indices, scores)`` of every index seen, lowest (most suspect) score first: the mean over
        the epochs after burn-in, or over the burn-in epochs while there are none."""
        late = self.epochs > 0
        seen = self.seen.nonzero().flatten()
        scores = torch.where(
            late[seen],
            self.total[seen] / self.epochs[seen].clamp_min(1),
            self.early_total[seen] / self.early_epochs[seen].clamp_min(1),
        ).float()
        order = torch.argsort(scores, stable=True)
        return seen[order], scores[order]

    def state_dict(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name).clone() for f in dataclasses.fields(self)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> LabelTable:
        old = {"total": "sum", "early_total": "early_sum"}  # the names of the first version
        values = {f.name: state.get(f.name, state.get(old.get(f.name, ""))) for f in dataclasses.fields(cls)}
        return cls(**{k: v.clone() for k, v in values.items() if v is not None})


def write_ranking(path: Path, table: LabelTable) -> None:
    """The whole ranking as CSV: ``index,score,given,predicted,since_epoch,epochs``, most suspect first."""
    indices, scores = table.ranking()
    epochs = table.epochs + table.early_epochs
    lines = ["index,score,given,predicted,since_epoch,epochs"]
    for i, s in zip(indices.tolist(), scores.tolist(), strict=True):
        lines.append(
            f"{i},{s:.6g},{int(table.given[i])},{int(table.predicted[i])},{int(table.since[i])},"
            f"{int(epochs[i])}"
        )
    data = ("\n".join(lines) + "\n").encode()

    def write(f: IO[bytes]) -> None:
        f.write(data)

    atomic_write(path, write)
