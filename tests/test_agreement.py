"""`agreement` on real MNIST: judges trained apart from the morphed digits believe the default morph with
a data prior, not plain ascent, and not noise of the same size."""

from __future__ import annotations

import copy

import pytest
import torch

import peering
from peering.checks.agreement import noise_like
from peering.morph.priors import Prototypes
from tests._close import assert_close
from tests._state import assert_same_state, snapshot


@pytest.fixture(scope="module")
def held_out(mnist_split):
    x, y = mnist_split[2][:64], mnist_split[3][:64]
    return x, (y + 1) % 10


@pytest.mark.slow
def test_judges_believe_the_default_morph_with_prototypes(trained_cnn, mnist_judges, mnist_split, held_out):
    """The figures for 256 digits are benchmarks/bench_morph_judges.py's; here 64 digits show that the prior
    is what makes the difference (Prototypes goes on until the morph is well nearer the target's images:
    on this one-epoch CNN, L2 7.2 and both judges 100%)."""
    train_x, train_y = mnist_split[0], mnist_split[1]
    x, target = held_out
    res = peering.morph(trained_cnn, x, target, prior=Prototypes(train_x, train_y))
    assert res.success.float().mean() >= 0.95
    assert res.distance.mean() <= 7.8
    check = peering.agreement(res, mnist_judges)
    assert check.names == ("mlp", "lenet")
    assert (check.morphs >= 0.9).all(), str(check)
    assert (check.noise <= 0.1).all() and (check.originals <= 0.05).all(), str(check)
    plain = peering.morph(trained_cnn, x, target, confidence=None, smoothing=0)
    assert (peering.agreement(plain, mnist_judges).morphs <= 0.35).all()


def test_agreement_counts_what_each_judge_says(trained_cnn, mnist_judges, held_out):
    x, target = held_out
    res = peering.morph(trained_cnn, x[:32], target[:32], confidence=0.9)
    lenet = copy.deepcopy(mnist_judges["lenet"]).train()  # a judge left in train mode (batch norm, dropout)
    before = snapshot(lenet)
    check = peering.agreement(res, [trained_cnn, lenet], chunk_size=7)
    assert_same_state(before, lenet)
    assert check.names == ("DigitCNN", "DigitLeNet")
    assert check.calls.shape == check.noise_calls.shape == (2, 32)
    # the morphed model as its own judge agrees with every morph that arrived (a check that proves nothing)
    assert check.morphs[0] == 1.0 and torch.equal(check.calls[0], res.success)
    with torch.no_grad():
        own = mnist_judges["lenet"](res.inputs).argmax(1) == target[:32]
    assert torch.equal(check.calls[1], own)
    assert_close(check.morphs[1], (own & res.success).sum() / res.success.sum())
    assert_close(check.noise_distance, res.distance, rtol=1e-3)
    assert "DigitLeNet" in str(check)


def test_noise_like_keeps_the_size_inside_the_bounds(mnist_split):
    x = mnist_split[2][:16]
    want = torch.linspace(0.5, 8.0, 16)
    noisy, reached = noise_like(x, want, seed=3)
    assert noisy.min() >= 0 and noisy.max() <= 1
    assert_close(reached, want, rtol=1e-3)
    assert_close((noisy - x).flatten(1).norm(dim=1), reached)
    again, _ = noise_like(x, want, seed=3)
    assert torch.equal(noisy, again)
    free, reached_free = noise_like(x, want, bounds=None)
    assert_close(reached_free, want)
    with pytest.raises(ValueError, match="distance must be"):
        noise_like(x, want[:3])


def test_agreement_refuses_what_it_cannot_judge(trained_cnn, mnist_judges, held_out):
    x, target = held_out
    with pytest.warns(UserWarning, match="did not reach"):
        nothing = peering.morph(trained_cnn, x[:4], target[:4], steps=1)
    with pytest.raises(ValueError, match="nothing for the judges to agree with"):
        peering.agreement(nothing, mnist_judges)
    res = peering.morph(trained_cnn, x[:4], target[:4], confidence=None)
    with pytest.raises(TypeError, match="MorphResult"):
        peering.agreement(res.inputs, mnist_judges)
    with pytest.raises(TypeError, match="judges must be"):
        peering.agreement(res, "mlp")
    with pytest.raises(TypeError, match="judges must be"):
        peering.agreement(res, [])
