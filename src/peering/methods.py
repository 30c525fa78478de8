"""Attribution methods: one class per algorithm, all built on one batched class-gradient engine.

Every method answers the same question for a batch of inputs ``x`` [B, ...] and classes ``targets``
[B, K]: how does the chosen output (probability, log-probability or logit) of each class respond to the
input? They differ only in where the gradient is evaluated and how the gradients are combined:

- `Gradient`: d out_k / d x at x.
- `InputXGradient`: x * d out_k / d x.
- `SmoothGrad`: the mean gradient at ``n_samples`` noisy copies of x (its own seeded generator).
- `IntegratedGradients`: (x - baseline) times the mean gradient along the straight path from the
  baseline to x (midpoint rule with ``steps`` points).

`ClassGradients` does the work: one shared forward pass per chunk of points, then the K per-class input
gradients, either as K batched backward passes through the retained graph (``"per_class"``) or as one
vmapped backward (``"vmap"``, `torch.autograd.grad(..., is_grads_batched=True)`). Both are batched over the
samples; neither loops over samples. Measured on CPU (benchmarks/bench_explain.py), per-class backward is
faster for small K, so ``"auto"`` uses it for K <= 4 and vmap above that.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from peering._guard import ForwardKwargs, class_scores, transform

__all__ = [
    "AttributionMethod",
    "ClassGradients",
    "Gradient",
    "InputXGradient",
    "IntegratedGradients",
    "SmoothGrad",
]

GradStrategy = Literal["auto", "per_class", "vmap"]


@dataclass
class ClassGradients:
    """Batched gradients of K classes per sample, computed in chunks of ``chunk_size`` points.

    Call it with points [N, ...] and targets [N, K] (or an int K: each point's own top-K classes, chosen
    from the same forward pass); it returns gradients [N, K, ...], the class scores [N, C] at those points
    and the targets [N, K]. The model must already be in eval mode with gradients enabled (`explain` sees
    to that). Chunking matters on CPU: activations over ~32 MiB are re-mapped by the allocator on every
    call, so four batches of 64 are faster than one of 256.

    The points are the model's inputs, or, with ``layer``, values of that submodule's output: the model is
    then run on ``model_inputs`` and a forward hook swaps the layer's output for the points (a leaf that
    requires grad), so the gradients are taken at the layer. With B samples in the batch (``forward_kwargs``'
    or ``model_inputs``' first dimension), N may be a multiple of B (stacked sets of points, as SmoothGrad
    and integrated gradients make): point i belongs to sample i mod B, and is run with that sample's
    ``forward_kwargs`` rows and model inputs.

    >>> import torch
    >>> model = torch.nn.Linear(3, 4).eval()
    >>> grads, scores, targets = ClassGradients(model, output="logit")(torch.rand(5, 3), 2)
    >>> grads.shape, targets.shape
    (torch.Size([5, 2, 3]), torch.Size([5, 2]))
    >>> torch.equal(grads[:, 0], model.weight[targets[:, 0]])
    True
    """

    model: nn.Module
    output: str = "probability"
    output_fn: Callable[[Any], Tensor] | None = None
    chunk_size: int = 64
    strategy: GradStrategy = "auto"
    forward_kwargs: ForwardKwargs | None = None
    layer: nn.Module | None = None
    model_inputs: Tensor | None = None

    def __post_init__(self) -> None:
        if self.layer is not None and self.model_inputs is None:
            raise ValueError("ClassGradients with a layer needs the model_inputs the model is run on")

    @property
    def batch(self) -> int | None:
        """The number of samples the points belong to, when the engine knows it."""
        if self.model_inputs is not None:
            return self.model_inputs.shape[0]
        return self.forward_kwargs.batch if self.forward_kwargs else None

    def __call__(self, points: Tensor, targets: Tensor | int) -> tuple[Tensor, Tensor, Tensor]:
        n = points.shape[0]
        k = targets if isinstance(targets, int) else targets.shape[1]
        grads = points.new_empty((n, k, *points.shape[1:]))
        scores: Tensor | None = None
        chosen = torch.empty((n, k), dtype=torch.int64, device=points.device)
        for start in range(0, n, self.chunk_size):
            stop = min(start + self.chunk_size, n)
            t = targets if isinstance(targets, int) else targets[start:stop]
            g, s, t = self._chunk(points[start:stop], self._rows(start, stop, n), t)
            grads[start:stop] = g
            if scores is None:
                scores = s.new_empty((n, s.shape[1]))
            scores[start:stop] = s
            chosen[start:stop] = t
        if scores is None:  # an empty batch still needs the number of classes
            with torch.no_grad():
                scores = self.forward(points.detach(), slice(0, 0)).detach()
        return grads, scores, chosen

    def scores(self, points: Tensor) -> Tensor:
        """Class scores [N, C] at the points: no-grad forward passes, chunked."""
        n = points.shape[0]
        with torch.no_grad():
            chunks = [
                self.forward(points[i : i + self.chunk_size], self._rows(i, min(i + self.chunk_size, n), n))
                for i in range(0, n, self.chunk_size)
            ]
            return torch.cat(chunks) if chunks else self.forward(points, slice(0, 0))

    def layer_values(self, inputs: Tensor) -> Tensor:
        """The layer's output [B, ...] for model inputs [B, ...] (no-grad forward passes, chunked)."""
        if self.layer is None:
            raise ValueError("layer_values needs a layer")
        b = inputs.shape[0]
        values: list[Tensor] = []
        with torch.no_grad():
            for start in range(0, max(b, 1), self.chunk_size):
                rows = slice(start, min(start + self.chunk_size, b))
                with _layer_hook(self.layer) as seen:
                    class_scores(self.model, inputs[rows], self.output_fn, self._kwargs(rows))
                values.append(_the_output(self.layer, seen, inputs[rows].shape[0]).detach())
        return torch.cat(values)

    def forward(self, points: Tensor, rows: slice | Tensor) -> Tensor:
        """Class scores for points that belong to the samples ``rows`` of the batch."""
        kwargs = self._kwargs(rows)
        if self.layer is None:
            return class_scores(self.model, points, self.output_fn, kwargs)
        assert self.model_inputs is not None
        with _layer_hook(self.layer, points) as seen:
            scores = class_scores(self.model, self.model_inputs[rows], self.output_fn, kwargs)
        _the_output(self.layer, seen, points.shape[0])
        return scores

    def _kwargs(self, rows: slice | Tensor) -> dict[str, Any] | None:
        return self.forward_kwargs.rows(rows) if self.forward_kwargs else None

    def _rows(self, start: int, stop: int, n: int) -> slice | Tensor:
        """The batch rows of points start..stop out of n: themselves, or i mod B for stacked sets."""
        b = self.batch
        if b is None or n == b:
            return slice(start, stop)
        if b == 0 or n % b:
            raise ValueError(f"{n} points do not make whole sets of the batch's {b} samples")
        device = self.model_inputs.device if self.model_inputs is not None else None
        return torch.arange(start, stop, device=device) % b

    def _chunk(
        self, points: Tensor, rows: slice | Tensor, targets: Tensor | int
    ) -> tuple[Tensor, Tensor, Tensor]:
        x = points.detach().clone().requires_grad_(True)
        scores = self.forward(x, rows)
        if isinstance(targets, int):
            targets = top_classes(scores.detach(), targets)
        selected = transform(scores, self.output).gather(1, targets)  # [n, K]
        k = targets.shape[1]
        if self._use_vmap(k):
            eye = torch.eye(k, dtype=selected.dtype, device=selected.device)
            grad_outputs = eye[:, None, :].expand(k, selected.shape[0], k)
            (g,) = torch.autograd.grad(selected, x, grad_outputs=grad_outputs, is_grads_batched=True)
            return g.transpose(0, 1), scores.detach(), targets
        per_class = [
            torch.autograd.grad(selected[:, i].sum(), x, retain_graph=i < k - 1)[0] for i in range(k)
        ]
        return torch.stack(per_class, dim=1), scores.detach(), targets

    def _use_vmap(self, k: int) -> bool:
        if self.strategy == "auto":
            return k > 4
        return self.strategy == "vmap"


@contextlib.contextmanager
def _layer_hook(layer: nn.Module, replacement: Tensor | None = None) -> Iterator[list[Tensor]]:
    """Record the layer's outputs during a forward pass, and swap the first for ``replacement``."""
    seen: list[Tensor] = []

    def hook(module: nn.Module, args: Any, output: Any) -> Tensor | None:
        if not isinstance(output, Tensor):
            raise TypeError(
                f"layer {type(module).__name__} returns a {type(output).__name__}, not a tensor; pass a "
                "submodule whose output is one tensor [B, ...] (e.g. the embedding module itself)"
            )
        seen.append(output)
        if replacement is None or len(seen) > 1:
            return None
        if output.shape != replacement.shape:
            raise ValueError(
                f"layer {type(module).__name__} returned shape {list(output.shape)}, but the attribution "
                f"points have shape {list(replacement.shape)}; the layer's output must have the batch first"
            )
        return replacement

    handle = layer.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def _the_output(layer: nn.Module, seen: list[Tensor], batch: int) -> Tensor:
    """The layer's one output of a forward pass, or a clear error when it ran zero or several times."""
    name = type(layer).__name__
    if not seen:
        raise ValueError(
            f"layer {name} was not called by the model's forward; pass a submodule of the model that runs "
            "on every forward pass"
        )
    if len(seen) > 1:
        raise ValueError(
            f"layer {name} ran {len(seen)} times in one forward pass (a shared module?); attributions at it "
            "would be ambiguous: pass a submodule that runs once"
        )
    if seen[0].ndim < 1 or seen[0].shape[0] != batch:
        raise ValueError(
            f"layer {name}'s output has shape {list(seen[0].shape)}, which does not start with the batch "
            f"size {batch}; pass a layer whose output is [B, ...]"
        )
    return seen[0]


def top_classes(scores: Tensor, k: int) -> Tensor:
    """Each row's k highest-scoring classes, best first: int64 [B, k]."""
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"top_k must be between 1 and the number of classes ({scores.shape[1]}), got {k}")
    return scores.topk(k, dim=1).indices


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

    ``points(group)`` returns the sets numbered in ``group``, stacked: [len(group), B, ...]. Sets are
    grouped so that one call to ``gradients`` holds about ``chunk_size`` points; each set's gradients are
    those of the matching input's targets.
    """
    b = inputs.shape[0]
    total = inputs.new_zeros((b, targets.shape[1], *inputs.shape[1:]))
    per_group = max(1, gradients.chunk_size // max(b, 1))
    for start in range(0, count, per_group):
        group = range(start, min(start + per_group, count))
        g = gradients(points(group).flatten(0, 1), targets.repeat(len(group), 1))[0]
        total += g.view(len(group), *total.shape).sum(dim=0)
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
            raise ValueError(f"noise_level must be a finite number >= 0, got {noise_level}")
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
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
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.baseline = baseline
        self.steps = steps

    def attribute(
        self, gradients: ClassGradients, inputs: Tensor, targets: Tensor | int
    ) -> tuple[Tensor, Tensor, Tensor]:
        scores, targets = _scores_and_targets(gradients, inputs, targets)
        baseline = torch.as_tensor(self.baseline, dtype=inputs.dtype, device=inputs.device)
        baseline = torch.broadcast_to(baseline, inputs.shape)
        delta = inputs - baseline
        alphas = (torch.arange(self.steps, dtype=inputs.dtype, device=inputs.device) + 0.5) / self.steps

        def on_path(group: range) -> Tensor:
            a = alphas[group.start : group.stop].view(-1, *([1] * inputs.ndim))
            return baseline.unsqueeze(0) + a * delta.unsqueeze(0)

        mean = _mean_gradient(gradients, inputs, targets, self.steps, on_path)
        return mean * delta.unsqueeze(1), scores, targets


METHODS: dict[str, type[AttributionMethod]] = {
    m.name: m for m in (Gradient, InputXGradient, SmoothGrad, IntegratedGradients)
}


def make_method(method: str | AttributionMethod, options: dict[str, Any]) -> AttributionMethod:
    """Resolve a method name plus options (or an instance) into an `AttributionMethod`."""
    if isinstance(method, AttributionMethod):
        if options:
            raise TypeError(
                f"options {sorted(options)} given with a method instance; set them on the instance instead"
            )
        return method
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    try:
        return METHODS[method](**options)
    except TypeError as err:
        raise TypeError(f"bad option for method {method!r}: {err}") from None
