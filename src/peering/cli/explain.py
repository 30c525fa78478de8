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
    check_output_file,
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

    from peering.checkpoints import LoadedModel

__all__: list[str] = []  # a command of the app (peering.cli.app); its docstring is its --help


CLI_HINT = "--output log_probability (or logit)"
"""What a picture's saturation note tells a command-line user to pass."""


def explain(
    checkpoint: Annotated[
        Path,
        typer.Argument(
            metavar="CHECKPOINT",
            help="A demo checkpoint, a state_dict with --model, TorchScript, a torch.export .pt2, or a "
            "Hugging Face save_pretrained folder.",
        ),
    ],
    images: Annotated[
        list[Path] | None,
        typer.Argument(
            metavar="INPUTS...",
            help="Images (PNG, JPEG, ...), or for a text classifier text files (one text each).",
            show_default=False,
        ),
    ] = None,
    text: Annotated[
        list[str] | None,
        typer.Option(
            "--text", help="A text to explain (text classifiers; repeat for several).", show_default=False
        ),
    ] = None,
    target: Annotated[
        int | None, typer.Option("--target", "-t", help="Explain this class (default: the top --top-k).")
    ] = None,
    top_k: Annotated[int, typer.Option(min=1, help="Classes to explain when no --target.")] = 2,
    method: Annotated[
        MethodName | None,
        typer.Option(
            help="Attribution method (default: gradient; input_x_gradient for text).", show_default=False
        ),
    ] = None,
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
    """The images (or texts) and their input gradients toward the top two (or the given) classes, as one
    picture.

    --output sigmoid explains a multi-label (or single-logit binary) model by each class's own sigmoid
    probability; --output raw a model whose output is the quantity itself (a regression). A model with one
    output is refused with a softmax (probability, log_probability).

    Example: peering explain runs/demo/model.ckpt digit.png --target 8 -o explain.png

    Text: peering explain my-bert-folder --text "a fine film" -o explain.png
    """
    check_output_file(out)
    with bad_input():
        loaded = load(checkpoint, model, channels, image_size, output_fn)
        if loaded.is_text:
            names, texts = _texts(images or [], text or [])
            chosen = method or MethodName.input_x_gradient
            exp = _explain_text(loaded, texts, target, top_k, chosen, output, out)
            _print_probabilities(names, exp, output.value, loaded.labels)
        else:
            if text:
                fail(f"--text is for text classifiers; {loaded.source} takes images")
            if not images:
                fail("give one or more images to explain")
            chosen = method or MethodName.gradient
            exp = _explain_images(loaded, images, target, top_k, chosen, output, out, invert, zoom, mean, std)
            _print_probabilities([p.name for p in images], exp, output.value, loaded.labels)
    n_classes = int(exp.probabilities.shape[1])
    what = f"class {target}" if target is not None else f"top {min(top_k, n_classes)} classes"
    typer.echo(f"wrote {out} ({chosen.value} of the {output.value} of the {what})")


def _check_request(target: int | None, top_k: int, n_classes: int, output: OutputName) -> None:
    check_target(target, n_classes)
    if target is None and top_k > n_classes and output is not OutputName.raw:
        fail(f"--top-k {top_k} is more than the model's {n_classes} classes")


def _explain_images(
    loaded: LoadedModel, images: list[Path], target: int | None, top_k: int, method: MethodName,
    output: OutputName, out: Path, invert: bool, zoom: int | None, mean: str | None, std: str | None,
) -> Any:
    import peering
    from peering.render import explanation_image, save_png

    x, size = load_images(images, loaded.channels, loaded.size, invert)
    norm = parse_normalisation(mean, std, x.shape[1])
    display = None
    if norm is not None:  # the model sees normalised images (as in Python); the pictures undo it
        x, display = norm.apply(x), norm.display
    _check_request(target, top_k, class_count(loaded, x), output)
    try:
        exp = peering.explain(
            loaded.model, loaded.batch(x), target, top_k=top_k, method=method.value, output=output.value,
            output_fn=loaded.output_fn,
        )
    except (ValueError, TypeError) as err:
        fail(f"cannot explain {loaded.source}: {err}")
    picture_exp: Any = exp
    if loaded.flat:  # draw flat inputs as the images they came from
        shape = (*exp.attributions.shape[:2], *x.shape[1:])
        picture_exp = dataclasses.replace(exp, attributions=exp.attributions.reshape(shape))
    picture = explanation_image(
        picture_exp, x, zoom=zoom or auto_zoom(max(size)), max_samples=None, display=display,
        saturation_hint=CLI_HINT,
    )
    save(lambda p: save_png(picture, p), out)
    return exp


def _texts(files: list[Path], texts: list[str]) -> tuple[list[str], list[str]]:
    """(a short name for each text, the texts): the files' contents (one text each), then the --text's."""
    from peering.errors import ImageError

    names, found = [], []
    for file in files:
        try:
            content = file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as err:
            raise ImageError(f"cannot read text file {file}: {err}") from err
        if not content:
            fail(f"text file {file} is empty")
        names.append(file.name)
        found.append(content)
    for t in texts:
        names.append(t if len(t) <= 30 else t[:29] + "…")
        found.append(t)
    if not found:
        fail("give a text to explain: --text '...' or a text file")
    return names, found


def _explain_text(
    loaded: LoadedModel, texts: list[str], target: int | None, top_k: int, method: MethodName,
    output: OutputName, out: Path,
) -> Any:
    """Explain texts at the model's word embeddings; a picture of the tokens coloured by their scores."""
    import peering
    from peering.render import save_png, token_image

    tokenizer = loaded.tokenizer
    encoded = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    ids = encoded.pop("input_ids")
    forward = {k: v for k, v in encoded.items() if k in ("attention_mask", "token_type_ids")}
    layer = loaded.model.get_input_embeddings()  # type: ignore[operator]  # a Hugging Face model
    if loaded.num_classes is not None:
        _check_request(target, top_k, loaded.num_classes, output)
    try:
        exp = peering.explain(
            loaded.model, ids, target, top_k=top_k, method=method.value, output=output.value,
            output_fn=loaded.output_fn, layer=layer, forward_kwargs=forward,
        )
    except (ValueError, TypeError) as err:
        fail(f"cannot explain {loaded.source}: {err}")
    picture = token_image(
        exp.attributions, ids, tokenizer=tokenizer, targets=exp.targets, probabilities=exp.probabilities,
        output=output.value, max_samples=None, saturation_hint=CLI_HINT,
    )
    save(lambda p: save_png(picture, p), out)
    return exp


def _print_probabilities(
    names: list[str], exp: object, output: str, labels: tuple[str, ...] | None = None
) -> None:
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
    table.add_column("input", no_wrap=True, overflow="ellipsis", max_width=32)
    table.add_column("largest" if raw else "predicted", justify="right")
    shown = list(range(n_classes)) if n_classes <= 10 else None
    if shown is not None:
        for c in shown:
            table.add_column(labels[c] if labels and len(labels) == n_classes else str(c), justify="right")
    else:
        table.add_column("top 5", justify="left")
    fmt = "{:.4g}" if raw else "{:.2f}"
    for name, row in zip(names, probs.tolist(), strict=True):
        best = int(np.argmax(row))
        cells: list[str | Text] = [Text(name), f"{best} ({fmt.format(row[best])})"]
        if shown is not None:
            values = [fmt.format(p) for p in row]
            cells += [f"[bold]{v}[/bold]" if c == best else v for c, v in enumerate(values)]
        else:
            top = np.argsort(row)[::-1][:5]
            cells.append(", ".join(f"{int(c)}: {fmt.format(row[int(c)])}" for c in top))
        table.add_row(*cells)
    console().print(table)
