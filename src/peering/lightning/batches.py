"""Batches as the callbacks and the dataset writer see them: one `Batch` (inputs, labels, forward
arguments, dataset indices), made once from whatever the DataLoader yields, and the model run on it.

- `default_unpack`: the batch shapes peering understands without help (tensors, tuples, dicts, Hugging
  Face dicts); ``unpack=`` replaces it.
- `unpack_batch`: any batch -> a checked `Batch` whose forward arguments are one
  `peering._model.ForwardKwargs`, carried from here to the engine unchanged.
- `model_scores`, `returned_logits`, `as_model_dtype`: the class scores of a batch, computed in eval mode
  without gradients (everything put back), or taken from what the step returned.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from peering._guesses import check_guesses
from peering._model import ForwardKwargs, class_scores, eval_mode
from peering.errors import PeeringTypeError

__all__ = ["Batch", "as_model_dtype", "default_unpack", "model_scores", "returned_logits", "unpack_batch"]

_INPUT_KEYS = ("image", "images", "input", "inputs", "x")
_HF_INPUT_KEYS = ("input_ids", "pixel_values")
_LABEL_KEYS = ("label", "labels", "target", "targets", "y")
_INDEX_KEYS = ("index", "indices", "idx")


@dataclass(frozen=True)
class Batch:
    """One batch as peering uses it.

    Attributes:
        inputs: the model's inputs [B, ...] (float, or integer token ids when explained at a layer).
        labels: int64 [B] class labels, or None when the batch has none (one-hot or soft labels [B, C]
            become their argmax).
        forward: the model's extra keyword arguments, per sample or shared (`ForwardKwargs`).
        indices: int64 [B] dataset indices when the batch carries them (``(x, y, index)`` or a dict with
            ``"index"``), else None.
    """

    inputs: Tensor
    labels: Tensor | None
    forward: ForwardKwargs
    indices: Tensor | None = None

    def __len__(self) -> int:
        return self.inputs.shape[0]


def default_unpack(batch: Any) -> tuple[Tensor, Tensor | None, dict[str, Any]]:
    """Inputs, labels and extra forward arguments of a batch.

    - a tensor: inputs only;
    - a tuple/list: its first two items;
    - a Hugging Face dict (``input_ids`` or ``pixel_values``): those as inputs, ``labels`` (or another
      label key below) as labels, and every other tensor (``attention_mask``, ``token_type_ids``, ...) as
      forward arguments, so the model is called as ``model(input_ids, **others)``;
    - another dict: inputs under ``image``/``images``/``input``/``inputs``/``x``, labels under
      ``label``/``labels``/``target``/``targets``/``y``.

    Raises:
        TypeError: the batch has none of these shapes; pass ``unpack=`` to the callback.

    >>> import torch
    >>> x, y = torch.rand(2, 1, 8, 8), torch.tensor([3, 5])
    >>> default_unpack((x, y))[1].tolist(), default_unpack({"image": x, "label": y})[1].tolist()
    ([3, 5], [3, 5])
    >>> default_unpack([x])[1] is None
    True
    >>> ids, mask = torch.tensor([[101, 7, 102, 0]]), torch.tensor([[1, 1, 1, 0]])
    >>> inputs, labels, kwargs = default_unpack({"input_ids": ids, "attention_mask": mask, "labels": y[:1]})
    >>> inputs is ids, labels.tolist(), list(kwargs)
    (True, [3], ['attention_mask'])
    """
    if isinstance(batch, Tensor):
        return batch, None, {}
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise PeeringTypeError("the batch is an empty sequence")
        return batch[0], batch[1] if len(batch) > 1 else None, {}
    if isinstance(batch, Mapping):
        label_key = next((k for k in _LABEL_KEYS if k in batch), None)
        labels = batch[label_key] if label_key is not None else None
        hf_key = next((k for k in _HF_INPUT_KEYS if k in batch), None)
        if hf_key is not None:
            skip = (hf_key, label_key, *_INDEX_KEYS)
            others = {k: v for k, v in batch.items() if k not in skip and isinstance(v, Tensor)}
            return batch[hf_key], labels, others
        inputs = next((batch[k] for k in _INPUT_KEYS if k in batch), None)
        if inputs is None:
            raise PeeringTypeError(
                f"the batch dict has none of the input keys {_HF_INPUT_KEYS + _INPUT_KEYS} (keys: "
                f"{list(batch)[:10]})"
            )
        return inputs, labels, {}
    raise PeeringTypeError(f"cannot take inputs and labels from a batch of type {type(batch).__name__}")


def unpack_batch(
    batch: Any,
    unpack: Callable[[Any], Any] | None = None,
    *,
    allow_integer: bool = False,
    shared: Sequence[str] | None = None,
    multilabel: bool = False,
) -> Batch:
    """A checked `Batch` from ``unpack(batch)`` (default `default_unpack`), which returns ``(inputs,
    labels)``, ``(inputs, labels, forward_kwargs)`` or ``(inputs, labels, forward_kwargs, indices)``
    (the dataset indices, else taken from the batch). Labels that are not class indices [B] become None
    (one-hot or soft labels [B, C] become their argmax, unless ``multilabel``: then they are several
    labels per sample, and None). The forward arguments named in ``shared`` are passed whole (see
    `peering._model.ForwardKwargs`); ``forward_kwargs`` may also be a `ForwardKwargs`.

    Raises `PeeringTypeError` when the inputs are not a floating-point tensor [B, ...] (integers are taken
    with ``allow_integer``: token ids explained at a layer) or ``unpack`` returns something else.

    >>> import torch
    >>> b = unpack_batch((torch.rand(4, 3), torch.tensor([0, 1, 2, 1])))
    >>> len(b), b.labels.tolist(), bool(b.forward)
    (4, [0, 1, 2, 1], False)
    """
    unpacked = (unpack or default_unpack)(batch)
    if not isinstance(unpacked, (tuple, list)) or len(unpacked) not in (2, 3, 4):
        raise PeeringTypeError(
            "unpack must return (inputs, labels), (inputs, labels, forward_kwargs) or (inputs, labels, "
            f"forward_kwargs, indices), got {type(unpacked).__name__}"
        )
    inputs, labels = unpacked[0], unpacked[1]
    kwargs = unpacked[2] if len(unpacked) >= 3 and unpacked[2] is not None else {}
    if not isinstance(kwargs, (Mapping, ForwardKwargs)) or (
        isinstance(kwargs, Mapping) and not all(isinstance(k, str) for k in kwargs)
    ):
        raise PeeringTypeError(
            f"forward_kwargs must be a dict of argument names, got {type(kwargs).__name__}"
        )
    _check_inputs(inputs, allow_integer)
    labels = None if multilabel and isinstance(labels, Tensor) and labels.ndim == 2 else labels
    forward = ForwardKwargs(kwargs, inputs.shape[0], shared)
    indices = _indices((None, None, unpacked[3]) if len(unpacked) == 4 else batch, inputs.shape[0])
    return Batch(inputs, _class_labels(labels, inputs.shape[0]), forward, indices)


def _check_inputs(inputs: Any, allow_integer: bool) -> None:
    if isinstance(inputs, Tensor) and allow_integer and inputs.ndim >= 1 and not inputs.is_complex():
        return  # explained at a layer: token ids are fine
    if not isinstance(inputs, Tensor) or not inputs.is_floating_point() or inputs.ndim < 2:
        what = (
            f"a {inputs.dtype} tensor of shape {list(inputs.shape)}"
            if isinstance(inputs, Tensor)
            else type(inputs).__name__
        )
        hint = ""
        if isinstance(inputs, Tensor) and not inputs.is_floating_point():
            hint = " (for token ids, pass layer=<the embedding module> to the callback)"
        raise PeeringTypeError(f"the inputs must be a floating-point tensor [B, ...], got {what}{hint}")


def _class_labels(labels: Any, batch: int) -> Tensor | None:
    if isinstance(labels, Tensor) and labels.ndim == 2 and labels.shape[0] == batch:
        labels = labels.argmax(dim=1)  # one-hot or soft labels
    ok = isinstance(labels, Tensor) and labels.ndim == 1 and labels.shape[0] == batch
    if not ok or labels.is_floating_point() or labels.is_complex():
        return None
    return labels


def _indices(batch: Any, size: int) -> Tensor | None:
    """The dataset indices a batch carries: a third item of a tuple, or an index key of a dict."""
    found: Any = None
    if isinstance(batch, (tuple, list)) and len(batch) == 3:
        found = batch[2]
    elif isinstance(batch, Mapping):
        found = next((batch[k] for k in _INDEX_KEYS if k in batch), None)
    if isinstance(found, Tensor) and found.ndim == 1 and found.shape[0] == size:
        return None if found.is_floating_point() else found.to(torch.int64)
    return None


def returned_logits(outputs: Any, batch_size: int) -> Tensor | None:
    """The logits a step returned as ``{"logits": [B, C]}``, detached, or None.

    >>> import torch
    >>> returned_logits({"loss": 0.1, "logits": torch.zeros(4, 3)}, 4).shape, returned_logits(None, 4)
    (torch.Size([4, 3]), None)
    """
    if not isinstance(outputs, Mapping):
        return None
    logits = outputs.get("logits")
    if (
        isinstance(logits, Tensor)
        and logits.ndim == 2
        and logits.shape[0] == batch_size
        and logits.shape[1] >= 2
        and logits.is_floating_point()
    ):
        return logits.detach()
    return None


def as_model_dtype(module: nn.Module, inputs: Tensor) -> Tensor:
    """Float inputs in the module's floating dtype (e.g. under ``precision="bf16-true"``); others as they
    are.

    >>> import torch
    >>> as_model_dtype(torch.nn.Linear(2, 2).double(), torch.zeros(1, 2)).dtype
    torch.float64
    """
    dtype = getattr(module, "dtype", None)
    if dtype is None:
        dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point and inputs.is_floating_point():
        return inputs.to(dtype) if inputs.dtype != dtype else inputs
    return inputs


def model_scores(
    module: nn.Module,
    inputs: Tensor,
    forward: ForwardKwargs | None = None,
    output_fn: Callable[[Any], Tensor] | None = None,
) -> Tensor:
    """The class scores [B, C] of a batch, from the model run in eval mode and eagerly (compiled code
    too), without gradients; every submodule's mode and the RNG (of the CPU and of the inputs' CUDA
    device) are put back. Forward arguments taken per sample only from their first dimension are checked
    first (`peering._guesses.check_guesses`: a small forward pass, once per batch until they pass).

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Dropout(0.5)).train()
    >>> model_scores(net, torch.rand(2, 4)).shape, net.training
    (torch.Size([2, 3]), True)
    """
    rng_devices = (inputs.device,) if inputs.device.type == "cuda" else ()
    kwargs = forward.rows(slice(None)) if forward else None
    with eval_mode(module, rng_devices), torch.no_grad():
        x = as_model_dtype(module, inputs.detach())
        if forward is not None and forward.unchecked:
            check_guesses(module, x, forward, output_fn)
        return class_scores(module, x, output_fn, kwargs).detach()
