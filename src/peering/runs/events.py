"""Reading a training log folder's pictures and scalars back: from TensorBoard event files when they
hold the tag, else from the PNG folder (``<log>/<tag>/step_<n>_<i>.png``, `png_file`) and
``peering/scalars.csv`` (`append_scalar`), the formats `peering.lightning.sinks` writes.

>>> import tempfile
>>> root = tempfile.mkdtemp()
>>> append_scalar(root, "peering/confused_fraction", 0.25, 40)
>>> read_scalars(root, "peering/confused_fraction")
[(40, 0.25)]
"""

from __future__ import annotations

import contextlib
import csv
import functools
import os
import re
from pathlib import Path
from typing import Any

from peering.runs.names import PEERING_DIR, SCALARS_FILE

__all__ = ["append_scalar", "image_tags", "png_file", "read_images", "read_scalars"]

_PNG_NAME = re.compile(r"^step_(\d+)_(\d+)\.png$")


def png_file(tag: str, step: int, index: int) -> Path:
    """Where the PNG folder keeps picture ``index`` of ``tag`` at ``step``, relative to the log folder.

    >>> png_file("peering/val/confused", 40, 2).as_posix()
    'peering/val/confused/step_40_2.png'
    """
    return Path(*tag.split("/")) / f"step_{int(step)}_{int(index)}.png"


def append_scalar(logdir: str | os.PathLike[str], tag: str, value: float, step: int) -> None:
    """Append a ``step,tag,value`` row to ``<logdir>/peering/scalars.csv`` (with a header when new).

    >>> import tempfile
    >>> root = tempfile.mkdtemp()
    >>> append_scalar(root, "peering/confused_fraction", 0.5, 3)
    >>> (Path(root) / "peering" / "scalars.csv").read_text().splitlines()
    ['step,tag,value', '3,peering/confused_fraction,0.5']
    """
    path = Path(logdir) / SCALARS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="") as f:
        out = csv.writer(f)
        if new:
            out.writerow(["step", "tag", "value"])
        out.writerow([int(step), tag, repr(float(value))])


def _event_files(logdir: Path) -> list[Path]:
    return sorted(logdir.glob("events.out.tfevents.*"))


def _accumulator(logdir: Path) -> Any:
    """The run's events, loaded once per state of its event files (readers are often called tag by tag)."""
    files = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in _event_files(logdir))
    return _load_events(str(logdir.resolve()), files)


@functools.lru_cache(maxsize=1)
def _load_events(logdir: str, files: tuple[tuple[str, int, int], ...]) -> Any:
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(logdir, size_guidance=ea.STORE_EVERYTHING_SIZE_GUIDANCE)
    acc.Reload()
    return acc


def image_tags(logdir: str | os.PathLike[str]) -> list[str]:
    """The picture tags of a run directory (event files and PNG folder together), sorted.

    >>> import tempfile
    >>> image_tags(tempfile.mkdtemp())
    []
    """
    root = Path(logdir)
    tags: set[str] = set()
    if _event_files(root):
        acc = _accumulator(root)
        with contextlib.suppress(KeyError):  # a run without pictures has no image plugin at all
            tags.update(acc.PluginTagToContent("images"))
    peering = root / PEERING_DIR
    if peering.is_dir():
        for png in peering.rglob("step_*_*.png"):
            if _PNG_NAME.match(png.name):
                tags.add(png.parent.relative_to(root).as_posix())
    return sorted(tags)


def read_images(logdir: str | os.PathLike[str], tag: str) -> list[tuple[int, list[bytes]]]:
    """The pictures logged under ``tag`` in a run directory: ``[(step, [png_bytes, ...]), ...]`` by step.

    Reads TensorBoard event files in ``logdir`` (the logger's version folder) when they hold the tag
    (also per-sample ``<tag>/<i>`` images), else the PNG folder ``<logdir>/<tag>/step_<n>_<i>.png``.
    Several writes at the same step stay separate entries, in writing order.

    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> for i in range(2):
    ...     (root / png_file("peering/confused", 8, i)).parent.mkdir(parents=True, exist_ok=True)
    ...     _ = (root / png_file("peering/confused", 8, i)).write_bytes(b"png")
    >>> [(step, len(pngs)) for step, pngs in read_images(root, "peering/confused")]
    [(8, 2)]
    """
    root = Path(logdir)
    if _event_files(root):
        acc = _accumulator(root)
        tags = acc.Tags()
        if tag in tags.get("tensors", []):
            events = sorted(acc.Tensors(tag), key=lambda e: (e.step, e.wall_time))
            return [(int(e.step), list(e.tensor_proto.string_val[2:])) for e in events]
        prefix = tag + "/"
        legacy = [t for t in tags.get("images", []) if t == tag or t.startswith(prefix)]
        if legacy:
            by_step: dict[int, list[tuple[int, float, bytes]]] = {}
            for t in legacy:
                i = int(t[len(prefix) :]) if t.startswith(prefix) and t[len(prefix) :].isdigit() else 0
                for e in acc.Images(t):
                    by_step.setdefault(int(e.step), []).append((i, e.wall_time, e.encoded_image_string))
            return [(s, [png for _, _, png in sorted(v)]) for s, v in sorted(by_step.items())]
    folder = root / Path(*tag.split("/"))
    found: dict[int, list[tuple[int, Path]]] = {}
    if folder.is_dir():
        for png in folder.iterdir():
            m = _PNG_NAME.match(png.name)
            if m:
                found.setdefault(int(m.group(1)), []).append((int(m.group(2)), png))
    return [(step, [p.read_bytes() for _, p in sorted(files)]) for step, files in sorted(found.items())]


def read_scalars(logdir: str | os.PathLike[str], tag: str) -> list[tuple[int, float]]:
    """The scalar ``tag`` of a run directory, ``[(step, value), ...]``: from the event files when they hold
    it, else from ``<logdir>/peering/scalars.csv``.

    >>> import tempfile
    >>> read_scalars(tempfile.mkdtemp(), "peering/confused_fraction")
    []
    """
    root = Path(logdir)
    if _event_files(root):
        acc = _accumulator(root)
        if tag in acc.Tags().get("scalars", []):
            return [(int(e.step), float(e.value)) for e in acc.Scalars(tag)]
    path = root / SCALARS_FILE
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [(int(row["step"]), float(row["value"])) for row in csv.DictReader(f) if row["tag"] == tag]
