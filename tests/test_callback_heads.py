"""Multi-label and regression heads in the Lightning parts: `ConfusedLogitCallback(output="sigmoid")` in a
real `Trainer.fit` (a sample is confused when one of its classes is near a toss-up; the atlas says once
that it has no multi-label view), and `AttributionWriter(output="sigmoid" | "raw")` in a real
`Trainer.predict`, equal to one `peering.explain` call.
"""

from __future__ import annotations

import copy
import logging
import math
import signal
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import peering
from peering.data import load_digits
from peering.lightning import AttributionWriter, ConfusedLogitCallback, read_index
from tests._close import assert_close
from tests._predict import Explained, loader, predict

QUIET = {"enable_progress_bar": False, "enable_model_summary": False, "enable_checkpointing": False}


class MultiLabel(pl.LightningModule):
    """8x8 digits tagged with their digit and the next one (two of ten tags on), trained with BCE."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, tags = batch
        return F.binary_cross_entropy_with_logits(self(x), tags)

    def validation_step(self, batch, batch_idx):
        x, tags = batch
        self.log("val_loss", F.binary_cross_entropy_with_logits(self(x), tags))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def tagged(n: int, start: int = 0) -> TensorDataset:
    x, y = load_digits()
    x, y = x[start : start + n], y[start : start + n]
    tags = F.one_hot(y, 10).float()
    tags[torch.arange(n), (y + 1) % 10] = 1.0
    return TensorDataset(x, tags)


def test_a_multilabel_run_explains_the_classes_nearest_a_toss_up(tmp_path):
    torch.manual_seed(0)
    callback = ConfusedLogitCallback(top_k=2, logging_batch_interval=2, output="sigmoid",
                                     max_logit_difference=1.0, min_logit_value=None)
    run = pl.Trainer(callbacks=[callback], max_epochs=1, limit_train_batches=4, logger=False,
                     default_root_dir=tmp_path, **QUIET)
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    lightning_logger = logging.getLogger("lightning.pytorch")
    level = lightning_logger.level
    lightning_logger.addHandler(handler)
    lightning_logger.setLevel(logging.INFO)
    try:
        run.fit(MultiLabel(), DataLoader(tagged(256), batch_size=32),
                DataLoader(tagged(128, 256), batch_size=64))
    finally:
        lightning_logger.removeHandler(handler)
        lightning_logger.setLevel(level)
    said = [r.getMessage() for r in records if "no multi-label view" in r.getMessage()]
    assert len(said) == 1  # the atlas is off, said once
    folder = tmp_path / "peering"
    pngs = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))
    assert pngs and not any(p.startswith(("confusion_matrix", "confused_pairs")) for p in pngs)
    index = read_index(tmp_path)
    assert index and {r["tag"] for r in index} == {"peering/confused", "peering/val/confused"}
    for r in index:
        # class a is the one nearest p = 0.5 (its |logit| is the margin), class b the next nearest; the
        # probabilities are each class's own sigmoid; multi-hot labels are not taken for one class
        assert r["label"] == -1 and r["class_a"] != r["class_b"]
        assert abs(r["prob_a"] - 0.5) <= abs(r["prob_b"] - 0.5) + 1e-6
        logit_a = math.log(r["prob_a"] / (1 - r["prob_a"]))
        assert math.isclose(abs(logit_a), r["margin"], rel_tol=1e-3, abs_tol=1e-4)
        assert r["margin"] <= 1.0


@pytest.mark.parametrize("output", ["sigmoid", "raw"])
def test_the_writer_gives_explains_numbers_for_sigmoid_and_raw_heads(tmp_path, output):
    torch.manual_seed(1)
    width = 10 if output == "sigmoid" else 1
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, width)).eval()
    x, y = load_digits()
    x, y = x[:21], y[:21]
    writer = AttributionWriter(tmp_path, top_k=2, output=output)
    predict(Explained(copy.deepcopy(model)), loader(x, y), writer)
    run = peering.load_attributions(tmp_path)
    expected = peering.explain(model, x, top_k=2, output=output)
    assert run.complete and run.output == output
    assert torch.equal(run.targets, expected.targets)
    assert_close(run.attributions[:], expected.attributions)
    assert run.targets.shape[1] == (2 if output == "sigmoid" else 1)


def test_the_writer_refuses_a_softmax_over_one_output(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 1)).eval()
    x, y = load_digits()
    writer = AttributionWriter(Path(tmp_path), top_k=1, output="probability")
    # what was there before (SIGINT is ignored in a job started in the background, e.g. under nohup)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(ValueError, match="one output.*'sigmoid'.*'raw'"):
        predict(Explained(model), loader(x[:8], y[:8]), writer)
    # the run ended in an exception: the writer's signal handlers are gone with it (Lightning's teardown puts
    # back the handlers it found, so they must not have been the writer's)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
