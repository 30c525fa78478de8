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
from typing import Any, NamedTuple

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from peering.lightning.atlas import PairExamples
from peering.lightning.selection import Candidates
from peering.lightning.sinks import (
    BackgroundWriter,
    PictureIndex,
    PNGFolderSink,
    Sink,
    encode_png,
    image_sinks,
    write_summary,
)

__all__ = ["is_token_ids", "stack_panels"]

_FAILED = object()


class Written(NamedTuple):
    """What `PictureOutput.write_panels` did: the PNG folder's files, the panels' boxes in the loggers'
    picture (each None when unused), and whether at least one sink took the panels."""

    files: list[str] | None
    boxes: list[list[int]] | None
    taken: bool


def _took(sink: Sink, tag: str, images: list[np.ndarray], pngs: list[bytes], step: int) -> bool:
    sink.log_images(tag, images, pngs, step)
    return True


class PictureOutput:
    """One run's sinks, index and writer (global rank zero only), and the failures of each sink."""

    def __init__(
        self,
        loggers: list[Any],
        run_dir: str,
        *,
        drawing: Mapping[str, Any],
        background: bool,
        written: Callable[[str, int], None] = lambda stage, n: None,
        tokenizer: Any = None,
    ) -> None:
        self.run_dir = run_dir
        self.drawing, self.background = dict(drawing), background  # drawing: confusion_panels' options
        self.tokenizer = tokenizer  # token_panels' (for token ids)
        self.written = written  # (stage, n): n pictures of that stage reached at least one sink
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

    def atlas(self, job: AtlasJob) -> None:
        """Draw and write the confusion atlas of one validation run (on the writer thread)."""
        self.submit(job)

    def write(self, tag: str, images: list[np.ndarray], pngs: list[bytes], step: int) -> list[str] | None:
        """Hand the pictures of one tag to every live sink; the files written by the PNG folder, if any."""
        for sink in list(self.sinks):
            self.guarded(sink, functools.partial(sink.log_images, tag, images, pngs, step))
        fallback = self.fallback
        if fallback is None:
            return None
        return self.guarded(fallback, functools.partial(fallback.log_images, tag, images, pngs, step))

    def write_panels(self, tag: str, panels: np.ndarray, step: int) -> Written:
        """Hand the panels [n, H, W, 3] of one tag to every live sink: the loggers get them as ONE picture
        (`stack_panels`, so TensorBoard shows one card per tag whose step slider walks through training),
        the PNG folder one file each. Returns the files the PNG folder wrote and where each panel sits in
        the loggers' picture (``[x, y, width, height]``), each None when unused, and whether at least one
        sink took them."""
        boxes, taken = None, False
        sinks = list(self.sinks)
        if sinks:
            picture, boxes = stack_panels(panels)
            pngs = [encode_png(picture)]
            for sink in sinks:
                call = functools.partial(_took, sink, tag, [picture], pngs, step)
                taken |= bool(self.guarded(sink, call, failed=False))
        fallback = self.fallback
        if fallback is None:
            return Written(None, boxes, taken)
        images = list(panels)
        files = self.guarded(
            fallback,
            functools.partial(fallback.log_images, tag, images, [encode_png(p) for p in images], step),
            failed=_FAILED,
        )
        if files is _FAILED:
            return Written(None, boxes, taken)
        return Written(files, boxes, True)

    def record(self, records: list[dict[str, Any]]) -> None:
        """Append records to the picture index (a failure is handled like any sink's)."""
        if self.index is not None:
            index = self.index
            self.guarded(IndexSink(index), lambda: index.append(records))

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

    def guarded(self, sink: Sink, call: Callable[[], Any], failed: Any = None) -> Any:
        """``call()``, or ``failed`` when ``sink`` failed before or fails now (recorded, warned later)."""
        key = id(sink.logger) if sink.logger is not None else id(sink)
        if key in self.failed:
            return failed
        try:
            return call()
        except Exception as err:
            self.record_failure(key, sink.name, err)
            return failed

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

    def flush(self) -> None:
        """Wait until every picture submitted so far is written (or failed)."""
        if self.writer is not None:
            self.writer.flush()

    def write_summary(self, summary: dict[str, Any]) -> None:
        """``<run>/peering/callback.json``: the callback's settings and counters (see `read_summary`)."""
        try:
            write_summary(self.run_dir, summary)
        except OSError as err:
            rank_zero_warn(f"peering: ConfusedLogitCallback could not write its run summary ({err})")

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
        if is_token_ids(c.inputs) and self.attributions.ndim == 3:  # [n, 2, L]: one score per token
            panels, extra = self._token_panels()
        else:
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
            extra = [{} for _ in range(len(panels))]
        # one tag for all (training, validation) or one tag per sample (tracked)
        groups = (
            [(self.tags[0], list(range(len(panels))))]
            if len(self.tags) == 1
            else [(tag, [i]) for i, tag in enumerate(self.tags)]
        )
        records = []
        written = 0
        for tag, rows in groups:
            files, boxes, taken = out.write_panels(tag, panels[rows], self.step)
            written += len(rows) if taken else 0
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
                        **extra[i],
                    }
                )
        if written:
            out.written(self.stage, written)
        out.record(records)

    def _token_panels(self) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """The panels of token ids (as `peering.render.token_panels` draws them), and per sample the
        ``tokens`` and per-class ``scores`` its index record keeps (padding left out), from which the
        report draws the coloured text as HTML."""
        from peering.render.tokens import token_panels_of, unpadded_tokens

        c, output = self.chosen, self.output.drawing.get("output")
        mask = c.forward.per_sample.get("attention_mask")
        if mask is not None and tuple(mask.shape) != tuple(c.inputs.shape):
            mask = None
        tokenizer = self.output.tokenizer
        words, kept = unpadded_tokens(self.attributions, c.inputs, tokenizer, mask)
        panels = token_panels_of(
            words,
            kept,
            class_a=c.classes[:, 0],
            class_b=c.classes[:, 1],
            prob_a=self.probs[:, 0],
            prob_b=self.probs[:, 1],
            labels=c.labels,
            ids_only=tokenizer is None,
            output=output,
            method=self.output.drawing.get("method"),
        ).numpy()
        rounded = [[[float(f"{v:.4g}") for v in row] for row in k.tolist()] for k in kept]
        extra = [
            {"tokens": w, "output": output, "scores": r} for w, r in zip(words, rounded, strict=True)
        ]
        return panels, extra


def is_token_ids(inputs: Tensor) -> bool:
    """True for integer inputs [B, L]: token ids, drawn as text when explained at their embeddings.

    >>> import torch
    >>> is_token_ids(torch.tensor([[101, 2023, 102]])), is_token_ids(torch.rand(1, 3))
    (True, False)
    """
    return inputs.ndim == 2 and not inputs.is_floating_point() and not inputs.is_complex() and (
        inputs.dtype != torch.bool
    )


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


class AtlasJob:
    """Draw, encode and write one validation run's confusion atlas (runs on the writer thread): the matrix
    under ``matrix_tag`` (one picture) and one panel per confused pair under ``pairs_tag``, with one index
    record each (the matrix record holds the counts, so the report can show trends without the pictures).

    All tensors on the CPU. ``directions`` is None when they could not be computed: the pairs are then
    drawn without pictures of their own (only outlined in the matrix).
    """

    def __init__(
        self,
        output: PictureOutput,
        *,
        matrix_tag: str,
        pairs_tag: str,
        matrix: Tensor,
        ignored: int,
        repeated: int,
        pairs: Tensor,
        examples: PairExamples,
        pair_index: Tensor,
        probabilities: Tensor,
        directions: Tensor | None,
        step: int,
        epoch: int,
    ) -> None:
        self.output, self.matrix_tag, self.pairs_tag = output, matrix_tag, pairs_tag
        self.matrix, self.ignored, self.repeated, self.pairs = matrix, ignored, repeated, pairs
        self.examples, self.pair_index, self.probabilities = examples, pair_index, probabilities
        self.directions = directions
        self.step, self.epoch = step, epoch

    def __call__(self) -> None:
        from peering.render import confused_pair_panels, confusion_matrix_image

        out, m = self.output, self.matrix
        samples = int(m.sum())
        accuracy = float(m.diagonal().sum()) / samples if samples else 0.0
        title = f"epoch {self.epoch} · step {self.step} · {samples:,} samples · accuracy {accuracy:.1%}"
        if self.ignored:
            title += f" · {self.ignored:,} not counted"
        if self.repeated:
            title += f" · {self.repeated:,} counted twice"
        picture = confusion_matrix_image(m, highlight=self.pairs, title=title).numpy()
        files = out.write(self.matrix_tag, [picture], [encode_png(picture)], self.step)
        base = {"step": int(self.step), "stage": "validation", "epoch": int(self.epoch)}
        records: list[dict[str, Any]] = [
            {
                "tag": self.matrix_tag,
                **base,
                "index": 0,
                "matrix": m.tolist(),
                "samples": samples,
                "ignored": int(self.ignored),
                "repeated": int(self.repeated),
                "pairs": self.pairs.tolist(),
                "width": int(picture.shape[1]),
                "height": int(picture.shape[0]),
                "png": files[0] if files else None,
            }
        ]
        if len(self.pairs) and self.directions is not None:
            counts = m[self.pairs[:, 0], self.pairs[:, 1]]
            totals = m.sum(dim=1)[self.pairs[:, 0]]
            panels = confused_pair_panels(
                self.examples.inputs,
                self.pair_index,
                self.directions,
                self.pairs,
                counts=counts,
                totals=totals,
                probabilities=self.probabilities,
                zoom=int(out.drawing.get("zoom", 4)),
            ).numpy()
            files, boxes, _ = out.write_panels(self.pairs_tag, panels, self.step)
            per_pair = torch.bincount(self.pair_index, minlength=len(self.pairs)).tolist()
            for k, (a, b) in enumerate(self.pairs.tolist()):
                records.append(
                    {
                        "tag": self.pairs_tag,
                        **base,
                        "index": k,
                        "true": a,
                        "predicted": b,
                        "count": int(counts[k]),
                        "class_total": int(totals[k]),
                        "examples": int(per_pair[k]),
                        "width": int(panels.shape[2]),
                        "height": int(panels.shape[1]),
                        "png": files[k] if files else None,
                        "box": boxes[k] if boxes else None,
                    }
                )
        out.record(records)


class IndexSink(Sink):
    """The picture index as a sink, so that a failure to write it is handled like any other."""

    name = "the picture index"

    def __init__(self, index: PictureIndex) -> None:
        self.index = index
        self.logger = index  # one failure key per index file
