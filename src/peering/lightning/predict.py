"""`explain_dataset`: a whole data set explained with Lightning's ``Trainer.predict`` and the
`AttributionWriter`, on one device or several, into a resumable folder of shards."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from peering._files import FolderLock
from peering.errors import RunInterrupted, ShardError
from peering.lightning.quiet import quiet_lightning, quiet_process
from peering.lightning.stopping import StopSignals, signal_name
from peering.lightning.writer import AttributionWriter
from peering.store import load_attributions, read_manifest

__all__ = ["ExplainedModule", "explain_dataset"]


class ExplainedModule(pl.LightningModule):
    """A plain classifier as the LightningModule ``Trainer.predict`` runs, its ``predict_step`` leaving the
    work to the writer (``flatten``: the model takes flat vectors, the data images).

    >>> import torch
    >>> ExplainedModule(torch.nn.Linear(4, 3))(torch.rand(2, 4)).shape
    torch.Size([2, 3])
    """

    wraps_a_model = True  # the dataset writer records the wrapped model's class

    def __init__(self, model: nn.Module, flatten: bool = False) -> None:
        super().__init__()
        self.model = model
        self.flatten = flatten

    def forward(self, x: Tensor) -> Any:
        return self.model(x.flatten(1) if self.flatten else x)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickled, which happens in the processes ``ddp_spawn`` starts for `explain_dataset`: quiet
        Lightning there as in the parent (its distributed start-up banner, its tips) before the run begins.
        Such a process lives for the run only."""
        super().__setstate__(state)
        quiet_process()

    def setup(self, stage: str) -> None:
        import multiprocessing

        if multiprocessing.parent_process() is not None:  # a process ddp_spawn started: quiet like its parent
            quiet_process()

    def predict_step(self, *args: Any, **kwargs: Any) -> tuple[()]:
        return ()  # nothing to return (None would make Lightning warn once per process)


def explain_dataset(
    model: nn.Module,
    dataset: Dataset,
    out_dir: str | os.PathLike[str],
    *,
    devices: int = 1,
    accelerator: str = "auto",
    batch_size: int = 64,
    workers: int = 0,
    progress: bool = True,
    flatten: bool = False,
    lock: bool = True,
    **writer_options: Any,
) -> int:
    """Explain every sample of ``dataset`` with ``Trainer.predict`` on ``devices`` processes (``ddp_spawn``
    beyond one) into ``out_dir``; returns the number of samples in the finished run.

    ``writer_options`` go to `AttributionWriter` (``top_k``, ``method``, ``output``, ``target``,
    ``verify_done``, ...); a rerun with the same options resumes an interrupted run. ``flatten``: the model
    takes flat vectors and the data set gives images. `peering.load_attributions` reads the result back in
    dataset order.

    The run holds ``out_dir``'s lock (`peering.errors.FolderLockedError` names the process holding it;
    ``lock=False`` when the caller holds it). SIGTERM or SIGINT (to this process or to its workers) stop
    every process at its next batch, after writing what it explained, and raise
    `peering.errors.RunInterrupted` saying how many samples are written (its ``signum`` is the signal's).

    >>> import tempfile, torch, peering
    >>> from torch.utils.data import TensorDataset
    >>> data = TensorDataset(torch.rand(10, 4), torch.randint(0, 3, (10,)))
    >>> out = tempfile.mkdtemp()
    >>> explain_dataset(torch.nn.Linear(4, 3), data, out, accelerator="cpu", batch_size=4, progress=False)
    10
    >>> peering.load_attributions(out).attributions.shape
    torch.Size([10, 2, 4])
    """
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    held = FolderLock(out_dir, "explain_dataset").acquire() if lock else None
    stop = StopSignals(forward=devices > 1)  # the workers handle their own; this one tells them too
    try:
        with quiet_lightning():
            trainer = pl.Trainer(
                accelerator=accelerator,
                devices=devices,
                strategy="ddp_spawn" if devices > 1 else "auto",
                logger=False,
                enable_checkpointing=False,
                enable_model_summary=False,
                enable_progress_bar=progress,
                callbacks=[AttributionWriter(out_dir, lock=False, **writer_options)],
                default_root_dir=str(out_dir),
            )
            if devices > 1:
                stop.install()
            trainer.predict(ExplainedModule(model, flatten), loader, return_predictions=False)
    except RunInterrupted as err:
        raise _interrupted(out_dir, err.signum, len(dataset)) from None  # type: ignore[arg-type]
    except Exception as err:
        if stop.signum is None:
            raise
        raise _interrupted(out_dir, stop.signum, len(dataset)) from err  # type: ignore[arg-type]
    finally:
        stop.restore()
        if held is not None:
            held.release()
    manifest = read_manifest(out_dir) or {}
    return int(manifest.get("complete", {}).get("0", {}).get("samples", 0))


def _interrupted(out_dir: str | os.PathLike[str], signum: int, total: int) -> RunInterrupted:
    """The error of a stopped run: the signal, and what is written (counted from the shards)."""
    with contextlib.suppress(ShardError):
        written = len(load_attributions(out_dir, verify=False, allow_incomplete=True))
        return RunInterrupted(
            f"stopped by {signal_name(signum)}: {written:,} of {total:,} samples are written in "
            f"{Path(out_dir)}; run it again with the same arguments to resume",
            signum,
        )
    return RunInterrupted(
        f"stopped by {signal_name(signum)}; run it again with the same arguments to resume", signum
    )
