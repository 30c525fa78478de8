"""The tracked samples (``track=N``): the N most confused samples of the first validation run, chosen by
margin alone, re-explained at the end of every validation run of ``fit`` under ``peering/tracked/<i>``, so
that the step slider shows how their explanation changes as the model learns."""

from __future__ import annotations

import lightning.pytorch as pl
from torch import Tensor

from peering.lightning.batches import Batch, model_scores
from peering.lightning.selection import Candidates, Layout, Stats
from peering.lightning.state import Off
from peering.lightning.watch import Watch
from peering.runs.names import tracked_tag

__all__: list[str] = []  # internal: its names are used by its own package only


class Tracking:
    """Choose the tracked samples during the first validation run of ``fit``, then re-explain them.

    >>> from peering.lightning.config import CallbackConfig
    >>> from peering.lightning.state import CallbackState
    >>> Tracking(Watch(CallbackConfig(track=2), CallbackState(), explain=lambda m, c: None)).size
    2
    """

    def __init__(self, watch: Watch) -> None:
        self.watch = watch
        self.pool: Candidates | None = None

    @property
    def size(self) -> int:
        return self.watch.config.track

    def choosing(self, trainer: pl.Trainer) -> bool:
        """True during the first validation run of ``fit`` (the tracked samples are chosen then)."""
        return bool(self.size) and not self.watch.state.tracking_chosen and trainer.state.fn == "fit"

    def offer(self, batch: Batch, logits: Tensor) -> None:
        """Keep the batch's most confused samples (by margin alone) among those offered so far."""
        by_margin = self.watch.config.thresholds.by_margin_alone()
        local, _ = self.watch.select(batch, logits, self.size, by_margin)
        self.pool = local if self.pool is None else self.pool.merge(local, self.size)

    def end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, layout: Layout | None, step: int, epoch: int
    ) -> None:
        """At the end of a validation run: choose them (first run; a collective), re-explain them (rank zero,
        every run of ``fit``)."""
        state = self.watch.state
        if self.choosing(trainer):
            chosen, _ = self.watch.gather(trainer, self.pool, self.size, "tracked", Stats(), layout)
            state.tracked = chosen.to("cpu") if len(chosen) else None
            state.tracking_chosen = True
        self.pool = None
        if self.size and state.tracked is not None and trainer.state.fn == "fit" and trainer.is_global_zero:
            if not self.watch.health.is_off(Off.PICTURES):
                try:
                    self._emit(pl_module, step, epoch)
                except Exception as err:
                    self.watch.explain_failed(err)

    def _emit(self, pl_module: pl.LightningModule, step: int, epoch: int) -> None:
        tracked = self.watch.state.tracked
        assert tracked is not None
        tracked = tracked.to(pl_module.device)
        logits = model_scores(pl_module, tracked.inputs, tracked.forward, self.watch.config.output_fn).float()
        classes = logits.topk(2, dim=1).indices
        margins = logits.gather(1, classes)[:, 0] - logits.gather(1, classes)[:, 1]
        now = Candidates(tracked.inputs, tracked.labels, classes, margins, tracked.forward)
        tags = [tracked_tag(i) for i in range(len(now))]
        self.watch.emit(pl_module, now, tags, step, "tracked", epoch)
