"""`Normalisation`: a model's per-channel input normalisation, ``(image - mean) / std``, as one object.

Parsed once (from the command line's ``--mean/--std`` or a run's ``dataset.json``), then applied where
each use needs it: `apply` to the images a model is explained on (the attributions are then of what the
model sees, as when you pass normalised tensors to `peering.explain`), `wrap` in front of a model that
must be walked in image units (`peering.morph` clamps to the image range [0, 1]), `dataset` over a data
set of images, and `display` to show the images as read (``x * std + mean``) in every picture.

>>> norm = Normalisation.parse("0.5", "0.25")
>>> x = torch.full((1, 1, 2, 2), 0.75)
>>> norm.apply(x).flatten().tolist(), norm.display
([1.0, 1.0, 1.0, 1.0], ([0.5], [0.25]))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from peering.errors import PeeringValueError

__all__ = ["Normalisation"]


@dataclass(frozen=True)
class Normalisation:
    """Per-channel ``(image - mean) / std``: ``mean`` and ``std`` are float [C, 1, 1] (C may be 1)."""

    mean: Tensor
    std: Tensor

    @classmethod
    def parse(
        cls,
        mean: str | None,
        std: str | None,
        channels: int | None = None,
        *,
        names: tuple[str, str] = ("mean", "std"),
    ) -> Normalisation | None:
        """From comma-separated numbers (``"0.485,0.456,0.406"``), or None when both are None.

        ``channels``: the images' channel count, to check the number of values against (1 value, or one
        per channel); None takes any number. ``names`` are used in the errors (the CLI's option names).

        >>> Normalisation.parse("0.1,0.2", "1", channels=3)
        Traceback (most recent call last):
        ...
        peering.errors.PeeringValueError: mean has 2 values; the images have 3 channels (give 1 or 3)
        """
        if mean is None and std is None:
            return None
        if mean is None or std is None:
            raise PeeringValueError(f"{names[0]} and {names[1]} go together: give both, or neither")
        m, s = _numbers(mean, names[0], channels), _numbers(std, names[1], channels)
        if not bool((s > 0).all()):
            raise PeeringValueError(f"{names[1]} must be positive, got {std}")
        return cls(m, s)

    @classmethod
    def from_dict(cls, record: Any) -> Normalisation | None:
        """From `to_dict`'s ``{"mean": [...], "std": [...]}`` (None for None or anything else)."""
        if not isinstance(record, dict) or "mean" not in record or "std" not in record:
            return None
        return cls(_column(record["mean"]), _column(record["std"]))

    def to_dict(self) -> dict[str, list[float]]:
        """``{"mean": [...], "std": [...]}``, JSON-ready."""
        mean, std = self.display
        return {"mean": mean, "std": std}

    @property
    def display(self) -> tuple[list[float], list[float]]:
        """``(mean, std)`` as lists: the ``display=`` that shows normalised inputs as read."""
        return self.mean.flatten().tolist(), self.std.flatten().tolist()

    def apply(self, images: Tensor) -> Tensor:
        """``(images - mean) / std`` for images [..., C, H, W]."""
        return (images - self.mean.to(images)) / self.std.to(images)

    def wrap(self, model: nn.Module, image_shape: tuple[int, ...] | torch.Size) -> nn.Module:
        """``model`` behind the normalisation: the returned module takes images in [0, 1] (in the model's
        layout, e.g. flattened) and hands ``model`` the normalised ones. ``image_shape`` is [C, H, W]."""
        return _Normalising(model, self, torch.Size(image_shape)).eval()

    def dataset(self, data: Dataset) -> Dataset:
        """``data``'s ``(image, label)`` pairs with the images normalised."""
        return _NormalisedImages(data, self)


def _numbers(text: str, name: str, channels: int | None) -> Tensor:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise PeeringValueError(f"{name} must be numbers separated by commas, got {text!r}") from None
    if not values:
        raise PeeringValueError(f"{name} must be numbers separated by commas, got {text!r}")
    if channels is not None and len(values) not in (1, channels):
        allowed = "1" if channels == 1 else f"1 or {channels}"
        raise PeeringValueError(
            f"{name} has {len(values)} values; the images have {channels} channel{'s' * (channels != 1)} "
            f"(give {allowed})"
        )
    return _column(values)


def _column(values: Any) -> Tensor:
    return torch.tensor(values, dtype=torch.float32).reshape(-1, 1, 1)


class _Normalising(nn.Module):
    """The model behind a normalisation: takes images in [0, 1] (in the model's layout), normalises them."""

    mean: Tensor
    std: Tensor

    def __init__(self, model: nn.Module, norm: Normalisation, image_shape: torch.Size) -> None:
        super().__init__()
        self.model, self.image_shape = model, image_shape
        self.register_buffer("mean", norm.mean.clone())
        self.register_buffer("std", norm.std.clone())

    def forward(self, x: Tensor) -> Any:
        images = x.reshape(-1, *self.image_shape)
        return self.model(((images - self.mean) / self.std).reshape(x.shape))


class _NormalisedImages(Dataset):
    """The (image, label) pairs of ``data`` with the images normalised for the model."""

    def __init__(self, data: Dataset, norm: Normalisation) -> None:
        self.data, self.norm = data, norm

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, Any]:
        image, label = self.data[index]
        return self.norm.apply(image), label
