"""Every file name, folder name and tag of peering's run folders, defined once.

Three kinds of folder, written by different parts and read by the report (`peering.report`):

- a **demo run** (`peering demo`)::

      <run>/run.json  report.html  model.ckpt  portraits.png  logs/  morph/  sanity/

- a **training log folder** watched by `peering.lightning.ConfusedLogitCallback` (a logger's version
  folder, or ``default_root_dir`` without one): TensorBoard event files and/or the PNG folder, and::

      <log>/peering/index.jsonl  callback.json  scalars.csv  <tag>/step_<n>_<i>.png

- the same folder watched by `peering.lightning.LabelIssues` and `peering.lightning.ShortcutAlarm`::

      <log>/peering/label_issues.csv   (and their pictures and records in the files above)

- a **dataset run** (`peering.lightning.AttributionWriter`, ``peering explain-dataset``)::

      <out>/manifest.json  shards/  dataset.json

The tags below are those the callback logs under; `peering.runs.events` reads them back.

>>> CONFUSED["validation"], FRACTION["validation"], tracked_tag(2)
('peering/val/confused', 'peering/val/confused_fraction', 'peering/tracked/2')
"""

from __future__ import annotations

__all__ = [
    "CHECKPOINT_FILE",
    "CONFUSED",
    "DATASET_FILE",
    "FRACTION",
    "INDEX_FILE",
    "LABEL_ISSUES",
    "LABEL_ISSUES_FILE",
    "LABEL_MISFIT",
    "LABEL_SUSPECTS",
    "LOG_DIR",
    "MANIFEST",
    "MATRIX",
    "MORPH_DIR",
    "PAIRS",
    "PEERING_DIR",
    "PORTRAITS_FILE",
    "REPORT_FILE",
    "RUN_FILE",
    "SANITY_DIR",
    "SCALARS_FILE",
    "SHARDS",
    "SHORTCUTS",
    "SHORTCUT_ALARMS",
    "SHORTCUT_EPOCH",
    "SHORTCUT_STATISTICS",
    "STAGES",
    "SUMMARY_FILE",
    "TRACKED",
    "shortcut_tag",
    "tracked_tag",
]

# ------------------------------------------------------------------------------------------ a demo run
RUN_FILE = "run.json"
"""What the demo ran and measured (the report reads it)."""
REPORT_FILE = "report.html"
"""The static report, in any run folder."""
CHECKPOINT_FILE = "model.ckpt"
PORTRAITS_FILE = "portraits.png"
LOG_DIR = "logs"
"""The demo's TensorBoard log folder (a training log folder)."""
MORPH_DIR = "morph"
SANITY_DIR = "sanity"

# ----------------------------------------------------------------------------------- a dataset run
MANIFEST = "manifest.json"
"""The dataset writer's manifest (see `peering.store`)."""
SHARDS = "shards"
"""The folder of the dataset writer's shards."""
DATASET_FILE = "dataset.json"
"""What ``peering explain-dataset`` ran over (data, checkpoint, normalisation)."""

# ----------------------------------------------------------------------------- a training log folder
PEERING_DIR = "peering"
INDEX_FILE = f"{PEERING_DIR}/index.jsonl"
"""One JSON record per picture the callback wrote."""
SCALARS_FILE = f"{PEERING_DIR}/scalars.csv"
"""The callback's scalars when no logger takes them ("step,tag,value" rows)."""
SUMMARY_FILE = f"{PEERING_DIR}/callback.json"
"""The callback's settings and counters, written when a fit/validate/test ends."""

STAGES = ("train", "validation", "test")
CONFUSED = {
    "train": "peering/confused",
    "validation": "peering/val/confused",
    "test": "peering/test/confused",
}
"""The tag of each stage's pictures of confused samples."""
FRACTION = {stage: f"{tag}_fraction" for stage, tag in CONFUSED.items()}
"""The tag of each stage's fraction of confused samples (a scalar)."""
TRACKED = "peering/tracked"
"""The tracked samples: ``peering/tracked/<i>`` (see `tracked_tag`)."""
MATRIX = "peering/confusion_matrix"
"""The confusion atlas's matrix, one picture per validation run."""
PAIRS = "peering/confused_pairs"
"""The confusion atlas's most frequent mistakes, one picture each."""


def tracked_tag(i: int) -> str:
    """The tag of tracked sample ``i``.

    >>> tracked_tag(0)
    'peering/tracked/0'
    """
    return f"{TRACKED}/{i}"


# ---------------------------------------------------------------- LabelIssues and ShortcutAlarm
LABEL_ISSUES_FILE = f"{PEERING_DIR}/label_issues.csv"
"""`LabelIssues`' whole ranking: ``index,score,given,predicted,since_epoch,epochs``, most suspect first."""
LABEL_ISSUES = "peering/label_issues"
"""`LabelIssues`' pictures: the most suspect training samples, one stacked picture per training epoch."""
LABEL_SUSPECTS = "peering/label_issues/suspects"
"""Scalar: how many samples have a negative score (the model puts them elsewhere on average) so far."""
LABEL_MISFIT = "peering/label_issues/misfit_fraction"
"""Scalar: the fraction of the epoch's samples the model put in another class than their label."""
SHORTCUTS = "peering/shortcuts"
"""`ShortcutAlarm`'s scalars: ``peering/shortcuts/<statistic>/<class>`` (see `shortcut_tag`)."""
SHORTCUT_ALARMS = "peering/shortcuts/alarms"
"""`ShortcutAlarm`'s pictures: one per alarm, the class's mean map before and after."""
SHORTCUT_EPOCH = "peering/shortcuts/epoch"
"""Scalar: the epoch (counted from 1) of each of `ShortcutAlarm`'s checks, so readers can date them."""
SHORTCUT_STATISTICS = ("quiet_share", "ratio", "fooled", "off_support", "stability")
"""The per-class statistics `ShortcutAlarm` logs at each validation run."""


def shortcut_tag(statistic: str, c: int) -> str:
    """The tag of one of `ShortcutAlarm`'s per-class scalars.

    >>> shortcut_tag("quiet_share", 3)
    'peering/shortcuts/quiet_share/3'
    """
    return f"{SHORTCUTS}/{statistic}/{c}"
