"""`peering`: the command line.

::

    peering demo [--dataset digits|mnist] [--data-dir DIR] [--epochs N] [--seed S] [--out runs] [--name demo]
    peering explain CHECKPOINT IMAGE... [--target K] [--method gradient] [-o explain.png]
    peering morph CHECKPOINT IMAGE --target K [--confidence 0.99] [--reference run] [--gif g.gif] [-o m.png]
    peering portraits CHECKPOINT [--start mean] [--reference run] [-o portraits.png]
    peering check CHECKPOINT [IMAGE...] [--samples 64] [--method M ...] [--no-faithfulness]
    peering report RUN_DIR

A checkpoint is a Lightning checkpoint of the demo model (what ``peering demo`` writes), or any file
holding a state_dict together with ``--model package.module:factory`` (see `peering.checkpoints`). Images
are PNG or JPEG (anything Pillow reads), converted to the model's channels and size with a printed note.

Bad input (a missing or corrupt checkpoint, an unreadable image, a target out of range, a model that does
not return class scores, ...) ends with one line ``error: ...`` on stderr and exit code 2, never a
traceback. An interrupted ``peering demo`` exits with 130 and leaves no file that looks complete.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import numpy as np
import torch
import typer
from PIL import Image, UnidentifiedImageError
from torch import Tensor

if TYPE_CHECKING:
    from collections.abc import Callable

    from rich.console import Console

    from peering.checkpoints import LoadedModel
    from peering.morph import MorphResult

__all__ = ["ImageError", "app", "main", "read_image"]

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

app = typer.Typer(
    name="peering",
    help="Look inside a classifier with input gradients: explain, morph, and watch what confuses it.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


class ImageError(ValueError):
    """An image file cannot be read (the message names the file)."""


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
    """What `peering.explain` differentiates."""

    probability = "probability"
    log_probability = "log_probability"
    logit = "logit"


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


# ------------------------------------------------------------------------------------------------ helpers


def _fail(message: str) -> NoReturn:
    """Print one line ``error: message`` to stderr and exit with code 2."""
    typer.echo(f"error: {' '.join(str(message).split())}", err=True)
    raise typer.Exit(EXIT_BAD_INPUT)


def _note(message: str) -> None:
    typer.echo(f"note: {message}", err=True)


@contextmanager
def _bad_input() -> Iterator[None]:
    """Turn the errors that bad input raises into one line and exit code 2."""
    from peering.checkpoints import CheckpointError
    from peering.data import DatasetError
    from peering.report import ReportError
    from peering.store import ShardError

    try:
        yield
    except (CheckpointError, ImageError, ReportError, DatasetError, ShardError) as err:
        _fail(str(err))


def _console() -> Console:
    from rich.console import Console

    console = Console(file=sys.stdout, highlight=False)
    if not console.is_terminal:  # piped or captured: no terminal width to fit, so do not squeeze tables
        console = Console(file=sys.stdout, highlight=False, width=max(console.width, 120))
    return console


def _print_flushed(console: Console, line: str) -> None:
    """Print a progress line and flush, so that it shows at once even when stdout is a pipe."""
    console.print(line, markup=False)
    console.file.flush()


def _auto_zoom(size: int) -> int:
    """Integer magnification that makes a picture about 96 pixels wide."""
    return max(1, math.ceil(96 / max(size, 1)))


def read_image(
    path: str | Path,
    channels: int | None = 1,
    size: tuple[int, int] | None = None,
    *,
    invert: bool = False,
) -> tuple[Tensor, list[str]]:
    """Read an image file as a float tensor [C, H, W] in [0, 1], converted for a model.

    Args:
        path: a PNG or JPEG file (any format Pillow reads).
        channels: 1 (grey) or 3 (RGB) to convert to; None keeps grey images grey and makes others RGB.
        size: (height, width) to resize to; None keeps the image's size.
        invert: replace each pixel p by 1 - p (dark digits on a light background -> light on dark).

    Returns:
        The image and the notes on what was changed (empty when nothing was).

    Raises:
        ImageError: the file is missing or is not an image Pillow can read.

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "digit.png"
    >>> Image.new("RGB", (28, 28)).save(path)
    >>> image, notes = read_image(path, channels=1, size=(8, 8))
    >>> tuple(image.shape), notes
    ((1, 8, 8), ['converted RGB to grey', 'resized 28x28 to 8x8'])
    """
    file = Path(path)
    if not file.exists():
        raise ImageError(f"image not found: {file}")
    if file.is_dir():
        raise ImageError(f"image {file} is a directory, not a file")
    notes: list[str] = []
    try:
        with Image.open(file) as opened:
            opened.load()
            image = opened.copy()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        detail = " ".join(str(err).split())
        raise ImageError(f"cannot read image {file}: not a PNG/JPEG image, or truncated ({detail})") from err
    image = _to_mode(image, channels, notes)
    if size is not None and (image.height, image.width) != tuple(size):
        h, w = size
        shrinking = h * w < image.height * image.width
        resample = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
        notes.append(f"resized {image.width}x{image.height} to {w}x{h}")
        image = image.resize((w, h), resample=resample)
    array = np.asarray(image, dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array[None] if array.ndim == 2 else array.transpose(2, 0, 1).copy())
    if invert:
        tensor = 1.0 - tensor
        notes.append("inverted")
    return tensor.contiguous(), notes


def _to_mode(image: Image.Image, channels: int | None, notes: list[str]) -> Image.Image:
    """Convert to "L" (grey) or "RGB", flattening transparency onto white and scaling 16-bit images."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") else max(float(array.max()), 1.0)
        image = Image.fromarray(np.clip(array / top * 255.0, 0, 255).astype(np.uint8), mode="L")
        notes.append(f"scaled {mode} pixels to 8 bits")
        mode = "L"
    if "A" in image.getbands() or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba).convert("RGB" if mode not in ("LA", "La") else "L")
        notes.append("flattened transparency onto white")
        mode = image.mode
    want = channels
    if want is None:
        want = 1 if mode in ("L", "1") else 3
    target = "L" if want == 1 else "RGB"
    if want not in (1, 3):
        raise ImageError(f"the model takes {want} channels; images can only be made grey (1) or RGB (3)")
    if mode != target:
        names = {"L": "grey", "RGB": "RGB", "1": "black-and-white", "P": "palette", "CMYK": "CMYK"}
        notes.append(f"converted {names.get(mode, mode)} to {names[target]}")
        image = image.convert(target)
    return image


def _load_images(
    paths: list[Path], channels: int | None, size: tuple[int, int] | None, invert: bool
) -> tuple[Tensor, tuple[int, int]]:
    """A batch [N, C, H, W] of images converted for the model; prints a note for each changed one."""
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
            _note(f"{path}: {'; '.join(notes)}")
        images.append(image)
    if size is None:
        _fail("no image given")
    return torch.stack(images), size


def _load(
    checkpoint: Path,
    model: str | None,
    channels: int | None,
    image_size: int | None,
    output_fn: str | None = None,
) -> LoadedModel:
    from peering.checkpoints import load_model

    return load_model(checkpoint, model, channels=channels, image_size=image_size, output=output_fn)


def _check_target(target: int | None, num_classes: int) -> None:
    if target is not None and not 0 <= target < num_classes:
        _fail(
            f"target {target} is out of range: the model has {num_classes} classes (0 to {num_classes - 1})"
        )


def _class_count(loaded: LoadedModel, images: Tensor) -> int:
    from peering.checkpoints import class_scores_of

    if loaded.num_classes is not None:
        return loaded.num_classes
    return int(class_scores_of(loaded, images[:1]).shape[1])


def _save(write: Callable[[Path], Any], path: Path) -> None:
    """Write ``path`` with ``write``, creating its missing folders (and saying so), or fail in one line."""
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        _fail(f"cannot write {path}: {blocker} is a file, not a folder")
    missing = next((p for p in reversed(path.parents) if not p.exists()), None)
    try:
        if missing is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            _note(f"created folder {missing}")
        write(path)
    except OSError as err:
        _fail(f"cannot write {path}: {err.strerror or err}")


# ----------------------------------------------------------------------------------------------- commands

_MODEL_HELP = (
    "Build the model with this factory (package.module:factory or file.py:factory); CHECKPOINT then "
)
_MODEL_HELP += "holds its state_dict."
ModelOption = Annotated[str | None, typer.Option("--model", help=_MODEL_HELP, show_default=False)]
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
_NORMALISE_HELP = (
    "The model takes normalised images (image - MEAN) / STD, e.g. 0.485,0.456,0.406 (one number, or one per "
    "channel); give --std too. The images are normalised for the model and shown as read."
)
MeanOption = Annotated[str | None, typer.Option("--mean", help=_NORMALISE_HELP, show_default=False)]
StdOption = Annotated[
    str | None,
    typer.Option(
        "--std", help="The STD of --mean's normalisation, e.g. 0.229,0.224,0.225.", show_default=False
    ),
]


def _normalisation(mean: str | None, std: str | None, channels: int | None) -> tuple[Tensor, Tensor] | None:
    """(mean, std) as [C, 1, 1] tensors from the --mean/--std options, or None without them. With
    ``channels`` None, any number of values is taken (the pictures check it against their images)."""
    if mean is None and std is None:
        return None
    if mean is None or std is None:
        _fail("--mean and --std go together: give both, or neither")

    def parse(text: str, name: str) -> Tensor:
        try:
            values = [float(v) for v in text.split(",") if v.strip()]
        except ValueError:
            _fail(f"{name} must be numbers separated by commas, got {text!r}")
        if channels is not None and len(values) not in (1, channels):
            _fail(
                f"{name} has {len(values)} values; the images have {channels} channels (give 1 or {channels})"
            )
        return torch.tensor(values, dtype=torch.float32).reshape(-1, 1, 1)

    m, s = parse(mean, "--mean"), parse(std, "--std")
    if not bool((s > 0).all()):
        _fail(f"--std must be positive, got {std}")
    return m, s


def _as_lists(normalisation: tuple[Tensor, Tensor]) -> tuple[list[float], list[float]]:
    """(mean, std) as lists of numbers: a ``display=`` for the pictures, or JSON."""
    return normalisation[0].flatten().tolist(), normalisation[1].flatten().tolist()


class _Normalising(torch.nn.Module):
    """The model behind a normalisation: takes images in [0, 1] (in the model's layout), normalises them."""

    mean: Tensor
    std: Tensor

    def __init__(self, model: torch.nn.Module, mean: Tensor, std: Tensor, image_shape: torch.Size) -> None:
        super().__init__()
        self.model, self.image_shape = model, image_shape
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: Tensor) -> Any:
        images = x.reshape(-1, *self.image_shape)
        return self.model(((images - self.mean) / self.std).reshape(x.shape))


@app.command()
def demo(
    dataset: Annotated[DatasetName, typer.Option(help="sklearn's 8x8 digits (offline) or MNIST.")] = (
        DatasetName.digits
    ),
    data_dir: Annotated[
        Path | None,
        typer.Option(help="Folder with the MNIST IDX files (default: $PEERING_DATA_DIR, else download)."),
    ] = None,
    epochs: Annotated[
        int | None, typer.Option(min=1, help="Training epochs (default: 10 digits, 2 MNIST).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for the split, initialisation and shuffling.")] = 0,
    out: Annotated[Path, typer.Option(help="Folder for runs.")] = Path("runs"),
    name: Annotated[str, typer.Option(help="The run's folder name under --out.")] = "demo",
    track: Annotated[int, typer.Option(min=0, help="Confused validation digits to follow.")] = 4,
    morph_digits: Annotated[int, typer.Option(min=0, help="Test digits to morph.")] = 4,
    sanity_digits: Annotated[
        int, typer.Option(min=0, help="Test digits for the randomisation sanity check (0: skip it).")
    ] = 32,
    threads: Annotated[int, typer.Option(min=1, help="CPU threads for torch.")] = 1,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Train the demo CNN while watching what confuses it; morph digits; write runs/<name>/report.html.

    Example: peering demo --epochs 5 --name quick
    """
    from peering.demo import run_demo

    console = _console()
    run_dir = out / name
    try:
        with _bad_input():
            try:
                result = run_demo(
                    out,
                    name,
                    dataset=dataset.value,
                    data_dir=data_dir,
                    epochs=epochs,
                    seed=seed,
                    track=track,
                    morph_digits=morph_digits,
                    sanity_digits=sanity_digits,
                    progress=progress,
                    threads=threads,
                    echo=lambda line: _print_flushed(console, line),
                )
            except ValueError as err:
                _fail(str(err))
            except OSError as err:
                _fail(f"cannot write the run to {run_dir}: {err.strerror or err}")
    except KeyboardInterrupt:
        typer.echo(f"\ninterrupted: {run_dir} is incomplete (no report was written)", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    console.print(f"Done in {result.seconds:.0f} s. Test accuracy {result.test_accuracy:.2%}.", markup=False)
    console.print(f"Report:      {result.report}", markup=False)
    console.print(f"             {result.report.resolve().as_uri()}", markup=False)
    console.print(f"TensorBoard: {result.tensorboard_command}", markup=False)


@app.command()
def explain(
    checkpoint: Annotated[Path, typer.Argument(help="A demo checkpoint, or a state_dict with --model.")],
    images: Annotated[list[Path], typer.Argument(help="PNG or JPEG images.")],
    target: Annotated[
        int | None, typer.Option("--target", "-t", help="Explain this class (default: the top --top-k).")
    ] = None,
    top_k: Annotated[int, typer.Option(min=1, help="Classes to explain when no --target.")] = 2,
    method: Annotated[MethodName, typer.Option(help="Attribution method.")] = MethodName.gradient,
    output: Annotated[OutputName, typer.Option(help="What is differentiated.")] = OutputName.probability,
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the picture.")] = Path(
        "explain.png"
    ),
    model: ModelOption = None,
    channels: ChannelsOption = None,
    image_size: SizeOption = None,
    output_fn: OutputFnOption = None,
    invert: InvertOption = False,
    zoom: ZoomOption = None,
    mean: MeanOption = None,
    std: StdOption = None,
) -> None:
    """The images and their input gradients toward the top two (or the given) classes, as one picture.

    Example: peering explain runs/demo/model.ckpt digit.png --target 8 -o explain.png
    """
    import peering
    from peering.render import explanation_image, save_png

    with _bad_input():
        loaded = _load(checkpoint, model, channels, image_size, output_fn)
        x, size = _load_images(images, loaded.channels, loaded.size, invert)
        normalisation = _normalisation(mean, std, x.shape[1])
        display = None
        if normalisation is not None:  # the model sees normalised images; the pictures undo it
            x = (x - normalisation[0]) / normalisation[1]
            display = _as_lists(normalisation)
        n_classes = _class_count(loaded, x)
        _check_target(target, n_classes)
        if target is None and top_k > n_classes:
            _fail(f"--top-k {top_k} is more than the model's {n_classes} classes")
        try:
            exp = peering.explain(
                loaded.model,
                loaded.batch(x),
                target,
                top_k=top_k,
                method=method.value,
                output=output.value,
                output_fn=loaded.output_fn,
            )
        except (ValueError, TypeError) as err:
            _fail(f"cannot explain {loaded.source}: {err}")
        picture_exp: Any = exp
        if loaded.flat:  # draw flat inputs as the images they came from
            shape = (*exp.attributions.shape[:2], *x.shape[1:])
            picture_exp = dataclasses.replace(exp, attributions=exp.attributions.reshape(shape))
        picture = explanation_image(
            picture_exp, x, zoom=zoom or _auto_zoom(max(size)), max_samples=None, display=display
        )
        _print_probabilities(images, exp)
        _save(lambda p: save_png(picture, p), out)
    what = f"class {target}" if target is not None else f"top {min(top_k, n_classes)} classes"
    typer.echo(f"wrote {out} ({method.value} of the {output.value} of the {what})")


def _print_probabilities(paths: list[Path], exp: object) -> None:
    from rich.table import Table
    from rich.text import Text

    probs: Tensor = exp.probabilities  # type: ignore[attr-defined]
    n_classes = probs.shape[1]
    table = Table(title="class probabilities", title_justify="left", box=None, pad_edge=False)
    table.add_column("image", no_wrap=True, overflow="ellipsis", max_width=32)
    table.add_column("predicted", justify="right")
    shown = list(range(n_classes)) if n_classes <= 10 else None
    if shown is not None:
        for c in shown:
            table.add_column(str(c), justify="right")
    else:
        table.add_column("top 5", justify="left")
    for path, row in zip(paths, probs.tolist(), strict=True):
        best = int(np.argmax(row))
        cells: list[str | Text] = [Text(path.name), f"{best} ({row[best]:.2f})"]
        if shown is not None:
            cells += [f"[bold]{p:.2f}[/bold]" if c == best else f"{p:.2f}" for c, p in enumerate(row)]
        else:
            top = np.argsort(row)[::-1][:5]
            cells.append(", ".join(f"{int(c)}: {row[int(c)]:.2f}" for c in top))
        table.add_row(*cells)
    _console().print(table)


_REFERENCE_HELP = (
    "Reference images for the data prior that makes morphs other models believe: 'run' (the training "
    "digits of the demo run the checkpoint is in, from its run.json; none for other checkpoints), 'digits' "
    "(scikit-learn's 8x8 digits), 'mnist' (the t10k digits in --data-dir), or 'none'."
)
ReferenceOption = Annotated[ReferenceName, typer.Option("--reference", help=_REFERENCE_HELP)]
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


def _reference_data(
    reference: ReferenceName, checkpoint: Path, data_dir: Path | None, shape: tuple[int, ...]
) -> tuple[Tensor, Tensor] | None:
    """The reference images [N, *shape] and labels for the data prior, or None (said on stderr)."""
    from peering.data import DATA_DIR_ENV, load_digits, load_mnist

    if reference is ReferenceName.none:
        return None
    if reference is ReferenceName.run:
        from peering.demo import RUN_FILE, training_data

        run_dir = checkpoint.parent
        if not (run_dir / RUN_FILE).is_file():
            _note(
                f"no {RUN_FILE} beside {checkpoint.name}: morphing without a data prior, which other models "
                "believe far less often; pass --reference digits|mnist (images like the training data)"
            )
            return None
        try:
            images, labels = training_data(run_dir)
        except (OSError, ValueError) as err:
            _fail(f"cannot read the reference digits of the run {run_dir}: {err}")
        where = f"the training digits of {run_dir}"
    elif reference is ReferenceName.digits:
        images, labels = load_digits()
        where = "scikit-learn's digits"
    else:
        import os

        root = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV)
        if not root:
            _fail(f"--reference mnist needs --data-dir or ${DATA_DIR_ENV}: the folder of the MNIST IDX files")
        images, labels = load_mnist(root, "test")
        where = f"the MNIST t10k digits in {root}"
    if images[0].numel() != math.prod(shape):
        _fail(
            f"the reference images ({where}) are {list(images.shape[1:])} but the model takes {list(shape)}; "
            "pass --reference with images like the model's training data, or --reference none"
        )
    _note(f"data prior: {len(images):,} reference images, {where}")
    return images.reshape(len(images), *shape), labels


@app.command()
def morph(
    checkpoint: Annotated[Path, typer.Argument(help="A demo checkpoint, or a state_dict with --model.")],
    image: Annotated[Path, typer.Argument(help="A PNG or JPEG image.")],
    target: Annotated[int, typer.Option("--target", "-t", help="The class to morph the image into.")],
    steps: Annotated[int, typer.Option(min=0, help="The most gradient-ascent steps.")] = 300,
    confidence: ConfidenceOption = 0.99,
    reference: ReferenceOption = ReferenceName.run,
    data_dir: DataDirOption = None,
    smoothing: SmoothingOption = None,
    budget: Annotated[
        float | None, typer.Option(min=0.0, help="The largest distance from the original image.")
    ] = None,
    step_size: Annotated[float | None, typer.Option(min=0.0, help="Length of each step.")] = None,
    norm: Annotated[NormName, typer.Option(help="Step normalisation and budget ball.")] = NormName.l2,
    gif: Annotated[Path | None, typer.Option(help="Also write the morph as an animated GIF.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the film strip.")] = Path(
        "morph.png"
    ),
    model: ModelOption = None,
    channels: ChannelsOption = None,
    image_size: SizeOption = None,
    output_fn: OutputFnOption = None,
    invert: InvertOption = False,
    zoom: ZoomOption = None,
    mean: MeanOption = None,
    std: StdOption = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Change the image step by step until the model gives --target a probability of --confidence; film
    strip and distance.

    With a data prior (--reference: by default the training digits of the demo run the checkpoint is in)
    the change is one other models also read as the target. With --mean/--std the morph still walks the
    image itself (the normalisation is put in front of the model), so the pixel range and --budget are in
    image units.

    Example: peering morph runs/demo/model.ckpt five.png --target 8 --gif morph.gif
    """
    import peering
    from peering.render import film_strip, save_gif, save_png

    with _bad_input():
        loaded = _load(checkpoint, model, channels, image_size, output_fn)
        x, size = _load_images([image], loaded.channels, loaded.size, invert)
        normalisation = _normalisation(mean, std, x.shape[1])
        if normalisation is not None:
            loaded = dataclasses.replace(
                loaded, model=_Normalising(loaded.model, *normalisation, x.shape[1:]).eval()
            )
        n_classes = _class_count(loaded, x)
        _check_target(target, n_classes)
        if step_size is not None and step_size <= 0:
            _fail(f"--step-size must be > 0, got {step_size}")
        from peering.checkpoints import class_scores_of

        before = class_scores_of(loaded, x).softmax(dim=1)[0]
        batch = loaded.batch(x)
        references = _reference_data(reference, checkpoint, data_dir, tuple(batch.shape[1:]))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the outcome is printed below
                result = peering.morph(
                    loaded.model,
                    batch,
                    target,
                    steps=steps,
                    confidence=confidence or None,
                    smoothing="auto" if smoothing is None else smoothing,
                    prior=None if references is None else peering.priors.Prototypes(*references),
                    budget=budget,
                    step_size=step_size,
                    norm=norm.value,
                    progress=progress,
                    output_fn=loaded.output_fn,
                )
        except (ValueError, TypeError) as err:
            _fail(f"cannot morph with {loaded.source}: {err}")
        shown = _unflatten(result, x.shape[1:]) if loaded.flat else result
        predicted = int(before.argmax())
        typer.echo(
            f"{image.name}: predicted {predicted} (p={float(before[predicted]):.2f}); "
            f"p({target})={float(before[target]):.2f} before morphing"
        )
        distance = float(result.distance[0])
        p_after = float(result.probabilities[0, target])
        rule = f"p({target}) >= {confidence:g}" if confidence else f"the top class {target}"
        if bool(result.success[0]):
            reached = int(result.steps[0])
            when = "already at step 0" if reached == 0 else f"at step {reached}"
            typer.echo(
                f"reached {rule} {when}: p({target})={p_after:.2f}, {norm.value} distance {distance:.3f}"
            )
        else:
            now = int(result.probabilities[0].argmax())
            limit = f" (budget {budget:g})" if budget is not None else ""
            typer.echo(
                f"did not reach {rule} in {steps} steps{limit}: predicted {now}, "
                f"p({target})={p_after:.2f}, {norm.value} distance {distance:.3f}; try more --steps or a "
                "lower --confidence"
            )
        z = zoom or _auto_zoom(max(size))  # the strip and the GIF end where the image reached the target
        _save(lambda p: save_png(film_strip(shown, 0, zoom=z), p), out)
        typer.echo(f"wrote {out}")
        if gif is not None:
            _save(lambda p: save_gif(shown, 0, p, zoom=z), gif)
            typer.echo(f"wrote {gif}")


def _unflatten(result: MorphResult, shape: torch.Size) -> MorphResult:
    """A morph of flat inputs [B, D] viewed as the images [B, C, H, W] they came from."""
    return dataclasses.replace(
        result,
        inputs=result.inputs.reshape(-1, *shape),
        frames=result.frames.reshape(*result.frames.shape[:2], *shape),
    )


# ----------------------------------------------------------------------------------------- explain-dataset

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
DATASET_FILE = "dataset.json"
"""What ``peering explain-dataset`` ran over, beside the writer's manifest (the report reads it back)."""


class _ImageFiles(torch.utils.data.Dataset):
    """The images of a folder, read one by one when asked (converted for the model), with their labels."""

    def __init__(
        self, root: Path, files: list[str], channels: int | None, size: tuple[int, int], invert: bool,
        labels: list[int],
    ) -> None:
        self.root, self.files, self.channels, self.size = root, files, channels, size
        self.invert, self.labels = invert, labels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, _ = read_image(self.root / self.files[index], self.channels, self.size, invert=self.invert)
        return image, self.labels[index]


class _NormalisedImages(torch.utils.data.Dataset):
    """The (image, label) pairs of ``dataset`` with the images normalised for the model: (x - mean) / std."""

    def __init__(self, dataset: torch.utils.data.Dataset, mean: Tensor, std: Tensor) -> None:
        self.dataset, self.mean, self.std = dataset, mean, std

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, Any]:
        image, label = self.dataset[index]
        return (image - self.mean) / self.std, label


def _folder_dataset(
    folder: Path, loaded: LoadedModel, invert: bool, num_classes: int
) -> tuple[_ImageFiles, dict[str, Any]]:
    files = sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES
    )
    if not files:
        _fail(f"no images ({', '.join(_IMAGE_SUFFIXES)}) in {folder}")
    first, notes = read_image(folder / files[0], loaded.channels, loaded.size, invert=invert)
    size = loaded.size or (int(first.shape[1]), int(first.shape[2]))
    channels = loaded.channels or int(first.shape[0])
    if notes:
        _note(f"images are converted to {channels}x{size[0]}x{size[1]} (first one: {'; '.join(notes)})")
    parents = [f.split("/")[0] if "/" in f else "" for f in files]
    by_class = all(p.isdigit() and int(p) < num_classes for p in parents)
    labels = [int(p) for p in parents] if by_class else [-1] * len(files)
    if by_class:
        _note("labels from the subfolder names")
    source = {"data": "folder", "root": str(folder.resolve()), "files": files, "channels": channels,
              "size": list(size), "invert": invert}
    return _ImageFiles(folder, files, channels, size, invert, labels), source


def _named_dataset(
    name: str, data_dir: Path | None, loaded: LoadedModel
) -> tuple[torch.utils.data.Dataset, dict[str, Any]]:
    import os

    from torch.utils.data import TensorDataset

    from peering.data import DATA_DIR_ENV, load_digits, load_mnist

    if name == "digits":
        images, labels = load_digits()
        source: dict[str, Any] = {"data": "digits"}
    else:
        root = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV)
        if not root:
            _fail(f"--data mnist needs the MNIST IDX files: pass --data-dir or set {DATA_DIR_ENV}")
        images, labels = load_mnist(Path(root).expanduser(), "test")
        source = {"data": "mnist", "root": str(Path(root).expanduser().resolve()), "split": "test"}
    shape = tuple(images.shape[1:])
    want = None
    if loaded.size is not None and loaded.channels is not None:
        want = (loaded.channels, *loaded.size)
    if want is not None and shape != want:
        _fail(
            f"{loaded.source} takes {want[0]}x{want[1]}x{want[2]} images but the {name} images are "
            f"{shape[0]}x{shape[1]}x{shape[2]}; use the data set it was trained on, or a folder of images "
            "(converted to its size)"
        )
    return TensorDataset(images, labels), source


@app.command("explain-dataset")
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
) -> None:
    """Explain every sample of a data set with Trainer.predict on one or more devices; shards in --out.

    Read them with peering.load_attributions(OUT); `peering report OUT` shows them. With --mean/--std the
    model is fed normalised images (the attributions are of those, as with `peering explain`), and the
    report shows the images as read.

    Example: peering explain-dataset runs/demo/model.ckpt --data digits --out runs/digits-explained
    """
    import time

    with _bad_input():
        loaded = _load(checkpoint, model, channels, image_size)
        folder = Path(data)
        n_classes = loaded.num_classes
        if data in ("mnist", "digits"):
            dataset, source = _named_dataset(data, data_dir, loaded)
        elif folder.is_dir():
            if n_classes is None:
                probe, _ = read_image(next(p for p in sorted(folder.rglob("*")) if p.is_file()),
                                      loaded.channels, loaded.size, invert=invert)
                n_classes = _class_count(loaded, probe.unsqueeze(0))
            dataset, source = _folder_dataset(folder, loaded, invert, n_classes)
        else:
            _fail(f"--data must be mnist, digits or a folder of images; {data} is none of these")
        normalisation = _normalisation(mean, std, int(dataset[0][0].shape[0]))
        if normalisation is not None:
            dataset = _NormalisedImages(dataset, *normalisation)
            source["normalisation"] = dict(zip(("mean", "std"), _as_lists(normalisation), strict=True))
        parsed_target: int | str | None = None
        if target is not None:
            if target == "label":
                parsed_target = "label"
            elif target.isdigit():
                parsed_target = int(target)
                _check_target(parsed_target, n_classes or _class_count(loaded, dataset[0][0].unsqueeze(0)))
            else:
                _fail(f"--target must be 'label' or a class number, got {target!r}")
        source.update(checkpoint=str(checkpoint.resolve()), model=model)
        _record_source(out, source)
        start = time.perf_counter()
        done_before = _samples_done(out)
        total = _run_predict(loaded, dataset, out, devices=devices, accelerator=accelerator,
                             batch_size=batch_size, workers=workers, progress=progress,
                             writer_kwargs={"top_k": top_k, "target": parsed_target,
                                            "method": method.value, "output": output.value})
        seconds = time.perf_counter() - start
    explained = total - done_before
    what = (f"class {parsed_target}" if isinstance(parsed_target, int)
            else "the label" if parsed_target == "label" else f"top {top_k} classes")
    typer.echo(
        f"explained {explained:,} of {total:,} samples ({method.value} of the {output.value} of the {what}) "
        f"in {seconds:.1f} s on {devices} device(s)"
        + (f"; {done_before:,} were already done" if done_before else "")
    )
    typer.echo(f"wrote {out}  (peering.load_attributions({str(out)!r}), or: peering report {out})")


def _record_source(out: Path, source: dict[str, Any]) -> None:
    """Write ``out/dataset.json``, refusing a folder that holds a run over other data or weights."""
    import json

    from peering.demo import write_json_atomic

    previous = out / DATASET_FILE
    if previous.is_file():
        try:
            before = json.loads(previous.read_text())
        except ValueError:
            before = None
        if before is not None and before != source:
            _fail(f"{out} holds a run over other data or of another checkpoint ({previous}); use another "
                  "--out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / DATASET_FILE, source)
    except OSError as err:
        _fail(f"cannot write to {out}: {err.strerror or err}")


def _samples_done(out: Path) -> int:
    from peering.store import ShardError, load_attributions

    try:
        return len(load_attributions(out, verify=False, allow_incomplete=True))
    except ShardError:
        return 0


def _run_predict(
    loaded: LoadedModel,
    dataset: torch.utils.data.Dataset,
    out: Path,
    *,
    devices: int,
    accelerator: str,
    batch_size: int,
    workers: int,
    progress: bool,
    writer_kwargs: dict[str, Any],
) -> int:
    """Trainer.predict with the writer on ``devices`` processes; the number of samples in the finished run."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from peering.demo import _quiet_lightning
    from peering.lightning import AttributionWriter
    from peering.lightning.writer import _ExplainedModule
    from peering.store import ShardError, read_manifest

    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    try:
        with _quiet_lightning():
            trainer = pl.Trainer(
                accelerator=accelerator,
                devices=devices,
                strategy="ddp_spawn" if devices > 1 else "auto",
                logger=False,
                enable_checkpointing=False,
                enable_model_summary=False,
                enable_progress_bar=progress,
                callbacks=[AttributionWriter(out, **writer_kwargs)],
                default_root_dir=str(out),
            )
            module = _ExplainedModule(loaded.model, loaded.flat)
            trainer.predict(module, loader, return_predictions=False)
    except (ShardError, ImageError) as err:
        _fail(str(err))
    except Exception as err:  # an error in a spawned process arrives as its traceback text
        _fail(f"explaining failed: {_last_line(err)}")
    manifest = read_manifest(out) or {}
    return int(manifest.get("complete", {}).get("0", {}).get("samples", 0))


def _last_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__


class BaselineName(str, Enum):
    """What a deleted input element becomes in `peering.faithfulness.deletion_insertion`."""

    zero = "zero"
    blur = "blur"
    mean = "mean"


_DEMO_DATASET_BY_SIZE = {8: "digits", 28: "mnist"}


def _check_inputs(
    checkpoint: Path,
    loaded: LoadedModel,
    images: list[Path] | None,
    dataset: DatasetName | None,
    data_dir: Path | None,
    samples: int,
    invert: bool,
) -> tuple[Tensor, str]:
    """The images to check on, [N, C, H, W], and where they come from."""
    if images:
        x, _ = _load_images(images, loaded.channels, loaded.size, invert)
        return x[:samples], f"{min(len(images), samples)} given image(s)"
    from peering.demo import RUN_FILE, load_demo_data

    run: dict[str, Any] = {}
    run_file = checkpoint.parent / RUN_FILE
    if run_file.is_file():
        import json

        try:
            run = json.loads(run_file.read_text())
        except (OSError, ValueError):
            _note(f"cannot read {run_file}; using the defaults")
    name = dataset.value if dataset is not None else run.get("dataset")
    if name is None and loaded.size is not None and loaded.size[0] == loaded.size[1]:
        name = _DEMO_DATASET_BY_SIZE.get(loaded.size[0])
    if name not in ("digits", "mnist"):
        _fail(
            f"cannot tell which digits to check {loaded.source} on (it takes {loaded.size or 'unknown'} "
            "inputs); pass IMAGE files, or --dataset digits|mnist"
        )
    seed = run.get("seed", 0)
    _, _, test_x, _, _ = load_demo_data(str(name), data_dir, int(seed), _note)
    kind = {"digits": "scikit-learn 8x8", "mnist": "MNIST"}[str(name)]
    if tuple(test_x.shape[1:]) != (loaded.channels or 1, *(loaded.size or test_x.shape[2:])):
        _fail(
            f"{loaded.source} takes inputs [{loaded.channels}, {', '.join(map(str, loaded.size or ()))}], "
            f"but the {kind} digits are {list(test_x.shape[1:])}; pass IMAGE files of its size, or the "
            "other --dataset"
        )
    return test_x[:samples], f"the first {min(samples, len(test_x))} of the demo's held-out {kind} digits"


@app.command()
def check(
    checkpoint: Annotated[Path, typer.Argument(help="A demo checkpoint, or a state_dict with --model.")],
    images: Annotated[
        list[Path] | None,
        typer.Argument(help="PNG or JPEG images to check on (default: the demo's held-out digits).",
                       show_default=False),
    ] = None,
    samples: Annotated[int, typer.Option(min=1, help="How many digits (or images) to use.")] = 64,
    method: Annotated[
        list[MethodName] | None,
        typer.Option("--method", help="A method to check (repeat for several; default: all four).",
                     show_default=False),
    ] = None,
    dataset: Annotated[
        DatasetName | None,
        typer.Option(help="The demo's digits to use (default: the run's, else by the model's input size).",
                     show_default=False),
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Folder with the MNIST IDX files (default: $PEERING_DATA_DIR).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the re-initialisation and of the random control.")] = 0,
    threshold: Annotated[
        float, typer.Option(min=-1.0, max=1.0, help="Pass when the final rank correlation is at most this.")
    ] = 0.5,
    faithfulness: Annotated[
        bool, typer.Option(help="Also measure deletion and insertion curves.")
    ] = True,
    baseline: Annotated[
        BaselineName, typer.Option(help="What deleted pixels become (deletion/insertion).")
    ] = BaselineName.zero,
    model: ModelOption = None,
    channels: ChannelsOption = None,
    image_size: SizeOption = None,
    invert: InvertOption = False,
    output_fn: OutputFnOption = None,
) -> None:
    """Can you trust the maps of this model? The randomisation sanity check, and deletion/insertion.

    Re-initialises the model's layers from the output down, one more at a time (on a copy), and prints,
    per method, the rank correlation of the maps with the trained model's after each step, and whether
    the method passes (the maps must stop resembling the trained model's). Then the deletion and
    insertion areas of each method's maps against a random ranking.

    Example: peering check runs/demo/model.ckpt --method gradient --method smoothgrad
    """
    import time

    from peering.faithfulness import deletion_insertion
    from peering.sanity import randomisation_check

    methods = [m.value for m in (method or list(MethodName))]
    methods = list(dict.fromkeys(methods))
    console = _console()
    with _bad_input():
        loaded = _load(checkpoint, model, channels, image_size, output_fn)
        x, source = _check_inputs(checkpoint, loaded, images, dataset, data_dir, samples, invert)
        batch = loaded.batch(x)
        console.print(f"Checking {loaded.source} on {source}.", markup=False, soft_wrap=True)
        console.file.flush()
        started = time.perf_counter()
        try:
            result = randomisation_check(
                loaded.model, batch, methods=methods, seed=seed, threshold=threshold,
                output_fn=loaded.output_fn,
            )
        except (ValueError, TypeError) as err:
            _fail(f"cannot check {loaded.source}: {err}")
        seconds = time.perf_counter() - started
        _print_sanity(console, result, seconds)
        if faithfulness:
            import peering

            rows = {}
            started = time.perf_counter()
            try:
                for name in methods:
                    exp = peering.explain(
                        loaded.model, batch, result.targets, method=name, output_fn=loaded.output_fn
                    )
                    rows[name] = deletion_insertion(
                        loaded.model, batch, exp, baseline=baseline.value, seed=seed,
                        output_fn=loaded.output_fn,
                    ).summary()
            except (ValueError, TypeError) as err:
                _fail(f"cannot measure deletion/insertion with {loaded.source}: {err}")
            _print_faithfulness(console, rows, baseline.value, time.perf_counter() - started)


def _print_sanity(console: Console, result: Any, seconds: float) -> None:
    from rich.table import Table

    console.print(
        "\nSanity check: rank correlation of |maps| with the trained model's as layers are re-initialised "
        "from the output down (on a copy); 'unrelated': two independently re-initialised copies",
        markup=False,
        soft_wrap=True,
    )
    table = Table(box=None, pad_edge=False)
    table.add_column("method", no_wrap=True)
    for i, layer in enumerate(result.layers):
        table.add_column(layer if i == 0 else f"+{layer}", justify="right")
    table.add_column("unrelated", justify="right")
    table.add_column("verdict", no_wrap=True)
    for name in result.methods:
        cells = [f"{v:.2f}" if math.isfinite(v) else "n/a" for v in result.correlation[name].tolist()]
        unrelated = result.unrelated[name]
        passed = result.passed[name]
        verdict = {True: "[green]passes[/green]", False: "[red]fails[/red]", None: "undecided"}[passed]
        table.add_row(name, *cells, f"{unrelated:.2f}" if math.isfinite(unrelated) else "n/a", verdict)
    console.print(table)
    console.print(
        f"A method passes when the last correlation is at most {result.threshold:g} ({seconds:.1f} s).",
        markup=False,
        soft_wrap=True,
    )
    for name in result.methods:
        if result.passed[name] is not True:
            console.print(f"  {name} {result.verdict(name)}", markup=False, soft_wrap=True)


def _print_faithfulness(
    console: Console, rows: dict[str, dict[str, float]], baseline: str, seconds: float
) -> None:
    from rich.table import Table

    console.print(
        f"\nDeletion / insertion: area under the class probability curve as the most important pixels are "
        f"replaced by the baseline ({baseline}) / put back into it",
        markup=False,
        soft_wrap=True,
    )
    table = Table(box=None, pad_edge=False)
    table.add_column("ranking", no_wrap=True)
    table.add_column("deletion (lower: better)", justify="right")
    table.add_column("insertion (higher: better)", justify="right")
    for name, row in rows.items():
        table.add_row(name, f"{row['deletion']:.3f}", f"{row['insertion']:.3f}")
    first = next(iter(rows.values()))
    table.add_row("random (control)", f"{first['random_deletion']:.3f}", f"{first['random_insertion']:.3f}")
    console.print(table)
    console.print(f"{seconds:.1f} s.", markup=False)


@app.command()
def portraits(
    checkpoint: Annotated[Path, typer.Argument(help="A demo checkpoint, or a state_dict with --model.")],
    start: Annotated[
        StartName, typer.Option(help="Start from the mean reference image, a blank or noise.")
    ] = StartName.mean,
    steps: Annotated[int, typer.Option(min=0, help="The most gradient-ascent steps.")] = 300,
    confidence: ConfidenceOption = 0.99,
    reference: ReferenceOption = ReferenceName.run,
    data_dir: DataDirOption = None,
    smoothing: SmoothingOption = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the row of portraits.")] = Path(
        "portraits.png"
    ),
    model: ModelOption = None,
    channels: ChannelsOption = None,
    image_size: SizeOption = None,
    output_fn: OutputFnOption = None,
    zoom: ZoomOption = None,
    seed: Annotated[int, typer.Option(help="Seed of --start noise.")] = 0,
) -> None:
    """What the model thinks each class looks like: one image morphed toward every class at once.

    Starts from the mean of the reference images (--reference: by default the training digits of the
    demo run the checkpoint is in), a blank or a noise image, and ascends toward each class with morph's
    stopping rule and data prior; writes the portraits side by side.

    Example: peering portraits runs/demo/model.ckpt -o portraits.png
    """
    import peering
    from peering.render import portrait_row, save_png

    with _bad_input():
        loaded = _load(checkpoint, model, channels, image_size, output_fn)
        if loaded.channels is None or loaded.size is None:
            _fail(f"cannot tell the input size of {loaded.source}: pass --channels and --image-size")
        shape = (loaded.channels, *loaded.size)
        blank = torch.zeros(1, *shape)
        sample = tuple(loaded.batch(blank).shape[1:])
        references = _reference_data(reference, checkpoint, data_dir, sample)
        if start is StartName.mean:
            if references is None:
                _fail("--start mean needs reference images (--reference); or pass --start blank or noise")
            first = references[0].mean(0, keepdim=True)
        elif start is StartName.blank:
            first = loaded.batch(blank)
        else:
            noise = torch.rand(blank.shape, generator=torch.Generator().manual_seed(seed)) * 0.5
            first = loaded.batch(noise)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the outcome is printed below
                result = peering.portraits(
                    loaded.model,
                    first,
                    steps=steps,
                    confidence=confidence or None,
                    smoothing="auto" if smoothing is None else smoothing,
                    prior=None if references is None else peering.priors.Prototypes(*references),
                    output_fn=loaded.output_fn,
                )
        except (ValueError, TypeError) as err:
            _fail(f"cannot draw portraits with {loaded.source}: {err}")
        shown = _unflatten(result, torch.Size(shape)) if loaded.flat else result
        probabilities = result.probabilities.diagonal()
        typer.echo("class        " + " ".join(f"{k:>5d}" for k in range(len(probabilities))))
        typer.echo("p(class)     " + " ".join(f"{float(p):5.2f}" for p in probabilities))
        missed = (~result.success).nonzero().flatten().tolist()
        if missed:
            typer.echo(f"not reached in {steps} steps: {missed}; try more --steps or a lower --confidence")
        z = zoom or _auto_zoom(max(loaded.size))
        _save(lambda p: save_png(portrait_row(shown, zoom=z), p), out)
        typer.echo(f"wrote {out}")


@app.command()
def report(
    run_dir: Annotated[
        Path,
        typer.Argument(help="A `peering demo` run folder, a log folder, or an explain-dataset --out folder."),
    ],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Where to write (default RUN_DIR/report.html).")
    ] = None,
    max_per_epoch: Annotated[int, typer.Option(min=1, help="Training pictures shown per epoch.")] = 6,
    mean: Annotated[
        str | None,
        typer.Option(
            "--mean",
            help="Undo this normalisation (per channel) when drawing a dataset run's inputs; give --std too.",
            show_default=False,
        ),
    ] = None,
    std: StdOption = None,
) -> None:
    """(Re)build RUN_DIR/report.html from the run's event files and PNGs, or from dataset attributions.

    --mean/--std show inputs the report draws itself (a dataset run's) as x * std + mean; a training run's
    pictures were drawn by the callback (its display=) and are embedded as they are.

    Example: peering report runs/demo
    """
    from peering.lightning.sinks import no_pictures_reason
    from peering.report import build_report, find_log_dir

    with _bad_input():
        normalisation = _normalisation(mean, std, None)  # the report checks them against its images
        display = None if normalisation is None else _as_lists(normalisation)
        try:
            path = build_report(run_dir, out, max_per_epoch=max_per_epoch, display=display)
        except OSError as err:
            _fail(f"cannot write the report of {run_dir}: {err.strerror or err}")
        except ValueError as err:
            if display is None:
                raise
            _fail(f"--mean/--std do not fit the run's inputs: {err}")
    log_dir = find_log_dir(run_dir)
    if log_dir is not None and (why := no_pictures_reason(log_dir)):
        typer.echo(why)
    typer.echo(f"wrote {path}")


def main() -> None:
    """The ``peering`` console script.

    >>> from typer.testing import CliRunner
    >>> CliRunner().invoke(app, ["--help"]).exit_code
    0
    """
    app()


if __name__ == "__main__":
    main()
