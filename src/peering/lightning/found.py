"""Where `LabelIssues` and `ShortcutAlarm` write what they found, on global rank zero: their pictures (to
every logger that takes images, or the PNG folder), one index record per panel (so that the report cuts
the panels back out and knows what each shows) and their scalars (every logger, else the PNG folder's
``scalars.csv``). The tags and files are named in `peering.runs.names`; the sinks are
`peering.lightning.sinks`'.

Everything is written on the training thread: a few pictures per epoch. A sink that fails is dropped
for the rest of the run with one warning; training goes on.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
from lightning.pytorch.utilities import rank_zero_warn

from peering.lightning.pictures import stack_panels
from peering.lightning.sinks import PictureIndex, PNGFolderSink, Sink, encode_png, image_sinks

__all__: list[str] = []  # internal: its names are used by its own package only


class FoundOutput:
    """One run's sinks for one of the two callbacks (``who`` names it in warnings)."""

    def __init__(self, loggers: Sequence[Any], run_dir: str, who: str) -> None:
        self.loggers, self.who = list(loggers), who
        self.sinks: list[Sink] = image_sinks(loggers)
        self.fallback = PNGFolderSink(run_dir) if not self.sinks else None
        self.scalar_fallback = self.fallback  # no logger takes images: scalars.csv too, as the callback's
        self.index = PictureIndex(run_dir)
        self.failed: set[int] = set()

    def panels(self, tag: str, panels: np.ndarray, step: int, records: list[dict[str, Any]]) -> None:
        """The panels [n, H, W, 3] of one write: ONE stacked picture to the loggers, one file each to the
        PNG folder; one record each (``tag``, ``step``, ``index`` (0 to n - 1 in the write), ``box``/``png``,
        ``width``, ``height`` are set) to the picture index."""
        boxes: list[list[int]] | None = None
        if self.sinks:
            picture, boxes = stack_panels(panels)
            pngs = [encode_png(picture)]
            for sink in self.sinks:
                self._guarded(sink, functools.partial(sink.log_images, tag, [picture], pngs, step))
        files = None
        if self.fallback is not None:
            images = list(panels)
            write = functools.partial(
                self.fallback.log_images, tag, images, [encode_png(p) for p in images], step
            )
            files = self._guarded(self.fallback, write)
        height, width = panels.shape[1:3]
        out = []
        for i, record in enumerate(records):
            out.append({
                **record, "tag": tag, "step": int(step), "index": i, "width": int(width),
                "height": int(height), "png": files[i] if files else None, "box": boxes[i] if boxes else None,
            })
        self._guarded(self.index, lambda: self.index.append(out))

    def scalars(self, metrics: dict[str, float], step: int) -> None:
        """Per-epoch scalars to every logger, and to the PNG folder's scalars.csv when no logger takes
        images (what the report reads)."""
        for logger in self.loggers:
            self._guarded(logger, functools.partial(logger.log_metrics, metrics, step=step))
        if self.scalar_fallback is not None:
            fallback = self.scalar_fallback
            for tag, value in metrics.items():
                self._guarded(fallback, functools.partial(fallback.log_scalar, tag, value, step))

    def _guarded(self, target: Any, call: Any) -> Any:
        if id(target) in self.failed:
            return None
        try:
            return call()
        except Exception as err:  # a sink that fails is dropped; training goes on
            self.failed.add(id(target))
            name = getattr(target, "name", type(target).__name__)
            rank_zero_warn(
                f"peering: {self.who} could not write to {name} ({type(err).__name__}: {err}); it stops "
                "using it for this run. Training goes on."
            )
            return None
