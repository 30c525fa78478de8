"""`peering explain-dataset`: a whole data set explained with Trainer.predict, into shards."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from peering.cli.common import (
    EXIT_INTERRUPTED,
    ChannelsOption,
    InvertOption,
    MeanOption,
    MethodName,
    ModelOption,
    NonfiniteName,
    OutputName,
    SizeOption,
    StdOption,
    bad_input,
    check_output_folder,
    check_target,
    class_count,
    fail,
    images_only,
    load,
    note,
    parse_normalisation,
)
from peering.errors import PeeringError
from peering.runs import names

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from peering.checkpoints import LoadedModel

__all__: list[str] = []  # a command of the app (peering.cli.app); its docstring is its --help


def _folder_dataset(
    folder: Path, loaded: LoadedModel, invert: bool, num_classes: int
) -> tuple[Dataset, dict[str, Any]]:
    from peering.data.images import IMAGE_SUFFIXES, ImageFiles, list_images, read_image

    files = list_images(folder)
    if not files:
        fail(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    first, notes = read_image(folder / files[0], loaded.channels, loaded.size, invert=invert)
    size = loaded.size or (int(first.shape[1]), int(first.shape[2]))
    channels = loaded.channels or int(first.shape[0])
    if notes:
        note(f"images are converted to {channels}x{size[0]}x{size[1]} (first one: {'; '.join(notes)})")
    parents = [f.split("/")[0] if "/" in f else "" for f in files]
    by_class = all(p.isdigit() and int(p) < num_classes for p in parents)
    labels = [int(p) for p in parents] if by_class else [-1] * len(files)
    if by_class:
        note("labels from the subfolder names")
    source = {"data": "folder", "root": str(folder.resolve()), "files": files, "channels": channels,
              "size": list(size), "invert": invert}
    return ImageFiles(folder, files, channels, size, invert, labels), source


def _named_dataset(
    name: str, data_dir: Path | None, loaded: LoadedModel
) -> tuple[Dataset, dict[str, Any]]:
    import os

    from torch.utils.data import TensorDataset

    from peering.data import DATA_DIR_ENV, load_digits, load_mnist

    if name == "digits":
        images, labels = load_digits()
        source: dict[str, Any] = {"data": "digits"}
    else:
        root = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV)
        if not root:
            fail(f"--data mnist needs the MNIST IDX files: pass --data-dir or set {DATA_DIR_ENV}")
        images, labels = load_mnist(Path(root).expanduser(), "test")
        source = {"data": "mnist", "root": str(Path(root).expanduser().resolve()), "split": "test"}
    shape = tuple(images.shape[1:])
    want = None
    if loaded.size is not None and loaded.channels is not None:
        want = (loaded.channels, *loaded.size)
    if want is not None and shape != want:
        fail(
            f"{loaded.source} takes {want[0]}x{want[1]}x{want[2]} images but the {name} images are "
            f"{shape[0]}x{shape[1]}x{shape[2]}; use the data set it was trained on, or a folder of images "
            "(converted to its size)"
        )
    return TensorDataset(images, labels), source


def explain_dataset(
    checkpoint: Annotated[Path, typer.Argument(help="A demo checkpoint, or a state_dict with --model.")],
    data: Annotated[
        str,
        typer.Option(
            "--data", help="mnist (the 10,000 t10k digits), digits (sklearn's 1,797), or a FOLDER of images."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (a rerun resumes it).")],
    devices: Annotated[int, typer.Option(min=1, help="Processes (devices) to spread the data over.")] = 1,
    top_k: Annotated[int, typer.Option(min=1, help="Classes to explain when no --target.")] = 2,
    target: Annotated[
        str | None, typer.Option(help="Explain 'label' (each sample's label) or one class K.")
    ] = None,
    method: Annotated[MethodName, typer.Option(help="Attribution method.")] = MethodName.gradient,
    output: Annotated[OutputName, typer.Option(help="What is differentiated.")] = OutputName.probability,
    batch_size: Annotated[int, typer.Option(min=1, help="Samples per batch.")] = 64,
    accelerator: Annotated[str, typer.Option(help="Lightning accelerator: auto, cpu, gpu, ...")] = "auto",
    data_dir: Annotated[
        Path | None, typer.Option(help="Folder with the MNIST IDX files (default: $PEERING_DATA_DIR).")
    ] = None,
    workers: Annotated[int, typer.Option(min=0, help="DataLoader worker processes.")] = 0,
    model: ModelOption = None,
    channels: ChannelsOption = None,
    image_size: SizeOption = None,
    invert: InvertOption = False,
    progress: Annotated[bool, typer.Option(help="Show Lightning's progress bar.")] = True,
    mean: MeanOption = None,
    std: StdOption = None,
    verify: Annotated[
        bool,
        typer.Option(help="On a rerun, check the checksums of the shards already written before skipping "
                     "their samples (--no-verify: headers and indices only)."),
    ] = True,
    nonfinite: Annotated[
        NonfiniteName,
        typer.Option(help="A sample with NaN/Inf inputs or logits: stop naming it (raise), or store it as "
                     "not valid (skip)."),
    ] = NonfiniteName.raise_,
) -> None:
    """Explain every sample of a data set with Trainer.predict on one or more devices; shards in --out.

    Read them with peering.load_attributions(OUT); `peering report OUT` shows them. With --mean/--std the
    model is fed normalised images (the attributions are of those, as with `peering explain`), and the
    report shows the images as read.

    SIGTERM or Ctrl+C stops the run at the next batch, writes what was explained and exits with 143 or
    130; the same command resumes it. One run at a time writes into a folder (a lock in it).

    Example: peering explain-dataset runs/demo/model.ckpt --data digits --out runs/digits-explained
    """
    from peering._files import FolderLock

    check_output_folder(out, "--out")
    try:
        with _terminated_as_interrupt(), bad_input(), FolderLock(out, "peering explain-dataset"):
            loaded = load(checkpoint, model, channels, image_size)
            images_only(loaded, "explain-dataset")
            dataset, source, n_classes = _dataset(data, data_dir, loaded, invert)
            norm = parse_normalisation(mean, std, int(dataset[0][0].shape[0]))
            if norm is not None:  # the model sees normalised images (as with `peering explain`)
                dataset = norm.dataset(dataset)
                source["normalisation"] = norm.to_dict()
            parsed_target = _target(target, loaded, dataset, n_classes)
            source.update(checkpoint=str(checkpoint.resolve()), model=model)
            _record_source(out, source)
            start = time.perf_counter()
            done_before = _samples_done(out)
            total = _run_predict(loaded, dataset, out, devices=devices, accelerator=accelerator,
                                 batch_size=batch_size, workers=workers, progress=progress, top_k=top_k,
                                 target=parsed_target, method=method.value, output=output.value,
                                 verify_done=verify, nonfinite=nonfinite.value)
            seconds = time.perf_counter() - start
    except (KeyboardInterrupt, _Terminated) as err:  # before the run's own handlers were in place
        signum = err.signum if isinstance(err, _Terminated) else None
        typer.echo(f"\ninterrupted by {'SIGTERM' if signum else 'SIGINT'} before the run started; no sample "
                   f"was written to {out}", err=True)
        raise typer.Exit(128 + signum if signum else EXIT_INTERRUPTED) from None
    explained = total - done_before
    what = (f"class {parsed_target}" if isinstance(parsed_target, int)
            else "the label" if parsed_target == "label" else f"top {top_k} classes")
    typer.echo(
        f"explained {explained:,} of {total:,} samples ({method.value} of the {output.value} of the {what}) "
        f"in {seconds:.1f} s on {devices} device(s)"
        + (f"; {done_before:,} were already done" if done_before else "")
    )
    if done_before:
        typer.echo(
            "the shards already written were verified (CRC-32 of every tensor)" if verify
            else "the shards already written were not verified (--no-verify); pass --verify to check them"
        )
    typer.echo(f"wrote {out}  (peering.load_attributions({str(out)!r}), or: peering report {out})")


def _dataset(
    data: str, data_dir: Path | None, loaded: LoadedModel, invert: bool
) -> tuple[Dataset, dict[str, Any], int | None]:
    """The data set --data names, what dataset.json records of it, and the number of classes when known."""
    folder = Path(data)
    n_classes = loaded.num_classes
    if data in ("mnist", "digits"):
        dataset, source = _named_dataset(data, data_dir, loaded)
    elif folder.is_dir():
        if n_classes is None:
            from peering.data.images import read_image

            probe, _ = read_image(next(p for p in sorted(folder.rglob("*")) if p.is_file()),
                                  loaded.channels, loaded.size, invert=invert)
            n_classes = class_count(loaded, probe.unsqueeze(0))
        dataset, source = _folder_dataset(folder, loaded, invert, n_classes)
    else:
        fail(f"--data must be mnist, digits or a folder of images; {data} is none of these")
    return dataset, source, n_classes


def _target(
    target: str | None, loaded: LoadedModel, dataset: Dataset, n_classes: int | None
) -> int | str | None:
    """--target as the writer takes it: None, "label" or a class (checked against the model's classes)."""
    if target is None or target == "label":
        return target
    if not target.isdigit():
        fail(f"--target must be 'label' or a class number, got {target!r}")
    check_target(int(target), n_classes or class_count(loaded, dataset[0][0].unsqueeze(0)))
    return int(target)


def _record_source(out: Path, source: dict[str, Any]) -> None:
    """Write ``out/dataset.json``, refusing a folder that holds a run over other data or weights."""
    from peering.runs import read_dataset_json, write_dataset_json

    previous = out / names.DATASET_FILE
    before = read_dataset_json(out) if previous.is_file() else None
    if before and before != source:
        fail(f"{out} holds a run over other data or of another checkpoint ({previous}); use another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_dataset_json(out, source)
    except OSError as err:
        fail(f"cannot write to {out}: {err.strerror or err}")


class _Terminated(BaseException):  # like KeyboardInterrupt: not caught by "except Exception"
    """SIGTERM while the model and the data load (the run's own handlers take over once it starts)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextmanager
def _terminated_as_interrupt() -> Iterator[None]:
    """SIGTERM raises `_Terminated` until the run starts (a scheduler's stop during loading gets one line
    and exit 143, not a silent death); the previous handler is put back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: Any) -> None:
        raise _Terminated(signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _samples_done(out: Path) -> int:
    """The samples already written in ``out`` (counted from the shards' headers when the manifest is
    corrupt: the run rebuilds it)."""
    from peering.store import SHARDS, ShardError, load_attributions, open_shard

    try:
        return len(load_attributions(out, verify=False, allow_incomplete=True))
    except ShardError:
        pass
    count = 0
    for file in sorted((out / SHARDS).glob("*.safetensors")) if (out / SHARDS).is_dir() else []:
        try:
            count += len(open_shard(file).indices)
        except ShardError:
            continue  # the run names it
    return count


def _run_predict(loaded: LoadedModel, dataset: Dataset, out: Path, **options: Any) -> int:
    """`peering.lightning.explain_dataset`, its failures as one line; the samples in the finished run."""
    from peering.errors import RunInterrupted
    from peering.lightning import explain_dataset as explain_all
    from peering.lightning.stopping import signal_name

    try:
        return explain_all(loaded.model, dataset, out, flatten=loaded.flat, lock=False, **options)
    except RunInterrupted as err:
        total = len(dataset)  # type: ignore[arg-type]
        typer.echo(
            f"\ninterrupted by {signal_name(err.signum)}: {_samples_done(out):,} of {total:,} samples are "
            f"written in {out}; rerun the same command to resume",
            err=True,
        )
        raise typer.Exit(128 + err.signum) from None
    except PeeringError as err:
        fail(str(err))
    except Exception as err:  # an error in a spawned process arrives as its traceback text
        fail(f"explaining failed: {_last_line(err)}")


def _last_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__
