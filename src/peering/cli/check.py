"""`peering check`: the randomisation sanity check and deletion/insertion curves."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from peering.cli.common import (
    BaselineName,
    ChannelsOption,
    DatasetName,
    InvertOption,
    MethodName,
    ModelOption,
    OutputFnOption,
    SizeOption,
    bad_input,
    console,
    fail,
    images_only,
    load,
    load_images,
    note,
)
from peering.runs import names

if TYPE_CHECKING:
    from rich.console import Console
    from torch import Tensor

    from peering.checkpoints import LoadedModel

__all__: list[str] = []  # a command of the app (peering.cli.app); its docstring is its --help

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
        x, _ = load_images(images, loaded.channels, loaded.size, invert)
        return x[:samples], f"{min(len(images), samples)} given image(s)"
    from peering.demo import load_demo_data
    from peering.runs import read_run_json

    run: dict[str, Any] = {}
    run_file = checkpoint.parent / names.RUN_FILE
    if run_file.is_file():
        run = read_run_json(checkpoint.parent)
        if not run:
            note(f"cannot read {run_file}; using the defaults")
    name = dataset.value if dataset is not None else run.get("dataset")
    if name is None and loaded.size is not None and loaded.size[0] == loaded.size[1]:
        name = _DEMO_DATASET_BY_SIZE.get(loaded.size[0])
    if name not in ("digits", "mnist"):
        fail(
            f"cannot tell which digits to check {loaded.source} on (it takes {loaded.size or 'unknown'} "
            "inputs); pass IMAGE files, or --dataset digits|mnist"
        )
    seed = run.get("seed", 0)
    _, _, test_x, _, _ = load_demo_data(str(name), data_dir, int(seed), note)
    kind = {"digits": "scikit-learn 8x8", "mnist": "MNIST"}[str(name)]
    if tuple(test_x.shape[1:]) != (loaded.channels or 1, *(loaded.size or test_x.shape[2:])):
        fail(
            f"{loaded.source} takes inputs [{loaded.channels}, {', '.join(map(str, loaded.size or ()))}], "
            f"but the {kind} digits are {list(test_x.shape[1:])}; pass IMAGE files of its size, or the "
            "other --dataset"
        )
    return test_x[:samples], f"the first {min(samples, len(test_x))} of the demo's held-out {kind} digits"


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

    from peering.checks.sanity import randomisation_check

    methods = list(dict.fromkeys(m.value for m in (method or list(MethodName))))
    shown = console()
    with bad_input():
        loaded = load(checkpoint, model, channels, image_size, output_fn)
        images_only(loaded, "check")
        x, source = _check_inputs(checkpoint, loaded, images, dataset, data_dir, samples, invert)
        batch = loaded.batch(x)
        shown.print(f"Checking {loaded.source} on {source}.", markup=False, soft_wrap=True)
        shown.file.flush()
        started = time.perf_counter()
        try:
            result = randomisation_check(
                loaded.model, batch, methods=methods, seed=seed, threshold=threshold,
                output_fn=loaded.output_fn,
            )
        except (ValueError, TypeError) as err:
            fail(f"cannot check {loaded.source}: {err}")
        _print_sanity(shown, result, time.perf_counter() - started)
        if faithfulness:
            started = time.perf_counter()
            rows = _faithfulness(loaded, batch, result.targets, methods, baseline.value, seed)
            _print_faithfulness(shown, rows, baseline.value, time.perf_counter() - started)


def _faithfulness(
    loaded: LoadedModel, batch: Tensor, targets: Tensor, methods: list[str], baseline: Any, seed: int
) -> dict[str, dict[str, float]]:
    """Each method's deletion and insertion areas (and the random control's)."""
    import peering
    from peering.checks.faithfulness import deletion_insertion

    rows = {}
    try:
        for name in methods:
            exp = peering.explain(loaded.model, batch, targets, method=name, output_fn=loaded.output_fn)
            rows[name] = deletion_insertion(
                loaded.model, batch, exp, baseline=baseline, seed=seed, output_fn=loaded.output_fn,
            ).to_dict()
    except (ValueError, TypeError) as err:
        fail(f"cannot measure deletion/insertion with {loaded.source}: {err}")
    return rows


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
