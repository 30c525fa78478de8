"""MkDocs hook: the site's home page is README.md itself, so that the two never drift apart.

The README links to pages as ``docs/<page>.md`` and to pictures as ``docs/img/...`` (paths from the
repository root, for GitHub); on the site the home page sits in docs/, so those links lose the prefix.
"""

from __future__ import annotations

import re
from pathlib import Path

from markdown import Extension
from markdown.preprocessors import Preprocessor
from mkdocs.plugins import event_priority

README = Path(__file__).parents[1] / "README.md"


def on_page_read_source(page, config):
    """The source of ``index.md`` is README.md with its ``docs/`` links made relative to docs/."""
    if page.file.src_uri != "index.md":
        return None
    return re.sub(r"\]\(docs/", "](", README.read_text(encoding="utf-8"))


class _DoctestFences(Preprocessor):
    """Fence every doctest block (a ``>>>`` line up to the next blank line) as ``pycon`` code, so that the
    docstrings' examples show as code on the API pages instead of as text (where ``d["a"]["b"]`` would even
    read as a Markdown link)."""

    def run(self, lines: list[str]) -> list[str]:
        out: list[str] = []
        fence: str | None = None
        for line in lines:
            starts = line.lstrip().startswith(">>>")
            if fence is None and starts:
                fence = line[: len(line) - len(line.lstrip())]
                out += ["", f"{fence}```pycon"]
            elif fence is not None and not line.strip():
                out += [f"{fence}```", ""]
                fence = None
            out.append(line)
        if fence is not None:
            out += [f"{fence}```", ""]
        return out


class _DoctestExtension(Extension):
    def extendMarkdown(self, md) -> None:  # noqa: N802 (Markdown's name)
        md.preprocessors.register(_DoctestFences(md), "peering_doctest_fences", 40)


@event_priority(100)  # before mkdocstrings reads the extensions for the docstrings
def on_config(config):
    config.markdown_extensions.append(_DoctestExtension())
    return config
