"""The confusion atlas in a training run: every validation batch counted (`AtlasRun.count`), and at the
end of each validation run the matrix synced, the most frequent mistakes chosen, their examples gathered
across ranks, explained and drawn on rank zero (`AtlasRun.end`). The bookkeeping is
`peering.lightning.atlas.ConfusionAtlas`; the pictures `peering.lightning.pictures.AtlasJob`.
"""

from __future__ import annotations

from collections.abc import Mapping

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DistributedSampler

from peering.attribution.confusion import pair_directions, top_confused_pairs
from peering.lightning.atlas import ConfusionAtlas, PairExamples, pick_examples
from peering.lightning.batches import Batch, as_model_dtype, model_scores
from peering.lightning.pictures import AtlasJob
from peering.lightning.selection import Candidates, Layout, Stats
from peering.lightning.state import Notice, Off
from peering.lightning.watch import Watch
from peering.runs.names import MATRIX, PAIRS

__all__: list[str] = []  # internal: its names are used by its own package only


class AtlasRun:
    """The callback's confusion atlas (``atlas=True``); see the module docstring.

    >>> from peering.lightning.config import CallbackConfig
    >>> from peering.lightning.state import CallbackState
    >>> watch = Watch(CallbackConfig(pairs=2), CallbackState(), explain=lambda module, chosen: None)
    >>> AtlasRun(watch).atlas.pairs
    2
    """

    def __init__(self, watch: Watch) -> None:
        self.watch = watch
        self.atlas = ConfusionAtlas(watch.config.pairs, watch.config.examples_per_pair)
        self.multilabel = watch.config.output == "sigmoid"  # no view of its own yet: the atlas is off

    def reset(self) -> None:
        self.atlas.reset()

    def count(self, pl_module: pl.LightningModule, batch: Batch, logits: Tensor | None) -> None:
        """Count one validation batch (every rank; no collective call). ``logits``: the step's or the
        checks' (None: the atlas runs the model itself)."""
        atlas, watch = self.atlas, self.watch
        if self.multilabel:
            if watch.health.first_time(Notice.ATLAS_MULTILABEL):
                rank_zero_info(
                    "peering: ConfusedLogitCallback's confusion atlas has no multi-label view: with "
                    "output='sigmoid' every class is its own yes/no decision, so there is no matrix of one "
                    "class taken for another; the atlas is off for this run (the confused-sample pictures "
                    "are not)."
                )
            return
        if batch.labels is None:
            atlas.ignore(len(batch))
            return
        if (batch.forward or watch.config.layer is not None) and atlas.examples_per_pair:
            # the pairs' examples and directions do not carry forward arguments (a mask) nor take a layer:
            # a direction computed without its sample's mask would be wrong, so the atlas keeps none
            atlas.examples_per_pair = 0
            if watch.health.first_time(Notice.ATLAS_NO_EXAMPLES):
                rank_zero_info(
                    "peering: ConfusedLogitCallback's confusion atlas shows the matrix and the most frequent "
                    "mistakes without examples or directions: those do not support forward arguments (e.g. "
                    "an attention mask) or layer= yet."
                )
        scores = logits if logits is not None else watch.scores(Off.ATLAS.value, pl_module, batch)
        if scores is None:
            atlas.fail("the model could not be run on a validation batch")
            return
        try:
            atlas.update(batch.inputs, batch.labels, scores)
        except ValueError:
            pass  # the atlas keeps the reason; said once at the end of the run (`end`)

    def end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, epoch: int) -> None:
        """Sync the matrix, choose the pairs, gather their examples; on rank zero explain and draw them.

        Every rank makes the same collective calls here: the matrix's (always), then one gather of the
        examples; what follows depends only on the synced matrix, identical on all ranks.
        """
        watch, atlas = self.watch, self.atlas
        if self.multilabel:  # the same on every rank: no collective is skipped by one rank alone
            return
        if trainer.world_size > 1:
            watch.collectives.append(("atlas", step))
        result = atlas.compute(trainer.strategy)
        if result.matrix is None:
            self._say_no_matrix(result.reason)
            return
        matrix = result.matrix.cpu()
        repeated = _repeated_samples(trainer)
        if repeated and watch.health.first_time(Notice.ATLAS_REPEATS):
            rank_zero_warn(
                f"peering: the confusion matrix counts {repeated} validation sample(s) twice: Lightning's "
                "DistributedSampler repeats them so that every rank gets as many batches. When the counts "
                "must be exact, give the validation DataLoader a sampler that does not repeat (e.g. "
                "Lightning's UnrepeatedDistributedSampler) and pass use_distributed_sampler=False."
            )
        pairs = top_confused_pairs(matrix, atlas.pairs)
        examples, index = self._examples(trainer, pairs)
        watch.state.atlas_matrices += 1
        watch.state.atlas_pair_pictures += len(pairs) if atlas.examples_per_pair else 0
        if not trainer.is_global_zero or watch.output is None:
            return
        directions, probabilities = self._directions(pl_module, pairs, examples, index)
        watch.output.atlas(
            AtlasJob(
                watch.output, matrix_tag=MATRIX, pairs_tag=PAIRS, matrix=matrix, ignored=result.ignored,
                repeated=repeated, pairs=pairs,
                examples=PairExamples(examples.inputs.detach().cpu(), examples.true.cpu(),
                                      examples.predicted.cpu(), examples.gaps.cpu()),
                pair_index=index.cpu(), probabilities=probabilities.detach().cpu(),
                directions=None if directions is None else directions.detach().float().cpu(),
                step=step, epoch=epoch,
            )
        )

    def _say_no_matrix(self, reason: str | None) -> None:
        health = self.watch.health
        if not health.is_off(Off.VALIDATION) and health.first_time(Notice.ATLAS_NO_MATRIX):
            rank_zero_warn(
                f"peering: ConfusedLogitCallback's confusion atlas has no matrix for this validation run "
                f"({reason}). It needs integer class labels in the validation batches: pass "
                "unpack=lambda batch: (inputs, labels) to the callback, or atlas=False to turn it off."
            )

    def _examples(self, trainer: pl.Trainer, pairs: Tensor) -> tuple[PairExamples, Tensor]:
        """Every rank's examples of ``pairs`` gathered, and the best ``examples_per_pair`` of each kept."""
        atlas = self.atlas
        per_pair = atlas.examples_per_pair
        local = atlas.examples_for(pairs)
        # room for every rank's examples: the merge keeps the smallest gaps over all pairs together, so it
        # must not cut; `pick_examples` then keeps the best `per_pair` of each pair
        capacity = len(pairs) * per_pair * max(1, trainer.world_size)
        shape = atlas.sample_shape
        layout: Layout | None = None if shape is None else (("", shape[0], shape[1]),)
        classes = torch.stack([local.predicted, local.true], dim=1)  # carried as (b, a)
        candidates = Candidates(local.inputs, local.true, classes, local.gaps) if len(local) else None
        gathered, _ = self.watch.gather(trainer, candidates, capacity, "atlas", Stats(), layout)
        found = PairExamples(gathered.inputs, gathered.labels, gathered.classes[:, 0], gathered.margins)
        return pick_examples(found, pairs, per_pair)

    def _directions(
        self, pl_module: pl.LightningModule, pairs: Tensor, examples: PairExamples, index: Tensor
    ) -> tuple[Tensor | None, Tensor]:
        """Each pair's direction and each example's probability of the mistake (rank zero), or None
        (said once, and the pair pictures off for the run) when they cannot be computed."""
        watch = self.watch
        if not len(pairs) or not self.atlas.examples_per_pair or watch.health.is_off(Off.ATLAS_PICTURES):
            return None, torch.zeros(0)
        try:
            device = pl_module.device
            inputs = as_model_dtype(pl_module, examples.inputs.to(device))
            directions = pair_directions(
                pl_module, inputs, pairs.to(device), index.to(device), output_fn=watch.config.output_fn,
                memory_budget=watch.config.memory_budget,
            )
            probabilities = torch.zeros(0)
            if len(examples):
                probs = model_scores(pl_module, inputs, None, watch.config.output_fn).float().softmax(dim=1)
                probabilities = probs.gather(1, examples.predicted.to(device)[:, None])[:, 0]
            return directions, probabilities
        except Exception as err:
            watch.health.switch_off(Off.ATLAS_PICTURES, f"{type(err).__name__}: {err}")
            rank_zero_warn(
                f"peering: ConfusedLogitCallback could not explain the confused pairs "
                f"({type(err).__name__}: {err}); the confusion matrix is still logged. Training goes on."
            )
            return None, torch.zeros(0)


def _repeated_samples(trainer: pl.Trainer) -> int:
    """How many validation samples a `DistributedSampler` repeats to even out the ranks (0 when none, or
    when ``limit_val_batches`` leaves the end of the set out anyway)."""
    if trainer.world_size <= 1 or trainer.limit_val_batches != 1.0:
        return 0
    loaders = trainer.val_dataloaders
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    elif not isinstance(loaders, (list, tuple)):
        loaders = [loaders]
    repeated = 0
    for loader in loaders:
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, DistributedSampler) and not sampler.drop_last:
            repeated += max(0, int(sampler.total_size) - len(sampler.dataset))  # type: ignore[arg-type]
    return repeated
