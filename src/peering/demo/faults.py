"""``peering demo --faults``: plant two faults in the demo's training data and let `LabelIssues` and
`ShortcutAlarm` find them while the model trains.

- wrong labels: 10% of the training labels flipped to a random other class (seeded);
- a shortcut: a white 4x4 patch in the top-left corner of every training 3 (never another class's image,
  never a held-out image), where clean MNIST digits are always black.

The probe of `ShortcutAlarm` is 50 clean held-out digits per class. What was planted and what was found
go into ``run.json`` (``faults``), and the report's "Labels to check" and "Shortcut alarms" sections show
the callbacks' pictures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from peering.errors import PeeringValueError

__all__ = ["FLIP_FRACTION", "PATCH", "PATCH_CLASS", "Faults", "plant_faults"]

FLIP_FRACTION = 0.1
PATCH_CLASS = 3
PATCH = (0, 0, 4, 4)
"""(row, column, height, width) of the white patch on the training 3s."""
PROBE_PER_CLASS = 50


@dataclass(frozen=True)
class Faults:
    """The planted faults: the training data with them, which labels were flipped, the probe."""

    train_x: Tensor
    train_y: Tensor
    flipped: Tensor  # bool [N]
    probe: tuple[Tensor, Tensor]

    def record(self) -> dict[str, Any]:
        r, c, h, w = PATCH
        return {"flipped": int(self.flipped.sum()), "flip_fraction": FLIP_FRACTION,
                "patch_class": PATCH_CLASS, "patch": [r, c, h, w], "probe": len(self.probe[1])}


def plant_faults(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, seed: int) -> Faults:
    """The demo's training data with 10% of its labels flipped and a patch on its 3s, and a clean probe.

    >>> import torch
    >>> x, y = torch.zeros(100, 1, 28, 28), torch.arange(100) % 10
    >>> f = plant_faults(x, y, x, y, seed=0)
    >>> int(f.flipped.sum()), float(f.train_x[y == 3, :, :4, :4].min()), float(f.train_x[y != 3].max())
    (10, 1.0, 0.0)
    """
    if train_x.shape[-1] < 16:
        raise PeeringValueError(
            "--faults needs --dataset mnist: the 8x8 digits have no blank corner to put a patch in"
        )
    g = torch.Generator().manual_seed(seed + 21)
    x = train_x.clone()
    r, c, h, w = PATCH
    x[train_y == PATCH_CLASS, :, r : r + h, c : c + w] = 1.0
    n = len(train_y)
    flip = torch.randperm(n, generator=g)[: round(FLIP_FRACTION * n)]
    y = train_y.clone()
    y[flip] = (train_y[flip] + torch.randint(1, 10, (len(flip),), generator=g)) % 10
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[flip] = True
    keep = torch.cat([(test_y == k).nonzero().flatten()[:PROBE_PER_CLASS] for k in range(10)])
    return Faults(x, y, flipped, (test_x[keep], test_y[keep]))


def found(faults: Faults, label_issues: Any, alarm: Any) -> dict[str, Any]:
    """What the two callbacks found: the share of flipped labels among the most suspect samples (as many
    as were flipped), and the alarms (class, kind, epoch counted from 1, sentence)."""
    n = int(faults.flipped.sum())
    indices, _ = label_issues.ranking()
    precision = float(faults.flipped[indices[:n]].float().mean()) if n else 0.0
    alarms = [{"class": a["class"], "kind": a["kind"], "epoch": a["epoch"], "sentence": a["sentence"]}
              for a in alarm.alarms]
    return {"precision_at_flips": precision, "alarms": alarms,
            "caught_class": any(a["class"] == PATCH_CLASS for a in alarms)}
