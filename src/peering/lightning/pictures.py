"""Where `ConfusedLogitCallback`'s pictures and scalars go, on global rank zero.

Internal to the callback (not part of peering's API). `PictureOutput` holds one run's sinks (one per
logger that takes images, or a PNG folder), the picture index and the background writer; `PictureJob`
draws, encodes and writes one batch of pictures on that writer's thread. A sink that fails is dropped for
the rest of the run with one warning; when no sink is left the pictures go to the PNG folder. The tags,
the file layout and the readers are described in `peering.lightning.sinks`.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from peering.lightning.selection import Candidates
from peering.lightning.sinks import (
    BackgroundWriter,
    PictureIndex,
    PNGFolderSink,
    Sink,
    encode_png,
    image_sinks,
)

__all__ = ["stack_panels"]


class PictureOutput:
    """One run's sinks, index and writer (global rank zero only), and the failures of each sink."""

    def __init__(
        self, loggers: list[Any], run_dir: str, *, drawing: Mapping[str, Any], background: bool
    ) -> None:
        self.run_dir = run_dir
        self.drawing, self.background = dict(drawing), background  # drawing: confusion_panels' options
        self.failed: dict[int, str] = {}
        self._failures: list[tuple[int, str, BaseException]] = []
        self._lock = threading.Lock()
        self.sinks = image_sinks(loggers)
        self.fallback: PNGFolderSink | None = None
        if not self.sinks:
            self.fallback = PNGFolderSink(run_dir)
            names = ", ".join(type(lg).__name__ for lg in loggers) or "no logger"
            rank_zero_info(
                f"peering: ConfusedLogitCallback found no logger that takes images ({names}); its pictures "
                f"go to PNG files under {self.fallback.root / 'peering'} (see peering.lightning.sinks)"
            )
        self.index: PictureIndex | None = PictureIndex(run_dir)
        self.writer: BackgroundWriter | None = BackgroundWriter(threaded=background)

    def pictures(
        self,
        tags: list[str],
        chosen: Candidates,
        attributions: Tensor,
        probs: Tensor,
        step: int,
        stage: str,
        epoch: int,
    ) -> None:
        """Draw and write the pictures of ``chosen`` (on the writer thread); all tensors on the CPU."""
        self.submit(PictureJob(self, tags, chosen, attributions, probs, step, stage, epoch))

    def scalar(self, loggers: Iterable[Any], tag: str, value: float, step: int) -> None:
        for logger in loggers:
            if id(logger) in self.failed:
                continue
            try:
                logger.log_metrics({tag: value}, step=step)
            except Exception as err:
                self.record_failure(id(logger), type(logger).__name__, err)
        if self.fallback is not None:
            fallback = self.fallback
            self.submit(lambda: self.guarded(fallback, lambda: fallback.log_scalar(tag, value, step)))
        self.report_failures()

    def submit(self, job: Callable[[], None]) -> None:
        if self.writer is None:
            self.writer = BackgroundWriter(threaded=self.background)
        self.writer.submit(job)

    def guarded(self, sink: Sink, call: Callable[[], Any]) -> Any:
        """``call()``, or None when ``sink`` failed before or fails now (recorded, warned about later)."""
        key = id(sink.logger) if sink.logger is not None else id(sink)
        if key in self.failed:
            return None
        try:
            return call()
        except Exception as err:
            self.record_failure(key, sink.name, err)
            return None

    def record_failure(self, key: int, name: str, err: BaseException) -> None:
        with self._lock:
            if key in self.failed:
                return
            self.failed[key] = name
            self._failures.append((key, name, err))
            live = [
                s for s in self.sinks if (id(s.logger) if s.logger is not None else id(s)) not in self.failed
            ]
            if not live and self.fallback is None:
                self.fallback = PNGFolderSink(self.run_dir)

    def report_failures(self) -> None:
        """Warn once about every sink that failed since the last call (on the training thread)."""
        if self.writer is not None:
            for err in self.writer.pop_errors():  # a job that failed outside the sinks (drawing)
                self.record_failure(id(self.writer), "the picture writer", err)
        if not self._failures:
            return
        with self._lock:
            failures, self._failures = self._failures, []
        for _, name, err in failures:
            where = ""
            if self.fallback is not None and name != self.fallback.name:
                where = f"; pictures now go to PNG files under {self.fallback.root / 'peering'}"
            rank_zero_warn(
                f"peering: ConfusedLogitCallback could not log to {name} ({type(err).__name__}: {err}); it "
                f"stops using it for this run{where}. Training goes on."
            )

    def close(self) -> None:
        """Wait for the pending pictures, then report what failed."""
        if self.writer is not None:
            self.writer.close()
            self.report_failures()
            self.writer = None
        self.report_failures()


class PictureJob:
    """Draw, encode and write one batch of pictures (runs on the writer thread)."""

    def __init__(
        self,
        output: PictureOutput,
        tags: list[str],
        chosen: Candidates,
        attributions: Tensor,
        probs: Tensor,
        step: int,
        stage: str,
        epoch: int,
    ) -> None:
        self.output, self.tags, self.chosen = output, tags, chosen
        self.attributions, self.probs = attributions, probs
        self.step, self.stage, self.epoch = step, stage, epoch

    def __call__(self) -> None:
        from peering.render import confusion_panels

        out, c = self.output, self.chosen
        panels = confusion_panels(
            c.inputs,
            self.attributions[:, 0],
            self.attributions[:, 1],
            class_a=c.classes[:, 0],
            class_b=c.classes[:, 1],
            prob_a=self.probs[:, 0],
            prob_b=self.probs[:, 1],
            labels=c.labels,
            **out.drawing,
        ).numpy()
        # one tag for all (training, validation) or one tag per sample (tracked)
        groups = (
            [(self.tags[0], list(range(len(panels))))]
            if len(self.tags) == 1
            else [(tag, [i]) for i, tag in enumerate(self.tags)]
        )
        records = []
        for tag, rows in groups:
            files, boxes = self._write(tag, panels[rows])
            for j, i in enumerate(rows):
                records.append(
                    {
                        "tag": tag,
                        "step": int(self.step),
                        "index": j,
                        "stage": self.stage,
                        "epoch": int(self.epoch),
                        "label": int(c.labels[i]),
                        "class_a": int(c.classes[i, 0]),
                        "class_b": int(c.classes[i, 1]),
                        "prob_a": float(self.probs[i, 0]),
                        "prob_b": float(self.probs[i, 1]),
                        "margin": float(c.margins[i]),
                        "width": int(panels.shape[2]),
                        "height": int(panels.shape[1]),
                        "png": files[j] if files else None,
                        "box": boxes[j] if boxes else None,
                    }
                )
        if out.index is not None:
            index = out.index
            out.guarded(IndexSink(index), lambda: index.append(records))

    def _write(self, tag: str, panels: np.ndarray) -> tuple[list[str] | None, list[list[int]] | None]:
        """Hand the panels [n, H, W, 3] of one tag to every live sink: the loggers get them as ONE picture
        (`stack_panels`), the PNG folder one file each. Returns the files the PNG folder wrote and where
        each panel sits in the loggers' picture (``[x, y, width, height]``), each None when unused."""
        out, step = self.output, self.step
        boxes = None
        sinks = list(out.sinks)
        if sinks:
            picture, boxes = stack_panels(panels)
            pngs = [encode_png(picture)]
            for sink in sinks:
                out.guarded(sink, functools.partial(sink.log_images, tag, [picture], pngs, step))
        fallback = out.fallback
        if fallback is None:
            return None, boxes
        images = list(panels)
        files = out.guarded(
            fallback,
            functools.partial(fallback.log_images, tag, images, [encode_png(p) for p in images], step),
        )
        return files, boxes


STACK_ROWS = 8
"""The loggers' picture of a check stacks its panels in columns of at most this many."""
STACK_PAD = 6
"""Pixels of grey between (and around) the panels in the loggers' picture."""


def stack_panels(panels: np.ndarray) -> tuple[np.ndarray, list[list[int]]]:
    """All panels [n, H, W, 3] of one check as one picture on grey, in reading order (most confused first):
    one column of up to `STACK_ROWS` panels, or ceil(n / 8) panels per row beyond that; and each panel's
    box ``[x, y, width, height]`` in the picture.

    >>> import numpy as np
    >>> picture, boxes = stack_panels(np.zeros((3, 10, 20, 3), np.uint8))
    >>> picture.shape, boxes[2]
    ((54, 32, 3), [6, 38, 20, 10])
    """
    import torch

    from peering.render import grid

    n, h, w, _ = panels.shape
    columns = -(-n // STACK_ROWS)
    rows = -(-n // columns)
    picture = grid(torch.from_numpy(np.ascontiguousarray(panels)), nrow=columns, pad=STACK_PAD, pad_value=200)
    boxes = []
    for i in range(n):  # the layout `grid` documents: tile i in row i // nrow, column i % nrow
        r, col = divmod(i, columns)
        boxes.append([STACK_PAD + col * (w + STACK_PAD), STACK_PAD + r * (h + STACK_PAD), w, h])
    assert rows * (h + STACK_PAD) + STACK_PAD == picture.shape[0]
    return picture.numpy(), boxes


class IndexSink(Sink):
    """The picture index as a sink, so that a failure to write it is handled like any other."""

    name = "the picture index"

    def __init__(self, index: PictureIndex) -> None:
        self.index = index
        self.logger = index  # one failure key per index file
