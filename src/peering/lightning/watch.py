"""`Watch`: one run of `ConfusedLogitCallback`, shared by its parts (the confused-sample checks, the
tracked samples, the confusion atlas): the settings, the counters, the run's health, the picture output
(global rank zero only) and the collectives called; and what every part does the same way: take a batch
apart, run the model on it, choose the confused samples, gather them across ranks, explain and draw them.

Everything here is careful never to change training: the model runs in eval mode without gradients (modes
and RNG put back), gradients are taken with ``torch.autograd.grad`` on detached copies, and a failure
switches the part off for the run with one warning instead of stopping training.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from peering.attribution.explanation import explain
from peering.lightning.batches import Batch, as_model_dtype, model_scores, unpack_batch
from peering.lightning.config import CallbackConfig
from peering.lightning.pictures import PictureOutput, is_token_ids
from peering.lightning.selection import Candidates, Layout, Stats, Thresholds, choose, gather
from peering.lightning.state import CallbackState, Health, Notice, Off
from peering.render import token_scores

__all__: list[str] = []  # internal: its names are used by its own package only

Explainer = Callable[[pl.LightningModule, Candidates], tuple[Tensor, Tensor]]


@dataclass
class Watch:
    """One run of the callback (see the module docstring). ``explain`` is the callback's own
    ``_explain`` (so that a subclass can wrap it)."""

    config: CallbackConfig
    state: CallbackState
    explain: Explainer
    health: Health = field(default_factory=Health)
    output: PictureOutput | None = None
    collectives: list[tuple[str, int]] = field(default_factory=list)
    checked_kwargs: set[str] = field(default_factory=set)  # per-sample guesses that held on a batch

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (``ddp_spawn``) without the picture output: its threads and sinks stay behind."""
        state = self.__dict__.copy()
        state["output"] = None
        return state

    # ------------------------------------------------------------------------------------------ batches

    def unpack(self, stage: str, batch: Any) -> Batch | None:
        """The batch as a `Batch`, or None (with one warning, and the stage off for the run) when its
        inputs cannot be found."""
        try:
            found = unpack_batch(
                batch, self.config.unpack, allow_integer=self.config.layer is not None,
                shared=self.config.shared_kwargs, multilabel=self.config.output == "sigmoid",
            )
        except Exception as err:
            self._cannot_unpack(stage, err)
            return None
        if set(found.forward.unchecked) <= self.checked_kwargs:  # guesses that held on an earlier batch
            found.forward.unchecked = ()
        return found

    def _cannot_unpack(self, stage: str, err: Exception) -> None:
        self.health.switch_off(stage, f"the callback could not take inputs from the batches ({err})")
        rank_zero_warn(
            f"peering: ConfusedLogitCallback cannot take inputs from the {stage} batches ({err}); it "
            "skips them. Pass unpack=lambda batch: (inputs, labels) (or (inputs, labels, "
            "forward_kwargs)) to the callback, and shared_kwargs=[...] for forward arguments the model "
            "takes whole."
        )

    def scores(self, stage: str, pl_module: pl.LightningModule, batch: Batch) -> Tensor | None:
        """The logits, or None (with one warning, and the stage off for the run) if the model fails: a
        failure here must not stop training; under DDP the rank still takes part in the collectives."""
        try:
            guessed = set(batch.forward.unchecked)
            logits = model_scores(pl_module, batch.inputs, batch.forward, self.config.output_fn)
            self.checked_kwargs |= guessed  # they held: later batches' are not checked again
            return logits
        except Exception as err:
            why = f"the callback could not run the model ({type(err).__name__}: {err})"
            self.health.switch_off(stage, why)
            rank_zero_warn(
                f"peering: ConfusedLogitCallback could not run the model on the {stage} batches "
                f"({type(err).__name__}: {err}); it skips them for this run. Training goes on."
            )
            return None

    def select(
        self, batch: Batch, logits: Tensor, capacity: int, thresholds: Thresholds
    ) -> tuple[Candidates, Stats]:
        """`peering.lightning.selection.choose`, saying once per run that non-finite samples are skipped."""
        chosen, stats, skipped = choose(batch, logits, capacity, thresholds)
        if skipped and self.health.first_time(Notice.NONFINITE):
            rank_zero_warn(
                f"peering: ConfusedLogitCallback skips samples whose inputs or logits contain NaN or "
                f"Inf ({skipped} in this batch; later ones are skipped silently)"
            )
        return chosen, stats

    def gather(
        self,
        trainer: pl.Trainer,
        local: Candidates | None,
        capacity: int,
        what: str,
        stats: Stats,
        layout: Layout | None,
    ) -> tuple[Candidates, Stats]:
        """`peering.lightning.selection.gather`, recording the collectives it calls (for the DDP tests)."""
        if trainer.world_size > 1:
            self.collectives.append((what, trainer.global_step))
        return gather(trainer, local, capacity, stats, layout)

    # ------------------------------------------------------------------------------------ pictures (rank 0)

    def emit(
        self, pl_module: pl.LightningModule, chosen: Candidates, tags: list[str], step: int, stage: str,
        epoch: int,
    ) -> None:
        """Explain ``chosen`` and hand the pictures to the output (global rank zero)."""
        if self.health.is_off(Off.PICTURES):
            return
        try:
            attributions, probs = self.explain(pl_module, chosen)
        except Exception as err:
            self.explain_failed(err)
            return
        if self.output is not None:
            shown, attributions = drawable(chosen.to("cpu"), attributions.detach().cpu())
            self.output.pictures(tags, shown, attributions, probs.detach().cpu(), step, stage, epoch)

    def explain_failed(self, err: Exception) -> None:
        why = f"the samples could not be explained ({type(err).__name__}: {err})"
        self.health.switch_off(Off.PICTURES, why)
        rank_zero_warn(
            f"peering: ConfusedLogitCallback could not explain the confused samples ({type(err).__name__}: "
            f"{err}); it draws no more pictures in this run. Training goes on."
        )

    def scalar(self, trainer: pl.Trainer, tag: str, value: float, step: int) -> None:
        if self.output is not None:
            self.output.scalar(trainer.loggers, tag, value, step)

    def report_failures(self) -> None:
        if self.output is not None:
            self.output.report_failures()


def layer_of(pl_module: pl.LightningModule, layer: nn.Module | str | None) -> nn.Module | None:
    """The layer to explain at: the module, or the submodule of that name (looked up each time)."""
    return pl_module.get_submodule(layer) if isinstance(layer, str) else layer


def explain_chosen(
    pl_module: pl.LightningModule, chosen: Candidates, config: CallbackConfig
) -> tuple[Tensor, Tensor]:
    """Attributions [n, 2, ...] toward each chosen sample's two classes, and their probabilities [n, 2]."""
    exp = explain(
        pl_module,
        as_model_dtype(pl_module, chosen.inputs),
        chosen.classes,
        method=config.method,  # type: ignore[arg-type]
        output=config.output,
        output_fn=config.output_fn,
        nonfinite="skip",
        forward_kwargs=chosen.forward,
        layer=layer_of(pl_module, config.layer),
        memory_budget=config.memory_budget,
        **dict(config.method_options or {}),
    )
    probs = exp.probabilities.gather(1, chosen.classes.to(exp.probabilities.device))
    return exp.attributions, probs


_STRIP = 4


def drawable(chosen: Candidates, attributions: Tensor) -> tuple[Candidates, Tensor]:
    """What the pictures can show. Attributions at the inputs are drawn as they are. Token ids [n, L]
    explained at a layer whose output is [n, L, ...] (the embeddings): one score per token [n, 2, L] (the
    attribution summed over the embedding, `peering.render.token_scores`), drawn as coloured tokens. Other
    attributions at a layer ([n, 2, *layer_output]) are summed over the layer's dimensions beyond the
    input's, on blank inputs (ids are no intensities); the input tiles are then empty.

    >>> import torch
    >>> ids = torch.tensor([[5, 6, 7]])
    >>> chosen = Candidates(ids, torch.tensor([1]), torch.tensor([[1, 0]]), torch.tensor([0.5]))
    >>> drawable(chosen, torch.ones(1, 2, 3, 8))[1].shape  # one score per token
    torch.Size([1, 2, 3])
    """
    n, sample_shape = len(chosen), chosen.inputs.shape[1:]
    if attributions.shape[2:] == sample_shape and chosen.inputs.is_floating_point():
        return chosen, attributions
    lead = attributions.shape[2 : 2 + len(sample_shape)]
    if is_token_ids(chosen.inputs) and lead == sample_shape:
        return chosen, token_scores(attributions.reshape(n, 2, *sample_shape, -1))
    if lead == sample_shape and attributions.ndim > 2 + len(sample_shape):
        summed = attributions.reshape(n, 2, *sample_shape, -1).sum(-1)
    elif lead == sample_shape:
        summed = attributions
    else:  # a layer whose output does not follow the inputs' positions: one value per sample
        summed, sample_shape = attributions.reshape(n, 2, -1).sum(-1, keepdim=True), torch.Size([1])
    if len(sample_shape) == 1:  # a row of values: a strip _STRIP rows high, so that it can be seen
        sample_shape = torch.Size([1, _STRIP, sample_shape[0]])
        summed = summed[:, :, None, None, :].expand(n, 2, *sample_shape)
    blank = torch.zeros((n, *sample_shape), dtype=summed.dtype)
    shown = Candidates(blank, chosen.labels, chosen.classes, chosen.margins)
    return shown, summed
