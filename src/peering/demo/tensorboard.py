"""The exact command that shows a run in TensorBoard."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

__all__ = ["tensorboard_command"]


def tensorboard_command(log_dir: str | os.PathLike[str], *, relative: bool = True) -> str:
    """The exact shell command that opens ``log_dir`` in TensorBoard from the current directory.

    Uses ``tensorboard`` when that is on PATH (and is the one installed beside this Python), else the
    path of the one beside this Python. Paths are relative when they are inside the current folder and
    ``relative`` is true, else absolute (for a command that works from anywhere).

    >>> tensorboard_command("runs/demo/logs").endswith("tensorboard --logdir runs/demo/logs")
    True
    """
    folder = Path(log_dir)
    if relative and _inside_cwd(folder):
        folder = Path(os.path.relpath(folder.resolve(), Path.cwd()))
    elif not relative:
        folder = folder.resolve()
    beside = Path(sys.executable).parent / "tensorboard"
    on_path = shutil.which("tensorboard")
    executable = "tensorboard"
    if beside.exists() and (on_path is None or Path(on_path).resolve() != beside.resolve()):
        executable = _display_path(beside) if relative else str(beside.absolute())
    return f"{shlex.quote(executable)} --logdir {shlex.quote(folder.as_posix())}"


def _inside_cwd(path: Path) -> bool:
    try:
        path.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return False
    return True


def _display_path(path: Path) -> str:
    if _inside_cwd(path):
        return os.path.relpath(path.absolute(), Path.cwd())
    return str(path)
