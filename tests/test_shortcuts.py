"""`ShortcutAlarm` in real `Trainer` runs on MNIST: a white corner patch on every training 3 raises an alarm
naming class 3; the same training without the patch raises none and ends with the same weights as without
the callback; a probe the model does not take is one clear error before training; the statistics reach
the loggers.
"""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from peering.lightning import ShortcutAlarm
from peering.lightning.shortcut_stats import class_maps, quiet_patches, signal_region
from peering.models import DigitClassifier
from peering.runs import names, read_index

QUIET = {"enable_progress_bar": False, "enable_model_summary": False, "enable_checkpointing": False}
N_TRAIN = 3000


@pytest.fixture(scope="module")
def shortcut_data(mnist):
    """(train_x, train_y, val_x, val_y, probe): 3,000 training digits, 500 to validate, and a clean probe
    of 50 held-out digits per class (never seen in training)."""
    x, y = mnist
    held_x, held_y = x[8000:], y[8000:]
    idx = torch.cat([(held_y == c).nonzero().flatten()[:50] for c in range(10)])
    val = slice(N_TRAIN, N_TRAIN + 500)
    return x[:N_TRAIN], y[:N_TRAIN], x[val], y[val], (held_x[idx], held_y[idx])


def with_patch(x, y, cls=3, size=4):
    x = x.clone()
    x[y == cls, :, :size, :size] = 1.0
    return x


def fit(train_x, train_y, val, tmp_path, callbacks, epochs=3, logger=False):
    pl.seed_everything(3, verbose=False)
    model = DigitClassifier(lr=2e-3)
    train = DataLoader(TensorDataset(train_x, train_y), batch_size=64, shuffle=True)
    val_loader = DataLoader(TensorDataset(*val), batch_size=250)
    trainer = pl.Trainer(
        max_epochs=epochs,
        logger=logger,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        num_sanity_val_steps=0,
        deterministic=True,
        **QUIET,
    )
    trainer.fit(model, train, val_loader)
    return model


def test_quiet_patch_share_and_ratio():
    maps = torch.full((4, 8, 8), 1.0)
    maps[2, :2, :2] = 20.0  # class 2's evidence piles up in the top-left corner
    maps = maps / maps.sum((1, 2), keepdim=True)
    quiet = torch.zeros(8, 8, dtype=torch.bool)
    quiet[:3, :3] = True  # the corner is quiet; a 2x2 patch there holds 80 of class 2's 140
    shares, ratios, corners = quiet_patches(maps, quiet, 2)
    assert float(shares[2]) == pytest.approx(80 / 140) and corners[2].tolist() == [0, 0]
    assert torch.allclose(shares[[0, 1, 3]], torch.full((3,), 4 / 64))
    assert float(ratios[2]) == pytest.approx((80 / 140) / (4 / 64))  # over the median class's share
    # only quiet pixels count: with the first row not quiet, the best patch holds rows 1-2 (20 + 20 + 1 + 1)
    quiet[0] = False
    shares, _, corners = quiet_patches(maps, quiet, 2)
    assert float(shares[2]) == pytest.approx(42 / 140) and corners[2].tolist() == [1, 0]


def test_class_maps_and_signal_region():
    x = torch.zeros(6, 1, 6, 6)
    x[:, :, 2:4, 2:4] = torch.rand(6, 1, 2, 2) + 0.1
    assert signal_region(x, margin=0).sum() == 4 and signal_region(x, margin=1).sum() == 16
    maps, counts = class_maps(torch.randn(6, 1, 6, 6), torch.tensor([0, 0, 1, 1, 1, 2]), 4)
    assert counts.tolist() == [2, 3, 1, 0]
    assert torch.allclose(maps[:3].sum((1, 2)), torch.ones(3)) and torch.isnan(maps[3]).all()


def test_patch_on_threes_names_class_3_and_clean_training_raises_none(shortcut_data, tmp_path):
    train_x, train_y, val_x, val_y, probe = shortcut_data
    patched = ShortcutAlarm(probe)
    fit(with_patch(train_x, train_y), train_y, (val_x, val_y), tmp_path / "patch", [patched])
    assert patched.alarms, patched.history
    assert {a["class"] for a in patched.alarms} == {3}
    kinds = {a["kind"]: a for a in patched.alarms}
    assert set(kinds) == {"paint", "patch"}
    assert min(a["epoch"] for a in patched.alarms) <= 3  # within 3 epochs (counted from 1)
    paint, patch = kinds["paint"], kinds["patch"]
    # a patch painted over (part of) the top-left corner turns other digits into 3s
    assert paint["patch"][0] <= 3 and paint["patch"][1] <= 3 and paint["fooled"] > 0.3
    assert paint["sentence"].startswith("class 3: painting the 4x4 patch at rows 0-3")
    row, col = patch["patch"][:2]
    assert row <= 3 and col <= 3 and patch["share"] >= 0.015  # the window overlaps the mark (rows, cols 0-3)
    assert patch["sentence"].startswith("class 3: ") and "no signal" in patch["sentence"]
    assert patch["before"].shape == patch["after"].shape == (28, 28)
    assert not torch.equal(patch["before"], patch["after"])  # before training, and at the alarm
    # each alarm drawn once (no logger: the PNG folder), with its record in the picture index
    drawn = sorted((tmp_path / "patch" / names.SHORTCUT_ALARMS).glob("*.png"))
    records = [r for r in read_index(tmp_path / "patch") if r["tag"] == names.SHORTCUT_ALARMS]
    assert len(drawn) == len(records) == len(patched.alarms)
    assert [r["sentence"] for r in records] == [a["sentence"] for a in patched.alarms]

    clean = ShortcutAlarm(probe)
    fit(train_x, train_y, (val_x, val_y), tmp_path / "clean", [clean])
    assert clean.alarms == []
    assert len(clean.history) == 3
    assert max(max(h["quiet_share"]) for h in clean.history) < clean.min_share
    assert max(max(h["fooled"]) for h in clean.history) < 0.1  # measured: 0.057 (an alarm needs 0.2)


def test_weights_bit_identical_with_and_without(shortcut_data, tmp_path):
    train_x, train_y, val_x, val_y, probe = shortcut_data
    small = (train_x[:512], train_y[:512])
    without = fit(*small, (val_x[:100], val_y[:100]), tmp_path / "a", [], epochs=2)
    callback = ShortcutAlarm(probe)
    with_it = fit(*small, (val_x[:100], val_y[:100]), tmp_path / "b", [callback], epochs=2)
    assert len(callback.history) == 2
    for (name, a), b in zip(without.state_dict().items(), with_it.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_a_probe_the_model_does_not_take_is_one_error_before_training(shortcut_data, tmp_path):
    train_x, train_y, val_x, val_y, probe = shortcut_data
    callback = ShortcutAlarm((probe[0][:, :, :20, :20], probe[1]))  # cropped: 20x20, the model takes 28x28
    with pytest.raises(ValueError, match=r"probe inputs \(shape \[500, 1, 20, 20\].*do not fit the model"):
        fit(train_x[:64], train_y[:64], (val_x[:64], val_y[:64]), tmp_path, [callback], epochs=1)
    assert callback.history == []


def test_bad_probes_are_refused_at_once(shortcut_data):
    x, y = shortcut_data[4]
    with pytest.raises(TypeError, match="probe must be"):
        ShortcutAlarm(x)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="labels must be integer"):
        ShortcutAlarm((x, y.float()))
    with pytest.raises(TypeError, match="float images"):
        ShortcutAlarm((x.flatten(1), y))
    with pytest.raises(ValueError, match="min_share"):
        ShortcutAlarm((x, y), min_share=2.0)


def test_statistics_reach_the_loggers(shortcut_data, tmp_path):
    train_x, train_y, val_x, val_y, probe = shortcut_data
    logger = CSVLogger(tmp_path, name="run")
    callback = ShortcutAlarm(probe)
    fit(train_x[:256], train_y[:256], (val_x[:64], val_y[:64]), tmp_path, [callback], epochs=2, logger=logger)
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    logged = [r for r in rows if r.get("peering/shortcuts/quiet_share/3")]
    assert len(logged) == 2
    assert float(logged[-1]["peering/shortcuts/quiet_share/3"]) == pytest.approx(
        callback.history[-1]["quiet_share"][3], rel=1e-5
    )
    assert all(r.get("peering/shortcuts/ratio/3") for r in logged)
    assert all(r.get("peering/shortcuts/off_support/3") for r in logged)
    assert all(r.get("peering/shortcuts/stability/3") for r in logged[1:])
    # the report's "Shortcut alarms": no alarm, what was checked, and every class's share per epoch
    from peering.report import build_report

    page = build_report(logger.log_dir).read_text()
    assert 'id="shortcuts"' in page and "No alarm" in page and "<th>epoch 2</th>" in page


def test_images_with_signal_everywhere_say_so_once(shortcut_data, tmp_path):
    train_x, train_y, val_x, val_y, _ = shortcut_data
    noise = torch.rand(40, 1, 28, 28)
    callback = ShortcutAlarm((noise, torch.arange(40) % 10))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(train_x[:128], train_y[:128], (val_x[:64], val_y[:64]), tmp_path, [callback], epochs=2)
    assert len([w for w in caught if "finds no pixel where the probe" in str(w.message)]) == 1
    assert callback.alarms == []


@pytest.mark.slow
def test_ddp_rank_zero_alone_checks_and_writes(shortcut_data, tmp_path):
    """Two CPU processes (ddp_spawn, gloo): the probe is explained by global rank zero only, so each
    validation run writes one row per statistic (no logger: the PNG folder's scalars.csv)."""
    import torch.distributed

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    train_x, train_y, val_x, val_y, probe = shortcut_data
    trainer = pl.Trainer(
        strategy="ddp_spawn", accelerator="cpu", devices=2, max_epochs=2, logger=False,
        default_root_dir=tmp_path, callbacks=[ShortcutAlarm(probe)], num_sanity_val_steps=0, **QUIET,
    )
    trainer.fit(DigitClassifier(), DataLoader(TensorDataset(train_x[:256], train_y[:256]), batch_size=32),
                DataLoader(TensorDataset(val_x[:64], val_y[:64]), batch_size=32))
    rows = list(csv.DictReader(open(tmp_path / names.SCALARS_FILE)))
    tag = names.shortcut_tag("quiet_share", 3)
    assert len([r for r in rows if r["tag"] == tag]) == 2  # one per validation run, from one rank
