"""`ConfusedLogitCallback`: while a classifier trains, show what its nearly tied top two classes look for.

Every ``logging_batch_interval`` batches the callback runs the model itself, in eval mode and without
gradients, on a detached copy of the batch; picks the samples whose two highest logits are within
``max_logit_difference`` (the ``top_k`` *most* confused, over all DDP ranks); explains them with
`peering.explain` (input gradients toward both classes, through ``torch.autograd.grad`` only); and draws
one panel per sample (`peering.render.confusion_panels`: images, or bar charts for tabular inputs, each
with its scale), logged to the loggers as ONE picture per check and tag (the panels stacked, most confused
first) and to the PNG folder as one file per sample, plus the fraction of confused samples. With
``atlas=True`` (the default) it also counts every validation batch into a confusion matrix and logs, per
validation run, the matrix and the most frequent mistakes with their examples and directions. Drawing,
PNG encoding and writing happen on a background thread. Tags and files are named in `peering.runs.names`.

This module holds the Lightning hooks only; each delegates in a few lines to the callback's parts:

- `peering.lightning.config`: the arguments, checked once (`CallbackConfig`);
- `peering.lightning.state`: the counters a checkpoint keeps, and the run's health;
- `peering.lightning.watch`: one run's shared machinery (unpack, run the model, choose, gather, draw);
- `peering.lightning.confused`: the confused-sample checks of training, validation and test;
- `peering.lightning.tracking`: the tracked samples; `peering.lightning.atlas_run`: the confusion atlas;
- `peering.lightning.selection`, `peering.lightning.pictures`, `peering.lightning.sinks`: choosing
  samples, drawing pictures, writing them.

Training is never changed: every submodule's own ``training`` flag, the parameters' ``.grad`` and
``requires_grad``, and the global RNG are left exactly as they were, so the trained weights are
bit-identical with and without the callback.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from typing_extensions import override

from peering.attribution.methods import AttributionMethod
from peering.lightning.atlas_run import AtlasRun
from peering.lightning.batches import default_unpack
from peering.lightning.config import CallbackConfig
from peering.lightning.confused import ConfusedChecks
from peering.lightning.pictures import PictureOutput
from peering.lightning.process_group import destroy_at_exit
from peering.lightning.selection import Candidates
from peering.lightning.sinks import run_folder
from peering.lightning.state import CallbackState, Health
from peering.lightning.tracking import Tracking
from peering.lightning.watch import Watch, explain_chosen
from peering.memory import MemoryBudget
from peering.render import Display
from peering.runs.names import STAGES

__all__ = ["ConfusedLogitCallback", "default_unpack"]


class ConfusedLogitCallback(Callback):
    """Log, while a classifier trains, the inputs its top two classes nearly tie on and the input gradients
    toward both.

    A drop-in for Lightning Bolts' ``ConfusedLogitCallback`` (same first five arguments, in the same
    order) that works with any logger or none, with any number of confused samples per batch, with 1- or
    3-channel images and flat inputs, under DDP, in ``fit``, ``validate`` and ``test``, and without changing
    training.

    Two defaults differ from Bolts', so that an ordinary model shows its confused samples:
    ``min_logit_value=None`` (Bolts: 5.0) and ``max_logit_difference=1.0`` (Bolts: 0.1). Measured on the
    demo CNN (`peering.models.DigitClassifier`) trained 5 epochs on 8,000 MNIST digits, checking every 20th
    batch of 32: Bolts' thresholds find 1 confused sample in 5 epochs (epochs 2-5: none), and drop about
    half of those within 1.0 because a confused sample's top logit is low; ``max_logit_difference=1.0``
    (top two within a factor e of each other) finds 39, 12, 6, 5 and 6 per epoch. When a whole epoch finds
    no confused sample the callback says once (info level) which threshold to loosen.

    Args:
        top_k: pictures per check: the ``top_k`` most confused samples (smallest margin first).
        projection_factor: f in the "input + f x gradient" tiles.
        min_logit_value: only samples whose top logit is at least this are considered (None: all, the
            default; Bolts: 5.0).
        logging_batch_interval: check every this many batches. Training checks batches
            ``interval - 1, 2 * interval - 1, ...`` (as Bolts); validation and test check
            ``0, interval, ...`` so that even a short validation set is looked at.
        max_logit_difference: a sample is confused when its top two are at most this far apart (default
            1.0; Bolts: 0.1).
        margin: measure that gap on "logit"s (as Bolts) or on softmax "probability".
        method: attribution method passed to `peering.explain` ("gradient", "input_x_gradient",
            "smoothgrad", "integrated_gradients", or an `AttributionMethod`). Default: "gradient", or
            "input_x_gradient" with ``layer=`` (summed over a token's embedding, that is the token's signed
            contribution to the class, see `peering.render.token_scores`).
        output: what is differentiated: "logit" (default, as Bolts: what makes it an a, what a b),
            "probability" or "log_probability"; "sigmoid" for a multi-label model (independent sigmoids,
            or a single-logit binary one). It also says which samples are confused: with "sigmoid", a
            sample is confused when one of its classes is near a toss-up: that class's yes and no are
            within ``max_logit_difference`` (``|logit|``, the log-odds; ``|2p - 1|`` with
            ``margin="probability"``); its two classes are the one nearest p = 0.5 and the next nearest.
            With "sigmoid" the confusion atlas is off (said once): it has no multi-label view.
        method_options: options of the method, e.g. ``{"n_samples": 8, "seed": 0}`` for SmoothGrad (which
            uses its own generator, never the global RNG).
        on: stages to look at: "train", "validation" (also a stand-alone ``trainer.validate()``) and/or
            "test" (``trainer.test()``), each with its own tags.
        max_pictures_per_epoch: at most this many pictures per stage and epoch (None: no cap).
        unpack: ``batch -> (inputs, labels or None)`` or ``(inputs, labels or None, forward_kwargs)`` for
            batches `default_unpack` does not understand. ``forward_kwargs`` (a dict) are passed to the
            model, ``model(inputs, **forward_kwargs)``, in the callback's own forward pass and to `explain`;
            tensors whose first dimension is the batch size (an attention mask) follow the chosen samples.
        track: N > 0 re-explains the N most confused samples of the first validation run at the end of
            every validation run, under ``peering/tracked/<i>`` (the step slider then shows how the
            explanation changes as the model learns). They are chosen by margin alone (no thresholds),
            and each picture shows the model's top two classes at that time. The first validation run then
            looks at every batch, not only every ``logging_batch_interval``-th.
        atlas: count every validation sample into a confusion matrix (torchmetrics, summed over DDP ranks)
            and log, at the end of each validation run, the matrix (``peering/confusion_matrix``) and the
            ``pairs`` most frequent mistakes (true a, predicted b), each with its ``examples_per_pair``
            examples closest to the a/b boundary and its direction: the mean input gradient of
            log p(b) - log p(a) over them (``peering/confused_pairs``). Needs labels in the validation
            batches. The logits come from ``validation_step`` when it returns a dict with ``"logits"``
            ([B, C]), else from one eval-mode forward per validation batch (shared with the checks). With
            forward arguments or ``layer=`` the atlas shows the matrix and the pairs without examples.
        pairs: how many of the most frequent mistakes the atlas shows.
        examples_per_pair: examples per mistake (0: directions are not computed).
        output_fn: picks the class scores out of a model output that is not a [B, C] tensor (e.g.
            ``lambda out: out.logits`` for Hugging Face models).
        layer: explain at this submodule's output (or the submodule of that name, e.g.
            ``"model.bert.embeddings.word_embeddings"``) instead of at the inputs, which may then be integer
            token ids (see `peering.explain`). A name is looked up in the LightningModule each time
            (``get_submodule``). For token ids [B, L] and a layer whose output is [B, L, ...] (the
            embeddings), each picture shows the sample's tokens coloured by their score toward each class
            (`peering.render.token_panels`: the attribution summed over the embedding, padding left out
            where the batch has an ``attention_mask``); the index records keep the tokens and scores, so
            `peering report` shows them as coloured HTML text. Other layers are drawn as a strip of each
            input position's summed attribution.
        tokenizer: turns token ids into the strings drawn: a Hugging Face tokenizer (its
            ``convert_ids_to_tokens``) or a function from a list of ids to a list of strings. Without one the
            tokens are drawn as their ids.
        zoom: integer magnification of the pictures.
        display: how the inputs are shown: None (they are images in [0, 1]), ``(mean, std)`` to undo the
            normalisation of a data pipeline (shown ``x * std + mean`` per channel), or any function from
            a batch of inputs to images in [0, 1]. Without it, inputs outside [0, 1] are clamped and the
            pictures say so.
        input_kind: "auto" (flat inputs [B, D] are tabular unless D = s * s with s >= 8, see
            `peering.render.input_kind`), "image" or "features" (bar charts of the top features).
        feature_names: the names of the D features of tabular inputs.
        background: draw, encode and write pictures on a background thread (False: on the training
            thread, e.g. for debugging).
        shared_kwargs: names of forward arguments the model takes whole for every sample (class
            prototypes, a table), passed unchanged instead of being split with the samples. Any other
            tensor needs one row per sample; one taken per sample from its first dimension alone is checked
            on the first batch (see `peering.explain`).
        memory_budget: the most memory explaining the chosen samples (and the atlas's directions) may use
            at its peak, as in `peering.explain`: bytes, a size string ("1GiB"), a share of free memory,
            or a `peering.memory.MemoryBudget`. Default: half the free CUDA memory (a quarter of the
            available RAM on CPU), measured when each explanation starts, so training's own memory is
            left alone.

    Needs nothing from the LightningModule but ``forward``: it computes the logits itself, in eval mode
    (restoring every submodule's own mode after), except for validation and test batches whose step
    returns ``{"logits": [B, C], ...}`` (Lightning runs those steps in eval mode: the checks and the atlas
    use them and spare a forward pass), and the gradients with ``torch.autograd.grad`` on a
    detached copy of the inputs, so no parameter ``.grad`` is touched. Validation and test batches, which
    a stand-alone ``validate()``/``test()`` runs under ``torch.inference_mode``, are copied out of it
    first. Nothing happens during the sanity check. Pictures are written by global rank zero only, which
    also writes the settings and counters to ``<run>/peering/callback.json`` at the end of every
    ``fit``/``validate``/``test`` (`peering.lightning.read_summary`; `peering.lightning.no_pictures_reason`
    says why a run has no pictures). ``state_dict()["pictures"]`` counts the pictures actually written.

    Example (a few steps on random data; pictures land as PNGs because there is no logger):

    >>> import tempfile, torch, lightning.pytorch as pl
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> from peering.models import DigitClassifier
    >>> from peering.lightning import ConfusedLogitCallback
    >>> data = DataLoader(TensorDataset(torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,))), batch_size=16)
    >>> callback = ConfusedLogitCallback(top_k=2, logging_batch_interval=2, max_logit_difference=10.0,
    ...                                  min_logit_value=None)
    >>> trainer = pl.Trainer(max_epochs=1, logger=False, callbacks=[callback],
    ...                      default_root_dir=tempfile.mkdtemp(), enable_progress_bar=False,
    ...                      enable_model_summary=False, enable_checkpointing=False)
    >>> trainer.fit(DigitClassifier(image_size=8), data)
    >>> callback.state_dict()["pictures"]["train"]
    4
    """

    def __init__(
        self,
        top_k: int = 4,
        projection_factor: float = 3.0,
        min_logit_value: float | None = None,
        logging_batch_interval: int = 20,
        max_logit_difference: float = 1.0,
        *,
        margin: Literal["logit", "probability"] = "logit",
        method: str | AttributionMethod | None = None,
        output: Literal["logit", "probability", "log_probability", "sigmoid"] = "logit",
        method_options: Mapping[str, Any] | None = None,
        on: str | Sequence[str] = STAGES,
        max_pictures_per_epoch: int | None = 64,
        unpack: Callable[[Any], tuple[Any, ...]] | None = None,
        track: int = 0,
        atlas: bool = True,
        pairs: int = 3,
        examples_per_pair: int = 4,
        output_fn: Callable[[Any], Tensor] | None = None,
        layer: nn.Module | str | None = None,
        tokenizer: Any = None,
        zoom: int = 4,
        display: Display = None,
        input_kind: Literal["auto", "image", "features"] = "auto",
        feature_names: Sequence[str] | None = None,
        background: bool = True,
        shared_kwargs: Sequence[str] | None = None,
        memory_budget: MemoryBudget | int | float | str | None = None,
    ) -> None:
        super().__init__()
        arguments = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.config = CallbackConfig(**arguments)
        self._state = CallbackState()
        self._watch = Watch(self.config, self._state, explain=self._explain)
        tracking = Tracking(self._watch)
        self._checks = ConfusedChecks(self._watch, tracking, AtlasRun(self._watch) if atlas else None)

    @property
    def _collectives(self) -> list[tuple[str, int]]:
        """(what, global step) of every collective call of this run (the DDP tests read them)."""
        return self._watch.collectives

    # ---------------------------------------------------------------------------------------- Lightning

    @property
    @override
    def state_key(self) -> str:
        c = self.config
        return self._generate_state_key(top_k=c.top_k, on=c.on, max_logit_difference=c.max_logit_difference,
                                        margin=c.margin)

    @override
    def state_dict(self) -> dict[str, Any]:
        """The counters and tracked samples. ``pictures`` and ``tracked_pictures`` count the pictures
        written (by global rank zero, so 0 on other ranks); everything else is identical on all ranks."""
        if self._watch.output is not None:
            self._watch.output.flush()  # so that the written pictures are counted
        return self._state.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._state.load_state_dict(state_dict)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        destroy_at_exit()  # a Gloo rank that exits with its process group alive may abort
        self._watch.health, self._watch.collectives = Health(), []
        run_dir = run_folder(trainer)  # every rank asks
        if trainer.is_global_zero:
            self._close_output()
            self._watch.output = PictureOutput(
                trainer.loggers, run_dir,
                drawing=self.config.drawing, tokenizer=self.config.tokenizer,
                background=self.config.background, written=self._written,
            )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close_output()
        if self._watch.output is not None:
            self._watch.output.write_summary(self._checks.summary())

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._close_output()

    # ----------------------------------------------------------------------------------------- training

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._state.stages["train"].new_epoch(trainer.current_epoch)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._watch.report_failures()
        if "train" not in self.config.on or trainer.sanity_checking:
            return
        if (batch_idx + 1) % self.config.logging_batch_interval == 0:
            self._state.stages["train"].new_epoch(trainer.current_epoch)
            self._checks.train_batch(trainer, pl_module, batch)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._checks.tell_if_none_confused("train", trainer.current_epoch)

    # ------------------------------------------------------------------------------- validation and test

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._checks.eval_start(trainer, "validation")

    @override
    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._eval_batch(trainer, pl_module, outputs, batch, batch_idx, "validation")

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_end(trainer, pl_module, "validation")

    @override
    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._checks.eval_start(trainer, "test")

    @override
    def on_test_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._eval_batch(trainer, pl_module, outputs, batch, batch_idx, "test")

    @override
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_end(trainer, pl_module, "test")

    def _eval_batch(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        stage: str,
    ) -> None:
        self._watch.report_failures()
        if not trainer.sanity_checking:
            self._checks.eval_batch(trainer, pl_module, outputs, batch, batch_idx, stage)

    def _eval_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._watch.report_failures()
        if trainer.sanity_checking:
            return
        with torch.inference_mode(False):  # a stand-alone validate()/test() runs its hooks in inference mode
            self._checks.eval_end(trainer, pl_module, stage)

    # ---------------------------------------------------------------------------------------- the parts

    def _explain(self, pl_module: pl.LightningModule, chosen: Candidates) -> tuple[Tensor, Tensor]:
        """Attributions [n, 2, ...] toward each chosen sample's two classes, and their probabilities [n, 2]
        (`peering.lightning.watch.explain_chosen`; a subclass may wrap it)."""
        return explain_chosen(pl_module, chosen, self.config)

    def _written(self, stage: str, n: int) -> None:
        """Called on the writer thread when ``n`` pictures of ``stage`` reached at least one sink."""
        if stage == "tracked":
            self._state.tracked_pictures += n
        elif stage in self._state.stages:
            self._state.stages[stage].pictures += n

    def _close_output(self) -> None:
        if self._watch.output is not None:
            self._watch.output.close()


def _setting(name: str) -> property:
    return property(lambda self: getattr(self.config, name), doc=f"The ``{name}`` setting (read-only).")


for _field in dataclasses.fields(CallbackConfig):
    setattr(ConfusedLogitCallback, _field.name, _setting(_field.name))
del _field
