"""`ConfusedLogitCallback` outside `fit`, and runs that show nothing: Lightning's stand-alone `validate()` and
`test()` (inference mode), counting only the pictures written, readers and `peering report` on a run
without pictures, and the defaults on a real MNIST model.

Real Trainers on MNIST t10k digits (skipped without `PEERING_DATA_DIR`), with the session's trained CNN.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from peering import explain
from peering.attribution.confusion import select_confused
from peering.lightning import (
    ConfusedLogitCallback,
    image_tags,
    no_pictures_reason,
    read_images,
    read_index,
    read_scalars,
    read_summary,
)
from peering.models import DigitClassifier

QUIET = {"enable_progress_bar": False, "enable_model_summary": False, "enable_checkpointing": False}
ALWAYS = {"max_logit_difference": 1e9, "min_logit_value": None}  # every sample counts as confused


def peering_warnings(records) -> list[str]:
    return [str(w.message) for w in records if "peering" in str(w.message)]


def module_with(cnn) -> DigitClassifier:
    """A `DigitClassifier` around a copy of ``cnn`` (its `validation_step`/`test_step` log metrics)."""
    module = DigitClassifier()
    module.model = copy.deepcopy(cnn).train()
    return module


@pytest.fixture(scope="module")
def held_out(mnist_split):
    """256 held-out MNIST digits, 4 batches of 64."""
    _, _, x, y = mnist_split
    return x[:256], y[:256]


class InferenceModeSpy(Callback):
    """Records whether the evaluation hooks really run under `torch.inference_mode` (Lightning's default)."""

    def __init__(self):
        self.seen: list[bool] = []

    def on_validation_batch_end(self, *args, **kwargs):
        self.seen.append(torch.is_inference_mode_enabled())

    def on_test_batch_end(self, *args, **kwargs):
        self.seen.append(torch.is_inference_mode_enabled())


@pytest.mark.slow
def test_validate_and_test_log_pictures_under_inference_mode(trained_cnn, held_out, tmp_path):
    x, y = held_out
    loader = DataLoader(TensorDataset(x, y), batch_size=64)
    callback = ConfusedLogitCallback(top_k=3, logging_batch_interval=1, **ALWAYS)
    spy = InferenceModeSpy()
    logger = TensorBoardLogger(tmp_path)
    trainer = pl.Trainer(logger=logger, callbacks=[callback, spy], **QUIET)
    module = module_with(trained_cnn)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.validate(module, loader)
        trainer.test(module, loader)
    assert peering_warnings(caught) == []
    assert spy.seen == [True] * 8  # 4 validation + 4 test batches, all in inference mode

    logdir = logger.log_dir
    assert {"peering/val/confused", "peering/test/confused"} <= set(image_tags(logdir))
    assert "peering/confused" not in image_tags(logdir)  # no training pictures in validate()/test()
    for tag in ("peering/val/confused", "peering/test/confused"):
        ((step, pngs),) = read_images(logdir, tag)  # TensorBoard: one picture, the 3 panels stacked
        assert step == 0 and len(pngs) == 1 and pngs[0].startswith(b"\x89PNG")
    assert read_scalars(logdir, "peering/val/confused_fraction") == [(0, 1.0)]
    assert read_scalars(logdir, "peering/test/confused_fraction") == [(0, 1.0)]
    state = callback.state_dict()
    assert state["pictures"] == {"train": 0, "validation": 3, "test": 3}
    assert state["checks"] == {"train": 0, "validation": 4, "test": 4}

    # the pictures are those of the 3 smallest margins of all 256 digits, with the model's top two classes
    with torch.no_grad():
        logits = trained_cnn(x)
    reference = select_confused(logits, max_difference=1e9, top_n=3)
    index = [r for r in read_index(logdir) if "label" in r]  # the samples' records (not the atlas's)
    for stage in ("validation", "test"):
        records = [r for r in index if r["stage"] == stage]
        assert [[r["class_a"], r["class_b"]] for r in records] == reference.classes.tolist()
        assert [r["label"] for r in records] == y[reference.indices].tolist()
        torch.testing.assert_close(
            torch.tensor([r["margin"] for r in records]), reference.margins, rtol=1e-4, atol=1e-5
        )
        exp = explain(trained_cnn, x[reference.indices], reference.classes)
        torch.testing.assert_close(
            torch.tensor([[r["prob_a"], r["prob_b"]] for r in records]),
            exp.probabilities.gather(1, reference.classes),
            rtol=1e-4,
            atol=1e-6,
        )
    summary = read_summary(logdir)
    assert summary["stages"]["test"]["pictures"] == 3 and summary["stages"]["test"]["samples"] == 256
    assert no_pictures_reason(logdir) is None


@pytest.mark.slow
def test_only_pictures_written_are_counted(trained_cnn, held_out, tmp_path):
    """The PNG folder for validation pictures cannot be created (a file is in the way): nothing is written
    for validation, so nothing is counted, and the run summary says why."""
    x, y = held_out
    loader = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=64)
    callback = ConfusedLogitCallback(top_k=2, logging_batch_interval=1, background=False, **ALWAYS)
    trainer = pl.Trainer(logger=False, default_root_dir=tmp_path, callbacks=[callback], **QUIET)
    (tmp_path / "peering").mkdir()
    (tmp_path / "peering" / "val").write_text("in the way")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.validate(module_with(trained_cnn), loader)
    assert any("could not log to" in w for w in peering_warnings(caught))
    state = callback.state_dict()
    assert state["chosen"]["validation"] == 2 and state["pictures"]["validation"] == 0
    stage = read_summary(tmp_path)["stages"]["validation"]
    assert stage["pictures"] == 0 and "no picture could be written" in stage["why_no_pictures"]

    # the same run with the way clear: both pictures written and counted
    (tmp_path / "peering" / "val").unlink()
    callback = ConfusedLogitCallback(top_k=2, logging_batch_interval=1, background=False, **ALWAYS)
    trainer = pl.Trainer(logger=False, default_root_dir=tmp_path, callbacks=[callback], **QUIET)
    trainer.validate(module_with(trained_cnn), loader)
    assert callback.state_dict()["pictures"]["validation"] == 2
    assert len(read_images(tmp_path, "peering/val/confused")[0][1]) == 2


@pytest.mark.slow
@pytest.mark.parametrize("logger_kind", ["tensorboard", "csv"])
def test_a_run_without_pictures_reads_empty_and_reports_why(held_out, tmp_path, logger_kind):
    """An impossible threshold and no confusion atlas: the readers return empty results (no KeyError from
    TensorBoard's missing image plugin) and `peering report` exits 0 saying there are no pictures and which
    threshold it was."""
    x, y = held_out
    train = DataLoader(TensorDataset(x[:128], y[:128]), batch_size=32)
    val = DataLoader(TensorDataset(x[128:], y[128:]), batch_size=64)
    callback = ConfusedLogitCallback(min_logit_value=1e6, logging_batch_interval=2, atlas=False)
    if logger_kind == "tensorboard":
        logger = TensorBoardLogger(tmp_path)
    else:
        logger = CSVLogger(tmp_path)
    trainer = pl.Trainer(max_epochs=1, logger=logger, callbacks=[callback], **QUIET)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = DigitClassifier()
    trainer.fit(module, train, val)
    logdir = Path(trainer.log_dir)

    assert image_tags(logdir) == []
    assert read_images(logdir, "peering/confused") == []
    assert read_index(logdir) == []
    assert [v for _, v in read_scalars(logdir, "peering/confused_fraction")] == [0.0, 0.0]  # batches 1, 3
    reason = no_pictures_reason(logdir)
    assert reason is not None and "min_logit_value=1e+06" in reason and "train" in reason
    summary = json.loads((logdir / "peering" / "callback.json").read_text())
    assert summary["settings"]["min_logit_value"] == 1e6
    assert summary["stages"]["train"]["samples"] == 64 and summary["stages"]["train"]["candidates"] == 0

    done = subprocess.run(
        [sys.executable, "-m", "peering.cli", "report", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert "No confused-sample pictures" in done.stdout and "lower min_logit_value" in done.stdout
    page = (tmp_path / "report.html").read_text()
    assert "No confused-sample pictures" in page and "lower min_logit_value" in page


# ------------------------------------------------------------------------------------------------ defaults


def rank_zero_infos(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "INFO" and "peering" in r.getMessage()]


@pytest.mark.slow
def test_defaults_show_the_confused_samples_of_a_trained_model(trained_cnn, mnist_split, tmp_path, caplog):
    """The README's `ConfusedLogitCallback(top_k=8)` on the trained MNIST CNN: pictures, whereas Bolts'
    thresholds (min_logit_value=5.0, max_logit_difference=0.1) show none, and then say which to loosen."""
    _, _, x, y = mnist_split
    loader = DataLoader(TensorDataset(x, y), batch_size=256)  # 8 batches: batch 0 checked (interval 20)
    callback = ConfusedLogitCallback(top_k=8)
    trainer = pl.Trainer(logger=False, default_root_dir=tmp_path / "ours", callbacks=[callback], **QUIET)
    with caplog.at_level("INFO"):
        trainer.validate(module_with(trained_cnn), loader)
    state = callback.state_dict()
    assert state["samples_checked"]["validation"] == 256
    assert state["pictures"]["validation"] >= 1  # the held-out digits the model hesitates on
    assert (
        len(read_images(tmp_path / "ours", "peering/val/confused")[0][1]) == state["pictures"]["validation"]
    )
    assert not [m for m in rank_zero_infos(caplog) if "found no confused sample" in m]

    caplog.clear()
    bolts = ConfusedLogitCallback(8, 3.0, 5.0, 20, 0.1)
    trainer = pl.Trainer(logger=False, default_root_dir=tmp_path / "bolts", callbacks=[bolts], **QUIET)
    with caplog.at_level("INFO"):
        trainer.validate(module_with(trained_cnn), loader)
    assert bolts.state_dict()["pictures"]["validation"] == 0
    said = [m for m in rank_zero_infos(caplog) if "found no confused sample" in m]
    assert len(said) == 1
    assert "max_logit_difference=0.1" in said[0] and "raise max_logit_difference" in said[0]
    assert no_pictures_reason(tmp_path / "ours") is None
    assert "raise max_logit_difference" in no_pictures_reason(tmp_path / "bolts")


@pytest.mark.slow
def test_an_epoch_without_confused_samples_is_told_once(held_out, tmp_path, caplog):
    """Two epochs in which no sample passes min_logit_value: one info line per stage for the whole run (not
    one per epoch), naming the threshold and what to do."""
    x, y = held_out
    train = DataLoader(TensorDataset(x[:128], y[:128]), batch_size=32)
    val = DataLoader(TensorDataset(x[128:], y[128:]), batch_size=64)
    callback = ConfusedLogitCallback(min_logit_value=1e6, logging_batch_interval=1)
    trainer = pl.Trainer(max_epochs=2, logger=False, default_root_dir=tmp_path, callbacks=[callback], **QUIET)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = DigitClassifier()
    with caplog.at_level("INFO"):
        trainer.fit(module, train, val)
    said = [m for m in rank_zero_infos(caplog) if "found no confused sample" in m]
    assert len(said) == 2
    assert {m.split(" epoch ")[0].rsplit(" ", 1)[-1] for m in said} == {"train", "validation"}
    for m in said:
        assert "min_logit_value=1e+06" in m and "lower min_logit_value or set it to None" in m
