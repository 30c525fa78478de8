"""The ``peering`` command: one Typer app, one module per command (`peering.cli.explain`, ...).

Command modules import torch, Lightning and matplotlib inside their functions, so that ``peering --help``
and a command's ``--help`` start without them.
"""

from __future__ import annotations

from typing import Any

import typer
from typer.core import TyperCommand

from peering.cli.check import check
from peering.cli.dataset import explain_dataset
from peering.cli.demo import demo
from peering.cli.explain import explain
from peering.cli.morph import morph, portraits
from peering.cli.report import report

__all__ = ["app", "main"]

class _Command(TyperCommand):
    """Typer's command with plain help: ``Usage: peering explain [OPTIONS] CHECKPOINT [INPUTS]...`` (not
    ``{checkpoint}``), and no ``<bool>`` after a flag such as ``--invert`` or ``--help``."""

    def get_params(self, ctx: Any) -> Any:
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""  # a flag takes no value: show no type
        return params

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = (param.metavar or (param.name or "arg").upper()).removesuffix("...")
                name = f"{name}..." if param.nargs != 1 else name
                pieces.append(name if param.required else f"[{name}]")
        return pieces


def _command(name: str | None = None) -> Any:
    return app.command(name, cls=_Command)


app = typer.Typer(
    name="peering",
    help="Look inside a classifier with input gradients: explain, morph, and watch what confuses it.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
_command()(demo)
_command()(explain)
_command()(morph)
_command()(portraits)
_command("explain-dataset")(explain_dataset)
_command()(check)
_command()(report)


def main() -> None:
    """The ``peering`` console script.

    >>> from typer.testing import CliRunner
    >>> CliRunner().invoke(app, ["--help"]).exit_code
    0
    """
    app()
