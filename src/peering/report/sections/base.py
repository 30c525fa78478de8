"""What every section builder shares: the report's `Options`, the `Section` record, and how numbers,
pictures and files are handed to the templates."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peering.report.run import Picture, RunData

__all__: list[str] = []  # internal: its names are used by its own package only


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


def fmt(value: float | None, pattern: str = "{:.3f}") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return pattern.format(value)


def tokens_of(p: Picture) -> Any:
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




def figure(p: Picture, alt: str, caption: str) -> dict[str, Any]:
    """What the ``figure`` macro of the templates shows: the picture, or a text sample's coloured tokens."""
    return {"picture": p, "alt": alt, "caption": caption, "tokens": tokens_of(p)}


@dataclass(frozen=True)
class Drawn:
    """A picture drawn for the report (PNG bytes), shaped like a logged `Picture` for the templates."""

    png: bytes


def png_of(image: Any) -> Drawn:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return Drawn(buf.getvalue())


VERDICTS = {True: "passes", False: "fails", None: "undecided"}


def file_entry(root: Path, path: Any) -> dict[str, Any]:
    """A picture of the run by its path in run.json: ``{"png": bytes, "missing": None}``, or ``missing``."""
    try:
        return {"png": (root / str(path)).read_bytes(), "missing": None}
    except (OSError, TypeError):
        return {"png": b"", "missing": str(path)}
