"""`LabelIssues` in real `Trainer` runs on scikit-learn's 8x8 digits with flipped labels: it ranks the
flips first, never changes training, takes indices from tuples, dicts and `unpack`, stops with one clear
error saying how to give indices or labels when the batches have none, writes its ranking, pictures and
scalars (rank zero only), and counts each sample once under DDP.
"""

from __future__ import annotations

import copy
import csv
import types
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch.utils.data import DataLoader, Dataset

from peering.errors import PeeringRuntimeError, PeeringValueError
from peering.lightning import LabelIssues
from peering.lightning.label_table import calibrated_margins
from peering.lightning.labels import HOW_TO_INDEX, HOW_TO_LABEL
from peering.models import DigitClassifier
from peering.runs import names, read_images, read_index, read_scalars

QUIET = {"enable_progress_bar": False, "enable_model_summary": False, "enable_checkpointing": False}


class Indexed(Dataset):
    """(image, label, index) triples, or dicts ``{"image", "label", "index"}``, or (image, label) pairs."""

    def __init__(self, x, y, kind: str = "tuple"):
        self.x, self.y, self.kind = x, y, kind

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        if self.kind == "dict":
            return {"image": self.x[i], "label": self.y[i], "index": i}
        if self.kind == "pair":
            return self.x[i], self.y[i]
        return self.x[i], self.y[i], i


class Digits(DigitClassifier):
    """The demo classifier on (image, label, index) batches; ``returns_logits``: the training step returns
    ``{"loss", "logits"}``."""

    def __init__(self, returns_logits: bool = False, **kwargs):
        super().__init__(image_size=8, lr=2e-3, **kwargs)
        self.returns_logits = returns_logits

    def training_step(self, batch, batch_idx):
        x, y = (batch["image"], batch["label"]) if isinstance(batch, dict) else batch[:2]
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        return {"loss": loss, "logits": logits.detach()} if self.returns_logits else loss


@pytest.fixture(scope="module")
def noisy_digits(digits):
    """The first 1,200 digits with 10% of the labels flipped to another class (seeded)."""
    x, y = digits[0][:1200], digits[1][:1200].clone()
    g = torch.Generator().manual_seed(0)
    flipped = torch.randperm(len(y), generator=g)[:120]
    y[flipped] = (y[flipped] + torch.randint(1, 10, (120,), generator=g)) % 10
    mask = torch.zeros(len(y), dtype=torch.bool)
    mask[flipped] = True
    return x, y, mask


def fit(data, tmp_path, callbacks, epochs=4, kind="tuple", returns_logits=False, logger=False, **options):
    x, y = data[0], data[1]
    pl.seed_everything(7, verbose=False)
    model = Digits(returns_logits=returns_logits)
    loader = DataLoader(Indexed(x, y, kind), batch_size=32, shuffle=True)
    trainer = pl.Trainer(
        max_epochs=epochs, logger=logger, default_root_dir=tmp_path, callbacks=callbacks, **QUIET, **options
    )
    trainer.fit(model, loader)
    return model


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """AUROC of ``scores`` (higher: more likely positive), by the rank-sum formula."""
    ranks = torch.empty(len(scores))
    ranks[torch.argsort(scores)] = torch.arange(1, len(scores) + 1, dtype=torch.float)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def test_calibrated_margins_subtract_the_log_thresholds():
    z = torch.tensor([[1.0, 0.5, -1.0]])
    plain, predicted = calibrated_margins(z, torch.tensor([0]))
    assert plain.tolist() == [0.5] and predicted.tolist() == [0]
    # class 1's threshold is low (the model rarely gives it much probability): the margin shrinks
    calibrated, _ = calibrated_margins(z, torch.tensor([0]), torch.tensor([0.0, -1.0, 0.0]))
    assert calibrated.tolist() == [-0.5]


@pytest.mark.parametrize(
    "options", [{}, {"score": "margin"}, {"score": "margin", "logits": "step"}],
    ids=["distance", "margin", "step"],
)
def test_flipped_labels_are_ranked_first(noisy_digits, tmp_path, options):
    callback = LabelIssues(pictures=False, **options)
    fit(noisy_digits, tmp_path, [callback], returns_logits=True)
    indices, scores = callback.ranking()
    assert sorted(indices.tolist()) == list(range(1200))  # every sample, once
    assert torch.all(scores[1:] >= scores[:-1])  # most suspect (lowest) first
    flipped = noisy_digits[2]
    suspicion = torch.empty(1200)
    suspicion[indices] = -scores
    assert auroc(suspicion, flipped) > 0.995  # measured: 0.9995 / 0.9998 / 0.9994
    assert flipped[indices[:120]].float().mean() > 0.9  # precision at the number of flips: 0.98 / 0.97 / 0.97
    top = callback.suspects(3)
    assert [s["index"] for s in top] == indices[:3].tolist()
    assert all(s["epochs"] == 4 and s["given"] == int(noisy_digits[1][s["index"]]) for s in top)
    s = next(s for s in top if s["predicted"] != s["given"])
    said = f"given {s['given']}, the model says {s['predicted']} from epoch {s['since_epoch']} on"
    assert s["sentence"] == said


@pytest.mark.parametrize(
    "options", [{}, {"score": "margin"}, {"score": "margin", "logits": "step"}],
    ids=["distance", "margin", "step"],
)
def test_weights_bit_identical_with_and_without(noisy_digits, tmp_path, options):
    """Dropout, shuffling, gradient accumulation: the same weights bitwise, with the callback's own forward
    (and backward) pass on every batch (or the step's logits) and its pictures at every epoch's end."""
    small = (noisy_digits[0][:256], noisy_digits[1][:256])
    settings = {"accumulate_grad_batches": 2, "deterministic": True}
    without = fit(small, tmp_path / "a", [], epochs=2, returns_logits=True, **settings)
    callback = LabelIssues(top_k=4, **options)
    with_it = fit(small, tmp_path / "b", [callback], epochs=2, returns_logits=True, **settings)
    assert callback.ranking()[0].numel() == 256
    for (name, a), b in zip(without.state_dict().items(), with_it.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("score", ["margin", "distance"])
def test_modes_grads_and_rng_untouched(noisy_digits, score):
    """The callback's own forward (and, for the distance, backward) pass leaves every flag, .grad and the
    RNG as they were."""
    from ._state import assert_same_state, snapshot

    model = Digits()
    model.model.dropout1.eval()  # a frozen part must stay frozen
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    callback = LabelIssues(score=score)  # type: ignore[arg-type]
    before = snapshot(model)
    x, y = noisy_digits[0][:8], noisy_digits[1][:8]
    trainer = types.SimpleNamespace(sanity_checking=False)
    callback.on_train_batch_start(trainer, model, (x, y, torch.arange(8)), 0)  # type: ignore[arg-type]
    assert callback._pending is not None
    assert (callback._pending[3] is not None) == (score == "distance")
    assert_same_state(before, model)


@pytest.mark.parametrize("kind", ["dict", "unpack"])
def test_indices_from_dicts_and_unpack(noisy_digits, tmp_path, kind):
    if kind == "dict":
        callback = LabelIssues(pictures=False)
        fit(noisy_digits, tmp_path, [callback], epochs=1, kind="dict")
    else:
        # the index travels in an odd place: unpack says where
        callback = LabelIssues(unpack=lambda b: (b[0], b[1], None, b[2] + 1000), pictures=False)
        fit(noisy_digits, tmp_path, [callback], epochs=1)
    indices, _ = callback.ranking()
    offset = 1000 if kind == "unpack" else 0
    assert sorted(indices.tolist()) == list(range(offset, offset + 1200))


def test_without_indices_one_clear_error_says_how_to_give_them(noisy_digits, tmp_path):
    callback = LabelIssues()
    with pytest.raises(PeeringValueError, match="identifies samples by their index") as caught:
        fit(noisy_digits, tmp_path, [callback], epochs=2, kind="pair")
    assert str(caught.value) == HOW_TO_INDEX
    assert "unpack=lambda batch: (inputs, labels, None, index)" in HOW_TO_INDEX
    with pytest.raises(PeeringRuntimeError, match="has not recorded any training sample"):
        callback.ranking()


def test_without_labels_one_clear_error(noisy_digits, tmp_path):
    callback = LabelIssues(unpack=lambda b: (b[0], None, None, b[2]))
    with pytest.raises(PeeringValueError, match="needs integer class labels") as caught:
        fit(noisy_digits, tmp_path, [callback], epochs=1)
    assert str(caught.value) == HOW_TO_LABEL


def test_before_training_ranking_raises():
    with pytest.raises(PeeringRuntimeError, match="has not recorded any training sample"):
        LabelIssues().ranking()


def test_step_without_logits_falls_back_once(noisy_digits, tmp_path):
    callback = LabelIssues(logits="step", score="margin", pictures=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(noisy_digits, tmp_path, [callback], epochs=1, returns_logits=False)
    assert len([w for w in caught if "found no logits" in str(w.message)]) == 1
    assert callback.ranking()[0].numel() == 1200


def test_ranking_file_scalars_and_state(noisy_digits, tmp_path):
    callback = LabelIssues(pictures=False)
    logger = CSVLogger(tmp_path, name="run")
    fit(noisy_digits, tmp_path, [callback], epochs=2, logger=logger)
    rows = list(csv.DictReader(open(Path(logger.log_dir) / names.LABEL_ISSUES_FILE)))
    indices, scores = callback.ranking()
    assert [int(r["index"]) for r in rows] == indices.tolist()
    assert {r["epochs"] for r in rows} == {"2"}
    metrics = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    tag = names.LABEL_SUSPECTS
    suspects = [float(m[tag]) for m in metrics if m.get(tag)]
    assert len(suspects) == 2 and suspects[-1] == float((scores < 0).sum())
    restored = LabelIssues()
    restored.load_state_dict(copy.deepcopy(callback.state_dict()))
    assert torch.equal(restored.ranking()[0], indices)


def test_bad_arguments():
    with pytest.raises(PeeringValueError, match="logits must be"):
        LabelIssues(logits="train")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="unpack must be"):
        LabelIssues(unpack=3)  # type: ignore[arg-type]
    with pytest.raises(PeeringValueError, match="top_k"):
        LabelIssues(top_k=0)
    with pytest.raises(PeeringValueError, match="score='distance' needs"):
        LabelIssues(logits="step")


def test_pictures_show_the_suspects_with_their_sentence(noisy_digits, tmp_path):
    """Each training epoch, ONE TensorBoard picture of the top suspects, each panel under its sentence; the
    index records keep what each panel shows, and the scalars go to TensorBoard."""
    callback = LabelIssues(top_k=3)
    logger = TensorBoardLogger(tmp_path, name="run")
    fit(noisy_digits, tmp_path, [callback], epochs=2, logger=logger)
    log_dir = logger.log_dir
    pictures = read_images(log_dir, names.LABEL_ISSUES)
    assert [len(pngs) for _, pngs in pictures] == [1, 1]  # one stacked picture per epoch
    records = [r for r in read_index(log_dir) if r["tag"] == names.LABEL_ISSUES]
    assert len(records) == 6 and all(r["box"] for r in records)
    last = records[3:]
    assert [r["sample"] for r in last] == [s["index"] for s in callback.suspects(3)]
    assert [r["index"] for r in last] == [0, 1, 2]  # their place in the stacked picture
    assert all(r["sentence"].startswith(f"given {r['given']}, the model ") for r in last)
    assert len(read_scalars(log_dir, names.LABEL_MISFIT)) == 2
    # the report's "Labels to check": the ranking's head, each with its sentence (and its picture)
    from peering.report import build_report

    page = build_report(log_dir).read_text()
    assert 'id="labels"' in page and last[0]["sentence"] in page


class RankRecorder(pl.Callback):
    """Writes each rank's view of a `LabelIssues` (its ranking and history) to ``<out>/rank_<r>.pt``."""

    def __init__(self, out: Path, issues: LabelIssues):
        self.out, self.issues = out, issues

    def on_fit_end(self, trainer, pl_module):
        indices, scores = self.issues.ranking()
        torch.save(
            {"indices": indices, "scores": scores, "history": self.issues.history,
             "epochs": (self.issues.table.epochs + self.issues.table.early_epochs).clone()},
            self.out / f"rank_{trainer.global_rank}.pt",
        )


@pytest.mark.slow
def test_ddp_every_rank_s_samples_counted_once(digits, tmp_path):
    """Two CPU processes (ddp_spawn, gloo), 101 samples: Lightning's DistributedSampler gives one rank 51
    and repeats one sample on the other; every sample counts once per epoch, on both ranks alike, and rank
    zero alone writes the ranking."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    x, y = digits[0][:101], digits[1][:101]
    issues = LabelIssues(top_k=2)
    trainer = pl.Trainer(
        strategy="ddp_spawn", accelerator="cpu", devices=2, max_epochs=2, logger=False,
        default_root_dir=tmp_path, callbacks=[issues, RankRecorder(tmp_path, issues)], **QUIET,
    )
    trainer.fit(Digits(), DataLoader(Indexed(x, y), batch_size=16, shuffle=True))
    ranks = [torch.load(tmp_path / f"rank_{r}.pt") for r in range(2)]
    assert torch.equal(ranks[0]["indices"], ranks[1]["indices"])
    assert torch.equal(ranks[0]["scores"], ranks[1]["scores"])
    assert sorted(ranks[0]["indices"].tolist()) == list(range(101))
    assert ranks[0]["epochs"].tolist() == [2] * 101  # once per epoch, the repeated sample too
    assert [h["samples"] for h in ranks[0]["history"]] == [101, 101]
    rows = list(csv.DictReader(open(tmp_path / names.LABEL_ISSUES_FILE)))
    assert [int(r["index"]) for r in rows] == ranks[0]["indices"].tolist()
    # rank zero alone draws: one picture file and one index record per suspect and epoch (no logger: the
    # PNG folder; a second writer would double the records)
    assert len(list((tmp_path / names.LABEL_ISSUES).glob("*.png"))) == 2 * 2
    assert len([r for r in read_index(tmp_path) if r["tag"] == names.LABEL_ISSUES]) == 2 * 2
    assert len(read_scalars(tmp_path, names.LABEL_SUSPECTS)) == 2
