"""Atomic file writes: a file appears under its final name complete, or not at all.

Everything peering writes (pictures, GIFs, the report, the run summary, checkpoints, downloads) goes
through `atomic_path`: the data is written to a hidden temp file in the same folder, then renamed over the
final name. An error or Ctrl+C half-way leaves the old file (or none), never a truncated one, and the temp
file is removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path beside ``path``; when the block succeeds, rename it over ``path``.

    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "sub" / "a.txt"
    >>> with atomic_path(target) as tmp:
    ...     _ = tmp.write_text("done")
    >>> target.read_text(), [p.name for p in target.parent.iterdir()]
    ('done', ['a.txt'])
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(
    path: str | os.PathLike[str], write: Callable[[IO[bytes]], None], *, fsync: bool = False
) -> Path:
    """Write a file through ``write(file)`` atomically; with ``fsync``, also flush it to the disk first.

    >>> import tempfile
    >>> atomic_write(Path(tempfile.mkdtemp()) / "b.bin", lambda f: f.write(b"xy")).read_bytes()
    b'xy'
    """
    with atomic_path(path) as tmp, open(tmp, "xb") as f:
        write(f)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as indented JSON to a temp file beside ``path``, then rename it into place.

    Paths are written as POSIX strings and tensors as lists; NaN and infinities are refused.

    >>> import tempfile
    >>> write_json_atomic(Path(tempfile.mkdtemp()) / "x.json", {"a": 1}).read_text()
    '{\\n  "a": 1\\n}\\n'
    """
    encoded = (json.dumps(data, indent=2, allow_nan=False, default=_json_default) + "\n").encode("utf-8")

    def write(f: IO[bytes]) -> None:
        f.write(encoded)

    return atomic_write(path, write)


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return value.as_posix()
    tolist = getattr(value, "tolist", None)  # tensors and arrays, without importing torch here
    if callable(tolist):
        return tolist()
    raise TypeError(f"cannot write a {type(value).__name__} to JSON")

