"""The callback's main job: find the confused samples of training, validation and test batches and draw
them, with the fraction of confused samples as a scalar, and say why when there are none.

Training checks batches ``interval - 1, 2 * interval - 1, ...`` one by one (as Bolts). Validation and test
batches ``0, interval, ...`` are pooled over the run (`ConfusedChecks.eval_batch`, which also feeds the
tracked samples and the confusion atlas from the same logits) and drawn once at the run's end. Every rank
takes part in the same collectives at the same hooks; only global rank zero draws.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from peering.lightning.atlas_run import AtlasRun
from peering.lightning.batches import Batch, returned_logits
from peering.lightning.selection import Candidates, Layout, Stats, layout_of
from peering.lightning.state import Notice, Off
from peering.lightning.tracking import Tracking
from peering.lightning.watch import Watch
from peering.runs.names import CONFUSED, FRACTION, STAGES

__all__: list[str] = []  # internal: its names are used by its own package only


class ConfusedChecks:
    """The confused-sample checks of one callback, with its tracked samples and atlas (None when off).

    >>> from peering.lightning.config import CallbackConfig
    >>> from peering.lightning.state import CallbackState
    >>> checks = ConfusedChecks(Watch(CallbackConfig(top_k=3), CallbackState(), explain=lambda m, c: None))
    >>> checks.quota("train")
    3
    """

    def __init__(self, watch: Watch, tracking: Tracking | None = None, atlas: AtlasRun | None = None) -> None:
        self.watch = watch
        self.tracking = tracking if tracking is not None else Tracking(watch)
        self.atlas = atlas
        self.pool: Candidates | None = None  # validation/test: the most confused so far this run
        self.pool_stats = Stats()
        self.layout: Layout | None = None

    # ------------------------------------------------------------------------------------------- training

    def train_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        """Check one training batch: choose, gather across ranks, count, draw (rank zero)."""
        watch = self.watch
        quota = self.quota("train")
        local, layout, stats = None, None, Stats()
        found = None if watch.health.is_off("train") else watch.unpack("train", batch)
        if found is not None:
            layout = layout_of(found.inputs, found.forward)
            logits = watch.scores("train", pl_module, found)
            if logits is not None:
                local, stats = watch.select(found, logits, quota, watch.config.thresholds)
        chosen, stats = watch.gather(trainer, local, quota, "train", stats, layout)
        counters = watch.state.stages["train"]
        counters.checks += 1
        counters.seen.add(stats)
        counters.epoch_seen.add(stats)
        counters.count(len(chosen))
        self._publish(trainer, pl_module, "train", chosen, stats)

    # ------------------------------------------------------------------------------- validation and test

    def eval_start(self, trainer: pl.Trainer, stage: str) -> None:
        self.pool, self.pool_stats, self.layout = None, Stats(), None
        self.tracking.pool = None
        counters = self.watch.state.stages[stage]
        if not trainer.sanity_checking:
            counters.new_epoch(counters.count_epoch + 1)
        if stage == "validation" and self.atlas is not None:
            self.atlas.reset()

    def eval_batch(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        stage: str,
    ) -> None:
        """Validation and test batches: look at every ``logging_batch_interval``-th one, keep the most
        confused so far (they run under ``torch.inference_mode``: everything kept is copied out of it)."""
        watch = self.watch
        check = stage in watch.config.on and batch_idx % watch.config.logging_batch_interval == 0
        choose_tracked = stage == "validation" and self.tracking.choosing(trainer)
        atlas = self.atlas if stage == "validation" else None
        if not (check or choose_tracked or atlas is not None) or watch.health.is_off(stage):
            return
        found = watch.unpack(stage, batch)
        if found is None:
            return
        # the logits the step returned (Lightning runs it in eval mode, as the callback would), else its own
        returned = returned_logits(outputs, len(found))
        logits = None
        if check or choose_tracked:
            if not self._same_layout(stage, found):
                check = choose_tracked = False
            else:
                logits = returned if returned is not None else watch.scores(stage, pl_module, found)
                if logits is None:
                    if atlas is not None:
                        atlas.atlas.fail("the model could not be run on a validation batch")
                    return
        if atlas is not None:
            atlas.count(pl_module, found, returned if returned is not None else logits)
        if logits is None:
            return
        if check:
            self._pool(stage, found, logits)
        if choose_tracked:
            self.tracking.offer(found, logits)

    def eval_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """The run's confused samples gathered and drawn, the tracked samples chosen and re-explained, the
        atlas synced and drawn: in this order on every rank (the collectives' order)."""
        step, epoch = trainer.global_step, trainer.current_epoch
        counters = self.watch.state.stages[stage]
        if stage in self.watch.config.on:
            quota = self.quota(stage)
            chosen, stats = self.watch.gather(trainer, self.pool, quota, stage, self.pool_stats, self.layout)
            counters.seen.add(stats)
            counters.epoch_seen = stats
            counters.count(len(chosen))
            self._publish(trainer, pl_module, stage, chosen, stats)
            self.tell_if_none_confused(stage, counters.count_epoch)
        if stage == "validation":
            self.tracking.end(trainer, pl_module, self.layout, step, epoch)
        self.pool = None
        if stage == "validation" and self.atlas is not None:
            self.atlas.end(trainer, pl_module, step, epoch)

    # ------------------------------------------------------------------------------------------- helpers

    def quota(self, stage: str) -> int:
        """How many samples this check may draw (``top_k``, within ``max_pictures_per_epoch``)."""
        config = self.watch.config
        if config.max_pictures_per_epoch is None:
            return config.top_k
        left = config.max_pictures_per_epoch - self.watch.state.stages[stage].epoch_chosen
        return max(0, min(config.top_k, left))

    def _pool(self, stage: str, batch: Batch, logits: torch.Tensor) -> None:
        self.watch.state.stages[stage].checks += 1
        quota = self.quota(stage)
        local, stats = self.watch.select(batch, logits, quota, self.watch.config.thresholds)
        self.pool_stats.add(stats)
        self.pool = local if self.pool is None else self.pool.merge(local, quota)

    def _publish(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, chosen: Candidates, stats: Stats
    ) -> None:
        """The fraction of confused samples and the pictures of the chosen (global rank zero)."""
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        if stats.samples:
            self.watch.scalar(trainer, FRACTION[stage], stats.fraction, step)
        if len(chosen):
            epoch = trainer.current_epoch
            self.watch.emit(pl_module, chosen, [CONFUSED[stage]], step, stage, epoch)

    def _same_layout(self, stage: str, batch: Batch) -> bool:
        """True when the batch is shaped like the run's first (its samples can be pooled with the others');
        else said once per run and stage, and its samples skipped."""
        layout = layout_of(batch.inputs, batch.forward)
        if self.layout is None or layout == self.layout:
            self.layout = layout
            return True
        if self.watch.health.first_time(Notice.SHAPE_CHANGED, stage):
            shapes = {name or "inputs": list(shape) for name, shape, _ in layout}
            first = {name or "inputs": list(shape) for name, shape, _ in self.layout}
            rank_zero_warn(
                f"peering: ConfusedLogitCallback skips {stage} batches shaped unlike the first ({shapes} vs "
                f"{first}): their samples cannot be compared in one pool. Pad every batch to one length "
                "(e.g. the tokenizer's padding='max_length') to have them all considered."
            )
        return False

    def tell_if_none_confused(self, stage: str, epoch: int) -> None:
        """Once per run and stage: an epoch whose checks found no confused sample says which threshold
        filtered them out (rank zero, info level)."""
        seen = self.watch.state.stages[stage].epoch_seen
        if stage not in self.watch.config.on or seen.samples == 0 or seen.confused:
            return
        if self.watch.health.first_time(Notice.NONE_CONFUSED, stage):
            rank_zero_info(
                f"peering: ConfusedLogitCallback found no confused sample in {stage} epoch {epoch}: "
                f"{self.watch.config.thresholds.why_none_confused(seen)}. (Said once per run.)"
            )

    def summary(self) -> dict[str, Any]:
        """The settings and counters written to ``<run>/peering/callback.json``."""
        stages = {}
        for s in STAGES:
            counters = self.watch.state.stages[s]
            stages[s] = {
                "watched": s in self.watch.config.on,
                "checks": counters.checks,
                **counters.seen.to_dict(),
                "chosen": counters.chosen,
                "pictures": counters.pictures,
                "why_no_pictures": None if counters.pictures else self.why_no_pictures(s),
            }
        return {
            "settings": self.watch.config.to_dict(),
            "stages": stages,
            "tracked_pictures": self.watch.state.tracked_pictures,
        }

    def why_no_pictures(self, stage: str) -> str:
        config, health = self.watch.config, self.watch.health
        counters = self.watch.state.stages[stage]
        if stage not in config.on:
            return f"not watched (on={list(config.on)})"
        if health.is_off(stage):
            return health.off[Off.stage(stage)]
        if counters.checks == 0:
            if stage == "train":
                n = config.logging_batch_interval
                return f"no batch was checked (training checks one batch in {n}: logging_batch_interval={n})"
            return "no batch was checked"
        if counters.seen.confused == 0:
            return config.thresholds.why_none_confused(counters.seen)
        if health.is_off(Off.PICTURES):
            return health.off[Off.PICTURES]
        return f"{counters.chosen} samples were chosen but no picture could be written (see the warnings)"

