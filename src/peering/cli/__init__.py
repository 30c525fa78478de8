"""`peering`: the command line.

::

    peering demo [--dataset digits|mnist] [--data-dir DIR] [--epochs N] [--seed S] [--out runs] [--name demo]
    peering explain CHECKPOINT IMAGE... [--target K] [--method gradient] [-o explain.png]
    peering morph CHECKPOINT IMAGE --target K [--confidence 0.99] [--reference run] [--gif g.gif] [-o m.png]
    peering portraits CHECKPOINT [--start mean] [--reference run] [-o portraits.png]
    peering explain-dataset CHECKPOINT --data mnist|digits|FOLDER --out OUT [--devices N]
    peering check CHECKPOINT [IMAGE...] [--samples 64] [--method M ...] [--no-faithfulness]
    peering report RUN_DIR

A checkpoint is a Lightning checkpoint of the demo model (what ``peering demo`` writes), or any file
holding a state_dict together with ``--model package.module:factory`` (see `peering.checkpoints`). Images
are PNG or JPEG (anything Pillow reads), converted to the model's channels and size with a printed note.

Bad input (a missing or corrupt checkpoint, an unreadable image, a target out of range, a model that does
not return class scores, ...: every `peering.PeeringError`) ends with one line ``error: ...`` on stderr
and exit code 2, never a traceback. An interrupted ``peering demo`` exits with 130 and leaves no file that
looks complete.

One module per command (`peering.cli.explain`, `peering.cli.morph`, ...), the options and helpers they
share in `peering.cli.common`, the app in `peering.cli.app`. The library never imports this package.
``read_image`` and ``ImageError`` are re-exported from `peering.data` for code that imported them here.
"""

from typing import TYPE_CHECKING

from peering._lazy import exports
from peering.cli.app import app, main
from peering.errors import ImageError

if TYPE_CHECKING:
    from peering.data.images import read_image

__all__ = ["ImageError", "app", "main", "read_image"]

__getattr__ = exports({"read_image": "peering.data.images"}, __name__)

if __name__ == "__main__":
    main()
