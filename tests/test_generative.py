"""`peering.priors.LatentShift` and its autoencoder: morphs walk the latent space, batched, state
untouched."""

from __future__ import annotations

import pytest
import torch

import peering
from peering.priors import Autoencoder, LatentShift, train_autoencoder
from tests._close import assert_close


@pytest.fixture(scope="module")
def autoencoder(digits_split, tmp_path_factory):
    train_x = digits_split[0]
    return train_autoencoder(train_x, latent=8, epochs=30, progress=False,
                             cache_dir=tmp_path_factory.mktemp("ae"))


def test_autoencoder_reconstructs_and_is_cached(digits_split, autoencoder, tmp_path):
    train_x, _, test_x, _ = digits_split
    with torch.no_grad():
        error = (autoencoder(test_x) - test_x).flatten(1).norm(dim=1).mean()
        codes = autoencoder.encode(train_x)
    baseline = (train_x.mean(0, keepdim=True) - test_x).flatten(1).norm(dim=1).mean()
    assert error < 0.6 * baseline  # far better than the mean image
    assert abs(float(codes.mean())) < 0.05 and abs(float(codes.std()) - 1) < 0.05  # standardised codes
    first = train_autoencoder(train_x[:200], latent=4, epochs=1, progress=False, cache_dir=tmp_path)
    files = list(tmp_path.glob("autoencoder-*.pt"))
    assert len(files) == 1
    again = train_autoencoder(train_x[:200], latent=4, epochs=1, progress=False, cache_dir=tmp_path)
    for a, b in zip(first.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    odd = Autoencoder(3, 10, 13, latent=5).eval()
    assert odd.decode(odd.encode(torch.rand(2, 3, 10, 13))).shape == (2, 3, 10, 13)


def test_latent_morphs_start_at_the_original_and_reach_the_target(digits_cnn, digits_split, autoencoder):
    train_x, train_y, test_x, test_y = digits_split
    x, target = test_x[:32], (test_y[:32] + 1) % 10
    prior = LatentShift(autoencoder, train_x, train_y)
    res = peering.morph(digits_cnn, x, target, prior=prior, steps=100)
    assert torch.equal(res.frames[0], x)
    assert res.success.float().mean() >= 0.9
    assert res.inputs.min() >= 0 and res.inputs.max() <= 1
    with torch.no_grad():
        assert_close(digits_cnn(res.inputs).softmax(1), res.probabilities)
    # the same whatever the chunking
    other = peering.morph(digits_cnn, x, target, prior=prior, steps=100, chunk_size=5)
    assert torch.equal(res.steps, other.steps)
    assert_close(res.inputs, other.inputs)


def test_latent_morph_leaves_the_autoencoder_as_it_was(digits_cnn, digits_split, autoencoder):
    _, _, test_x, test_y = digits_split
    autoencoder.train()
    try:
        before = {k: v.clone() for k, v in autoencoder.state_dict().items()}
        with torch.no_grad():
            peering.morph(digits_cnn, test_x[:4], 1, prior=LatentShift(autoencoder), steps=3)
        assert autoencoder.training and all(m.training for m in autoencoder.modules())
        for k, v in autoencoder.state_dict().items():
            assert torch.equal(v, before[k])
        assert all(p.grad is None for p in autoencoder.parameters())
    finally:
        autoencoder.eval()


def test_latent_shift_refuses_what_it_cannot_do(digits_split, autoencoder, digits_cnn):
    train_x, train_y, test_x, _ = digits_split
    with pytest.raises(TypeError, match="encode"):
        LatentShift(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="both images and labels"):
        LatentShift(autoencoder, train_x)
    with pytest.raises(ValueError, match="step must be"):
        LatentShift(autoencoder, step=0)
    with pytest.raises(ValueError, match="at most one generative prior"):
        peering.morph(digits_cnn, test_x[:2], 1, prior=[LatentShift(autoencoder), LatentShift(autoencoder)])
    with pytest.raises(TypeError, match=r"images \[N, C, H, W\]"):
        train_autoencoder(train_x.flatten(1))
