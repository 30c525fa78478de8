"""Quiet Lightning: its start-up chatter is noise in a command's output."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

__all__ = ["drop_lightning_tips", "quiet_lightning"]


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


class _NoTips(logging.Filter):
    """Drops Lightning's advertising tips ("💡 Tip: ... try installing [litlogger] / [litmodels] ...")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "💡 Tip:" not in str(record.msg)


_RANK_ZERO_LOGGER = "lightning.pytorch.utilities.rank_zero"  # where Lightning's rank_zero_info() logs


def drop_lightning_tips() -> None:
    """Keep Lightning's "💡 Tip: try installing litlogger / litmodels" lines out of the output of every
    Trainer in this process (peering's callbacks and `peering.lightning.AttributionWriter` are used from
    your own Trainers, where `quiet_lightning` does not reach). Only those tips: every other message of
    Lightning is left as it is. Done once when `peering.lightning` is imported; calling it again is a no-op.

    >>> drop_lightning_tips()
    >>> sum(isinstance(f, _NoTips) for f in logging.getLogger(_RANK_ZERO_LOGGER).filters)
    1
    """
    logger = logging.getLogger(_RANK_ZERO_LOGGER)
    if not any(isinstance(f, _NoTips) for f in logger.filters):
        logger.addFilter(_NoTips())
