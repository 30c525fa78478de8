"""`peering`: the command line.

::

    peering demo [--dataset digits|mnist] [--data-dir DIR] [--epochs N] [--seed S] [--out runs] [--name demo]
    peering explain CHECKPOINT IMAGE... [--target K] [--method gradient] [-o explain.png]
    peering morph CHECKPOINT IMAGE --target K [--confidence 0.99] [--reference run] [--gif g.gif] [-o m.png]
    peering portraits CHECKPOINT [--start mean] [--reference run] [-o portraits.png]
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

    try:
        yield
    except (CheckpointError, ImageError, ReportError, DatasetError) as err:
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


def _normalisation(mean: str | None, std: str | None, channels: int) -> tuple[Tensor, Tensor] | None:
    """(mean, std) as [C, 1, 1] tensors from the --mean/--std options, or None without them."""
    if mean is None and std is None:
        return None
    if mean is None or std is None:
        _fail("--mean and --std go together: give both, or neither")

    def parse(text: str, name: str) -> Tensor:
        try:
            values = [float(v) for v in text.split(",") if v.strip()]
        except ValueError:
            _fail(f"{name} must be numbers separated by commas, got {text!r}")
        if len(values) not in (1, channels):
            _fail(
                f"{name} has {len(values)} values; the images have {channels} channels (give 1 or {channels})"
            )
        return torch.tensor(values, dtype=torch.float32).reshape(-1, 1, 1)

    m, s = parse(mean, "--mean"), parse(std, "--std")
    if not bool((s > 0).all()):
        _fail(f"--std must be positive, got {std}")
    return m, s


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
            display = (normalisation[0].flatten().tolist(), normalisation[1].flatten().tolist())
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
    run_dir: Annotated[Path, typer.Argument(help="A run folder written by `peering demo`, or a log folder.")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Where to write (default RUN_DIR/report.html).")
    ] = None,
    max_per_epoch: Annotated[int, typer.Option(min=1, help="Training pictures shown per epoch.")] = 6,
) -> None:
    """(Re)build RUN_DIR/report.html from the run's event files and PNGs.

    Example: peering report runs/demo
    """
    from peering.report import build_report

    with _bad_input():
        try:
            path = build_report(run_dir, out, max_per_epoch=max_per_epoch)
        except OSError as err:
            _fail(f"cannot write the report of {run_dir}: {err.strerror or err}")
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
