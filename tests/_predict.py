"""Helpers of the `AttributionWriter` tests: a LightningModule that leaves the work to the writer, and a
quiet one-call `Trainer.predict` (shared by test_writer.py and test_writer_ddp.py; the DDP test's spawned
processes import `Explained` from here)."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from peering.store import SHARDS

N, BATCH = 37, 8  # 5 batches, the last one short


class Explained(pl.LightningModule):
    """A trained classifier as a LightningModule whose ``predict_step`` leaves the work to the writer.

    ``fail_at``: raise in that batch (an interrupted run). ``forward_in_predict``: also run the model in
    ``predict_step``, as most modules do."""

    def __init__(self, model: nn.Module, fail_at: int | None = None, forward_in_predict: bool = False):
        super().__init__()
        self.model = model
        self.fail_at = fail_at
        self.forward_in_predict = forward_in_predict

    def forward(self, x):
        return self.model(x)

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        if batch_idx == self.fail_at:
            raise RuntimeError("interrupted on purpose")
        return self(batch[0]) if self.forward_in_predict else None


def trainer(**kwargs) -> pl.Trainer:
    defaults = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return pl.Trainer(**{**defaults, **kwargs})


def predict(module, loaders, writer, **trainer_kwargs) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*predict returned None.*")
        trainer(callbacks=[writer], **trainer_kwargs).predict(module, loaders, return_predictions=False)


def loader(x, y, batch_size=BATCH) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def shard_files(out):
    return sorted((out / SHARDS).glob("*.safetensors"))
