"""`peering report`: (re)build a run's static HTML report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from peering.cli.common import StdOption, bad_input, fail, parse_normalisation
from peering.errors import PeeringError

__all__: list[str] = []  # a command of the app (peering.cli.app); its docstring is its --help


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
    from peering.report import build_report, find_log_dir
    from peering.runs import no_pictures_reason

    with bad_input():
        norm = parse_normalisation(mean, std, None)  # the report checks them against its images
        display = None if norm is None else norm.display
        try:
            path = build_report(run_dir, out, max_per_epoch=max_per_epoch, display=display)
        except PeeringError:
            raise
        except OSError as err:
            fail(f"cannot write the report of {run_dir}: {err.strerror or err}")
        except ValueError as err:
            if display is None:
                fail(f"cannot build the report of {run_dir}: {' '.join(str(err).split())[:300]}")
            fail(f"--mean/--std do not fit the run's inputs: {err}")
        except Exception as err:  # a report never ends in a traceback: one line that names the folder
            text = " ".join(str(err).split())[:300]
            fail(f"cannot build the report of {run_dir}: {type(err).__name__}: {text}")
    log_dir = find_log_dir(run_dir)
    if log_dir is not None and (why := no_pictures_reason(log_dir)):
        typer.echo(why)
    typer.echo(f"wrote {path}")
