"""`peering explain`: the images and their input gradients, as one picture."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from peering.cli.common import (
    ChannelsOption,
    InvertOption,
    MeanOption,
    MethodName,
    ModelOption,
    OutputFnOption,
    OutputName,
    SizeOption,
    StdOption,
    ZoomOption,
    auto_zoom,
    bad_input,
    check_target,
    class_count,
    console,
    fail,
    load,
    load_images,
    parse_normalisation,
    save,
)

if TYPE_CHECKING:
    from torch import Tensor

__all__: list[str] = []  # a command of the app (peering.cli.app); its docstring is its --help


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

    --output sigmoid explains a multi-label (or single-logit binary) model by each class's own sigmoid
    probability; --output raw a model whose output is the quantity itself (a regression). A model with one
    output is refused with a softmax (probability, log_probability).

    Example: peering explain runs/demo/model.ckpt digit.png --target 8 -o explain.png
    """
    import peering
    from peering.render import explanation_image, save_png

    with bad_input():
        loaded = load(checkpoint, model, channels, image_size, output_fn)
        x, size = load_images(images, loaded.channels, loaded.size, invert)
        norm = parse_normalisation(mean, std, x.shape[1])
        display = None
        if norm is not None:  # the model sees normalised images (as in Python); the pictures undo it
            x, display = norm.apply(x), norm.display
        n_classes = class_count(loaded, x)
        check_target(target, n_classes)
        if target is None and top_k > n_classes and output is not OutputName.raw:
            fail(f"--top-k {top_k} is more than the model's {n_classes} classes")
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
            fail(f"cannot explain {loaded.source}: {err}")
        picture_exp: Any = exp
        if loaded.flat:  # draw flat inputs as the images they came from
            shape = (*exp.attributions.shape[:2], *x.shape[1:])
            picture_exp = dataclasses.replace(exp, attributions=exp.attributions.reshape(shape))
        picture = explanation_image(
            picture_exp, x, zoom=zoom or auto_zoom(max(size)), max_samples=None, display=display
        )
        _print_probabilities(images, exp, output.value)
        save(lambda p: save_png(picture, p), out)
    what = f"class {target}" if target is not None else f"top {min(top_k, n_classes)} classes"
    typer.echo(f"wrote {out} ({method.value} of the {output.value} of the {what})")


def _print_probabilities(paths: list[Path], exp: object, output: str) -> None:
    """The class probabilities (softmax; each class's own sigmoid for "sigmoid"), or the outputs for "raw"
    (a regression has no probabilities)."""
    import numpy as np
    from rich.table import Table
    from rich.text import Text

    raw = output == "raw"
    probs: Tensor = exp.logits if raw else exp.probabilities  # type: ignore[attr-defined]
    n_classes = probs.shape[1]
    title = {"raw": "outputs", "sigmoid": "class probabilities (sigmoid)"}
    table = Table(title=title.get(output, "class probabilities"), title_justify="left", box=None,
                  pad_edge=False)
    table.add_column("image", no_wrap=True, overflow="ellipsis", max_width=32)
    table.add_column("largest" if raw else "predicted", justify="right")
    shown = list(range(n_classes)) if n_classes <= 10 else None
    if shown is not None:
        for c in shown:
            table.add_column(str(c), justify="right")
    else:
        table.add_column("top 5", justify="left")
    fmt = "{:.4g}" if raw else "{:.2f}"
    for path, row in zip(paths, probs.tolist(), strict=True):
        best = int(np.argmax(row))
        cells: list[str | Text] = [Text(path.name), f"{best} ({fmt.format(row[best])})"]
        if shown is not None:
            values = [fmt.format(p) for p in row]
            cells += [f"[bold]{v}[/bold]" if c == best else v for c, v in enumerate(values)]
        else:
            top = np.argsort(row)[::-1][:5]
            cells.append(", ".join(f"{int(c)}: {fmt.format(row[int(c)])}" for c in top))
        table.add_row(*cells)
    console().print(table)
