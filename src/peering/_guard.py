"""Shared input checks and the "leave everything as it was" context for gradient computations.

Private: `explain`, `morph` and the callback use these so that every entry point validates the same way
and restores the same state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
from torch import Tensor, nn

Output = Literal["probability", "log_probability", "logit"]
OUTPUTS: tuple[str, ...] = ("probability", "log_probability", "logit")


@contextlib.contextmanager
def eval_mode(model: nn.Module, rng_devices: tuple[torch.device, ...] = ()) -> Iterator[None]:
    """Run `model` in eval mode, then restore each submodule's own ``training`` flag and the RNG state.

    Each flag is put back one by one (never a blanket `.train()`, which would unfreeze a submodule the
    user froze). The CPU RNG is restored, and so is that of each device in ``rng_devices``.
    """
    modes = [(module, module.training) for module in model.modules()]
    with torch.random.fork_rng(devices=list(rng_devices)):
        model.eval()
        try:
            yield
        finally:
            for module, training in modes:
                module.training = training


@contextlib.contextmanager
def gradient_context(model: nn.Module) -> Iterator[None]:
    """`eval_mode` with gradients enabled, even when the caller is inside `torch.no_grad()` or
    `torch.inference_mode()` (inputs must then be cloned inside this context)."""
    with eval_mode(model), torch.inference_mode(False), torch.enable_grad():
        yield


def detached_leaf(x: Tensor) -> Tensor:
    """A fresh leaf copy of `x` that requires grad, safe even if `x` is an inference-mode tensor."""
    return x.detach().clone().requires_grad_(True)


def check_inputs(inputs: Any, *, allow_nonfinite: bool = False) -> Tensor:
    """Validate a batch of model inputs: a floating-point tensor with a batch dimension."""
    if not isinstance(inputs, Tensor):
        raise TypeError(f"inputs must be a torch.Tensor of shape [B, ...], got {type(inputs).__name__}")
    if not inputs.is_floating_point():
        hint = " (e.g. images.float() / 255 for uint8 images)" if inputs.dtype == torch.uint8 else ""
        raise TypeError(
            f"inputs must be a floating-point tensor, got {inputs.dtype}; scale them to the model's input "
            f"range as floats first{hint}"
        )
    if inputs.ndim < 2:
        raise ValueError(
            f"inputs must have a batch dimension [B, ...], got shape {list(inputs.shape)}; "
            "for one sample use inputs.unsqueeze(0)"
        )
    if not allow_nonfinite:
        bad = nonfinite_rows(inputs)
        if bad.any():
            rows = bad.nonzero().flatten().tolist()
            raise ValueError(
                f"inputs contain NaN or Inf in {len(rows)} sample(s) (batch indices {rows[:10]}"
                f"{'...' if len(rows) > 10 else ''}); clean them first"
            )
    return inputs


def nonfinite_rows(x: Tensor) -> Tensor:
    """Bool [B]: which samples of a batch contain NaN or Inf."""
    if x.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool, device=x.device)
    return ~torch.isfinite(x.detach()).flatten(1).all(dim=1)


def check_output(output: str) -> None:
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")


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
    model: nn.Module, x: Tensor, output_fn: Callable[[Any], Tensor] | None = None
) -> Tensor:
    """Run the model and return its class scores [B, C] as a float tensor, or say clearly why not."""
    try:
        out = model(x)
    except RuntimeError as err:
        param = next((p for p in model.parameters() if p.is_floating_point()), None)
        if param is not None and param.dtype != x.dtype:
            raise TypeError(
                f"the inputs are {x.dtype} but the model's parameters are {param.dtype}; convert one to "
                f"the other (e.g. inputs.to({param.dtype})). The model said: {err}"
            ) from err
        raise
    if output_fn is not None:
        out = output_fn(out)
    elif not isinstance(out, Tensor):
        raise TypeError(
            f"the model returned a {type(out).__name__}, not a tensor of class scores [B, C]; pass "
            f"{_output_fn_hint(out)} to select them"
        )
    if not isinstance(out, Tensor):
        raise TypeError(f"output_fn must return a tensor of class scores [B, C], got {type(out).__name__}")
    if out.ndim != 2 or out.shape[0] != x.shape[0]:
        raise ValueError(
            f"expected class scores of shape [B, C] = [{x.shape[0]}, C] from the model, got "
            f"{list(out.shape)}; peering explains classifiers that map [B, ...] inputs to [B, C] scores"
        )
    if not out.is_floating_point():
        raise TypeError(f"the model's class scores must be floating point, got {out.dtype}")
    if out.dtype in (torch.float16, torch.bfloat16):
        out = out.float()
    return out


def transform(scores: Tensor, output: str) -> Tensor:
    """The quantity that is differentiated: softmax, log-softmax or the raw logits."""
    if output == "probability":
        return scores.softmax(dim=1)
    if output == "log_probability":
        return scores.log_softmax(dim=1)
    return scores


def check_targets(target: Any, batch: int, num_classes: int, *, name: str = "target") -> Tensor:
    """Turn an int, [B] or [B, K] target into int64 [B, K] and check every class is in range."""
    if isinstance(target, bool):
        raise TypeError(f"{name} must be an int or an int64 tensor, got a bool")
    if isinstance(target, int):
        t = torch.full((batch, 1), target, dtype=torch.int64)
    elif isinstance(target, Tensor):
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor of class indices, got {target.dtype}")
        t = target.detach().to(torch.int64)
        if t.is_inference():  # made under torch.inference_mode(): autograd could not save it for backward
            with torch.inference_mode(False):
                t = t.clone()
        if t.ndim == 0:
            t = t.expand(batch)
        if t.ndim == 1:
            t = t.unsqueeze(1)
        if t.ndim != 2 or t.shape[0] != batch:
            raise ValueError(
                f"{name} must be an int, a [B] or a [B, K] tensor with B = {batch}, got shape "
                f"{list(target.shape)}"
            )
    else:
        raise TypeError(f"{name} must be an int or an int64 tensor, got {type(target).__name__}")
    if t.numel() and (t.min() < 0 or t.max() >= num_classes):
        raise ValueError(
            f"{name} has classes outside [0, {num_classes - 1}] (got min {int(t.min())}, "
            f"max {int(t.max())}); the model has {num_classes} classes"
        )
    return t


def num_classes(model: nn.Module, x: Tensor, output_fn: Callable[[Any], Tensor] | None = None) -> int:
    """The number of classes, from a no-grad forward pass of one sample (or of the empty batch)."""
    with torch.no_grad():
        return class_scores(model, x[:1], output_fn).shape[1]
