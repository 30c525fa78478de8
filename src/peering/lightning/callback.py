"""`ConfusedLogitCallback`: while a classifier trains, show what its nearly tied top two classes look for.

Every ``logging_batch_interval`` batches the callback runs the model itself, in eval mode and without
gradients, on a detached copy of the batch; picks the samples whose two highest logits are within
``max_logit_difference`` (the ``top_k`` *most* confused, over all DDP ranks); explains them with
`peering.explain` (input gradients toward both classes, through ``torch.autograd.grad`` only); and draws
one panel per sample (`peering.render.confusion_panels`: images, or bar charts for tabular inputs, each
with its scale), logged to the loggers as ONE picture per check and tag (the panels stacked, most confused
first) and to the PNG folder as one file per sample, plus the fraction of confused samples. Drawing,
PNG encoding and writing happen on a background thread. Tags, the PNG layout and the readers are
described in `peering.lightning.sinks`.

This module holds the Lightning hooks and the argument checks; what chooses the samples lives in
`peering.lightning.selection`, what draws and writes the pictures in `peering.lightning.pictures`.

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
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from peering._guard import OUTPUTS, class_scores, eval_mode
from peering.explain import explain
from peering.lightning.pictures import PictureOutput
from peering.lightning.selection import Candidates, Shape, Stats, Thresholds, choose, gather
from peering.methods import AttributionMethod, make_method
from peering.render import Display

__all__ = ["ConfusedLogitCallback", "default_unpack"]

Stage = Literal["train", "validation"]
_STAGES = ("train", "validation")
_INPUT_KEYS = ("image", "images", "input", "inputs", "x")
_LABEL_KEYS = ("label", "labels", "target", "targets", "y")

TAG_TRAIN = "peering/confused"
TAG_TRAIN_FRACTION = "peering/confused_fraction"
TAG_VAL = "peering/val/confused"
TAG_VAL_FRACTION = "peering/val/confused_fraction"
TAG_TRACKED = "peering/tracked"


def default_unpack(batch: Any) -> tuple[Tensor, Tensor | None]:
    """Inputs and labels of a batch: a tensor (inputs only), a tuple/list (its first two items), or a dict
    (inputs under ``image``/``images``/``input``/``inputs``/``x``, labels under
    ``label``/``labels``/``target``/``targets``/``y``).

    Raises:
        TypeError: the batch has none of these shapes; pass ``unpack=`` to the callback.

    >>> import torch
    >>> x, y = torch.rand(2, 1, 8, 8), torch.tensor([3, 5])
    >>> default_unpack((x, y))[1].tolist(), default_unpack({"image": x, "label": y})[1].tolist()
    ([3, 5], [3, 5])
    >>> default_unpack([x])[1] is None
    True
    """
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise TypeError("the batch is an empty sequence")
        return batch[0], batch[1] if len(batch) > 1 else None
    if isinstance(batch, Mapping):
        inputs = next((batch[k] for k in _INPUT_KEYS if k in batch), None)
        if inputs is None:
            raise TypeError(
                f"the batch dict has none of the input keys {_INPUT_KEYS} (keys: {list(batch)[:10]})"
            )
        return inputs, next((batch[k] for k in _LABEL_KEYS if k in batch), None)
    raise TypeError(f"cannot take inputs and labels from a batch of type {type(batch).__name__}")


class ConfusedLogitCallback(Callback):
    """Log, while a classifier trains, the inputs its top two classes nearly tie on and the input gradients
    toward both.

    A drop-in for Lightning Bolts' ``ConfusedLogitCallback`` (same first five arguments, all with
    defaults) that works with any logger or none, with any number of confused samples per batch, with
    1- or 3-channel images and flat inputs, under DDP, and without changing training.

    Args:
        top_k: pictures per check: the ``top_k`` most confused samples (smallest margin first).
        projection_factor: f in the "input + f x gradient" tiles.
        min_logit_value: only samples whose top logit is at least this are considered (None: all).
        logging_batch_interval: check every this many batches. Training checks batches
            ``interval - 1, 2 * interval - 1, ...`` (as Bolts); validation checks ``0, interval, ...`` so
            that even a short validation set is looked at.
        max_logit_difference: a sample is confused when its top two are at most this far apart.
        margin: measure that gap on "logit"s (as Bolts) or on softmax "probability".
        method: attribution method passed to `peering.explain` ("gradient", "input_x_gradient",
            "smoothgrad", "integrated_gradients", or an `AttributionMethod`).
        output: what is differentiated: "logit" (default, as Bolts: what makes it an a, what a b),
            "probability" or "log_probability".
        method_options: options of the method, e.g. ``{"n_samples": 8, "seed": 0}`` for SmoothGrad (which
            uses its own generator, never the global RNG).
        on: stages to look at: "train" and/or "validation".
        max_pictures_per_epoch: at most this many pictures per stage and epoch (None: no cap).
        unpack: ``batch -> (inputs, labels or None)`` for batches `default_unpack` does not understand.
        track: N > 0 re-explains the N most confused samples of the first validation run at the end of
            every validation run, under ``peering/tracked/<i>`` (the step slider then shows how the
            explanation changes as the model learns). They are chosen by margin alone (no thresholds),
            and each picture shows the model's top two classes at that time. The first validation run then
            looks at every batch, not only every ``logging_batch_interval``-th.
        output_fn: picks the class scores out of a model output that is not a [B, C] tensor.
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
    (restoring every submodule's own mode after), and the gradients with ``torch.autograd.grad`` on a
    detached copy of the inputs, so no parameter ``.grad`` is touched. Validation batches, which run under
    ``torch.inference_mode``, are copied out of it first. Nothing happens during the sanity check.
    Pictures are written by global rank zero only.

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
        min_logit_value: float | None = 5.0,
        logging_batch_interval: int = 20,
        max_logit_difference: float = 0.1,
        *,
        margin: Literal["logit", "probability"] = "logit",
        method: str | AttributionMethod = "gradient",
        output: Literal["logit", "probability", "log_probability"] = "logit",
        method_options: Mapping[str, Any] | None = None,
        on: str | Sequence[str] = ("train", "validation"),
        max_pictures_per_epoch: int | None = 64,
        unpack: Callable[[Any], tuple[Tensor, Tensor | None]] | None = None,
        track: int = 0,
        output_fn: Callable[[Any], Tensor] | None = None,
        zoom: int = 4,
        display: Display = None,
        input_kind: Literal["auto", "image", "features"] = "auto",
        feature_names: Sequence[str] | None = None,
        background: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive int, got {top_k!r}")
        if not isinstance(projection_factor, (int, float)) or not math.isfinite(projection_factor):
            raise ValueError(f"projection_factor must be a finite number, got {projection_factor!r}")
        if min_logit_value is not None and (
            not isinstance(min_logit_value, (int, float)) or math.isnan(min_logit_value)
        ):
            raise ValueError(f"min_logit_value must be a number or None, got {min_logit_value!r}")
        if (
            isinstance(logging_batch_interval, bool)
            or not isinstance(logging_batch_interval, int)
            or (logging_batch_interval < 1)
        ):
            raise ValueError(f"logging_batch_interval must be a positive int, got {logging_batch_interval!r}")
        if not isinstance(max_logit_difference, (int, float)) or not max_logit_difference >= 0:
            raise ValueError(f"max_logit_difference must be a number >= 0, got {max_logit_difference!r}")
        if margin not in ("logit", "probability"):
            raise ValueError(f"margin must be 'logit' or 'probability', got {margin!r}")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        options = dict(method_options or {})
        make_method(method, options)  # raises on an unknown method or a bad option, now rather than mid-run
        stages = (on,) if isinstance(on, str) else tuple(on)
        stages = tuple("validation" if s == "val" else s for s in stages)
        if not stages or any(s not in _STAGES for s in stages):
            raise ValueError(f"on must name stages among {_STAGES}, got {on!r}")
        if max_pictures_per_epoch is not None and (
            isinstance(max_pictures_per_epoch, bool)
            or not isinstance(max_pictures_per_epoch, int)
            or max_pictures_per_epoch < 1
        ):
            raise ValueError(
                f"max_pictures_per_epoch must be a positive int or None, got {max_pictures_per_epoch!r}"
            )
        if unpack is not None and not callable(unpack):
            raise TypeError(f"unpack must be a callable batch -> (inputs, labels) or None, got {unpack!r}")
        if isinstance(track, bool) or not isinstance(track, int) or track < 0:
            raise ValueError(f"track must be an int >= 0, got {track!r}")
        if isinstance(zoom, bool) or not isinstance(zoom, int) or zoom < 1:
            raise ValueError(f"zoom must be a positive int, got {zoom!r}")
        if (
            display is not None
            and not callable(display)
            and not (isinstance(display, (tuple, list)) and len(display) == 2)
        ):
            raise TypeError(f"display must be None, (mean, std) or a function of the inputs, got {display!r}")
        if input_kind not in ("auto", "image", "features"):
            raise ValueError(f"input_kind must be 'auto', 'image' or 'features', got {input_kind!r}")
        if feature_names is not None and (
            isinstance(feature_names, str) or not all(isinstance(n, str) for n in feature_names)
        ):
            raise TypeError("feature_names must be a sequence of strings (one per feature), or None")

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
        self.output_fn = output_fn
        self.zoom = zoom
        self.display = display
        self.input_kind = input_kind
        self.feature_names = None if feature_names is None else list(feature_names)
        self.background = background

        # counters (state_dict); identical on every rank, since they only depend on gathered results
        self._checks = {s: 0 for s in _STAGES}
        self._pictures = {s: 0 for s in _STAGES}
        self._triggers = {s: 0 for s in _STAGES}  # checks (validation runs) that produced pictures
        self._epoch_pictures = {s: 0 for s in _STAGES}
        self._count_epoch = {s: -1 for s in _STAGES}
        self._seen = {s: Stats() for s in _STAGES}
        self._tracked: Candidates | None = None
        self._tracking_chosen = False
        self._tracked_pictures = 0
        # per-run (not state)
        self._disabled: set[str] = set()
        self._val_pool: Candidates | None = None
        self._val_stats = Stats()
        self._val_shape: Shape | None = None
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
        tracked = None
        if self._tracked is not None:
            tracked = {
                k: getattr(self._tracked, k).detach().cpu()
                for k in ("inputs", "labels", "classes", "margins")
            }
        return {
            "checks": dict(self._checks),
            "pictures": dict(self._pictures),
            "triggers": dict(self._triggers),
            "epoch_pictures": dict(self._epoch_pictures),
            "count_epoch": dict(self._count_epoch),
            "samples_checked": {s: self._seen[s].samples for s in _STAGES},
            "confused_seen": {s: self._seen[s].confused for s in _STAGES},
            "tracked": tracked,
            "tracking_chosen": self._tracking_chosen,
            "tracked_pictures": self._tracked_pictures,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for s in _STAGES:
            self._checks[s] = int(state_dict.get("checks", {}).get(s, 0))
            self._pictures[s] = int(state_dict.get("pictures", {}).get(s, 0))
            self._triggers[s] = int(state_dict.get("triggers", {}).get(s, 0))
            self._epoch_pictures[s] = int(state_dict.get("epoch_pictures", {}).get(s, 0))
            self._count_epoch[s] = int(state_dict.get("count_epoch", {}).get(s, -1))
            self._seen[s] = Stats(
                int(state_dict.get("samples_checked", {}).get(s, 0)),
                int(state_dict.get("confused_seen", {}).get(s, 0)),
            )
        tracked = state_dict.get("tracked")
        self._tracked = None if tracked is None else Candidates(**tracked)
        self._tracking_chosen = bool(state_dict.get("tracking_chosen", False))
        self._tracked_pictures = int(state_dict.get("tracked_pictures", 0))

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._disabled = set()
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
            background=self.background,
        )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close_writer()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._close_writer()

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
        local, shape, stats = None, None, (0, 0)
        found = None if "train" in self._disabled else self._unpack_checked("train", batch)
        if found is not None:
            inputs, labels = found
            shape = (inputs.shape[1:], inputs.dtype)
            logits = self._safe_scores("train", pl_module, inputs)
            if logits is not None:
                local, stats = self._select(inputs, labels, logits, quota, self._thresholds())
        chosen, (samples, confused) = self._gather(trainer, local, quota, "train", stats, shape)
        self._checks["train"] += 1
        self._seen["train"].add(samples, confused)
        self._count("train", len(chosen))
        if trainer.is_global_zero:
            step = trainer.global_step
            if samples:
                self._log_scalar(trainer, TAG_TRAIN_FRACTION, confused / samples, step)
            if len(chosen):
                self._emit(pl_module, chosen, TAG_TRAIN, step, "train", trainer.current_epoch)

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val_pool, self._val_stats, self._track_pool, self._val_shape = None, Stats(), None, None
        if not trainer.sanity_checking:
            self._new_epoch("validation", self._count_epoch["validation"] + 1)

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
        self._report_failures()
        if trainer.sanity_checking:
            return
        check = "validation" in self.on and batch_idx % self.logging_batch_interval == 0
        choose_tracked = self._choosing_tracked(trainer)
        if not (check or choose_tracked) or "validation" in self._disabled:
            return
        found = self._unpack_checked("validation", batch)
        if found is None:
            return
        inputs, labels = found
        self._val_shape = (inputs.shape[1:], inputs.dtype)
        logits = self._safe_scores("validation", pl_module, inputs)
        if logits is None:
            return
        if check:
            self._checks["validation"] += 1
            quota = self._quota("validation")
            local, stats = self._select(inputs, labels, logits, quota, self._thresholds())
            self._val_stats.add(*stats)
            self._val_pool = local if self._val_pool is None else self._val_pool.merge(local, quota)
        if choose_tracked:
            local, _ = self._select(inputs, labels, logits, self.track, self._thresholds().by_margin_alone())
            self._track_pool = (
                local if self._track_pool is None else self._track_pool.merge(local, self.track)
            )

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report_failures()
        if trainer.sanity_checking:
            return
        step, epoch = trainer.global_step, trainer.current_epoch
        if "validation" in self.on:
            quota = self._quota("validation")
            stats = (self._val_stats.samples, self._val_stats.confused)
            chosen, (samples, confused) = self._gather(
                trainer, self._val_pool, quota, "validation", stats, self._val_shape
            )
            self._seen["validation"].add(samples, confused)
            self._count("validation", len(chosen))
            if trainer.is_global_zero:
                if samples:
                    self._log_scalar(trainer, TAG_VAL_FRACTION, confused / samples, step)
                if len(chosen):
                    self._emit(pl_module, chosen, TAG_VAL, step, "validation", epoch)
        if self._choosing_tracked(trainer):
            chosen, _ = self._gather(
                trainer, self._track_pool, self.track, "tracked", (0, 0), self._val_shape
            )
            self._tracked = chosen.to("cpu") if len(chosen) else None
            self._tracking_chosen = True
        if self.track and self._tracked is not None and trainer.state.fn == "fit":
            self._tracked_pictures += len(self._tracked)
            if trainer.is_global_zero:
                self._emit_tracked(pl_module, step, epoch)
        self._val_pool, self._track_pool = None, None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_output=None)
        return state

    # ------------------------------------------------------------------------------------------ helpers

    def _new_epoch(self, stage: str, epoch: int) -> None:
        if self._count_epoch[stage] != epoch:
            self._count_epoch[stage] = epoch
            self._epoch_pictures[stage] = 0

    def _quota(self, stage: str) -> int:
        if self.max_pictures_per_epoch is None:
            return self.top_k
        return max(0, min(self.top_k, self.max_pictures_per_epoch - self._epoch_pictures[stage]))

    def _count(self, stage: str, n: int) -> None:
        self._pictures[stage] += n
        self._epoch_pictures[stage] += n
        self._triggers[stage] += n > 0

    def _choosing_tracked(self, trainer: pl.Trainer) -> bool:
        return bool(self.track) and not self._tracking_chosen and trainer.state.fn == "fit"

    def _unpack_checked(self, stage: str, batch: Any) -> tuple[Tensor, Tensor | None] | None:
        """(inputs, labels) of a batch, or None (with one warning) when they cannot be found."""
        try:
            inputs, labels = (self.unpack or default_unpack)(batch)
            if not isinstance(inputs, Tensor) or not inputs.is_floating_point() or inputs.ndim < 2:
                what = (
                    f"a {inputs.dtype} tensor of shape {list(inputs.shape)}"
                    if isinstance(inputs, Tensor)
                    else (type(inputs).__name__)
                )
                raise TypeError(f"the inputs must be a floating-point tensor [B, ...], got {what}")
        except Exception as err:
            self._disabled.add(stage)
            rank_zero_warn(
                f"peering: ConfusedLogitCallback cannot take inputs from the {stage} batches ({err}); it "
                "skips them. Pass unpack=lambda batch: (inputs, labels) to the callback."
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
        return inputs, labels

    def _scores(self, pl_module: pl.LightningModule, inputs: Tensor) -> Tensor:
        rng_devices = (inputs.device,) if inputs.device.type == "cuda" else ()
        with eval_mode(pl_module, rng_devices), torch.no_grad():
            return class_scores(
                pl_module, _as_model_dtype(pl_module, inputs.detach()), self.output_fn
            ).detach()

    def _safe_scores(self, stage: str, pl_module: pl.LightningModule, inputs: Tensor) -> Tensor | None:
        """The logits, or None (with one warning, and the stage skipped from then on) if the model fails.

        A failure here must not stop training; under DDP the rank still takes part in the collectives.
        """
        try:
            return self._scores(pl_module, inputs)
        except Exception as err:
            self._disabled.add(stage)
            rank_zero_warn(
                f"peering: ConfusedLogitCallback could not run the model on the {stage} batches "
                f"({type(err).__name__}: {err}); it skips them for this run. Training goes on."
            )
            return None

    def _thresholds(self) -> Thresholds:
        return Thresholds(self.max_logit_difference, self.margin, self.min_logit_value)

    def _select(
        self, inputs: Tensor, labels: Tensor | None, logits: Tensor, capacity: int, thresholds: Thresholds
    ) -> tuple[Candidates, tuple[int, int]]:
        chosen, stats, skipped = choose(inputs, labels, logits, capacity, thresholds)
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
        stats: tuple[int, int],
        shape: Shape | None,
    ) -> tuple[Candidates, tuple[int, int]]:
        """`peering.lightning.selection.gather`, recording the collectives it calls (for the DDP tests)."""
        if trainer.world_size > 1:
            self._collectives.append((what, trainer.global_step))
        return gather(trainer, local, capacity, stats, shape)

    # ------------------------------------------------------------------------------------ output (rank 0)

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
            self._output.pictures(
                [tag], chosen.to("cpu"), attributions.detach().cpu(), probs.detach().cpu(), step, stage, epoch
            )

    def _explain_failed(self, err: Exception) -> None:
        self._disabled.add("pictures")
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
        inputs = tracked.inputs.to(device)
        logits = self._scores(pl_module, inputs).float()
        classes = logits.topk(2, dim=1).indices
        margins = (logits.gather(1, classes)[:, 0] - logits.gather(1, classes)[:, 1]).cpu()
        now = Candidates(inputs, tracked.labels.to(device), classes, margins)
        attributions, probs = self._explain(pl_module, now)
        tags = [f"{TAG_TRACKED}/{i}" for i in range(len(now))]
        cpu = Candidates(tracked.inputs, tracked.labels, classes.cpu(), margins)
        if self._output is not None:
            self._output.pictures(
                tags, cpu, attributions.detach().cpu(), probs.detach().cpu(), step, "tracked", epoch
            )

    def _log_scalar(self, trainer: pl.Trainer, tag: str, value: float, step: int) -> None:
        if self._output is not None:
            self._output.scalar(trainer.loggers, tag, value, step)

    def _report_failures(self) -> None:
        if self._output is not None:
            self._output.report_failures()

    def _close_writer(self) -> None:
        if self._output is not None:
            self._output.close()


def _as_model_dtype(pl_module: pl.LightningModule, inputs: Tensor) -> Tensor:
    """Float inputs in the module's floating dtype (e.g. under ``precision="bf16-true"``)."""
    dtype = getattr(pl_module, "dtype", None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point and inputs.dtype != dtype:
        return inputs.to(dtype)
    return inputs
