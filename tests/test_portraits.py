"""`portraits` on real MNIST: one batch for all classes, and judges call each portrait its class."""

from __future__ import annotations

import pytest
import torch

import peering
from peering.morph.priors import Prototypes
from tests._close import assert_close


@pytest.mark.slow
def test_portraits_of_every_class_in_one_batch_convince_the_judges(trained_cnn, mnist_judges, mnist_split):
    train_x, train_y = mnist_split[0], mnist_split[1]
    start = train_x.mean(0, keepdim=True)
    prior = Prototypes(train_x, train_y)
    calls = []
    hook = trained_cnn.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    try:
        res = peering.portraits(trained_cnn, start, prior=prior)
    finally:
        hook.remove()
    assert res.inputs.shape == (10, 1, 28, 28) and res.targets.tolist() == list(range(10))
    assert max(calls) == 10  # all ten classes went through the model together
    assert res.success.all()
    assert torch.equal(res.frames[0], start.expand(10, -1, -1, -1))
    check = peering.agreement(res, mnist_judges)
    assert (check.morphs >= 0.9).all(), str(check)
    three = peering.portraits(trained_cnn, start, classes=[3], prior=prior)
    assert_close(three.inputs[0], res.inputs[3])


def test_portraits_refuse_a_batch_as_start(digits_cnn, digits):
    x, _ = digits
    with pytest.raises(ValueError, match="batch dimension of 1"):
        peering.portraits(digits_cnn, x[:2])
    with pytest.raises(TypeError, match="integer tensor"):
        peering.portraits(digits_cnn, x[:1], classes=[0.5])
    res = peering.portraits(digits_cnn, x[:1], classes=torch.tensor([2, 7]), steps=5, confidence=None)
    assert res.targets.tolist() == [2, 7]
