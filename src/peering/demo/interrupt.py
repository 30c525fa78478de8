"""Ctrl+C during the demo: stop at a safe point, never half-way through a write."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

__all__: list[str] = []  # internal: its names are used by its own package only


class StopRequest:
    """Ctrl+C during the demo, handled at safe points instead of wherever the signal happens to land.

    Python raises KeyboardInterrupt in whatever the main thread is doing; inside a ``with lock:`` of a
    progress bar or of TensorBoard's writer that can leave the lock held and hang the shutdown (seen
    here). So the first SIGINT only sets a flag: training stops after the current batch (through
    ``trainer.should_stop``) and `check` raises KeyboardInterrupt between the stages. A second SIGINT
    raises at once.
    """

    def __init__(self) -> None:
        self.requested = False

    def handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt


@contextlib.contextmanager
def graceful_interrupt() -> Iterator[StopRequest]:
    """`StopRequest`'s SIGINT handler for the block (main thread only; an ignored SIGINT stays ignored)."""
    stop = StopRequest()
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous is signal.SIG_IGN:
        yield stop
        return
    signal.signal(signal.SIGINT, stop.handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


def stop_callback(stop: StopRequest) -> Any:
    """A Lightning callback that ends training after the current batch once Ctrl+C was pressed."""
    from lightning.pytorch.callbacks import Callback

    class _StopWhenAsked(Callback):
        def on_train_batch_end(self, trainer: Any, *args: Any, **kwargs: Any) -> None:
            if stop.requested:
                trainer.should_stop = True

        def on_train_epoch_start(self, trainer: Any, *args: Any, **kwargs: Any) -> None:
            if stop.requested:
                trainer.should_stop = True

    return _StopWhenAsked()
