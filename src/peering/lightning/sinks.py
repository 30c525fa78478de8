"""Where `ConfusedLogitCallback`'s pictures go: the writers (sinks) and the background writer thread.

The callback draws one panel per sample once (`peering.render.confusion_panels`, uint8 RGB arrays) and
hands them to *sinks*: one adapter per Lightning logger that takes images, or a PNG folder when none does.
Loggers get ONE picture per check and tag, the panels stacked in it (`peering.lightning.pictures.
stack_panels`, most confused first); the PNG folder gets one file per panel. Everything
here runs on global rank zero only, normally on the callback's background writer thread.

Tags
----
- ``peering/confused``: training pictures: the panels of one check (up to ``top_k`` samples, most confused
  first), all at one step (the trainer's ``global_step``).
- ``peering/confused_fraction``: training scalar: the fraction of the checked batch (all ranks) that was
  confused.
- ``peering/val/confused``: validation pictures: the ``top_k`` most confused samples of the checked
  validation batches, written once per validation run.
- ``peering/val/confused_fraction``: validation scalar, likewise over the checked validation batches.
- ``peering/test/confused`` and ``peering/test/confused_fraction``: the same for ``trainer.test()``.
- ``peering/tracked/<i>``: with ``track=N``, sample ``i`` (0 = the most confused of the first validation
  run) re-explained at the end of every validation run: one picture per step.
- ``peering/confusion_matrix``: the confusion atlas (``atlas=True``, the default): the confusion matrix of
  each validation run, all validation samples of all ranks, one picture at the run's ``global_step``.
- ``peering/confused_pairs``: the run's most frequent mistakes (true a, predicted b), one picture each
  (most frequent first): its examples and the mean gradient of log p(b) - log p(a) over them.

TensorBoard
-----------
The pictures of one write go into ONE summary of TensorBoard's image plugin (the plugin's own format: a
string tensor ``[width, height, png_0, png_1, ...]``). The callback writes one picture per check and tag,
holding all of the check's samples, so TensorBoard's image dashboard shows ONE card per tag, and that
card's step slider is a time-lapse of training (several pictures per step would make one card per sample
index, each with its own slider, showing different steps side by side). The server keeps
``--samples_per_plugin images=K`` steps per tag (10 by default); pass a larger K to keep more. Scalars
are ordinary ``add_scalar`` values written through the logger's ``log_metrics``.

PNG folder (no logger that takes images: `CSVLogger`, ``logger=False``, or all image loggers failed)
-----------------------------------------------------------------------------------------------------
Under the run directory ``<run>`` (``trainer.log_dir``: the logger's version folder, or
``default_root_dir`` without a logger)::

    <run>/peering/confused/step_<n>_<i>.png          training picture i (0 = most confused) at step n
    <run>/peering/val/confused/step_<n>_<i>.png      validation
    <run>/peering/tracked/<k>/step_<n>_0.png         tracked sample k at step n
    <run>/peering/confusion_matrix/step_<n>_0.png    the confusion matrix of the validation run at step n
    <run>/peering/confused_pairs/step_<n>_<i>.png    its i-th most frequent mistake
    <run>/peering/scalars.csv                        "step,tag,value" rows for the two fraction scalars

i.e. ``<run>/<tag>/step_<n>_<i>.png`` for every tag. Files are written atomically (temp file, then
rename), so a reader never sees half a PNG. With a `CSVLogger` the scalars also go to its ``metrics.csv``.

Index (always, whatever the sinks)
----------------------------------
``<run>/peering/index.jsonl``: one JSON object per picture, in writing order: ``tag``, ``step``,
``index`` (i), ``stage`` ("train" / "validation" / "tracked"), ``epoch``, ``label`` (-1 unknown),
``class_a``, ``class_b`` (the model's top two), ``prob_a``, ``prob_b``, ``margin``, ``width``, ``height``
(of the sample's panel), ``png`` (its PNG file relative to ``<run>``, or null when it went only to
loggers) and ``box`` (``[x, y, width, height]`` of the panel in the loggers' picture of that step and tag,
or null when no logger took it): the report cuts the samples back out with it.

Experiment trackers
-------------------
W&B (`WandbLogger`): one ``log_image`` per write, all its pictures in one history row (x-axis
``trainer/global_step``). MLflow (`MLFlowLogger`): one image per picture under ``key=tag`` at ``step``.
Comet (`CometLogger`): one image per picture named ``<tag>/step_<n>_<i>`` at ``step``. Neptune: the
series ``<tag>`` (``<tag>/<i>`` when one write holds several pictures). Scalars go through each logger's
``log_metrics``. All four are tested offline with the real libraries, reading back what they stored
(tests/test_trackers.py).

The confusion atlas's records have ``tag``, ``step``, ``index``, ``stage`` ("validation"), ``epoch``,
``width``, ``height`` and ``png`` too, and instead of the sample fields: for ``peering/confusion_matrix``
``matrix`` (the counts, a list of C rows: true class by predicted class), ``samples`` (counted),
``ignored`` (not counted: no label, or non-finite scores) and ``pairs`` (the [true, predicted] pairs
drawn); for ``peering/confused_pairs`` ``true``, ``predicted``, ``count``, ``class_total`` (the samples
of the true class) and ``examples`` (how many are drawn).

Run summary (always, whatever the sinks)
----------------------------------------
``<run>/peering/callback.json``, written by global rank zero when a ``fit``/``validate``/``test`` ends:
``settings`` (the callback's thresholds and options) and, per stage (``train``, ``validation``,
``test``), ``watched``, ``checks``, ``samples`` checked, ``candidates`` (top logit >= ``min_logit_value``),
``confused``, ``max_top_logit``, ``min_gap`` (the closest top two of any candidate), ``chosen``,
``pictures`` (written) and ``why_no_pictures`` (a sentence, or null when there are pictures).

Reading back
------------
`peering.runs` reads all of this back (`read_images`, `read_scalars`, `read_index`, `read_summary`,
`image_tags`, `no_pictures_reason`; re-exported here), from TensorBoard event files when they hold the tag
and from the PNG folder otherwise; the file names and tags are defined once in `peering.runs.names`. A
run without pictures gives empty results; `no_pictures_reason` says why it has none.
"""

from __future__ import annotations

import functools
import io
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image

from peering._files import atomic_write
from peering.runs.events import append_scalar, image_tags, png_file, read_images, read_scalars
from peering.runs.records import (
    PictureIndex,
    no_pictures_reason,
    read_index,
    read_summary,
    write_summary,
)

__all__ = [
    "BackgroundWriter",
    "CometSink",
    "MLflowSink",
    "NeptuneSink",
    "PNGFolderSink",
    "PictureIndex",
    "Sink",
    "TensorBoardSink",
    "WandbSink",
    "encode_png",
    "image_sinks",
    "image_tags",
    "no_pictures_reason",
    "read_images",
    "read_index",
    "read_scalars",
    "read_summary",
    "run_folder",
    "write_summary",
]


def run_folder(trainer: Any) -> str:
    """The run's folder: ``trainer.log_dir`` (a broadcast: every rank must ask), or the Trainer's
    ``default_root_dir`` when its logger has no usable directory.

    >>> import lightning.pytorch as pl
    >>> run_folder(pl.Trainer(logger=False, default_root_dir="runs/x", enable_progress_bar=False))
    'runs/x'
    """
    try:
        run_dir = trainer.log_dir
    except Exception:  # a logger without a usable directory
        run_dir = None
    return str(run_dir if run_dir is not None else trainer.default_root_dir)



def _write_bytes(f: IO[bytes], data: bytes) -> None:
    f.write(data)


def encode_png(image: np.ndarray, compress_level: int = 1) -> bytes:
    """PNG bytes of a uint8 image [H, W, 3] (or [H, W]).

    Level 1 compression: these pictures are small and flat, so it is nearly as small as the default level
    and several times faster.

    >>> import numpy as np
    >>> encode_png(np.zeros((4, 6, 3), dtype=np.uint8))[:4]
    b'\\x89PNG'
    """
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------- sinks


class Sink:
    """A destination for pictures (and, for the PNG folder, scalars).

    Subclasses implement `log_images`; ``name`` says what it writes to in warnings. A sink may raise: the
    callback then warns once, stops using it and goes on training.

    >>> class Collect(Sink):
    ...     name = "list"
    ...     def __init__(self): self.got = []
    ...     def log_images(self, tag, images, pngs, step): self.got.append((tag, step, len(pngs)))
    >>> sink = Collect()
    >>> sink.log_images("peering/confused", [], [], 3)
    >>> sink.got
    [('peering/confused', 3, 0)]
    """

    name: str = "sink"
    #: the logger this sink writes through, if any (its scalars then go through ``log_metrics``)
    logger: Any = None

    def log_images(
        self, tag: str, images: Sequence[np.ndarray], pngs: Sequence[bytes], step: int
    ) -> list[str] | None:
        """Log pictures (uint8 [H, W, 3] arrays and their PNG encodings) under ``tag`` at ``step``.

        Returns the files written (relative to the run directory) when the sink writes files, else None.
        """
        raise NotImplementedError

    def log_scalar(self, tag: str, value: float, step: int) -> None:  # noqa: B027 - optional hook
        """Log a scalar where the sink keeps its own scalars (only the PNG folder does)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


def _image_summary(tag: str, pngs: Sequence[bytes], width: int, height: int) -> Any:
    """A TensorBoard image-plugin summary holding several PNGs at one step (the plugin's tensor format)."""
    from tensorboard.compat.proto import summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
    from tensorboard.plugins.image import metadata

    tensor = tensor_pb2.TensorProto(
        dtype=types_pb2.DT_STRING,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=len(pngs) + 2)]
        ),
        string_val=[str(width).encode(), str(height).encode(), *pngs],
    )
    meta = metadata.create_summary_metadata(display_name=tag, description="")
    return summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, metadata=meta, tensor=tensor)])


class TensorBoardSink(Sink):
    """Pictures into a TensorBoard event file: one image-plugin summary with N samples per write.

    Args:
        writer: a ``torch.utils.tensorboard.SummaryWriter`` (``TensorBoardLogger.experiment``), or a
            zero-argument callable returning one (so the logger's writer is looked up only when needed).

    Writers without ``_get_file_writer`` (tensorboardX) get one ``add_image`` per sample, under
    ``<tag>/<i>``.

    >>> import tempfile
    >>> from torch.utils.tensorboard import SummaryWriter
    >>> import numpy as np
    >>> logdir = tempfile.mkdtemp()
    >>> writer = SummaryWriter(logdir)
    >>> pictures = [np.zeros((8, 12, 3), dtype=np.uint8)] * 2
    >>> TensorBoardSink(writer).log_images("peering/confused", pictures, [encode_png(p) for p in pictures], 5)
    >>> writer.close()
    >>> [(step, len(pngs)) for step, pngs in read_images(logdir, "peering/confused")]
    [(5, 2)]
    """

    name = "TensorBoard"

    def __init__(self, writer: Any, logger: Any = None) -> None:
        self._writer = writer
        self.logger = logger

    @classmethod
    def from_logger(cls, logger: Any) -> TensorBoardSink:
        """The sink of a Lightning `TensorBoardLogger` (its ``experiment`` is fetched at first use)."""
        return cls(lambda: logger.experiment, logger=logger)

    def log_images(self, tag: str, images: Sequence[np.ndarray], pngs: Sequence[bytes], step: int) -> None:
        if not pngs:
            return
        writer = self._writer() if callable(self._writer) else self._writer
        height, width = images[0].shape[:2]
        if hasattr(writer, "_get_file_writer"):
            writer._get_file_writer().add_summary(_image_summary(tag, pngs, width, height), int(step))
        else:  # pragma: no cover - tensorboardX
            for i, image in enumerate(images):
                writer.add_image(f"{tag}/{i}", image, int(step), dataformats="HWC")


class WandbSink(Sink):
    """Pictures through a logger with W&B's ``log_image(key, images, step)`` (`WandbLogger` and look-alikes).

    >>> import numpy as np
    >>> class FakeWandb:
    ...     def log_image(self, key, images, step=None): print(key, len(images), step)
    >>> WandbSink(FakeWandb()).log_images("peering/confused", [np.zeros((2, 2, 3), np.uint8)], [b""], 7)
    peering/confused 1 7
    """

    name = "W&B"

    def __init__(self, logger: Any) -> None:
        self.logger = logger
        self.name = type(logger).__name__

    def log_images(self, tag: str, images: Sequence[np.ndarray], pngs: Sequence[bytes], step: int) -> None:
        if images:
            self.logger.log_image(key=tag, images=list(images), step=int(step))


class MLflowSink(Sink):
    """Pictures through `MLFlowLogger`: ``experiment.log_image(run_id, image, key=..., step=...)``.

    The samples of one write get increasing timestamps, so their order can be read back (MLflow names
    each image file ``<key>+step+<n>+timestamp+<ms>+<uuid>.png``, ``/`` in the key as ``~``). MLflow
    < 2.12 (no ``key``/``step``) gets artifact files ``<tag>/step_<n>_<i>.png`` instead.

    >>> import numpy as np
    >>> class Client:
    ...     def log_image(self, run_id, image, key=None, step=None, timestamp=None): print(run_id, key, step)
    >>> class FakeMlflow:
    ...     experiment, run_id = Client(), "r1"
    >>> MLflowSink(FakeMlflow()).log_images("peering/confused", [np.zeros((2, 3, 3), np.uint8)], [b""], 4)
    r1 peering/confused 4
    """

    name = "MLflow"

    def __init__(self, logger: Any) -> None:
        self.logger = logger

    def log_images(self, tag: str, images: Sequence[np.ndarray], pngs: Sequence[bytes], step: int) -> None:
        client, run_id = self.logger.experiment, self.logger.run_id
        now = int(time.time() * 1000)
        for i, image in enumerate(images):
            try:
                client.log_image(run_id, image, key=tag, step=int(step), timestamp=now + i)
            except TypeError:  # MLflow before 2.12: artifact files only
                client.log_image(run_id, image, artifact_file=f"{tag}/step_{int(step)}_{i}.png")


class CometSink(Sink):
    """Pictures through `CometLogger`: ``experiment.log_image(image, name=..., step=...)``.

    Each picture goes as a PIL image: comet_ml stretches a numpy array's values to 0-255 (a low-contrast
    picture comes out altered) and fails on a constant one; a PIL image is stored as it is.

    >>> import numpy as np
    >>> class Experiment:
    ...     def log_image(self, image, name=None, step=None): print(name, step, image.size)
    >>> class FakeComet:
    ...     experiment = Experiment()
    >>> CometSink(FakeComet()).log_images("peering/confused", [np.zeros((2, 2, 3), np.uint8)], [b""], 9)
    peering/confused/step_9_0 9 (2, 2)
    """

    name = "Comet"

    def __init__(self, logger: Any) -> None:
        self.logger = logger

    def log_images(self, tag: str, images: Sequence[np.ndarray], pngs: Sequence[bytes], step: int) -> None:
        experiment = self.logger.experiment
        for i, image in enumerate(images):
            picture = Image.fromarray(np.ascontiguousarray(image))
            experiment.log_image(picture, name=f"{tag}/step_{int(step)}_{i}", step=int(step))


class NeptuneSink(Sink):
    """Pictures through a Neptune logger: ``experiment[tag].append(File.as_image(picture), step=...)``.
    A Neptune series needs strictly increasing steps, so when one write holds several pictures each goes to
    its own series ``<tag>/<i>`` (the callback writes one picture per check and tag). Needs the ``neptune``
    package. Lightning 2.6 has no working Neptune logger (its ``NeptuneLogger`` only raises), so this
    serves earlier Lightning versions' logger, or any logger whose ``experiment`` is a ``neptune`` run.

    >>> import numpy as np, sys, types
    >>> from unittest import mock
    >>> fake = types.ModuleType("neptune.types")
    >>> fake.File = types.SimpleNamespace(as_image=lambda image: image.size)
    >>> class Series:
    ...     def __init__(self, name): self.name = name
    ...     def append(self, value, step=None): print(self.name, value, step)
    >>> class Run(dict):
    ...     def __missing__(self, key): return Series(key)
    >>> class FakeNeptune:
    ...     experiment = Run()
    >>> with mock.patch.dict(sys.modules, {"neptune.types": fake}):
    ...     sink = NeptuneSink(FakeNeptune())
    ...     sink.log_images("peering/confused", [np.zeros((2, 5, 3), np.uint8)], [b""], 1)
    ...     sink.log_images("peering/odd", [np.zeros((2, 5, 3), np.uint8)] * 2, [b"", b""], 1)
    peering/confused (5, 2) 1
    peering/odd/0 (5, 2) 1
    peering/odd/1 (5, 2) 1
    """

    name = "Neptune"

    def __init__(self, logger: Any) -> None:
        self.logger = logger

    def log_images(self, tag: str, images: Sequence[np.ndarray], pngs: Sequence[bytes], step: int) -> None:
        from neptune.types import File

        run = self.logger.experiment
        for i, image in enumerate(images):
            picture = Image.fromarray(np.ascontiguousarray(image))
            series = tag if len(images) == 1 else f"{tag}/{i}"
            run[series].append(File.as_image(picture), step=int(step))


class PNGFolderSink(Sink):
    """Pictures as PNG files ``<root>/<tag>/step_<n>_<i>.png`` and scalars in ``<root>/peering/scalars.csv``.

    >>> import tempfile, numpy as np
    >>> root = tempfile.mkdtemp()
    >>> picture = np.zeros((3, 4, 3), np.uint8)
    >>> PNGFolderSink(root).log_images("peering/confused", [picture], [encode_png(picture)], 12)
    ['peering/confused/step_12_0.png']
    """

    name = "PNG folder"

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.name = f"PNG folder {self.root / 'peering'}"

    def log_images(
        self, tag: str, images: Sequence[np.ndarray], pngs: Sequence[bytes], step: int
    ) -> list[str]:
        written = []
        for i, png in enumerate(pngs):
            relative = png_file(tag, step, i)
            atomic_write(self.root / relative, functools.partial(_write_bytes, data=png))
            written.append(relative.as_posix())
        return written

    def log_scalar(self, tag: str, value: float, step: int) -> None:
        append_scalar(self.root, tag, value, step)


def image_sinks(loggers: Iterable[Any]) -> list[Sink]:
    """One sink per logger that takes images: TensorBoard, W&B (or any ``log_image(key, images, step)``),
    MLflow, Comet, Neptune. Loggers without an image API (CSV, ...) get none.

    >>> import tempfile
    >>> from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    >>> d = tempfile.mkdtemp()
    >>> image_sinks([TensorBoardLogger(d), CSVLogger(d)])
    [TensorBoardSink(TensorBoard)]
    """
    from lightning.pytorch.loggers import CometLogger, MLFlowLogger, TensorBoardLogger

    sinks: list[Sink] = []
    for logger in loggers:
        names = {cls.__name__ for cls in type(logger).__mro__}
        if isinstance(logger, TensorBoardLogger):
            sinks.append(TensorBoardSink.from_logger(logger))
        elif isinstance(logger, MLFlowLogger):
            sinks.append(MLflowSink(logger))
        elif isinstance(logger, CometLogger):
            sinks.append(CometSink(logger))
        elif "NeptuneLogger" in names and _neptune_available():
            sinks.append(NeptuneSink(logger))
        elif callable(getattr(logger, "log_image", None)):  # WandbLogger and anything shaped like it
            sinks.append(WandbSink(logger))
    return sinks


def _neptune_available() -> bool:
    try:
        import neptune.types  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------------------- the writer


class BackgroundWriter:
    """Runs picture-writing jobs in order on one daemon thread, off the training thread.

    ``submit`` blocks only when ``max_pending`` jobs are already waiting (back-pressure, bounded memory).
    A job that raises is recorded (see `pop_errors`) and the thread goes on. `flush` waits for every job
    submitted so far; `close` flushes and ends the thread. With ``threaded=False`` jobs run at once, in
    the caller's thread.

    >>> writer = BackgroundWriter()
    >>> out = []
    >>> writer.submit(lambda: out.append(1))
    >>> writer.submit(lambda: 1 / 0)
    >>> writer.close()
    >>> out, [type(e).__name__ for e in writer.pop_errors()]
    ([1], ['ZeroDivisionError'])
    """

    def __init__(self, max_pending: int = 16, threaded: bool = True) -> None:
        self._threaded = threaded
        self._queue: queue.Queue[Callable[[], Any] | None] = queue.Queue(maxsize=max_pending)
        self._errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                self._call(job)
            finally:
                self._queue.task_done()

    def _call(self, job: Callable[[], Any]) -> None:
        try:
            job()
        except Exception as err:  # recorded for the training thread to report
            with self._lock:
                self._errors.append(err)

    def submit(self, job: Callable[[], Any]) -> None:
        """Queue ``job`` (a zero-argument callable)."""
        if not self._threaded:
            self._call(job)
            return
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="peering-writer", daemon=True)
            self._thread.start()
        self._queue.put(job)

    def flush(self) -> None:
        """Wait until every job submitted so far has run."""
        if self._thread is not None and self._thread.is_alive():
            self._queue.join()

    def close(self, timeout: float | None = 60.0) -> None:
        """Run what is queued, then stop the thread."""
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)
        self._thread = None

    def pop_errors(self) -> list[BaseException]:
        """The errors raised by jobs since the last call."""
        with self._lock:
            errors, self._errors = self._errors, []
        return errors
