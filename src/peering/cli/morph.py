"""`peering morph` and `peering portraits`: morphs and class portraits, with a data prior."""

from __future__ import annotations

import dataclasses
import math
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from peering.cli.common import (
    ChannelsOption,
    ConfidenceOption,
    DataDirOption,
    InvertOption,
    MeanOption,
    ModelOption,
    MorphOutputName,
    NormName,
    OutputFnOption,
    ReferenceName,
    ReferenceOption,
    SizeOption,
    SmoothingOption,
    StartName,
    StdOption,
    ZoomOption,
    auto_zoom,
    bad_input,
    check_output_file,
    check_target,
    class_count,
    fail,
    images_only,
    load,
    load_images,
    note,
    parse_normalisation,
    save,
    unflatten,
)
from peering.runs import names

if TYPE_CHECKING:
    from torch import Tensor

    from peering.morph.ascent import MorphResult

__all__: list[str] = []  # a command of the app (peering.cli.app); its docstring is its --help


def _reference_data(
    reference: ReferenceName, checkpoint: Path, data_dir: Path | None, shape: tuple[int, ...]
) -> tuple[Tensor, Tensor] | None:
    """The reference images [N, *shape] and labels for the data prior, or None (said on stderr)."""
    from peering.data import DATA_DIR_ENV, load_digits, load_mnist

    if reference is ReferenceName.none:
        return None
    if reference is ReferenceName.run:
        from peering.demo import training_data

        run_dir = checkpoint.parent
        if not (run_dir / names.RUN_FILE).is_file():
            note(
                f"no {names.RUN_FILE} beside {checkpoint.name}: morphing without a data prior, which other "
                "models believe far less often; pass --reference digits|mnist (images like the training data)"
            )
            return None
        try:
            images, labels = training_data(run_dir)
        except (OSError, ValueError) as err:
            fail(f"cannot read the reference digits of the run {run_dir}: {err}")
        where = f"the training digits of {run_dir}"
    elif reference is ReferenceName.digits:
        images, labels = load_digits()
        where = "scikit-learn's digits"
    else:
        import os

        root = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV)
        if not root:
            fail(f"--reference mnist needs --data-dir or ${DATA_DIR_ENV}: the folder of the MNIST IDX files")
        images, labels = load_mnist(root, "test")
        where = f"the MNIST t10k digits in {root}"
    if images[0].numel() != math.prod(shape):
        fail(
            f"the reference images ({where}) are {list(images.shape[1:])} but the model takes {list(shape)}; "
            "pass --reference with images like the model's training data, or --reference none"
        )
    note(f"data prior: {len(images):,} reference images, {where}")
    return images.reshape(len(images), *shape), labels


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
    output: Annotated[
        MorphOutputName,
        typer.Option(help="What is raised; sigmoid: a multi-label model, --confidence is the target's own "
                     "sigmoid probability."),
    ] = MorphOutputName.log_probability,
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
    progress: Annotated[
        bool, typer.Option(help="Show a progress bar (only ever on a terminal: never into a pipe or file).")
    ] = True,
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

    check_output_file(out)
    if gif is not None:
        check_output_file(gif, "--gif")
    with bad_input():
        loaded = load(checkpoint, model, channels, image_size, output_fn)
        images_only(loaded, "morph")
        x, size = load_images([image], loaded.channels, loaded.size, invert)
        normalisation = parse_normalisation(mean, std, x.shape[1])
        if normalisation is not None:  # the morph walks the image; the model sees it normalised
            loaded = dataclasses.replace(loaded, model=normalisation.wrap(loaded.model, x.shape[1:]))
        n_classes = class_count(loaded, x)
        check_target(target, n_classes)
        if step_size is not None and step_size <= 0:
            fail(f"--step-size must be > 0, got {step_size}")
        from peering.checkpoints import class_scores_of

        scores = class_scores_of(loaded, x)
        before = (scores.sigmoid() if output.value == "sigmoid" else scores.softmax(dim=1))[0]
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
                    output=output.value,
                    progress=progress and sys.stderr.isatty(),
                    output_fn=loaded.output_fn,
                )
        except (ValueError, TypeError) as err:
            fail(f"cannot morph with {loaded.source}: {err}")
        shown = unflatten(result, x.shape[1:]) if loaded.flat else result
        _say_outcome(image, before, result, target, confidence, steps, budget, norm.value, output.value)
        z = zoom or auto_zoom(max(size))  # the strip and the GIF end where the image reached the target
        save(lambda p: save_png(film_strip(shown, 0, zoom=z), p), out)
        typer.echo(f"wrote {out}")
        if gif is not None:
            save(lambda p: save_gif(shown, 0, p, zoom=z), gif)
            typer.echo(f"wrote {gif}")


def _say_outcome(
    image: Path,
    before: Tensor,
    result: MorphResult,
    target: int,
    confidence: float,
    steps: int,
    budget: float | None,
    norm: str,
    output: str = "log_probability",
) -> None:
    """Print where the morph started and whether it got there (p: the softmax; σ: each class's own sigmoid
    probability, with --output sigmoid)."""
    p = "σ" if output == "sigmoid" else "p"
    predicted = int(before.argmax())
    typer.echo(
        f"{image.name}: predicted {predicted} ({p}={float(before[predicted]):.2f}); "
        f"{p}({target})={float(before[target]):.2f} before morphing"
    )
    distance = float(result.distance[0])
    p_after = float(result.probabilities[0, target])
    rule = f"{p}({target}) >= {confidence:g}" if confidence else f"the top class {target}"
    if bool(result.success[0]):
        reached = int(result.steps[0])
        when = "already at step 0" if reached == 0 else f"at step {reached}"
        typer.echo(f"reached {rule} {when}: {p}({target})={p_after:.2f}, {norm} distance {distance:.3f}")
    else:
        now = int(result.probabilities[0].argmax())
        limit = f" (budget {budget:g})" if budget is not None else ""
        typer.echo(
            f"did not reach {rule} in {steps} steps{limit}: predicted {now}, "
            f"{p}({target})={p_after:.2f}, {norm} distance {distance:.3f}; try more --steps or a "
            "lower --confidence"
        )


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
    import torch

    import peering
    from peering.render import portrait_row, save_png

    check_output_file(out)
    with bad_input():
        loaded = load(checkpoint, model, channels, image_size, output_fn)
        images_only(loaded, "portraits")
        if loaded.channels is None or loaded.size is None:
            fail(f"cannot tell the input size of {loaded.source}: pass --channels and --image-size")
        shape = (loaded.channels, *loaded.size)
        blank = torch.zeros(1, *shape)
        sample = tuple(loaded.batch(blank).shape[1:])
        references = _reference_data(reference, checkpoint, data_dir, sample)
        if start is StartName.mean:
            if references is None:
                fail("--start mean needs reference images (--reference); or pass --start blank or noise")
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
            fail(f"cannot draw portraits with {loaded.source}: {err}")
        shown = unflatten(result, torch.Size(shape)) if loaded.flat else result
        probabilities = result.probabilities.diagonal()
        typer.echo("class        " + " ".join(f"{k:>5d}" for k in range(len(probabilities))))
        typer.echo("p(class)     " + " ".join(f"{float(p):5.2f}" for p in probabilities))
        missed = (~result.success).nonzero().flatten().tolist()
        if missed:
            typer.echo(f"not reached in {steps} steps: {missed}; try more --steps or a lower --confidence")
        z = zoom or auto_zoom(max(loaded.size))
        save(lambda p: save_png(portrait_row(shown, zoom=z), p), out)
        typer.echo(f"wrote {out}")
