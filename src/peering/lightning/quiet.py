"""Quiet Lightning: its start-up chatter is noise in a command's output."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

__all__ = ["quiet_lightning"]


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Keep Lightning's start-up chatter (accelerator lines, tips) and known harmless warnings quiet, for
    the block (the loggers' levels and the warning filters are put back after).

    >>> import logging
    >>> with quiet_lightning():
    ...     logging.getLogger("lightning.pytorch").level
    30
    """
    names = ("lightning.pytorch", "lightning.fabric", "lightning", "pytorch_lightning")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
            warnings.filterwarnings("ignore", message=r".*weights_only.*")
            warnings.filterwarnings("ignore", message=r".*number of training batches.*log_every_n_steps.*")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
