"""`ConfusedLogitCallback` in real `Trainer` runs: what reaches TensorBoard (event files and the real server),
the PNG fallback, failing loggers, resumed runs, batch shapes, and that training is never changed.

Runs on a 1,024-digit MNIST t10k subset (sklearn digits when `PEERING_DATA_DIR` is not set) with a tiny
CNN, a few steps each, so the whole file takes well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator as ea
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from peering.data import DATA_DIR_ENV, available_mnist_splits, load_digits, load_mnist
from peering.lightning import (
    ConfusedLogitCallback,
    default_unpack,
    image_tags,
    read_images,
    read_index,
    read_scalars,
)
from peering.lightning.pictures import STACK_PAD
from peering.lightning.sinks import image_sinks
from peering.render import confusion_panels

from ._chromium import evaluate, find_chromium

QUIET = {"enable_progress_bar": False, "enable_model_summary": False, "log_every_n_steps": 1}
ATLAS_TAGS = {"peering/confusion_matrix", "peering/confused_pairs"}  # the confusion atlas (on by default)
ALWAYS = {"max_logit_difference": 1e9, "min_logit_value": None}  # every sample counts as confused


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def data():
    """(train_x, train_y, val_x, val_y): 1,024 + 256 MNIST t10k digits, or sklearn digits without MNIST."""
    root = os.environ.get(DATA_DIR_ENV)
    if root and "test" in available_mnist_splits(root):
        x, y = load_mnist(root, "test")
    else:
        x, y = load_digits()
    return x[:1024], y[:1024], x[1024:1280], y[1024:1280]


class TinyNet(pl.LightningModule):
    """conv 5x5/2 - batch norm - ReLU - dropout - linear: a few thousand weights, trains in milliseconds."""

    def __init__(self, channels: int = 1, size: int = 28, lr: float = 1e-2, width: int = 4):
        super().__init__()
        side = (size - 5) // 2 + 1
        self.features = nn.Sequential(nn.Conv2d(channels, width, 5, 2), nn.BatchNorm2d(width), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Flatten(), nn.Linear(width * side * side, 10))
        self.lr = lr

    def forward(self, x):
        return self.head(self.features(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def tiny(data, **kwargs) -> TinyNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return TinyNet(size=data[0].shape[-1], **kwargs)


def loaders(data, batch_size=32, n_train=256, n_val=128, shuffle=False):
    train_x, train_y, val_x, val_y = data
    train = DataLoader(
        TensorDataset(train_x[:n_train], train_y[:n_train]), batch_size=batch_size, shuffle=shuffle
    )
    val = DataLoader(TensorDataset(val_x[:n_val], val_y[:n_val]), batch_size=64)
    return train, val


def trainer(tmp_path, callbacks, logger, **kwargs) -> pl.Trainer:
    options = {"max_epochs": 1, "enable_checkpointing": False, "default_root_dir": tmp_path, **QUIET}
    options.update(kwargs)
    return pl.Trainer(logger=logger, callbacks=callbacks, **options)


def panel_height(data, drawing: dict) -> int:
    """The height of a confusion panel for these inputs, as render draws it with the callback's options
    (``drawing``: its legend names what was differentiated; its width depends on the captions)."""
    x = data[0][:1]
    one = torch.tensor([0])
    panel = confusion_panels(
        x,
        x,
        x,
        class_a=one,
        class_b=one,
        prob_a=one.float(),
        prob_b=one.float(),
        labels=one,
        **{**drawing, "projection_factor": 1.0},
    )
    return panel.shape[1]


def stacked_size(records: list[dict]) -> tuple[int, int]:
    """(width, height) of the loggers' picture of a check with these index records' panels: one column,
    6 px of grey around each."""
    width, height = records[0]["width"], records[0]["height"]
    assert all((r["width"], r["height"]) == (width, height) for r in records)
    return width + 2 * STACK_PAD, len(records) * (height + STACK_PAD) + STACK_PAD


def records_at(run_dir, tag: str, step: int) -> list[dict]:
    return [r for r in read_index(run_dir) if r["tag"] == tag and r["step"] == step]


def png_size(png: bytes) -> tuple[int, int]:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    return image.size


def peering_warnings(records) -> list[str]:
    return [str(w.message) for w in records if "peering" in str(w.message)]


# ------------------------------------------------------------------------------------ TensorBoard end to end

EPOCHS, TRAIN_BATCHES, INTERVAL, TOP_K, CAP = 2, 8, 2, 3, 10


@pytest.fixture(scope="module")
def tb_run(data, tmp_path_factory):
    """Two epochs of 8 steps with a TensorBoardLogger, checking every 2nd batch, 3 pictures a check, at most
    10 per epoch, tracking 2 samples. (Within fit, Lightning validates under no_grad; the stand-alone
    validate() and test(), under inference mode, are in test_callback_stages.)"""
    root = tmp_path_factory.mktemp("tb")
    callback = ConfusedLogitCallback(
        top_k=TOP_K, logging_batch_interval=INTERVAL, max_pictures_per_epoch=CAP, track=2, **ALWAYS
    )
    train, val = loaders(data)
    logger = TensorBoardLogger(root)
    run = trainer(root, [callback], logger, max_epochs=EPOCHS, limit_train_batches=TRAIN_BATCHES)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.fit(tiny(data), train, val)
    assert run.state.finished
    assert peering_warnings(caught) == []
    return root, Path(logger.log_dir), callback


def test_tensorboard_event_files(tb_run, data):
    _, logdir, callback = tb_run
    acc = ea.EventAccumulator(str(logdir), size_guidance=ea.STORE_EVERYTHING_SIZE_GUIDANCE)
    acc.Reload()
    tags = acc.Tags()
    picture_tags = {"peering/confused", "peering/val/confused", "peering/tracked/0", "peering/tracked/1"}
    picture_tags |= ATLAS_TAGS
    assert picture_tags <= set(tags["tensors"])
    assert set(acc.PluginTagToContent("images")) == picture_tags
    assert {"peering/confused_fraction", "peering/val/confused_fraction"} <= set(tags["scalars"])

    # training: checks at batches 1, 3, 5, 7 of each epoch; 3 samples each until the cap of 10 per epoch,
    # all of a check's samples in ONE picture (one card in TensorBoard, its step slider a time-lapse)
    events = acc.Tensors("peering/confused")
    steps = [e.step for e in events]
    assert steps == [2, 4, 6, 8, 10, 12, 14, 16]
    assert all(len(e.tensor_proto.string_val) - 2 == 1 for e in events)
    for e, n in zip(events, [3, 3, 3, 1] * EPOCHS, strict=True):
        records = records_at(logdir, "peering/confused", e.step)
        assert len(records) == n and records[0]["height"] == panel_height(data, callback.config.drawing)
        width, height = stacked_size(records)
        assert e.tensor_proto.string_val[:2] == [str(width).encode(), str(height).encode()]
        assert png_size(e.tensor_proto.string_val[2]) == (width, height)
    fractions = acc.Scalars("peering/confused_fraction")
    assert [(s.step, s.value) for s in fractions] == [(s, 1.0) for s in steps]

    # validation (no_grad within fit): once per epoch at the epoch's last step, never in the sanity check
    val = acc.Tensors("peering/val/confused")
    assert [(e.step, png_size(e.tensor_proto.string_val[2])) for e in val] == [
        (s, stacked_size(records_at(logdir, "peering/val/confused", s))) for s in (8, 16)
    ]
    assert all(len(records_at(logdir, "peering/val/confused", s)) == 3 for s in (8, 16))
    assert [s.step for s in acc.Scalars("peering/val/confused_fraction")] == [8, 16]
    # the confusion atlas: one matrix, and its three pairs stacked into one picture, per validation run
    # (test_callback_atlas.py has more)
    for tag, per_run in (("peering/confusion_matrix", 1), ("peering/confused_pairs", 1)):
        events = [(e.step, len(e.tensor_proto.string_val) - 2) for e in acc.Tensors(tag)]
        assert events == [(8, per_run), (16, per_run)], tag
    # tracked samples: one picture per validation run each
    for i in range(2):
        assert [
            (e.step, len(e.tensor_proto.string_val) - 2) for e in acc.Tensors(f"peering/tracked/{i}")
        ] == [(8, 1), (16, 1)]

    state = callback.state_dict()
    assert state["pictures"] == {"train": 20, "validation": 6, "test": 0}
    assert state["checks"] == {"train": 8, "validation": 2, "test": 0}  # 2 val batches: batch 0 checked
    assert state["tracked"]["inputs"].shape == (2, *data[0].shape[1:])


def test_readers_match_event_files(tb_run, data):
    _, logdir, _ = tb_run
    assert image_tags(logdir) == [
        "peering/confused",
        "peering/confused_pairs",
        "peering/confusion_matrix",
        "peering/tracked/0",
        "peering/tracked/1",
        "peering/val/confused",
    ]
    pictures = read_images(logdir, "peering/confused")
    assert [(step, len(pngs)) for step, pngs in pictures] == [(s, 1) for s in [2, 4, 6, 8, 10, 12, 14, 16]]
    assert png_size(pictures[0][1][0]) == stacked_size(records_at(logdir, "peering/confused", 2))
    assert read_scalars(logdir, "peering/val/confused_fraction") == [(8, 1.0), (16, 1.0)]

    index = [r for r in read_index(logdir) if r["tag"] not in ATLAS_TAGS]
    assert len(index) == 20 + 6 + 4
    assert len(read_index(logdir)) == 20 + 6 + 4 + 2 * (1 + 3)  # and per validation run a matrix, 3 pairs
    train = [r for r in index if r["tag"] == "peering/confused"]
    assert [(r["step"], r["index"]) for r in train[:4]] == [(2, 0), (2, 1), (2, 2), (4, 0)]
    for r in index:
        assert r["png"] is None  # everything went to TensorBoard
        height = r["height"]
        assert r["box"] == [STACK_PAD, STACK_PAD + r["index"] * (height + STACK_PAD), r["width"], height]
    # the report cuts the samples back out of the stacked pictures: one picture per sample again
    from peering.report.run import read_run

    run = read_run(logdir)
    assert len(run.train) == 20 and len(run.val) == 6 and [len(v) for v in run.tracked.values()] == [2, 2]
    for picture in run.train + run.val:
        assert png_size(picture.png) == (picture.record["width"], picture.record["height"])
        assert 0 <= r["class_a"] < 10 and 0 <= r["class_b"] < 10 and r["class_a"] != r["class_b"]
        assert 0 <= r["label"] < 10 and r["prob_a"] >= r["prob_b"] - 1e-6
    for step in {r["step"] for r in train}:  # most confused first
        margins = [r["margin"] for r in train if r["step"] == step]
        assert margins == sorted(margins)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


# every image card of TensorBoard's Images dashboard (a tf-image-loader, inside shadow roots), once each
# shows its loaded picture: [{tag, run, sample, loaded}, ...], or "" while the page is still building
IMAGE_CARDS = """(function () {
  var cards = [];
  function walk(root, into) {
    root.querySelectorAll('*').forEach(function (el) {
      if (el.localName === 'tf-image-loader') {
        var card = {tag: el.tag, run: el.run, sample: el.sample, loaded: false};
        cards.push(card);
        if (el.shadowRoot) walk(el.shadowRoot, card);
      } else if (into && el.localName === 'img' && el.complete && el.naturalWidth > 0) {
        into.loaded = true;
      }
      if (el.shadowRoot && el.localName !== 'tf-image-loader') walk(el.shadowRoot, into);
    });
  }
  walk(document, null);
  var ready = cards.length > 0 && cards.every(function (c) { return c.loaded; });
  return ready ? JSON.stringify(cards) : '';
})()"""


def image_cards(chromium: str, url: str, tmp_path: Path) -> list[str]:
    """The tag of each card in TensorBoard's Images dashboard, as a browser shows it (bounded wait);
    saves a screenshot as test-artifacts/tensorboard.png."""
    shot = Path(__file__).resolve().parents[1] / "test-artifacts" / "tensorboard.png"
    shot.unlink(missing_ok=True)
    pytest.importorskip("websocket", reason="websocket-client (the dev extra) talks to chromium's DevTools")
    cards = evaluate(chromium, url, IMAGE_CARDS, tmp_path / "chromium", timeout=40, screenshot=shot)
    assert cards is not None, "TensorBoard's Images dashboard showed no loaded picture within 40 s"
    assert shot.is_file() and shot.stat().st_size > 5_000
    return [card["tag"] for card in cards]


def test_tensorboard_server_serves_the_pictures(tb_run, data, tmp_path):
    """The real `tensorboard` server shows tag peering/confused with 3 samples and serves each step's PNG."""
    root, logdir, _ = tb_run
    binary = Path(sys.executable).with_name("tensorboard")
    if not binary.exists():
        pytest.skip("no tensorboard executable beside the interpreter")
    port = _free_port()
    log = open(tmp_path / "tensorboard.log", "wb")
    server = subprocess.Popen(
        [
            str(binary),
            "--logdir",
            str(root),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--load_fast=false",
            "--reload_interval=1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}/data/plugin/images"
    run = logdir.relative_to(root).as_posix()
    try:
        deadline, tags = time.monotonic() + 60, {}
        while time.monotonic() < deadline:
            assert server.poll() is None, (tmp_path / "tensorboard.log").read_text()
            with contextlib.suppress(OSError):
                tags = json.loads(_get(f"{base}/tags"))
                if "peering/confused" in tags.get(run, {}):
                    break
            time.sleep(0.5)
        assert "peering/confused" in tags.get(run, {}), tags
        # one picture per step and tag: one card each, whose step slider walks through training
        assert {tag: info["samples"] for tag, info in tags[run].items()} == {
            "peering/confused": 1,
            "peering/val/confused": 1,
            "peering/tracked/0": 1,
            "peering/tracked/1": 1,
            "peering/confusion_matrix": 1,
            "peering/confused_pairs": 1,
        }
        query = urllib.parse.urlencode({"run": run, "tag": "peering/confused", "sample": 0})
        entries = json.loads(_get(f"{base}/images?{query}"))
        assert [e["step"] for e in entries] == [2, 4, 6, 8, 10, 12, 14, 16]
        png = _get(f"{base}/individualImage?{entries[-1]['query']}")
        assert png_size(png) == stacked_size(records_at(logdir, "peering/confused", 16))  # capped: one

        # TensorBoard's own page, in a real headless browser: one card per tag in the Images dashboard
        chromium = find_chromium()
        if chromium is None:
            pytest.skip("chromium not found: install Debian's chromium package to check TensorBoard's page")
        cards = image_cards(chromium, f"http://127.0.0.1:{port}/?darkMode=false#images", tmp_path)
        assert sorted(cards) == sorted(tags[run]), cards
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
        log.close()


# ---------------------------------------------------------------------------------- never changes training


@contextlib.contextmanager
def deterministic_sandbox():
    """Seeded, deterministic training that leaves the global RNG, algorithms flag and env as they were."""
    flag = torch.are_deterministic_algorithms_enabled()
    env = dict(os.environ)
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(flag)
            os.environ.clear()
            os.environ.update(env)


def _train_weights(data, tmp_path, callback, accumulate):
    pl.seed_everything(123, verbose=False)
    model = tiny(data)
    train, val = loaders(data, n_train=192, n_val=64, shuffle=True)
    run = trainer(
        tmp_path,
        [callback] if callback else [],
        False,
        max_epochs=2,
        deterministic=True,
        accumulate_grad_batches=accumulate,
        num_sanity_val_steps=0,
    )
    run.fit(model, train, val)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    ("accumulate", "method", "options"),
    [(1, "gradient", {}), (2, "gradient", {}), (1, "smoothgrad", {"n_samples": 4, "seed": 1})],
    ids=["plain", "accumulate_grad_batches=2", "smoothgrad"],
)
def test_weights_bit_identical_with_and_without_callback(data, tmp_path, accumulate, method, options):
    """Dropout, batch norm, shuffling, validation, tracking, a check each batch, the confusion atlas (its own
    forward pass on every validation batch, directions of its pairs): the same weights, bitwise."""
    callback = ConfusedLogitCallback(
        top_k=2, logging_batch_interval=1, method=method, method_options=options, track=1, **ALWAYS
    )
    with deterministic_sandbox():
        without = _train_weights(data, tmp_path / "without", None, accumulate)
        with_callback = _train_weights(data, tmp_path / "with", callback, accumulate)
    assert callback.state_dict()["pictures"]["train"] == 2 * 2 * 6  # it did run: 2 per batch, 12 batches
    assert callback.state_dict()["atlas"] == {"matrices": 2, "pair_pictures": 2 * 3}  # and so did the atlas
    assert without.keys() == with_callback.keys()
    for name in without:
        assert torch.equal(without[name], with_callback[name]), name


class FrozenFeatures(TinyNet):
    """Keeps its feature extractor in eval mode (a frozen backbone) and records the modes at every step."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen_modes: list[list[bool]] = []

    def on_train_epoch_start(self):
        self.features.eval()

    def training_step(self, batch, batch_idx):
        self.seen_modes.append([m.training for m in self.modules()])
        return super().training_step(batch, batch_idx)


class GradProbe(pl.Callback):
    """Snapshots every parameter's .grad at on_train_batch_end (placed before and after the callback)."""

    def __init__(self):
        self.grads = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.grads.append([None if p.grad is None else p.grad.clone() for p in pl_module.parameters()])


def test_each_submodule_keeps_its_own_mode_and_no_grad_is_touched(data, tmp_path):
    model = FrozenFeatures(size=data[0].shape[-1])
    feature_ids = {id(m) for m in model.features.modules()}
    expected = [id(m) not in feature_ids for m in model.modules()]
    before, after = GradProbe(), GradProbe()
    callback = ConfusedLogitCallback(top_k=2, logging_batch_interval=1, **ALWAYS)
    train, val = loaders(data, n_train=128)
    # accumulate_grad_batches=2: after odd batches the .grad fields hold the accumulated gradients
    run = trainer(
        tmp_path,
        [before, callback, after],
        False,
        limit_train_batches=4,
        limit_val_batches=1,
        accumulate_grad_batches=2,
    )
    run.fit(model, train, val)
    assert callback.state_dict()["pictures"]["train"] == 8
    assert model.seen_modes == [expected] * 4
    assert any(g is not None for grads in before.grads for g in grads)
    for grads_before, grads_after in zip(before.grads, after.grads, strict=True):
        for a, b in zip(grads_before, grads_after, strict=True):
            assert (a is None and b is None) or torch.equal(a, b)


# ----------------------------------------------------------------------------------------- the PNG fallback


@contextlib.contextmanager
def lightning_info():
    """The INFO records of Lightning's loggers (rank_zero_info), whether or not they propagate to root."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _pngs(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))


@pytest.mark.parametrize("kind", ["csv", "none"])
def test_png_fallback_without_an_image_logger(data, tmp_path, kind):
    callback = ConfusedLogitCallback(top_k=2, logging_batch_interval=2, track=1, **ALWAYS)
    logger = CSVLogger(tmp_path) if kind == "csv" else False
    train, val = loaders(data, n_train=128)
    run = trainer(tmp_path, [callback], logger, limit_train_batches=4)
    with lightning_info() as records:
        run.fit(tiny(data), train, val)
    said = [r.getMessage() for r in records if "no logger that takes images" in r.getMessage()]
    assert len(said) == 1

    run_dir = Path(logger.log_dir) if kind == "csv" else tmp_path
    assert _pngs(run_dir / "peering") == [
        "confused/step_2_0.png",
        "confused/step_2_1.png",
        "confused/step_4_0.png",
        "confused/step_4_1.png",
        "confused_pairs/step_4_0.png",
        "confused_pairs/step_4_1.png",
        "confused_pairs/step_4_2.png",
        "confusion_matrix/step_4_0.png",
        "tracked/0/step_4_0.png",
        "val/confused/step_4_0.png",
        "val/confused/step_4_1.png",
    ]
    for step, pngs in read_images(run_dir, "peering/confused"):  # the PNG folder: one file per sample
        records = records_at(run_dir, "peering/confused", step)
        assert step in (2, 4) and [png_size(p) for p in pngs] == [(r["width"], r["height"]) for r in records]
        assert len(pngs) == 2 and all(r["box"] is None for r in records)
    assert read_scalars(run_dir, "peering/confused_fraction") == [(2, 1.0), (4, 1.0)]
    assert image_tags(run_dir) == [
        "peering/confused",
        "peering/confused_pairs",
        "peering/confusion_matrix",
        "peering/tracked/0",
        "peering/val/confused",
    ]
    index = read_index(run_dir)
    assert [r["png"] for r in index[:2]] == ["peering/confused/step_2_0.png", "peering/confused/step_2_1.png"]
    if kind == "csv":  # the scalars also reach the CSV logger's metrics.csv
        with open(Path(logger.log_dir) / "metrics.csv") as f:
            rows = [r for r in csv.DictReader(f) if r.get("peering/confused_fraction")]
        assert [(int(r["step"]), float(r["peering/confused_fraction"])) for r in rows] == [(2, 1.0), (4, 1.0)]


class BrokenLogger(Logger):
    """A logger with an image API (W&B style) whose image service, and maybe metrics service, is down."""

    def __init__(self, root: Path, scalars_fail: bool):
        super().__init__()
        self._root, self.scalars_fail, self.calls = str(root), scalars_fail, 0

    @property
    def name(self):
        return "broken"

    @property
    def version(self):
        return 0

    @property
    def save_dir(self):
        return self._root

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        if self.scalars_fail and any(k.startswith("peering/") for k in metrics):
            raise ConnectionError("metrics service down")

    def log_image(self, key, images, step=None):
        self.calls += 1
        raise ConnectionError("image service down")


@pytest.mark.parametrize("scalars_fail", [False, True], ids=["images_fail", "images_and_scalars_fail"])
def test_failing_logger_warns_once_and_training_goes_on(data, tmp_path, scalars_fail):
    logger = BrokenLogger(tmp_path / "broken", scalars_fail)
    callback = ConfusedLogitCallback(top_k=2, logging_batch_interval=1, **ALWAYS)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt")
    train, val = loaders(data, n_train=128)
    run = trainer(tmp_path, [callback, checkpoints], logger, enable_checkpointing=True, limit_train_batches=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.fit(tiny(data), train, val)
    assert run.state.finished
    said = peering_warnings(caught)
    assert len(said) == 1, said
    assert "broken" in said[0].lower() or "BrokenLogger" in said[0]
    assert "service down" in said[0] and "Training goes on" in said[0]
    assert logger.calls <= 1  # not called again once it failed
    assert list((tmp_path / "ckpt").glob("*.ckpt"))
    # the pictures went to the PNG folder instead
    assert read_images(tmp_path / "broken", "peering/val/confused")
    assert len(read_images(tmp_path / "broken", "peering/confused")) >= 3


class RecordingImageLogger(BrokenLogger):
    def __init__(self, root):
        super().__init__(root, scalars_fail=False)
        self.images, self.scalars = [], []

    def log_metrics(self, metrics, step=None):
        self.scalars += [(k, step, v) for k, v in metrics.items() if k.startswith("peering/")]

    def log_image(self, key, images, step=None):
        self.images.append((key, step, [np.asarray(i).shape for i in images]))


def test_image_api_logger_gets_the_pictures(data, tmp_path):
    logger = RecordingImageLogger(tmp_path)
    assert [type(s).__name__ for s in image_sinks([logger])] == ["WandbSink"]
    callback = ConfusedLogitCallback(top_k=2, logging_batch_interval=2, **ALWAYS)
    train, val = loaders(data, n_train=128)
    trainer(tmp_path, [callback], logger, limit_train_batches=4).fit(tiny(data), train, val)
    shapes = []  # one picture per check and tag, its two panels stacked
    for tag, step in (("peering/confused", 2), ("peering/confused", 4), ("peering/val/confused", 4)):
        width, height = stacked_size(records_at(tmp_path, tag, step))
        shapes.append((tag, step, [(height, width, 3)]))
    assert [image for image in logger.images if image[0] not in ATLAS_TAGS] == shapes
    # the atlas: one matrix, and its pairs stacked into one picture (one card each in TensorBoard)
    atlas = [(key, step, len(shapes)) for key, step, shapes in logger.images if key in ATLAS_TAGS]
    assert atlas == [("peering/confusion_matrix", 4, 1), ("peering/confused_pairs", 4, 1)]
    assert len(records_at(tmp_path, "peering/confused_pairs", 4)) == 3
    assert [(k, s) for k, s, _ in logger.scalars] == [
        ("peering/confused_fraction", 2),
        ("peering/confused_fraction", 4),
        ("peering/val/confused_fraction", 4),
    ]
    assert not (tmp_path / "peering" / "confused").exists()  # no PNG fallback when a logger takes images


# ---------------------------------------------------------------------------------------------- resuming


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_state_dict_round_trip_and_resume(data, tmp_path):
    kwargs = {"top_k": 2, "logging_batch_interval": 2, "track": 2, **ALWAYS}
    train, val = loaders(data, n_train=128)
    first = ConfusedLogitCallback(**kwargs)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    run = trainer(
        tmp_path,
        [first, checkpoints],
        TensorBoardLogger(tmp_path),
        enable_checkpointing=True,
        limit_train_batches=4,
    )
    run.fit(tiny(data), train, val)
    state = first.state_dict()
    assert state["checks"]["train"] == 2 and state["pictures"]["train"] == 4 and state["tracking_chosen"]

    copy_ = ConfusedLogitCallback(**kwargs)
    copy_.load_state_dict(copy.deepcopy(state))
    again = copy_.state_dict()
    assert {k: v for k, v in again.items() if k != "tracked"} == {
        k: v for k, v in state.items() if k != "tracked"
    }
    for k in ("inputs", "labels", "classes", "margins"):
        assert torch.equal(again["tracked"][k], state["tracked"][k])
    assert again["tracked"]["kwargs"] == state["tracked"]["kwargs"] == {}
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["callbacks"][first.state_key]
    assert saved["pictures"] == state["pictures"]

    resumed = ConfusedLogitCallback(**kwargs)
    logger = TensorBoardLogger(tmp_path, version="resumed")
    again_checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt2")
    run = trainer(
        tmp_path,
        [resumed, again_checkpoints],
        logger,
        max_epochs=2,
        limit_train_batches=4,
        enable_checkpointing=True,
    )
    run.fit(tiny(data), train, val, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    after = resumed.state_dict()
    assert after["checks"] == {"train": 4, "validation": 2, "test": 0}
    assert after["pictures"] == {"train": 8, "validation": 4, "test": 0}
    assert after["tracked_pictures"] == 4  # 2 tracked x 2 validation runs, the same samples as before
    assert torch.equal(after["tracked"]["inputs"], state["tracked"]["inputs"])
    assert [s for s, _ in read_images(logger.log_dir, "peering/tracked/1")] == [8]
    assert [s for s, _ in read_images(logger.log_dir, "peering/confused")] == [6, 8]


# ------------------------------------------------------------------------------------------ batch shapes


def test_default_unpack_variants():
    x, y = torch.rand(4, 1, 8, 8), torch.arange(4)
    for batch in [
        (x, y),
        [x, y, "extra"],
        {"image": x, "label": y},
        {"input": x, "target": y},
        {"x": x, "y": y},
    ]:
        got_x, got_y, kwargs = default_unpack(batch)
        assert got_x is x and got_y is y and kwargs == {}
    assert default_unpack(x) == (x, None, {})
    assert default_unpack({"inputs": x})[1] is None
    # Hugging Face batches: input_ids (or pixel_values) in, labels out, every other tensor to the model
    ids, mask, types = (
        torch.ones(4, 6, dtype=torch.long),
        torch.ones(4, 6),
        torch.zeros(4, 6, dtype=torch.long),
    )
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": y, "text": "a"}
    got_ids, got_y, kwargs = default_unpack(batch)
    assert got_ids is ids and got_y is y
    assert kwargs.keys() == {"attention_mask", "token_type_ids"} and kwargs["attention_mask"] is mask
    got_x, got_y, _ = default_unpack({"pixel_values": x, "label": y})
    assert got_x is x and got_y is y
    with pytest.raises(TypeError, match="input keys"):
        default_unpack({"pixels": x})
    with pytest.raises(TypeError, match="cannot take inputs"):
        default_unpack(42)


class DictDigits(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i], "label": self.y[i], "id": i}


class DictNet(TinyNet):
    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["image"]), batch["label"])

    def validation_step(self, batch, batch_idx):
        pass


class Wrapped:
    def __init__(self, pixels, labels):
        self.pixels, self.labels = pixels, labels


class WrappedNet(TinyNet):
    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch.pixels), batch.labels)

    def validation_step(self, batch, batch_idx):
        pass

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch


def _wrap(items):
    return Wrapped(torch.stack([x for x, _ in items]), torch.stack([y for _, y in items]))


@pytest.mark.parametrize("kind", ["dict", "callable", "unknown"])
def test_unpack_in_a_real_run(data, tmp_path, kind):
    x, y = data[0][:64], data[1][:64]
    if kind == "dict":
        model, loader, unpack = DictNet(size=x.shape[-1]), DataLoader(DictDigits(x, y), batch_size=16), None
    else:
        model = WrappedNet(size=x.shape[-1])
        loader = DataLoader(TensorDataset(x, y), batch_size=16, collate_fn=_wrap)
        unpack = (lambda b: (b.pixels, b.labels)) if kind == "callable" else None
    callback = ConfusedLogitCallback(
        top_k=1, logging_batch_interval=1, unpack=unpack, background=False, **ALWAYS
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [callback], False).fit(model, loader, loader)
    said = peering_warnings(caught)
    if kind == "unknown":
        assert len(said) == 2 and all("unpack=" in s for s in said)  # once for train, once for validation
        assert callback.state_dict()["pictures"] == {"train": 0, "validation": 0, "test": 0}
        return
    assert said == []
    assert callback.state_dict()["pictures"] == {"train": 4, "validation": 1, "test": 0}
    assert {r["label"] for r in read_index(tmp_path) if r["tag"] not in ATLAS_TAGS} <= set(range(10))


def test_three_channel_and_flat_inputs(tmp_path):
    torch.manual_seed(0)
    rgb = TensorDataset(torch.rand(32, 3, 12, 12), torch.randint(0, 10, (32,)))
    callback = ConfusedLogitCallback(
        top_k=2, logging_batch_interval=1, on="train", background=False, **ALWAYS
    )
    trainer(tmp_path / "rgb", [callback], False, limit_train_batches=2).fit(
        TinyNet(channels=3, size=12), DataLoader(rgb, batch_size=16)
    )
    assert [s for s, _ in read_images(tmp_path / "rgb", "peering/confused")] == [1, 2]

    class Flat(TinyNet):
        def __init__(self):
            super().__init__()
            self.features = nn.Identity()
            self.head = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))

    flat = TensorDataset(torch.rand(32, 64), torch.randint(0, 10, (32,)))
    callback = ConfusedLogitCallback(
        top_k=2, logging_batch_interval=1, on="train", background=False, **ALWAYS
    )
    trainer(tmp_path / "flat", [callback], False, limit_train_batches=2).fit(
        Flat(), DataLoader(flat, batch_size=16)
    )
    pictures = read_images(tmp_path / "flat", "peering/confused")
    assert [len(p) for _, p in pictures] == [2, 2]
    assert png_size(pictures[0][1][0])[1] > 8 * 4  # a flat 64-vector is drawn as an 8x8 image


def _bar_pixels(png: bytes) -> int:
    from peering.render import features

    colours = features._lut_np()[[features._POSITIVE, features._NEGATIVE]]
    a = np.array(Image.open(io.BytesIO(png)).convert("RGB"))
    return int(sum((a == c).all(axis=2).sum() for c in colours))


def test_tabular_inputs_are_bar_charts_and_display_undoes_normalisation(tmp_path):
    class Table(TinyNet):
        def __init__(self, d: int):
            super().__init__()
            self.features = nn.Identity()
            self.head = nn.Sequential(nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, 10))

    torch.manual_seed(0)
    table = DataLoader(TensorDataset(torch.randn(32, 30), torch.randint(0, 10, (32,))), batch_size=16)
    names = [f"feature_{i}" for i in range(30)]

    def run(folder: str, data, model, **kwargs) -> list[bytes]:
        callback = ConfusedLogitCallback(
            top_k=2, logging_batch_interval=1, on="train", background=False, **ALWAYS, **kwargs
        )
        trainer(tmp_path / folder, [callback], False, limit_train_batches=1).fit(model, data)
        return read_images(tmp_path / folder, "peering/confused")[0][1]

    bars = run("bars", table, Table(30), feature_names=names)
    assert len(bars) == 2 and all(_bar_pixels(p) > 1000 for p in bars)  # 30 features: named bars
    strips = run("strip", table, Table(30), input_kind="image")  # forced: a 1 x 30 strip, as before
    assert all(_bar_pixels(p) < _bar_pixels(bars[0]) / 10 for p in strips)  # a map's few pixels of them
    assert png_size(strips[0])[1] < png_size(bars[0])[1] / 2

    x = torch.rand(32, 3, 12, 12)
    labels = torch.randint(0, 10, (32,))
    normalised = DataLoader(TensorDataset((x - 0.5) / 0.25, labels), batch_size=16)
    torch.manual_seed(1)
    shown = run("display", normalised, TinyNet(channels=3, size=12), display=(0.5, 0.25))
    torch.manual_seed(1)
    clamped = run("clamped", normalised, TinyNet(channels=3, size=12))
    # without display= the inputs in [-2, 2] are clamped and the panel says so in a note under it
    assert png_size(clamped[0])[1] > png_size(shown[0])[1]


# ------------------------------------------------------------------------------------ choosing the samples


class Scores(pl.LightningModule):
    """The inputs are the logits (two classes): the margin of each sample is known in advance."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return x + 0 * self.dummy

    def training_step(self, batch, batch_idx):
        return self(batch[0]).sum() * 0 + self.dummy.sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_the_most_confused_are_chosen_and_counted(tmp_path):
    top = torch.full((8,), 6.0)
    gaps = torch.tensor([3.0, 0.3, 0.05, 2.0, 0.01, 0.2, 0.08, 1.0])
    x = torch.stack([top, top - gaps], dim=1)
    ids = torch.arange(8)  # the "labels" say which sample each picture shows
    low = torch.tensor([[1.0, 0.98]])  # tied, but its top logit is under min_logit_value
    batch_x, batch_y = torch.cat([x, low]), torch.cat([ids, torch.tensor([8])])
    callback = ConfusedLogitCallback(
        top_k=3,
        logging_batch_interval=1,
        max_logit_difference=0.25,
        min_logit_value=5.0,
        on="train",
        background=False,
    )
    loader = DataLoader(TensorDataset(batch_x, batch_y), batch_size=9)
    trainer(tmp_path, [callback], False).fit(Scores(), loader)
    index = read_index(tmp_path)
    assert [r["label"] for r in index] == [4, 2, 6]  # the three smallest gaps, smallest first (not 2, 4, 5)
    assert [round(r["margin"], 4) for r in index] == [0.01, 0.05, 0.08]
    # 4 of the 9 samples are confused (gaps 0.05, 0.01, 0.2, 0.08; the low one is not a candidate)
    assert read_scalars(tmp_path, "peering/confused_fraction") == [(1, pytest.approx(4 / 9))]


# ------------------------------------------------------------------------------------------------ arguments


def test_bolts_positional_arguments():
    callback = ConfusedLogitCallback(2, 3, 5.0, 20, 0.1)
    assert (callback.top_k, callback.projection_factor, callback.min_logit_value) == (2, 3.0, 5.0)
    assert (callback.logging_batch_interval, callback.max_logit_difference) == (20, 0.1)
    assert ConfusedLogitCallback(on="val").on == ("validation",)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"top_k": 0},
        {"top_k": 1.5},
        {"projection_factor": float("nan")},
        {"logging_batch_interval": 0},
        {"max_logit_difference": -1.0},
        {"margin": "rank"},
        {"output": "softmax"},
        {"method": "lime"},
        {"method": "smoothgrad", "method_options": {"bogus": 1}},
        {"on": ("predict",)},
        {"on": ()},
        {"max_pictures_per_epoch": 0},
        {"track": -1},
        {"zoom": 0},
        {"display": "imagenet"},
        {"input_kind": "table"},
        {"feature_names": "age"},
        {"unpack": "x"},
        {"min_logit_value": float("nan")},
    ],
)
def test_bad_arguments_fail_at_construction(kwargs):
    with pytest.raises((ValueError, TypeError)):
        ConfusedLogitCallback(**kwargs)


# ------------------------------------------------------------------------------------- sinks and examples


def test_mlflow_before_2_12_gets_artifact_files():
    from peering.lightning.sinks import MLflowSink

    calls = []

    class OldClient:
        def log_image(self, run_id, image, artifact_file=None):
            calls.append((run_id, artifact_file, image.shape))

    class FakeMlflow:
        experiment, run_id = OldClient(), "run"

    picture = np.zeros((3, 5, 3), np.uint8)
    MLflowSink(FakeMlflow()).log_images("peering/confused", [picture, picture], [b"", b""], 12)
    assert calls == [
        ("run", "peering/confused/step_12_0.png", (3, 5, 3)),
        ("run", "peering/confused/step_12_1.png", (3, 5, 3)),
    ]


class EvalFails(TinyNet):
    def forward(self, x):
        if not self.training:
            raise RuntimeError("this model only runs in training mode")
        return super().forward(x)


class NoInputGradient(TinyNet):
    def forward(self, x):
        return super().forward(x.detach())  # logits work, input gradients cannot exist


@pytest.mark.parametrize("model_class", [EvalFails, NoInputGradient])
def test_a_model_the_callback_cannot_explain_warns_once_and_training_goes_on(data, tmp_path, model_class):
    callback = ConfusedLogitCallback(top_k=2, logging_batch_interval=1, on="train", **ALWAYS)
    x, y = data[0][:64], data[1][:64]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = trainer(tmp_path, [callback], False)
        run.fit(model_class(size=x.shape[-1]), DataLoader(TensorDataset(x, y), batch_size=16))
    assert run.state.finished and run.global_step == 4
    said = peering_warnings(caught)
    assert len(said) == 1 and "Training goes on" in said[0], said
    assert read_images(tmp_path, "peering/confused") == []
