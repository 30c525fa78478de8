"""`ConfusedLogitCallback` under Lightning DDP: 2 CPU processes (ddp_spawn, gloo).

The data are built so that only rank 1 ever sees confused samples: rank 0 gets inputs whose top logit is
far ahead (label 3), rank 1 inputs whose top two logits tie (label 7). So
pictures at all prove that rank 1's candidates reach rank zero; the fraction 0.5 proves that both ranks'
counts are summed; the event counts prove that rank zero writes exactly once per trigger; and the recorded
collectives prove that both ranks call the same ones at the same steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing import event_accumulator as ea
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from peering.lightning import ConfusedLogitCallback, read_index, read_scalars

N, BATCH, INTERVAL, TOP_K = 64, 8, 2, 3  # 32 samples per rank: 4 training batches, checks at batches 1 and 3


def rank_data(rank: int) -> DataLoader:
    """Rank 0: bottom half lit, label 3 (class 0 far ahead of class 1). Rank 1: top half lit, label 7 (0 and 1
    tie). A little noise on the unlit pixels keeps the samples apart without touching the logits' order."""
    generator = torch.Generator().manual_seed(rank)
    x = 0.001 * torch.rand(N // 2, 1, 8, 8, generator=generator)  # margins of the ties: < 0.02
    if rank == 0:
        x[:, :, 4:] = 1.0
    else:
        x[:, :, :4] = 1.0
    y = torch.full((N // 2,), 3 if rank == 0 else 7)
    return DataLoader(TensorDataset(x, y), batch_size=BATCH)


class TieNet(pl.LightningModule):
    """Linear 64 -> 10 with fixed weights (learning rate 0): logit 0 sums all pixels, logit 1 the top half."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(64, 10, bias=False)
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.weight[0] = 0.5
            self.linear.weight[1].view(8, 8)[:4] = 0.5

    def forward(self, x):
        return self.linear(x.flatten(1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        pass

    def train_dataloader(self):
        return rank_data(self.trainer.global_rank)

    def val_dataloader(self):
        return rank_data(self.trainer.global_rank)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class RecordingCallback(ConfusedLogitCallback):
    """Writes each rank's list of collectives to ``<out>/collectives_<rank>.json`` at teardown."""

    def __init__(self, out: str, **kwargs):
        super().__init__(**kwargs)
        self.out = out

    def teardown(self, trainer, pl_module, stage):
        super().teardown(trainer, pl_module, stage)
        path = Path(self.out) / f"collectives_{trainer.global_rank}.json"
        path.write_text(
            json.dumps({"collectives": self._collectives, "state": self.state_dict()["pictures"]})
        )


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    callback = RecordingCallback(
        str(tmp_path), top_k=TOP_K, logging_batch_interval=INTERVAL, max_logit_difference=0.1, track=2
    )
    trainer = pl.Trainer(
        strategy="ddp_spawn",
        accelerator="cpu",
        devices=2,
        max_epochs=1,
        logger=TensorBoardLogger(tmp_path),
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=2,
        use_distributed_sampler=False,  # each rank keeps its own data (see rank_data)
    )
    trainer.fit(TieNet())

    # every rank took part in the same collectives at the same steps, and counted the same pictures
    ranks = [json.loads((tmp_path / f"collectives_{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]
    assert ranks[0]["collectives"] == [["train", 2], ["train", 4], ["validation", 4], ["tracked", 4]]
    assert ranks[0]["state"] == {"train": 2 * TOP_K, "validation": TOP_K}

    # rank zero wrote once per trigger, and everything it wrote came from rank 1's samples
    (logdir,) = {p.parent for p in tmp_path.rglob("events.out.tfevents.*")}
    acc = ea.EventAccumulator(str(logdir), size_guidance=ea.STORE_EVERYTHING_SIZE_GUIDANCE)
    acc.Reload()
    counts = {
        tag: [(e.step, len(e.tensor_proto.string_val) - 2) for e in acc.Tensors(tag)]
        for tag in acc.PluginTagToContent("images")
    }
    assert counts == {  # one picture per trigger and tag, holding all of the trigger's samples
        "peering/confused": [(2, 1), (4, 1)],
        "peering/val/confused": [(4, 1)],
        "peering/tracked/0": [(4, 1)],
        "peering/tracked/1": [(4, 1)],
    }
    assert read_scalars(logdir, "peering/confused_fraction") == [(2, 0.5), (4, 0.5)]
    assert read_scalars(logdir, "peering/val/confused_fraction") == [(4, 0.5)]
    index = read_index(logdir)
    assert len(index) == 2 * TOP_K + TOP_K + 2
    samples: dict[tuple[str, int], int] = {}
    for r in index:
        samples[(r["tag"], r["step"])] = samples.get((r["tag"], r["step"]), 0) + 1
    assert samples == {
        ("peering/confused", 2): TOP_K,
        ("peering/confused", 4): TOP_K,
        ("peering/val/confused", 4): TOP_K,
        ("peering/tracked/0", 4): 1,
        ("peering/tracked/1", 4): 1,
    }
    assert {r["label"] for r in index} == {7}
    assert {(r["class_a"], r["class_b"]) for r in index} <= {(0, 1), (1, 0)}
