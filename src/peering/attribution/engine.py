"""The class-gradient engine every attribution method is built on: `ClassGradients`.

One shared forward pass per chunk of points, then the K per-class input gradients, either as K batched
backward passes through the retained graph (``"per_class"``) or as one vmapped backward (``"vmap"``,
`torch.autograd.grad(..., is_grads_batched=True)`). Both are batched over the samples; neither loops over
samples. Measured on CPU (benchmarks/bench_explain.py), per-class backward is faster for small K, so
``"auto"`` uses it for K <= 4 and vmap above that. With ``layer`` the gradients are taken at a submodule's
output (a forward hook swaps it for a leaf tensor).

Chunks are sized by a `peering.memory.MemoryBudget`, not a constant: a dry forward pass of one point
measures the bytes autograd saves for backward (at a layer: the first chunk holds one point and is measured
while it runs), and the points are split into even chunks that fit the budget (see `peering.memory`).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from peering._model import ForwardKwargs, check_head, class_scores, transform
from peering.errors import PeeringRuntimeError, PeeringTypeError, PeeringValueError
from peering.memory import Footprint, MemoryBudget, SavedBytes, chunk_sizes, model_tensors

__all__ = ["ClassGradients", "GradStrategy", "top_classes"]

GradStrategy = Literal["auto", "per_class", "vmap"]


@dataclass
class ClassGradients:
    """Batched gradients of K classes per sample, computed in chunks sized by a memory budget.

    Call it with points [N, ...] and targets [N, K] (or an int K: each point's own top-K classes, chosen
    from the same forward pass); it returns gradients [N, K, ...], the class scores [N, C] at those points
    and the targets [N, K]. The model must already be in eval mode with gradients enabled (`explain` sees
    to that).

    Chunks: ``chunk_size`` points each when given; otherwise a dry forward pass of one point (at a
    layer: a first chunk of one) measures its `peering.memory.Footprint` (the bytes autograd saves for
    backward, the largest of them), and the points go in the fewest even chunks that keep the peak under
    ``budget`` (on CPU also keeping each tensor under glibc's mmap ceiling, which is faster per point). The
    footprint is kept for the engine's later calls, and for later engines on the same model and points of
    the same shape.

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
    chunk_size: int | None = None
    strategy: GradStrategy = "auto"
    forward_kwargs: ForwardKwargs | None = None
    layer: nn.Module | None = None
    model_inputs: Tensor | None = None
    budget: MemoryBudget = field(default_factory=MemoryBudget)
    footprint: Footprint | None = field(default=None, init=False, repr=False)

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
        for start, stop in self.spans(points, k, kept=grads.nbytes):
            t = targets if isinstance(targets, int) else targets[start:stop]
            s, t = self.chunk(points[start:stop], self.rows(start, stop, n), t, grads[start:stop])
            if scores is None:
                scores = s.new_empty((n, s.shape[1]))
            scores[start:stop] = s
            chosen[start:stop] = t
        if scores is None:  # an empty batch still needs the number of classes
            with torch.no_grad():
                scores = self.forward(points.detach(), slice(0, 0)).detach()
        return grads, scores, chosen

    def spans(
        self, points: Tensor, k: int, kept: int = 0, count: int | None = None
    ) -> Iterator[tuple[int, int]]:
        """The chunks [start, stop) of ``count`` points like ``points`` (default: all of them).

        ``chunk_size`` points each when given. Otherwise, until the engine has a footprint, a dry forward pass
        of one point measures it (at a layer the first chunk is one point, which `chunk` measures while it
        runs); the points are split by `plan`, the same way on every call. ``kept`` is the
        bytes of results that live through the whole loop (they come out of the budget).
        """
        n = points.shape[0] if count is None else count
        if self.chunk_size is not None:
            for start in range(0, n, self.chunk_size):
                yield start, min(start + self.chunk_size, n)
            return
        start = 0
        if self.footprint is None:
            self.footprint = _MEASURED.get(self.model, {}).get(self._measure_key(points))
        if self.footprint is None and n and self.layer is None:
            # a dry forward pass of one point measures the footprint, so that every call on this model and
            # shape chunks the same way (the same numbers, to the last bit, call after call)
            with torch.enable_grad():
                self._measured_forward(points[:1], self.rows(0, 1, n))
        if self.footprint is None and n:
            yield 0, 1
            start = 1
            if self.footprint is None:
                raise PeeringRuntimeError("internal error: the first chunk was not measured")
        for size in self.plan(points, n - start, k, kept):
            yield start, start + size
            start += size

    def plan(self, points: Tensor, n: int, k: int, kept: int = 0) -> list[int]:
        """Chunk sizes for ``n`` more points of ``k`` classes, from the measured footprint."""
        if self.chunk_size is not None:
            return chunk_sizes(n, self.chunk_size)
        if n <= 0 or self.footprint is None:
            return [n] if n > 0 else []
        self.budget = self.budget.resolve(points.device)  # one figure for all of this engine's chunks
        return self.budget.chunks(
            n, self.footprint, points.device, k=k, batched_classes=self._use_vmap(k), kept=kept
        )

    def scores(self, points: Tensor) -> Tensor:
        """Class scores [N, C] at the points: no-grad forward passes, chunked (the first one, when nothing
        is measured yet, with grad, to measure the footprint)."""
        n = points.shape[0]
        chunks = []
        for start, stop in self.spans(points, 1):
            rows = self.rows(start, stop, n)
            if self.footprint is None and self.chunk_size is None:
                chunks.append(self._measured_forward(points[start:stop], rows).detach())
                continue
            with torch.no_grad():
                chunks.append(self.forward(points[start:stop], rows))
        if not chunks:
            with torch.no_grad():
                return self.forward(points, slice(0, 0))
        return torch.cat(chunks)

    def layer_values(self, inputs: Tensor) -> Tensor:
        """The layer's output [B, ...] for model inputs [B, ...] (no-grad forward passes, chunked; the
        first, when nothing is measured yet, also measures the gradient passes' footprint at the layer)."""
        if self.layer is None:
            raise PeeringValueError("layer_values needs a layer")
        b = inputs.shape[0]
        values: list[Tensor] = []
        for start, stop in self.spans(inputs, 1, count=max(b, 1)):
            rows = slice(start, min(stop, b))
            with torch.no_grad(), _layer_hook(self.layer) as seen:
                class_scores(self.model, inputs[rows], self.output_fn, self._kwargs(rows))
            value = _the_output(self.layer, seen, inputs[rows].shape[0]).detach()
            if self.footprint is None and self.chunk_size is None and value.shape[0]:
                self._measured_forward(value, rows)
            values.append(value)
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

    def rows(self, start: int, stop: int, n: int) -> slice | Tensor:
        """The batch rows of points start..stop out of n: themselves, or i mod B for stacked sets."""
        b = self.batch
        if b is None or n == b:
            return slice(start, stop)
        if b == 0 or n % b:
            raise PeeringValueError(f"{n} points do not make whole sets of the batch's {b} samples")
        device = self.model_inputs.device if self.model_inputs is not None else None
        return torch.arange(start, stop, device=device) % b

    def chunk(
        self, points: Tensor, rows: slice | Tensor, targets: Tensor | int, out: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The K class gradients of one chunk of points, written into ``out`` [n, K, ...]; returns the
        chunk's class scores and targets. Measures the footprint when the engine has none yet."""
        x = points.detach().clone().requires_grad_(True)
        if self.footprint is None and self.chunk_size is None:
            scores = self._measured_forward(x, rows, leaf=True)
        else:
            scores = self.forward(x, rows)
        if isinstance(targets, int):
            targets = top_classes(scores.detach(), targets)
        selected = transform(scores, self.output).gather(1, targets)  # [n, K]
        k = targets.shape[1]
        if self._use_vmap(k):
            eye = torch.eye(k, dtype=selected.dtype, device=selected.device)
            grad_outputs = eye[:, None, :].expand(k, selected.shape[0], k)
            (g,) = torch.autograd.grad(selected, x, grad_outputs=grad_outputs, is_grads_batched=True)
            out.copy_(g.transpose(0, 1))
        else:
            for i in range(k):
                out[:, i] = torch.autograd.grad(selected[:, i].sum(), x, retain_graph=i < k - 1)[0]
        return scores.detach(), targets

    def _measured_forward(self, points: Tensor, rows: slice | Tensor, leaf: bool = False) -> Tensor:
        """A forward pass with grad at the points, its saved bytes per point recorded as the footprint."""
        x = points if leaf else points.detach().clone().requires_grad_(True)
        with SavedBytes.excluding([*model_tensors(self.model), x]) as saved:
            scores = self.forward(x, rows)
        n = max(x.shape[0], 1)
        point = x[0].numel() * x.element_size() if x.shape[0] else 0
        self.footprint = Footprint(saved=saved.total // n, largest=saved.largest // n, point=point)
        if x.shape[0]:
            _MEASURED.setdefault(self.model, {})[self._measure_key(x)] = self.footprint
        return scores

    def _measure_key(self, points: Tensor) -> tuple[Any, ...]:
        """What a footprint depends on besides the model: the layer, one point's shape and dtype, the
        per-sample arguments' layout, and the autocast in force."""
        device = points.device.type
        autocast = torch.is_autocast_enabled(device) if hasattr(torch, "get_autocast_dtype") else None
        layout = self.forward_kwargs.layout if self.forward_kwargs else ()
        return (id(self.layer), tuple(points.shape[1:]), points.dtype, device, layout, autocast,
                torch.get_autocast_dtype(device) if autocast else None)

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


# footprints measured per model (and `ClassGradients._measure_key`), so that repeated calls on one model
# (the callback's checks, the writer's batches) measure once: a measured chunk of one point is a call more
_MEASURED: weakref.WeakKeyDictionary[nn.Module, dict[tuple[Any, ...], Footprint]] = (
    weakref.WeakKeyDictionary()
)


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
