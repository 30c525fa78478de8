"""`morph` on real MNIST: it reaches the target, respects bounds and budgets, and disturbs nothing."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import peering
from tests._close import assert_close
from tests._state import assert_same_state, snapshot


@pytest.fixture(scope="module")
def morphed(trained_cnn, mnist_split):
    x, y = mnist_split[2][:256], mnist_split[3][:256]
    target = (y + 1) % 10
    return x, target, peering.morph(trained_cnn, x, target, steps=100)


def test_morph_reaches_label_plus_one_for_256_digits(trained_cnn, morphed):
    x, target, res = morphed
    rate = res.success.float().mean().item()
    assert rate >= 0.98, f"only {rate:.1%} reached their target"
    with torch.no_grad():
        assert_close(trained_cnn(res.inputs).softmax(1), res.probabilities)
    p_target = res.probabilities.gather(1, target[:, None])[:, 0]
    assert torch.equal((res.probabilities.argmax(1) == target) & (p_target >= 0.99), res.success)
    assert torch.equal(res.targets, target)


def test_morph_result_is_consistent(morphed):
    x, target, res = morphed
    assert res.frames.shape == (101, 256, 1, 28, 28)
    assert torch.equal(res.frame_steps, torch.arange(101))
    assert torch.equal(res.frames[0], x)
    assert torch.equal(res.frames[-1], res.inputs)
    assert_close(res.distance, (res.inputs - x).flatten(1).norm(dim=1))
    assert res.inputs.min() >= 0 and res.inputs.max() <= 1
    assert ((res.steps >= 1) == res.success).all()  # none started as its target
    # early stop: a sample stops moving at the step it first reached its target
    for b in torch.nonzero(res.success).flatten()[:20].tolist():
        s = int(res.steps[b])
        assert torch.equal(res.frames[s, b], res.inputs[b])
        assert not torch.equal(res.frames[s - 1, b], res.inputs[b])
    assert_close(res.probabilities, res.logits.softmax(1))


def test_morph_without_early_stop_goes_further(trained_cnn, mnist_split):
    x, y = mnist_split[2][:32], mnist_split[3][:32]
    target = (y + 1) % 10
    plain = {"confidence": None, "smoothing": 0}  # stop at the flip, as morph did before its priors
    stop = peering.morph(trained_cnn, x, target, steps=40, **plain)
    go_on = peering.morph(trained_cnn, x, target, steps=40, early_stop=False, **plain)
    early = stop.success & go_on.success & (stop.steps < 40)  # arrived with steps to spare
    assert early.sum() >= 25
    assert (go_on.distance[early] > stop.distance[early]).all()
    assert torch.equal(stop.steps, go_on.steps)  # the first arrival is the same step either way


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_budget_and_bounds_are_respected(trained_cnn, mnist_split, norm):
    x, y = mnist_split[2][:48], mnist_split[3][:48]
    budget = 1.0 if norm == "l2" else 0.05
    res = peering.morph(trained_cnn, x, (y + 5) % 10, steps=30, norm=norm, budget=budget, keep_every=10)
    delta = (res.frames - x.unsqueeze(0)).flatten(2)
    size = delta.norm(dim=2) if norm == "l2" else delta.abs().amax(dim=2)
    assert size.max() <= budget + 1e-5
    assert size.max() >= budget * 0.9  # the budget was the binding constraint for some
    assert res.frames.min() >= 0 and res.frames.max() <= 1
    assert torch.equal(res.frame_steps, torch.tensor([0, 10, 20, 30]))


def test_chunks_and_batch_are_independent(trained_cnn, mnist_split):
    x, y = mnist_split[2][:40], mnist_split[3][:40]
    a = peering.morph(trained_cnn, x, (y + 1) % 10, steps=20, chunk_size=64)
    b = peering.morph(trained_cnn, x, (y + 1) % 10, steps=20, chunk_size=7)
    one = peering.morph(trained_cnn, x[5:6], (y[5:6] + 1) % 10, steps=20)
    assert torch.equal(a.steps, b.steps)
    assert_close(a.inputs, b.inputs)
    assert_close(a.inputs[5], one.inputs[0])


def test_morph_leaves_state_untouched(trained_cnn, mnist_split):
    model = copy.deepcopy(trained_cnn).train()
    next(model.children()).eval()
    list(model.parameters())[-1].grad = torch.ones_like(list(model.parameters())[-1])
    before = snapshot(model)
    x = mnist_split[2][:8].clone().requires_grad_(True)
    with torch.no_grad():
        res = peering.morph(model, x, 3, steps=5)
    assert_same_state(before, model)
    assert x.requires_grad and x.grad is None
    assert res.inputs.requires_grad is False


def test_morph_bad_input(trained_cnn, mnist_split):
    x = mnist_split[2][:4]
    with pytest.raises(ValueError, match="outside"):
        peering.morph(trained_cnn, x, 12)
    with pytest.raises(ValueError, match="one target per sample"):
        peering.morph(trained_cnn, x, torch.zeros(4, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="inputs lie outside bounds"):
        peering.morph(trained_cnn, x * 3, 1)
    with pytest.raises(ValueError, match="norm must be"):
        peering.morph(trained_cnn, x, 1, norm="l1")
    with pytest.raises(TypeError, match="floating-point"):
        peering.morph(trained_cnn, (x * 255).to(torch.uint8), 1)
    with pytest.raises(ValueError, match="keep_every"):
        peering.morph(trained_cnn, x, 1, keep_every=0)


def test_per_feature_bounds_for_standardised_tables(digits_mlp, digits_split):
    """Standardised features each have their own valid range: bounds are tensors, one value per feature."""
    train_x, _, test_x, test_y = digits_split
    mean, std = train_x.flatten(1).mean(0), train_x.flatten(1).std(0).clamp_min(0.05)
    model = nn.Sequential(Affine(std, mean), digits_mlp)  # takes standardised features
    z = (test_x[:16].flatten(1) - mean) / std
    lo, hi = (0 - mean) / std, (1 - mean) / std
    res = peering.morph(model, z, (test_y[:16] + 1) % 10, bounds=(lo, hi), steps=60)
    assert res.success.float().mean() >= 0.9
    assert (res.inputs >= lo).all() and (res.inputs <= hi).all()
    assert ((res.inputs == lo) | (res.inputs == hi)).any()  # the ranges were reached, and held
    assert peering.morph(model, z, 1, bounds=(lo.min().item(), hi), steps=2).inputs.shape == z.shape
    with pytest.raises(ValueError, match="do not broadcast to one sample"):
        peering.morph(model, z, 1, bounds=(lo[:10], hi))
    with pytest.raises(ValueError, match="low < high"):
        peering.morph(model, z, 1, bounds=(hi, lo))
    with pytest.raises(ValueError, match=r"outside bounds in 16 sample\(s\)"):
        peering.morph(model, z, 1, bounds=(lo + 10, hi + 20))
    with pytest.raises(TypeError, match="pair of numbers or of tensors"):
        peering.morph(model, z, 1, bounds=(0.0,))


class Affine(nn.Module):
    def __init__(self, scale, shift):
        super().__init__()
        self.scale, self.shift = scale, shift

    def forward(self, z):
        return z * self.scale + self.shift


# ---------- the stopping rule, smoothing, ensembles ----------


def test_confidence_stops_each_sample_at_the_first_confident_step(trained_cnn, mnist_split):
    x, y = mnist_split[2][:24], mnist_split[3][:24]
    target = (y + 1) % 10
    res = peering.morph(trained_cnn, x, target, confidence=0.9, steps=100)
    assert res.success.all() and res.confidence == 0.9
    with torch.no_grad():
        probs = torch.stack([trained_cnn(f).softmax(1) for f in res.frames])  # [F, B, C]
    p_target = probs.gather(2, target.view(1, -1, 1).expand(len(probs), -1, 1))[..., 0]
    rows = torch.arange(24)
    assert (p_target[res.steps, rows] >= 0.9).all()
    assert (p_target[res.steps - 1, rows] < 0.9).all()
    assert_close(res.probabilities, probs[-1])
    flip = peering.morph(trained_cnn, x, target, confidence=None, steps=100)
    assert (flip.steps <= res.steps).all() and (flip.steps < res.steps).float().mean() > 0.5
    assert (flip.distance < res.distance + 1e-5).all()


def test_default_is_confident_and_smooth(trained_cnn, mnist_split):
    x, y = mnist_split[2][:16], mnist_split[3][:16]
    res = peering.morph(trained_cnn, x, (y + 1) % 10)
    assert res.confidence == 0.99
    assert (res.probabilities[res.success, :].gather(1, res.targets[res.success, None]) >= 0.99).all()
    sharp = peering.morph(trained_cnn, x, (y + 1) % 10, smoothing=0)
    # a blurred step has less high-frequency energy than a plain one
    def roughness(change):
        return (change.diff(dim=3).pow(2).sum((1, 2, 3)) / change.pow(2).sum((1, 2, 3))).mean()

    assert roughness(res.inputs - x) < 0.7 * roughness(sharp.inputs - x)


def test_an_ensemble_of_one_model_twice_is_that_model(trained_cnn, mnist_split):
    x, y = mnist_split[2][:8], mnist_split[3][:8]
    one = peering.morph(trained_cnn, x, (y + 3) % 10, steps=30)
    twice = peering.morph([trained_cnn, trained_cnn], x, (y + 3) % 10, steps=30)
    assert_close(twice.inputs, one.inputs)
    assert_close(twice.probabilities, one.probabilities)


def test_unreached_morphs_say_why(trained_cnn, mnist_split):
    x, y = mnist_split[2][:4], mnist_split[3][:4]
    with pytest.warns(UserWarning, match=r"4 of 4 morphs did not reach their target with probability >= 0.99 "
                                          r"within 2 steps.*more steps, a lower confidence"):
        res = peering.morph(trained_cnn, x, (y + 1) % 10, steps=2)
    assert not res.success.any() and (res.steps == -1).all()


def test_morph_refuses_bad_options(trained_cnn, mnist_split, digits_mlp):
    x = mnist_split[2][:4]
    for bad in (0.0, 1.0, 1.5, True):
        with pytest.raises(ValueError, match="confidence must be a probability"):
            peering.morph(trained_cnn, x, 1, confidence=bad)
    with pytest.raises(ValueError, match="smoothing must be"):
        peering.morph(trained_cnn, x, 1, smoothing=-1)
    with pytest.raises(ValueError, match=r"smoothing blurs images \[B, C, H, W\].*smoothing=0"):
        peering.morph(digits_mlp, torch.rand(4, 64), 1, smoothing=1.0)
    assert peering.morph(digits_mlp, torch.rand(4, 64), 1, steps=3, confidence=None).inputs.shape == (4, 64)
    with pytest.raises(TypeError, match="prior must be a peering.priors.Prior"):
        peering.morph(trained_cnn, x, 1, prior="prototypes")
    with pytest.raises(TypeError, match="non-empty list"):
        peering.morph([], x, 1)
    five = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 5))
    with pytest.raises(ValueError, match="same classes"):
        peering.morph([trained_cnn, five], x, 1)
