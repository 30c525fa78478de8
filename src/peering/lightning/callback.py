"""`ConfusedLogitCallback`: while a classifier trains, show what its nearly tied top two classes look for.

Every ``logging_batch_interval`` batches the callback runs the model itself, in eval mode and without
gradients, on a detached copy of the batch; picks the samples whose two highest logits are within
``max_logit_difference`` (the ``top_k`` *most* confused, over all DDP ranks); explains them with
`peering.explain` (input gradients toward both classes, through ``torch.autograd.grad`` only); and draws
one panel per sample (`peering.render.confusion_panels`: images, or bar charts for tabular inputs, each
with its scale), logged to the loggers as ONE picture per check and tag (the panels stacked, most confused
first) and to the PNG folder as one file per sample, plus the fraction of confused samples. With
``atlas=True`` (the default) it also counts every validation batch into a confusion matrix and logs, per
validation run, the matrix and the most frequent mistakes with their examples and directions
(`peering.lightning.atlas`). Drawing, PNG encoding and writing happen on a background thread. Tags, the
PNG layout and the readers are described in `peering.lightning.sinks`.

This module holds the Lightning hooks and the argument checks; what chooses the samples lives in
`peering.lightning.selection`, what draws and writes the pictures in `peering.lightning.pictures`, the
confusion atlas's bookkeeping in `peering.lightning.atlas`.

Training is never changed: every submodule's own ``training`` flag, the parameters' ``.grad`` and
``requires_grad``, and the global RNG are left exactly as they were, so the trained weights are
bit-identical with and without the callback.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from peering._model import OUTPUTS, class_scores, eval_mode
from peering._validate import int_at_least
from peering.attribution.confusion import pair_directions, top_confused_pairs
from peering.attribution.explanation import explain
from peering.attribution.methods import AttributionMethod, make_method
from peering.errors import PeeringTypeError, PeeringValueError
from peering.lightning.atlas import ConfusionAtlas, PairExamples, pick_examples
from peering.lightning.pictures import AtlasJob, PictureOutput, is_token_ids
from peering.lightning.selection import (
    Candidates,
    Layout,
    Stats,
    Thresholds,
    choose,
    gather,
    layout_of,
    split_kwargs,
)
from peering.render import Display, token_scores

__all__ = ["ConfusedLogitCallback", "default_unpack"]

Stage = Literal["train", "validation", "test"]
_STAGES = ("train", "validation", "test")
_INPUT_KEYS = ("image", "images", "input", "inputs", "x")
_HF_INPUT_KEYS = ("input_ids", "pixel_values")
_LABEL_KEYS = ("label", "labels", "target", "targets", "y")

TAG = {"train": "peering/confused", "validation": "peering/val/confused", "test": "peering/test/confused"}
TAG_FRACTION = {stage: f"{tag}_fraction" for stage, tag in TAG.items()}
TAG_TRACKED = "peering/tracked"
TAG_MATRIX = "peering/confusion_matrix"
TAG_PAIRS = "peering/confused_pairs"


def default_unpack(batch: Any) -> tuple[Tensor, Tensor | None, dict[str, Any]]:
    """Inputs, labels and extra forward arguments of a batch.

    - a tensor: inputs only;
    - a tuple/list: its first two items;
    - a Hugging Face dict (``input_ids`` or ``pixel_values``): those as inputs, ``labels`` (or another
      label key below) as labels, and every other tensor (``attention_mask``, ``token_type_ids``, ...) as
      forward arguments, so the model is called as ``model(input_ids, **others)``;
    - another dict: inputs under ``image``/``images``/``input``/``inputs``/``x``, labels under
      ``label``/``labels``/``target``/``targets``/``y``.

    Raises:
        TypeError: the batch has none of these shapes; pass ``unpack=`` to the callback.

    >>> import torch
    >>> x, y = torch.rand(2, 1, 8, 8), torch.tensor([3, 5])
    >>> default_unpack((x, y))[1].tolist(), default_unpack({"image": x, "label": y})[1].tolist()
    ([3, 5], [3, 5])
    >>> default_unpack([x])[1] is None
    True
    >>> ids, mask = torch.tensor([[101, 7, 102, 0]]), torch.tensor([[1, 1, 1, 0]])
    >>> inputs, labels, kwargs = default_unpack({"input_ids": ids, "attention_mask": mask, "labels": y[:1]})
    >>> inputs is ids, labels.tolist(), list(kwargs)
    (True, [3], ['attention_mask'])
    """
    if isinstance(batch, Tensor):
        return batch, None, {}
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise PeeringTypeError("the batch is an empty sequence")
        return batch[0], batch[1] if len(batch) > 1 else None, {}
    if isinstance(batch, Mapping):
        label_key = next((k for k in _LABEL_KEYS if k in batch), None)
        labels = batch[label_key] if label_key is not None else None
        hf_key = next((k for k in _HF_INPUT_KEYS if k in batch), None)
        if hf_key is not None:
            others = {
                k: v for k, v in batch.items() if k not in (hf_key, label_key) and isinstance(v, Tensor)
            }
            return batch[hf_key], labels, others
        inputs = next((batch[k] for k in _INPUT_KEYS if k in batch), None)
        if inputs is None:
            raise PeeringTypeError(
                f"the batch dict has none of the input keys {_HF_INPUT_KEYS + _INPUT_KEYS} (keys: "
                f"{list(batch)[:10]})"
            )
        return inputs, labels, {}
    raise PeeringTypeError(f"cannot take inputs and labels from a batch of type {type(batch).__name__}")


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
            "probability" or "log_probability".
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
        output: Literal["logit", "probability", "log_probability"] = "logit",
        method_options: Mapping[str, Any] | None = None,
        on: str | Sequence[str] = ("train", "validation", "test"),
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
    ) -> None:
        super().__init__()
        int_at_least("top_k", top_k, 1)
        if not isinstance(projection_factor, (int, float)) or not math.isfinite(projection_factor):
            raise PeeringValueError(f"projection_factor must be a finite number, got {projection_factor!r}")
        if min_logit_value is not None and (
            not isinstance(min_logit_value, (int, float)) or math.isnan(min_logit_value)
        ):
            raise PeeringValueError(f"min_logit_value must be a number or None, got {min_logit_value!r}")
        if (
            isinstance(logging_batch_interval, bool)
            or not isinstance(logging_batch_interval, int)
            or (logging_batch_interval < 1)
        ):
            raise PeeringValueError(
                f"logging_batch_interval must be a positive int, got {logging_batch_interval!r}"
            )
        if not isinstance(max_logit_difference, (int, float)) or not max_logit_difference >= 0:
            raise PeeringValueError(
                f"max_logit_difference must be a number >= 0, got {max_logit_difference!r}"
            )
        if margin not in ("logit", "probability"):
            raise PeeringValueError(f"margin must be 'logit' or 'probability', got {margin!r}")
        if output not in OUTPUTS:
            raise PeeringValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        options = dict(method_options or {})
        if method is None:
            method = "gradient" if layer is None else "input_x_gradient"
        make_method(method, options)  # raises on an unknown method or a bad option, now rather than mid-run
        stages = (on,) if isinstance(on, str) else tuple(on)
        stages = tuple("validation" if s == "val" else s for s in stages)
        if not stages or any(s not in _STAGES for s in stages):
            raise PeeringValueError(f"on must name stages among {_STAGES}, got {on!r}")
        if max_pictures_per_epoch is not None and (
            isinstance(max_pictures_per_epoch, bool)
            or not isinstance(max_pictures_per_epoch, int)
            or max_pictures_per_epoch < 1
        ):
            raise PeeringValueError(
                f"max_pictures_per_epoch must be a positive int or None, got {max_pictures_per_epoch!r}"
            )
        if unpack is not None and not callable(unpack):
            raise PeeringTypeError(
                "unpack must be a callable batch -> (inputs, labels) or (inputs, labels, forward_kwargs), or "
                f"None, got {unpack!r}"
            )
        if layer is not None and not isinstance(layer, (nn.Module, str)):
            raise PeeringTypeError(
                f"layer must be a submodule of the model or its name (e.g. 'model.embed'), got {layer!r}"
            )
        int_at_least("track", track, 0)
        int_at_least("zoom", zoom, 1)
        if (
            display is not None
            and not callable(display)
            and not (isinstance(display, (tuple, list)) and len(display) == 2)
        ):
            raise PeeringTypeError(
                f"display must be None, (mean, std) or a function of the inputs, got {display!r}"
            )
        if tokenizer is not None and not (
            callable(getattr(tokenizer, "convert_ids_to_tokens", None)) or callable(tokenizer)
        ):
            raise PeeringTypeError(
                "tokenizer must have convert_ids_to_tokens (a Hugging Face tokenizer) or be a function from "
                f"a list of ids to a list of strings, got {type(tokenizer).__name__}"
            )
        if input_kind not in ("auto", "image", "features"):
            raise PeeringValueError(f"input_kind must be 'auto', 'image' or 'features', got {input_kind!r}")
        if feature_names is not None and (
            isinstance(feature_names, str) or not all(isinstance(n, str) for n in feature_names)
        ):
            raise PeeringTypeError("feature_names must be a sequence of strings (one per feature), or None")
        if not isinstance(atlas, bool):
            raise PeeringValueError(f"atlas must be True or False, got {atlas!r}")
        atlas_state = ConfusionAtlas(pairs, examples_per_pair)  # checks pairs and examples_per_pair

        self.top_k = top_k
        self.projection_factor = float(projection_factor)
        self.min_logit_value = None if min_logit_value is None else float(min_logit_value)
        self.logging_batch_interval = logging_batch_interval
        self.max_logit_difference = float(max_logit_difference)
        self.margin = margin
        self.method = method
        self.output = output
        self.method_options = options
        self.on = stages
        self.max_pictures_per_epoch = max_pictures_per_epoch
        self.unpack = unpack
        self.track = track
        self.atlas = atlas
        self.pairs = pairs
        self.examples_per_pair = examples_per_pair
        self.output_fn = output_fn
        self.layer = layer
        self.tokenizer = tokenizer
        self.zoom = zoom
        self.display = display
        self.input_kind = input_kind
        self.feature_names = None if feature_names is None else list(feature_names)
        self.background = background

        # counters (state_dict); identical on every rank, since they only depend on gathered results ...
        self._checks = {s: 0 for s in _STAGES}
        self._chosen = {s: 0 for s in _STAGES}  # samples chosen for pictures
        self._triggers = {s: 0 for s in _STAGES}  # checks (validation/test runs) that chose samples
        self._epoch_chosen = {s: 0 for s in _STAGES}  # for max_pictures_per_epoch
        self._count_epoch = {s: -1 for s in _STAGES}
        self._seen = {s: Stats() for s in _STAGES}
        self._tracked: Candidates | None = None
        self._tracking_chosen = False
        # ... except the pictures actually written, which only global rank zero counts (on its writer thread)
        self._pictures = {s: 0 for s in _STAGES}
        self._tracked_pictures = 0
        self._atlas_matrices = 0
        self._atlas_pair_pictures = 0
        # per-run (not state)
        self._atlas = atlas_state if atlas else None
        self._disabled: set[str] = set()
        self._problems: dict[str, str] = {}  # stage or "pictures" -> why it stopped, for the run summary
        self._told: set[str] = set()  # stages whose "no confused sample" was said
        self._epoch_seen = {s: Stats() for s in _STAGES}
        self._pool: Candidates | None = None  # validation/test: the most confused so far this run
        self._pool_stats = Stats()
        self._pool_layout: Layout | None = None
        self._track_pool: Candidates | None = None
        self._run_dir: str | None = None
        self._output: PictureOutput | None = None  # global rank zero only
        self._collectives: list[tuple[str, int]] = []  # (what, global step): the collectives called

    # ---------------------------------------------------------------------------------------- Lightning

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            top_k=self.top_k, on=self.on, max_logit_difference=self.max_logit_difference, margin=self.margin
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        """The counters and tracked samples. ``pictures`` and ``tracked_pictures`` count the pictures
        written (by global rank zero, so 0 on other ranks); everything else is identical on all ranks."""
        if self._output is not None:
            self._output.flush()  # so that the written pictures are counted
        tracked = None
        if self._tracked is not None:
            tracked = {
                k: getattr(self._tracked, k).detach().cpu()
                for k in ("inputs", "labels", "classes", "margins")
            }
            tracked["kwargs"] = {k: v.detach().cpu() for k, v in self._tracked.kwargs.items()}
            tracked["shared"] = dict(self._tracked.shared)
        return {
            "checks": dict(self._checks),
            "pictures": dict(self._pictures),
            "chosen": dict(self._chosen),
            "triggers": dict(self._triggers),
            "epoch_chosen": dict(self._epoch_chosen),
            "count_epoch": dict(self._count_epoch),
            "samples_checked": {s: self._seen[s].samples for s in _STAGES},
            "confused_seen": {s: self._seen[s].confused for s in _STAGES},
            "candidates_seen": {s: self._seen[s].candidates for s in _STAGES},
            "tracked": tracked,
            "tracking_chosen": self._tracking_chosen,
            "tracked_pictures": self._tracked_pictures,
            "atlas": {"matrices": self._atlas_matrices, "pair_pictures": self._atlas_pair_pictures},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        def get(key: str, stage: str, default: int = 0) -> int:
            return int(state_dict.get(key, {}).get(stage, default))

        for s in _STAGES:
            self._checks[s] = get("checks", s)
            self._pictures[s] = get("pictures", s)
            self._chosen[s] = get("chosen", s, get("pictures", s))
            self._triggers[s] = get("triggers", s)
            self._epoch_chosen[s] = get("epoch_chosen", s, get("epoch_pictures", s))
            self._count_epoch[s] = get("count_epoch", s, -1)
            self._seen[s] = Stats(
                get("samples_checked", s), get("confused_seen", s), get("candidates_seen", s)
            )
        tracked = state_dict.get("tracked")
        self._tracked = None if tracked is None else Candidates(**tracked)
        self._tracking_chosen = bool(state_dict.get("tracking_chosen", False))
        self._tracked_pictures = int(state_dict.get("tracked_pictures", 0))
        atlas = state_dict.get("atlas", {})
        self._atlas_matrices = int(atlas.get("matrices", 0))
        self._atlas_pair_pictures = int(atlas.get("pair_pictures", 0))

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._disabled, self._problems, self._told = set(), {}, set()
        self._collectives = []
        try:
            run_dir = trainer.log_dir  # a broadcast: every rank must ask
        except Exception:  # a logger without a usable directory
            run_dir = None
        self._run_dir = str(run_dir if run_dir is not None else trainer.default_root_dir)
        if not trainer.is_global_zero:
            return
        self._close_writer()
        self._output = PictureOutput(
            trainer.loggers,
            self._run_dir,
            drawing={
                "projection_factor": self.projection_factor,
                "zoom": self.zoom,
                "output": self.output,
                "display": self.display,
                "kind": self.input_kind,
                "feature_names": self.feature_names,
            },
            tokenizer=self.tokenizer,
            background=self.background,
            written=self._written,
        )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close_writer()
        if self._output is not None:
            self._output.write_summary(self._summary())

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._close_writer()

    # ----------------------------------------------------------------------------------------- training

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._new_epoch("train", trainer.current_epoch)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._report_failures()
        if "train" not in self.on or trainer.sanity_checking:
            return
        if (batch_idx + 1) % self.logging_batch_interval:
            return
        self._new_epoch("train", trainer.current_epoch)
        quota = self._quota("train")
        local, layout, stats = None, None, Stats()
        found = None if "train" in self._disabled else self._unpack_checked("train", batch)
        if found is not None:
            inputs, labels, kwargs = found
            layout = layout_of(inputs, split_kwargs(kwargs, inputs.shape[0])[0])
            logits = self._safe_scores("train", pl_module, inputs, kwargs)
            if logits is not None:
                local, stats = self._select(inputs, labels, logits, quota, self._thresholds(), kwargs)
        chosen, stats = self._gather(trainer, local, quota, "train", stats, layout)
        self._checks["train"] += 1
        self._seen["train"].add(stats)
        self._epoch_seen["train"].add(stats)
        self._count("train", len(chosen))
        if trainer.is_global_zero:
            step = trainer.global_step
            if stats.samples:
                self._log_scalar(trainer, TAG_FRACTION["train"], stats.fraction, step)
            if len(chosen):
                self._emit(pl_module, chosen, TAG["train"], step, "train", trainer.current_epoch)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._tell_if_none_confused("train", trainer.current_epoch)

    # ------------------------------------------------------------------------------- validation and test

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_epoch_start(trainer, "validation")

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._eval_batch_end(trainer, pl_module, outputs, batch, batch_idx, "validation")

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_epoch_end(trainer, pl_module, "validation")

    @override
    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_epoch_start(trainer, "test")

    @override
    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._eval_batch_end(trainer, pl_module, outputs, batch, batch_idx, "test")

    @override
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_epoch_end(trainer, pl_module, "test")

    def _eval_epoch_start(self, trainer: pl.Trainer, stage: str) -> None:
        self._pool, self._pool_stats, self._track_pool, self._pool_layout = None, Stats(), None, None
        if not trainer.sanity_checking:
            self._new_epoch(stage, self._count_epoch[stage] + 1)
        if stage == "validation" and self._atlas is not None:
            self._atlas.reset()

    def _eval_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        stage: str,
    ) -> None:
        """Validation and test batches: look at every ``logging_batch_interval``-th one, keep the most
        confused so far (they run under ``torch.inference_mode``: everything kept is copied out of it)."""
        self._report_failures()
        if trainer.sanity_checking:
            return
        check = stage in self.on and batch_idx % self.logging_batch_interval == 0
        choose_tracked = stage == "validation" and self._choosing_tracked(trainer)
        atlas = self._atlas if stage == "validation" else None
        if not (check or choose_tracked or atlas is not None) or stage in self._disabled:
            return
        found = self._unpack_checked(stage, batch)
        if found is None:
            return
        inputs, labels, kwargs = found
        # the logits the step returned (Lightning runs it in eval mode, as the callback would), else its own
        returned = _returned_logits(outputs, inputs.shape[0])
        logits = None
        if check or choose_tracked:
            layout = layout_of(inputs, split_kwargs(kwargs, inputs.shape[0])[0])
            if self._pool_layout is not None and layout != self._pool_layout:
                self._shape_changed(stage, layout)
                check = choose_tracked = False
            else:
                self._pool_layout = layout
                logits = returned
                if logits is None:
                    logits = self._safe_scores(stage, pl_module, inputs, kwargs)
                if logits is None:
                    if atlas is not None:
                        atlas.fail("the model could not be run on a validation batch")
                    return
        if atlas is not None:
            self._count_atlas(pl_module, outputs, inputs, labels, logits, kwargs)
        if logits is None:
            return
        if check:
            self._checks[stage] += 1
            quota = self._quota(stage)
            local, stats = self._select(inputs, labels, logits, quota, self._thresholds(), kwargs)
            self._pool_stats.add(stats)
            self._pool = local if self._pool is None else self._pool.merge(local, quota)
        if choose_tracked:
            by_margin = self._thresholds().by_margin_alone()
            local, _ = self._select(inputs, labels, logits, self.track, by_margin, kwargs)
            self._track_pool = (
                local if self._track_pool is None else self._track_pool.merge(local, self.track)
            )

    def _eval_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._report_failures()
        if trainer.sanity_checking:
            return
        with torch.inference_mode(False):  # a stand-alone validate()/test() runs its hooks in inference mode
            self._eval_epoch_end_unsafe(trainer, pl_module, stage)

    def _eval_epoch_end_unsafe(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        step, epoch = trainer.global_step, trainer.current_epoch
        if stage in self.on:
            quota = self._quota(stage)
            chosen, stats = self._gather(
                trainer, self._pool, quota, stage, self._pool_stats, self._pool_layout
            )
            self._seen[stage].add(stats)
            self._epoch_seen[stage] = stats
            self._count(stage, len(chosen))
            if trainer.is_global_zero:
                if stats.samples:
                    self._log_scalar(trainer, TAG_FRACTION[stage], stats.fraction, step)
                if len(chosen):
                    self._emit(pl_module, chosen, TAG[stage], step, stage, epoch)
            self._tell_if_none_confused(stage, self._count_epoch[stage])
        if stage == "validation" and self._choosing_tracked(trainer):
            chosen, _ = self._gather(
                trainer, self._track_pool, self.track, "tracked", Stats(), self._pool_layout
            )
            self._tracked = chosen.to("cpu") if len(chosen) else None
            self._tracking_chosen = True
        if stage == "validation" and self.track and self._tracked is not None and trainer.state.fn == "fit":
            if trainer.is_global_zero:
                self._emit_tracked(pl_module, step, epoch)
        self._pool, self._track_pool = None, None
        if stage == "validation" and self._atlas is not None:
            self._end_atlas(trainer, pl_module, step, epoch)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_output=None)
        return state

    # ------------------------------------------------------------------------------------------ helpers

    def _new_epoch(self, stage: str, epoch: int) -> None:
        if self._count_epoch[stage] != epoch:
            self._count_epoch[stage] = epoch
            self._epoch_chosen[stage] = 0
            self._epoch_seen[stage] = Stats()

    def _quota(self, stage: str) -> int:
        if self.max_pictures_per_epoch is None:
            return self.top_k
        return max(0, min(self.top_k, self.max_pictures_per_epoch - self._epoch_chosen[stage]))

    def _count(self, stage: str, n: int) -> None:
        self._chosen[stage] += n
        self._epoch_chosen[stage] += n
        self._triggers[stage] += n > 0

    def _choosing_tracked(self, trainer: pl.Trainer) -> bool:
        return bool(self.track) and not self._tracking_chosen and trainer.state.fn == "fit"

    def _shape_changed(self, stage: str, layout: Layout) -> None:
        """A validation/test batch shaped unlike the first (e.g. padded to another length): its samples
        cannot be pooled with the others' and are skipped (said once per run and stage)."""
        key = f"shape:{stage}"
        if key in self._told:
            return
        self._told.add(key)
        shapes = {name or "inputs": list(shape) for name, shape, _ in layout}
        first = {name or "inputs": list(shape) for name, shape, _ in self._pool_layout or ()}
        rank_zero_warn(
            f"peering: ConfusedLogitCallback skips {stage} batches shaped unlike the first ({shapes} vs "
            f"{first}): their samples cannot be compared in one pool. Pad every batch to one length "
            "(e.g. the tokenizer's padding='max_length') to have them all considered."
        )

    def _written(self, stage: str, n: int) -> None:
        """Called on the writer thread when ``n`` pictures of ``stage`` reached at least one sink."""
        if stage == "tracked":
            self._tracked_pictures += n
        elif stage in self._pictures:
            self._pictures[stage] += n

    def _tell_if_none_confused(self, stage: str, epoch: int) -> None:
        """Once per run and stage: an epoch whose checks found no confused sample says which threshold
        filtered them out (rank zero, info level)."""
        seen = self._epoch_seen[stage]
        if stage not in self.on or stage in self._told or seen.samples == 0 or seen.confused:
            return
        self._told.add(stage)
        rank_zero_info(
            f"peering: ConfusedLogitCallback found no confused sample in {stage} epoch {epoch}: "
            f"{self._thresholds().why_none_confused(seen)}. (Said once per run.)"
        )

    def _summary(self) -> dict[str, Any]:
        """The settings and counters written to ``<run>/peering/callback.json`` (see `read_summary`)."""
        stages = {}
        for s in _STAGES:
            stages[s] = {
                "watched": s in self.on,
                "checks": self._checks[s],
                **self._seen[s].to_dict(),
                "chosen": self._chosen[s],
                "pictures": self._pictures[s],
                "why_no_pictures": None if self._pictures[s] else self._why_no_pictures(s),
            }
        return {
            "settings": {
                "top_k": self.top_k,
                "projection_factor": self.projection_factor,
                "min_logit_value": self.min_logit_value,
                "logging_batch_interval": self.logging_batch_interval,
                "max_logit_difference": (
                    self.max_logit_difference if math.isfinite(self.max_logit_difference) else "inf"
                ),
                "margin": self.margin,
                "method": self.method if isinstance(self.method, str) else type(self.method).__name__,
                "output": self.output,
                "on": list(self.on),
                "max_pictures_per_epoch": self.max_pictures_per_epoch,
                "track": self.track,
            },
            "stages": stages,
            "tracked_pictures": self._tracked_pictures,
        }

    def _why_no_pictures(self, stage: str) -> str:
        if stage not in self.on:
            return f"not watched (on={list(self.on)})"
        if stage in self._problems:
            return self._problems[stage]
        if self._checks[stage] == 0:
            if stage == "train":
                n = self.logging_batch_interval
                return f"no batch was checked (training checks one batch in {n}: logging_batch_interval={n})"
            return "no batch was checked"
        seen = self._seen[stage]
        if seen.confused == 0:
            return self._thresholds().why_none_confused(seen)
        if "pictures" in self._problems:
            return self._problems["pictures"]
        return f"{self._chosen[stage]} samples were chosen but no picture could be written (see the warnings)"

    def _unpack_checked(self, stage: str, batch: Any) -> tuple[Tensor, Tensor | None, dict[str, Any]] | None:
        """(inputs, labels, forward_kwargs) of a batch, or None (with one warning) when they cannot be
        found."""
        try:
            unpacked = (self.unpack or default_unpack)(batch)
            if not isinstance(unpacked, (tuple, list)) or len(unpacked) not in (2, 3):
                raise PeeringTypeError(
                    "unpack must return (inputs, labels) or (inputs, labels, forward_kwargs), got "
                    f"{type(unpacked).__name__}"
                )
            inputs, labels = unpacked[0], unpacked[1]
            kwargs = unpacked[2] if len(unpacked) == 3 else None
            if kwargs is None:
                kwargs = {}
            if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
                raise PeeringTypeError(
                    f"forward_kwargs must be a dict of argument names, got {type(kwargs).__name__}"
                )
            self._check_inputs(inputs)
        except Exception as err:
            self._disabled.add(stage)
            self._problems[stage] = f"the callback could not take inputs from the batches ({err})"
            rank_zero_warn(
                f"peering: ConfusedLogitCallback cannot take inputs from the {stage} batches ({err}); it "
                "skips them. Pass unpack=lambda batch: (inputs, labels) (or (inputs, labels, "
                "forward_kwargs)) to the callback."
            )
            return None
        if isinstance(labels, Tensor) and labels.ndim == 2 and labels.shape[0] == inputs.shape[0]:
            labels = labels.argmax(dim=1)  # one-hot or soft labels
        if not (
            isinstance(labels, Tensor)
            and labels.ndim == 1
            and labels.shape[0] == inputs.shape[0]
            and not labels.is_floating_point()
            and not labels.is_complex()
        ):
            labels = None
        return inputs, labels, dict(kwargs)

    def _check_inputs(self, inputs: Any) -> None:
        if isinstance(inputs, Tensor) and self.layer is not None and inputs.ndim >= 1:
            if not inputs.is_complex():
                return  # explained at a layer: token ids are fine
        if not isinstance(inputs, Tensor) or not inputs.is_floating_point() or inputs.ndim < 2:
            what = (
                f"a {inputs.dtype} tensor of shape {list(inputs.shape)}"
                if isinstance(inputs, Tensor)
                else (type(inputs).__name__)
            )
            hint = ""
            if isinstance(inputs, Tensor) and not inputs.is_floating_point():
                hint = " (for token ids, pass layer=<the embedding module> to the callback)"
            raise PeeringTypeError(f"the inputs must be a floating-point tensor [B, ...], got {what}{hint}")

    def _scores(
        self, pl_module: pl.LightningModule, inputs: Tensor, kwargs: Mapping[str, Any] | None = None
    ) -> Tensor:
        """The class scores, from the model run in eval mode and eagerly (compiled code too, see
        `peering._guard.eager`), without gradients."""
        rng_devices = (inputs.device,) if inputs.device.type == "cuda" else ()
        with eval_mode(pl_module, rng_devices), torch.no_grad():
            x = _as_model_dtype(pl_module, inputs.detach())
            return class_scores(pl_module, x, self.output_fn, kwargs).detach()

    def _safe_scores(
        self, stage: str, pl_module: pl.LightningModule, inputs: Tensor, kwargs: Mapping[str, Any]
    ) -> Tensor | None:
        """The logits, or None (with one warning, and the stage skipped from then on) if the model fails.

        A failure here must not stop training; under DDP the rank still takes part in the collectives.
        """
        try:
            return self._scores(pl_module, inputs, kwargs)
        except Exception as err:
            self._disabled.add(stage)
            self._problems[stage] = f"the callback could not run the model ({type(err).__name__}: {err})"
            rank_zero_warn(
                f"peering: ConfusedLogitCallback could not run the model on the {stage} batches "
                f"({type(err).__name__}: {err}); it skips them for this run. Training goes on."
            )
            return None

    def _thresholds(self) -> Thresholds:
        return Thresholds(self.max_logit_difference, self.margin, self.min_logit_value)

    def _select(
        self,
        inputs: Tensor,
        labels: Tensor | None,
        logits: Tensor,
        capacity: int,
        thresholds: Thresholds,
        kwargs: Mapping[str, Any],
    ) -> tuple[Candidates, Stats]:
        chosen, stats, skipped = choose(inputs, labels, logits, capacity, thresholds, kwargs)
        if skipped and "nonfinite" not in self._disabled:
            self._disabled.add("nonfinite")  # warn once per run
            rank_zero_warn(
                f"peering: ConfusedLogitCallback skips samples whose inputs or logits contain NaN or "
                f"Inf ({skipped} in this batch; later ones are skipped silently)"
            )
        return chosen, stats

    def _gather(
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
            self._collectives.append((what, trainer.global_step))
        return gather(trainer, local, capacity, stats, layout)

    # ------------------------------------------------------------------------------------ confusion atlas

    def _count_atlas(
        self,
        pl_module: pl.LightningModule,
        outputs: Any,
        inputs: Tensor,
        labels: Tensor | None,
        logits: Tensor | None,
        kwargs: Mapping[str, Any],
    ) -> None:
        """Count one validation batch into the atlas (every rank; no collective call)."""
        atlas = self._atlas
        assert atlas is not None
        if labels is None:
            atlas.ignore(inputs.shape[0])
            return
        if (kwargs or self.layer is not None) and atlas.examples_per_pair:
            # the pairs' examples and directions do not carry forward arguments (a mask) nor take a layer:
            # a direction computed without its sample's mask would be wrong, so the atlas keeps none
            atlas.examples_per_pair = 0
            rank_zero_info(
                "peering: ConfusedLogitCallback's confusion atlas shows the matrix and the most frequent "
                "mistakes without examples or directions: those do not support forward arguments (e.g. an "
                "attention mask) or layer= yet."
            )
        scores = _returned_logits(outputs, inputs.shape[0])
        if scores is None:
            scores = logits if logits is not None else self._safe_scores("atlas", pl_module, inputs, kwargs)
        if scores is None:
            atlas.fail("the model could not be run on a validation batch")
            return
        try:
            atlas.update(inputs, labels, scores)
        except ValueError:
            pass  # the atlas keeps the reason; said once at the end of the run (`_end_atlas`)

    def _end_atlas(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, epoch: int) -> None:
        """Sync the matrix, choose the pairs, gather their examples; on rank zero explain and draw them.

        Every rank makes the same collective calls here: the matrix's (always), then one `gather` of the
        examples; what follows depends only on the synced matrix, identical on all ranks.
        """
        atlas = self._atlas
        assert atlas is not None
        if trainer.world_size > 1:
            self._collectives.append(("atlas", step))
        result = atlas.compute(trainer.strategy)
        if result.matrix is None:
            if "atlas" not in self._disabled and "validation" not in self._disabled:
                self._disabled.add("atlas")  # said once per run
                rank_zero_warn(
                    f"peering: ConfusedLogitCallback's confusion atlas has no matrix for this validation run "
                    f"({result.reason}). It needs integer class labels in the validation batches: pass "
                    "unpack=lambda batch: (inputs, labels) to the callback, or atlas=False to turn it off."
                )
            return
        matrix = result.matrix.cpu()
        repeated = _repeated_samples(trainer)
        if repeated and "atlas repeats" not in self._disabled:
            self._disabled.add("atlas repeats")  # said once per run
            rank_zero_warn(
                f"peering: the confusion matrix counts {repeated} validation sample(s) twice: Lightning's "
                "DistributedSampler repeats them so that every rank gets as many batches. When the counts "
                "must be exact, give the validation DataLoader a sampler that does not repeat (e.g. "
                "Lightning's UnrepeatedDistributedSampler) and pass use_distributed_sampler=False."
            )
        pairs = top_confused_pairs(matrix, atlas.pairs)
        per_pair = atlas.examples_per_pair
        local = atlas.examples_for(pairs)
        # room for every rank's examples: the merge keeps the smallest gaps over all pairs together, so it
        # must not cut; `pick_examples` then keeps the best `per_pair` of each pair
        capacity = len(pairs) * per_pair * max(1, trainer.world_size)
        shape = atlas.sample_shape
        layout: Layout | None = None if shape is None else (("", shape[0], shape[1]),)
        classes = torch.stack([local.predicted, local.true], dim=1)  # carried as (b, a)
        candidates = Candidates(local.inputs, local.true, classes, local.gaps) if len(local) else None
        gathered, _ = self._gather(trainer, candidates, capacity, "atlas", Stats(), layout)
        examples, index = pick_examples(
            PairExamples(gathered.inputs, gathered.labels, gathered.classes[:, 0], gathered.margins),
            pairs,
            per_pair,
        )
        self._atlas_matrices += 1
        self._atlas_pair_pictures += len(pairs) if per_pair else 0
        if not trainer.is_global_zero or self._output is None:
            return
        directions, probabilities = None, torch.zeros(0)
        if len(pairs) and per_pair and "atlas pictures" not in self._disabled:
            try:
                device = pl_module.device
                inputs = _as_model_dtype(pl_module, examples.inputs.to(device))
                directions = pair_directions(
                    pl_module, inputs, pairs.to(device), index.to(device), output_fn=self.output_fn
                )
                if len(examples):
                    probs = self._scores(pl_module, inputs).float().softmax(dim=1)
                    probabilities = probs.gather(1, examples.predicted.to(device)[:, None])[:, 0]
            except Exception as err:
                directions = None
                self._disabled.add("atlas pictures")
                rank_zero_warn(
                    f"peering: ConfusedLogitCallback could not explain the confused pairs "
                    f"({type(err).__name__}: {err}); the confusion matrix is still logged. Training goes on."
                )
        self._output.atlas(
            AtlasJob(
                self._output,
                matrix_tag=TAG_MATRIX,
                pairs_tag=TAG_PAIRS,
                matrix=matrix,
                ignored=result.ignored,
                repeated=repeated,
                pairs=pairs,
                examples=PairExamples(
                    examples.inputs.detach().cpu(),
                    examples.true.cpu(),
                    examples.predicted.cpu(),
                    examples.gaps.cpu(),
                ),
                pair_index=index.cpu(),
                probabilities=probabilities.detach().cpu(),
                directions=None if directions is None else directions.detach().float().cpu(),
                step=step,
                epoch=epoch,
            )
        )

    # ------------------------------------------------------------------------------------ output (rank 0)

    def _layer(self, pl_module: pl.LightningModule) -> nn.Module | None:
        if isinstance(self.layer, str):
            return pl_module.get_submodule(self.layer)
        return self.layer

    def _explain(self, pl_module: pl.LightningModule, chosen: Candidates) -> tuple[Tensor, Tensor]:
        """Attributions [n, 2, ...] toward each sample's two classes, and their probabilities [n, 2]."""
        exp = explain(
            pl_module,
            _as_model_dtype(pl_module, chosen.inputs),
            chosen.classes,
            method=self.method,
            output=self.output,
            output_fn=self.output_fn,
            nonfinite="skip",
            forward_kwargs=chosen.forward_kwargs(),
            layer=self._layer(pl_module),
            **self.method_options,
        )
        probs = exp.probabilities.gather(1, chosen.classes.to(exp.probabilities.device))
        return exp.attributions, probs

    def _emit(
        self, pl_module: pl.LightningModule, chosen: Candidates, tag: str, step: int, stage: str, epoch: int
    ) -> None:
        if "pictures" in self._disabled:
            return
        try:
            attributions, probs = self._explain(pl_module, chosen)
        except Exception as err:
            self._explain_failed(err)
            return
        if self._output is not None:
            shown, attributions = _drawable(chosen.to("cpu"), attributions.detach().cpu())
            self._output.pictures([tag], shown, attributions, probs.detach().cpu(), step, stage, epoch)

    def _explain_failed(self, err: Exception) -> None:
        self._disabled.add("pictures")
        self._problems["pictures"] = f"the samples could not be explained ({type(err).__name__}: {err})"
        rank_zero_warn(
            f"peering: ConfusedLogitCallback could not explain the confused samples ({type(err).__name__}: "
            f"{err}); it draws no more pictures in this run. Training goes on."
        )

    def _emit_tracked(self, pl_module: pl.LightningModule, step: int, epoch: int) -> None:
        if "pictures" in self._disabled:
            return
        try:
            self._emit_tracked_unsafe(pl_module, step, epoch)
        except Exception as err:
            self._explain_failed(err)

    def _emit_tracked_unsafe(self, pl_module: pl.LightningModule, step: int, epoch: int) -> None:
        tracked = self._tracked
        assert tracked is not None
        device = pl_module.device
        tracked = tracked.to(device)
        logits = self._scores(pl_module, tracked.inputs, tracked.forward_kwargs()).float()
        classes = logits.topk(2, dim=1).indices
        margins = logits.gather(1, classes)[:, 0] - logits.gather(1, classes)[:, 1]
        now = Candidates(tracked.inputs, tracked.labels, classes, margins, tracked.kwargs, tracked.shared)
        attributions, probs = self._explain(pl_module, now)
        tags = [f"{TAG_TRACKED}/{i}" for i in range(len(now))]
        if self._output is not None:
            shown, attributions = _drawable(now.to("cpu"), attributions.detach().cpu())
            self._output.pictures(tags, shown, attributions, probs.detach().cpu(), step, "tracked", epoch)

    def _log_scalar(self, trainer: pl.Trainer, tag: str, value: float, step: int) -> None:
        if self._output is not None:
            self._output.scalar(trainer.loggers, tag, value, step)

    def _report_failures(self) -> None:
        if self._output is not None:
            self._output.report_failures()

    def _close_writer(self) -> None:
        if self._output is not None:
            self._output.close()


def _repeated_samples(trainer: pl.Trainer) -> int:
    """How many validation samples a `DistributedSampler` repeats to even out the ranks (0 when none, or
    when ``limit_val_batches`` leaves the end of the set out anyway)."""
    from torch.utils.data import DistributedSampler

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


def _returned_logits(outputs: Any, batch_size: int) -> Tensor | None:
    """The logits a ``validation_step`` returned as ``{"logits": [B, C]}``, or None."""
    if not isinstance(outputs, Mapping):
        return None
    logits = outputs.get("logits")
    if (
        isinstance(logits, Tensor)
        and logits.ndim == 2
        and logits.shape[0] == batch_size
        and logits.shape[1] >= 2
        and logits.is_floating_point()
    ):
        return logits.detach()
    return None


def _as_model_dtype(pl_module: pl.LightningModule, inputs: Tensor) -> Tensor:
    """Float inputs in the module's floating dtype (e.g. under ``precision="bf16-true"``)."""
    dtype = getattr(pl_module, "dtype", None)
    if (
        isinstance(dtype, torch.dtype)
        and dtype.is_floating_point
        and inputs.is_floating_point()
        and (inputs.dtype != dtype)
    ):
        return inputs.to(dtype)
    return inputs


_STRIP = 4


def _drawable(chosen: Candidates, attributions: Tensor) -> tuple[Candidates, Tensor]:
    """What the pictures can show. Attributions at the inputs are drawn as they are. Token ids [n, L]
    explained at a layer whose output is [n, L, ...] (the embeddings): one score per token [n, 2, L] (the
    attribution summed over the embedding, `peering.render.token_scores`), drawn as coloured tokens. Other
    attributions at a layer ([n, 2, *layer_output]) are summed over the layer's dimensions beyond the
    input's, on blank inputs (ids are no intensities); the input tiles are then empty."""
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
