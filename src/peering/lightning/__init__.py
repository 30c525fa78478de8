"""Lightning integration: `ConfusedLogitCallback` and the sinks its pictures go to.

>>> from peering.lightning import ConfusedLogitCallback
>>> ConfusedLogitCallback(top_k=2).top_k
2
"""

from peering.lightning.callback import ConfusedLogitCallback, default_unpack
from peering.lightning.sinks import (
    image_tags,
    no_pictures_reason,
    read_images,
    read_index,
    read_scalars,
    read_summary,
)

__all__ = [
    "ConfusedLogitCallback",
    "default_unpack",
    "image_tags",
    "no_pictures_reason",
    "read_images",
    "read_index",
    "read_scalars",
    "read_summary",
]
