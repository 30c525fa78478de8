"""The report's sections: what each shows, in order, and the data its template gets.

Each section is a `Section` (`peering.report.sections.base`): an id (the HTML anchor, and the template
``templates/sections/<id>.html.j2``), a heading, a short name for the page's navigation bar, and a ``build``
function that turns the run (`RunData`) and the report's options (`Options`) into the variables its template
sees, or returns None when the run has nothing for it (the section, and its link, are then left out of the
page).

The builders live by what they show: `peering.report.sections.training` (summary, confused samples, atlas,
tracked samples), `peering.report.sections.found` (what `LabelIssues` and `ShortcutAlarm` found),
`peering.report.sections.demo` (morphs, judges, sanity check) and
`peering.report.sections.dataset`. The builders compute and format; the templates only lay out. Numbers are
formatted here (one place that knows "0.9812" is shown as "98.12%"), pictures stay `Picture` objects that
templates embed with the ``data_uri`` filter.
"""

from peering.report.sections import dataset, demo, found, training
from peering.report.sections.base import Options, Section

__all__ = ["ALL", "SECTIONS", "Options", "Section"]

ALL: tuple[Section, ...] = (
    Section("summary", "Run summary", "Summary", training.summary),
    Section("confused", "Confused samples per epoch", "Confused samples", training.confused),
    Section("atlas", "Confusion atlas per epoch", "Confusion atlas", training.atlas),
    Section("tracked", "Tracked samples over time", "Tracked samples", training.tracked),
    Section("labels", "Labels to check", "Labels", found.label_issues),
    Section("shortcuts", "Shortcut alarms", "Shortcuts", found.shortcuts),
    Section("morph", "Morphing digits", "Morphing", demo.morph),
    Section("judges", "Do other models believe the morphs?", "Judges", demo.judges),
    Section("dataset", "Dataset attributions", "Dataset", dataset.dataset),
    Section("sanity", "Sanity check", "Sanity check", demo.sanity),
)
"""The report's sections, in page order."""

SECTIONS: tuple[str, ...] = tuple(s.id for s in ALL)
"""The ids of the report's sections, in page order (a section with nothing to show is left out)."""
