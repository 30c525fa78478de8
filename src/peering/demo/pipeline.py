"""The demo pipeline behind `peering demo`: train, watch what confuses the model, morph digits, report.

`run_demo` trains the demo CNN (`peering.models.DigitClassifier`) with `ConfusedLogitCallback` on
scikit-learn's bundled 8x8 digits (offline) or on MNIST, and writes one run folder::

    <out>/<name>/
        logs/            TensorBoard event files (+ logs/peering/index.jsonl, the callback's picture index)
        model.ckpt       the trained model (a Lightning checkpoint; `peering explain` / `morph` read it)
        morph/           film strips (PNG) and animations (GIF) of test digits morphed into other classes
        portraits.png    one class portrait per class, side by side
        sanity/          the randomisation sanity check: its curve per method and example maps (PNG)
        run.json         what was run and measured (the report reads it)
        report.html      the static report (`peering.report.build_report`)

Every file is written under a temporary name and renamed into place, and the files of an earlier run of
the same name are removed first, so an interrupted run never leaves a half-written file, or an old
report, that looks like a finished run.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from peering._files import atomic_path
from peering._validate import int_at_least, optional
from peering.demo.data import DEFAULT_EPOCHS, load_demo_data, mnist_folder
from peering.demo.faults import PATCH_CLASS, Faults, found, plant_faults
from peering.demo.interrupt import StopRequest, graceful_interrupt, stop_callback
from peering.demo.morphs import halves, judge, morph_digits
from peering.demo.sanity import sanity_check
from peering.demo.tensorboard import tensorboard_command
from peering.errors import PeeringValueError
from peering.runs import names, write_run_json

__all__ = ["DemoResult", "run_demo"]

log = logging.getLogger(__name__)

Dataset = Literal["digits", "mnist"]

CALLBACK_SETTINGS: dict[str, Any] = {
    "top_k": 4,
    "projection_factor": 0.15,  # logit gradients here reach 4-6 per pixel: keep x + f * g readable
    "logging_batch_interval": 5,
    "max_logit_difference": 1.0,
    "min_logit_value": None,
    "max_pictures_per_epoch": 16,
    "atlas": True,  # the confusion matrix of every validation run, and its most frequent mistakes
    "pairs": 3,
    "examples_per_pair": 4,
}
"""The demo's `ConfusedLogitCallback` settings (``track`` and ``zoom`` come from the run)."""
FAULT_EPOCHS = 3
"""Epochs of ``faults=True`` when none are given: the alarm comes within 3 (`peering.demo.faults`)."""


@dataclass(frozen=True)
class DemoResult:
    """What `run_demo` wrote and measured.

    Attributes:
        run_dir: the run folder. report, checkpoint, log_dir: paths inside it.
        tensorboard_command: the exact command that shows the run in TensorBoard.
        test_accuracy: accuracy on the held-out digits.
        morphs: one dict per film strip (label, target, kind, success, step, distance, files).
        judges: what the two judges said about the morphs and the portraits (run.json's "judges").
        sanity: the sanity check's numbers and verdicts (`peering.sanity.SanityResult.to_dict`) and its
            pictures, or None when it was not run.
        seconds: wall time of the whole run.
    """

    run_dir: Path
    report: Path
    checkpoint: Path
    log_dir: Path
    tensorboard_command: str
    test_accuracy: float
    morphs: list[dict[str, Any]] = field(default_factory=list)
    judges: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    sanity: dict[str, Any] | None = None


@dataclass(frozen=True)
class _Settings:
    """`run_demo`'s arguments, checked."""

    dataset: str
    data_dir: str | os.PathLike[str] | None
    epochs: int
    seed: int
    track: int
    morph_digits: int
    morph_steps: int
    sanity_digits: int
    progress: bool
    faults: bool = False


@dataclass(frozen=True)
class _Data:
    """The demo's split and its description."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    described: str


def run_demo(
    out: str | os.PathLike[str] = "runs",
    name: str = "demo",
    *,
    dataset: Dataset = "digits",
    data_dir: str | os.PathLike[str] | None = None,
    epochs: int | None = None,
    seed: int = 0,
    track: int = 4,
    morph_digits: int = 4,
    morph_steps: int = 100,
    sanity_digits: int = 32,
    progress: bool = True,
    threads: int | None = 1,
    echo: Callable[[str], None] | None = None,
    faults: bool = False,
) -> DemoResult:
    """Train the demo CNN with `ConfusedLogitCallback`, morph a few test digits and write a report.

    Args:
        out, name: the run goes to ``<out>/<name>/`` (files of an earlier run there are replaced).
        dataset: "digits" (scikit-learn's 1,797 8x8 digits, no download) or "mnist" (8,000 of the t10k
            digits to train on, 2,000 to test; from ``data_dir``, else ``$PEERING_DATA_DIR``, else
            downloaded with checksums to ``~/.cache/peering/mnist``).
        epochs: training epochs (default `DEFAULT_EPOCHS`: 10 for digits, 2 for MNIST).
        seed: seeds the split, the initialisation and the shuffling.
        track: how many of the most confused validation digits to follow through training.
        morph_digits: how many test digits to morph, each to (label + 1) mod 10 and to its runner-up, with
            `morph`'s defaults and the training digits as its data prior (`peering.priors.Prototypes`).
        morph_steps: the most morph steps.
        sanity_digits: how many test digits the randomisation sanity check (`peering.sanity`) explains
            with each of the four methods; 0 skips it.
        progress: show Lightning's progress bar while training and a bar while morphing.
        threads: torch's intra-op threads for the run (restored after); None leaves them as they are.
            One is the default because this model is small: on a machine whose cores are busy, more
            threads than free cores made training 10x slower (measured: 130 s instead of 13 s).
        echo: called with one line of text per stage (e.g. ``print``); None logs at INFO level.
        faults: plant 10% flipped labels and a white patch on every training 3 (MNIST only, see
            `peering.demo.faults`) and train with `LabelIssues` and `ShortcutAlarm` too, which find them
            (``run.json``'s ``faults``; the report's "Labels to check" and "Shortcut alarms"). Default
            epochs then 3.

    Returns:
        A `DemoResult`.

    Raises:
        ValueError: bad arguments. `peering.data.DatasetError`: MNIST cannot be found or downloaded.
        KeyboardInterrupt: interrupted; no report is written and no file poses as complete.

    >>> import tempfile
    >>> result = run_demo(tempfile.mkdtemp(), "doc", epochs=1, track=1, morph_digits=1, morph_steps=5,
    ...                   sanity_digits=4, progress=False)
    >>> result.report.name, result.checkpoint.name
    ('report.html', 'model.ckpt')
    >>> result.sanity["layers"]  # the sanity check re-initialised these, output side first
    ['fc2', 'fc1', 'conv2', 'conv1']
    >>> sorted(p.suffix for p in (result.run_dir / "morph").iterdir())  # (label + 1) and runner-up
    ['.gif', '.gif', '.png', '.png']
    """
    started = time.perf_counter()
    say = echo or log.info
    if dataset not in DEFAULT_EPOCHS:
        raise PeeringValueError(f"dataset must be 'digits' or 'mnist', got {dataset!r}")
    epochs = (FAULT_EPOCHS if faults else DEFAULT_EPOCHS[dataset]) if epochs is None else epochs
    int_at_least("epochs", epochs, 1)
    if not name or name in (".", "..") or "/" in name or os.sep in name:
        raise PeeringValueError(f"name must be a plain folder name (no '/'), got {name!r}")
    counts = (("track", track), ("morph_digits", morph_digits), ("morph_steps", morph_steps),
              ("sanity_digits", sanity_digits))
    for label, value in counts:
        int_at_least(label, value, 0)
    optional(int_at_least, "threads", threads, 1)
    settings = _Settings(dataset, data_dir, epochs, seed, track, morph_digits, morph_steps, sanity_digits,
                         progress, bool(faults))
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with graceful_interrupt() as stop:
            return _run(settings, Path(out) / name, say, started, stop)
    finally:
        torch.set_num_threads(previous_threads)


def _run(
    s: _Settings, run_dir: Path, say: Callable[[str], None], started: float, stop: StopRequest
) -> DemoResult:
    """Train, morph, judge, check, then write run.json and the report."""
    from peering.models import accuracy
    from peering.morph.priors import Prototypes
    from peering.report import build_report

    data = _Data(*load_demo_data(s.dataset, s.data_dir, s.seed, say))
    planted = None
    if s.faults:
        planted = plant_faults(data.train_x, data.train_y, data.test_x, data.test_y, s.seed)
        say(f"Planted faults: {int(planted.flipped.sum()):,} training labels flipped, a white patch on every "
            f"training {PATCH_CLASS}")
        data = _Data(planted.train_x, planted.train_y, data.test_x, data.test_y,
                     data.described + ", 10% of the labels flipped, the 3s patched")
    zoom = max(1, -(-64 // int(data.train_x.shape[-1])))  # tiles ~64 px wide: three side by side
    _clear_previous(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model, checkpoint, watchers = _train(s, data, run_dir, zoom, say, stop, planted)
    caught = found(planted, *watchers) if planted is not None and watchers else None
    if caught is not None:
        say(f"LabelIssues: {caught['precision_at_flips']:.0%} of the {int(planted.flipped.sum()):,} most "  # type: ignore[union-attr]
            f"suspect samples are flipped labels; ShortcutAlarm: "
            + ("; ".join(a["sentence"] for a in caught["alarms"][:2]) or "no alarm"))
    test_accuracy = accuracy(model, data.test_x, data.test_y)
    say(f"Test accuracy: {test_accuracy:.2%} on {len(data.test_x):,} held-out digits")
    stop.check()
    prior = Prototypes(data.train_x, data.train_y)  # the data prior: the digits the model was trained on
    # the held-out digits, halved: the judges learn from one half, the morphs come from the other
    judge_rows, morph_rows = halves(len(data.test_x), s.seed)
    morphs = morph_digits(model, data.test_x, data.test_y, morph_rows, prior, run_dir, s.morph_digits,
                          s.morph_steps, zoom, s.progress, say)
    stop.check()
    judges = judge(model, prior, data.train_x, data.test_x, data.test_y, judge_rows, morph_rows, s.dataset,
                   s.seed, s.morph_steps, run_dir, zoom, say, stop)
    stop.check()
    sanity = sanity_check(model, data.test_x[: s.sanity_digits], run_dir, s.seed, zoom, say)
    stop.check()  # after this, the last second of writing run.json and the report goes on to the end
    log_dir = run_dir / names.LOG_DIR
    summary = _summary(s, data, log_dir, test_accuracy, started, zoom)
    if planted is not None:
        summary["faults"] = {**planted.record(), **(caught or {})}
    write_run_json(run_dir, {**summary, "morphs": morphs, "judges": judges, "sanity": sanity})
    report = build_report(run_dir)
    return DemoResult(
        run_dir=run_dir,
        report=report,
        checkpoint=checkpoint,
        log_dir=log_dir,
        tensorboard_command=tensorboard_command(log_dir),
        test_accuracy=test_accuracy,
        morphs=morphs,
        judges=judges,
        seconds=time.perf_counter() - started,
        sanity=sanity,
    )


def _train(
    s: _Settings, data: _Data, run_dir: Path, zoom: int, say: Callable[[str], None], stop: StopRequest,
    planted: Faults | None = None,
) -> tuple[torch.nn.Module, Path, tuple[Any, ...]]:
    """Train the demo CNN with the callback (and, with planted faults, `LabelIssues` and `ShortcutAlarm`),
    logging to TensorBoard; the model, its checkpoint and the two watchers (empty without faults)."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.data import DataLoader, TensorDataset

    from peering.lightning import ConfusedLogitCallback, LabelIssues, ShortcutAlarm, quiet_lightning
    from peering.models import DigitClassifier

    plural = "s" if s.epochs != 1 else ""
    say(f"Training the demo CNN on {data.described} for {s.epochs} epoch{plural} (seed {s.seed})")
    generator = torch.Generator().manual_seed(s.seed)
    indices = torch.arange(len(data.train_y))  # (image, label, index) batches: LabelIssues needs the index
    train_loader = DataLoader(
        TensorDataset(data.train_x, data.train_y, indices), batch_size=32, shuffle=True, generator=generator
    )
    val_loader = DataLoader(TensorDataset(data.test_x, data.test_y), batch_size=256)
    callback = ConfusedLogitCallback(**CALLBACK_SETTINGS, track=s.track, zoom=zoom)
    watchers: tuple[Any, ...] = ()
    if planted is not None:
        watchers = (LabelIssues(top_k=8, zoom=zoom), ShortcutAlarm(planted.probe, zoom=zoom))
    with quiet_lightning():
        pl.seed_everything(s.seed, workers=True, verbose=False)
        module = DigitClassifier(image_size=int(data.train_x.shape[-1]), lr=2e-3)
        trainer = pl.Trainer(
            max_epochs=s.epochs,
            accelerator="cpu",
            devices=1,
            logger=TensorBoardLogger(str(run_dir), name=names.LOG_DIR, version="", default_hp_metric=False),
            callbacks=[callback, *watchers, stop_callback(stop)],
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=s.progress,
            log_every_n_steps=10,
            deterministic=True,
            default_root_dir=str(run_dir),
        )
        _fit(trainer, module, train_loader, val_loader)
        stop.check()
        checkpoint = run_dir / names.CHECKPOINT_FILE
        with atomic_path(checkpoint) as tmp:
            trainer.save_checkpoint(str(tmp))
    return module.model.eval(), checkpoint, watchers


def _fit(trainer: Any, module: Any, train_loader: Any, val_loader: Any) -> None:
    """``trainer.fit``, with Ctrl+C raised as KeyboardInterrupt (Lightning turns it into ``sys.exit(1)``
    after ignoring further SIGINTs: undo both)."""
    try:
        trainer.fit(module, train_loader, val_loader)
    except SystemExit:
        if trainer.interrupted:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt from None
        raise
    if trainer.interrupted:
        raise KeyboardInterrupt


def _summary(
    s: _Settings, data: _Data, log_dir: Path, test_accuracy: float, started: float, zoom: int
) -> dict[str, Any]:
    """run.json's record of what was run (the morphs, judges and sanity check are added to it)."""
    summary: dict[str, Any] = {
        "format": 1,
        "complete": True,
        "title": f"peering demo: {data.described}",
        "dataset": s.dataset,
        "described": data.described,
        "train_size": len(data.train_x),
        "test_size": len(data.test_x),
        "image_size": int(data.train_x.shape[-1]),
        "epochs": s.epochs,
        "seed": s.seed,
        "test_accuracy": test_accuracy,
        "seconds": round(time.perf_counter() - started, 2),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "checkpoint": names.CHECKPOINT_FILE,
        "log_dir": names.LOG_DIR,
        "tensorboard": tensorboard_command(log_dir, relative=False),
        "callback": {**CALLBACK_SETTINGS, "track": s.track, "zoom": zoom},
    }
    if s.dataset == "mnist":
        folder = s.data_dir if s.data_dir is not None else mnist_folder(None)
        summary["data_dir"] = str(Path(folder).resolve())
    return summary


def _clear_previous(run_dir: Path) -> None:
    """Remove what an earlier run of the same name wrote (only the demo's own files and folders)."""
    for file in (names.REPORT_FILE, names.RUN_FILE, names.CHECKPOINT_FILE, names.PORTRAITS_FILE):
        (run_dir / file).unlink(missing_ok=True)
    for folder in (names.LOG_DIR, names.MORPH_DIR, names.SANITY_DIR):
        if (run_dir / folder).is_dir():
            shutil.rmtree(run_dir / folder)
