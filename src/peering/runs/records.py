"""The run folders' records, read and written in one place: the callback's picture index and run
summary, the demo's ``run.json`` and a dataset run's ``dataset.json`` (file names in `peering.runs.names`).

Every writer is atomic (a temp file renamed into place) or appends whole lines; every reader gives ``{}``
or ``[]`` for a missing or unreadable file, so a half-finished run still opens.

>>> import tempfile
>>> root = tempfile.mkdtemp()
>>> _ = write_run_json(root, {"dataset": "digits", "seed": 0})
>>> read_run_json(root)["dataset"]
'digits'
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from peering._files import write_json_atomic
from peering.runs.events import image_tags
from peering.runs.names import (
    CONFUSED,
    DATASET_FILE,
    INDEX_FILE,
    LABEL_ISSUES_FILE,
    RUN_FILE,
    SUMMARY_FILE,
    TRACKED,
)

__all__ = [
    "PictureIndex",
    "no_pictures_reason",
    "read_dataset_json",
    "read_index",
    "read_json",
    "read_label_issues",
    "read_run_json",
    "read_summary",
    "write_dataset_json",
    "write_run_json",
    "write_summary",
]


def read_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON object in ``path``, or ``{}`` when it is missing, unreadable or not an object.

    >>> read_json("/no/such/file.json")
    {}
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_run_json(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """A demo run's ``run.json`` (``{}`` without one).

    >>> import tempfile
    >>> read_run_json(tempfile.mkdtemp())
    {}
    """
    return read_json(Path(run_dir) / RUN_FILE)


def write_run_json(run_dir: str | os.PathLike[str], summary: dict[str, Any]) -> Path:
    """Write a demo run's ``run.json`` (atomically); its path.

    >>> import tempfile
    >>> write_run_json(tempfile.mkdtemp(), {"seed": 0}).name
    'run.json'
    """
    return write_json_atomic(Path(run_dir) / RUN_FILE, summary)


def read_dataset_json(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """What ``peering explain-dataset`` ran over: ``dataset.json`` (``{}`` without one). Keys: ``data``
    ("mnist", "digits" or "folder"), ``root``, ``split``, ``files``, ``channels``, ``size``, ``invert``,
    ``normalisation`` (``{"mean", "std"}``), ``checkpoint``, ``model``.

    >>> import tempfile
    >>> out = tempfile.mkdtemp()
    >>> _ = write_dataset_json(out, {"data": "digits"})
    >>> read_dataset_json(out)
    {'data': 'digits'}
    """
    return read_json(Path(out_dir) / DATASET_FILE)


def write_dataset_json(out_dir: str | os.PathLike[str], source: dict[str, Any]) -> Path:
    """Write a dataset run's ``dataset.json`` (atomically); its path.

    >>> import tempfile
    >>> write_dataset_json(tempfile.mkdtemp(), {"data": "mnist"}).name
    'dataset.json'
    """
    return write_json_atomic(Path(out_dir) / DATASET_FILE, source)


class PictureIndex:
    """Appends one JSON line per picture to ``<root>/peering/index.jsonl`` (see the module docstring).

    >>> import tempfile
    >>> root = tempfile.mkdtemp()
    >>> PictureIndex(root).append([{"tag": "peering/confused", "step": 3, "index": 0}])
    >>> read_index(root)
    [{'tag': 'peering/confused', 'step': 3, 'index': 0}]
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.path = Path(root) / INDEX_FILE

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        lines = "".join(json.dumps(r) + "\n" for r in records)
        if not lines:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(lines)


def read_index(logdir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of ``<logdir>/peering/index.jsonl`` (one per picture, see the module docstring).

    >>> import tempfile
    >>> read_index(tempfile.mkdtemp())
    []
    """
    path = Path(logdir) / INDEX_FILE
    if not path.is_file():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_summary(logdir: str | os.PathLike[str], summary: dict[str, Any]) -> Path:
    """Write the callback's run summary to ``<logdir>/peering/callback.json`` (atomically); its path.

    >>> import tempfile
    >>> root = tempfile.mkdtemp()
    >>> write_summary(root, {"settings": {"top_k": 4}}).name
    'callback.json'
    """
    return write_json_atomic(Path(logdir) / SUMMARY_FILE, summary)


def read_summary(logdir: str | os.PathLike[str]) -> dict[str, Any]:
    """The callback's run summary of ``<logdir>/peering/callback.json`` (see the module docstring), or
    ``{}`` when there is none (or it cannot be read).

    >>> import tempfile
    >>> root = tempfile.mkdtemp()
    >>> read_summary(root)
    {}
    >>> _ = write_summary(root, {"settings": {"top_k": 4}})
    >>> read_summary(root)["settings"]
    {'top_k': 4}
    """
    return read_json(Path(logdir) / SUMMARY_FILE)


def no_pictures_reason(logdir: str | os.PathLike[str]) -> str | None:
    """None when the run in ``logdir`` has pictures of confused samples (training, validation, test or
    tracked; the confusion atlas's do not count); otherwise one sentence saying that it has none and why
    (from the callback's run summary, when it wrote one).

    >>> import tempfile
    >>> root = tempfile.mkdtemp()
    >>> print(no_pictures_reason(root))  # doctest: +NORMALIZE_WHITESPACE
    No confused-sample pictures: there is no peering/callback.json either (was ConfusedLogitCallback in
    the run?).
    >>> stage = {"watched": True, "pictures": 0, "why_no_pictures": "no batch was checked"}
    >>> _ = write_summary(root, {"stages": {"train": stage}})
    >>> no_pictures_reason(root)
    'No confused-sample pictures: train: no batch was checked.'
    """
    samples = tuple(CONFUSED.values())
    if any(tag in samples or tag.startswith(f"{TRACKED}/") for tag in image_tags(logdir)):
        return None
    stages = read_summary(logdir).get("stages")
    if not isinstance(stages, dict):
        return (
            f"No confused-sample pictures: there is no {SUMMARY_FILE} either (was ConfusedLogitCallback in "
            "the run?)."
        )
    watched = {s: i for s, i in stages.items() if isinstance(i, dict) and i.get("watched")}
    ran = {s: i for s, i in watched.items() if i.get("checks")} or watched  # stages of other runs: noise
    reasons = [f"{stage}: {info.get('why_no_pictures') or 'none written'}" for stage, info in ran.items()]
    return "No confused-sample pictures: " + ("; ".join(reasons) or "no stage was watched") + "."


def read_label_issues(logdir: str | os.PathLike[str], limit: int | None = None) -> list[dict[str, Any]]:
    """`peering.lightning.LabelIssues`' ranking in ``<logdir>/peering/label_issues.csv``, most suspect
    first: dicts with ``index``, ``score``, ``given``, ``predicted``, ``since_epoch``, ``epochs`` (the
    first ``limit`` rows; all with None); ``[]`` without the file or for a malformed one.

    >>> import tempfile
    >>> read_label_issues(tempfile.mkdtemp())
    []
    """
    import csv

    path = Path(logdir) / LABEL_ISSUES_FILE
    try:
        with open(path, newline="") as f:
            rows: list[dict[str, Any]] = []
            for row in csv.DictReader(f):
                if limit is not None and len(rows) >= limit:
                    break
                rows.append({k: float(v) if k == "score" else int(v) for k, v in row.items()})
            return rows
    except (OSError, ValueError, TypeError):
        return []
