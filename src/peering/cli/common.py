"""What every command shares: the exit codes, the option types, one-line errors and notes, loading a
model and images, writing files."""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from peering.errors import PeeringError

if TYPE_CHECKING:
    import torch
    from rich.console import Console
    from torch import Tensor

    from peering.checkpoints import LoadedModel
    from peering.data.normalisation import Normalisation
    from peering.morph.ascent import MorphResult

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class DatasetName(str, Enum):
    """The demo's data sets."""

    digits = "digits"
    mnist = "mnist"


class MethodName(str, Enum):
    """Attribution methods of `peering.explain`."""

    gradient = "gradient"
    input_x_gradient = "input_x_gradient"
    smoothgrad = "smoothgrad"
    integrated_gradients = "integrated_gradients"


class OutputName(str, Enum):
    """What `peering.explain` differentiates: a softmax classifier's probability, log-probability or logit;
    "sigmoid" for a multi-label (or single-logit binary) model; "raw" for a regression."""

    probability = "probability"
    log_probability = "log_probability"
    logit = "logit"
    sigmoid = "sigmoid"
    raw = "raw"


class MorphOutputName(str, Enum):
    """What `peering.morph` raises (a regression has no class to reach: no "raw")."""

    log_probability = "log_probability"
    probability = "probability"
    logit = "logit"
    sigmoid = "sigmoid"


class ReferenceName(str, Enum):
    """Where `morph`'s data prior (`peering.priors.Prototypes`) gets its reference images."""

    run = "run"
    digits = "digits"
    mnist = "mnist"
    none = "none"


class StartName(str, Enum):
    """What class portraits start from."""

    mean = "mean"
    blank = "blank"
    noise = "noise"


class NormName(str, Enum):
    """The step normalisation and budget ball of `peering.morph`."""

    l2 = "l2"
    linf = "linf"


class NonfiniteName(str, Enum):
    """What a dataset run does with a sample whose inputs or logits are NaN or Inf."""

    raise_ = "raise"
    skip = "skip"


class BaselineName(str, Enum):
    """What a deleted input element becomes in `peering.faithfulness.deletion_insertion`."""

    zero = "zero"
    blur = "blur"
    mean = "mean"


def fail(message: str) -> NoReturn:
    """Print one line ``error: message`` to stderr and exit with code 2."""
    typer.echo(f"error: {' '.join(str(message).split())}", err=True)
    raise typer.Exit(EXIT_BAD_INPUT)


def note(message: str) -> None:
    typer.echo(f"note: {message}", err=True)


@contextmanager
def bad_input() -> Iterator[None]:
    """Turn the errors peering raises on purpose (`peering.PeeringError`) into one line and exit code 2."""
    try:
        yield
    except PeeringError as err:
        fail(str(err))


def console() -> Console:
    from rich.console import Console

    console = Console(file=sys.stdout, highlight=False)
    if not console.is_terminal:  # piped or captured: no terminal width to fit, so do not squeeze tables
        console = Console(file=sys.stdout, highlight=False, width=max(console.width, 120))
    return console


def print_flushed(console: Console, line: str) -> None:
    """Print a progress line and flush, so that it shows at once even when stdout is a pipe."""
    console.print(line, markup=False)
    console.file.flush()


def auto_zoom(size: int) -> int:
    """Integer magnification that makes a picture about 96 pixels wide."""
    return max(1, math.ceil(96 / max(size, 1)))


def load_images(
    paths: list[Path], channels: int | None, size: tuple[int, int] | None, invert: bool
) -> tuple[Tensor, tuple[int, int]]:
    """A batch [N, C, H, W] of images converted for the model; prints a note for each changed one."""
    from peering.data.images import read_image

    images = []
    for path in paths:
        image, notes = read_image(path, channels, size, invert=invert)
        if size is None:  # the model does not say: all images take the first one's size and channels
            size = (int(image.shape[1]), int(image.shape[2]))
            channels = int(image.shape[0])
        if not invert and float(image.mean()) > 0.5:
            notes.append(
                "it is mostly bright; the demo models expect light digits on a dark background "
                "(pass --invert if the digit is dark)"
            )
        if notes:
            note(f"{path}: {'; '.join(notes)}")
        images.append(image)
    if size is None:
        fail("no image given")
    import torch

    return torch.stack(images), size


def load(
    checkpoint: Path,
    model: str | None,
    channels: int | None,
    image_size: int | None,
    output_fn: str | None = None,
) -> LoadedModel:
    from peering.checkpoints import load_model

    loaded = load_model(checkpoint, model, channels=channels, image_size=image_size, output=output_fn)
    for line in loaded.notes:
        note(line)
    return loaded


def images_only(loaded: LoadedModel, command: str) -> None:
    """Fail for a text classifier in a command that works on images."""
    if loaded.is_text:
        fail(
            f"{loaded.source} is a text classifier; peering {command} works on image classifiers (explain "
            "text with: peering explain FOLDER --text '...')"
        )


def check_target(target: int | None, num_classes: int) -> None:
    if target is not None and not 0 <= target < num_classes:
        fail(
            f"target {target} is out of range: the model has {num_classes} classes (0 to {num_classes - 1})"
        )


def class_count(loaded: LoadedModel, images: Tensor) -> int:
    from peering.checkpoints import class_scores_of

    if loaded.num_classes is not None:
        return loaded.num_classes
    return int(class_scores_of(loaded, images[:1]).shape[1])


def check_output_file(path: Path, option: str = "-o") -> None:
    """Fail now, before any computing, when ``path`` cannot be written: a folder in its place, a file
    where one of its folders should be, or a folder that exists and is not writable."""
    if path.is_dir():
        fail(f"cannot write {option} {path}: it is a folder; give a file name, e.g. {path / 'picture.png'}")
    _check_parents(path, option)


def check_output_folder(path: Path, option: str = "--out") -> None:
    """Fail now when ``path`` cannot be an output folder (a file in its place or among its parents, or an
    existing folder that is not writable)."""
    if path.exists() and not path.is_dir():
        fail(f"cannot write into {option} {path}: it is a file, not a folder")
    if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
        fail(f"cannot write into {option} {path}: permission denied")
    _check_parents(path, option)


def _check_parents(path: Path, option: str) -> None:
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        fail(f"cannot write {option} {path}: {blocker} is a file, not a folder")
    existing = next((p for p in path.parents if p.is_dir()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK) and not path.parent.is_dir():
        fail(f"cannot write {option} {path}: cannot create folders in {existing} (permission denied)")
    if path.parent.is_dir() and not os.access(path.parent, os.W_OK | os.X_OK):
        fail(f"cannot write {option} {path}: {path.parent} is not writable (permission denied)")


def save(write: Callable[[Path], Any], path: Path) -> None:
    """Write ``path`` with ``write``, creating its missing folders (and saying so), or fail in one line."""
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        fail(f"cannot write {path}: {blocker} is a file, not a folder")
    missing = next((p for p in reversed(path.parents) if not p.exists()), None)
    try:
        if missing is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            note(f"created folder {missing}")
        write(path)
    except OSError as err:
        fail(f"cannot write {path}: {err.strerror or err}")


MODEL_HELP = (
    "Build the model with this factory (package.module:factory or file.py:factory); CHECKPOINT then "
)
MODEL_HELP += "holds its state_dict."
ModelOption = Annotated[str | None, typer.Option("--model", help=MODEL_HELP, show_default=False)]
ChannelsOption = Annotated[
    int | None, typer.Option("--channels", min=1, help="Input channels of a --model (if it cannot be told).")
]
SizeOption = Annotated[
    int | None, typer.Option("--image-size", min=1, help="Input height and width of a --model.")
]
OutputFnOption = Annotated[
    str | None,
    typer.Option(
        "--output-fn",
        help="For models that return an object, dict or tuple: the attribute, key or index holding the "
        "class scores (e.g. logits for Hugging Face models).",
        show_default=False,
    ),
]
InvertOption = Annotated[bool, typer.Option("--invert", help="Invert the images (for dark digits on white).")]
ZoomOption = Annotated[
    int | None, typer.Option("--zoom", min=1, help="Magnification (default: ~96 px tiles).")
]
NORMALISE_HELP = (
    "The model takes normalised images (image - MEAN) / STD, e.g. 0.485,0.456,0.406 (one number, or one per "
    "channel); give --std too. The images are normalised for the model and shown as read."
)
MeanOption = Annotated[str | None, typer.Option("--mean", help=NORMALISE_HELP, show_default=False)]
StdOption = Annotated[
    str | None,
    typer.Option(
        "--std", help="The STD of --mean's normalisation, e.g. 0.229,0.224,0.225.", show_default=False
    ),
]


REFERENCE_HELP = (
    "Reference images for the data prior that makes morphs other models believe: 'run' (the training "
    "digits of the demo run the checkpoint is in, from its run.json; none for other checkpoints), 'digits' "
    "(scikit-learn's 8x8 digits), 'mnist' (the t10k digits in --data-dir), or 'none'."
)
ReferenceOption = Annotated[ReferenceName, typer.Option("--reference", help=REFERENCE_HELP)]
DataDirOption = Annotated[
    Path | None,
    typer.Option("--data-dir", help="Folder with the MNIST IDX files for --reference mnist "
                 "(default: $PEERING_DATA_DIR).", show_default=False),
]
ConfidenceOption = Annotated[
    float,
    typer.Option(min=0.0, max=0.999999, help="The target probability to reach; 0: stop as soon as the "
                 "target is the top class."),
]
SmoothingOption = Annotated[
    float | None,
    typer.Option(
        min=0.0, help="Gaussian blur of each step in pixels (default 1.5; 0: none).", show_default=False
    ),
]


def unflatten(result: MorphResult, shape: torch.Size) -> MorphResult:
    """A morph of flat inputs [B, D] viewed as the images [B, C, H, W] they came from."""
    return dataclasses.replace(
        result,
        inputs=result.inputs.reshape(-1, *shape),
        frames=result.frames.reshape(*result.frames.shape[:2], *shape),
    )


def parse_normalisation(
    mean: str | None, std: str | None, channels: int | None, names: tuple[str, str] = ("--mean", "--std")
) -> Normalisation | None:
    """The `Normalisation` of the --mean/--std options, or None without them; bad values fail in one line.
    With ``channels`` None, any number of values is taken (the pictures check it against their images)."""
    from peering.data.normalisation import Normalisation

    try:
        return Normalisation.parse(mean, std, channels, names=names)
    except PeeringError as err:
        fail(str(err))
