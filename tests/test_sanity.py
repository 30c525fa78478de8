"""The model-parameter randomisation test on real trained models: curves, verdicts, an untouched model."""

from __future__ import annotations

import copy
import json
import threading

import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn
from torch.testing import assert_close

import peering
from peering.checks.sanity import SanityResult, randomisation_check, spearman
from tests._state import assert_same_state, snapshot


@pytest.fixture(scope="module")
def mnist_digits(mnist_split):
    """32 held-out MNIST digits."""
    return mnist_split[2][:32]


@pytest.fixture(scope="module")
def trained_gradient(trained_cnn, mnist_digits) -> SanityResult:
    return randomisation_check(trained_cnn, mnist_digits, methods=["gradient", "input_x_gradient"])


# ------------------------------------------------------------------------------------------------ spearman


def test_spearman_equals_scipy_with_and_without_ties():
    generator = torch.Generator().manual_seed(0)
    tied_a = torch.randint(0, 4, (40, 50), generator=generator).double()
    tied_b = torch.randint(0, 3, (40, 50), generator=generator).double() + 0.5 * tied_a
    smooth_a = torch.randn(40, 3, 5, 5, generator=generator)
    smooth_b = smooth_a + torch.randn(40, 3, 5, 5, generator=generator)
    for a, b in ((tied_a, tied_b), (smooth_a, smooth_b)):
        expected = [scipy.stats.spearmanr(a[i].flatten(), b[i].flatten()).statistic for i in range(len(a))]
        assert_close(spearman(a, b), torch.tensor(expected, dtype=torch.float64))


def test_spearman_of_a_constant_map_is_nan_not_a_number_made_up():
    result = spearman(torch.tensor([[1.0, 1.0, 1.0], [1.0, 2.0, 3.0]]), torch.tensor([[1.0, 2.0, 3.0]] * 2))
    assert torch.isnan(result[0]) and result[1] == 1.0


def test_spearman_bad_shapes():
    with pytest.raises(ValueError, match="same shape"):
        spearman(torch.rand(2, 3), torch.rand(2, 4))
    with pytest.raises(ValueError, match=r"batches \[B, \.\.\.\]"):
        spearman(torch.rand(3), torch.rand(3))


# ------------------------------------------------------------------------------------------ on real models


def test_gradient_decorrelates_on_the_trained_mnist_model(trained_gradient):
    r = trained_gradient
    assert r.layers == ("fc2", "fc1", "conv2", "conv1")  # output layer first
    curve = r.correlation["gradient"]
    assert curve.shape == (4,)
    # randomising the top layers leaves the maps' pattern; randomising the convolutions destroys it
    assert curve[0] > 0.6
    assert curve[-1] < 0.4 and curve[-1] < curve[0] - 0.3
    assert r.passed["gradient"] is True
    assert r.verdict("gradient").startswith("passes")
    # the end level is what two unrelated random models share, not more
    assert abs(r.final("gradient") - r.unrelated["gradient"]) < 0.1
    # signed maps lose their class direction as soon as the output layer is gone
    assert r.signed_correlation["gradient"].abs().max() < 0.2


def test_input_x_gradient_fails_because_its_maps_are_the_input(trained_gradient):
    r = trained_gradient
    assert r.correlation["input_x_gradient"].min() > 0.9
    assert r.passed["input_x_gradient"] is False
    assert r.verdict("input_x_gradient").startswith("fails")


def test_an_already_random_model_gives_correlations_near_zero(random_cnn, mnist_digits):
    r = randomisation_check(random_cnn, mnist_digits, methods=["gradient"])
    signed = r.signed_correlation["gradient"]
    assert signed[1:].abs().max() < 0.1  # below the output layer: unrelated maps
    assert abs(float(signed[-1])) < 0.1
    # absolute maps: no higher than two unrelated random models (border pixels get fewer paths whatever
    # the weights), and far from the trained model's 0.8
    assert r.correlation["gradient"].max() < r.unrelated["gradient"] + 0.1
    assert r.passed["gradient"] is True


def test_per_sample_correlations_and_example_maps(trained_gradient, trained_cnn, mnist_digits):
    r = trained_gradient
    assert r.sample_correlation["gradient"].shape == (4, 32)
    assert_close(r.sample_correlation["gradient"].nanmean(dim=1), r.correlation["gradient"])
    assert r.examples["gradient"].shape == (5, 4, 1, 28, 28)
    assert r.example_inputs.shape == (4, 1, 28, 28)
    # index 0 is the trained model's maps, for its own top-1 classes
    expected = peering.explain(trained_cnn, mnist_digits[:4], top_k=1).attributions[:, 0]
    assert_close(r.examples["gradient"][0], expected)
    assert torch.equal(r.targets, trained_cnn(mnist_digits).argmax(dim=1))
    # the last example maps are those whose correlation the last step reports
    last = spearman(r.examples["gradient"][-1].abs(), expected.abs())
    assert_close(last, r.sample_correlation["gradient"][-1, :4])


def test_the_users_model_is_untouched(digits_cnn, digits_split):
    model = copy.deepcopy(digits_cnn)
    model.train()
    model.dropout1.eval()  # a submodule the user froze
    model.fc1.weight.grad = torch.full_like(model.fc1.weight, 0.5)
    model.conv1.weight.requires_grad_(False)
    before = snapshot(model)
    randomisation_check(model, digits_split[2][:16], methods=["gradient", peering.SmoothGrad(n_samples=4)])
    assert_same_state(before, model)


def test_seeded_and_deterministic(digits_cnn, digits_split):
    x = digits_split[2][:8]
    a = randomisation_check(digits_cnn, x, methods=["gradient"], seed=3)
    b = randomisation_check(digits_cnn, x, methods=["gradient"], seed=3)
    c = randomisation_check(digits_cnn, x, methods=["gradient"], seed=4)
    assert torch.equal(a.sample_correlation["gradient"], b.sample_correlation["gradient"])
    assert not torch.equal(a.sample_correlation["gradient"], c.sample_correlation["gradient"])


def test_every_method_and_instances_with_options(digits_cnn, digits_split):
    x = digits_split[2][:12]
    r = randomisation_check(
        digits_cnn, x, target=digits_split[3][:12], methods=["gradient", peering.SmoothGrad(n_samples=4)],
        examples=2,
    )
    assert r.methods == ("gradient", "smoothgrad")
    assert torch.equal(r.targets, digits_split[3][:12])
    assert r.examples["smoothgrad"].shape == (5, 2, 1, 8, 8)
    data = json.loads(json.dumps(r.to_dict()))
    assert data["methods"]["smoothgrad"]["passed"] in (True, False)
    assert len(data["methods"]["gradient"]["correlation"]) == 4


def test_flat_model_and_layers_found_in_forward_order_not_registration_order(digits_mlp, digits_split):
    class HeadFirst(nn.Module):
        def __init__(self, body: nn.Module, head: nn.Module) -> None:
            super().__init__()
            self.head = head  # registered first, runs last
            self.body = body

        def forward(self, x):
            return self.head(self.body(x))

    model = HeadFirst(digits_mlp[:2], digits_mlp[2])
    r = randomisation_check(model, digits_split[2][:16].flatten(1), methods=["gradient"])
    assert r.layers == ("head", "body.0")
    assert r.passed["gradient"] is not None


def test_chosen_layers(digits_cnn, digits_split):
    r = randomisation_check(digits_cnn, digits_split[2][:8], methods=["gradient"], layers=["fc2", "fc1"])
    assert r.layers == ("fc2", "fc1") and r.correlation["gradient"].shape == (2,)


class _Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(64))

    def forward(self, x):
        return x * self.scale


def test_bad_inputs_give_clear_errors(digits_cnn, digits_split):
    x = digits_split[2][:4]
    with pytest.raises(ValueError, match="empty batch"):
        randomisation_check(digits_cnn, x[:0])
    with pytest.raises(ValueError, match="unknown method"):
        randomisation_check(digits_cnn, x, methods=["saliency"])
    with pytest.raises(ValueError, match="methods is empty"):
        randomisation_check(digits_cnn, x, methods=[])
    with pytest.raises(ValueError, match="different names"):
        randomisation_check(digits_cnn, x, methods=["gradient", "gradient"])
    with pytest.raises(ValueError, match="one class per sample"):
        randomisation_check(digits_cnn, x, target=torch.zeros(4, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="outside"):
        randomisation_check(digits_cnn, x, target=10)
    with pytest.raises(ValueError, match=r"'fc3' are not submodules.*'conv1'"):
        randomisation_check(digits_cnn, x, layers=["fc3"])
    with pytest.raises(ValueError, match="threshold"):
        randomisation_check(digits_cnn, x, threshold=2.0)
    with pytest.raises(TypeError, match="uint8"):
        randomisation_check(digits_cnn, (x * 255).to(torch.uint8))
    with pytest.raises(ValueError, match="NaN"):
        randomisation_check(digits_cnn, x.clone().fill_(float("nan")))
    scaled = nn.Sequential(nn.Flatten(), _Scale(), nn.Linear(64, 10))
    with pytest.raises(TypeError, match=r"cannot re-initialise 1 \(_Scale\).*layers=\["):
        randomisation_check(scaled, x)
    assert randomisation_check(scaled, x, methods=["gradient"], layers=["2"]).layers == ("2",)
    locked = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    locked.lock = threading.Lock()  # type: ignore[assignment]
    with pytest.raises(TypeError, match="cannot deep-copy"):
        randomisation_check(locked, x)


def test_undefined_correlations_are_left_out_with_a_warning():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        model[1].bias.fill_(-100.0)  # every ReLU dead: every gradient map is all zeros
    x = torch.rand(5, 4)
    with pytest.warns(RuntimeWarning, match="undefined"):
        r = randomisation_check(model, x, methods=["gradient"], layers=["3"])
    assert np.isnan(r.final("gradient"))
    assert r.passed["gradient"] is None and r.verdict("gradient").startswith("undecided")
