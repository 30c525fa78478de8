"""A static HTML report of a training run watched by `ConfusedLogitCallback`: one self-contained page.

`build_report(run_dir)` reads the run's TensorBoard event files (or the callback's PNG folder, through the
readers of `peering.lightning.sinks`), the demo's ``run.json`` and its morph film strips when they are
there, and writes ``<run_dir>/report.html`` with four sections:

- ``#summary``: what was run, the accuracy and the fraction of confused samples per epoch (a table and a
  small inline SVG chart);
- ``#confused``: per epoch, the pictures of the most confused training and validation samples;
- ``#tracked``: the tracked samples' time-lapse, one row per sample, one picture per epoch;
- ``#morph``: the morph film strips (each linked to its GIF beside the report when there is one).

Every picture is embedded as a ``data:`` URI and the page carries a Content-Security-Policy that allows
nothing else, so it opens from disk anywhere, with no server and no network. All text is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peering._files import atomic_write

__all__ = ["ReportError", "build_report", "find_log_dir"]

REPORT_FILE = "report.html"
SECTIONS = ("summary", "confused", "tracked", "morph")
"""The ids of the report's sections, in order."""

_TAG_TRAIN = "peering/confused"
_TAG_VAL = "peering/val/confused"
_TAG_TRACKED = "peering/tracked/"
_TAG_TRAIN_FRACTION = "peering/confused_fraction"
_TAG_VAL_FRACTION = "peering/val/confused_fraction"
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


class ReportError(ValueError):
    """The folder is not a run that a report can be built from (the message says why, in one line)."""


@dataclass
class _Picture:
    png: bytes
    step: int
    epoch: int | None
    index: int = 0
    record: dict[str, Any] = field(default_factory=dict)


def find_log_dir(run_dir: str | os.PathLike[str]) -> Path | None:
    """The folder of a run that holds its event files or the callback's ``peering/`` pictures.

    ``run_dir`` itself, the ``log_dir`` named in its ``run.json``, or the most recently written such
    folder below it (e.g. ``lightning_logs/version_3``); None when there is none.

    >>> import tempfile
    >>> find_log_dir(tempfile.mkdtemp()) is None
    True
    """
    root = Path(run_dir)
    summary = _read_summary(root)
    named = summary.get("log_dir") if summary else None
    if isinstance(named, str) and _is_log_dir(root / named):
        return root / named
    if _is_log_dir(root):
        return root
    found = [p for p in _walk_dirs(root, depth=3) if _is_log_dir(p)]
    if not found:
        return None
    return max(found, key=_latest_mtime)


def build_report(
    run_dir: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    *,
    max_per_epoch: int = 6,
    title: str | None = None,
) -> Path:
    """(Re)build the static HTML report of a run; returns the path written.

    Args:
        run_dir: a `peering demo` run folder, or any folder with a Lightning run watched by
            `ConfusedLogitCallback` (TensorBoard event files or the PNG-folder layout).
        output: where to write; default ``<run_dir>/report.html``. Written to a temp file first, then
            renamed, so a reader never sees half a page.
        max_per_epoch: training pictures shown per epoch (the most confused ones).
        title: the page title; default from ``run.json`` or the folder name.

    Raises:
        ReportError: ``run_dir`` is missing or holds no run (no event files, no pictures, no run.json).

    >>> import tempfile
    >>> from peering.lightning.sinks import PNGFolderSink, encode_png
    >>> import numpy as np
    >>> run = tempfile.mkdtemp()
    >>> picture = np.zeros((8, 12, 3), np.uint8)
    >>> _ = PNGFolderSink(run).log_images("peering/confused", [picture], [encode_png(picture)], 5)
    >>> build_report(run).name
    'report.html'
    """
    root = Path(run_dir)
    if not root.exists():
        raise ReportError(f"run folder not found: {root}")
    if not root.is_dir():
        raise ReportError(f"{root} is not a folder")
    if max_per_epoch < 1:
        raise ValueError(f"max_per_epoch must be >= 1, got {max_per_epoch}")
    summary = _read_summary(root)
    log_dir = find_log_dir(root)
    morphs = _morph_entries(root, summary)
    if log_dir is None and not summary and not morphs:
        raise ReportError(
            f"{root} holds no run: no TensorBoard event files, no peering/ pictures and no run.json "
            "(pass the folder that `peering demo` wrote, or a Lightning log folder)"
        )
    data = _collect(log_dir) if log_dir is not None else _RunData()
    page = _render(root, summary, data, morphs, log_dir, max_per_epoch, title)
    target = Path(output) if output is not None else root / REPORT_FILE
    atomic_write(target, lambda f: f.write(page.encode("utf-8")))
    return target


# --------------------------------------------------------------------------------------------- collecting


@dataclass
class _RunData:
    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    train: list[_Picture] = field(default_factory=list)
    val: list[_Picture] = field(default_factory=list)
    tracked: dict[int, list[_Picture]] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    no_pictures: str | None = None  # why the run has no pictures (None: it has some)


def _read_summary(root: Path) -> dict[str, Any]:
    path = root / "run.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _is_log_dir(path: Path) -> bool:
    if not path.is_dir():
        return False
    if any(path.glob("events.out.tfevents.*")):
        return True
    peering = path / "peering"
    return peering.is_dir() and any(peering.rglob("*"))


def _walk_dirs(root: Path, depth: int) -> Iterable[Path]:
    if depth == 0 or not root.is_dir():
        return
    for child in sorted(root.iterdir()):
        if child.is_dir() and not child.name.startswith("."):
            yield child
            yield from _walk_dirs(child, depth - 1)


def _latest_mtime(path: Path) -> float:
    return max((p.stat().st_mtime for p in path.iterdir()), default=path.stat().st_mtime)


def _collect(log_dir: Path) -> _RunData:
    from peering.lightning.sinks import (
        image_tags,
        no_pictures_reason,
        read_images,
        read_index,
        read_scalars,
    )

    data = _RunData(no_pictures=no_pictures_reason(log_dir))
    for tag in ("val_acc", "val_loss", "epoch", _TAG_TRAIN_FRACTION, _TAG_VAL_FRACTION):
        data.scalars[tag] = read_scalars(log_dir, tag)
    records = read_index(log_dir)
    data.records = records
    by_key: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_key[(str(r.get("tag")), int(r.get("step", -1)))].append(r)
    epoch_of = _callback_epochs(records, data.scalars["epoch"])

    def pictures(tag: str) -> list[_Picture]:
        out = []
        seen: dict[int, int] = defaultdict(int)  # step -> pictures read so far at that step
        for step, pngs in read_images(log_dir, tag):
            recs = by_key.get((tag, step), [])
            for png in pngs:
                j = seen[step]
                seen[step] += 1
                rec = recs[j] if j < len(recs) else {}
                epoch = rec.get("epoch")
                out.append(
                    _Picture(png, step, int(epoch) if epoch is not None else epoch_of(step), j % 64, rec)
                )
        return out

    tags = image_tags(log_dir)
    if _TAG_TRAIN in tags:
        data.train = pictures(_TAG_TRAIN)
    if _TAG_VAL in tags:
        data.val = pictures(_TAG_VAL)
    for tag in tags:
        rest = tag[len(_TAG_TRACKED) :]
        if tag.startswith(_TAG_TRACKED) and rest.isdigit():
            data.tracked[int(rest)] = pictures(tag)
    return data


def _callback_epochs(records: Sequence[dict[str, Any]], epoch_scalar: Sequence[tuple[int, float]]) -> Any:
    """step -> epoch for the callback's steps (the trainer's ``global_step`` when it logged).

    From the picture index when it has end-of-epoch pictures (validation, tracked: the last step of their
    epoch), else from Lightning's ``epoch`` scalar, whose steps are one behind ``global_step``.
    """
    ends: dict[int, int] = {}
    for r in records:
        if r.get("stage") in ("validation", "tracked") and r.get("epoch") is not None:
            ends[int(r["step"])] = int(r["epoch"])
    if not ends:
        for step, epoch in epoch_scalar:
            ends[int(step) + 1] = int(epoch)
    pairs = sorted(ends.items())

    def epoch_of(step: int) -> int | None:
        for end, epoch in pairs:
            if end >= step:
                return epoch
        return pairs[-1][1] if pairs else None

    return epoch_of


def _lightning_epochs(epoch_scalar: Sequence[tuple[int, float]]) -> Any:
    """step -> epoch for Lightning's own metrics (``val_acc``, ...): its ``epoch`` scalar at that step."""
    pairs = sorted((int(s), int(e)) for s, e in epoch_scalar)
    exact = dict(pairs)

    def epoch_of(step: int) -> int | None:
        if step in exact:
            return exact[step]
        for s, e in pairs:
            if s >= step:
                return e
        return pairs[-1][1] if pairs else None

    return epoch_of


def _morph_entries(root: Path, summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The film strips: from run.json when it lists them, else every PNG in ``<run>/morph/``."""
    listed = summary.get("morphs")
    if isinstance(listed, list) and listed:
        return [m for m in listed if isinstance(m, dict) and isinstance(m.get("strip"), str)]
    folder = root / "morph"
    if not folder.is_dir():
        return []
    return [{"strip": p.relative_to(root).as_posix()} for p in sorted(folder.glob("*.png"))]


# ---------------------------------------------------------------------------------------------- rendering


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _data_uri(png: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(png).decode('ascii')}"


def _img(png: bytes, alt: str) -> str:
    return f'<img src="{_data_uri(png)}" alt="{_e(alt)}">'


def _figure(png: bytes, alt: str, caption: str) -> str:
    return f"<figure>{_img(png, alt)}<figcaption>{_e(caption)}</figcaption></figure>"


def _fmt(value: float | None, pattern: str = "{:.3f}") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return pattern.format(value)


def _per_epoch(data: _RunData) -> dict[int, dict[str, float]]:
    """epoch -> {val_acc, val_loss, train_confused, val_confused}."""
    table: dict[int, dict[str, float]] = defaultdict(dict)
    lightning_epoch = _lightning_epochs(data.scalars.get("epoch", []))
    for tag, key in (("val_acc", "val_acc"), ("val_loss", "val_loss")):
        for step, value in data.scalars.get(tag, []):
            epoch = lightning_epoch(step)
            if epoch is not None:
                table[epoch][key] = value  # the last value of the epoch
    callback_epoch = _callback_epochs(data.records, data.scalars.get("epoch", []))
    for tag, key in ((_TAG_TRAIN_FRACTION, "train_confused"), (_TAG_VAL_FRACTION, "val_confused")):
        sums: dict[int, list[float]] = defaultdict(list)
        for step, value in data.scalars.get(tag, []):
            epoch = callback_epoch(step)
            if epoch is not None:
                sums[epoch].append(value)
        for epoch, values in sums.items():
            table[epoch][key] = sum(values) / len(values)
    return dict(sorted(table.items()))


def _chart(rows: dict[int, dict[str, float]]) -> str:
    """An inline SVG line chart of accuracy and confused fractions per epoch (all in [0, 1])."""
    series = [
        ("val_acc", "validation accuracy", "#1f6feb"),
        ("train_confused", "confused fraction (training checks)", "#d29922"),
        ("val_confused", "confused fraction (validation)", "#8250df"),
    ]
    epochs = sorted(rows)
    if not epochs or not any(k in rows[e] for e in epochs for k, _, _ in series):
        return ""
    width, height, left, right, top, bottom = 640, 220, 44, 16, 12, 30
    span = max(epochs[-1] - epochs[0], 1)

    def x(epoch: int) -> float:
        return left + (epoch - epochs[0]) / span * (width - left - right)

    def y(value: float) -> float:
        return top + (1.0 - max(0.0, min(1.0, value))) * (height - top - bottom)

    parts = [
        f'<svg class="chart" role="img" aria-label="accuracy and confused fraction per epoch" '
        f'width="{width}" height="{height + 22 * len(series)}" viewBox="0 0 {width} '
        f'{height + 22 * len(series)}" xmlns="http://www.w3.org/2000/svg">'
    ]
    for v in (0.0, 0.25, 0.5, 0.75, 1.0):
        parts.append(
            f'<line x1="{left}" x2="{width - right}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#ddd"/>'
            f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.2f}</text>'
        )
    step = max(1, math.ceil(len(epochs) / 12))
    for e in epochs[::step]:
        parts.append(f'<text x="{x(e):.1f}" y="{height - 10}" text-anchor="middle">{e}</text>')
    parts.append(f'<text x="{width - right}" y="{height + 4}" text-anchor="end">epoch</text>')
    for n, (key, label, colour) in enumerate(series):
        points = [(x(e), y(rows[e][key])) for e in epochs if key in rows[e]]
        if not points:
            continue
        path = " ".join(f"{px:.1f},{py:.1f}" for px, py in points)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{path}"/>')
        parts.extend(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3" fill="{colour}"/>' for px, py in points)
        ly = height + 8 + 22 * n
        parts.append(
            f'<rect x="{left}" y="{ly}" width="14" height="4" fill="{colour}"/>'
            f'<text x="{left + 20}" y="{ly + 6}">{_e(label)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _summary_section(root: Path, summary: dict[str, Any], data: _RunData, log_dir: Path | None) -> str:
    rows = _per_epoch(data)
    facts: list[tuple[str, str]] = []
    if summary.get("described"):
        facts.append(("Data", str(summary["described"])))
    for key, label in (("train_size", "Training samples"), ("test_size", "Held-out samples")):
        if isinstance(summary.get(key), int):
            facts.append((label, f"{summary[key]:,}"))
    if isinstance(summary.get("epochs"), int):
        facts.append(("Epochs", str(summary["epochs"])))
    if summary.get("seed") is not None:
        facts.append(("Seed", str(summary["seed"])))
    if isinstance(summary.get("test_accuracy"), (int, float)):
        facts.append(("Test accuracy", f"{summary['test_accuracy']:.2%}"))
    elif rows and any("val_acc" in r for r in rows.values()):
        last = [r["val_acc"] for r in rows.values() if "val_acc" in r][-1]
        facts.append(("Final validation accuracy", f"{last:.2%}"))
    if isinstance(summary.get("seconds"), (int, float)):
        facts.append(("Wall time", f"{summary['seconds']:.1f} s"))
    if summary.get("created"):
        facts.append(("Created", str(summary["created"])))
    if log_dir is not None:
        facts.append(("Logs", os.path.relpath(log_dir, root)))
    if summary.get("tensorboard"):
        facts.append(("TensorBoard", str(summary["tensorboard"])))
    if summary and not summary.get("complete", False):
        facts.append(("Status", "incomplete run"))
    facts.append(
        (
            "Pictures",
            f"{len(data.train)} training, {len(data.val)} validation, "
            f"{sum(len(v) for v in data.tracked.values())} tracked",
        )
    )
    dl = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in facts)
    out = ['<section id="summary"><h2>Run summary</h2>', f'<dl class="facts">{dl}</dl>']
    if rows:
        body = "".join(
            f"<tr><td>{e}</td><td>{_fmt(r.get('val_acc'), '{:.2%}')}</td><td>{_fmt(r.get('val_loss'))}</td>"
            f"<td>{_fmt(r.get('train_confused'), '{:.1%}')}</td><td>{_fmt(r.get('val_confused'), '{:.1%}')}"
            "</td></tr>"
            for e, r in rows.items()
        )
        out.append(
            '<table class="epochs"><thead><tr><th>epoch</th><th>validation accuracy</th>'
            "<th>validation loss</th><th>confused (training checks)</th><th>confused (validation)</th>"
            f"</tr></thead><tbody>{body}</tbody></table>"
        )
        out.append(_chart(rows))
        out.append(
            '<p class="note">A sample is <em>confused</em> when its two highest logits are within the '
            "callback's <code>max_logit_difference</code>; the fraction is over the samples checked.</p>"
        )
    else:
        out.append('<p class="empty">No per-epoch metrics were logged.</p>')
    out.append("</section>")
    return "".join(out)


def _describe(p: _Picture) -> str:
    r = p.record
    if {"class_a", "class_b", "margin"} <= r.keys():
        label = r.get("label", -1)
        who = f"label {label}" if isinstance(label, int) and label >= 0 else "label ?"
        return f"{who}: {r['class_a']} vs {r['class_b']}, margin {r['margin']:.3f} (step {p.step})"
    return f"step {p.step}"


def _confused_section(data: _RunData, max_per_epoch: int) -> str:
    out = [
        '<section id="confused"><h2>Confused samples per epoch</h2>',
        '<p class="note">Each picture: the input and its true label; the input gradients toward the '
        "model's top two classes (dark: less intensity there raises the class, bright: more), on one "
        "scale; and where following each gradient leads.</p>",
    ]
    by_epoch: dict[int | None, dict[str, list[_Picture]]] = defaultdict(lambda: {"train": [], "val": []})
    for p in data.train:
        by_epoch[p.epoch]["train"].append(p)
    for p in data.val:
        by_epoch[p.epoch]["val"].append(p)
    if not by_epoch:
        why = data.no_pictures or "No confused samples were logged."
        out.append(f'<p class="empty">{_e(why)}</p></section>')
        return "".join(out)
    for epoch in sorted(by_epoch, key=lambda e: (e is None, e if e is not None else 0)):
        groups = by_epoch[epoch]
        out.append(
            f'<div class="epoch"><h3>{_e("Epoch " + str(epoch) if epoch is not None else "Epoch ?")}</h3>'
        )
        for key, label in (("train", "training"), ("val", "validation")):
            pictures = groups[key]
            if not pictures:
                continue
            ranked = sorted(pictures, key=lambda p: (p.record.get("margin", math.inf), p.step, p.index))
            shown = ranked[:max_per_epoch] if key == "train" else ranked
            note = ""
            if len(shown) < len(pictures):
                note = f" (the {len(shown)} most confused of {len(pictures)})"
            out.append(f'<h4>{_e(label)}{_e(note)}</h4><div class="pictures">')
            out.extend(
                _figure(p.png, f"{label} confused sample, {_describe(p)}", _describe(p)) for p in shown
            )
            out.append("</div>")
        out.append("</div>")
    out.append("</section>")
    return "".join(out)


def _tracked_section(data: _RunData) -> str:
    out = [
        '<section id="tracked"><h2>Tracked samples over time</h2>',
        '<p class="note">The most confused validation samples of the first epoch, re-explained at the '
        "end of every epoch: how the explanation changes as the model learns.</p>",
    ]
    if not data.tracked:
        out.append(
            '<p class="empty">No samples were tracked (the callback\'s <code>track</code> was 0).'
            "</p></section>"
        )
        return "".join(out)
    for i in sorted(data.tracked):
        pictures = data.tracked[i]
        label = next((p.record.get("label") for p in pictures if p.record.get("label") is not None), None)
        head = f"Sample {i}" + (f" (label {label})" if isinstance(label, int) and label >= 0 else "")
        out.append(f'<div class="track"><h3>{_e(head)}</h3><div class="pictures timelapse">')
        for p in pictures:
            when = f"epoch {p.epoch}" if p.epoch is not None else f"step {p.step}"
            out.append(_figure(p.png, f"tracked sample {i}, {when}", when))
        out.append("</div></div>")
    out.append("</section>")
    return "".join(out)


def _morph_caption(m: dict[str, Any]) -> str:
    if not {"label", "target"} <= m.keys():
        return Path(str(m["strip"])).stem
    head = f"{m['label']} → {m['target']}"
    if m.get("kind"):
        head += f" ({m['kind']})"
    parts = [head]
    distance = m.get("distance")
    if m.get("success"):
        flip = f"flipped at step {m.get('step')}"
        if isinstance(distance, (int, float)):
            flip += f" (L2 distance {distance:.2f})"
        parts.append(flip)
    elif "success" in m:
        parts.append(f"did not flip in {m.get('steps', '?')} steps")
    start, end = m.get("p_target_start"), m.get("p_target_end")
    if isinstance(start, (int, float)) and isinstance(end, (int, float)):
        where = ""
        if isinstance(m.get("end_step"), int):
            where = f" at step {m['end_step']}"
            if isinstance(m.get("end_distance"), (int, float)):
                where += f" (L2 distance {m['end_distance']:.2f})"
        parts.append(f"p({m['target']}) {start:.2f} → {end:.2f}{where}")
    return ", ".join(parts)


def _morph_section(root: Path, morphs: Sequence[dict[str, Any]]) -> str:
    out = [
        '<section id="morph"><h2>Morphing digits</h2>',
        '<p class="note">Gradient-ascent steps on the input toward another class until the model '
        "predicts it: what the model thinks would have to change.</p>",
    ]
    for m in morphs:
        path = root / str(m["strip"])
        try:
            png = path.read_bytes()
        except OSError:
            out.append(f'<p class="empty">Missing film strip: {_e(m["strip"])}</p>')
            continue
        caption = _morph_caption(m)
        link = ""
        gif = m.get("gif")
        if isinstance(gif, str) and (root / gif).is_file():
            link = f' <a href="{_e(gif)}">animation</a>'
        out.append(
            f'<figure class="strip">{_img(png, "film strip: " + caption)}'
            f"<figcaption>{_e(caption)}{link}</figcaption></figure>"
        )
    if not morphs:
        out.append(
            '<p class="empty">No film strips in this run (<code>peering demo</code> writes them '
            "to <code>morph/</code>).</p>"
        )
    out.append("</section>")
    return "".join(out)


_STYLE = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1200px;
padding:0 20px 40px;color:#1f2328;background:#fff}
h1{font-size:26px;margin:24px 0 4px}h2{border-bottom:1px solid #d0d7de;padding-bottom:4px;margin-top:32px}
h3{margin:18px 0 6px}h4{margin:10px 0 4px;font-weight:600;color:#57606a}
nav a{margin-right:14px}
code{background:#f6f8fa;padding:1px 4px;border-radius:4px}
.facts{display:grid;grid-template-columns:max-content 1fr;gap:2px 16px}.facts dt{color:#57606a}
.facts dd{margin:0}
table.epochs{border-collapse:collapse;margin:12px 0}table.epochs td,table.epochs th{border:1px solid #d0d7de;
padding:3px 10px;text-align:right}table.epochs th{background:#f6f8fa}
.chart text{font-size:12px;fill:#57606a}
.pictures{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-start}
.timelapse{flex-wrap:nowrap;overflow-x:auto;padding-bottom:6px}.timelapse img{max-width:none}
figure{margin:0}figcaption{font-size:12px;color:#57606a;max-width:520px}
figure.strip figcaption{max-width:none}
img{image-rendering:pixelated;max-width:100%;height:auto;border:1px solid #eaeef2;display:block}
figure.strip{margin:10px 0}
.note{color:#57606a}.empty{color:#8c959f;font-style:italic}
"""


def _render(
    root: Path,
    summary: dict[str, Any],
    data: _RunData,
    morphs: Sequence[dict[str, Any]],
    log_dir: Path | None,
    max_per_epoch: int,
    title: str | None,
) -> str:
    page_title = title or str(summary.get("title") or f"peering report: {root.resolve().name}")
    nav = "".join(
        f'<a href="#{s}">{_e(t)}</a>'
        for s, t in zip(SECTIONS, ("Summary", "Confused samples", "Tracked samples", "Morphing"), strict=True)
    )
    body = [
        _summary_section(root, summary, data, log_dir),
        _confused_section(data, max_per_epoch),
        _tracked_section(data),
        _morph_section(root, morphs),
    ]
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_e(_CSP)}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(page_title)}</title><style>{_STYLE}</style></head>\n"
        f"<body><header><h1>{_e(page_title)}</h1><nav>{nav}</nav></header>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
