"""`ConfusedLogitCallback` under Lightning DDP: 2 CPU processes (ddp_spawn, gloo).

The data are built so that only rank 1 ever sees confused samples: rank 0 gets inputs whose top logit is
far ahead (label 3), rank 1 inputs whose top two logits tie (label 7). So
pictures at all prove that rank 1's candidates reach rank zero; the fraction 0.5 proves that both ranks'
counts are summed; the event counts prove that rank zero writes exactly once per trigger; and the recorded
collectives prove that both ranks call the same ones at the same steps. Every sample also carries a
per-sample forward argument (``weight``, through a custom ``unpack``) that must reach rank zero's
explanations with its own sample.
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
    tie). A little noise on the unlit pixels keeps the samples apart without touching the logits' order.
    Batches are (x, y, weight), weight 1 + i / 100 for sample i (it scales all logits alike)."""
    generator = torch.Generator().manual_seed(rank)
    x = 0.001 * torch.rand(N // 2, 1, 8, 8, generator=generator)  # margins of the ties: < 0.02
    if rank == 0:
        x[:, :, 4:] = 1.0
    else:
        x[:, :, :4] = 1.0
    y = torch.full((N // 2,), 3 if rank == 0 else 7)
    return DataLoader(TensorDataset(x, y, sample_weights()), batch_size=BATCH)


def sample_weights() -> torch.Tensor:
    return 1 + torch.arange(N // 2, dtype=torch.float32) / 100


class TieNet(pl.LightningModule):
    """Linear 64 -> 10 with fixed weights (learning rate 0): logit 0 sums all pixels, logit 1 the top half."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(64, 10, bias=False)
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.weight[0] = 0.5
            self.linear.weight[1].view(8, 8)[:4] = 0.5

    def forward(self, x, weight=None):
        logits = self.linear(x.flatten(1))
        return logits if weight is None else logits * weight[:, None]

    def training_step(self, batch, batch_idx):
        x, y, weight = batch
        return nn.functional.cross_entropy(self(x, weight=weight), y)

    def validation_step(self, batch, batch_idx):
        pass

    def train_dataloader(self):
        return rank_data(self.trainer.global_rank)

    def val_dataloader(self):
        return rank_data(self.trainer.global_rank)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def with_weights(batch):
    """(inputs, labels, forward_kwargs) of a batch (a module-level function: ddp_spawn pickles it)."""
    x, y, weight = batch
    return x, y, {"weight": weight}


class RecordingCallback(ConfusedLogitCallback):
    """Writes each rank's list of collectives to ``<out>/collectives_<rank>.json`` at teardown."""

    def __init__(self, out: str, **kwargs):
        super().__init__(unpack=with_weights, **kwargs)
        self.out = out
        self.explained: list = []  # (inputs, weights) that rank zero explained

    def _explain(self, pl_module, chosen):
        self.explained.append((chosen.inputs.tolist(), chosen.kwargs["weight"].tolist()))
        return super()._explain(pl_module, chosen)

    def teardown(self, trainer, pl_module, stage):
        super().teardown(trainer, pl_module, stage)
        path = Path(self.out) / f"collectives_{trainer.global_rank}.json"
        path.write_text(
            json.dumps(
                {
                    "collectives": self._collectives,
                    "state": {k: v for k, v in self.state_dict().items() if k != "tracked"},
                    "explained": self.explained,
                }
            )
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

    # every rank took part in the same collectives at the same steps, and chose the same samples; only rank
    # zero wrote (and counted) pictures
    ranks = [json.loads((tmp_path / f"collectives_{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["collectives"] == ranks[1]["collectives"]
    assert ranks[0]["collectives"] == [["train", 2], ["train", 4], ["validation", 4], ["tracked", 4]]
    for key in ("chosen", "checks", "samples_checked", "confused_seen", "candidates_seen"):
        assert ranks[0]["state"][key] == ranks[1]["state"][key]
    assert ranks[0]["state"]["chosen"] == {"train": 2 * TOP_K, "validation": TOP_K, "test": 0}
    assert ranks[0]["state"]["pictures"] == ranks[0]["state"]["chosen"]
    assert ranks[1]["state"]["pictures"] == {"train": 0, "validation": 0, "test": 0}
    assert ranks[0]["state"]["confused_seen"]["train"] == 2 * BATCH  # rank 1's two checked batches
    assert (ranks[0]["state"]["tracked_pictures"], ranks[1]["state"]["tracked_pictures"]) == (2, 0)

    # rank zero explained rank 1's samples, each with its own weight (the per-sample forward argument
    # travelled with its sample through the gather)
    assert ranks[1]["explained"] == [] and len(ranks[0]["explained"]) == 4  # 2 train checks, val, tracked
    data = rank_data(1).dataset.tensors
    for inputs, weights in ranks[0]["explained"]:
        inputs = torch.tensor(inputs)
        rows = (inputs.flatten(1)[:, None] == data[0].flatten(1)[None]).all(dim=2).float().argmax(dim=1)
        assert torch.equal(data[0][rows], inputs)
        assert torch.equal(torch.tensor(weights), data[2][rows])

    # rank zero wrote once per trigger, and everything it wrote came from rank 1's samples
    (logdir,) = {p.parent for p in tmp_path.rglob("events.out.tfevents.*")}
    acc = ea.EventAccumulator(str(logdir), size_guidance=ea.STORE_EVERYTHING_SIZE_GUIDANCE)
    acc.Reload()
    counts = {
        tag: [(e.step, len(e.tensor_proto.string_val) - 2) for e in acc.Tensors(tag)]
        for tag in acc.PluginTagToContent("images")
    }
    assert counts == {
        "peering/confused": [(2, TOP_K), (4, TOP_K)],
        "peering/val/confused": [(4, TOP_K)],
        "peering/tracked/0": [(4, 1)],
        "peering/tracked/1": [(4, 1)],
    }
    assert read_scalars(logdir, "peering/confused_fraction") == [(2, 0.5), (4, 0.5)]
    assert read_scalars(logdir, "peering/val/confused_fraction") == [(4, 0.5)]
    index = read_index(logdir)
    assert len(index) == 2 * TOP_K + TOP_K + 2
    assert {r["label"] for r in index} == {7}
    assert {(r["class_a"], r["class_b"]) for r in index} <= {(0, 1), (1, 0)}
