"""`peering demo`: the one-minute demo."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from peering.cli.common import (
    EXIT_INTERRUPTED,
    DatasetName,
    bad_input,
    console,
    fail,
    print_flushed,
)

__all__: list[str] = []  # a command of the app (peering.cli.app); its docstring is its --help


def demo(
    dataset: Annotated[DatasetName, typer.Option(help="sklearn's 8x8 digits (offline) or MNIST.")] = (
        DatasetName.digits
    ),
    data_dir: Annotated[
        Path | None,
        typer.Option(help="Folder with the MNIST IDX files (default: $PEERING_DATA_DIR, else download)."),
    ] = None,
    epochs: Annotated[
        int | None,
        typer.Option(min=1, help="Training epochs (default: 10 digits, 2 MNIST, 3 with --faults)."),
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
    faults: Annotated[
        bool,
        typer.Option(help="Plant 10% flipped labels and a patch on the 3s (MNIST): watch LabelIssues and "
                     "ShortcutAlarm find them."),
    ] = False,
) -> None:
    """Train the demo CNN while watching what confuses it; morph digits; write runs/<name>/report.html.

    Example: peering demo --epochs 5 --name quick;  peering demo --dataset mnist --faults
    """
    from peering.demo import run_demo

    shown = console()
    run_dir = out / name
    try:
        with bad_input():
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
                    faults=faults,
                    echo=lambda line: print_flushed(shown, line),
                )
            except ValueError as err:
                fail(str(err))
            except OSError as err:
                fail(f"cannot write the run to {run_dir}: {err.strerror or err}")
    except KeyboardInterrupt:
        typer.echo(f"\ninterrupted: {run_dir} is incomplete (no report was written)", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    shown.print(f"Done in {result.seconds:.0f} s. Test accuracy {result.test_accuracy:.2%}.", markup=False)
    shown.print(f"Report:      {result.report}", markup=False)
    shown.print(f"             {result.report.resolve().as_uri()}", markup=False)
    shown.print(f"TensorBoard: {result.tensorboard_command}", markup=False)
