"""`LabelIssues`: while a classifier trains, rank its training samples by how likely their label is wrong.

The statistic is the area under the margin (AUM, Pleiss et al., NeurIPS 2020): each time a sample passes
through training, its margin is the logit of its given label minus the largest other logit; a sample the
model keeps placing in another class has a low (negative) mean margin, a mislabelled one especially.
Three changes, each measured (``benchmarks/bench_label_issues.py``, ``docs/labels_and_shortcuts.md``):

- **Per-class thresholds (calibrated margin).** Confident learning (Northcutt et al. 2021, cleanlab)
  counts a sample labelled i as "confidently j" when p_j >= t_j, the mean p_j over the samples labelled
  j. The callback subtracts log t_j from logit j before taking the margin. When annotators confuse two
  classes systematically (40% of the 7s labelled 1) the model drifts between the two as a block from
  epoch to epoch; the thresholds follow that drift, the raw margin does not.
- **Distance, not margin** (``score="distance"``, the default): the margin divided by the norm of its
  input gradient (the gradients toward the given and the predicted class, as `peering.explain` computes
  them): a first-order distance to the decision boundary in input units, as a morph would measure it.
- **Eval-mode logits** (``logits="eval"``): one forward (and for the distance, backward) pass per
  training batch, in eval mode, *before* the optimizer step. The step's own logits carry dropout's
  noise; ``logits="step"`` uses them (free) with ``score="margin"``.

Samples are identified by their dataset index (`peering.lightning.batches.Batch.indices`): batches
``(inputs, labels, index)``, dicts with ``"index"``, or ``unpack=`` returning ``(inputs, labels,
forward_kwargs, index)``. Under DDP all ranks' records are gathered at the end of every training epoch,
and a sample the sampler repeated counts once per epoch. Training is never changed: the callback's own
passes run in eval mode; every flag, ``.grad`` and the RNG are left as they were.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from peering._model import class_scores, eval_mode
from peering._validate import callable_or_none, int_at_least, number, one_of
from peering.errors import PeeringRuntimeError, PeeringValueError
from peering.lightning.batches import Batch, as_model_dtype, model_scores, returned_logits, unpack_batch
from peering.lightning.found import FoundOutput
from peering.lightning.label_table import LabelTable, Thresholds, calibrated_margins, gather_records
from peering.lightning.label_table import write_ranking as _write_ranking
from peering.lightning.process_group import destroy_at_exit
from peering.lightning.sinks import run_folder
from peering.lightning.suspects import suspect_panels
from peering.runs import names

__all__ = ["LabelIssues"]

HOW_TO_INDEX = (
    "LabelIssues identifies samples by their index in the dataset, and the training batches carry none. "
    "Return it from the dataset (batches (inputs, labels, index), or a dict with 'index'), or pass "
    "unpack=lambda batch: (inputs, labels, None, index) to LabelIssues. A Dataset wrapper that does it: "
    "class Indexed(Dataset): def __getitem__(self, i): x, y = base[i]; return x, y, i"
)
HOW_TO_LABEL = (
    "LabelIssues needs integer class labels [B] in the training batches and found none; return them from "
    "the dataset, or pass unpack=lambda batch: (inputs, labels, None, index)."
)


class LabelIssues(Callback):
    """Rank the training samples by how likely their label is wrong, from the training itself.

    Args:
        score: "distance" (default): the (calibrated) margin over the norm of its input gradient, from
            one eval-mode forward and backward pass per training batch (about 2/3 of a training step's
            time); "margin": the margin alone (one forward pass, about 1/3).
        logits: "eval" (default): the callback's own eval-mode pass before the optimizer step; "step":
            the logits ``training_step`` returns as ``{"loss": loss, "logits": logits}`` (no extra pass;
            with dropout, noisier; only with ``score="margin"``), else an eval-mode pass after the step.
        calibrate: subtract each class's log threshold (the mean p(class) over the samples labelled with
            it) before taking the margin (default True; False: the plain margin of Pleiss et al.).
        burn_in: the scores average over the epochs after the first ``burn_in`` (default 1), while the
            model still learns what each class looks like (over all epochs until there are such).
        unpack: ``batch -> (inputs, labels)``, ``(inputs, labels, forward_kwargs)`` or ``(inputs, labels,
            forward_kwargs, index)`` for batches that are not ``(inputs, labels, index)`` tuples or dicts
            with an ``"index"``.
        output_fn: picks the class scores out of a model output that is not a [B, C] tensor.
        top_k: how many suspects `suspects` describes and the pictures show.
        pictures: at the end of every training epoch, global rank zero draws the ``top_k`` most suspect
            samples (`peering.render.confusion_panels`: the input, the gradients of the given and of the
            predicted class's logit, and where each leads, under a line "#i given 3, the model says 5
            from epoch 2 on"), read back from the training dataset by index (map-style datasets), to
            every logger that takes images (tag ``peering/label_issues``), else PNG files.
        projection_factor, zoom: the pictures' "input + f x gradient" step and magnification.
        write: at the end of ``fit``, rank zero writes the whole ranking to
            ``<run>/peering/label_issues.csv`` (index, score, given, predicted, since_epoch, epochs).

    After (or during) ``fit``: `ranking` returns ``(indices, scores)``, most suspect first; `suspects`
    describes the first ones. Per training epoch the loggers get ``peering/label_issues/suspects`` (samples
    with a negative score so far) and ``peering/label_issues/misfit_fraction``.

    Raises `PeeringValueError` at the first training batch when the batches carry no labels or no
    indices (the message says how to provide them).

    >>> LabelIssues().score
    'distance'
    """

    def __init__(
        self,
        *,
        score: Literal["distance", "margin"] = "distance",
        logits: Literal["eval", "step"] = "eval",
        calibrate: bool = True,
        burn_in: int = 1,
        unpack: Callable[[Any], Any] | None = None,
        output_fn: Callable[[Any], Tensor] | None = None,
        top_k: int = 16,
        pictures: bool = True,
        projection_factor: float = 1.0,
        zoom: int = 4,
        write: bool = True,
    ) -> None:
        super().__init__()
        self.score = one_of("score", score, ("distance", "margin"))
        self.logits = one_of("logits", logits, ("eval", "step"))
        if score == "distance" and logits == "step":
            raise PeeringValueError(
                "score='distance' needs the input gradient of the margin, from LabelIssues' own eval-mode "
                "pass: pass logits='eval' with it, or score='margin' with logits='step'"
            )
        if not isinstance(calibrate, bool):
            raise PeeringValueError(f"calibrate must be True or False, got {calibrate!r}")
        self.calibrate, self.burn_in = calibrate, int_at_least("burn_in", burn_in, 0)
        self.unpack = callable_or_none("unpack", unpack, "batch -> (inputs, labels, forward_kwargs, index)")
        self.output_fn = callable_or_none("output_fn", output_fn, "model output -> class scores [B, C]")
        self.top_k, self.zoom = int_at_least("top_k", top_k, 1), int_at_least("zoom", zoom, 1)
        self.projection_factor = number("projection_factor", projection_factor)
        self.pictures, self.write = bool(pictures), bool(write)
        self.table = LabelTable()
        self.history: list[dict[str, float]] = []  # per training epoch: samples, misfit, suspects
        self._thresholds = Thresholds()
        self._records: list[tuple[Tensor, ...]] = []  # this epoch, this rank: index, score, predicted, label
        self._pending: tuple[Any, ...] | None = None
        self._told: set[str] = set()
        self._output: FoundOutput | None = None
        self._run_dir: str | None = None

    # ------------------------------------------------------------------------------------------ results

    def ranking(self) -> tuple[Tensor, Tensor]:
        """``(indices, scores)``: the dataset indices of every sample seen, most suspect first, and their
        scores, ascending: the mean over the epochs after ``burn_in`` (over all epochs while there are
        none) of the calibrated margin (``score="margin"``) or of it over the norm of its input gradient
        (``"distance"``). Below 0: the model, on average, put the sample in another class.

        Raises:
            PeeringRuntimeError: no training epoch has ended yet.
        """
        if not bool(self.table.seen.any()):
            raise PeeringRuntimeError(
                "LabelIssues has not recorded any training sample yet: it records at the end of each "
                "training epoch of Trainer.fit"
            )
        return self.table.ranking()

    def suspects(self, k: int | None = None) -> list[dict[str, Any]]:
        """The ``k`` (default ``top_k``) most suspect samples: dicts with ``index``, ``score``, ``given``,
        ``predicted`` (the model's class in the last epoch), ``since_epoch`` (from which epoch, counted from
        1, it has said so), ``epochs`` and a ``sentence`` ("given 3, the model says 5 from epoch 2 on")."""
        indices, scores = self.ranking()
        t = self.table
        out = []
        for i, s in zip(indices[: k or self.top_k].tolist(), scores[: k or self.top_k].tolist(), strict=True):
            given, predicted, since = int(t.given[i]), int(t.predicted[i]), int(t.since[i])
            if predicted != given:
                sentence = f"given {given}, the model says {predicted} from epoch {since} on"
            else:
                sentence = f"given {given}, the model agrees since epoch {since} (score {s:.2f})"
            epochs = int(t.epochs[i] + t.early_epochs[i])
            out.append({"index": i, "score": s, "given": given, "predicted": predicted, "since_epoch": since,
                        "epochs": epochs, "sentence": sentence})
        return out

    # ---------------------------------------------------------------------------------------- Lightning

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            logits=self.logits, calibrate=self.calibrate, score=self.score, burn_in=self.burn_in
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        previous = self._thresholds.previous
        return {**self.table.state_dict(), "log_thresholds": None if previous is None else previous.clone(),
                "history": list(self.history)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.table = LabelTable.from_state_dict(state_dict)
        previous = state_dict.get("log_thresholds")
        self._thresholds = Thresholds(previous=None if previous is None else previous.clone())
        self.history = list(state_dict.get("history", []))

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        destroy_at_exit()  # a Gloo rank that exits with its process group alive may abort
        self._run_dir = run_folder(trainer)  # every rank asks
        self._output = FoundOutput(trainer.loggers, self._run_dir, "LabelIssues") if trainer.is_global_zero \
            else None

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._records, self._pending = [], None

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """"eval": the model's logits (and gradient norms) on the batch before the optimizer step."""
        self._pending = None
        if trainer.sanity_checking:
            return
        b = self._batch(batch)
        if self.logits == "eval":
            self._pending = self._measure(pl_module, b)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.sanity_checking:
            return
        if self._pending is not None:
            self._record(*self._pending)
            self._pending = None
            return
        if self.logits == "step":
            b = self._batch(batch)
            logits = returned_logits(outputs, len(b))
            if logits is None:
                self._say_once("step", "LabelIssues(logits='step') found no logits in what training_step "
                               "returned (return {'loss': loss, 'logits': logits}); it runs the model itself "
                               "in eval mode after the step instead (one forward pass per batch).")
                logits = model_scores(pl_module, b.inputs, b.forward, self.output_fn)
            self._record(b.indices, logits, b.labels)  # type: ignore[arg-type]

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        gather = reduce = None
        if trainer.world_size > 1:
            device = trainer.strategy.root_device
            gather = lambda t: trainer.strategy.all_gather(t.to(device))  # noqa: E731
            reduce = lambda t: trainer.strategy.reduce(t.to(device), reduce_op="sum").cpu()  # noqa: E731
        index, score, predicted, label = gather_records(self._records, gather)
        self._thresholds.end_epoch(reduce)
        self._records = []
        epoch = trainer.current_epoch + 1  # counted from 1
        self.table.merge(index, score, predicted, label, epoch=epoch, burn_in=self.burn_in)
        if index.numel() == 0:
            return
        misfit = float((predicted != label).float().mean())
        suspects = int((self.table.ranking()[1] < 0).sum())
        self.history.append({"epoch": trainer.current_epoch, "samples": int(index.numel()), "misfit": misfit,
                             "suspects": suspects})
        if self._output is not None:
            self._output.scalars({names.LABEL_SUSPECTS: suspects, names.LABEL_MISFIT: misfit},
                                 trainer.global_step)
            if self.pictures:
                self._draw(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seen = bool(self.table.seen.any())
        if self.write and trainer.is_global_zero and self._run_dir is not None and seen:
            _write_ranking(Path(self._run_dir) / names.LABEL_ISSUES_FILE, self.table)

    # ------------------------------------------------------------------------------------------ helpers

    def _batch(self, batch: Any) -> Batch:
        """The batch, with labels and indices, or one clear error saying how to provide them."""
        b = unpack_batch(batch, self.unpack)
        if b.labels is None:
            raise PeeringValueError(HOW_TO_LABEL)
        if b.indices is None:
            raise PeeringValueError(HOW_TO_INDEX)
        return b

    def _measure(self, pl_module: pl.LightningModule, b: Batch) -> tuple[Any, ...]:
        """(index, logits, labels, norms or None) of a batch, from the model in eval mode."""
        assert b.indices is not None and b.labels is not None
        if self.score == "margin":
            return b.indices, model_scores(pl_module, b.inputs, b.forward, self.output_fn), b.labels, None
        rng_devices = (b.inputs.device,) if b.inputs.device.type == "cuda" else ()
        with eval_mode(pl_module, rng_devices), torch.inference_mode(False), torch.enable_grad():
            x = as_model_dtype(pl_module, b.inputs.detach().clone()).requires_grad_(True)
            kwargs = b.forward.rows(slice(None)) if b.forward else None
            z = class_scores(pl_module, x, self.output_fn, kwargs)
            given = b.labels.to(z.device).long().clamp(0, z.shape[1] - 1)
            adjusted = z.detach().float()
            if self.calibrate:
                adjusted = adjusted - self._thresholds.log(z.shape[1]).to(z.device)
            other = adjusted.scatter(1, given[:, None], float("-inf")).argmax(dim=1)
            gap = z.gather(1, given[:, None])[:, 0] - z.gather(1, other[:, None])[:, 0]
            (grad,) = torch.autograd.grad(gap.float().sum(), x)  # the inputs' only: no .grad is touched
        return b.indices, z.detach(), b.labels, grad.detach().float().flatten(1).norm(dim=1)

    def _record(self, index: Tensor, logits: Tensor, labels: Tensor, norms: Tensor | None = None) -> None:
        logits, labels = logits.detach().float().cpu(), labels.detach().cpu().long()
        index = index.cpu().long()
        c = logits.shape[1]
        ok = torch.isfinite(logits).all(dim=1) & (labels >= 0) & (labels < c)
        if bool((labels >= c).any()):
            self._say_once("range", f"LabelIssues skips samples whose label is >= the model's {c} classes.")
        logits, labels, index = logits[ok], labels[ok], index[ok]
        if index.numel() == 0:
            return
        log_t = self._thresholds.log(c) if self.calibrate else None
        margin, predicted = calibrated_margins(logits, labels, log_t)
        if norms is not None:
            norms = norms.detach().float().cpu()[ok]
            # a (near) zero gradient would send the sample to either end: floor it at 1% of the median
            margin = margin / norms.clamp_min(max(1e-2 * float(norms.median()), 1e-12))
        self._thresholds.add(logits, labels)
        self._records.append((index, margin, predicted, labels))

    def _draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The ``top_k`` suspects' pictures (rank zero), or one warning saying why there are none."""
        assert self._output is not None
        suspects = self.suspects()
        try:
            panels = suspect_panels(trainer, pl_module, suspects, self)
        except Exception as err:  # a dataset that cannot be indexed: no pictures, the ranking goes on
            self.pictures = False
            rank_zero_warn(f"peering: LabelIssues draws no pictures of its suspects: {err}")
            return
        records = [{"stage": "label_issues", "epoch": trainer.current_epoch, "sample": s["index"],
                    **{k: v for k, v in s.items() if k != "index"}} for s in suspects]
        self._output.panels(names.LABEL_ISSUES, panels, trainer.global_step, records)

    def _say_once(self, key: str, message: str) -> None:
        if key not in self._told:
            self._told.add(key)
            rank_zero_warn(f"peering: {message}")
