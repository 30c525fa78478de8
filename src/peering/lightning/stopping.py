"""Stopping a dataset run the way jobs are stopped: SIGTERM (a scheduler, ``timeout``, ``docker stop``) and
SIGINT (Ctrl+C) end the run at the next batch boundary, after what was explained is written.

Lightning's own SIGTERM handler only sets a flag that its fit loop reads; its predict loop never does, and
under DDP it broadcasts from inside the handler. So the dataset writer installs `StopSignals` for the run
(in every process that runs batches) and checks it after each batch. A second Ctrl+C stops at once.

`die_with_parent`: a process that ``ddp_spawn`` started is killed when its parent dies (``torch``'s own
setting sends SIGINT, which a process started in the background ignores), so that no orphan goes on
writing into a folder whose lock died with the parent.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import threading
from typing import Any

from peering.errors import RunInterrupted

__all__ = ["StopSignals", "die_with_parent", "signal_name"]

_HANDLED = (signal.SIGTERM, signal.SIGINT)


def signal_name(signum: int) -> str:
    """``"SIGTERM"`` for 15, ...

    >>> signal_name(15), signal_name(2)
    ('SIGTERM', 'SIGINT')
    """
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StopSignals:
    """SIGTERM and SIGINT as a request to stop at the next batch boundary (`requested`, `signum`).

    `install` replaces the handlers of both signals (main thread only; a signal that was ignored, as
    SIGINT is in a background job, stays ignored) and `restore` puts the previous ones back. The first
    signal only records itself; a second SIGINT raises `peering.errors.RunInterrupted` at once (Ctrl+C
    twice: stop now). ``forward=True`` (a parent whose children run the batches) also sends SIGTERM to its
    live ``multiprocessing`` children, so that a signal to the parent alone stops them too.

    >>> import os, signal
    >>> stop = StopSignals().install()
    >>> os.kill(os.getpid(), signal.SIGTERM)
    >>> stop.requested, stop.signum == signal.SIGTERM
    (True, True)
    >>> stop.restore()
    """

    def __init__(self, forward: bool = False) -> None:
        self.forward = forward
        self.signum: int | None = None
        self._interrupts = 0
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """True once SIGTERM or SIGINT arrived."""
        return self.signum is not None

    def install(self) -> StopSignals:
        """Handle the signals from now on (a no-op outside the main thread); returns self."""
        if threading.current_thread() is not threading.main_thread():
            return self
        for signum in _HANDLED:
            current = signal.getsignal(signum)
            if current is signal.SIG_IGN:
                continue
            self._previous.setdefault(signum, current)
            signal.signal(signum, self._handle)
        return self

    def restore(self) -> None:
        """Put back the handlers `install` replaced."""
        if threading.current_thread() is not threading.main_thread():
            return
        previous, self._previous = self._previous, {}
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    def check(self) -> None:
        """Raise `RunInterrupted` when a stop was requested (the caller has written what it had)."""
        if self.signum is not None:
            raise RunInterrupted(f"stopped by {signal_name(self.signum)}", self.signum)

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT:
            self._interrupts += 1
        if self.signum is None:
            self.signum = signum
        if self.forward:
            for child in multiprocessing.active_children():
                if child.pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child.pid, signal.SIGTERM)
        if self._interrupts >= 2:
            raise RunInterrupted("stopped by a second SIGINT", signal.SIGINT)


def die_with_parent() -> None:
    """In a process that ``multiprocessing`` started (a ``ddp_spawn`` rank): be killed (SIGKILL) when the
    parent dies, and exit now if it already has (Linux; elsewhere a no-op).

    >>> die_with_parent()  # in the main process: nothing to do
    """
    parent = multiprocessing.parent_process()
    if parent is None or not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent.pid:  # the parent died before the line above
        os.kill(os.getpid(), signal.SIGKILL)
