"""The run folder contract: every file name and tag (`peering.runs.names`), the readers of pictures and
scalars (`peering.runs.events`) and the typed records (`peering.runs.records`: the picture index, the
callback's summary, ``run.json``, ``dataset.json``).

The callbacks (`peering.lightning`) write through it and the report (`peering.report`) reads through
it; neither imports the other.

>>> import tempfile
>>> from peering.runs import read_index
>>> read_index(tempfile.mkdtemp())
[]
"""

from peering.runs import names
from peering.runs.events import append_scalar, image_tags, png_file, read_images, read_scalars
from peering.runs.records import (
    PictureIndex,
    no_pictures_reason,
    read_dataset_json,
    read_index,
    read_json,
    read_label_issues,
    read_run_json,
    read_summary,
    write_dataset_json,
    write_run_json,
    write_summary,
)

__all__ = [
    "PictureIndex",
    "append_scalar",
    "image_tags",
    "names",
    "no_pictures_reason",
    "png_file",
    "read_dataset_json",
    "read_images",
    "read_index",
    "read_json",
    "read_label_issues",
    "read_run_json",
    "read_scalars",
    "read_summary",
    "write_dataset_json",
    "write_run_json",
    "write_summary",
]
