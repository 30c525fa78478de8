"""Shared input checks and the "leave everything as it was" context for gradient computations.

Private: `explain`, `morph` and the callback use these so that every entry point validates the same way
and restores the same state.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from peering.errors import PeeringRuntimeError, PeeringTypeError, PeeringValueError

Output = Literal["probability", "log_probability", "logit", "sigmoid", "raw"]
OUTPUTS: tuple[str, ...] = ("probability", "log_probability", "logit", "sigmoid", "raw")
"""What can be differentiated: a softmax classifier's "probability", "log_probability" or "logit"; a
multi-label (or single-logit binary) classifier's "sigmoid", the independent probability of each class;
"raw", the model's output itself, for a model whose output is the quantity (a regression)."""
CLASS_OUTPUTS: tuple[str, ...] = ("probability", "log_probability", "logit", "sigmoid")
"""The outputs of classifiers: those that have classes to reach and to confuse (all but "raw")."""
SOFTMAX = ("probability", "log_probability")


@contextlib.contextmanager
def eval_mode(model: nn.Module, rng_devices: tuple[torch.device, ...] = ()) -> Iterator[None]:
    """Run `model` in eval mode and eagerly, then restore each submodule's own ``training`` flag and the
    RNG state.

    Each flag is put back one by one (never a blanket `.train()`, which would unfreeze a submodule the
    user froze). The CPU RNG is restored, and so is that of each device in ``rng_devices``. Compiled code
    runs eagerly inside (see `eager`).
    """
    modes = [(module, module.training) for module in model.modules()]
    with torch.random.fork_rng(devices=list(rng_devices)), eager(model):
        model.eval()
        try:
            yield
        finally:
            for module, training in modes:
                module.training = training


def _compiled_modules(model: nn.Module) -> list[str]:
    from torch._dynamo.eval_frame import OptimizedModule

    return [name or "the model" for name, mod in model.named_modules() if isinstance(mod, OptimizedModule)]


@contextlib.contextmanager
def eager(model: nn.Module) -> Iterator[None]:
    """Run every ``torch.compile``d module and function eagerly, with the eager model's exact numbers.

    Compiled graphs are not trusted for input gradients: with torch 2.13 a compiled batch-norm CNN gives
    all-zero input gradients at some batch sizes, vmapped backward passes fail, and graphs compiled for
    training refuse a retained graph. ``torch.compiler.set_stance("force_eager")`` (torch >= 2.6) runs the
    original Python code of every compiled module and function instead, whatever is nested where, and puts
    the stance back afterwards, so nothing is recompiled and the caller's compiled model is untouched.
    Unwrapping ``OptimizedModule._orig_mod`` would only reach a compiled *top-level* module, not a compiled
    submodule or a compiled function called in ``forward``. Older torch: a clear error for a model that
    holds a compiled module.
    """
    if "torch._dynamo" not in sys.modules:
        # nothing was ever torch.compile'd in this process (compiling imports dynamo): importing it here
        # for set_stance would cost the command line's first explain 1-4 s of start-up for nothing
        yield
        return
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is not None:
        with set_stance("force_eager"):
            yield
        return
    compiled = _compiled_modules(model)
    if compiled:
        raise PeeringRuntimeError(
            f"{compiled[0]} is torch.compile'd, and peering takes gradients through compiled graphs only "
            "with torch >= 2.6 (torch.compiler.set_stance); upgrade torch, or pass the uncompiled module "
            "(compiled._orig_mod)"
        )
    yield


@contextlib.contextmanager
def gradient_context(model: nn.Module) -> Iterator[None]:
    """`eval_mode` with gradients enabled, even when the caller is inside `torch.no_grad()` or
    `torch.inference_mode()` (inputs must then be cloned inside this context), and the parameters
    frozen (see `frozen_parameters`)."""
    with eval_mode(model), torch.inference_mode(False), torch.enable_grad(), frozen_parameters(model):
        yield


@contextlib.contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Set ``requires_grad=False`` on the parameters that have it, and put it back afterwards.

    Only input (or layer) gradients are taken, never parameter gradients. With the parameters frozen,
    autograd does not save what only a parameter's gradient needs: a linear layer's input is kept for
    its weight's gradient alone, so transformers save about 37% fewer bytes per point (ViT-B/16, BERT
    base), and more points fit in a chunk of the same memory. ``.grad`` is not touched.

    >>> lin = torch.nn.Linear(2, 2)
    >>> with frozen_parameters(lin):
    ...     lin.weight.requires_grad
    False
    >>> lin.weight.requires_grad
    True
    """
    thawed = [p for p in model.parameters() if p.requires_grad]
    for p in thawed:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in thawed:
            p.requires_grad_(True)


def detached_leaf(x: Tensor) -> Tensor:
    """A fresh leaf copy of `x` that requires grad, safe even if `x` is an inference-mode tensor."""
    return x.detach().clone().requires_grad_(True)


def check_inputs(inputs: Any, *, allow_nonfinite: bool = False, allow_integer: bool = False) -> Tensor:
    """Validate a batch of model inputs: a floating-point tensor with a batch dimension (integers, e.g.
    token ids, only with ``allow_integer``: gradients are then taken at a layer)."""
    if not isinstance(inputs, Tensor):
        raise PeeringTypeError(
            f"inputs must be a torch.Tensor of shape [B, ...], got {type(inputs).__name__}"
        )
    if allow_integer and not inputs.is_floating_point() and not inputs.is_complex():
        if inputs.ndim < 1:
            raise PeeringValueError(
                f"inputs must have a batch dimension [B, ...], got shape {list(inputs.shape)}"
            )
        return inputs
    if not inputs.is_floating_point():
        hint = " (e.g. images.float() / 255 for uint8 images)" if inputs.dtype == torch.uint8 else ""
        raise PeeringTypeError(
            f"inputs must be a floating-point tensor, got {inputs.dtype}; scale them to the model's input "
            f"range as floats first{hint}, or, for token ids, explain at the embedding layer with "
            "layer=<the embedding module>"
        )
    if inputs.ndim < 2:
        raise PeeringValueError(
            f"inputs must have a batch dimension [B, ...], got shape {list(inputs.shape)}; "
            "for one sample use inputs.unsqueeze(0)"
        )
    if not allow_nonfinite:
        bad = nonfinite_rows(inputs)
        if bad.any():
            rows = bad.nonzero().flatten().tolist()
            raise PeeringValueError(
                f"inputs contain NaN or Inf in {len(rows)} sample(s) (batch indices {rows[:10]}"
                f"{'...' if len(rows) > 10 else ''}); clean them first"
            )
    return inputs


def nonfinite_rows(x: Tensor) -> Tensor:
    """Bool [B]: which samples of a batch contain NaN or Inf."""
    if x.shape[0] == 0 or not x.is_floating_point():
        return torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    return ~torch.isfinite(x.detach()).flatten(1).all(dim=1)


class ForwardKwargs:
    """Extra keyword arguments of the model's forward that follow the samples of a batch: the one object
    that carries them from a batch (the callback's ``unpack``, ``explain``'s ``forward_kwargs``) to the
    engine, through chunks, subsets, merges and the gather across ranks.

    Which arguments are per sample and which are shared is never guessed silently:

    - the names in ``shared`` are passed unchanged to every forward pass, whatever their shape (class
      prototypes, a lookup table);
    - numbers, flags and 0-d tensors are shared;
    - any other tensor must have one row per sample (first dimension ``batch``): it is per sample (an
      attention mask, token type ids), indexed with the rows of every chunk, of every subset and of every
      repeated set of points (SmoothGrad's noisy copies, integrated gradients' path points), so each point
      is run with its own sample's values. A tensor whose first dimension is neither ``batch`` nor
      declared shared is refused, naming it.

    A tensor taken per sample only because its first dimension is ``batch`` is a guess (a shared table
    of 10 prototypes next to a batch of 10 looks the same): unless its rows are all equal (then either
    reading gives the same numbers), it is listed in `unchecked` until `check_guesses` has run the model
    on a part of the batch and found the same class scores as in the whole. Tensors are copied once, out
    of inference mode, so they can take part in a backward pass. A `ForwardKwargs` given where one is
    expected is used as it is (not split again).

    >>> import torch
    >>> kw = ForwardKwargs({"mask": torch.tensor([[1, 0], [1, 1], [0, 1]]), "scale": 2.0}, batch=3)
    >>> kw.rows(torch.tensor([2, 0]))["mask"].tolist(), kw.rows(slice(1, 2))["scale"]
    ([[0, 1], [1, 0]], 2.0)
    >>> both = kw.select(slice(0, 1)).cat(kw.select(slice(2, 3)))
    >>> both.batch, both.rows(slice(None))["mask"].tolist()
    (2, [[1, 0], [0, 1]])
    >>> kw.unchecked   # guessed per sample from its first dimension: checked before use
    ('mask',)
    >>> table = ForwardKwargs({"protos": torch.zeros(3, 4)}, batch=3, shared=["protos"])
    >>> table.rows(slice(0, 1))["protos"].shape   # declared shared: passed whole
    torch.Size([3, 4])
    """

    def __init__(
        self,
        values: Mapping[str, Any] | ForwardKwargs | None,
        batch: int,
        shared: Iterable[str] | None = None,
    ) -> None:
        self.batch = batch
        self.shared: dict[str, Any] = {}
        self.per_sample: dict[str, Tensor] = {}
        self.unchecked: tuple[str, ...] = ()
        declared = _shared_names(shared)
        if isinstance(values, ForwardKwargs):
            if values.batch != batch:
                raise PeeringValueError(
                    f"forward_kwargs were made for a batch of {values.batch}, not {batch}"
                )
            self.per_sample, self.shared = dict(values.per_sample), dict(values.shared)
            self.unchecked = values.unchecked
            for name in declared & set(self.per_sample):  # declared shared after all
                self.shared[name] = self.per_sample.pop(name)
            self.unchecked = tuple(n for n in self.unchecked if n in self.per_sample)
            return
        if values is not None and not isinstance(values, Mapping):
            raise PeeringTypeError(
                f"forward_kwargs must be a mapping of argument names to values, got {type(values).__name__}"
            )
        values = values or {}
        unknown = sorted(declared - set(values))
        if unknown:
            raise PeeringValueError(
                f"shared_kwargs names {unknown}, which are not in forward_kwargs ({sorted(values)}); "
                "pass the names of forward arguments that are the same for every sample"
            )
        guessed = []
        for name, value in values.items():
            if not isinstance(name, str):
                raise PeeringTypeError(f"forward_kwargs keys must be argument names (str), got {name!r}")
            if isinstance(value, Tensor):
                with torch.inference_mode(False):
                    value = value.detach().clone()
                if name not in declared and value.ndim >= 1:
                    if value.shape[0] != batch:
                        raise PeeringValueError(
                            f"forward_kwargs[{name!r}] has shape {list(value.shape)}: its first dimension "
                            f"is not the batch size {batch}, and it is not declared shared. Give it one row "
                            f"per sample ([{batch}, ...]), or pass shared_kwargs=[{name!r}] if the model "
                            "takes it whole for every sample"
                        )
                    self.per_sample[name] = value
                    if batch > 1 and not bool((value == value[:1]).all()):
                        guessed.append(name)
                    continue
            self.shared[name] = value
        self.unchecked = tuple(guessed)

    @classmethod
    def of(
        cls,
        per_sample: Mapping[str, Tensor],
        shared: Mapping[str, Any],
        batch: int,
        unchecked: Iterable[str] = (),
    ) -> ForwardKwargs:
        """Built from parts already split (tensors kept as they are, not copied)."""
        made = cls(None, batch)
        made.per_sample, made.shared = dict(per_sample), dict(shared)
        made.unchecked = tuple(n for n in unchecked if n in made.per_sample)
        return made

    def __bool__(self) -> bool:
        return bool(self.shared or self.per_sample)

    def __repr__(self) -> str:
        return f"ForwardKwargs(per_sample={sorted(self.per_sample)}, shared={sorted(self.shared)})"

    @property
    def layout(self) -> tuple[tuple[str, torch.Size, torch.dtype], ...]:
        """One sample's per-sample arguments: (name, shape, dtype) each, sorted by name."""
        values = self.per_sample
        return tuple((k, values[k].shape[1:], values[k].dtype) for k in sorted(values))

    def select(self, index: slice | Tensor) -> ForwardKwargs:
        """The same arguments for a subset of the samples (a slice or an int64 tensor of batch indices)."""
        size = len(range(self.batch)[index]) if isinstance(index, slice) else index.numel()
        return ForwardKwargs.of(self._picked(index), self.shared, size, self.unchecked)

    def rows(self, index: slice | Tensor) -> dict[str, Any]:
        """The keyword arguments for the samples ``index`` (a slice or an int64 tensor of batch indices)."""
        return {**self.shared, **self._picked(index)}

    def cat(self, other: ForwardKwargs) -> ForwardKwargs:
        """These samples' arguments followed by ``other``'s (the same per-sample names; ours are shared)."""
        theirs = other.per_sample
        per_sample = {k: torch.cat([v, theirs[k].to(v.device, v.dtype)]) for k, v in self.per_sample.items()}
        unchecked = {*self.unchecked, *other.unchecked}
        return ForwardKwargs.of(per_sample, self.shared, self.batch + other.batch, sorted(unchecked))

    def to(self, device: str | torch.device) -> ForwardKwargs:
        """On ``device``, detached, as ordinary tensors (never inference tensors, which cannot be kept)."""
        with torch.inference_mode(False):
            moved = {k: _ordinary(v.to(device)) for k, v in self.per_sample.items()}
        return ForwardKwargs.of(moved, self.shared, self.batch, self.unchecked)

    def _picked(self, index: slice | Tensor) -> dict[str, Tensor]:
        if isinstance(index, Tensor):
            return {k: v[index.to(v.device)] for k, v in self.per_sample.items()}
        return {k: v[index] for k, v in self.per_sample.items()}


def _shared_names(shared: Any) -> set[str]:
    """``shared_kwargs`` checked: None or an iterable of argument names."""
    if shared is None:
        return set()
    if isinstance(shared, str) or not isinstance(shared, Iterable):
        raise PeeringTypeError(
            f"shared_kwargs must be a list of forward argument names (e.g. ['prototypes']), got {shared!r}"
        )
    names = list(shared)
    if not all(isinstance(n, str) for n in names):
        raise PeeringTypeError(f"shared_kwargs must hold argument names (str), got {names!r}")
    return set(names)


def _ordinary(t: Tensor) -> Tensor:
    """A detached tensor that is not an inference tensor (copied only when it is one)."""
    return t.detach().clone() if t.is_inference() else t.detach()


def check_output(output: Any, choices: tuple[str, ...] = OUTPUTS, *, name: str = "output") -> str:
    """``output`` when it is one of ``choices`` (`OUTPUTS` unless the caller takes fewer)."""
    if not isinstance(output, str) or output not in choices:
        extra = ""
        if output == "raw" and "raw" not in choices:
            extra = " ('raw' has no classes: it is for explaining a regression with peering.explain)"
        raise PeeringValueError(f"{name} must be one of {choices}, got {output!r}{extra}")
    return output


def check_head(num_outputs: int, output: str) -> None:
    """Refuse a softmax over one score: it is 1 whatever the input, so its gradient is zero everywhere."""
    if num_outputs == 1 and output in SOFTMAX:
        raise PeeringValueError(
            f"the model has one output, and output={output!r} takes a softmax over the outputs, which is 1 "
            "for a single score whatever the input (its gradient is zero everywhere). Pass "
            "output='sigmoid' for a single-logit binary classifier (the probability of the positive class), "
            "or output='raw' for a model whose output is the quantity itself (a regression)"
        )


def probabilities(scores: Tensor, output: str) -> Tensor:
    """The class probabilities [B, C] the pictures and results report for ``output``: the softmax of the
    scores, their sigmoid for "sigmoid" (independent per class; also for "logit" on a one-output model,
    the only probability a single logit has), and NaN for "raw" (a regression has none).

    >>> scores = torch.tensor([[0.0, 0.0]])
    >>> probabilities(scores, "sigmoid").tolist(), probabilities(scores, "logit").tolist()
    ([[0.5, 0.5]], [[0.5, 0.5]])
    """
    if output == "raw":
        return torch.full_like(scores, float("nan"))
    if output == "sigmoid" or scores.shape[-1] == 1:
        return scores.sigmoid()
    return scores.softmax(dim=-1)


def _output_fn_hint(out: Any) -> str:
    if isinstance(out, (tuple, list)):
        return "output_fn=lambda out: out[0]"
    if isinstance(out, dict):
        key = next((k for k in ("logits", "scores", "output") if k in out), next(iter(out), "logits"))
        return f"output_fn=lambda out: out[{key!r}]"
    if hasattr(out, "logits"):
        return "output_fn=lambda out: out.logits"
    return "output_fn=... returning a [B, C] tensor"


def class_scores(
    model: nn.Module,
    x: Tensor,
    output_fn: Callable[[Any], Tensor] | None = None,
    kwargs: Mapping[str, Any] | None = None,
) -> Tensor:
    """Run the model (``model(x, **kwargs)``) and return its class scores [B, C] as a float tensor, or say
    clearly why not."""
    try:
        out = model(x, **(kwargs or {}))
    except Exception as err:
        param = next((p for p in model.parameters() if p.is_floating_point()), None)
        mismatch = param is not None and x.is_floating_point() and param.dtype != x.dtype
        if isinstance(err, RuntimeError) and param is not None and mismatch:
            raise PeeringTypeError(
                f"the inputs are {x.dtype} but the model's parameters are {param.dtype}; convert one to "
                f"the other (e.g. inputs.to({param.dtype})). The model said: {err}"
            ) from err
        refuse_unbatched(model, x, output_fn, kwargs)
        raise
    if output_fn is not None:
        out = output_fn(out)
    elif not isinstance(out, Tensor):
        raise PeeringTypeError(
            f"the model returned a {type(out).__name__}, not a tensor of class scores [B, C]; pass "
            f"{_output_fn_hint(out)} to select them"
        )
    if not isinstance(out, Tensor):
        raise PeeringTypeError(
            f"output_fn must return a tensor of class scores [B, C], got {type(out).__name__}"
        )
    if out.ndim != 2 or out.shape[0] != x.shape[0]:
        refuse_unbatched(model, x, output_fn, kwargs)
        raise PeeringValueError(
            f"expected class scores of shape [B, C] = [{x.shape[0]}, C] from the model, got "
            f"{list(out.shape)}; peering explains classifiers that map [B, ...] inputs to [B, C] scores"
        )
    if not out.is_floating_point():
        raise PeeringTypeError(f"the model's class scores must be floating point, got {out.dtype}")
    if out.dtype in (torch.float16, torch.bfloat16):
        out = out.float()
    return out


def refuse_unbatched(
    model: nn.Module, x: Tensor, output_fn: Callable[[Any], Tensor] | None, kwargs: Mapping[str, Any] | None
) -> None:
    """When the model failed on ``x`` (or gave scores of another shape), and takes ``x`` as ONE sample
    (``x[None]`` gives scores [1, C]), the inputs lack their batch dimension: say so, naming the shape the
    model takes. Otherwise return, and the caller raises what it had."""
    if x.ndim < 1 or x.shape[0] == 0:
        return
    if _scores_shape(model, x, output_fn, kwargs or {}) == (x.shape[0],):
        return  # x itself gives [B, C] scores: what failed was not the batch dimension
    one = {k: v[None] if isinstance(v, Tensor) and v.ndim >= 1 else v for k, v in (kwargs or {}).items()}
    try:
        with torch.no_grad():
            out = model(x[None], **one)
            out = output_fn(out) if output_fn is not None else out
    except Exception:
        return
    if isinstance(out, Tensor) and out.ndim == 2 and out.shape[0] == 1:
        raise PeeringValueError(
            f"inputs of shape {list(x.shape)} look like one sample without its batch dimension: the model "
            f"takes a batch [B, {', '.join(str(d) for d in x.shape)}] (it gives [1, {out.shape[1]}] scores "
            "for inputs[None]); pass inputs.unsqueeze(0) for one sample"
        )


def _scores_shape(
    model: nn.Module, x: Tensor, output_fn: Callable[[Any], Tensor] | None, kwargs: Mapping[str, Any]
) -> tuple[int, ...] | None:
    """(B,) when a no-grad forward pass of ``x`` gives class scores [B, C]; None when it fails or gives
    anything else."""
    try:
        with torch.no_grad():
            out = model(x, **kwargs)
            out = output_fn(out) if output_fn is not None else out
    except Exception:
        return None
    return (out.shape[0],) if isinstance(out, Tensor) and out.ndim == 2 else None


def transform(scores: Tensor, output: str) -> Tensor:
    """The quantity that is differentiated: softmax, log-softmax, the logits themselves, the sigmoid of
    each, or the raw outputs. A softmax over a single output is refused (see `check_head`).

    >>> transform(torch.tensor([[0.0, 2.0]]), "sigmoid").tolist()[0][0]
    0.5
    """
    check_head(scores.shape[-1], output)
    if output == "probability":
        return scores.softmax(dim=1)
    if output == "log_probability":
        return scores.log_softmax(dim=1)
    if output == "sigmoid":
        return scores.sigmoid()
    return scores


def check_targets(target: Any, batch: int, num_classes: int, *, name: str = "target") -> Tensor:
    """Turn an int, [B] or [B, K] target into int64 [B, K] and check every class is in range."""
    if isinstance(target, bool):
        raise PeeringTypeError(f"{name} must be an int or an int64 tensor, got a bool")
    if isinstance(target, int):
        t = torch.full((batch, 1), target, dtype=torch.int64)
    elif isinstance(target, Tensor):
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise PeeringTypeError(f"{name} must be an integer tensor of class indices, got {target.dtype}")
        t = target.detach().to(torch.int64)
        if t.is_inference():  # made under torch.inference_mode(): autograd could not save it for backward
            with torch.inference_mode(False):
                t = t.clone()
        if t.ndim == 0:
            t = t.expand(batch)
        if t.ndim == 1:
            t = t.unsqueeze(1)
        if t.ndim != 2 or t.shape[0] != batch:
            raise PeeringValueError(
                f"{name} must be an int, a [B] or a [B, K] tensor with B = {batch}, got shape "
                f"{list(target.shape)}"
            )
    else:
        raise PeeringTypeError(f"{name} must be an int or an int64 tensor, got {type(target).__name__}")
    if t.numel() and (t.min() < 0 or t.max() >= num_classes):
        raise PeeringValueError(
            f"{name} has classes outside [0, {num_classes - 1}] (got min {int(t.min())}, "
            f"max {int(t.max())}); the model has {num_classes} classes"
        )
    return t


def num_classes(
    model: nn.Module,
    x: Tensor,
    output_fn: Callable[[Any], Tensor] | None = None,
    kwargs: ForwardKwargs | None = None,
) -> int:
    """The number of classes, from a no-grad forward pass of one sample (or of the empty batch)."""
    with torch.no_grad():
        try:
            one = kwargs.rows(slice(0, 1)) if kwargs else None
            return class_scores(model, x[:1], output_fn, one).shape[1]
        except Exception:
            refuse_unbatched(model, x, output_fn, kwargs.rows(slice(None)) if kwargs else None)
            raise
