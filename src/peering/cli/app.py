"""The ``peering`` command: one Typer app, one module per command (`peering.cli.explain`, ...).

Command modules import torch, Lightning and matplotlib inside their functions, so that ``peering --help``
and a command's ``--help`` start without them.
"""

from __future__ import annotations

import typer

from peering.cli.check import check
from peering.cli.dataset import explain_dataset
from peering.cli.demo import demo
from peering.cli.explain import explain
from peering.cli.morph import morph, portraits
from peering.cli.report import report

__all__ = ["app", "main"]

app = typer.Typer(
    name="peering",
    help="Look inside a classifier with input gradients: explain, morph, and watch what confuses it.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.command()(demo)
app.command()(explain)
app.command()(morph)
app.command()(portraits)
app.command("explain-dataset")(explain_dataset)
app.command()(check)
app.command()(report)


def main() -> None:
    """The ``peering`` console script.

    >>> from typer.testing import CliRunner
    >>> CliRunner().invoke(app, ["--help"]).exit_code
    0
    """
    app()
