"""`ConfusedLogitCallback`'s state: what it counts (saved in checkpoints) and how its run is going.

- `StageCounters`: one stage's counters; `CallbackState`: all of them, the tracked samples and the
  atlas's counts, with `state_dict` / `load_state_dict` written once from the fields.
- `Health`: what was switched off for this run and why, and what was already said once (an `Enum`
  each, not strings).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from peering.lightning.selection import Candidates, Stats
from peering.runs.names import STAGES

__all__: list[str] = []  # internal: its names are used by its own package only


@dataclass
class StageCounters:
    """One stage's counters. All but ``pictures`` are identical on every rank (they depend only on
    gathered results); ``pictures`` counts the pictures global rank zero actually wrote."""

    checks: int = 0  # batches (train) or runs (validation, test) checked
    chosen: int = 0  # samples chosen for pictures
    triggers: int = 0  # checks that chose samples
    epoch_chosen: int = 0  # this epoch's chosen samples, for max_pictures_per_epoch
    count_epoch: int = -1  # the epoch the epoch counters are of
    seen: Stats = field(default_factory=Stats)  # what every check saw
    pictures: int = 0
    epoch_seen: Stats = field(default_factory=Stats)  # this epoch's (not saved)

    def new_epoch(self, epoch: int) -> None:
        if self.count_epoch != epoch:
            self.count_epoch, self.epoch_chosen, self.epoch_seen = epoch, 0, Stats()

    def count(self, chosen: int) -> None:
        self.chosen += chosen
        self.epoch_chosen += chosen
        self.triggers += chosen > 0


_SAVED_COUNTERS = ("checks", "pictures", "chosen", "triggers", "epoch_chosen", "count_epoch")
_SAVED_STATS = {"samples_checked": "samples", "confused_seen": "confused", "candidates_seen": "candidates"}
_OLD_NAMES = {"epoch_chosen": "epoch_pictures", "chosen": "pictures"}  # what older checkpoints fall back to


@dataclass
class CallbackState:
    """Everything `ConfusedLogitCallback.state_dict` saves.

    >>> state = CallbackState()
    >>> state.stages["train"].checks = 3
    >>> again = CallbackState()
    >>> again.load_state_dict(state.state_dict())
    >>> again.stages["train"].checks
    3
    """

    stages: dict[str, StageCounters] = field(default_factory=lambda: {s: StageCounters() for s in STAGES})
    tracked: Candidates | None = None
    tracking_chosen: bool = False
    tracked_pictures: int = 0
    atlas_matrices: int = 0
    atlas_pair_pictures: int = 0

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            key: {s: getattr(c, key) for s, c in self.stages.items()} for key in _SAVED_COUNTERS
        }
        for key, name in _SAVED_STATS.items():
            out[key] = {s: getattr(c.seen, name) for s, c in self.stages.items()}
        out["tracked"] = None if self.tracked is None else self.tracked.state_dict()
        out["tracking_chosen"] = self.tracking_chosen
        out["tracked_pictures"] = self.tracked_pictures
        out["atlas"] = {"matrices": self.atlas_matrices, "pair_pictures": self.atlas_pair_pictures}
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        def get(key: str, stage: str) -> int:
            default = -1 if key == "count_epoch" else get(_OLD_NAMES[key], stage) if key in _OLD_NAMES else 0
            return int(state.get(key, {}).get(stage, default))

        for s, counters in self.stages.items():
            values: dict[str, Any] = {key: get(key, s) for key in _SAVED_COUNTERS}
            values["seen"] = Stats(**{name: get(key, s) for key, name in _SAVED_STATS.items()})
            self.stages[s] = dataclasses.replace(counters, **values)
        tracked = state.get("tracked")
        self.tracked = None if tracked is None else Candidates.from_state_dict(tracked)
        self.tracking_chosen = bool(state.get("tracking_chosen", False))
        self.tracked_pictures = int(state.get("tracked_pictures", 0))
        atlas = state.get("atlas", {})
        self.atlas_matrices = int(atlas.get("matrices", 0))
        self.atlas_pair_pictures = int(atlas.get("pair_pictures", 0))


class Off(Enum):
    """A part of the callback switched off for the rest of a run (after a failure it warned about)."""

    TRAIN = "train"
    VALIDATION = "validation"
    TEST = "test"
    PICTURES = "pictures"
    ATLAS = "atlas"
    ATLAS_PICTURES = "atlas pictures"

    @classmethod
    def stage(cls, stage: str) -> Off:
        return cls(stage)


class Notice(Enum):
    """Something the callback says once per run (per stage where it names one)."""

    NONFINITE = "nonfinite samples are skipped"
    NONE_CONFUSED = "no confused sample in an epoch"
    SHAPE_CHANGED = "a batch shaped unlike the first"
    ATLAS_NO_MATRIX = "the atlas has no matrix"
    ATLAS_REPEATS = "the sampler repeats validation samples"
    ATLAS_NO_EXAMPLES = "the atlas keeps no examples"
    ATLAS_MULTILABEL = "the atlas has no multi-label view"


@dataclass
class Health:
    """How one run is going: the parts switched off and why (``off``), what was said once (``told``)."""

    off: dict[Off, str] = field(default_factory=dict)
    told: set[tuple[Notice, str]] = field(default_factory=set)

    def is_off(self, part: Off | str) -> bool:
        return (Off.stage(part) if isinstance(part, str) else part) in self.off

    def switch_off(self, part: Off | str, why: str) -> None:
        self.off.setdefault(Off.stage(part) if isinstance(part, str) else part, why)

    def first_time(self, notice: Notice, about: str = "") -> bool:
        """True the first time ``notice`` (about ``about``) is asked for in this run."""
        key = (notice, about)
        if key in self.told:
            return False
        self.told.add(key)
        return True
