"""Attribution methods: one class per algorithm, all built on the class-gradient engine
(`peering.attribution.engine.ClassGradients`).

Every method answers the same question for a batch of inputs ``x`` [B, ...] and classes ``targets``
[B, K]: how does the chosen output (probability, log-probability or logit) of each class respond to the
input? They differ only in where the gradient is evaluated and how the gradients are combined:

- `Gradient`: d out_k / d x at x.
- `InputXGradient`: x * d out_k / d x.
- `SmoothGrad`: the mean gradient at ``n_samples`` noisy copies of x (its own seeded generator).
- `IntegratedGradients`: (x - baseline) times the mean gradient along the straight path from the
  baseline to x (midpoint rule with ``steps`` points).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from peering.attribution.engine import ClassGradients, top_classes
from peering.errors import PeeringTypeError, PeeringValueError

__all__ = [
    "AttributionMethod",
    "Gradient",
    "InputXGradient",
    "IntegratedGradients",
    "METHODS",
    "SmoothGrad",
    "make_method",
]

class AttributionMethod:
    """Base class: an attribution method maps (inputs [B, ...], targets [B, K]) to attributions [B, K, ...].

    Subclasses set `name` and implement `attribute`, which returns the attributions, the class scores at
    the inputs [B, C] and the targets [B, K]. ``targets`` may be an int K, meaning each sample's own top-K
    classes. Use them through `peering.explain(method=...)`, or pass an instance as ``method``.

    >>> import torch, peering
    >>> class GradientSquared(AttributionMethod):
    ...     name = "gradient_squared"
    ...     def attribute(self, gradients, inputs, targets):
    ...         grads, scores, targets = gradients(inputs, targets)
    ...         return grads.square(), scores, targets
    >>> exp = peering.explain(torch.nn.Linear(4, 3), torch.rand(2, 4), method=GradientSquared())
    >>> exp.method, bool((exp.attributions >= 0).all())
    ('gradient_squared', True)
    """

    name: ClassVar[str] = ""

    def attribute(
        self, gradients: ClassGradients, inputs: Tensor, targets: Tensor | int
    ) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class Gradient(AttributionMethod):
    """The input gradient of each class's output (saliency, signed).

    >>> import torch, peering
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    >>> peering.explain(model, torch.rand(2, 4), method=Gradient()).attributions.shape
    torch.Size([2, 2, 4])
    """

    name = "gradient"

    def attribute(
        self, gradients: ClassGradients, inputs: Tensor, targets: Tensor | int
    ) -> tuple[Tensor, Tensor, Tensor]:
        return gradients(inputs, targets)


class InputXGradient(AttributionMethod):
    """The input times its gradient, element-wise.

    >>> import torch, peering
    >>> model = torch.nn.Linear(4, 3)
    >>> x = torch.rand(2, 4)
    >>> exp = peering.explain(model, x, target=0, output="logit", method="input_x_gradient")
    >>> torch.allclose(exp.attributions[:, 0], x * model.weight[0])
    True
    """

    name = "input_x_gradient"

    def attribute(
        self, gradients: ClassGradients, inputs: Tensor, targets: Tensor | int
    ) -> tuple[Tensor, Tensor, Tensor]:
        grads, scores, targets = gradients(inputs, targets)
        return grads * inputs.unsqueeze(1), scores, targets


def _scores_and_targets(
    gradients: ClassGradients, inputs: Tensor, targets: Tensor | int
) -> tuple[Tensor, Tensor]:
    """Class scores at the inputs (one no-grad forward, chunked) and the resolved targets."""
    scores = gradients.scores(inputs)
    if isinstance(targets, int):
        targets = top_classes(scores, targets)
    return scores.detach(), targets


def _mean_gradient(
    gradients: ClassGradients,
    inputs: Tensor,
    targets: Tensor,
    count: int,
    points: Callable[[range], Tensor],
) -> Tensor:
    """The mean of the K class gradients over ``count`` sets of points, one set of B points each.

    ``points(sets)`` returns the sets numbered in ``sets`` (consecutive, each asked for once, in order),
    stacked: [len(sets), B, ...]. The count * B points are laid out set after set and cut into the
    engine's chunks, which may start or end inside a set; only the sets a chunk touches are made, so
    memory does not grow with ``count``. Each point's gradients are those of its sample's targets, added
    into the sample's sum in order (deterministic, no atomics).
    """
    b, k = inputs.shape[0], targets.shape[1]
    total = inputs.new_zeros((b, k, *inputs.shape[1:]))
    if b == 0:
        return total
    n = count * b
    made_from, made = 0, inputs.new_empty((0, *inputs.shape))  # the sets [made_from, made_from + len)
    for start, stop in gradients.spans(inputs, k, kept=2 * total.nbytes, count=n):
        first, last = start // b, -(-stop // b)
        made_to = made_from + made.shape[0]
        if last > made_to:
            new = points(range(made_to, last))
            made = torch.cat([made[first - made_from :], new]) if first < made_to else new
            made_from = first
        flat = made.flatten(0, 1)[start - made_from * b : stop - made_from * b]
        g = flat.new_empty((stop - start, k, *inputs.shape[1:]))
        samples = torch.arange(start, stop, device=targets.device) % b
        gradients.chunk(flat, gradients.rows(start, stop, n), targets[samples], g)
        i = start
        while i < stop:  # add each run of consecutive samples into its rows of the sum
            r = i % b
            j = min(stop, i + b - r)
            total[r : r + j - i] += g[i - start : j - start]
            i = j
    return total / count


class SmoothGrad(AttributionMethod):
    """The mean gradient over noisy copies of the input (Smilkov et al., 2017).

    Args:
        noise_level: standard deviation of the Gaussian noise as a fraction of each sample's value range
            (max - min), as in the paper.
        n_samples: number of noisy copies.
        seed: seed of the method's own generator; the global RNG is never used.

    >>> import torch, peering
    >>> model = torch.nn.Linear(4, 3)
    >>> exp = peering.explain(model, torch.rand(2, 4), method="smoothgrad", n_samples=8, seed=1)
    >>> exp.attributions.shape
    torch.Size([2, 2, 4])
    """

    name = "smoothgrad"

    def __init__(self, noise_level: float = 0.15, n_samples: int = 16, seed: int = 0) -> None:
        if noise_level < 0 or not math.isfinite(noise_level):
            raise PeeringValueError(f"noise_level must be a finite number >= 0, got {noise_level}")
        if n_samples < 1:
            raise PeeringValueError(f"n_samples must be >= 1, got {n_samples}")
        self.noise_level = noise_level
        self.n_samples = n_samples
        self.seed = seed

    def attribute(
        self, gradients: ClassGradients, inputs: Tensor, targets: Tensor | int
    ) -> tuple[Tensor, Tensor, Tensor]:
        scores, targets = _scores_and_targets(gradients, inputs, targets)
        b = inputs.shape[0]
        flat = inputs.flatten(1)
        spread = (flat.amax(dim=1) - flat.amin(dim=1)) if b else flat.new_zeros(0)
        sigma = (self.noise_level * spread).view(b, *([1] * (inputs.ndim - 1)))
        generator = torch.Generator(device=inputs.device).manual_seed(self.seed)

        def noisy(group: range) -> Tensor:
            # one draw per set, in order: the noise is the same whatever the chunking
            noise = torch.stack(
                [
                    torch.randn(inputs.shape, generator=generator, device=inputs.device, dtype=inputs.dtype)
                    for _ in group
                ]
            )
            return inputs.unsqueeze(0) + sigma * noise

        return _mean_gradient(gradients, inputs, targets, self.n_samples, noisy), scores, targets


class IntegratedGradients(AttributionMethod):
    """(x - baseline) times the mean gradient on the straight path from the baseline to x
    (Sundararajan et al., 2017), with the midpoint rule over ``steps`` points.

    Args:
        baseline: a number, or a tensor broadcastable to one sample or to the batch. Default 0 (black).
            At a layer (``explain(..., layer=)``) the path runs over the layer's output, so the baseline
            lives there: the default 0.0 is the zero vector (the reference of `peering.render.token_scores`
            and of input x gradient: a token's score is its contribution compared with no embedding at
            all); for integer token ids an int is a token id, and the baseline is the layer's output
            when every input id is that token (``baseline=tokenizer.pad_token_id``: the pad token's
            embedding at every position; ``baseline=0`` is Captum's ``LayerIntegratedGradients`` default,
            input id 0).
        steps: number of points on the path.

    >>> import torch, peering
    >>> model = torch.nn.Linear(4, 3)   # linear: IG equals input x gradient exactly
    >>> x = torch.rand(2, 4)
    >>> ig = peering.explain(model, x, target=1, output="logit", method="integrated_gradients")
    >>> torch.allclose(ig.attributions[:, 0], x * model.weight[1])
    True
    """

    name = "integrated_gradients"

    def __init__(self, baseline: float | Tensor = 0.0, steps: int = 32) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise PeeringValueError(f"steps must be a positive int, got {steps!r}")
        if isinstance(baseline, bool) or not isinstance(baseline, (int, float, Tensor)):
            raise PeeringTypeError(
                f"baseline must be a number, a tensor of one sample's or of the batch's shape, or (for token "
                f"ids explained at a layer) a token id; got {type(baseline).__name__}"
            )
        self.baseline = baseline
        self.steps = steps

    def attribute(
        self, gradients: ClassGradients, inputs: Tensor, targets: Tensor | int
    ) -> tuple[Tensor, Tensor, Tensor]:
        scores, targets = _scores_and_targets(gradients, inputs, targets)
        baseline = _baseline_points(self.baseline, gradients, inputs)
        delta = inputs - baseline
        alphas = (torch.arange(self.steps, dtype=inputs.dtype, device=inputs.device) + 0.5) / self.steps

        def on_path(group: range) -> Tensor:
            a = alphas[group.start : group.stop].view(-1, *([1] * inputs.ndim))
            return baseline.unsqueeze(0) + a * delta.unsqueeze(0)

        mean = _mean_gradient(gradients, inputs, targets, self.steps, on_path)
        return mean * delta.unsqueeze(1), scores, targets


def _baseline_points(baseline: float | Tensor, gradients: ClassGradients, inputs: Tensor) -> Tensor:
    """The baseline as points of the inputs' shape [B, ...] (at a layer: of the layer's output), or one
    `PeeringValueError` naming the shapes it may have."""
    ids = gradients.model_inputs
    at_layer = gradients.layer is not None and ids is not None
    if ids is not None and at_layer and isinstance(baseline, int) and not ids.is_floating_point():
        return _token_baseline(baseline, gradients, ids).to(inputs.dtype)
    value = torch.as_tensor(baseline, dtype=inputs.dtype, device=inputs.device)
    try:
        return torch.broadcast_to(value, inputs.shape)
    except RuntimeError:
        where = "the layer's output" if at_layer else "the inputs"
        raise PeeringValueError(
            f"baseline of shape {list(value.shape)} does not fit {where}: pass a number, or a tensor of one "
            f"sample's shape {list(inputs.shape[1:])} or of the batch's {list(inputs.shape)} (or anything "
            "that broadcasts to them)"
        ) from None


def _token_baseline(token: int, gradients: ClassGradients, ids: Tensor) -> Tensor:
    """The layer's output [B, ...] when every input id is ``token`` (a token id checked against the
    embedding's vocabulary when the layer is an `torch.nn.Embedding`)."""
    layer = gradients.layer
    size = getattr(layer, "num_embeddings", None)
    if token < 0 or (isinstance(size, int) and token >= size):
        vocab = f"[0, {size - 1}]" if isinstance(size, int) else "the vocabulary"
        raise PeeringValueError(f"baseline token id {token} is not in {vocab}; pass one of the model's ids")
    return gradients.layer_values(torch.full_like(ids, token))


METHODS: dict[str, type[AttributionMethod]] = {
    m.name: m for m in (Gradient, InputXGradient, SmoothGrad, IntegratedGradients)
}


def make_method(method: str | AttributionMethod, options: dict[str, Any]) -> AttributionMethod:
    """Resolve a method name plus options (or an instance) into an `AttributionMethod`.

    >>> make_method("smoothgrad", {"n_samples": 4})
    SmoothGrad(noise_level=0.15, n_samples=4, seed=0)
    """
    if isinstance(method, AttributionMethod):
        if options:
            raise PeeringTypeError(
                f"options {sorted(options)} given with a method instance; set them on the instance instead"
            )
        return method
    if method not in METHODS:
        raise PeeringValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    try:
        return METHODS[method](**options)
    except TypeError as err:
        raise PeeringTypeError(f"bad option for method {method!r}: {err}") from None
