"""Lightning integration: `ConfusedLogitCallback` and the sinks its pictures go to; `LabelIssues` (which
training labels look wrong) and `ShortcutAlarm` (a class whose evidence sits where the data has none);
`AttributionWriter`, which explains a whole dataset on ``Trainer.predict``.

>>> from peering.lightning import ConfusedLogitCallback
>>> ConfusedLogitCallback(top_k=2).top_k
2
"""

from peering.lightning.callback import ConfusedLogitCallback, default_unpack
from peering.lightning.labels import LabelIssues
from peering.lightning.predict import explain_dataset
from peering.lightning.quiet import drop_lightning_tips, quiet_lightning
from peering.lightning.shortcuts import ShortcutAlarm
from peering.lightning.sinks import (
    image_tags,
    no_pictures_reason,
    read_images,
    read_index,
    read_scalars,
    read_summary,
)
from peering.lightning.writer import AttributionWriter

drop_lightning_tips()  # Lightning's "try installing litlogger/litmodels" tips, in your Trainers too

__all__ = [
    "AttributionWriter",
    "ConfusedLogitCallback",
    "LabelIssues",
    "ShortcutAlarm",
    "default_unpack",
    "explain_dataset",
    "image_tags",
    "no_pictures_reason",
    "quiet_lightning",
    "read_images",
    "read_index",
    "read_scalars",
    "read_summary",
]
