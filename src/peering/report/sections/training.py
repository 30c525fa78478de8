"""The training run's sections: the summary, the confused samples, the confusion atlas, the tracked
samples."""

from __future__ import annotations

import math
import os
from collections import defaultdict
from typing import Any

from peering.report.run import (
    TAG_TRAIN_FRACTION,
    TAG_VAL_FRACTION,
    Picture,
    RunData,
    _callback_epochs,
    _lightning_epochs,
)
from peering.report.sections.base import Options, figure, fmt

__all__: list[str] = []  # internal: its names are used by its own package only


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


def summary(run: RunData, options: Options) -> dict[str, Any] | None:
    if run.dataset_only:  # a folder of dataset attributions has no training run to show
        return None
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
            "val_acc": fmt(r.get("val_acc"), "{:.2%}"),
            "val_loss": fmt(r.get("val_loss")),
            "train_confused": fmt(r.get("train_confused"), "{:.1%}"),
            "val_confused": fmt(r.get("val_confused"), "{:.1%}"),
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


def confused(run: RunData, options: Options) -> dict[str, Any] | None:
    if run.dataset_only:  # a folder of dataset attributions has no training run to show
        return None
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
            figures = [figure(p, f"{label} confused sample, {_describe(p)}", _describe(p)) for p in shown]
            groups.append({"heading": label + note, "figures": figures})
        epochs.append({"heading": f"Epoch {epoch}" if epoch is not None else "Epoch ?", "groups": groups})
    return {"epochs": epochs, "no_pictures": run.no_pictures}


# -------------------------------------------------------------------------------------------------- atlas


def _matrix_of(p: Picture) -> list[list[int]] | None:
    """The counts of a matrix picture's index record, or None when the record is missing or malformed."""
    m = p.record.get("matrix")
    if not isinstance(m, list) or not m or not all(isinstance(row, list) and len(row) == len(m) for row in m):
        return None
    return m


def _when(p: Picture) -> str:
    return f"epoch {p.epoch}" if p.epoch is not None else f"step {p.step}"


def _trend_chart(points: list[tuple[str, int, int]]) -> dict[str, Any] | None:
    """The geometry of a small line chart of one mistake's count per validation run (labels: the epoch
    numbers, or the runs' labels when they are not epochs)."""
    if len(points) < 2:
        return None
    width, height, left, right, top, bottom = 330, 96, 50, 24, 10, 22
    peak = max(1, max(count for _, count, _ in points))
    span = len(points) - 1

    def x(i: int) -> float:
        return left + i / span * (width - left - right)

    def y(count: int) -> float:
        return top + (1.0 - count / peak) * (height - top - bottom)

    xy = [(x(i), y(count)) for i, (_, count, _) in enumerate(points)]
    every = max(1, math.ceil(len(points) / 8))
    return {
        "width": width,
        "height": height,
        "left": left,
        "right_x": width - right,
        "ticks": [(str(v), y(v)) for v in sorted({0, peak})],
        "labels": [(label.removeprefix("epoch "), x(i)) for i, (label, _, _) in enumerate(points)][::every],
        "axis": "epoch" if all(label.startswith("epoch ") for label, _, _ in points) else "",
        "points": xy,
        "path": " ".join(f"{px:.1f},{py:.1f}" for px, py in xy),
    }


def atlas(run: RunData, options: Options) -> dict[str, Any] | None:
    """The confusion matrix of every validation run (a radio-button stepper), and the last run's most
    frequent mistakes: each one's count across the runs, its examples and its direction."""
    if not run.matrices:
        return None
    matrices = sorted(run.matrices, key=lambda p: (p.step, p.index))
    frames = []
    history: list[tuple[str, list[list[int]]]] = []  # (when, counts) of the runs with counts
    for i, p in enumerate(matrices):
        when, m = _when(p), _matrix_of(p)
        caption = f"{when} (step {p.step})"
        if m is not None:
            history.append((when, m))
            total = sum(map(sum, m))
            right = sum(m[k][k] for k in range(len(m)))
            caption += f": {total:,} samples, accuracy {fmt(right / total if total else None, '{:.1%}')}"
            caption += f", {total - right:,} mistakes"
            ignored = p.record.get("ignored")
            if isinstance(ignored, int) and ignored:
                caption += f" ({ignored:,} samples without a label or with non-finite scores not counted)"
        alt = f"confusion matrix, {when}"
        frames.append({"id": f"atlas-{i}", "label": when, "picture": p, "alt": alt, "caption": caption})

    last = matrices[-1]
    top = [tuple(pair) for pair in last.record.get("pairs", []) if isinstance(pair, list) and len(pair) == 2]
    if not top:  # no index record: the pairs drawn at the last step, in their order
        top = [
            (int(p.record["true"]), int(p.record["predicted"]))
            for p in sorted(run.pairs, key=lambda p: p.index)
            if p.step == last.step and {"true", "predicted"} <= p.record.keys()
        ]
    pairs = []
    for a, b in top:
        drawn = sorted(
            (p for p in run.pairs if p.record.get("true") == a and p.record.get("predicted") == b),
            key=lambda p: p.step,
        )
        latest = drawn[-1] if drawn else None
        points = [
            (when, int(m[a][b]), int(sum(m[a])))
            for when, m in history
            if a < len(m) and b < len(m)
        ]
        trend = " → ".join(
            f"{when}: {count:,}" + (f" ({count / total:.1%})" if total else "")
            for when, count, total in points
        )
        picture = None
        if latest is not None:
            r = latest.record
            caption = f"{_when(latest)}: {r.get('examples', '?')} examples closest to the {a}/{b} boundary, "
            caption += f"and the mean gradient of log p({b}) - log p({a}) over them"
            alt = f"true {a} predicted {b}, {_when(latest)}"
            picture = {"picture": latest, "alt": alt, "caption": caption}
        earlier = [
            {"picture": p, "alt": f"true {a} predicted {b}, {_when(p)}", "caption": _when(p)}
            for p in drawn[:-1]
        ]
        pairs.append(
            {
                "heading": f"true {a}, predicted {b}",
                "figure": picture,
                "chart": _trend_chart(points),
                "trend": trend,
                "earlier": earlier,
            }
        )
    return {"frames": frames, "pairs": pairs, "last": _when(last)}


# ------------------------------------------------------------------------------------------------ tracked


def tracked(run: RunData, options: Options) -> dict[str, Any] | None:
    if run.dataset_only:  # a folder of dataset attributions has no training run to show
        return None
    samples = []
    for i in sorted(run.tracked):
        pictures = run.tracked[i]
        label = next((p.record.get("label") for p in pictures if p.record.get("label") is not None), None)
        figures = []
        for p in pictures:
            when = f"epoch {p.epoch}" if p.epoch is not None else f"step {p.step}"
            figures.append(figure(p, f"tracked sample {i}, {when}", when))
        heading = f"Sample {i}" + (f" (label {label})" if isinstance(label, int) and label >= 0 else "")
        samples.append({"heading": heading, "figures": figures})
    return {"samples": samples}


# -------------------------------------------------------------------------------------------------- morph
