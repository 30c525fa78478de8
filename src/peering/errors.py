"""The errors peering raises on purpose, all under one base class, `PeeringError`.

Each is also the built-in exception it stands for (`PeeringValueError` is a `ValueError`, ...), so code
that catches ``ValueError`` goes on working, and code that wants to tell peering's own refusals from a bug
catches `PeeringError`: that is what the command line does, turning one into a one-line ``error:``.

>>> import torch, peering
>>> try:
...     peering.explain(torch.nn.Linear(4, 3), torch.rand(2, 4), top_k=0)
... except peering.PeeringError as err:
...     print(type(err).__name__, isinstance(err, ValueError))
PeeringValueError True
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "DatasetError",
    "FolderLockedError",
    "ImageError",
    "PeeringError",
    "PeeringIndexError",
    "PeeringRuntimeError",
    "PeeringTypeError",
    "PeeringValueError",
    "ReportError",
    "RunInterrupted",
    "ShardError",
]


class PeeringError(Exception):
    """The base class of every error peering raises on purpose; its message says what to do."""


class PeeringValueError(PeeringError, ValueError):
    """A value peering cannot work with: an argument out of range, inputs of the wrong shape, ..."""


class PeeringTypeError(PeeringError, TypeError):
    """An argument of the wrong type."""


class PeeringRuntimeError(PeeringError, RuntimeError):
    """Something peering cannot do with this model or run (the message says why and what to do)."""


class PeeringIndexError(PeeringError, IndexError):
    """An index out of range (of samples in a result or on disk)."""


class CheckpointError(PeeringValueError):
    """A model cannot be loaded from what the user saved (the message names the file and says why)."""


class DatasetError(PeeringValueError):
    """A data set cannot be found, read or verified (the message names the file)."""


class ImageError(PeeringValueError):
    """An image file cannot be read (the message names the file)."""


class ShardError(PeeringValueError):
    """A shard or manifest of dataset attributions is missing, corrupt or from another run (the message
    names the file)."""


class ReportError(PeeringValueError):
    """The folder is not a run that a report can be built from (the message says why, in one line)."""


class FolderLockedError(PeeringRuntimeError):
    """Another process holds the lock on an output folder (``pid``: its process id, when it is known)."""

    def __init__(self, message: str, pid: int | None = None) -> None:
        super().__init__(message)
        self.pid = pid

    def __reduce__(self) -> tuple[type, tuple[str, int | None]]:  # crosses processes whole
        return type(self), (str(self), self.pid)


class RunInterrupted(PeeringRuntimeError):
    """A run stopped at a batch boundary on SIGTERM or SIGINT, after writing what it had explained.

    ``signum`` is the signal's number: a command exits with ``128 + signum`` (143 for SIGTERM, 130 for
    SIGINT), as a process killed by it would. The message says how to resume.
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum

    def __reduce__(self) -> tuple[type, tuple[str, int]]:  # crosses processes whole
        return type(self), (str(self), self.signum)
