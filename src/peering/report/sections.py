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
    dataset_samples: int = 8  # most and least confident samples shown of a dataset run
    display: Any = None  # how the inputs the report draws itself are shown (peering.render.Display)


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


def _summary(run: RunData, options: Options) -> dict[str, Any] | None:
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


def _tokens(p: Picture) -> Any:
    """The coloured tokens of a text sample's picture as HTML (`peering.render.token_html`), from the
    ``tokens`` and ``scores`` its index record keeps; None for other pictures or a malformed record."""
    r = p.record
    tokens, scores = r.get("tokens"), r.get("scores")
    if not (isinstance(tokens, list) and isinstance(scores, list) and len(scores) == 2):
        return None
    if not all(isinstance(row, list) and len(row) == len(tokens) for row in scores):
        return None
    try:
        import torch

        from peering.render import token_html
        from peering.render.tokens import two_class_probabilities

        classes = torch.tensor([[int(r["class_a"]), int(r["class_b"])]])
        probabilities = torch.tensor([[float(r["prob_a"]), float(r["prob_b"])]])
        return token_html(
            torch.tensor([scores], dtype=torch.float32),
            [[str(t) for t in tokens]],
            targets=classes,
            probabilities=two_class_probabilities(classes, probabilities),
            output=r.get("output"),
        )
    except (KeyError, TypeError, ValueError):
        return None


def _figure(p: Picture, alt: str, caption: str) -> dict[str, Any]:
    """What the ``figure`` macro of the templates shows: the picture, or a text sample's coloured tokens."""
    return {"picture": p, "alt": alt, "caption": caption, "tokens": _tokens(p)}


def _confused(run: RunData, options: Options) -> dict[str, Any] | None:
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
            figures = [_figure(p, f"{label} confused sample, {_describe(p)}", _describe(p)) for p in shown]
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


def _atlas(run: RunData, options: Options) -> dict[str, Any] | None:
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
            caption += f": {total:,} samples, accuracy {_fmt(right / total if total else None, '{:.1%}')}"
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


def _tracked(run: RunData, options: Options) -> dict[str, Any] | None:
    if run.dataset_only:  # a folder of dataset attributions has no training run to show
        return None
    samples = []
    for i in sorted(run.tracked):
        pictures = run.tracked[i]
        label = next((p.record.get("label") for p in pictures if p.record.get("label") is not None), None)
        figures = []
        for p in pictures:
            when = f"epoch {p.epoch}" if p.epoch is not None else f"step {p.step}"
            figures.append(_figure(p, f"tracked sample {i}, {when}", when))
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


def _morph(run: RunData, options: Options) -> dict[str, Any] | None:
    if run.dataset_only:  # a folder of dataset attributions has no training run to show
        return None
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


# ------------------------------------------------------------------------------------------------ dataset


@dataclass(frozen=True)
class _Drawn:
    """A picture drawn for the report (PNG bytes), shaped like a logged `Picture` for the templates."""

    png: bytes


def _png(image: Any) -> _Drawn:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return _Drawn(buf.getvalue())


def _target_text(config: dict[str, Any]) -> str:
    target = config.get("target")
    if target == "label":
        return "each sample's label"
    if isinstance(target, int):
        return f"class {target}"
    return f"the model's top {config.get('top_k', '?')} classes"


def _dataset_facts(d: Any) -> list[tuple[str, str]]:
    a, source, config = d.attributions, d.source, d.attributions.config
    facts = [("Samples", f"{len(a):,}" + ("" if a.complete else " (an unfinished run: the samples so far)"))]
    what = {"digits": "scikit-learn's 8x8 digits", "mnist": "MNIST t10k digits"}.get(str(source.get("data")))
    if source.get("data") == "folder":
        what = f"images from {source.get('root')}"
    if what:
        facts.append(("Data", what))
    facts.append(("Explained", f"{a.method} of the {a.output} of {_target_text(config)}"))
    norm = source.get("normalisation")
    if isinstance(norm, dict) and {"mean", "std"} <= norm.keys():
        values = ", ".join(f"{k} {norm[k]}" for k in ("mean", "std"))
        seen = f"the model saw (x - mean) / std ({values}); the pictures show x as read"
        facts.append(("Normalised", seen))
    if config.get("layer"):
        facts.append(("Layer", str(config["layer"])))
    model = config.get("model", {})
    if model:
        facts.append(("Model", f"{model.get('class', '?')} (weights CRC-32 {model.get('crc32', '?')})"))
    if source.get("checkpoint"):
        facts.append(("Checkpoint", str(source["checkpoint"])))
    labelled = a.valid & (a.labels >= 0)
    if bool(labelled.any()):
        right = (a.logits[labelled].argmax(1) == a.labels[labelled]).float().mean()
        facts.append(("Accuracy", f"{float(right):.2%} of {int(labelled.sum()):,} labelled samples"))
    skipped = int((~a.valid).sum())
    if skipped:
        facts.append(("Skipped", f"{skipped:,} samples with NaN/Inf inputs or logits"))
    return facts


def _sample_rows(d: Any, positions: Any) -> list[dict[str, str]]:
    a = d.attributions
    probs = a.probabilities[positions]
    rows = []
    for pos, p in zip(positions.tolist(), probs, strict=True):
        label = int(a.labels[pos])
        top = int(p.argmax())
        rows.append(
            {
                "index": f"{int(a.indices[pos]):,}",
                "label": str(label) if label >= 0 else "?",
                "predicted": str(top),
                "confidence": f"{float(p[top]):.1%}",
                "explained": ", ".join(str(int(t)) for t in a.targets[pos] if int(t) >= 0),
            }
        )
    return rows


def _sample_picture(d: Any, positions: Any, display: Any = None) -> tuple[_Drawn | None, str]:
    """One row per sample (input and its maps, `explanation_image`), or None and why not."""
    from types import SimpleNamespace

    from peering.render import explanation_image

    a = d.attributions
    if d.inputs is None:
        return None, d.no_inputs
    try:
        inputs = d.inputs(a.indices[positions])
    except Exception as err:  # a file moved since the run
        return None, f"the inputs could not be read again ({type(err).__name__}: {err})"
    if tuple(inputs.shape[1:]) != tuple(a.attributions.shape[2:]):
        return None, "the attributions are of a layer, not of the inputs: no input pictures"
    exp: Any = SimpleNamespace(  # explanation_image takes any object with these three attributes
        attributions=a.attributions[positions],
        targets=a.targets[positions],
        probabilities=a.probabilities[positions],
    )
    zoom = max(1, -(-64 // max(inputs.shape[-1], 1)))
    return _png(explanation_image(exp, inputs, zoom=zoom, max_samples=None, display=display)), ""


def _dataset(run: RunData, options: Options) -> dict[str, Any] | None:
    d = run.dataset
    if d is None:
        return None
    import torch

    from peering.render import class_mean_maps

    a = d.attributions
    valid = a.valid.nonzero().flatten()
    confidence = a.probabilities[valid].max(dim=1).values
    order = valid[torch.sort(confidence, descending=True, stable=True).indices]
    k = min(options.dataset_samples, len(order))
    groups = []
    for heading, positions in (
        ("Most confident", order[:k]),
        ("Least confident", order.flip(0)[:k]),
    ):
        picture, why = _sample_picture(d, positions, options.display) if k else (None, "no samples")
        rows = _sample_rows(d, positions)
        groups.append({"heading": heading, "picture": picture, "why": why, "rows": rows})
    means = None
    if int(d.class_counts.sum()):
        zoom = max(1, -(-64 // max(int(d.class_means.shape[-1]), 1)))
        means = _png(class_mean_maps(d.class_means, d.class_counts, zoom=zoom))
    return {"facts": _dataset_facts(d), "groups": groups, "means": means}


# ------------------------------------------------------------------------------------------------- sanity

_VERDICTS = {True: "passes", False: "fails", None: "undecided"}


def _file(root: Path, path: Any) -> dict[str, Any]:
    """A picture of the run by its path in run.json: ``{"png": bytes, "missing": None}``, or ``missing``."""
    try:
        return {"png": (root / str(path)).read_bytes(), "missing": None}
    except (OSError, TypeError):
        return {"png": b"", "missing": str(path)}


def _sanity(run: RunData, options: Options) -> dict[str, Any] | None:
    """The randomisation sanity check that `peering demo` ran (``run.json``'s ``sanity``), if any."""
    sanity = run.summary.get("sanity")
    if not isinstance(sanity, dict) or not isinstance(sanity.get("methods"), dict) or not sanity["methods"]:
        return None
    layers = [str(name) for name in sanity.get("layers", [])]
    rows = []
    for method, numbers in sanity["methods"].items():
        passed = numbers.get("passed")
        rows.append(
            {
                "method": method,
                "cells": [_fmt(v, "{:.2f}") for v in numbers.get("correlation", [])],
                "unrelated": _fmt(numbers.get("unrelated"), "{:.2f}"),
                "verdict": _VERDICTS.get(passed, "undecided"),
                "passed": passed,
                "sentence": str(numbers.get("verdict", "")),
            }
        )
    maps = [
        {"method": method, **_file(run.root, path)}
        for method, path in (sanity.get("maps") or {}).items()
    ]
    threshold = sanity.get("threshold")
    return {
        "steps": [name if i == 0 else f"+{name}" for i, name in enumerate(layers)],
        "rows": rows,
        "passing": [r["method"] for r in rows if r["passed"] is True],
        "failing": [r["method"] for r in rows if r["passed"] is not True],
        "samples": sanity.get("samples", "?"),
        "threshold": _fmt(threshold, "{:g}") if isinstance(threshold, (int, float)) else "?",
        "curves": _file(run.root, sanity["curves"]) if sanity.get("curves") else None,
        "maps": maps,
    }


# --------------------------------------------------------------------------------------------- the order

_ALL: tuple[Section, ...] = (
    Section("summary", "Run summary", "Summary", _summary),
    Section("confused", "Confused samples per epoch", "Confused samples", _confused),
    Section("atlas", "Confusion atlas per epoch", "Confusion atlas", _atlas),
    Section("tracked", "Tracked samples over time", "Tracked samples", _tracked),
    Section("morph", "Morphing digits", "Morphing", _morph),
    Section("judges", "Do other models believe the morphs?", "Judges", _judges),
    Section("dataset", "Dataset attributions", "Dataset", _dataset),
    Section("sanity", "Sanity check", "Sanity check", _sanity),
)

SECTIONS: tuple[str, ...] = tuple(s.id for s in _ALL)
"""The ids of the report's sections, in page order (a section with nothing to show is left out)."""
