"""`ConfusedLogitCallback` on models people bring: a `torch.compile`d network (compiled whole, as a
submodule, and the LightningModule itself).

Each test records what the callback explained (a subclass of the callback keeps the samples and the
attributions) and checks it against `peering.explain` on an eager model with the same weights, so the
pictures rest on the eager model's numbers.
"""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from peering import explain
from peering.data import load_digits
from peering.lightning import ConfusedLogitCallback, read_images, read_index
from tests._close import assert_close

QUIET = {"enable_progress_bar": False, "enable_model_summary": False, "enable_checkpointing": False}
ALWAYS = {"max_logit_difference": 1e9, "min_logit_value": None}  # every sample counts as confused


def peering_warnings(records) -> list[str]:
    return [str(w.message) for w in records if "peering" in str(w.message)]


class Recording(ConfusedLogitCallback):
    """Keeps, for every explanation it makes, the samples, their forward arguments, the attributions and
    the module's weights at that moment (compiled wrappers' ``_orig_mod.`` prefixes removed)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls: list[dict] = []

    def _explain(self, pl_module, chosen):
        attributions, probs = super()._explain(pl_module, chosen)
        state = {k.replace("_orig_mod.", ""): v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.calls.append(
            {
                "inputs": chosen.inputs.clone(),
                "classes": chosen.classes.clone(),
                "attributions": attributions.detach().clone(),
                "probs": probs.detach().clone(),
                "state": state,
            }
        )
        return attributions, probs


# ---------------------------------------------------------------------------------------- compiled models


def batch_norm_cnn() -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(8 * 4 * 4, 10),
        )


class DigitNet(pl.LightningModule):
    """The batch-norm CNN on 8x8 digits; ``compiled``: "network" (``self.net`` compiled whole),
    "submodule" (its second convolution compiled) or "" (eager)."""

    def __init__(self, compiled: str = ""):
        super().__init__()
        net = batch_norm_cnn()
        if compiled == "network":
            net = torch.compile(net, backend="aot_eager")
        elif compiled == "submodule":
            net[4] = torch.compile(net[4], backend="aot_eager")
        self.net = net

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


@pytest.fixture(scope="module")
def digit_loaders():
    x, y = load_digits()
    train = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=16)
    val = DataLoader(TensorDataset(x[64:96], y[64:96]), batch_size=16)
    return train, val


@pytest.mark.slow
@pytest.mark.parametrize("compiled", ["network", "submodule", "lightning_module"])
def test_compiled_models_get_pictures_of_the_eager_numbers(digit_loaders, tmp_path, compiled):
    """Training through compiled graphs (aot_autograd, whose backward refuses a retained graph), the callback
    still draws, and what it explains (K=2 classes, top_k=6 samples a check) is the eager model's
    explanation with the weights of that moment."""
    train, val = digit_loaders
    module = DigitNet("" if compiled == "lightning_module" else compiled)
    fitted = torch.compile(module, backend="aot_eager") if compiled == "lightning_module" else module
    callback = Recording(top_k=6, logging_batch_interval=2, background=False, **ALWAYS)
    trainer = pl.Trainer(max_epochs=1, logger=False, default_root_dir=tmp_path, callbacks=[callback], **QUIET)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(fitted, train, val)
    assert peering_warnings(caught) == []
    state = callback.state_dict()
    assert state["pictures"] == {"train": 12, "validation": 6, "test": 0}  # checks at batches 1 and 3
    assert [len(pngs) for _, pngs in read_images(tmp_path, "peering/confused")] == [6, 6]
    assert len(read_index(tmp_path)) == 18

    eager = DigitNet()
    assert len(callback.calls) == 3
    for call in callback.calls:
        eager.load_state_dict(call["state"])
        ref = explain(eager, call["inputs"], call["classes"], output="logit")  # the callback's default
        assert ref.attributions.abs().amax() > 0
        assert_close(call["attributions"], ref.attributions)
        assert_close(call["probs"], ref.probabilities.gather(1, call["classes"]))
