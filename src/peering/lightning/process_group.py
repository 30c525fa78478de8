"""torch.distributed's process group destroyed before the interpreter exits, in every rank peering runs in.

Lightning destroys the process group at exit for NCCL only. A Gloo rank (DDP on CPUs, ``ddp_spawn``) that
exits with its group alive now and then dies at interpreter shutdown with SIGABRT ("terminate called
without an active exception"): Gloo's worker threads still hold work whose tensors need the GIL while the
interpreter is torn down (pytorch/pytorch#179291). Under ``peering explain-dataset --devices 2`` that turned
a finished run into "process 1 terminated with signal SIGABRT". Destroying the group from an ``atexit``
handler, while the interpreter is still whole, is what PyTorch asks of every program (call
``destroy_process_group`` where communications are no longer needed); with Gloo it involves no other rank,
so it cannot hang.
"""

from __future__ import annotations

import atexit

import torch

__all__ = ["destroy_at_exit"]

_registered = False


def destroy_at_exit() -> None:
    """If this process is in an initialised Gloo process group, destroy the group when the interpreter exits
    (once per process; a no-op if the group is gone by then). Called from the callbacks' and the writer's
    ``setup``, which Lightning runs in every rank after it started the group.

    >>> destroy_at_exit()  # no process group here: nothing to do
    """
    global _registered
    if _registered or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_backend() != "gloo":  # NCCL: Lightning destroys it at exit itself
        return
    atexit.register(_destroy)
    _registered = True


def _destroy() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
