"""A loaded classifier (`LoadedModel`), and running it for class scores (`class_scores_of`,
`output_picker`)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from peering.errors import CheckpointError

__all__ = ["LoadedModel", "class_scores_of", "output_picker"]


@dataclass(frozen=True)
class LoadedModel:
    """A classifier ready to explain, and the input it expects.

    Attributes:
        model: the `nn.Module`, in eval mode. For a Hugging Face image model it takes images in [0, 1]
            and applies its image processor's normalisation itself.
        source: a short description for messages, e.g. ``"DigitClassifier from runs/demo/model.ckpt"``.
        channels: image channels the model takes (1 or 3), or None when unknown (then the images' own).
        size: (height, width) the model takes, or None when unknown (then the first image's size).
        flat: the model takes flat vectors [B, C * H * W] rather than images [B, C, H, W].
        num_classes: the number of class scores, or None until the model has been run once.
        output_fn: picks the class scores out of the model's output (``--output-fn``), or None when the
            model returns them as a tensor; pass it on as `peering.explain`'s ``output_fn``.
        tokenizer: a text model's tokenizer (Hugging Face); None for image models.
        labels: class names by index (a Hugging Face config's ``id2label``), or None.
        notes: what loading did that the user should know (shown by the command line as ``note:``).
    """

    model: nn.Module
    source: str
    channels: int | None = None
    size: tuple[int, int] | None = None
    flat: bool = False
    num_classes: int | None = None
    output_fn: Callable[[Any], Any] | None = None
    tokenizer: Any = None
    labels: tuple[str, ...] | None = None
    notes: tuple[str, ...] = ()

    def batch(self, images: Tensor) -> Tensor:
        """Images [B, C, H, W] in the layout the model takes (flattened for a flat model).

        >>> m = LoadedModel(nn.Linear(64, 10), "example", channels=1, size=(8, 8), flat=True)
        >>> m.batch(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 64])
        """
        return images.flatten(1) if self.flat else images

    @property
    def is_text(self) -> bool:
        """True for a text classifier (it has a tokenizer).

        >>> LoadedModel(nn.Linear(4, 2), "example").is_text
        False
        """
        return self.tokenizer is not None


def output_picker(name: str) -> Callable[[Any], Any]:
    """A function taking a model's output to the part named ``name``: an attribute (``logits`` of a
    Hugging Face output), a key of a dict, or an index of a tuple (``"0"``). A part that is not there is a
    `CheckpointError` listing the parts that are.

    >>> from types import SimpleNamespace
    >>> output_picker("logits")(SimpleNamespace(logits=1, loss=2)), output_picker("0")((3, 4))
    (1, 3)
    >>> output_picker("scores")({"logits": 1})
    Traceback (most recent call last):
    ...
    peering.errors.CheckpointError: --output-fn scores: the model's output (a dict) has no part ...
    """

    def pick(out: Any) -> Any:
        if isinstance(out, Mapping) and name in out:
            return out[name]
        indexable = isinstance(out, (tuple, list)) and name.lstrip("-").isdigit()
        if indexable and -len(out) <= int(name) < len(out):
            return out[int(name)]
        if not isinstance(out, (Mapping, tuple, list)) and hasattr(out, name):
            return getattr(out, name)
        raise CheckpointError(
            f"--output-fn {name}: the model's output (a {type(out).__name__}) has no part {name!r}; it has: "
            f"{', '.join(_parts(out)) or 'nothing that can be named'}"
        )

    pick.__qualname__ = f"output_picker({name!r})"
    return pick


def _parts(out: Any) -> list[str]:
    """The names `output_picker` can take for this output."""
    if isinstance(out, Mapping):
        return [str(k) for k in out]
    if isinstance(out, (tuple, list)):
        return [str(i) for i in range(len(out))]
    return [k for k in vars(out) if not k.startswith("_")] if hasattr(out, "__dict__") else []


def one_line(err: BaseException) -> str:
    """An exception as one line of at most 300 characters, its type first. Of a message over several
    lines that ends in the error itself (TorchScript's interpreter puts its traceback first), the last
    line."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    if len(lines) > 2 and re.match(r"^[A-Za-z_.]*(Error|Exception)\b", last):
        return last[:300]
    text = " ".join(str(err).split())
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def class_scores_of(loaded: LoadedModel, images: Tensor) -> Tensor:
    """Run the model on images [B, C, H, W] without gradients; class scores [B, C] or a `CheckpointError`.

    When the model fails and its input size or channels were not known from it (they were taken from the
    first image), the error says to pass ``--image-size``/``--channels``.
    One output (C = 1) is taken: a single-logit binary model or a regression, which `peering.explain`
    takes with ``output="sigmoid"`` or ``"raw"`` (and refuses with a softmax, naming both).

    >>> m = LoadedModel(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval(), "example", 1, (8, 8))
    >>> class_scores_of(m, torch.zeros(3, 1, 8, 8)).shape
    torch.Size([3, 10])
    >>> class_scores_of(LoadedModel(m.model, "example"), torch.zeros(1, 1, 20, 20))
    Traceback (most recent call last):
    ...
    peering.errors.CheckpointError: example failed on an input of shape [1, 1, 20, 20]:... --image-size ...
    """
    x = loaded.batch(images)
    try:
        with torch.no_grad():
            out = loaded.model(x)
    except Exception as err:  # a user's model can raise anything
        hint = ""
        if loaded.size is None or loaded.channels is None:
            hint = (
                "; its input size and channels could not be read from the model, so the first image's "
                f"({x.shape[1]} channel(s), {'x'.join(map(str, x.shape[2:]))}) were tried: pass "
                "--image-size N and --channels C for the images it was trained on (images of another size "
                "are resized)"
            )
        raise CheckpointError(
            f"{loaded.source} failed on an input of shape {list(x.shape)}: {one_line(err)}{hint}"
        ) from err
    return _scores(loaded, out, x)


def _scores(loaded: LoadedModel, out: Any, x: Tensor) -> Tensor:
    if loaded.output_fn is not None:
        out = loaded.output_fn(out)
    elif not isinstance(out, Tensor):
        parts = _parts(out)
        known = ("logits", "scores", "output", "0")
        best = next((p for p in known if p in parts), parts[0] if parts else None)
        hint = f"; pass --output-fn {best} (the part holding the class scores)" if best else ""
        raise CheckpointError(
            f"{loaded.source} does not return class scores: its output is a {type(out).__name__}, "
            f"not a tensor [B, C]{hint}"
        )
    if not isinstance(out, Tensor):
        raise CheckpointError(
            f"{loaded.source}: --output-fn picked a {type(out).__name__}, not a tensor of class scores [B, C]"
        )
    if out.ndim != 2 or out.shape[0] != x.shape[0] or out.shape[1] < 1 or not out.is_floating_point():
        raise CheckpointError(
            f"{loaded.source} does not return class scores: expected a float tensor [B, C] with B = "
            f"{x.shape[0]} and C >= 1, got {out.dtype} {list(out.shape)}"
        )
    return out.float()
