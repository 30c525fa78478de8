"""`ConfusedLogitCallback` under Lightning DDP: 2 CPU processes (ddp_spawn, gloo).

The data are built so that only rank 1 ever sees confused samples: rank 0 gets inputs whose top logit is
far ahead (label 3), rank 1 inputs whose top two logits tie (label 7). So
pictures at all prove that rank 1's candidates reach rank zero; the fraction 0.5 proves that both ranks'
counts are summed; the event counts prove that rank zero writes exactly once per trigger; and the recorded
collectives prove that both ranks call the same ones at the same steps. A third test checks that a
per-sample forward argument travels to rank zero with its own sample.

The confusion atlas sees each rank's samples in a cell of their own (rank 0: true 3 taken for 0; rank 1:
true 7 taken for 0), so its matrix shows that every validation sample of both ranks was counted exactly
once (torchmetrics sums the ranks' matrices), and examples of both pairs in rank zero's pictures show that
the examples were gathered from both ranks.
"""

from __future__ import annotations

import json
import warnings
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
            json.dumps(
                {
                    "collectives": self._collectives,
                    "state": {k: v for k, v in self.state_dict().items() if k != "tracked"},
                }
            )
        )


def two_processes(callback, tmp_path, **options) -> pl.Trainer:
    """A Trainer on 2 CPU processes (``ddp_spawn``, gloo) with ``callback`` and nothing else that writes;
    ``options`` add to or override the Trainer's. Skips the test where gloo is not available."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    settings = {
        "strategy": "ddp_spawn",
        "accelerator": "cpu",
        "devices": 2,
        "max_epochs": 1,
        "logger": False,
        "default_root_dir": tmp_path,
        "callbacks": [callback],
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return pl.Trainer(**{**settings, **options})


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    callback = RecordingCallback(
        str(tmp_path), top_k=TOP_K, logging_batch_interval=INTERVAL, max_logit_difference=0.1, track=2
    )
    trainer = two_processes(
        callback,
        tmp_path,
        logger=TensorBoardLogger(tmp_path),
        num_sanity_val_steps=2,
        use_distributed_sampler=False,  # each rank keeps its own data (see rank_data)
    )
    trainer.fit(TieNet())

    # every rank took part in the same collectives at the same steps, and chose the same samples; only rank
    # zero wrote (and counted) pictures
    ranks = [json.loads((tmp_path / f"collectives_{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["collectives"] == ranks[1]["collectives"]
    assert ranks[0]["collectives"] == [
        ["train", 2],
        ["train", 4],
        ["validation", 4],
        ["tracked", 4],
        ["atlas", 4],  # the matrix: a header, then torchmetrics' sync
        ["atlas", 4],  # the pairs' examples
    ]
    for key in ("chosen", "checks", "samples_checked", "confused_seen", "candidates_seen", "atlas"):
        assert ranks[0]["state"][key] == ranks[1]["state"][key]
    assert ranks[0]["state"]["chosen"] == {"train": 2 * TOP_K, "validation": TOP_K, "test": 0}
    assert ranks[0]["state"]["pictures"] == ranks[0]["state"]["chosen"]
    assert ranks[1]["state"]["pictures"] == {"train": 0, "validation": 0, "test": 0}
    assert ranks[0]["state"]["confused_seen"]["train"] == 2 * BATCH  # rank 1's two checked batches
    assert (ranks[0]["state"]["tracked_pictures"], ranks[1]["state"]["tracked_pictures"]) == (2, 0)

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
        "peering/confusion_matrix": [(4, 1)],
        "peering/confused_pairs": [(4, 1)],  # its two pairs stacked in one picture
    }
    assert read_scalars(logdir, "peering/confused_fraction") == [(2, 0.5), (4, 0.5)]
    assert read_scalars(logdir, "peering/val/confused_fraction") == [(4, 0.5)]
    everything = read_index(logdir)
    index = [r for r in everything if "label" in r]
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

    # the confusion matrix: every validation sample of both ranks, exactly once (the sanity check's none)
    (matrix,) = [r for r in everything if r["tag"] == "peering/confusion_matrix"]
    expected = torch.zeros(10, 10, dtype=torch.int64)
    expected[3, 0] = N // 2  # rank 0's 32 samples
    expected[7, 0] = N // 2  # rank 1's 32 samples
    assert torch.equal(torch.tensor(matrix["matrix"]), expected)
    assert (matrix["step"], matrix["samples"], matrix["ignored"]) == (4, N, 0)
    # its two mistakes, each with examples from the one rank that made it
    pairs = sorted((r for r in everything if r["tag"] == "peering/confused_pairs"), key=lambda r: r["index"])
    assert [(r["true"], r["predicted"], r["count"], r["examples"]) for r in pairs] == [
        (3, 0, N // 2, 4),
        (7, 0, N // 2, 4),
    ]


class SaysWhat(ConfusedLogitCallback):
    """Writes the peering warnings of its validation-end hook to ``<out>/warnings_<rank>.json``."""

    def __init__(self, out: str, **kwargs):
        super().__init__(**kwargs)
        self.out, self.said = out, []

    def on_validation_epoch_end(self, trainer, pl_module):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            super().on_validation_epoch_end(trainer, pl_module)
        self.said += [str(w.message) for w in caught if "peering" in str(w.message)]

    def teardown(self, trainer, pl_module, stage):
        super().teardown(trainer, pl_module, stage)
        (Path(self.out) / f"warnings_{trainer.global_rank}.json").write_text(json.dumps(self.said))


class OddValidation(TieNet):
    """Nine validation samples in all, split by Lightning's own DistributedSampler: 5 + 5, one repeated."""

    def val_dataloader(self):
        x, y = rank_data(0).dataset.tensors
        return DataLoader(TensorDataset(x[:9], y[:9]), batch_size=4)


@pytest.mark.slow
def test_ddp_repeated_validation_samples_are_said(tmp_path):
    """Lightning's DistributedSampler repeats samples to even out the ranks; the matrix then counts them
    twice, and the callback says so (once) instead of passing the count off as exact."""
    callback = SaysWhat(str(tmp_path), on="train")
    trainer = two_processes(callback, tmp_path, max_epochs=2, num_sanity_val_steps=0, limit_train_batches=1)
    trainer.fit(OddValidation())
    (matrix, _) = [r for r in read_index(tmp_path) if r["tag"] == "peering/confusion_matrix"]
    assert (matrix["samples"], matrix["repeated"]) == (10, 1)
    said = json.loads((tmp_path / "warnings_0.json").read_text())
    assert len(said) == 1 and "counts 1 validation sample(s) twice" in said[0]  # once, not per epoch


def sample_weights() -> torch.Tensor:
    return 1 + torch.arange(N // 2, dtype=torch.float32) / 100


class WeightedTieNet(TieNet):
    """`TieNet` whose batches are (x, y, weight) and whose forward scales each sample's logits by its weight
    (1 + i / 100 for sample i: the ties stay ties)."""

    def forward(self, x, weight=None):
        logits = super().forward(x)
        return logits if weight is None else logits * weight[:, None]

    def training_step(self, batch, batch_idx):
        x, y, weight = batch
        return nn.functional.cross_entropy(self(x, weight=weight), y)

    def train_dataloader(self):
        x, y = rank_data(self.trainer.global_rank).dataset.tensors
        return DataLoader(TensorDataset(x, y, sample_weights()), batch_size=BATCH)

    def val_dataloader(self):
        return []


def with_weights(batch):
    """(inputs, labels, forward_kwargs) of a batch (module-level: ddp_spawn pickles the callback)."""
    x, y, weight = batch
    return x, y, {"weight": weight}


class RecordsExplained(ConfusedLogitCallback):
    """Writes, per rank, the inputs and weights rank zero explained to ``<out>/explained_<rank>.json``."""

    def __init__(self, out: str, **kwargs):
        super().__init__(unpack=with_weights, **kwargs)
        self.out, self.explained = out, []

    def _explain(self, pl_module, chosen):
        self.explained.append((chosen.inputs.tolist(), chosen.forward.per_sample["weight"].tolist()))
        return super()._explain(pl_module, chosen)

    def teardown(self, trainer, pl_module, stage):
        super().teardown(trainer, pl_module, stage)
        (Path(self.out) / f"explained_{trainer.global_rank}.json").write_text(json.dumps(self.explained))


@pytest.mark.slow
def test_ddp_forward_kwargs_travel_with_their_samples(tmp_path):
    """A per-sample forward argument (through a custom ``unpack``) reaches rank zero's explanations with its
    own sample: rank 1's confused samples are explained on rank zero, each with its own weight."""
    callback = RecordsExplained(
        str(tmp_path), top_k=TOP_K, logging_batch_interval=INTERVAL, on="train", atlas=False
    )
    trainer = two_processes(callback, tmp_path, use_distributed_sampler=False)
    trainer.fit(WeightedTieNet())
    explained = [json.loads((tmp_path / f"explained_{r}.json").read_text()) for r in range(2)]
    assert explained[1] == [] and len(explained[0]) == 2  # the two training checks
    x, _ = rank_data(1).dataset.tensors
    weights = sample_weights()
    for inputs, got in explained[0]:
        inputs = torch.tensor(inputs)
        assert inputs.shape == (TOP_K, 1, 8, 8)
        rows = (inputs.flatten(1)[:, None] == x.flatten(1)[None]).all(dim=2).float().argmax(dim=1)
        assert torch.equal(x[rows], inputs)  # rank 1's samples
        assert torch.equal(torch.tensor(got), weights[rows])  # each with its own weight
    assert len(read_index(tmp_path)) == 2 * TOP_K
