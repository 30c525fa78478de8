"""A static HTML report of a training run watched by `ConfusedLogitCallback`: one self-contained page.

`build_report(run_dir)` reads the run's TensorBoard event files (or the callback's PNG folder, through the
readers of `peering.runs`), the demo's ``run.json`` and its morph film strips when they are
there, and writes ``<run_dir>/report.html`` with these sections:

- ``#summary``: what was run, the accuracy and the fraction of confused samples per epoch (a table and a
  small inline SVG chart);
- ``#confused``: per epoch, the pictures of the most confused training and validation samples;
- ``#atlas``: the confusion atlas: the confusion matrix of every validation run (radio buttons step
  through the epochs, with CSS only), and the last run's most frequent mistakes, each with its count per
  epoch (a small SVG chart), its examples and its direction map (left out when the run has no atlas);
- ``#tracked``: the tracked samples' time-lapse, one row per sample, one picture per epoch;
- ``#labels``: `LabelIssues`' most suspect labels ("given 3, the model says 5 from epoch 2 on"), each
  with its picture, the most frequent (given, model's class) pairs among them, and counts per epoch;
- ``#shortcuts``: `ShortcutAlarm`'s alarms, each with its sentence and the class's mean map before and
  after, and every class's quiet-patch share per validation run;
- ``#morph``: the morph film strips, each with its animation.
- ``#sanity``: the randomisation sanity check (`peering.sanity`): per method, its rank correlation curve as
  layers are re-initialised, its verdict, and example maps.

Every picture and animation is embedded as a ``data:`` URI and the page carries a Content-Security-Policy
that allows nothing else, so the one file opens anywhere (mailed on its own, too), with no server and no
network. The page uses the window's full width; the captions drawn in the pictures are 16 px type
(digits 12 px tall), so they read at 100% zoom. The page is rendered by
Jinja2 from the templates in ``peering/report/templates/`` (package data), with autoescaping on: all text
is HTML-escaped.

Layout of the package:

- `peering.report.run`: reading a run folder into one `RunData` (`find_log_dir`, `read_run`);
- `peering.report.sections`: one `Section` per section, in page order (``ALL``): what its template gets,
  built in ``sections/training.py``, ``sections/demo.py`` or ``sections/dataset.py``;
- ``templates/report.html.j2``: the page (head, navigation, one ``<section>`` per section);
  ``templates/sections/<id>.html.j2``: one section's body; ``templates/macros.html.j2``: shared pieces
  (a captioned ``figure``); ``templates/report.css``: the style sheet, inlined.

How to add a section (say ``atlas``):

1. If it needs something from the run that `RunData` does not hold yet, add a field to `RunData` and fill
   it in `read_run` (``peering/report/run.py``).
2. Write a builder in the module of ``peering/report/sections/`` it belongs with (a new one for a new kind
   of run), ``def atlas(run, options) -> dict | None``, that
   returns the variables its template needs (numbers already formatted, pictures as objects with a
   ``.png``), or None when the run has no such data: the section and its link are then left out, so an
   optional section costs nothing on runs without it.
3. Add ``Section("atlas", "Confusion atlas per epoch", "Atlas", training.atlas)`` to ``ALL`` in
   ``sections/__init__.py``, where it
   should appear in the page.
4. Write ``peering/report/templates/sections/atlas.html.j2``: the section's body; its variables are
   ``s.<name>``; embed a picture with ``{{ figure(picture, alt, caption) }}`` (import it from
   ``macros.html.j2``) or ``{{ bytes | data_uri }}``. The ``<section id="atlas"><h2>`` wrapper comes from
   the page template.
5. Any new template file ships automatically (``[tool.setuptools.package-data]`` takes
   ``templates/**``); a new option of the report goes into `Options`.
"""

from __future__ import annotations

import base64
import functools
import os
from pathlib import Path
from typing import IO, Any

from peering._files import atomic_write
from peering.errors import PeeringValueError, ReportError
from peering.render import Display
from peering.report.run import RunData, find_log_dir, read_run
from peering.report.sections import ALL, SECTIONS, Options
from peering.runs import names

__all__ = ["SECTIONS", "ReportError", "build_report", "find_log_dir"]

REPORT_FILE = names.REPORT_FILE
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"




def build_report(
    run_dir: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    *,
    max_per_epoch: int = 6,
    title: str | None = None,
    display: Display = None,
) -> Path:
    """(Re)build the static HTML report of a run; returns the path written.

    Args:
        run_dir: a `peering demo` run folder, or any folder with a Lightning run watched by
            `ConfusedLogitCallback` (TensorBoard event files or the PNG-folder layout).
        output: where to write; default ``<run_dir>/report.html``. Written to a temp file first, then
            renamed, so a reader never sees half a page.
        max_per_epoch: training pictures shown per epoch (the most confused ones).
        title: the page title; default from ``run.json`` or the folder name.
        display: how the inputs the report draws itself (a dataset run's samples) are shown: None (images
            in [0, 1]), ``(mean, std)`` to undo a normalisation, or a function (see
            `peering.render.Display`). The pictures of a training run were drawn by the callback, with
            its own ``display=``, and are embedded as they are.

    Raises:
        ReportError: ``run_dir`` is missing or holds no run (no event files, no pictures, no run.json).

    >>> import tempfile
    >>> from PIL import Image
    >>> from peering.runs import png_file
    >>> run = Path(tempfile.mkdtemp())
    >>> picture = run / png_file("peering/confused", 5, 0)  # a picture where the callback puts them
    >>> picture.parent.mkdir(parents=True)
    >>> Image.new("RGB", (12, 8)).save(picture)
    >>> build_report(run).name
    'report.html'
    """
    root = Path(run_dir)
    if not root.exists():
        raise ReportError(f"run folder not found: {root}")
    if not root.is_dir():
        raise ReportError(f"{root} is not a folder")
    if max_per_epoch < 1:
        raise PeeringValueError(f"max_per_epoch must be >= 1, got {max_per_epoch}")
    run = read_run(root)
    if run.empty and (root / names.MANIFEST).is_file():
        raise ReportError(
            f"{root} holds a dataset run with no samples written yet (it was stopped before its first shard "
            "was written): rerun the same peering explain-dataset command, then build the report"
        )
    if run.empty:
        raise ReportError(
            f"{root} holds no run: no TensorBoard event files, no peering/ pictures and no run.json "
            "(pass the folder that `peering demo` wrote, or a Lightning log folder)"
        )
    page = _render(run, Options(max_per_epoch=max_per_epoch, display=display), title)
    target = Path(output) if output is not None else root / REPORT_FILE
    data = page.encode("utf-8")

    def write(f: IO[bytes]) -> None:
        f.write(data)

    atomic_write(target, write)
    return target


def _data_uri(data: bytes, mime: str = "image/png") -> str:
    """``data:`` URI of some bytes (base64 uses only characters that need no HTML escaping)."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


@functools.lru_cache(maxsize=1)
def _environment() -> Any:  # a jinja2.Environment; imported lazily: only the report needs Jinja2
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("peering.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    env.filters["data_uri"] = _data_uri
    return env


def _render(run: RunData, options: Options, title: str | None) -> str:
    page_title = title or str(run.summary.get("title") or f"peering report: {run.root.resolve().name}")
    sections = []
    for section in ALL:
        variables = section.build(run, options)
        if variables is not None:
            sections.append(
                {
                    "id": section.id,
                    "heading": section.heading,
                    "nav": section.nav,
                    "template": section.template,
                    "variables": variables,
                }
            )
    template = _environment().get_template("report.html.j2")
    return str(template.render(title=page_title, csp=_CSP, sections=sections))
