"""What makes two `AttributionWriter` runs "the same": the record of a run's arguments, model and data
(``manifest.json``'s ``config``), and the helpers that read them off the Trainer and the model."""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from torch import Tensor, nn
from torch.nn.parameter import is_lazy
from torch.utils.data import DataLoader

from peering.errors import PeeringTypeError, PeeringValueError
from peering.store import tensor_crc32

__all__: list[str] = []  # internal: its names are used by its own package only


def _predict_loaders(trainer: pl.Trainer) -> list[Any]:
    loaders = trainer.predict_dataloaders
    if loaders is None:
        return []
    if isinstance(loaders, Mapping):
        return list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        return list(loaders)
    return [loaders]


def _length(loader: Any) -> int | None:
    dataset = getattr(loader, "dataset", None) if isinstance(loader, DataLoader) else None
    try:
        return len(dataset) if dataset is not None else None
    except TypeError:
        return None


def _fingerprint(module: nn.Module) -> str:
    """CRC-32 of the module's parameters and buffers (names, shapes, dtypes and bytes), as hex."""
    lazy = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if is_lazy(t)]
    if lazy:
        raise PeeringValueError(
            f"AttributionWriter: the model has uninitialized lazy parameters ({lazy[:3]}); run one forward "
            "pass (outside torch.inference_mode()) before Trainer.predict so that its weights exist"
        )
    crc = 0
    for name, tensor in sorted(module.state_dict(keep_vars=False).items()):
        if not isinstance(tensor, Tensor):
            continue
        crc = zlib.crc32(f"{name}:{list(tensor.shape)}:{tensor.dtype}".encode(), crc)
        crc = tensor_crc32(tensor, crc)
    return f"{crc:08x}"


def _model_class(pl_module: nn.Module) -> str:
    """The model's class name (the wrapped model's, for `peering.lightning.predict.ExplainedModule`)."""
    inner = pl_module.model if getattr(pl_module, "wraps_a_model", False) else pl_module
    return type(inner).__qualname__


def _resolve_layer(module: nn.Module, layer: nn.Module | str | None) -> nn.Module | None:
    """The layer as a submodule of ``module``, or a clear error."""
    if layer is None:
        return None
    if isinstance(layer, str):
        try:
            return module.get_submodule(layer)
        except AttributeError:
            names = [n for n, _ in module.named_modules() if n][:8]
            raise PeeringValueError(
                f"AttributionWriter: the model has no submodule {layer!r} (it has {names}, ...)"
            ) from None
    if not isinstance(layer, nn.Module):
        raise PeeringTypeError(
            f"layer must be a submodule of the model or its name, got {type(layer).__name__}"
        )
    if not any(sub is layer for sub in module.modules()):
        raise PeeringValueError(
            "AttributionWriter: layer is not a submodule of the model Trainer.predict runs (under ddp_spawn "
            "each process has its own copy of the model: pass the layer's name, e.g. layer='model.conv1')"
        )
    return layer


def _layer_name(module: nn.Module, layer: nn.Module) -> str:
    return next(name for name, sub in module.named_modules() if sub is layer)


def _jsonable(value: Any) -> Any:
    """Method options as JSON: numbers, strings and lists as they are; tensors by shape, dtype and CRC."""
    if isinstance(value, (str, bool, int)) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, Tensor):
        crc = tensor_crc32(value)
        return {"tensor": list(value.shape), "dtype": str(value.dtype), "crc32": f"{crc:08x}"}
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return repr(value)


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    keys = sorted(set(old) | set(new))
    diffs = [f"{k}: {old.get(k)!r} before, {new.get(k)!r} now" for k in keys if old.get(k) != new.get(k)]
    return "; ".join(diffs) if diffs else "the same arguments but another format"
