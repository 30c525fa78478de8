"""The sections of what `LabelIssues` and `ShortcutAlarm` found while the model trained: the labels to
check, and the shortcut alarms."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from peering.report.run import Picture, RunData, _callback_epochs
from peering.report.sections.base import Options, fmt
from peering.runs import names

__all__: list[str] = []  # internal: its names are used by its own package only

SHOWN_SUSPECTS = 16
"""The most suspect labels the report lists (those of the last epoch's picture have one each)."""


def _last_write(pictures: list[Picture]) -> list[Picture]:
    """The pictures of the last step (the last epoch's write)."""
    if not pictures:
        return []
    last = max(p.step for p in pictures)
    return [p for p in pictures if p.step == last]


def label_issues(run: RunData, options: Options) -> dict[str, Any] | None:
    """The labels to check: the ranking's head with the last epoch's pictures, the most frequent
    (given, model's class) pairs among the suspects, and the per-epoch counts."""
    ranking, pictures = run.label_ranking, _last_write(run.suspects)
    if not ranking and not pictures:
        return None
    by_sample = {int(p.record["sample"]): p for p in pictures if "sample" in p.record}
    rows = []
    for r in ranking[:SHOWN_SUSPECTS] or [dict(p.record, index=p.record.get("sample")) for p in pictures]:
        given, predicted, since = r.get("given"), r.get("predicted"), r.get("since_epoch")
        said = (f"given {given}, the model says {predicted} from epoch {since} on" if given != predicted
                else f"given {given}, the model agrees")
        rows.append({"index": r.get("index"), "given": given, "predicted": predicted, "since": since,
                     "score": fmt(r.get("score"), "{:.2f}"), "sentence": said,
                     "picture": by_sample.get(int(r["index"])) if r.get("index") is not None else None})
    negative = [r for r in ranking if r["score"] < 0]
    pairs = Counter((r["given"], r["predicted"]) for r in negative if r["given"] != r["predicted"])
    misfit = dict(run.scalars.get(names.LABEL_MISFIT, []))
    epochs = [  # one value per training epoch, counted from 1 as the suspects' "from epoch 2 on"
        {"epoch": i + 1, "suspects": int(value), "misfit": fmt(misfit.get(step), "{:.1%}")}
        for i, (step, value) in enumerate(run.scalars.get(names.LABEL_SUSPECTS, []))
    ]
    return {
        "total": len(ranking), "negative": len(negative),
        "rows": [r for r in rows if r["picture"] is not None],
        "more": [r for r in rows if r["picture"] is None],
        "pairs": [{"given": g, "predicted": p, "count": n} for (g, p), n in pairs.most_common(6)],
        "epochs": epochs, "file": names.LABEL_ISSUES_FILE if ranking else None,
    }


def shortcuts(run: RunData, options: Options) -> dict[str, Any] | None:
    """The shortcut alarms, each with its picture and sentence, and every class's quiet-patch share per
    validation run (the statistic the alarm thresholds)."""
    series = {
        c: values for c in range(100)
        if (values := run.scalars.get(names.shortcut_tag("quiet_share", c)))
    }
    if not series and not run.alarms:
        return None
    alarms = [
        {"picture": p, "sentence": str(p.record.get("sentence", "")), "class": p.record.get("class"),
         "kind": p.record.get("kind"), "epoch": p.record.get("epoch")}
        for p in run.alarms
    ]
    alarmed = {a["class"] for a in alarms}
    steps = sorted({step for values in series.values() for step, _ in values})
    epoch_at = {step: int(e) for step, e in run.scalars.get(names.SHORTCUT_EPOCH, [])}
    callback_epoch = _callback_epochs(run.records, run.scalars.get("epoch", []))

    def epoch_of(step: int) -> int | None:
        return epoch_at.get(step, callback_epoch(step))

    table = []
    for c, values in series.items():
        at = dict(values)
        cells = [fmt(100 * at[s], "{:.1f}") if s in at and math.isfinite(at[s]) else "–" for s in steps]
        table.append({"class": c, "cells": cells, "alarmed": c in alarmed})
    return {
        "alarms": alarms,
        "epochs": [f"epoch {e}" if (e := epoch_of(s)) is not None else f"check {i + 1}"
                   for i, s in enumerate(steps)],
        "table": table,
    }
