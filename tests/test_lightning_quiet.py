"""Lightning's advertising tips ("💡 Tip: ... try installing litlogger / litmodels") stay out of the output
of your own Trainers once `peering.lightning` is imported; every other message of Lightning is left alone."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from peering.lightning import AttributionWriter
from peering.models import DigitClassifier


class _Explained(DigitClassifier):
    def predict_step(self, batch, batch_idx):
        return None  # the writer does the work


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_no_lightning_tips_when_the_writer_runs_from_the_api(tmp_path):
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")  # where rank_zero_info logs
    records, level = _Records(), logger.level
    logger.addHandler(records)
    logger.setLevel(logging.INFO)
    try:
        trainer = pl.Trainer(accelerator="cpu", devices=1, callbacks=[AttributionWriter(tmp_path / "out")],
                             default_root_dir=tmp_path, enable_progress_bar=False)  # its default logger
        data = TensorDataset(torch.rand(6, 1, 8, 8), torch.zeros(6, dtype=torch.long))
        trainer.predict(_Explained(image_size=8), DataLoader(data, batch_size=3), return_predictions=False)
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)
    assert any("GPU available" in m for m in records.messages), records.messages  # Lightning still speaks
    assert not [m for m in records.messages if "Tip:" in m or "litlogger" in m or "litmodels" in m]
    assert (tmp_path / "out" / "manifest.json").is_file()
