"""The demo's sections: the morphs, the judges, the sanity check."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peering.report.run import RunData
from peering.report.sections.base import VERDICTS, Options, file_entry, fmt

__all__: list[str] = []  # internal: its names are used by its own package only


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


def morph(run: RunData, options: Options) -> dict[str, Any] | None:
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


def judges(run: RunData, options: Options) -> dict[str, Any] | None:
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
                "success": fmt(m.get("success"), "{:.1%}"),
                "agreement": [fmt(agreement.get(n), "{:.1%}") for n in names],
                "noise": [fmt(noise.get(n), "{:.1%}") for n in names],
                "mean_l2": fmt(m.get("mean_l2"), "{:.2f}"),
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
            "agreement": [(n, fmt(agreement.get(n), "{:.0%}")) for n in names],
            "reached": sum(bool(v) for v in entry.get("success", [])),
            "count": len(entry.get("classes", [])),
        }
    return {
        "names": names,
        "accuracy": [(n, fmt(accuracy.get(n), "{:.1%}")) for n in names],
        "trained_on": record.get("trained_on"),
        "rows": rows,
        "portraits": portraits,
    }


def sanity(run: RunData, options: Options) -> dict[str, Any] | None:
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
                "cells": [fmt(v, "{:.2f}") for v in numbers.get("correlation", [])],
                "unrelated": fmt(numbers.get("unrelated"), "{:.2f}"),
                "verdict": VERDICTS.get(passed, "undecided"),
                "passed": passed,
                "sentence": str(numbers.get("verdict", "")),
            }
        )
    maps = [
        {"method": method, **file_entry(run.root, path)}
        for method, path in (sanity.get("maps") or {}).items()
    ]
    threshold = sanity.get("threshold")
    return {
        "steps": [name if i == 0 else f"+{name}" for i, name in enumerate(layers)],
        "rows": rows,
        "passing": [r["method"] for r in rows if r["passed"] is True],
        "failing": [r["method"] for r in rows if r["passed"] is not True],
        "samples": sanity.get("samples", "?"),
        "threshold": fmt(threshold, "{:g}") if isinstance(threshold, (int, float)) else "?",
        "curves": file_entry(run.root, sanity["curves"]) if sanity.get("curves") else None,
        "maps": maps,
    }
