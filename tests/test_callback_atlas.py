"""The confusion atlas inside real `Trainer` runs: one matrix per validation run in TensorBoard and in the
PNG folder, equal to the matrix of the model's own predictions at that moment; the top pairs with their
examples and directions; the module's returned logits used instead of a second forward pass; off switch,
resuming, and runs that cannot have a matrix.

(The matrix under DDP is tested in test_callback_ddp.py, training bit-identical in test_callback.py.)
"""

from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from sklearn.metrics import confusion_matrix
from torch.utils.data import DataLoader, TensorDataset

from peering.lightning import ConfusedLogitCallback, image_tags, read_images, read_index
from tests.test_callback import ALWAYS, TinyNet, loaders, peering_warnings, tiny, trainer
from tests.test_callback import data as data  # noqa: F401  (the module's fixture, reused)

MATRIX, PAIRS = "peering/confusion_matrix", "peering/confused_pairs"
EPOCHS, TRAIN_BATCHES, N_VAL = 3, 6, 160  # validation: 160 digits in batches of 64 (64, 64, 32)

pytestmark = pytest.mark.slow


class ReferenceMatrix(Callback):
    """After each validation run (placed after the peering callback), the confusion matrix of the model's
    predictions on the whole validation set, computed here with scikit-learn."""

    def __init__(self, x, y):
        self.x, self.y, self.matrices = x, y, []

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        with torch.no_grad():
            predicted = pl_module(self.x).argmax(1)  # validation: the module is in eval mode
        self.matrices.append(confusion_matrix(self.y.numpy(), predicted.numpy(), labels=range(10)))


def png_size(png: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG"
        return image.size


@pytest.fixture(scope="module")
def atlas_run(data, tmp_path_factory):
    """Three epochs with a TensorBoardLogger, a sanity check of 2 batches, the atlas at its defaults and
    TinyNet (whose validation_step returns nothing: the atlas runs the model itself)."""
    root = tmp_path_factory.mktemp("atlas")
    train, val = loaders(data, n_val=N_VAL)
    reference = ReferenceMatrix(data[2][:N_VAL], data[3][:N_VAL])
    callback = ConfusedLogitCallback(top_k=2, logging_batch_interval=3)
    logger = TensorBoardLogger(root)
    run = trainer(
        root,
        [callback, reference],
        logger,
        max_epochs=EPOCHS,
        limit_train_batches=TRAIN_BATCHES,
        num_sanity_val_steps=2,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.fit(tiny(data, lr=3e-2), train, val)
    assert run.state.finished
    assert peering_warnings(caught) == []
    return Path(logger.log_dir), callback, reference


def test_one_matrix_per_validation_run_equal_to_the_models_predictions(atlas_run):
    logdir, callback, reference = atlas_run
    steps = [TRAIN_BATCHES * (e + 1) for e in range(EPOCHS)]  # global step at each validation end
    pictures = read_images(logdir, MATRIX)
    assert [(step, len(pngs)) for step, pngs in pictures] == [(s, 1) for s in steps]  # no sanity-check one
    records = [r for r in read_index(logdir) if r["tag"] == MATRIX]
    assert [(r["step"], r["epoch"], r["stage"]) for r in records] == [
        (s, e, "validation") for e, s in enumerate(steps)
    ]
    assert len(reference.matrices) == EPOCHS
    for record, expected, (_, pngs) in zip(records, reference.matrices, pictures, strict=True):
        np.testing.assert_array_equal(np.array(record["matrix"]), expected)
        assert record["samples"] == N_VAL and record["ignored"] == 0
        assert png_size(pngs[0]) == (record["width"], record["height"])
        assert record["png"] is None  # it went to TensorBoard
    # the model learned: the matrices are not all the same
    assert not all(np.array_equal(reference.matrices[0], m) for m in reference.matrices[1:])
    assert callback.state_dict()["atlas"] == {"matrices": EPOCHS, "pair_pictures": 3 * EPOCHS}


def test_top_pairs_are_the_most_frequent_mistakes_with_their_examples(atlas_run):
    logdir, _, reference = atlas_run
    index = read_index(logdir)
    matrices = {r["step"]: np.array(r["matrix"]) for r in index if r["tag"] == MATRIX}
    pairs = [r for r in index if r["tag"] == PAIRS]
    pictures = dict(read_images(logdir, PAIRS))
    assert sorted(pictures) == sorted(matrices)
    for step, matrix in matrices.items():
        mine = sorted((r for r in pairs if r["step"] == step), key=lambda r: r["index"])
        # the loggers get one picture per run (the pairs stacked); each record says where its panel sits
        assert [r["index"] for r in mine] == [0, 1, 2] and len(pictures[step]) == 1
        off = matrix.copy()
        np.fill_diagonal(off, 0)
        counts = [r["count"] for r in mine]
        assert counts == sorted(off.flatten().tolist(), reverse=True)[:3]  # the three largest mistakes
        for r in mine:
            assert r["true"] != r["predicted"] and matrix[r["true"], r["predicted"]] == r["count"]
            assert r["class_total"] == matrix[r["true"]].sum()
            assert r["examples"] == min(4, r["count"])  # the default examples_per_pair, all ranks
            x, y, width, height = r["box"]
            assert (width, height) == (r["width"], r["height"])
            stacked_width, stacked_height = png_size(pictures[step][0])
            assert x + width <= stacked_width and y + height <= stacked_height


def test_pictures_look_like_a_matrix_and_like_attributions(atlas_run):
    logdir, _, _ = atlas_run
    (_, [matrix_png]), *_ = read_images(logdir, MATRIX)
    with Image.open(io.BytesIO(matrix_png)) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape[0] > 10 * 12 and pixels.shape[1] > 10 * 12  # 10 x 10 cells of at least 12 px
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10  # colours, not a blank page
    step, pair_pngs = read_images(logdir, PAIRS)[-1]
    first = next(r for r in read_index(logdir) if r["tag"] == PAIRS and r["step"] == step and r["index"] == 0)
    x, y, width, height = first["box"]
    with Image.open(io.BytesIO(pair_pngs[0])) as image:
        panel = image.crop((x, y, x + width, y + height))
    assert panel.width > 4 * panel.height / 2  # a row of example tiles and the direction map
    assert len(np.unique(np.asarray(panel.convert("RGB")).reshape(-1, 3), axis=0)) > 10


def test_the_module_returned_logits_spare_a_forward_pass(data, tmp_path):
    """With ``{"logits": ...}`` returned from validation_step the atlas and the validation checks run no
    model; without them the callback runs it once per validation batch, for both. The matrix and the
    validation pictures are the same either way."""

    class Counting(TinyNet):
        def __init__(self, return_logits: bool, **kwargs):
            super().__init__(**kwargs)
            self.return_logits, self.calls, self.counting = return_logits, 0, False

        def forward(self, x):
            self.calls += self.counting
            return super().forward(x)

        # Lightning calls these around validation_step and the callbacks' on_validation_batch_end
        def on_validation_batch_start(self, batch, batch_idx, dataloader_idx=0):
            self.counting = True

        def on_validation_batch_end(self, outputs, batch, batch_idx, dataloader_idx=0):
            self.counting = False

        def validation_step(self, batch, batch_idx):
            x, y = batch
            logits = self(x)
            loss = F.cross_entropy(logits, y)
            return {"loss": loss, "logits": logits} if self.return_logits else loss

    train, val = loaders(data, n_val=N_VAL)
    matrices, checked = [], []
    with torch.random.fork_rng(devices=[]):  # leaves the global RNG as it was
        for return_logits in (True, False):
            torch.manual_seed(0)  # the same weights and dropout masks in both runs
            model = Counting(return_logits, size=data[0].shape[-1])
            callback = ConfusedLogitCallback(logging_batch_interval=1, background=False, **ALWAYS)
            run = trainer(
                tmp_path / str(return_logits),
                [callback],
                False,
                limit_train_batches=2,
                num_sanity_val_steps=0,
            )
            run.fit(model, train, val)
            assert model.calls == 3 * (1 if return_logits else 2)  # 3 validation batches, all checked
            index = read_index(tmp_path / str(return_logits))
            matrices.append([r["matrix"] for r in index if r["tag"] == MATRIX])
            pictures = [r for r in index if r["tag"] == "peering/val/confused"]
            checked.append([(r["label"], r["class_a"], r["class_b"]) for r in pictures])
    assert matrices[0] == matrices[1] and len(matrices[0]) == 1
    assert checked[0] == checked[1] and len(checked[0]) == 4  # top_k validation pictures, the same samples


def test_png_folder_and_index_without_a_logger(data, tmp_path):
    train, val = loaders(data, n_val=N_VAL)
    callback = ConfusedLogitCallback(on="train", pairs=2, examples_per_pair=3)
    trainer(tmp_path, [callback], False, max_epochs=2, limit_train_batches=2).fit(tiny(data), train, val)
    assert {MATRIX, PAIRS} <= set(image_tags(tmp_path))
    files = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "peering").rglob("*.png"))
    assert [f for f in files if "confusion_matrix" in f] == [
        "peering/confusion_matrix/step_2_0.png",
        "peering/confusion_matrix/step_4_0.png",
    ]
    assert [f for f in files if "confused_pairs" in f] == [
        f"peering/confused_pairs/step_{s}_{i}.png" for s in (2, 4) for i in (0, 1)
    ]
    records = [r for r in read_index(tmp_path) if r["tag"] in (MATRIX, PAIRS)]
    assert [r["png"] for r in records] == [
        "peering/confusion_matrix/step_2_0.png",
        "peering/confused_pairs/step_2_0.png",
        "peering/confused_pairs/step_2_1.png",
        "peering/confusion_matrix/step_4_0.png",
        "peering/confused_pairs/step_4_0.png",
        "peering/confused_pairs/step_4_1.png",
    ]
    assert all(r["examples"] <= 3 for r in records if r["tag"] == PAIRS)
    assert [step for step, _ in read_images(tmp_path, MATRIX)] == [2, 4]


def test_atlas_off_and_resume(data, tmp_path):
    train, val = loaders(data, n_val=N_VAL)
    off = ConfusedLogitCallback(atlas=False, on="train")
    trainer(tmp_path / "off", [off], False, limit_train_batches=2).fit(tiny(data), train, val)
    assert not {MATRIX, PAIRS} & set(image_tags(tmp_path / "off"))
    assert off.state_dict()["atlas"] == {"matrices": 0, "pair_pictures": 0}

    first = ConfusedLogitCallback(on="train")
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(
        tmp_path / "first", [first, checkpoints], False, limit_train_batches=2, enable_checkpointing=True
    ).fit(tiny(data), train, val)
    state = first.state_dict()
    assert state["atlas"]["matrices"] == 1
    again = ConfusedLogitCallback(on="train")
    again.load_state_dict(copy.deepcopy(state))
    assert again.state_dict() == state
    resumed = ConfusedLogitCallback(on="train")
    trainer(tmp_path / "resumed", [resumed], False, max_epochs=3, limit_train_batches=2).fit(
        tiny(data), train, val, ckpt_path=tmp_path / "ckpt" / "last.ckpt"
    )
    assert resumed.state_dict()["atlas"]["matrices"] == 3  # one restored, two new
    assert [s for s, _ in read_images(tmp_path / "resumed", MATRIX)] == [4, 6]


def test_a_run_without_labels_says_why_it_has_no_matrix(data, tmp_path):
    x = data[2][:64]
    unlabelled = DataLoader(TensorDataset(x), batch_size=32)

    class NoLabels(TinyNet):
        def validation_step(self, batch, batch_idx):
            pass

    callback = ConfusedLogitCallback(on="train", background=False)
    train, _ = loaders(data)
    run = trainer(tmp_path, [callback], False, max_epochs=2, limit_train_batches=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.fit(NoLabels(size=x.shape[-1]), train, unlabelled)
    said = peering_warnings(caught)
    assert len(said) == 1, said  # once per run, not once per epoch
    assert "confusion atlas" in said[0] and "labels" in said[0] and "unpack=" in said[0]
    assert callback.state_dict()["atlas"]["matrices"] == 0


@pytest.mark.parametrize(
    "kwargs",
    [{"pairs": 0}, {"examples_per_pair": -1}, {"atlas": "yes"}, {"pairs": 2.5}],
)
def test_bad_atlas_arguments_fail_at_construction(kwargs):
    with pytest.raises(ValueError):
        ConfusedLogitCallback(**kwargs)


def test_always_settings_do_not_change_the_matrix(data, tmp_path):
    """The matrix counts every validation sample whatever the callback's own thresholds and interval."""
    train, val = loaders(data, n_val=N_VAL)
    with torch.random.fork_rng(devices=[]):
        for name, kwargs in (("always", {**ALWAYS, "logging_batch_interval": 1}), ("rarely", {})):
            torch.manual_seed(0)  # the same dropout masks: the same model at the validation run
            callback = ConfusedLogitCallback(**kwargs)
            trainer(tmp_path / name, [callback], False, limit_train_batches=2).fit(tiny(data), train, val)
    both = [
        [r["matrix"] for r in read_index(tmp_path / n) if r["tag"] == MATRIX] for n in ("always", "rarely")
    ]
    assert both[0] == both[1] and sum(map(sum, both[0][0])) == N_VAL
