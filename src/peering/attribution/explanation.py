"""`explain`: input attributions of a classifier's top-k (or chosen) classes for a whole batch at once."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from peering._guesses import check_guesses
from peering._model import (
    ForwardKwargs,
    Output,
    check_inputs,
    check_output,
    check_targets,
    gradient_context,
    nonfinite_rows,
    probabilities,
    refuse_unbatched,
)
from peering._validate import int_at_least, optional
from peering.attribution.engine import ClassGradients, GradStrategy, top_classes
from peering.attribution.methods import AttributionMethod, make_method
from peering.errors import PeeringError, PeeringTypeError, PeeringValueError
from peering.memory import MemoryBudget

__all__ = ["Explanation", "explain"]


@dataclass(frozen=True)
class Explanation:
    """What `explain` returns.

    Attributes:
        attributions: float [B, K, *input_shape] (or [B, K, *layer_output_shape[1:]] when explained at a
            ``layer``): for each sample and each explained class, where adding intensity raises the
            class's output (positive) and where removing it does (negative).
        targets: int64 [B, K]: the classes explained, best first when they were the model's top-k.
        logits: [B, C]: the model's class scores for the inputs (its outputs, for ``output="raw"``).
        probabilities: [B, C]: their softmax; with ``output="sigmoid"`` their sigmoid (independent per
            class); NaN with ``output="raw"`` (a regression has no probabilities).
        method: the attribution method's name; output: the quantity differentiated.
        valid: bool [B]: False for samples skipped because their inputs or logits were not finite
            (only with ``nonfinite="skip"``; their attributions are NaN and their targets -1).
        computed_in: the dtype the model's forward and backward passes ran in: that of the inputs, or
            the lower precision of an enclosing ``torch.autocast`` (e.g. ``torch.bfloat16``), whatever the
            dtype of ``attributions``.
    """

    attributions: Tensor
    targets: Tensor
    logits: Tensor
    probabilities: Tensor
    method: str
    output: str
    valid: Tensor
    computed_in: torch.dtype | None = None

    def __len__(self) -> int:
        return self.attributions.shape[0]


def explain(
    model: nn.Module,
    inputs: Tensor,
    target: int | Tensor | None = None,
    *,
    top_k: int = 2,
    method: str | AttributionMethod = "gradient",
    output: Output = "probability",
    output_fn: Callable[[Any], Tensor] | None = None,
    chunk_size: int | None = None,
    memory_budget: MemoryBudget | int | float | str | None = None,
    grad_strategy: GradStrategy = "auto",
    nonfinite: Literal["raise", "skip"] = "raise",
    forward_kwargs: Mapping[str, Any] | ForwardKwargs | None = None,
    layer: nn.Module | None = None,
    shared_kwargs: Sequence[str] | None = None,
    **method_options: Any,
) -> Explanation:
    """Input attributions of K classes for every sample of a batch, in one batched autograd computation.

    Args:
        model: any classifier mapping inputs [B, ...] to class scores [B, C] (see ``output_fn``). It is
            run in eval mode; its mode, parameters' ``.grad`` and ``requires_grad`` are left as they were.
        inputs: float tensor [B, ...]: images [B, C, H, W], flat features [B, D], anything the model takes
            (with ``layer``, also integer token ids).
        target: None for the model's own top ``top_k`` classes per sample (the highest scores; with
            "sigmoid" the most probable labels); an int for one class for all samples; an int64 tensor
            [B] (one class each) or [B, K] (K classes each).
        top_k: how many classes to explain when ``target`` is None (with "raw", at most the number of
            outputs: a one-output regression is explained with ``top_k=1`` whatever is passed).
        method: "gradient", "input_x_gradient", "smoothgrad" (options ``noise_level``, ``n_samples``,
            ``seed``), "integrated_gradients" (options ``baseline``, ``steps``), or an
            `AttributionMethod` instance.
        output: the quantity differentiated. For a softmax classifier: "probability" (softmax),
            "log_probability" or "logit". For a multi-label classifier (independent sigmoids) or a
            single-logit binary one: "sigmoid", each class's own probability. For a model whose output is
            the quantity itself (a regression): "raw", the output unchanged (no probabilities). A model
            with one output is refused with "probability" and "log_probability" (a softmax over one score
            is constant, its gradient zero).
        output_fn: picks the class scores out of a model output that is not a plain tensor, e.g.
            ``lambda out: out.logits`` for Hugging Face style models.
        chunk_size: samples (or noisy/path points) per forward pass. Default None: sized from
            ``memory_budget``; a given ``chunk_size`` wins over the budget.
        memory_budget: the most memory the call may use at its peak beyond the inputs and the model:
            bytes, a size string ("2GiB"), a share of free memory (a float in (0, 1]) or a
            `peering.memory.MemoryBudget`. Default: half the free CUDA memory, or a quarter of the
            available RAM. A dry forward pass of one point measures its activation bytes (once per
            model and input shape); the chunks are then as large as fit (see `peering.memory`).
        grad_strategy: "per_class" (one batched backward per class through a retained graph), "vmap"
            (one vmapped backward for all classes) or "auto" (per_class for K <= 4, which measured faster).
        nonfinite: "raise" (default) rejects inputs with NaN/Inf; "skip" explains the other samples and
            marks those (and any whose logits are not finite) as not ``valid``, with one warning.
        forward_kwargs: extra keyword arguments of the model: it is called as
            ``model(x, **forward_kwargs)``. Tensors whose first dimension is B (an attention mask) are per
            sample: they follow each sample through chunking, SmoothGrad's noisy copies and integrated
            gradients' path points. Numbers and flags are passed unchanged. A tensor that the model takes
            whole for every sample (class prototypes, a table) must be named in ``shared_kwargs``; any
            other tensor whose first dimension is not B is refused. A tensor taken per sample only
            because its first dimension is B is checked first (sample 0 run alone must get the scores it
            gets among others; one small no-grad forward pass), and refused if the model takes it whole.
            A `peering._model.ForwardKwargs` (already split, as the callbacks pass them) is used as it is.
        shared_kwargs: names of ``forward_kwargs`` passed whole to every forward pass, whatever their
            first dimension (e.g. ``["prototypes"]``).
        layer: a submodule of the model (e.g. ``bert.embeddings.word_embeddings``): take the attributions
            with respect to its output instead of the inputs (a forward hook swaps the output for a leaf
            tensor). SmoothGrad perturbs, and integrated gradients walks, the layer's output (the baseline
            lives there: by default the zero vector; with integer token ids, ``baseline=<token id>`` is the
            layer's output for that token at every position, e.g. the pad token's embedding); input x
            gradient multiplies by it. The inputs may then be integer ids.
        **method_options: options of the named method.

    Returns:
        An `Explanation`.

    Works under ``torch.no_grad()`` and ``torch.inference_mode()``, and leaves the global RNG untouched.
    Under ``torch.autocast`` the passes run in its lower precision (bf16 maps differ from float32 ones by
    10-30%): the attributions keep the inputs' dtype, a warning says so once, and
    `Explanation.computed_in` records the precision.
    ``torch.compile``d models (or submodules) are run eagerly, so the numbers are the eager model's.

    >>> import torch, peering
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    >>> exp = peering.explain(model, torch.rand(5, 1, 8, 8), top_k=2)
    >>> exp.attributions.shape, exp.targets.shape
    (torch.Size([5, 2, 1, 8, 8]), torch.Size([5, 2]))

    A text model, explained at its embeddings, with a padding mask per sample:

    >>> class Text(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.embed, self.head = torch.nn.Embedding(50, 8), torch.nn.Linear(8, 3)
    ...     def forward(self, ids, mask):
    ...         e = self.embed(ids) * mask[..., None]
    ...         return self.head(e.sum(1) / mask.sum(1, keepdim=True))
    >>> model, ids = Text(), torch.randint(0, 50, (4, 6))
    >>> mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 6, [1] * 2 + [0] * 4]).float()
    >>> exp = peering.explain(model, ids, forward_kwargs={"mask": mask}, layer=model.embed)
    >>> exp.attributions.shape  # [B, K, tokens, hidden]
    torch.Size([4, 2, 6, 8])
    >>> bool((exp.attributions[3, :, 2:] == 0).all())  # padded tokens get nothing
    True
    """
    if not isinstance(model, nn.Module):
        raise PeeringTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    output = check_output(output)  # type: ignore[assignment]
    if nonfinite not in ("raise", "skip"):
        raise PeeringValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
    optional(int_at_least, "chunk_size", chunk_size, 1)
    budget = MemoryBudget.parse(memory_budget)
    if grad_strategy not in ("auto", "per_class", "vmap"):
        raise PeeringValueError(f"grad_strategy must be 'auto', 'per_class' or 'vmap', got {grad_strategy!r}")
    if target is None:
        int_at_least("top_k", top_k, 1)
    if layer is not None and not isinstance(layer, nn.Module):
        raise PeeringTypeError(
            f"layer must be a submodule of the model (an nn.Module), got {type(layer).__name__}"
        )
    if layer is not None and not any(m is layer for m in model.modules()):
        raise PeeringValueError(f"layer {type(layer).__name__} is not a submodule of the model")
    check_inputs(inputs, allow_nonfinite=nonfinite == "skip", allow_integer=layer is not None)
    run = _Run(make_method(method, method_options), output, output_fn, chunk_size, grad_strategy, layer,
               budget, _computed_in(inputs))

    with gradient_context(model):
        x = inputs.detach().clone()
        kwargs = ForwardKwargs(forward_kwargs, x.shape[0], shared_kwargs)
        rows = (~nonfinite_rows(x)).nonzero().flatten()
        if len(rows) < x.shape[0]:
            _warn_skipped(x.shape[0] - len(rows), "inputs")
        try:
            if kwargs.unchecked:
                everyone = len(rows) == x.shape[0]
                check_guesses(model, x if everyone else x[rows], kwargs if everyone else kwargs.select(rows),
                              output_fn)
                kwargs.unchecked = ()
            attributions, logits, targets = run(model, x, kwargs, rows, target, top_k)
        except PeeringError:
            raise
        except Exception:  # a raw failure of the model: unbatched inputs are said as such
            refuse_unbatched(model, x, output_fn, kwargs.rows(slice(None)))
            raise
        bad = ~torch.isfinite(logits).all(dim=1)
        if bool(bad.any()):
            if nonfinite == "raise":
                raise PeeringValueError(
                    f"the model's logits are NaN or Inf for batch indices {rows[bad].tolist()[:10]}; check "
                    "the model and inputs, or pass nonfinite='skip' to explain the other samples"
                )
            _warn_skipped(int(bad.sum()), "logits")
            # explain the others on their own: a non-finite sample in the same batch can poison their
            # gradients through batch-wide operations (0 * inf in a backward pass is NaN)
            rows = rows[~bad]
            attributions, logits, targets = run(model, x, kwargs, rows, target, top_k)
    return run.explanation(x.shape[0], rows, attributions, logits, targets)


@dataclass(frozen=True)
class _Run:
    """One `explain` call's settings, applied to the samples ``rows`` of a batch."""

    method: AttributionMethod
    output: str
    output_fn: Callable[[Any], Tensor] | None
    chunk_size: int | None
    strategy: GradStrategy
    layer: nn.Module | None
    budget: MemoryBudget
    computed_in: torch.dtype

    def __call__(
        self,
        model: nn.Module,
        x: Tensor,
        kwargs: ForwardKwargs,
        rows: Tensor,
        target: int | Tensor | None,
        top_k: int,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(attributions, logits, targets) of the samples ``rows`` of ``x``."""
        everyone = len(rows) == x.shape[0]
        if not everyone:
            x, kwargs = x[rows], kwargs.select(rows)
            if isinstance(target, Tensor) and target.ndim >= 1:
                target = target[rows.to(target.device)]
        gradients = ClassGradients(
            model, self.output, self.output_fn, self.chunk_size, self.strategy, kwargs, self.layer,
            x if self.layer is not None else None, self.budget,
        )
        points = gradients.layer_values(x) if self.layer is not None else x
        targets: Tensor | int = top_k
        if target is not None or self.output == "raw":
            with torch.no_grad():  # one sample tells the number of classes
                classes = gradients.forward(points[:1], slice(0, min(1, x.shape[0]))).shape[1]
            if target is not None:
                targets = check_targets(target, x.shape[0], classes)
            else:  # a regression's outputs: top_k of them at most
                targets = top_k = min(top_k, classes)
        if target is None and x.shape[0] == 0:
            targets = top_classes(gradients.scores(points), top_k)
        attributions, logits, chosen = self.method.attribute(gradients, points, targets)
        return attributions.detach(), logits, chosen

    def explanation(
        self, batch: int, rows: Tensor, attributions: Tensor, logits: Tensor, targets: Tensor
    ) -> Explanation:
        """The `Explanation` of the whole batch: the samples not in ``rows`` get NaN and targets -1."""
        if len(rows) < batch:
            k, device = targets.shape[1], logits.device
            full = attributions.new_full((batch, k, *attributions.shape[2:]), float("nan"))
            full[rows] = attributions
            chosen = torch.full((batch, k), -1, dtype=torch.int64, device=device)
            chosen[rows] = targets
            scores = logits.new_full((batch, logits.shape[1]), float("nan"))
            scores[rows] = logits
            attributions, targets, logits = full, chosen, scores
        valid = torch.zeros(batch, dtype=torch.bool, device=logits.device)
        valid[rows.to(logits.device)] = True
        return Explanation(
            attributions=attributions,
            targets=targets,
            logits=logits,
            probabilities=probabilities(logits, self.output),
            method=self.method.name,
            output=self.output,
            valid=valid,
            computed_in=self.computed_in,
        )


def _computed_in(inputs: Tensor) -> torch.dtype:
    """The dtype the passes run in: the inputs', or an enclosing autocast's lower precision (one warning
    per call; Python's default filter shows it once per process)."""
    dtype = inputs.dtype if inputs.is_floating_point() else torch.get_default_dtype()
    low = _autocast_dtype(inputs.device.type)
    if low is None:
        return dtype
    if low.itemsize >= dtype.itemsize:
        return dtype
    warnings.warn(
        f"peering: explain ran under torch.autocast, so the model's passes and the attributions were "
        f"computed in {low} (returned as {dtype}; maps in bfloat16 differ from float32 ones by 10-30%). "
        "Explanation.computed_in records it; call explain outside autocast for full-precision maps",
        RuntimeWarning,
        stacklevel=3,
    )
    return low


def _autocast_dtype(device: str) -> torch.dtype | None:
    """The dtype of the autocast enclosing this call on ``device``'s type, or None."""
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    if device == "cpu":
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
    return torch.get_autocast_gpu_dtype() if device == "cuda" and torch.is_autocast_enabled() else None


def _warn_skipped(count: int, what: str) -> None:
    warnings.warn(
        f"peering: skipped {count} sample(s) whose {what} contain NaN or Inf; the rest were explained",
        RuntimeWarning,
        stacklevel=3,
    )
