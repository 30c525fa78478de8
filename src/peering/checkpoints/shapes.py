"""The input a loaded model takes, read off the model where it can be: attributes (``in_channels``,
``image_size``), the first layer's weights (a convolution's channels; a linear layer's features, for a
model that takes flat images), or a ``torch.export`` program's example input."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from peering.errors import CheckpointError

__all__ = ["Exported", "input_of"]


def _first_layer(module: nn.Module) -> tuple[str, Tensor] | None:
    """("conv" or "linear", weight) of the first convolution or linear layer, scripted ones included."""
    for sub in module.modules():
        kind = getattr(sub, "original_name", type(sub).__name__)  # TorchScript keeps the class name there
        weight = getattr(sub, "weight", None)
        if not isinstance(weight, Tensor):
            continue
        if kind == "Conv2d" and weight.ndim == 4:
            return "conv", weight
        if kind == "Linear" and weight.ndim == 2:
            return "linear", weight
        if kind in ("Conv1d", "Conv3d", "Embedding", "Conv2dNormActivation"):
            return None
    return None


def input_of(
    module: nn.Module, channels: int | None, image_size: int | None
) -> tuple[int | None, tuple[int, int] | None, bool]:
    """(channels, size, flat) the model takes: given, from attributes, or from its first layer.

    >>> input_of(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten()), None, None)
    (3, None, False)
    >>> input_of(nn.Sequential(nn.Linear(784, 10)), None, None)
    (1, (28, 28), True)
    """
    c = channels if channels is not None else getattr(module, "in_channels", None)
    s = image_size if image_size is not None else getattr(module, "image_size", None)
    c = c if isinstance(c, int) and not isinstance(c, bool) else None
    size = (int(s), int(s)) if isinstance(s, int) and not isinstance(s, bool) else None
    first = _first_layer(module)
    if first is not None and first[0] == "conv" and c is None:
        c = int(first[1].shape[1])
    has_conv = any(
        getattr(m, "original_name", type(m).__name__).startswith("Conv") for m in module.modules()
    )
    if first is not None and first[0] == "linear" and not has_conv:
        d = int(first[1].shape[1])
        for ch in [c] if c else [1, 3]:
            side = math.isqrt(d // ch) if d % ch == 0 else 0
            if side and ch * side * side == d and (size is None or size == (side, side)):
                return ch, (side, side), True
        raise CheckpointError(
            f"the model's first layer takes {d} features, which is not a square image of 1 or 3 channels; "
            "peering's CLI feeds it images"
        )
    return c, size, False


def input_of_export(program: Any) -> tuple[int, ...] | None:
    """The shape of a ``torch.export`` program's one user input (its example's), or None."""
    names = list(program.graph_signature.user_inputs)
    if len(names) != 1:
        return None
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name == names[0]:
            value = node.meta.get("val")
            shape = getattr(value, "shape", None)
            if shape is None:
                return None
            return tuple(d if isinstance(d, int) else -1 for d in shape)
    return None


class Exported(nn.Module):
    """A ``torch.export`` program's module, made usable like any model: ``train()``/``eval()`` change the
    flag only (an exported graph refuses them; its mode was fixed when it was exported), and a program
    exported with a fixed batch of ``batch`` samples is run on any batch, split into batches of that size
    (the last one padded with copies of its last sample, whose outputs are dropped).

    >>> fixed = Exported(nn.Linear(4, 3), batch=2)
    >>> fixed(torch.rand(5, 4)).shape
    torch.Size([5, 3])
    """

    def __init__(self, model: nn.Module, batch: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.batch = batch

    def train(self, mode: bool = True) -> Exported:
        self.training = mode
        return self

    def forward(self, x: Tensor) -> Any:
        if self.batch is None or x.shape[0] == self.batch:
            return self.model(x)
        outs = []
        for start in range(0, x.shape[0], self.batch):
            part = x[start : start + self.batch]
            short = self.batch - part.shape[0]
            if short:
                part = torch.cat([part, part[-1:].expand(short, *part.shape[1:])])
            outs.append(self.model(part)[: self.batch - short])
        return torch.cat(outs)
