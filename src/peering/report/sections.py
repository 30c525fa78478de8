"""The report's sections: what each shows, in order, and the data its template gets.

Each section is a `Section`: an id (the HTML anchor, and the template ``templates/sections/<id>.html.j2``),
a heading, a short name for the page's navigation bar, and a ``build`` function that turns the run
(`RunData`) and the report's options (`Options`) into the variables its template sees, or returns None
when the run has nothing for it (the section, and its link, are then left out of the page).

The builders compute and format; the templates only lay out. Numbers are formatted here (one place that
knows "0.9812" is shown as "98.12%"), pictures stay `Picture` objects that templates embed with the
``data_uri`` filter.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peering.report.run import (
    TAG_TRAIN_FRACTION,
    TAG_VAL_FRACTION,
    Picture,
    RunData,
    _callback_epochs,
    _lightning_epochs,
)

__all__ = ["SECTIONS", "Options", "Section"]


@dataclass(frozen=True)
class Options:
    """The report's options, as `build_report` was given them (every builder sees them)."""

    max_per_epoch: int = 6


@dataclass(frozen=True)
class Section:
    """One section of the report: ``id`` (anchor and template name), ``heading``, ``nav`` (the link's
    text) and ``build(run, options) -> dict | None`` (the template's variables, None to leave it out)."""

    id: str
    heading: str
    nav: str
    build: Callable[[RunData, Options], dict[str, Any] | None]

    @property
    def template(self) -> str:
        """The template's name in the package's ``templates/`` folder."""
        return f"sections/{self.id}.html.j2"


# ------------------------------------------------------------------------------------------------ summary


def _fmt(value: float | None, pattern: str = "{:.3f}") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return pattern.format(value)


def _per_epoch(run: RunData) -> dict[int, dict[str, float]]:
    """epoch -> {val_acc, val_loss, train_confused, val_confused}."""
    table: dict[int, dict[str, float]] = defaultdict(dict)
    lightning_epoch = _lightning_epochs(run.scalars.get("epoch", []))
    for tag, key in (("val_acc", "val_acc"), ("val_loss", "val_loss")):
        for step, value in run.scalars.get(tag, []):
            epoch = lightning_epoch(step)
            if epoch is not None:
                table[epoch][key] = value  # the last value of the epoch
    callback_epoch = _callback_epochs(run.records, run.scalars.get("epoch", []))
    for tag, key in ((TAG_TRAIN_FRACTION, "train_confused"), (TAG_VAL_FRACTION, "val_confused")):
        sums: dict[int, list[float]] = defaultdict(list)
        for step, value in run.scalars.get(tag, []):
            epoch = callback_epoch(step)
            if epoch is not None:
                sums[epoch].append(value)
        for epoch, values in sums.items():
            table[epoch][key] = sum(values) / len(values)
    return dict(sorted(table.items()))


def _chart(rows: dict[int, dict[str, float]]) -> dict[str, Any] | None:
    """The geometry of a line chart of accuracy and confused fractions per epoch (all in [0, 1])."""
    series = [
        ("val_acc", "validation accuracy", "#1f6feb"),
        ("train_confused", "confused fraction (training checks)", "#d29922"),
        ("val_confused", "confused fraction (validation)", "#8250df"),
    ]
    epochs = sorted(rows)
    if not epochs or not any(k in rows[e] for e in epochs for k, _, _ in series):
        return None
    width, height, left, right, top, bottom = 640, 220, 44, 16, 12, 30
    span = max(epochs[-1] - epochs[0], 1)

    def x(epoch: int) -> float:
        return left + (epoch - epochs[0]) / span * (width - left - right)

    def y(value: float) -> float:
        return top + (1.0 - max(0.0, min(1.0, value))) * (height - top - bottom)

    every = max(1, math.ceil(len(epochs) / 12))
    lines = []
    for n, (key, label, colour) in enumerate(series):
        points = [(x(e), y(rows[e][key])) for e in epochs if key in rows[e]]
        if points:
            lines.append(
                {
                    "label": label,
                    "colour": colour,
                    "points": points,
                    "path": " ".join(f"{px:.1f},{py:.1f}" for px, py in points),
                    "legend_y": height + 8 + 22 * n,
                }
            )
    return {
        "width": width,
        "height": height,
        "full_height": height + 22 * len(series),
        "left": left,
        "right_x": width - right,
        "ticks": [(f"{v:.2f}", y(v)) for v in (0.0, 0.25, 0.5, 0.75, 1.0)],
        "epochs": [(e, x(e)) for e in epochs[::every]],
        "lines": lines,
    }


def _summary(run: RunData, options: Options) -> dict[str, Any]:
    summary, rows = run.summary, _per_epoch(run)
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
    if run.log_dir is not None:
        facts.append(("Logs", os.path.relpath(run.log_dir, run.root)))
    if summary.get("tensorboard"):
        facts.append(("TensorBoard", str(summary["tensorboard"])))
    if summary and not summary.get("complete", False):
        facts.append(("Status", "incomplete run"))
    facts.append(
        (
            "Pictures",
            f"{len(run.train)} training, {len(run.val)} validation, "
            f"{sum(len(v) for v in run.tracked.values())} tracked",
        )
    )
    epochs = [
        {
            "epoch": e,
            "val_acc": _fmt(r.get("val_acc"), "{:.2%}"),
            "val_loss": _fmt(r.get("val_loss")),
            "train_confused": _fmt(r.get("train_confused"), "{:.1%}"),
            "val_confused": _fmt(r.get("val_confused"), "{:.1%}"),
        }
        for e, r in rows.items()
    ]
    return {"facts": facts, "epochs": epochs, "chart": _chart(rows)}


# ----------------------------------------------------------------------------------------------- confused


def _describe(p: Picture) -> str:
    r = p.record
    if {"class_a", "class_b", "margin"} <= r.keys():
        label = r.get("label", -1)
        who = f"label {label}" if isinstance(label, int) and label >= 0 else "label ?"
        return f"{who}: {r['class_a']} vs {r['class_b']}, margin {r['margin']:.3f} (step {p.step})"
    return f"step {p.step}"


def _confused(run: RunData, options: Options) -> dict[str, Any]:
    by_epoch: dict[int | None, dict[str, list[Picture]]] = defaultdict(lambda: {"train": [], "val": []})
    for p in run.train:
        by_epoch[p.epoch]["train"].append(p)
    for p in run.val:
        by_epoch[p.epoch]["val"].append(p)
    epochs = []
    for epoch in sorted(by_epoch, key=lambda e: (e is None, e if e is not None else 0)):
        groups = []
        for key, label in (("train", "training"), ("val", "validation")):
            pictures = by_epoch[epoch][key]
            if not pictures:
                continue
            ranked = sorted(pictures, key=lambda p: (p.record.get("margin", math.inf), p.step, p.index))
            shown = ranked[: options.max_per_epoch] if key == "train" else ranked
            note = (
                f" (the {len(shown)} most confused of {len(pictures)})" if len(shown) < len(pictures) else ""
            )
            figures = [
                {"picture": p, "alt": f"{label} confused sample, {_describe(p)}", "caption": _describe(p)}
                for p in shown
            ]
            groups.append({"heading": label + note, "figures": figures})
        epochs.append({"heading": f"Epoch {epoch}" if epoch is not None else "Epoch ?", "groups": groups})
    return {"epochs": epochs}


# ------------------------------------------------------------------------------------------------ tracked


def _tracked(run: RunData, options: Options) -> dict[str, Any]:
    samples = []
    for i in sorted(run.tracked):
        pictures = run.tracked[i]
        label = next((p.record.get("label") for p in pictures if p.record.get("label") is not None), None)
        figures = []
        for p in pictures:
            when = f"epoch {p.epoch}" if p.epoch is not None else f"step {p.step}"
            figures.append({"picture": p, "alt": f"tracked sample {i}, {when}", "caption": when})
        heading = f"Sample {i}" + (f" (label {label})" if isinstance(label, int) and label >= 0 else "")
        samples.append({"heading": heading, "figures": figures})
    return {"samples": samples}


# -------------------------------------------------------------------------------------------------- morph


def _morph_caption(m: dict[str, Any]) -> str:
    if not {"label", "target"} <= m.keys():
        return Path(str(m["strip"])).stem
    head = f"{m['label']} → {m['target']}"
    if m.get("kind"):
        head += f" ({m['kind']})"
    parts = [head]
    distance = m.get("distance")
    confidence = m.get("confidence")
    if m.get("success") and isinstance(confidence, (int, float)):
        reached = f"p({m['target']}) ≥ {confidence:g} at step {m.get('step')}"
        if isinstance(distance, (int, float)):
            reached += f" (L2 distance {distance:.2f})"
        parts.append(reached)
    elif m.get("success"):
        flip = f"flipped at step {m.get('step')}"
        if isinstance(distance, (int, float)):
            flip += f" (L2 distance {distance:.2f})"
        parts.append(flip)
    elif "success" in m:
        rule = f"reach p ≥ {confidence:g}" if isinstance(confidence, (int, float)) else "flip"
        parts.append(f"did not {rule} in {m.get('steps', '?')} steps")
    start, end = m.get("p_target_start"), m.get("p_target_end")
    if isinstance(start, (int, float)) and isinstance(end, (int, float)):
        where = ""
        if isinstance(m.get("end_step"), int):
            where = f" at step {m['end_step']}"
            if isinstance(m.get("end_distance"), (int, float)):
                where += f" (L2 distance {m['end_distance']:.2f})"
        parts.append(f"p({m['target']}) {start:.2f} → {end:.2f}{where}")
    return ", ".join(parts)


def _morph(run: RunData, options: Options) -> dict[str, Any]:
    strips: list[dict[str, Any]] = []
    for m in run.morphs:
        try:
            png = (run.root / str(m["strip"])).read_bytes()
        except OSError:
            strips.append({"missing": str(m["strip"]), "png": b"", "caption": "", "gif": None})
            continue
        animation = None
        gif = m.get("gif")
        if isinstance(gif, str):
            try:
                animation = (run.root / gif).read_bytes()
            except OSError:
                animation = None
        strips.append({"missing": None, "png": png, "caption": _morph_caption(m), "gif": animation})
    return {"strips": strips}


# ------------------------------------------------------------------------------------------------- judges


def _judges(run: RunData, options: Options) -> dict[str, Any] | None:
    record = run.summary.get("judges")
    if not isinstance(record, dict) or not record.get("names"):
        return None
    names = [str(n) for n in record["names"]]
    accuracy = record.get("accuracy", {})
    rows = []
    for m in record.get("morphs", []):
        agreement, noise = m.get("agreement", {}), m.get("noise", {})
        rows.append(
            {
                "method": str(m.get("method", "")),
                "n": m.get("n", "–"),
                "success": _fmt(m.get("success"), "{:.1%}"),
                "agreement": [_fmt(agreement.get(n), "{:.1%}") for n in names],
                "noise": [_fmt(noise.get(n), "{:.1%}") for n in names],
                "mean_l2": _fmt(m.get("mean_l2"), "{:.2f}"),
            }
        )
    portraits = None
    entry = record.get("portraits")
    if isinstance(entry, dict) and isinstance(entry.get("picture"), str):
        try:
            png: bytes | None = (run.root / entry["picture"]).read_bytes()
        except OSError:
            png = None
        agreement = entry.get("agreement", {})
        portraits = {
            "picture": {"png": png} if png is not None else None,
            "missing": entry["picture"] if png is None else None,
            "agreement": [(n, _fmt(agreement.get(n), "{:.0%}")) for n in names],
            "reached": sum(bool(v) for v in entry.get("success", [])),
            "count": len(entry.get("classes", [])),
        }
    return {
        "names": names,
        "accuracy": [(n, _fmt(accuracy.get(n), "{:.1%}")) for n in names],
        "trained_on": record.get("trained_on"),
        "rows": rows,
        "portraits": portraits,
    }


# --------------------------------------------------------------------------------------------- the order

_ALL: tuple[Section, ...] = (
    Section("summary", "Run summary", "Summary", _summary),
    Section("confused", "Confused samples per epoch", "Confused samples", _confused),
    Section("tracked", "Tracked samples over time", "Tracked samples", _tracked),
    Section("morph", "Morphing digits", "Morphing", _morph),
    Section("judges", "Do other models believe the morphs?", "Judges", _judges),
)

SECTIONS: tuple[str, ...] = tuple(s.id for s in _ALL)
"""The ids of the report's sections, in page order (a section with nothing to show is left out)."""
