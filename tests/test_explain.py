"""`explain` on real data: exact against a per-sample, per-class autograd reference, and meaningful."""

from __future__ import annotations

import copy

import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

import peering
from peering._model import transform
from tests._close import assert_close
from tests._state import assert_same_state, snapshot

OUTPUTS = ["probability", "log_probability", "logit"]


def reference(model, x, targets, output, points_fn=None, combine=None):
    """Per-sample, per-class torch.autograd.grad: the slow, obvious computation explain must equal."""
    model.eval()
    out = torch.empty((x.shape[0], targets.shape[1], *x.shape[1:]), dtype=x.dtype)
    for b in range(x.shape[0]):
        for k in range(targets.shape[1]):
            points = points_fn(b) if points_fn else x[b : b + 1]
            grads = []
            for p in points:
                xi = p.unsqueeze(0).clone().requires_grad_(True)
                q = transform(model(xi), output)[0, targets[b, k]]
                grads.append(torch.autograd.grad(q, xi)[0][0])
            g = torch.stack(grads).mean(0)
            out[b, k] = combine(b, g) if combine else g
    return out


@pytest.fixture(scope="module")
def cnn_batch(mnist_split):
    _, _, test_x, test_y = mnist_split
    return test_x[:12], test_y[:12]


@pytest.fixture(scope="module")
def flat_batch(digits_split):
    _, _, test_x, test_y = digits_split
    return test_x[:12].flatten(1), test_y[:12]


@pytest.fixture(params=["cnn", "mlp"])
def model_and_batch(request, trained_cnn, digits_mlp, cnn_batch, flat_batch):
    if request.param == "cnn":
        return trained_cnn, cnn_batch[0]
    return digits_mlp, flat_batch[0]


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("strategy", ["per_class", "vmap"])
def test_gradient_equals_per_sample_reference(model_and_batch, output, strategy):
    model, x = model_and_batch
    exp = peering.explain(model, x, top_k=3, output=output, grad_strategy=strategy, chunk_size=5)
    assert exp.attributions.shape == (x.shape[0], 3, *x.shape[1:])
    assert exp.targets.shape == (x.shape[0], 3)
    assert torch.equal(exp.targets, model(x).topk(3, dim=1).indices)
    ref = reference(model, x, exp.targets, output)
    assert_close(exp.attributions, ref)
    assert exp.attributions.abs().max() > 1e-4  # not trivially zero


def test_input_x_gradient_equals_reference(model_and_batch):
    model, x = model_and_batch
    targets = torch.stack([torch.arange(x.shape[0]) % 10, (torch.arange(x.shape[0]) + 3) % 10], dim=1)
    exp = peering.explain(model, x, targets, method="input_x_gradient", output="logit")
    ref = reference(model, x, targets, "logit", combine=lambda b, g: x[b] * g)
    assert torch.equal(exp.targets, targets)
    assert_close(exp.attributions, ref)


def test_integrated_gradients_equals_reference(model_and_batch):
    model, x = model_and_batch
    steps, baseline = 8, 0.1
    alphas = (torch.arange(steps) + 0.5) / steps
    exp = peering.explain(
        model, x, 4, method="integrated_gradients", steps=steps, baseline=baseline, chunk_size=16
    )
    ref = reference(
        model,
        x,
        exp.targets,
        "probability",
        points_fn=lambda b: baseline + alphas.view(-1, *[1] * (x.ndim - 1)) * (x[b] - baseline),
        combine=lambda b, g: (x[b] - baseline) * g,
    )
    assert_close(exp.attributions, ref)


def test_integrated_gradients_completeness(trained_cnn, cnn_batch):
    """IG's attributions add up to f(x) - f(baseline) (closely, with enough steps)."""
    x = cnn_batch[0][:6]
    exp = peering.explain(trained_cnn, x, None, top_k=1, method="integrated_gradients", steps=64,
                          output="logit")
    with torch.no_grad():
        gap = (trained_cnn(x) - trained_cnn(torch.zeros_like(x))).gather(1, exp.targets)[:, 0]
    total = exp.attributions.flatten(2).sum(-1)[:, 0]
    assert torch.allclose(total, gap, rtol=0.05, atol=0.05)


def test_smoothgrad_equals_reference_with_the_same_noise(model_and_batch):
    model, x = model_and_batch
    n, level, seed = 4, 0.2, 7
    gen = torch.Generator().manual_seed(seed)
    noise = torch.stack([torch.randn(x.shape, generator=gen) for _ in range(n)])
    flat = x.flatten(1)
    sigma = level * (flat.amax(1) - flat.amin(1))
    exp = peering.explain(model, x, 2, method="smoothgrad", n_samples=n, noise_level=level, seed=seed,
                          chunk_size=10_000)
    ref = reference(model, x, exp.targets, "probability",
                    points_fn=lambda b: x[b] + sigma[b] * noise[:, b])
    assert_close(exp.attributions, ref)
    # own generator: same seed, same result, whatever the chunking; another seed differs
    again = peering.explain(model, x, 2, method="smoothgrad", n_samples=n, noise_level=level, seed=seed,
                            chunk_size=3)
    other = peering.explain(model, x, 2, method="smoothgrad", n_samples=n, noise_level=level, seed=8)
    assert_close(again.attributions, exp.attributions)
    assert (other.attributions - exp.attributions).abs().max() > 1e-4


def test_smoothgrad_without_noise_is_the_gradient(trained_cnn, cnn_batch):
    x = cnn_batch[0]
    sg = peering.explain(trained_cnn, x, method="smoothgrad", noise_level=0.0, n_samples=3)
    g = peering.explain(trained_cnn, x)
    assert torch.equal(sg.targets, g.targets)
    assert_close(sg.attributions, g.attributions)


def test_probability_gradient_step_raises_that_probability(trained_cnn, mnist_split):
    """A small step along d p(k) / d x raises p(k), for the top class and for the runner-up."""
    x = mnist_split[2][:256]
    exp = peering.explain(trained_cnn, x, top_k=2)
    g = exp.attributions
    direction = g / g.flatten(2).norm(dim=2).clamp_min(1e-12)[..., None, None, None]
    with torch.no_grad():
        for k in range(2):
            stepped = trained_cnn(x + 0.05 * direction[:, k]).softmax(1).gather(1, exp.targets[:, k : k + 1])
            before = exp.probabilities.gather(1, exp.targets[:, k : k + 1])
            raised = (stepped > before)[:, 0].float().mean().item()
            assert raised >= 0.95, f"class rank {k}: p raised for only {raised:.1%}"


def spearman_per_sample(a, b):
    return torch.tensor([spearmanr(u.flatten(), v.flatten()).statistic for u, v in zip(a, b, strict=True)])


def test_trained_gradients_differ_from_random_init(trained_cnn, random_cnn, mnist_split):
    """The tutorial's check: before training the gradient is noise-like, unrelated to the trained one."""
    x, y = mnist_split[2][:64], mnist_split[3][:64]
    trained = peering.explain(trained_cnn, x, y).attributions[:, 0]
    random = peering.explain(random_cnn, x, y).attributions[:, 0]
    # the same model under a tiny perturbation: the statistic does detect agreement when it is there
    nudged = peering.explain(trained_cnn, x + 1e-4 * torch.randn(x.shape, generator=torch.Generator()
                                                                     .manual_seed(0)), y).attributions[:, 0]
    rho_random = spearman_per_sample(trained, random).mean().item()
    rho_self = spearman_per_sample(trained, nudged).mean().item()
    assert rho_self > 0.95
    assert rho_random < 0.3, f"trained and random-init gradients correlate: rho = {rho_random:.2f}"


def test_explains_three_channel_images():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    x = torch.rand(6, 3, 8, 8)
    exp = peering.explain(model, x, top_k=2)
    assert exp.attributions.shape == (6, 2, 3, 8, 8)
    ref = reference(model, x, exp.targets, "probability")
    assert_close(exp.attributions, ref)


def test_vmap_and_per_class_agree_for_many_classes(trained_cnn, cnn_batch):
    x = cnn_batch[0]
    auto = peering.explain(trained_cnn, x, top_k=6)  # auto -> vmap for K > 4
    loop = peering.explain(trained_cnn, x, top_k=6, grad_strategy="per_class")
    assert_close(auto.attributions, loop.attributions)


def test_chunking_does_not_change_the_result(trained_cnn, mnist_split):
    x = mnist_split[2][:70]
    whole = peering.explain(trained_cnn, x, chunk_size=1000)
    chunked = peering.explain(trained_cnn, x, chunk_size=16)
    assert torch.equal(whole.targets, chunked.targets)
    assert_close(whole.attributions, chunked.attributions)
    assert_close(whole.logits, chunked.logits)


# ---------- state is left as it was ----------


@pytest.fixture
def messy_model(trained_cnn):
    """A model in a state explain must not disturb: training mode, one submodule frozen in eval mode,
    a frozen layer, and leftover .grad fields."""
    model = copy.deepcopy(trained_cnn).train()
    children = list(model.children())
    children[0].eval()
    for p in children[0].parameters():
        p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    params[0].grad = torch.full_like(params[0], 0.5)
    return model


CHEAP_OPTIONS = {"gradient": {}, "smoothgrad": {"n_samples": 2}, "integrated_gradients": {"steps": 2}}


@pytest.mark.parametrize("method", sorted(CHEAP_OPTIONS))
@pytest.mark.parametrize("context", ["plain", "no_grad", "inference_mode"])
def test_explain_leaves_state_untouched(messy_model, cnn_batch, method, context):
    x = cnn_batch[0].clone()
    before = snapshot(messy_model)
    ctx = {"plain": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}
    with ctx[context]():
        exp = peering.explain(messy_model, x, method=method, **CHEAP_OPTIONS[method])
    assert_same_state(before, messy_model)
    assert not x.requires_grad and x.grad is None
    assert exp.attributions.abs().max() > 0
    # explained in eval mode: dropout off, so repeating gives the same answer (the same chunks, call after
    # call: the footprint is measured by a dry pass of one point, not by a first chunk of one)
    again = peering.explain(messy_model, x, exp.targets, method=method, **CHEAP_OPTIONS[method])
    assert torch.equal(exp.attributions, again.attributions)


def test_explain_keeps_requires_grad_of_inputs(trained_cnn, cnn_batch):
    x = cnn_batch[0].clone().requires_grad_(True)
    peering.explain(trained_cnn, x)
    assert x.requires_grad and x.grad is None


# ---------- bad input gets a clear error ----------


def test_integer_images_are_refused_with_a_hint(trained_cnn):
    x = (torch.rand(2, 1, 28, 28) * 255).to(torch.uint8)
    with pytest.raises(TypeError, match=r"floating-point.*float\(\) / 255"):
        peering.explain(trained_cnn, x)


def test_nan_inputs_are_refused_naming_the_samples(trained_cnn, cnn_batch):
    x = cnn_batch[0].clone()
    x[3, 0, 5, 5] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or Inf in 1 sample.*\[3\]"):
        peering.explain(trained_cnn, x)


@pytest.mark.parametrize("target", [10, -1, torch.tensor([0, 11] * 6)])
def test_target_out_of_range(trained_cnn, cnn_batch, target):
    with pytest.raises(ValueError, match=r"outside \[0, 9\].*10 classes"):
        peering.explain(trained_cnn, cnn_batch[0], target)


def test_float_target_and_bad_shapes(trained_cnn, cnn_batch):
    x = cnn_batch[0]
    with pytest.raises(TypeError, match="integer tensor"):
        peering.explain(trained_cnn, x, torch.zeros(12))
    with pytest.raises(ValueError, match=r"\[B\] or a \[B, K\] tensor with B = 12"):
        peering.explain(trained_cnn, x, torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError, match="top_k must be between 1 and the number of classes"):
        peering.explain(trained_cnn, x, top_k=11)
    with pytest.raises(ValueError, match="batch dimension"):
        peering.explain(trained_cnn, x[0, 0, 0])
    with pytest.raises(ValueError, match="unknown method 'saliency'"):
        peering.explain(trained_cnn, x, method="saliency")
    with pytest.raises(ValueError, match="output must be one of"):
        peering.explain(trained_cnn, x, output="softmax")


class ReturnsVector(nn.Module):
    def forward(self, x):
        return x.flatten(1).sum(1)


class ReturnsTuple(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(64, 10)

    def forward(self, x):
        return self.linear(x), x


def test_model_returning_a_vector_gets_a_clear_error():
    # the shapes are the chunk's: the first chunk holds one point (its memory is measured), or chunk_size
    with pytest.raises(ValueError, match=r"expected class scores of shape \[B, C\] = \[1, C\].*got \[1\]"):
        peering.explain(ReturnsVector(), torch.rand(3, 64))
    with pytest.raises(ValueError, match=r"expected class scores of shape \[B, C\] = \[3, C\].*got \[3\]"):
        peering.explain(ReturnsVector(), torch.rand(3, 64), chunk_size=8)


def test_model_returning_a_tuple_needs_output_fn():
    model, x = ReturnsTuple(), torch.rand(3, 64)
    with pytest.raises(TypeError, match=r"returned a tuple.*output_fn=lambda out: out\[0\]"):
        peering.explain(model, x)
    exp = peering.explain(model, x, output_fn=lambda out: out[0], output="logit", target=2)
    assert_close(exp.attributions[:, 0], model.linear.weight[2].expand(3, 64))


def test_nonfinite_skip_explains_the_rest(trained_cnn, cnn_batch):
    x = cnn_batch[0].clone()
    x[[1, 4]] = float("inf")
    with pytest.warns(RuntimeWarning, match="skipped 2 sample"):
        exp = peering.explain(trained_cnn, x, nonfinite="skip")
    clean = peering.explain(trained_cnn, cnn_batch[0])
    keep = torch.tensor([i not in (1, 4) for i in range(12)])
    assert exp.valid.tolist() == keep.tolist()
    assert (exp.targets[~keep] == -1).all() and exp.attributions[~keep].isnan().all()
    assert_close(exp.attributions[keep], clean.attributions[keep])


def test_empty_batch(trained_cnn):
    exp = peering.explain(trained_cnn, torch.rand(0, 1, 28, 28))
    assert exp.attributions.shape == (0, 2, 1, 28, 28) and exp.targets.shape == (0, 2)
    assert exp.logits.shape == (0, 10)


def test_smoothgrad_noise_does_not_depend_on_chunking():
    """Odd-sized inputs (35 numbers a set) grouped 1, 4 or 16 sets per forward pass: the same answer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.rand(7, 5)
    runs = [peering.explain(model, x, method="smoothgrad", n_samples=16, seed=3, chunk_size=c).attributions
            for c in (7, 28, 112)]
    assert_close(runs[1], runs[0])
    assert_close(runs[2], runs[0])
