"""Deletion and insertion curves: on the trained MNIST model, by hand, against a per-sample reference."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import peering
from peering.checks.faithfulness import DeletionInsertion, deletion_insertion, importance_ranks
from tests._state import assert_same_state, snapshot


@pytest.fixture(scope="module")
def mnist_digits(mnist_split):
    return mnist_split[2][:32]


# ------------------------------------------------------------------------------------------ on a real model


@pytest.mark.parametrize("method", ["gradient", peering.IntegratedGradients(steps=8)], ids=["gradient", "ig"])
def test_deleting_the_most_important_pixels_drops_the_probability_faster_than_random(
    trained_cnn, mnist_digits, method
):
    exp = peering.explain(trained_cnn, mnist_digits, top_k=1, method=method)
    r = deletion_insertion(trained_cnn, mnist_digits, exp, steps=10)
    assert torch.equal(r.targets, exp.targets[:, 0])
    assert r.fractions[0] == 0 and r.fractions[-1] == 1 and r.deletion.shape == (32, 11)
    # the curves start at the model's own probability and end at the baseline's (a blank image)
    probs = trained_cnn(mnist_digits).softmax(1).gather(1, exp.targets[:, :1])[:, 0]
    blank = trained_cnn(torch.zeros_like(mnist_digits)).softmax(1).gather(1, exp.targets[:, :1])[:, 0]
    assert_close(r.deletion[:, 0], probs)
    assert_close(r.deletion[:, -1], blank)
    assert_close(r.insertion[:, 0], blank)
    assert_close(r.insertion[:, -1], probs)
    summary = r.summary()
    assert summary["deletion"] < summary["random_deletion"] - 0.25
    assert summary["insertion"] > summary["random_insertion"] + 0.2
    # not only on average: for most digits
    assert (r.deletion_area < r.random_deletion_area).float().mean() > 0.9
    # after a tenth of the pixels chosen by the map the probability has fallen; chosen at random it has not
    tenth = int((r.fractions >= 0.1).nonzero()[0])
    assert r.deletion[:, tenth].mean() < 0.5 < r.random_deletion[:, tenth].mean()


def test_the_random_control_is_the_same_whatever_the_attribution(digits_cnn, digits_split):
    x = digits_split[2][:16]
    a = deletion_insertion(digits_cnn, x, torch.rand_like(x), target=3)
    b = deletion_insertion(digits_cnn, x, -x, target=3)
    assert torch.equal(a.random_deletion, b.random_deletion)
    assert torch.equal(a.random_insertion_area, b.random_insertion_area)


def test_the_users_model_is_untouched(digits_cnn, digits_split):
    model = copy.deepcopy(digits_cnn).train()
    model.dropout2.eval()
    model.fc2.weight.grad = torch.ones_like(model.fc2.weight)
    x = digits_split[2][:10]
    maps = torch.rand_like(x)
    before = snapshot(model)
    first = deletion_insertion(model, x, maps, steps=5)
    assert_same_state(before, model)
    # run in eval mode: dropout off, so the same call gives the same curves
    again = deletion_insertion(model, x, maps, steps=5)
    assert torch.equal(first.random_deletion, again.random_deletion)


# --------------------------------------------------------------------------------------------- exactness


def _linear(weights: list[list[float]]) -> nn.Linear:
    model = nn.Linear(len(weights[0]), len(weights), dtype=torch.float64)
    with torch.no_grad():
        model.weight.copy_(torch.tensor(weights, dtype=torch.float64))
        model.bias.zero_()
    return model


def test_curves_and_areas_reproduce_a_hand_computed_example():
    # score = 4 x0 + 3 x1 + 2 x2 + 1 x3 (class 0's logit); both samples all ones, the baseline 0
    model = _linear([[4.0, 3.0, 2.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    x = torch.ones(2, 4, dtype=torch.float64)
    attributions = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    # 3 steps over 4 elements: 0, 4/3, 8/3, 4 elements rounded to 0, 1, 3, 4; the x axis is the real
    # fraction perturbed, 0, 1/4, 3/4, 1, not the step number
    r = deletion_insertion(model, x, attributions, target=0, steps=3, output="logit", random_control=False)
    assert_close(r.fractions, torch.tensor([0.0, 0.25, 0.75, 1.0], dtype=torch.float64))
    # sample 0 deletes the heaviest first: 10 -> 6 -> 1 -> 0; sample 1 the lightest first: 10 -> 9 -> 4 -> 0
    assert_close(r.deletion, f64([[10, 6, 1, 0], [10, 9, 4, 0]]))
    assert_close(r.insertion, f64([[0, 4, 9, 10], [0, 1, 6, 10]]))
    # trapezoids, sample 0: 0.25 (10 + 6) / 2 + 0.5 (6 + 1) / 2 + 0.25 (1 + 0) / 2 = 2 + 1.75 + 0.125;
    # sample 1: 0.25 (10 + 9) / 2 + 0.5 (9 + 4) / 2 + 0.25 (4 + 0) / 2 = 2.375 + 3.25 + 0.5
    assert_close(r.deletion_area, f64([3.875, 6.125]))
    assert_close(r.insertion_area, f64([6.125, 3.875]))
    assert r.random_deletion is None and r.random_deletion_area is None
    assert "random_deletion" not in r.summary()


def f64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_baselines_by_hand():
    model = _linear([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    x = torch.tensor([[1.0, 2.0, 3.0, 6.0]], dtype=torch.float64)  # score 12, mean element 3
    ranks = torch.tensor([[4.0, 3.0, 2.0, 1.0]], dtype=torch.float64)

    def deletion(baseline):
        return deletion_insertion(model, x, ranks, target=0, steps=4, output="logit", baseline=baseline,
                                  random_control=False).deletion[0]

    assert_close(deletion("zero"), torch.tensor([12.0, 11.0, 9.0, 6.0, 0.0], dtype=torch.float64))
    assert_close(deletion("mean"), torch.tensor([12.0, 14.0, 15.0, 15.0, 12.0], dtype=torch.float64))
    assert_close(deletion(1.0), torch.tensor([12.0, 12.0, 11.0, 9.0, 4.0], dtype=torch.float64))
    baseline = torch.tensor([0.0, 0.0, 0.0, 10.0], dtype=torch.float64)
    assert_close(deletion(baseline), torch.tensor([12.0, 11.0, 9.0, 6.0, 10.0], dtype=torch.float64))


def test_blur_baseline():
    images = torch.zeros(2, 3, 9, 9)
    images[0] = 0.4  # a flat image stays flat
    images[1, :, 4, 4] = 1.0  # a point spreads out, keeping its mass away from the edges
    seen = {}

    class Probe(nn.Module):
        def forward(self, x):
            seen.setdefault("last", x.clone())
            seen["last"] = x.clone()
            return x.flatten(1)[:, :2]

    deletion_insertion(Probe(), images, torch.rand_like(images), target=0, steps=1, baseline="blur",
                       blur_sigma=1.0, random_control=False)
    blurred = seen["last"][2:]  # the last forward scores [originals, baselines]
    assert_close(blurred[0], images[0])
    assert blurred[1].max() < 0.2 and blurred[1, 0, 4, 4] == blurred[1].max()
    assert_close(blurred[1].sum(), images[1].sum(), rtol=1e-3, atol=0)


def test_batched_equals_a_per_sample_reference(digits_cnn, digits_split):
    x = digits_split[2][:9]
    generator = torch.Generator().manual_seed(1)
    maps = torch.randn(x.shape, generator=generator)  # no ties: one ranking, whatever breaks ties
    for baseline in ("zero", "mean", "blur"):
        r = deletion_insertion(digits_cnn, x, maps, steps=7, baseline=baseline, chunk_size=5)
        base = {"zero": torch.zeros_like(x), "mean": x.mean(dim=(2, 3), keepdim=True).expand_as(x)}.get(
            baseline
        )
        if base is None:  # blur: every sample's own baseline, read off the curve's end through the model
            base = _reference_blur(x, sigma=0.8)
        counts = torch.linspace(0, 64, 8).round().long()
        for i in range(len(x)):
            order = maps[i, 0].flatten().argsort(descending=True)
            target = int(digits_cnn(x[i : i + 1]).argmax())
            deletion, insertion = [], []
            for count in counts.tolist():
                mask = torch.zeros(64, dtype=torch.bool)
                mask[order[:count]] = True
                mask = mask.view(1, 8, 8)
                with torch.no_grad():
                    deleted = torch.where(mask, base[i], x[i])
                    inserted = torch.where(mask, x[i], base[i])
                    deletion.append(digits_cnn(deleted[None]).softmax(1)[0, target])
                    insertion.append(digits_cnn(inserted[None]).softmax(1)[0, target])
            assert_close(r.deletion[i], torch.stack(deletion))
            assert_close(r.insertion[i], torch.stack(insertion))
            assert_close(r.deletion_area[i], torch.trapezoid(torch.stack(deletion), counts / 64))
        # chunking changes no number (beyond the last bits of a convolution over another batch size)
        whole = deletion_insertion(digits_cnn, x, maps, steps=7, baseline=baseline, chunk_size=64)
        assert_close(whole.deletion, r.deletion)
        assert_close(whole.random_insertion, r.random_insertion)


def _reference_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur by an explicit weighted sum over every pixel (edges replicated), per image."""
    h, w = x.shape[2:]
    radius = max(1, int(torch.tensor(3 * sigma).ceil()))
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    weights = weights / weights.sum()
    out = torch.zeros_like(x)
    for dy, wy in zip(offsets.long().tolist(), weights, strict=True):
        for dx, wx in zip(offsets.long().tolist(), weights, strict=True):
            rows = (torch.arange(h) + dy).clamp(0, h - 1)
            cols = (torch.arange(w) + dx).clamp(0, w - 1)
            out += wy * wx * x[:, :, rows][:, :, :, cols]
    return out


def test_ties_are_broken_at_random_not_by_position():
    scores = torch.zeros(2000, 10)
    scores[:, 9] = 1.0
    ranks = importance_ranks(scores, generator=torch.Generator().manual_seed(0))
    assert (ranks[:, 9] == 0).all()
    first_among_ties = (ranks[:, :9] == 1).float().mean(dim=0)  # each of the 9 tied about 1/9 of the time
    assert_close(first_among_ties, torch.full((9,), 1 / 9), atol=0.03, rtol=0)


def test_flat_inputs_explanation_with_two_classes_and_more_steps_than_elements(digits_mlp, digits_split):
    x = digits_split[2][:6].flatten(1)
    exp = peering.explain(digits_mlp, x, top_k=2, method="input_x_gradient")
    r = deletion_insertion(digits_mlp, x, exp, steps=1000)
    assert isinstance(r, DeletionInsertion)
    assert torch.equal(r.targets, exp.targets[:, 0])  # the first explained class
    assert r.fractions.shape == (65,)  # every element one at a time
    assert_close(r.fractions, torch.arange(65) / 64)


def test_bad_inputs_give_clear_errors(digits_cnn, digits_split):
    x = digits_split[2][:4]
    maps = torch.rand_like(x)
    with pytest.raises(ValueError, match=r"inputs' shape \[4, 1, 8, 8\]"):
        deletion_insertion(digits_cnn, x, maps[:, :, :4])
    with pytest.raises(ValueError, match=r"NaN or Inf for samples \[2\]"):
        bad = maps.clone()
        bad[2, 0, 1, 1] = float("nan")
        deletion_insertion(digits_cnn, x, bad)
    with pytest.raises(ValueError, match="needs images"):
        deletion_insertion(lambda_model(), x.flatten(1), maps.flatten(1), baseline="blur")
    with pytest.raises(ValueError, match="baseline must be 'zero', 'blur', 'mean'"):
        deletion_insertion(digits_cnn, x, maps, baseline="black")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="broadcast"):
        deletion_insertion(digits_cnn, x, maps, baseline=torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="blur_sigma"):
        deletion_insertion(digits_cnn, x, maps, baseline="blur", blur_sigma=0.0)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        deletion_insertion(digits_cnn, x, maps, steps=0)
    with pytest.raises(ValueError, match="empty batch"):
        deletion_insertion(digits_cnn, x[:0], maps[:0])
    with pytest.raises(ValueError, match="one class per sample"):
        deletion_insertion(digits_cnn, x, maps, target=torch.zeros(4, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="outside"):
        deletion_insertion(digits_cnn, x, maps, target=12)
    with pytest.raises(TypeError, match="tensor .* or a peering Explanation"):
        deletion_insertion(digits_cnn, x, maps.numpy())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="uint8"):
        deletion_insertion(digits_cnn, (x * 255).to(torch.uint8), maps)
    with pytest.warns(RuntimeWarning, match="skipped 1 sample"):
        exp = peering.explain(digits_cnn, torch.cat([x[:2], torch.full_like(x[:1], float("nan"))]),
                              nonfinite="skip", top_k=1)
    with pytest.raises(ValueError, match=r"invalid \(skipped\) samples \[2\]"):
        deletion_insertion(digits_cnn, x[:3], exp)


def lambda_model() -> nn.Module:
    return nn.Linear(64, 10)
