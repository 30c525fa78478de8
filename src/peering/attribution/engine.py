"""The class-gradient engine every attribution method is built on: `ClassGradients`.

One shared forward pass per chunk of points, then the K per-class input gradients, either as K batched
backward passes through the retained graph (``"per_class"``) or as one vmapped backward (``"vmap"``,
`torch.autograd.grad(..., is_grads_batched=True)`). Both are batched over the samples; neither loops over
samples. Measured on CPU (benchmarks/bench_explain.py), per-class backward is faster for small K, so
``"auto"`` uses it for K <= 4 and vmap above that. With ``layer`` the gradients are taken at a submodule's
output (a forward hook swaps it for a leaf tensor).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from peering._model import ForwardKwargs, check_head, class_scores, transform
from peering.errors import PeeringTypeError, PeeringValueError

__all__ = ["ClassGradients", "GradStrategy", "top_classes"]

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
            raise PeeringValueError("ClassGradients with a layer needs the model_inputs the model is run on")

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
            raise PeeringValueError("layer_values needs a layer")
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
            scores = class_scores(self.model, points, self.output_fn, kwargs)
        else:
            assert self.model_inputs is not None
            with _layer_hook(self.layer, points) as seen:
                scores = class_scores(self.model, self.model_inputs[rows], self.output_fn, kwargs)
            _the_output(self.layer, seen, points.shape[0])
        check_head(scores.shape[1], self.output)  # a softmax over one output is refused before any top-k
        return scores

    def _kwargs(self, rows: slice | Tensor) -> dict[str, Any] | None:
        return self.forward_kwargs.rows(rows) if self.forward_kwargs else None

    def _rows(self, start: int, stop: int, n: int) -> slice | Tensor:
        """The batch rows of points start..stop out of n: themselves, or i mod B for stacked sets."""
        b = self.batch
        if b is None or n == b:
            return slice(start, stop)
        if b == 0 or n % b:
            raise PeeringValueError(f"{n} points do not make whole sets of the batch's {b} samples")
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
            raise PeeringTypeError(
                f"layer {type(module).__name__} returns a {type(output).__name__}, not a tensor; pass a "
                "submodule whose output is one tensor [B, ...] (e.g. the embedding module itself)"
            )
        seen.append(output)
        if replacement is None or len(seen) > 1:
            return None
        if output.shape != replacement.shape:
            raise PeeringValueError(
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
        raise PeeringValueError(
            f"layer {name} was not called by the model's forward; pass a submodule of the model that runs "
            "on every forward pass"
        )
    if len(seen) > 1:
        raise PeeringValueError(
            f"layer {name} ran {len(seen)} times in one forward pass (a shared module?); attributions at it "
            "would be ambiguous: pass a submodule that runs once"
        )
    if seen[0].ndim < 1 or seen[0].shape[0] != batch:
        raise PeeringValueError(
            f"layer {name}'s output has shape {list(seen[0].shape)}, which does not start with the batch "
            f"size {batch}; pass a layer whose output is [B, ...]"
        )
    return seen[0]


def top_classes(scores: Tensor, k: int) -> Tensor:
    """Each row's k highest-scoring classes, best first: int64 [B, k].

    >>> top_classes(torch.tensor([[0.1, 0.7, 0.2]]), 2).tolist()
    [[1, 2]]
    """
    if not 1 <= k <= scores.shape[1]:
        raise PeeringValueError(
            f"top_k must be between 1 and the number of classes ({scores.shape[1]}), got {k}"
        )
    return scores.topk(k, dim=1).indices
