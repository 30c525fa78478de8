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

import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import IO, Any, Literal

import torch
from torch import Tensor

from peering._files import atomic_path, atomic_write

__all__ = [
    "DEFAULT_EPOCHS",
    "DemoResult",
    "load_demo_data",
    "morph_view",
    "run_demo",
    "tensorboard_command",
    "training_data",
    "write_json_atomic",
]

log = logging.getLogger(__name__)

Dataset = Literal["digits", "mnist"]

DEFAULT_EPOCHS: dict[str, int] = {"digits": 10, "mnist": 2}
"""Epochs when none are given: about 3 s of training on 2 CPU cores for digits, 25 s for MNIST."""

RUN_FILE = "run.json"
REPORT_FILE = "report.html"
CHECKPOINT_FILE = "model.ckpt"
PORTRAITS_FILE = "portraits.png"
LOG_DIR = "logs"
MORPH_DIR = "morph"
SANITY_DIR = "sanity"

# the order in which test digits are picked for morphing: the 5 first (a 5 made into an 8 is the classic)
_MORPH_LABELS = (5, 3, 7, 4, 2, 9, 8, 6, 0, 1)


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
        raise ValueError(f"dataset must be 'digits' or 'mnist', got {dataset!r}")
    epochs = DEFAULT_EPOCHS[dataset] if epochs is None else epochs
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    if not name or name in (".", "..") or "/" in name or os.sep in name:
        raise ValueError(f"name must be a plain folder name (no '/'), got {name!r}")
    counts = (("track", track), ("morph_digits", morph_digits), ("morph_steps", morph_steps),
              ("sanity_digits", sanity_digits))
    for label, value in counts:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{label} must be an int >= 0, got {value!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with _graceful_interrupt() as stop:
            return _run(
                Path(out) / name,
                dataset,
                data_dir,
                epochs,
                seed,
                track,
                morph_digits,
                morph_steps,
                sanity_digits,
                progress,
                say,
                started,
                stop,
            )
    finally:
        torch.set_num_threads(previous_threads)


def _run(
    run_dir: Path,
    dataset: str,
    data_dir: str | os.PathLike[str] | None,
    epochs: int,
    seed: int,
    track: int,
    morph_digits: int,
    morph_steps: int,
    sanity_digits: int,
    progress: bool,
    say: Callable[[str], None],
    started: float,
    stop: _StopRequest,
) -> DemoResult:

    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.data import DataLoader, TensorDataset

    from peering.lightning import ConfusedLogitCallback
    from peering.models import DigitClassifier, accuracy

    train_x, train_y, test_x, test_y, described = load_demo_data(dataset, data_dir, seed, say)
    size = int(train_x.shape[-1])
    zoom = max(1, -(-64 // size))  # tiles about 64 px wide: three pictures side by side in the report

    _clear_previous(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    log_dir = run_dir / LOG_DIR

    say(f"Training the demo CNN on {described} for {epochs} epoch{'s' if epochs != 1 else ''} (seed {seed})")
    generator = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(
        TensorDataset(train_x, train_y), batch_size=32, shuffle=True, generator=generator
    )
    val_loader = DataLoader(TensorDataset(test_x, test_y), batch_size=256)
    callback_settings: dict[str, Any] = {
        "top_k": 4,
        "projection_factor": 0.15,  # logit gradients here reach 4-6 per pixel: keep x + f * g readable
        "logging_batch_interval": 5,
        "max_logit_difference": 1.0,
        "min_logit_value": None,
        "max_pictures_per_epoch": 16,
        "track": track,
        "atlas": True,  # the confusion matrix of every validation run, and its most frequent mistakes
        "pairs": 3,
        "examples_per_pair": 4,
        "zoom": zoom,
    }
    callback = ConfusedLogitCallback(**callback_settings)
    with _quiet_lightning():
        pl.seed_everything(seed, workers=True, verbose=False)
        module = DigitClassifier(image_size=size, lr=2e-3)
        trainer = pl.Trainer(
            max_epochs=epochs,
            accelerator="cpu",
            devices=1,
            logger=TensorBoardLogger(str(run_dir), name=LOG_DIR, version="", default_hp_metric=False),
            callbacks=[callback, _stop_callback(stop)],
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=progress,
            log_every_n_steps=10,
            deterministic=True,
            default_root_dir=str(run_dir),
        )
        try:
            trainer.fit(module, train_loader, val_loader)
        except SystemExit:
            # Lightning turns Ctrl+C into sys.exit(1) after ignoring further SIGINTs: undo both
            if trainer.interrupted:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt from None
            raise
        if trainer.interrupted:
            raise KeyboardInterrupt
        stop.check()
        checkpoint = run_dir / CHECKPOINT_FILE
        with atomic_path(checkpoint) as tmp:
            trainer.save_checkpoint(str(tmp))
    model = module.model.eval()
    test_accuracy = accuracy(model, test_x, test_y)
    say(f"Test accuracy: {test_accuracy:.2%} on {len(test_x):,} held-out digits")

    stop.check()
    from peering.priors import Prototypes

    prior = Prototypes(train_x, train_y)  # the data prior: the digits the model was trained on
    # the held-out digits, halved: the judges learn from one half, the morphs come from the other
    judge_rows, morph_rows = _halves(len(test_x), seed)
    morphs = _morph_digits(
        model, test_x, test_y, morph_rows, prior, run_dir, morph_digits, morph_steps, zoom, progress, say
    )
    stop.check()
    judges = _judge(model, prior, train_x, test_x, test_y, judge_rows, morph_rows, dataset, seed, morph_steps,
                    run_dir, zoom, say, stop)
    stop.check()
    sanity = _sanity_check(model, test_x[:sanity_digits], run_dir, seed, zoom, say)
    stop.check()  # after this, the last second of writing run.json and the report goes on to the end

    command = tensorboard_command(log_dir)
    summary = {
        "format": 1,
        "complete": True,
        "title": f"peering demo: {described}",
        "dataset": dataset,
        "described": described,
        "train_size": len(train_x),
        "test_size": len(test_x),
        "image_size": size,
        "epochs": epochs,
        "seed": seed,
        "test_accuracy": test_accuracy,
        "seconds": round(time.perf_counter() - started, 2),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "checkpoint": CHECKPOINT_FILE,
        "log_dir": LOG_DIR,
        "tensorboard": tensorboard_command(log_dir, relative=False),
        "callback": {k: v for k, v in callback_settings.items()},
        "morphs": morphs,
        "judges": judges,
        "sanity": sanity,
    }
    if dataset == "mnist":
        summary["data_dir"] = str(Path(data_dir if data_dir is not None else _mnist_folder(None)).resolve())
    write_json_atomic(run_dir / RUN_FILE, summary)

    from peering.report import build_report

    report = build_report(run_dir)
    seconds = time.perf_counter() - started
    return DemoResult(
        run_dir=run_dir,
        report=report,
        checkpoint=checkpoint,
        log_dir=log_dir,
        tensorboard_command=command,
        test_accuracy=test_accuracy,
        morphs=morphs,
        judges=judges,
        seconds=seconds,
        sanity=sanity,
    )


def tensorboard_command(log_dir: str | os.PathLike[str], *, relative: bool = True) -> str:
    """The exact shell command that opens ``log_dir`` in TensorBoard from the current directory.

    Uses ``tensorboard`` when that is on PATH (and is the one installed beside this Python), else the
    path of the one beside this Python. Paths are relative when they are inside the current folder and
    ``relative`` is true, else absolute (for a command that works from anywhere).

    >>> tensorboard_command("runs/demo/logs").endswith("tensorboard --logdir runs/demo/logs")
    True
    """
    folder = Path(log_dir)
    if relative and _inside_cwd(folder):
        folder = Path(os.path.relpath(folder.resolve(), Path.cwd()))
    elif not relative:
        folder = folder.resolve()
    beside = Path(sys.executable).parent / "tensorboard"
    on_path = shutil.which("tensorboard")
    executable = "tensorboard"
    if beside.exists() and (on_path is None or Path(on_path).resolve() != beside.resolve()):
        executable = _display_path(beside) if relative else str(beside.absolute())
    return f"{shlex.quote(executable)} --logdir {shlex.quote(folder.as_posix())}"


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as indented JSON to a temp file beside ``path``, then rename it into place.

    >>> import tempfile
    >>> write_json_atomic(Path(tempfile.mkdtemp()) / "x.json", {"a": 1}).read_text()
    '{\\n  "a": 1\\n}\\n'
    """
    encoded = (json.dumps(data, indent=2, allow_nan=False, default=_json_default) + "\n").encode("utf-8")

    def write(f: IO[bytes]) -> None:
        f.write(encoded)

    return atomic_write(path, write)


# ------------------------------------------------------------------------------------------------ private


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return value.as_posix()
    if isinstance(value, Tensor):
        return value.tolist()
    raise TypeError(f"cannot write a {type(value).__name__} to JSON")


def _inside_cwd(path: Path) -> bool:
    try:
        path.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return False
    return True


def _display_path(path: Path) -> str:
    if _inside_cwd(path):
        return os.path.relpath(path.absolute(), Path.cwd())
    return str(path)


def load_demo_data(
    dataset: str,
    data_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    say: Callable[[str], None] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, str]:
    """The demo's split: ``(train_x, train_y, test_x, test_y, description)``, as `run_demo` makes it.

    ``dataset`` is "digits" (scikit-learn's 8x8 digits, 80/20) or "mnist" (the t10k digits, 80/20, from
    ``data_dir``, else ``$PEERING_DATA_DIR``, else downloaded with checksums, said through ``say``); the
    split is shuffled with ``seed``. `peering check` uses it to test a demo checkpoint on the digits the
    demo held out.

    >>> train_x, train_y, test_x, test_y, described = load_demo_data("digits")
    >>> tuple(test_x.shape), described
    ((359, 1, 8, 8), '1,438 scikit-learn 8x8 digits')
    """
    if dataset not in DEFAULT_EPOCHS:
        raise ValueError(f"dataset must be 'digits' or 'mnist', got {dataset!r}")
    say = say or log.info
    from peering.data import available_mnist_splits, load_digits, load_mnist, train_test_split

    if dataset == "digits":
        images, labels = load_digits()
        train_x, train_y, test_x, test_y = train_test_split(images, labels, test_fraction=0.2, seed=seed)
        return train_x, train_y, test_x, test_y, f"{len(train_x):,} scikit-learn 8x8 digits"
    folder = _mnist_folder(data_dir)
    download = "test" not in (available_mnist_splits(folder) if folder.is_dir() else [])
    if download:
        say(f"Downloading MNIST's t10k digits to {folder} (checksummed)")
    images, labels = load_mnist(folder, "test", download=download)
    train_x, train_y, test_x, test_y = train_test_split(images, labels, test_fraction=0.2, seed=seed)
    return train_x, train_y, test_x, test_y, f"{len(train_x):,} MNIST digits (t10k)"


def _mnist_folder(data_dir: str | os.PathLike[str] | None) -> Path:
    """Where the demo reads MNIST from: ``data_dir``, else ``$PEERING_DATA_DIR``, else the download cache."""
    from peering.data import DATA_DIR_ENV

    root = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "peering" / "mnist"


def training_data(run_dir: str | os.PathLike[str]) -> tuple[Tensor, Tensor]:
    """The digits a demo run trained its model on, rebuilt from its ``run.json`` (dataset, seed, folder).

    The reference data for `morph`'s data prior (`peering.priors.Prototypes`) when morphing with a demo
    checkpoint: ``peering morph`` and ``peering portraits`` use it. Raises `FileNotFoundError` when
    ``run_dir`` holds no ``run.json``, ValueError when it does not say which data the run used.

    >>> import tempfile
    >>> run_dir = Path(tempfile.mkdtemp())
    >>> _ = (run_dir / RUN_FILE).write_text('{"dataset": "digits", "seed": 0}')  # what a digits run records
    >>> images, labels = training_data(run_dir)
    >>> images.shape, labels.shape
    (torch.Size([1438, 1, 8, 8]), torch.Size([1438]))
    """
    path = Path(run_dir) / RUN_FILE
    summary = json.loads(path.read_text())
    dataset, seed = summary.get("dataset"), summary.get("seed")
    if dataset not in DEFAULT_EPOCHS or not isinstance(seed, int):
        raise ValueError(f"{path} does not say which data set and seed the run used")
    train_x, train_y, _, _, _ = load_demo_data(dataset, summary.get("data_dir"), seed, lambda line: None)
    return train_x, train_y


def _clear_previous(run_dir: Path) -> None:
    """Remove what an earlier run of the same name wrote (only the demo's own files and folders)."""
    for file in (REPORT_FILE, RUN_FILE, CHECKPOINT_FILE, PORTRAITS_FILE):
        (run_dir / file).unlink(missing_ok=True)
    for folder in (LOG_DIR, MORPH_DIR, SANITY_DIR):
        if (run_dir / folder).is_dir():
            shutil.rmtree(run_dir / folder)


class _StopRequest:
    """Ctrl+C during the demo, handled at safe points instead of wherever the signal happens to land.

    Python raises KeyboardInterrupt in whatever the main thread is doing; inside a ``with lock:`` of a
    progress bar or of TensorBoard's writer that can leave the lock held and hang the shutdown (seen
    here). So the first SIGINT only sets a flag: training stops after the current batch (through
    ``trainer.should_stop``) and `check` raises KeyboardInterrupt between the stages. A second SIGINT
    raises at once.
    """

    def __init__(self) -> None:
        self.requested = False

    def handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt


@contextlib.contextmanager
def _graceful_interrupt() -> Iterator[_StopRequest]:
    """`_StopRequest`'s SIGINT handler for the block (main thread only; an ignored SIGINT stays ignored)."""
    stop = _StopRequest()
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous is signal.SIG_IGN:
        yield stop
        return
    signal.signal(signal.SIGINT, stop.handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


def _stop_callback(stop: _StopRequest) -> Any:
    """A Lightning callback that ends training after the current batch once Ctrl+C was pressed."""
    from lightning.pytorch.callbacks import Callback

    class _StopWhenAsked(Callback):
        def on_train_batch_end(self, trainer: Any, *args: Any, **kwargs: Any) -> None:
            if stop.requested:
                trainer.should_stop = True

        def on_train_epoch_start(self, trainer: Any, *args: Any, **kwargs: Any) -> None:
            if stop.requested:
                trainer.should_stop = True

    return _StopWhenAsked()


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Keep Lightning's start-up chatter (accelerator lines, tips) and known harmless warnings quiet."""
    names = ("lightning.pytorch", "lightning.fabric", "lightning", "pytorch_lightning")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
            warnings.filterwarnings("ignore", message=r".*weights_only.*")
            warnings.filterwarnings("ignore", message=r".*number of training batches.*log_every_n_steps.*")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _pick_digits(model: torch.nn.Module, x: Tensor, y: Tensor, n: int) -> tuple[list[int], Tensor]:
    """Indices of up to ``n`` correctly classified test digits with different labels, and all logits."""
    with torch.no_grad():
        logits = torch.cat([model(x[i : i + 512]) for i in range(0, len(x), 512)])
    correct = logits.argmax(1) == y
    picked: list[int] = []
    for label in _MORPH_LABELS:
        if len(picked) >= n:
            break
        hits = ((y == label) & correct).nonzero().flatten()
        if len(hits):
            picked.append(int(hits[0]))
    return picked, logits


def _morph_digits(
    model: torch.nn.Module,
    test_x: Tensor,
    test_y: Tensor,
    rows: Tensor,
    prior: Any,
    run_dir: Path,
    n: int,
    steps: int,
    zoom: int,
    progress: bool,
    say: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Morph ``n`` of the test digits ``rows`` to (label + 1) mod 10 and to their runner-up; write strips
    and GIFs.

    `morph` runs with its defaults (each morph stops where the model gives its target a probability of
    0.99, smoothed steps) and ``prior``; the strips and GIFs end where each morph stopped.
    """
    import peering
    from peering.render import film_strip, save_gif, save_png

    if n == 0:
        return []
    picked_local, logits = _pick_digits(model, test_x[rows], test_y[rows], n)
    jobs: list[tuple[int, int, str, Tensor]] = []  # (test index, target, kind, logits)
    for j in picked_local:
        i = int(rows[j])
        plus_one = (int(test_y[i]) + 1) % 10
        runner_up = int(logits[j].topk(2).indices[1])
        if runner_up == plus_one:
            jobs.append((i, plus_one, "label + 1, also the runner-up", logits[j]))
        else:
            jobs.append((i, plus_one, "label + 1", logits[j]))
            jobs.append((i, runner_up, "runner-up", logits[j]))
    if not jobs:
        return []
    say(f"Morphing {len(picked_local)} test digits into other classes ({len(jobs)} morphs, <= {steps} steps)")
    inputs = test_x[[i for i, _, _, _ in jobs]]
    targets = torch.tensor([t for _, t, _, _ in jobs], dtype=torch.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a morph that does not arrive is recorded as such
        result = peering.morph(model, inputs, targets, steps=steps, prior=prior, progress=progress)
    morph_dir = run_dir / MORPH_DIR
    records = []
    for k, (i, target, kind, start_logits) in enumerate(jobs):
        label = int(test_y[i])
        stem = f"{k:02d}_{label}_to_{target}"
        save_png(film_strip(result, k, zoom=zoom, max_frames=10), morph_dir / f"{stem}.png")
        save_gif(result, k, morph_dir / f"{stem}.gif", zoom=zoom, duration_ms=100)
        arrived = bool(result.success[k])
        records.append(
            {
                "test_index": i,
                "label": label,
                "target": target,
                "kind": kind,
                "success": arrived,
                "confidence": result.confidence,
                "step": int(result.steps[k]),
                "distance": round(float(result.distance[k]), 4),
                "steps": steps,
                "p_target_start": round(float(start_logits.softmax(0)[target]), 4),
                "p_target_end": round(float(result.probabilities[k, target]), 4),
                "strip": f"{MORPH_DIR}/{stem}.png",
                "gif": f"{MORPH_DIR}/{stem}.gif",
            }
        )
    arrived_count = int(result.success.sum())
    say(f"{arrived_count} of {len(records)} morphs reached p >= {result.confidence}; strips in {morph_dir}")
    return records


def _halves(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """The test digits' indices split in two at random (seeded): the judges' half and the morphs' half."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[: n // 2].sort().values, order[n // 2 :].sort().values


JUDGE_EPOCHS: dict[str, tuple[int, int]] = {"digits": (30, 20), "mnist": (15, 5)}
"""Training epochs of the demo's two judges (MLP, LeNet) on their half of the held-out digits."""

JUDGED_MORPHS = 256
"""At most this many held-out digits are morphed for the judges."""

JUDGED_STEPS = 300
"""The fewest steps of the morphs and portraits shown to the judges."""


def _judge(
    model: torch.nn.Module,
    prior: Any,
    train_x: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    judge_rows: Tensor,
    morph_rows: Tensor,
    dataset: str,
    seed: int,
    steps: int,
    run_dir: Path,
    zoom: int,
    say: Callable[[str], None],
    stop: _StopRequest,
) -> dict[str, Any]:
    """Train two judges on data the model never saw, and ask them about morphs and portraits.

    The judges (`DigitMLP`, `DigitLeNet`, other seeds) learn from the ``judge_rows`` half of the test
    digits; up to `JUDGED_MORPHS` digits of the other half are morphed to (label + 1) mod 10 by plain
    ascent that stops at the flip (morph's old default) and by morph's defaults with ``prior``, with at
    least `JUDGED_STEPS` steps (a model trained for few epochs needs more to reach 0.99); then one portrait
    per class is drawn from the mean training digit with the same prior. Returns run.json's "judges"
    record.
    """
    import peering
    from peering.models import DigitLeNet, DigitMLP, accuracy, train_classifier
    from peering.render import portrait_row, save_png

    size = int(test_x.shape[-1])
    jx, jy = test_x[judge_rows], test_y[judge_rows]
    mlp_epochs, lenet_epochs = JUDGE_EPOCHS[dataset]
    say(f"Training two judges (an MLP and a LeNet) on {len(jx):,} held-out digits the model never saw")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        mlp = DigitMLP(image_size=size)
        torch.manual_seed(seed + 2)
        lenet = DigitLeNet(image_size=size)
    judges = {
        "MLP": train_classifier(mlp, jx, jy, epochs=mlp_epochs, batch_size=32, lr=2e-3, seed=seed + 1),
        "LeNet": train_classifier(lenet, jx, jy, epochs=lenet_epochs, batch_size=32, lr=2e-3, seed=seed + 2),
    }
    rows = morph_rows[:JUDGED_MORPHS]
    steps = max(steps, JUDGED_STEPS)
    x, y = test_x[rows], test_y[rows]
    record: dict[str, Any] = {
        "names": list(judges),
        "trained_on": len(jx),
        "accuracy": {name: round(accuracy(j, x, y), 4) for name, j in judges.items()},
        "steps": steps,
        "morphs": [],
    }
    stop.check()
    say(f"Morphing {len(x)} other held-out digits to (label + 1) mod 10 and asking the judges")
    methods = {
        "plain ascent, stops at the flip (the old default)": {"confidence": None, "smoothing": 0},
        "morph's defaults with the training digits as prior": {"prior": prior},
    }
    for method, options in methods.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = peering.morph(model, x, (y + 1) % 10, steps=steps, keep_every=steps, **options)
        stop.check()
        row: dict[str, Any] = {
            "method": method,
            "n": len(x),
            "success": round(float(res.success.float().mean()), 4),
            "mean_l2": round(float(res.distance.mean()), 4),
        }
        if bool(res.success.any()):
            check = peering.agreement(res, judges, seed=seed)
            row["agreement"] = {n: round(float(v), 4) for n, v in zip(check.names, check.morphs, strict=True)}
            row["noise"] = {n: round(float(v), 4) for n, v in zip(check.names, check.noise, strict=True)}
        record["morphs"].append(row)
    say("Drawing one portrait per class from the mean training digit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = train_x.mean(0, keepdim=True)
        portraits = peering.portraits(model, start, prior=prior, steps=steps)
    picture = PORTRAITS_FILE
    save_png(portrait_row(portraits, zoom=zoom), run_dir / picture)
    record["portraits"] = {
        "picture": picture,
        "classes": portraits.targets.tolist(),
        "success": portraits.success.tolist(),
        "probabilities": [round(float(p), 4) for p in portraits.probabilities.diagonal()],
    }
    if bool(portraits.success.any()):
        check = peering.agreement(portraits, judges, seed=seed)
        record["portraits"]["agreement"] = {
            n: round(float(v), 4) for n, v in zip(check.names, check.morphs, strict=True)
        }
        record["portraits"]["calls"] = {n: c.tolist() for n, c in zip(check.names, check.calls, strict=True)}
    best = record["morphs"][-1]
    say(
        f"{best['success']:.0%} of {best['n']} morphs reached p >= 0.99; the judges call "
        + " and ".join(f"{v:.0%} ({n})" for n, v in best.get("agreement", {}).items())
        + " of those the target"
    )
    return record


def _sanity_check(
    model: torch.nn.Module, digits: Tensor, run_dir: Path, seed: int, zoom: int, say: Callable[[str], None]
) -> dict[str, Any] | None:
    """Run the randomisation sanity check on ``digits``; write its pictures; its numbers for run.json."""
    from peering.render import sanity_curves, sanity_maps, save_png
    from peering.sanity import randomisation_check

    if len(digits) == 0:
        return None
    say(
        f"Sanity check: re-initialising the model's layers from the output down and comparing the maps "
        f"of {len(digits)} test digits"
    )
    result = randomisation_check(model, digits, seed=seed)
    folder = run_dir / SANITY_DIR
    save_png(sanity_curves(result), folder / "curves.png")
    maps = {}
    for method in result.methods:
        save_png(sanity_maps(result, method, zoom=zoom), folder / f"maps_{method}.png")
        maps[method] = f"{SANITY_DIR}/maps_{method}.png"
    verdicts = {True: "passes", False: "fails", None: "undecided"}
    said = ", ".join(f"{m} {verdicts[result.passed[m]]} ({result.final(m):.2f})" for m in result.methods)
    say(f"Sanity check: {said}; pictures in {folder}")
    return {**result.to_dict(), "curves": f"{SANITY_DIR}/curves.png", "maps": maps}


def morph_view(
    result: Any, index: int, *, last_frame: int | None = None, probabilities: Tensor | None = None
) -> SimpleNamespace:
    """One sample of a `MorphResult` as a one-sample result whose frames end at ``last_frame``.

    For `peering.render.film_strip` / `save_gif`, which draw all of a view's frames (a view has no
    ``steps``): the demo morphs without early stop and ends each strip at a confident frame, later than the
    arrival step where `film_strip` would end a `MorphResult`. ``last_frame`` defaults to the frame of the
    step where the sample was first predicted as its target (all frames if never); ``probabilities`` [C]
    are those of that last frame (default: the result's final ones).

    >>> import torch
    >>> from types import SimpleNamespace
    >>> res = SimpleNamespace(frames=torch.rand(11, 2, 1, 8, 8), frame_steps=torch.arange(11),
    ...                       targets=torch.tensor([3, 8]), steps=torch.tensor([4, -1]),
    ...                       probabilities=torch.rand(2, 10).softmax(1))
    >>> morph_view(res, 0).frames.shape, morph_view(res, 1).frames.shape
    (torch.Size([5, 1, 1, 8, 8]), torch.Size([11, 1, 1, 8, 8]))
    """
    frame_steps = result.frame_steps
    if last_frame is None:
        reached = int(result.steps[index])
        last_frame = int((frame_steps <= reached).sum()) - 1 if reached >= 0 else len(frame_steps) - 1
    keep = max(1, min(int(last_frame), len(frame_steps) - 1) + 1)
    probs = result.probabilities[index] if probabilities is None else probabilities
    return SimpleNamespace(
        frames=result.frames[:keep, index : index + 1],
        frame_steps=frame_steps[:keep],
        targets=result.targets[index : index + 1],
        probabilities=probs.reshape(1, -1),
    )
