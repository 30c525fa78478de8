"""`explain_dataset`: a whole data set explained with Lightning's ``Trainer.predict`` and the
`AttributionWriter`, on one device or several, into a resumable folder of shards."""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from peering.lightning.quiet import quiet_lightning
from peering.lightning.writer import AttributionWriter
from peering.store import read_manifest

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

    def setup(self, stage: str) -> None:
        import multiprocessing
        import warnings

        if multiprocessing.parent_process() is not None:  # a process ddp_spawn started: quiet like its parent
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*")

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
    **writer_options: Any,
) -> int:
    """Explain every sample of ``dataset`` with ``Trainer.predict`` on ``devices`` processes (``ddp_spawn``
    beyond one) into ``out_dir``; returns the number of samples in the finished run.

    ``writer_options`` go to `AttributionWriter` (``top_k``, ``method``, ``output``, ``target``, ...); a
    rerun with the same options resumes an interrupted run. ``flatten``: the model takes flat vectors and
    the data set gives images. `peering.load_attributions` reads the result back in dataset order.

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
    with quiet_lightning():
        trainer = pl.Trainer(
            accelerator=accelerator,
            devices=devices,
            strategy="ddp_spawn" if devices > 1 else "auto",
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=progress,
            callbacks=[AttributionWriter(out_dir, **writer_options)],
            default_root_dir=str(out_dir),
        )
        trainer.predict(ExplainedModule(model, flatten), loader, return_predictions=False)
    manifest = read_manifest(out_dir) or {}
    return int(manifest.get("complete", {}).get("0", {}).get("samples", 0))
