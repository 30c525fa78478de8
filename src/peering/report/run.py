"""What the report reads from a run folder: the event files or PNG folder, ``run.json``, the film strips.

`find_log_dir` finds the folder that holds a run's logs; `read_run` gathers everything the sections draw
into one `RunData`. Sections (`peering.report.sections`) read only `RunData`; a section that needs
something new from the run adds a field here and fills it in `read_run`.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peering.runs import (
    image_tags,
    names,
    no_pictures_reason,
    read_dataset_json,
    read_images,
    read_index,
    read_label_issues,
    read_run_json,
    read_scalars,
)

__all__ = ["DatasetRun", "Picture", "RunData", "find_log_dir", "read_run"]

TAG_TRAIN = names.CONFUSED["train"]
TAG_VAL = names.CONFUSED["validation"]
TAG_TRACKED = names.TRACKED + "/"
TAG_TRAIN_FRACTION = names.FRACTION["train"]
TAG_VAL_FRACTION = names.FRACTION["validation"]
TAG_MATRIX = names.MATRIX
TAG_PAIRS = names.PAIRS


@dataclass
class Picture:
    """One logged picture: its PNG bytes, the step and epoch it was logged at, its index among the
    pictures of that step, and the callback's index record for it (``class_a``, ``margin``, ...)."""

    png: bytes
    step: int
    epoch: int | None
    index: int = 0
    record: dict[str, Any] = field(default_factory=dict)


@dataclass
class DatasetRun:
    """An `AttributionWriter` folder as the report shows it (see `read_run`).

    ``attributions`` is what `peering.load_attributions` read (an unfinished run's samples so far);
    ``source`` the ``dataset.json`` that ``peering explain-dataset`` wrote (empty without one);
    ``class_means`` [C, ...] and ``class_counts`` [C]: per class c, the mean attribution toward c over the
    samples whose first explained class is c (their number); ``inputs`` loads the inputs of given dataset
    indices, or is None, with ``no_inputs`` saying why.
    """

    attributions: Any  # peering.store.DatasetAttributions (imported lazily)
    source: dict[str, Any]
    class_means: Any  # Tensor
    class_counts: Any  # Tensor
    inputs: Callable[[Any], Any] | None
    no_inputs: str = ""


@dataclass
class RunData:
    """Everything a report shows, read once from the run folder (see `read_run`).

    ``root`` is the run folder, ``summary`` its ``run.json`` (empty without one), ``log_dir`` the folder
    of its logs (None without logs); ``scalars`` maps a tag to its (step, value) pairs; ``train``, ``val``
    and ``tracked`` (sample index -> pictures over time) hold the callback's pictures, ``records`` its
    picture index; ``matrices`` and ``pairs`` the confusion atlas's pictures (one matrix per validation
    run, whose record holds the counts; one picture per confused pair); ``suspects`` and ``alarms`` the
    pictures of `LabelIssues` (its most suspect labels, per epoch) and `ShortcutAlarm` (one per alarm),
    ``label_ranking`` the former's ranking file; ``morphs`` the film strips listed
    in ``run.json`` or found in ``morph/``; ``no_pictures`` why the run has no pictures
    (`peering.runs.no_pictures_reason`; None when it has some or has no logs).
    """

    root: Path
    summary: dict[str, Any] = field(default_factory=dict)
    log_dir: Path | None = None
    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    train: list[Picture] = field(default_factory=list)
    val: list[Picture] = field(default_factory=list)
    tracked: dict[int, list[Picture]] = field(default_factory=dict)
    matrices: list[Picture] = field(default_factory=list)
    pairs: list[Picture] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    morphs: list[dict[str, Any]] = field(default_factory=list)
    dataset: DatasetRun | None = None
    no_pictures: str | None = None
    suspects: list[Picture] = field(default_factory=list)
    alarms: list[Picture] = field(default_factory=list)
    label_ranking: list[dict[str, Any]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        """True when the folder holds no run at all: no logs, no ``run.json``, no film strips, no dataset
        attributions."""
        return self.log_dir is None and not self.summary and not self.morphs and self.dataset is None

    @property
    def dataset_only(self) -> bool:
        """True for a folder of dataset attributions and nothing else (no training run to show)."""
        return self.dataset is not None and self.log_dir is None and not self.summary and not self.morphs


def find_log_dir(run_dir: str | os.PathLike[str]) -> Path | None:
    """The folder of a run that holds its event files or the callback's ``peering/`` pictures.

    ``run_dir`` itself, the ``log_dir`` named in its ``run.json``, or the most recently written such
    folder below it (e.g. ``lightning_logs/version_3``); None when there is none.

    >>> import tempfile
    >>> find_log_dir(tempfile.mkdtemp()) is None
    True
    """
    root = Path(run_dir)
    summary = read_run_json(root)
    named = summary.get("log_dir") if summary else None
    if isinstance(named, str) and _is_log_dir(root / named):
        return root / named
    if _is_log_dir(root):
        return root
    found = [p for p in _walk_dirs(root, depth=3) if _is_log_dir(p)]
    if not found:
        return None
    return max(found, key=_latest_mtime)


def read_run(run_dir: str | os.PathLike[str]) -> RunData:
    """Read a run folder (logs, ``run.json``, film strips) into a `RunData`; missing parts stay empty.

    >>> import tempfile
    >>> read_run(tempfile.mkdtemp()).empty
    True
    """
    root = Path(run_dir)
    summary = read_run_json(root)
    log_dir = find_log_dir(root)
    data = _collect(root, log_dir) if log_dir is not None else RunData(root)
    data.summary = summary
    data.morphs = _morph_entries(root, summary)
    data.dataset = _read_dataset(root)
    return data


def _read_dataset(root: Path) -> DatasetRun | None:
    """The folder's dataset attributions (``manifest.json`` of an `AttributionWriter`), or None.

    Raises `peering.store.ShardError` (naming the file) when a shard is missing or corrupt.
    """
    from peering.store import load_attributions

    if not (root / names.MANIFEST).is_file():
        return None
    run = load_attributions(root, allow_incomplete=True)
    if len(run) == 0:
        return None  # stopped before its first shard: nothing to show (build_report says so)
    source = read_dataset_json(root)
    means, counts = _class_means(run)
    inputs, why = _input_loader(source)
    return DatasetRun(run, source, means, counts, inputs, why)


def _class_means(run: Any) -> tuple[Any, Any]:
    """Per class c: the mean attribution toward c over the valid samples whose first explained class is
    c, read once in blocks of 256 samples (float64 sums), and their number."""
    import torch

    classes = run.logits.shape[1] if run.logits.ndim == 2 and len(run) else 0
    shape = tuple(run.attributions.shape[2:])
    sums = torch.zeros((classes, *shape), dtype=torch.float64)
    first = run.targets[:, 0] if len(run) else torch.zeros(0, dtype=torch.int64)
    keep = run.valid & (first >= 0)
    for start, block in run.attributions.batches(256):
        rows = keep[start : start + len(block)]
        sums.index_add_(0, first[start : start + len(block)][rows], block[rows, 0].to(torch.float64))
    counts = torch.bincount(first[keep], minlength=classes)
    means = sums / counts.clamp_min(1).reshape(-1, *([1] * len(shape)))
    return means.float(), counts


def _input_loader(source: dict[str, Any]) -> tuple[Callable[[Any], Any] | None, str]:
    """A function from dataset indices to the inputs ``peering explain-dataset`` explained, or None and
    why not (the folder was written from Python, or the data are no longer where they were)."""
    kind = source.get("data")
    if kind is None:
        return None, "the inputs are not recorded (no dataset.json: written from Python, not the CLI)"
    try:
        if kind == "digits":
            from peering.data import load_digits

            images = load_digits()[0]
            return (lambda idx: images[idx]), ""
        if kind == "mnist":
            from peering.data import load_mnist

            images = load_mnist(source["root"], "train" if source.get("split") == "train" else "test")[0]
            return (lambda idx: images[idx]), ""
        if kind == "folder":
            from peering.data.images import read_image

            root, files = Path(source["root"]), list(source["files"])
            channels, size, invert = source.get("channels"), tuple(source["size"]), bool(source.get("invert"))

            def load(idx: Any) -> Any:
                import torch

                pictures = [read_image(root / files[int(i)], channels, size, invert=invert)[0] for i in idx]
                return torch.stack(pictures)

            return load, ""
    except Exception as err:  # the data moved or changed: show the attributions without the inputs
        return None, f"the inputs could not be read again ({type(err).__name__}: {err})"
    return None, f"unknown data {kind!r} in dataset.json"


def _is_log_dir(path: Path) -> bool:
    if not path.is_dir():
        return False
    if any(path.glob("events.out.tfevents.*")):
        return True
    peering = path / names.PEERING_DIR
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


def _collect(root: Path, log_dir: Path) -> RunData:
    data = RunData(root, log_dir=log_dir, no_pictures=no_pictures_reason(log_dir))
    for tag in ("val_acc", "val_loss", "epoch", TAG_TRAIN_FRACTION, TAG_VAL_FRACTION):
        data.scalars[tag] = read_scalars(log_dir, tag)
    records = read_index(log_dir)
    data.records = records
    by_key: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_key[(str(r.get("tag")), int(r.get("step", -1)))].append(r)
    epoch_of = _callback_epochs(records, data.scalars["epoch"])

    def pictures(tag: str) -> list[Picture]:
        out = []
        seen: dict[int, int] = defaultdict(int)  # step -> records used so far at that step
        for step, pngs in read_images(log_dir, tag):
            recs = by_key.get((tag, step), [])
            for png in pngs:
                j = seen[step]
                group = _write_group(recs, j)  # the records of the write this picture came from
                if len(group) > 0 and all(isinstance(r.get("box"), list) for r in group):
                    samples = _cut(png, [r["box"] for r in group])  # one stacked picture per write
                else:
                    group, samples = recs[j : j + 1] or [{}], [png]
                seen[step] += len(group) if recs else 1
                for k, (rec, sample) in enumerate(zip(group, samples, strict=True)):
                    epoch = rec.get("epoch")
                    out.append(
                        Picture(
                            sample,
                            step,
                            int(epoch) if epoch is not None else epoch_of(step),
                            int(rec.get("index", (j + k) % 64)),
                            rec,
                        )
                    )
        return out

    tags = image_tags(log_dir)
    if TAG_TRAIN in tags:
        data.train = pictures(TAG_TRAIN)
    if TAG_VAL in tags:
        data.val = pictures(TAG_VAL)
    if TAG_MATRIX in tags:
        data.matrices = pictures(TAG_MATRIX)
    if TAG_PAIRS in tags:
        data.pairs = pictures(TAG_PAIRS)
    for tag in tags:
        rest = tag[len(TAG_TRACKED) :]
        if tag.startswith(TAG_TRACKED) and rest.isdigit():
            data.tracked[int(rest)] = pictures(tag)
    _found(data, log_dir, tags, pictures)
    return data


def _found(data: RunData, log_dir: Path, tags: list[str], pictures: Callable[[str], list[Picture]]) -> None:
    """What `LabelIssues` and `ShortcutAlarm` left in the run: pictures, ranking, scalars."""
    if names.LABEL_ISSUES in tags:
        data.suspects = pictures(names.LABEL_ISSUES)
    if names.SHORTCUT_ALARMS in tags:
        data.alarms = pictures(names.SHORTCUT_ALARMS)
    data.label_ranking = read_label_issues(log_dir)
    for tag in (names.LABEL_SUSPECTS, names.LABEL_MISFIT, names.SHORTCUT_EPOCH):
        data.scalars[tag] = read_scalars(log_dir, tag)
    for c in range(100):  # ShortcutAlarm's per-class statistic, until a class has none
        tag = names.shortcut_tag("quiet_share", c)
        data.scalars[tag] = read_scalars(log_dir, tag)
        if not data.scalars[tag]:
            break


def _write_group(records: Sequence[dict[str, Any]], start: int) -> list[dict[str, Any]]:
    """The records of one write, from ``start``: their ``index`` counts up from 0 within a write."""
    group = []
    for k, rec in enumerate(records[start:]):
        if k > 0 and rec.get("index") == 0:
            break
        group.append(rec)
    return group


def _cut(png: bytes, boxes: Sequence[Sequence[int]]) -> list[bytes]:
    """The PNGs of the panels at ``boxes`` (``[x, y, width, height]``) of one stacked picture."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(png)) as picture:
        picture.load()
        out = []
        for x, y, w, h in boxes:
            buf = io.BytesIO()
            picture.crop((x, y, x + w, y + h)).save(buf, format="PNG", compress_level=1)
            out.append(buf.getvalue())
    return out


def _callback_epochs(
    records: Sequence[dict[str, Any]], epoch_scalar: Sequence[tuple[int, float]]
) -> Callable[[int], int | None]:
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


def _lightning_epochs(epoch_scalar: Sequence[tuple[int, float]]) -> Callable[[int], int | None]:
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
    folder = root / names.MORPH_DIR
    if not folder.is_dir():
        return []
    return [{"strip": p.relative_to(root).as_posix()} for p in sorted(folder.glob("*.png"))]
