"""`ShortcutAlarm`: while a classifier trains, watch where each class's evidence sits on a clean probe set,
and raise an alarm when a class's evidence concentrates in a patch where the data has no signal.

At the end of every validation run of ``fit``, global rank zero explains a fixed probe set (clean inputs
and their labels) with `peering.explain`: the input gradient of each sample's probability of its own
class. Per class it averages the gradients' magnitudes over the class's probe samples into one map,
normalised to sum 1 (where the class's evidence sits), and computes:

- **quiet-patch share** (the first alarm): the largest share of the class's map on the *quiet* pixels of one
  ``window`` x ``window`` patch. Quiet pixels are those where the probe inputs carry no signal: (nearly)
  constant over the whole probe set, at least ``margin`` pixels away from any that varies
  (`signal_region`). A corner patch that only training 3s carry makes adding intensity there raise p(3)
  on clean 3s too, so class 3's share there grows; the other classes' does not.
- **ratio**: that share over the median class's. A ``"patch"`` alarm needs both ``share >= min_share``
  and ``ratio >= min_ratio``.
- **paint test** (the second alarm, a counterfactual rather than an attribution): every patch that lies
  (at least 3/4) on quiet pixels is painted with the probe's extreme value (white on a black background)
  on ``paint_per_class`` probe digits per class, and the callback counts, per class c, the share of the
  other classes' digits the model then calls c. ``fooled >= min_fooled`` raises a ``"paint"`` alarm.
  One forward pass per patch and digit, without gradients (MNIST: about 50 patches x 100 digits).
- **off-support share**: the share of the class's map on all quiet pixels (drift of the same kind, not
  localised), and **stability**: the rank (Spearman) correlation of the class's map with the previous
  validation run's. Both are logged (so users see drift), neither raises an alarm.

What it can catch: a class's evidence moving to a place where clean inputs are constant (borders, corners,
letterboxing, a blank background), from a patch, a watermark or a tag that only (or mostly) that class's
training inputs carry. The gradient share needs the model's sensitivity there to show on clean inputs,
which it does only in some epochs (a ReLU that opens only when the mark is present gives a zero gradient
on clean inputs): it is the weaker, more general signal. The paint test sees such gated detectors, but
only for marks like the one it paints (a bright square about ``window`` wide). What neither can: a
shortcut placed where the data has signal (inside the digits), a global cue (brightness, colour, texture,
frequency content), a shortcut that every class gets (the ratio compares a class with the others).
Natural photographs have signal everywhere: there no pixel is quiet and no alarm is raised (said once).
Measured detection table: the README and ``benchmarks/bench_shortcuts.py``.

Training is never changed: `peering.explain` runs the model in eval mode and restores every flag,
``.grad`` and the RNG.
"""


from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from peering._model import OUTPUTS, class_scores, eval_mode
from peering._validate import callable_or_none, int_at_least, number, one_of
from peering.attribution.explanation import explain
from peering.errors import PeeringValueError
from peering.lightning.found import FoundOutput
from peering.lightning.process_group import destroy_at_exit
from peering.lightning.shortcut_stats import (
    alarm_sentence,
    check_probe,
    class_maps,
    paint_mark,
    paint_test,
    quiet_patches,
    signal_region,
    spearman,
)
from peering.lightning.sinks import run_folder
from peering.runs import names

__all__ = ["ShortcutAlarm"]


class ShortcutAlarm(Callback):
    """Explain a fixed clean probe set at the end of every validation run and raise an alarm when a
    class's evidence concentrates in a patch where the data has no signal.

    Args:
        probe: ``(inputs, labels)``: clean images [n, C, H, W] (or [n, H, W]) the model takes, with their
            integer labels [n], never seen in training; 50 per class is what the benchmark uses (fewer make
            the maps noisier).
        min_share: a class whose quiet-patch share reaches this (default 0.015: 1.5% of its evidence, in
            a 4x4 patch that is 2% of a 28x28 image) ...
        min_ratio: ... and is at least this many times the median class's (default 3) raises a
            ``"patch"`` alarm.
        window: the patch side in pixels.
        output: what is differentiated: "probability" (default), "log_probability" or "logit".
        paint: run the paint test (see the module) at every check.
        min_fooled: a class into which painting one quiet patch turns at least this share of the other
            classes' probe digits raises a ``"paint"`` alarm (default 0.2; clean trainings: <= 0.03).
        paint_per_class: probe digits per class the paint test uses.
        tolerance, margin: the signal region (`signal_region`): pixels whose mean absolute deviation over
            the probe exceeds ``tolerance`` times the largest one, widened by ``margin`` pixels.
        output_fn: picks the class scores out of a model output that is not a [B, C] tensor.
        chunk_size: probe samples per forward pass of `peering.explain`.
        zoom: magnification of the alarm pictures.

    ``alarms``: a list of dicts, one per class and kind the first time it fires (and again if it fires
    after having stopped), with ``class``, ``epoch`` (counted from 1), ``kind`` ("patch" or "paint"),
    ``share`` and ``ratio`` (patch) or ``fooled`` (paint), ``patch`` ((row, column, height, width)),
    ``sentence``, and ``before`` / ``after``: the class's mean map before training and now ([H, W]).
    Each alarm is also drawn (`peering.render.map_change`) to every logger that takes images (tag
    ``peering/shortcuts/alarms``), else the PNG folder. ``history``: per validation run, the statistics of
    every class; the loggers get ``peering/shortcuts/<statistic>/<class>`` for ``quiet_share``,
    ``ratio``, ``fooled``, ``off_support`` and ``stability``. Global rank zero does all of it.

    Raises `PeeringValueError` before training when the model does not take the probe.

    >>> import torch
    >>> probe = (torch.rand(20, 1, 28, 28), torch.arange(20) % 10)
    >>> alarm = ShortcutAlarm(probe)
    >>> alarm.alarms, alarm.window
    ([], 4)
    """

    def __init__(
        self,
        probe: tuple[Tensor, Tensor],
        *,
        min_share: float = 0.015,
        min_ratio: float = 3.0,
        window: int = 4,
        output: str = "probability",
        tolerance: float = 0.02,
        margin: int = 1,
        paint: bool = True,
        min_fooled: float = 0.2,
        paint_per_class: int = 10,
        output_fn: Callable[[Any], Tensor] | None = None,
        chunk_size: int = 64,
        zoom: int = 4,
    ) -> None:
        super().__init__()
        self.inputs, self.labels = check_probe(probe)
        self.min_share = number("min_share", min_share, above=0, most=1)
        self.min_ratio = number("min_ratio", min_ratio, least=1)
        self.min_fooled = number("min_fooled", min_fooled, above=0, most=1)
        self.window, self.zoom = int_at_least("window", window, 1), int_at_least("zoom", zoom, 1)
        self.output = one_of("output", output, OUTPUTS)
        self.tolerance = number("tolerance", tolerance, least=0)
        self.margin = int_at_least("margin", margin, 0)
        self.paint, self.paint_per_class = bool(paint), int_at_least("paint_per_class", paint_per_class, 1)
        self.output_fn = callable_or_none("output_fn", output_fn, "model output -> class scores [B, C]")
        self.chunk_size = int_at_least("chunk_size", chunk_size, 1)
        self.signal = signal_region(self.inputs, tolerance=self.tolerance, margin=self.margin)
        self._mark = paint_mark(self.inputs, self.signal)
        self.alarms: list[dict[str, Any]] = []
        self.history: list[dict[str, Any]] = []
        self._first: Tensor | None = None
        self._previous: Tensor | None = None
        self._firing: set[tuple[int, str]] = set()
        self._told: set[str] = set()
        self._output: FoundOutput | None = None

    # ---------------------------------------------------------------------------------------- Lightning

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        destroy_at_exit()  # a Gloo rank that exits with its process group alive may abort
        root = run_folder(trainer)  # every rank asks
        if trainer.is_global_zero:
            self._output = FoundOutput(trainer.loggers, root, "ShortcutAlarm")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse, before any training, a probe the model does not take."""
        x = self.inputs[:2].to(pl_module.device)
        try:
            with eval_mode(pl_module), torch.no_grad():
                scores = class_scores(pl_module, x, self.output_fn)
        except Exception as err:
            raise PeeringValueError(
                f"ShortcutAlarm's probe inputs (shape {list(self.inputs.shape)}, {self.inputs.dtype}) do not "
                f"fit the model: {type(err).__name__}: {err}. Give probe=(inputs, labels) shaped and scaled "
                "like a training batch's inputs."
            ) from err
        if scores.ndim != 2 or int(self.labels.max()) >= scores.shape[1]:
            raise PeeringValueError(
                f"ShortcutAlarm's probe labels go up to {int(self.labels.max())} but the model's scores are "
                f"{list(scores.shape)} (classes along dimension 1)"
            )
        if self._first is None and trainer.is_global_zero:  # the maps before training: each alarm's "before"
            with torch.inference_mode(False):
                self._first = self._class_maps(pl_module)[0]

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or not trainer.is_global_zero:
            return
        with torch.inference_mode(False):
            new = self.check(pl_module, trainer.current_epoch + 1, trainer.global_step)
        if self._output is not None:
            self._log(self.history[-1], trainer.global_step)
            if new:
                self._draw(new, trainer.global_step)

    # ------------------------------------------------------------------------------------------ helpers

    def check(self, model: torch.nn.Module, epoch: int, step: int = 0) -> list[dict[str, Any]]:
        """Explain the probe with ``model`` now, record the statistics, raise alarms; returns the new
        alarms. The callback calls it at the end of every validation run of ``fit`` (rank zero), with the
        epoch counted from 1."""
        maps, counts, stats = self._statistics(model)
        stats.update(epoch=epoch, step=step)
        self.history.append({k: v.tolist() if isinstance(v, Tensor) else v for k, v in stats.items()})
        new = []
        for c in range(maps.shape[0]):
            share, ratio = float(stats["quiet_share"][c]), float(stats["ratio"][c])
            fool = float(stats["fooled"][c])
            for kind, firing in (
                ("patch", bool(counts[c]) and share >= self.min_share and ratio >= self.min_ratio),
                ("paint", fool >= self.min_fooled),
            ):
                if not firing:
                    self._firing.discard((c, kind))
                elif (c, kind) not in self._firing:
                    self._firing.add((c, kind))
                    corner = stats["patch_corner" if kind == "patch" else "painted_corner"][c]
                    new.append(self._alarm(c, epoch, kind, share if kind == "patch" else fool, ratio, corner,
                                           maps))
        self.alarms.extend(new)
        self._previous = maps
        return new

    def _statistics(self, model: torch.nn.Module) -> tuple[Tensor, Tensor, dict[str, Any]]:
        """The class maps, their counts and this check's statistics (tensors [K])."""
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        maps, counts, logits = self._class_maps(model)
        k = logits.shape[1]
        quiet = ~self.signal
        shares, ratios, corners = quiet_patches(maps, quiet, self.window)
        if not bool(quiet.any()) and "no quiet pixel" not in self._told:
            self._told.add("no quiet pixel")
            rank_zero_warn(
                "peering: ShortcutAlarm finds no pixel where the probe inputs carry no signal (the images "
                "vary everywhere); it logs the maps' stability and raises no alarm."
            )
        previous = self._previous
        stability = torch.tensor([math.nan] * k if previous is None else [spearman(maps[c], previous[c])
                                                                          for c in range(k)])
        if self._first is None:
            self._first = maps.clone()
        fooled, painted_at = torch.full((k,), math.nan), torch.zeros(k, 2, dtype=torch.long)
        if self.paint and bool(quiet.any()):
            per_class = self.paint_per_class
            keep = torch.cat([(self.labels == c).nonzero().flatten()[:per_class] for c in range(k)])
            fooled, painted_at = paint_test(
                model, self.inputs[keep].to(device), self.labels[keep], quiet.to(device), self.window,
                value=self._mark.to(device), num_classes=k, output_fn=self.output_fn,
            )
        accuracy = float((logits.argmax(1).cpu() == self.labels).float().mean())
        return maps, counts, {
            "accuracy": accuracy, "quiet_share": shares, "ratio": ratios, "patch_corner": corners,
            "fooled": fooled, "painted_corner": painted_at,
            "off_support": (torch.nan_to_num(maps) * quiet).flatten(1).sum(dim=1), "stability": stability,
        }

    def _class_maps(self, model: torch.nn.Module) -> tuple[Tensor, Tensor, Tensor]:
        """Per class, the mean map of its probe samples' input gradients toward it, the counts, and the
        probe's logits."""
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        exp = explain(model, self.inputs.to(device), self.labels.to(device), method="gradient",
                      output=self.output, output_fn=self.output_fn,  # type: ignore[arg-type]
                      chunk_size=self.chunk_size)
        maps, counts = class_maps(exp.attributions[:, 0].cpu(), self.labels, exp.logits.shape[1])
        return maps, counts, exp.logits.cpu()

    def _alarm(
        self, c: int, epoch: int, kind: str, value: float, ratio: float, corner: Tensor, maps: Tensor
    ) -> dict[str, Any]:
        w = min(self.window, *maps.shape[1:])
        patch = (int(corner[0]), int(corner[1]), w, w)
        assert self._first is not None
        alarm: dict[str, Any] = {"class": c, "epoch": epoch, "kind": kind}
        alarm.update({"fooled": value} if kind == "paint" else {"share": value, "ratio": ratio})
        alarm.update(patch=patch, sentence=alarm_sentence(c, kind, value, ratio, patch, epoch),
                     before=self._first[c].clone(), after=maps[c].clone())
        return alarm

    def _log(self, stats: dict[str, Any], step: int) -> None:
        assert self._output is not None
        metrics = {
            names.shortcut_tag(name, c): float(v)
            for name in names.SHORTCUT_STATISTICS
            for c, v in enumerate(stats[name])
            if math.isfinite(float(v))
        }
        metrics[names.SHORTCUT_EPOCH] = float(stats["epoch"])
        self._output.scalars(metrics, step)

    def _draw(self, alarms: Sequence[dict[str, Any]], step: int) -> None:
        """One picture per new alarm: the class's mean map before training and now, and the patch."""
        from peering.render import map_change

        assert self._output is not None
        for alarm in alarms:
            titles = (f"class {alarm['class']}: before training", f"epoch {alarm['epoch']}")
            picture = map_change(alarm["before"], alarm["after"], signal=self.signal, patch=alarm["patch"],
                                 titles=titles, note=alarm["sentence"], zoom=self.zoom).numpy()
            record = {k: v for k, v in alarm.items() if k not in ("before", "after")}
            record.update(stage="shortcuts", patch=list(alarm["patch"]))
            self._output.panels(names.SHORTCUT_ALARMS, picture[None], step, [record])
