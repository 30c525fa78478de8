"""Quiet Lightning: its start-up chatter is noise in a command's output."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

__all__ = ["quiet_lightning"]


_NAMES = ("lightning.pytorch", "lightning.fabric", "lightning", "pytorch_lightning")
_SPAWN = "torch.multiprocessing.spawn"  # "Terminating process ... via signal SIGTERM" when a rank stops
_HARMLESS = (
    r".*does not have many workers.*",
    r".*LeafSpec.*",
    r".*weights_only.*",
    r".*number of training batches.*log_every_n_steps.*",
)


def quiet_process() -> None:
    """`quiet_lightning` for the rest of a process that exists only to run peering's work (a rank that
    ``ddp_spawn`` started for `peering.lightning.explain_dataset`)."""
    for name in _NAMES:
        logging.getLogger(name).setLevel(logging.WARNING)
    for message in _HARMLESS:
        warnings.filterwarnings("ignore", message=message)


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Keep Lightning's start-up chatter (accelerator lines, tips) and known harmless warnings quiet, for
    the block (the loggers' levels and the warning filters are put back after).

    >>> import logging
    >>> with quiet_lightning():
    ...     logging.getLogger("lightning.pytorch").level
    30
    """
    loggers = [logging.getLogger(n) for n in (*_NAMES, _SPAWN)]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR if lg.name == _SPAWN else logging.WARNING)
    try:
        with warnings.catch_warnings():
            for message in _HARMLESS:
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
