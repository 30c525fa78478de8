"""Models rebuilt from weights: the demo model from its Lightning checkpoint, a user's model from
``--model``'s factory and a state_dict (or a training-checkpoint dict), and whole models saved with
TorchScript or ``torch.export``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from peering.checkpoints.factory import import_factory
from peering.checkpoints.files import Checkpoint, state_dict_of
from peering.checkpoints.loaded import LoadedModel, one_line
from peering.checkpoints.shapes import Exported, input_of, input_of_export
from peering.errors import CheckpointError

__all__: list[str] = []  # internal: its names are used by its own package only

_HINT = "; for your own model pass --model package.module:factory"


def _is_lightning(content: Any) -> bool:
    return (
        isinstance(content, Mapping)
        and "state_dict" in content
        and ("pytorch-lightning_version" in content or "hyper_parameters" in content)
    )


def load_demo(file: Path, content: Any) -> LoadedModel:
    """The demo model (`peering.models.DigitClassifier`) from a Lightning checkpoint of it."""
    from peering.models import DigitClassifier

    if not _is_lightning(content):
        if isinstance(content, Mapping) and content and all(isinstance(v, Tensor) for v in content.values()):
            what = "a plain state_dict"
        elif isinstance(content, Mapping):
            keys = sorted(str(k) for k in content)[:8]
            what = f"a dict with the keys {keys}"
        else:
            what = f"a {type(content).__name__}"
        raise CheckpointError(
            f"{file} is {what}, not a Lightning checkpoint of the demo model (DigitClassifier){_HINT} (it "
            "then holds that model's state_dict, alone or under 'state_dict', 'model_state_dict', 'model' "
            "or 'net')"
        )
    hparams = content.get("hyper_parameters") or {}
    if not isinstance(hparams, Mapping):
        kind = type(hparams).__name__
        raise CheckpointError(f"{file}: its hyper_parameters are a {kind}, not a dict{_HINT}")
    try:
        module = DigitClassifier(**dict(hparams))
    except Exception as err:
        raise CheckpointError(
            f"{file} is a checkpoint of another model: its hyperparameters {sorted(hparams)} do not fit "
            f"DigitClassifier ({one_line(err)}){_HINT}"
        ) from err
    state = content["state_dict"]
    try:
        module.load_state_dict(state, strict=True)
    except Exception as err:
        raise CheckpointError(
            f"{file} is a checkpoint of another model: its weights do not fit DigitClassifier "
            f"({_summarise_keys(module, state) or one_line(err)}){_HINT}"
        ) from err
    cnn = module.model.eval()
    size = int(cnn.image_size)
    return LoadedModel(cnn, f"DigitClassifier from {file}", int(cnn.in_channels), (size, size))


def _summarise_keys(module: nn.Module, state: Mapping[str, Any]) -> str:
    own = set(module.state_dict())
    given = set(state)
    missing, unexpected = sorted(own - given), sorted(given - own)
    parts = []
    if missing:
        parts.append(f"missing {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    if unexpected:
        parts.append(f"unexpected {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}")
    if not parts:
        own_state = module.state_dict()
        wrong = [
            f"{k} {list(state[k].shape)} vs {list(own_state[k].shape)}"
            for k in sorted(own)
            if isinstance(state[k], Tensor) and state[k].shape != own_state[k].shape
        ]
        if wrong:
            parts.append(f"shape mismatch: {', '.join(wrong[:3])}")
    return "; ".join(parts)


def load_with_factory(
    checkpoint: Checkpoint, content: Any, spec: str, channels: int | None, image_size: int | None
) -> LoadedModel:
    """``factory()`` with the file's state_dict loaded into it (strictly, or with a prefix such as
    ``model.`` stripped when that makes it fit)."""
    file = checkpoint.path
    factory = import_factory(spec)
    try:
        module = factory()
    except Exception as err:
        raise CheckpointError(f"--model {spec}: calling it failed: {one_line(err)}") from err
    if not isinstance(module, nn.Module):
        raise CheckpointError(
            f"--model {spec} returned {type(module).__name__} {module!r:.60}, not a torch.nn.Module"
        )
    state = state_dict_of(content, file, spec)
    if not _load_fitting(module, state):
        detail = _summarise_keys(module, state)
        raise CheckpointError(
            f"the weights in {file} do not fit the model from {spec}" + (f" ({detail})" if detail else "")
        )
    module.eval()
    c, size, flat = input_of(module, channels, image_size)
    return LoadedModel(module, f"{type(module).__name__} from {file}", c, size, flat)


def _load_fitting(module: nn.Module, state: Mapping[str, Any]) -> bool:
    """Load ``state`` strictly, or with a common key prefix (``model.``, ``net.``, ...) stripped."""
    candidates = [dict(state)]
    prefixes = {k.split(".", 1)[0] + "." for k in state if "." in k}
    for prefix in sorted(prefixes):
        inner = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if inner:
            candidates.append(inner)
    for candidate in candidates:
        try:
            module.load_state_dict(candidate, strict=True)
            return True
        except (RuntimeError, KeyError, ValueError):
            continue
    return False


def load_torchscript(checkpoint: Checkpoint, channels: int | None, image_size: int | None) -> LoadedModel:
    """A TorchScript model (``torch.jit.save``), its input read off its attributes and first layer."""
    file = checkpoint.path
    try:
        module = torch.jit.load(str(file), map_location="cpu")
    except Exception as err:  # torch.jit raises RuntimeError with C++ context for every problem
        raise CheckpointError(f"cannot load TorchScript model {file}: {one_line(err)}") from err
    module.eval()
    c, size, flat = input_of(module, channels, image_size)
    name = getattr(module, "original_name", "model")
    return LoadedModel(module, f"TorchScript {name} from {file}", c, size, flat)


def load_export(checkpoint: Checkpoint, channels: int | None, image_size: int | None) -> LoadedModel:
    """A ``torch.export`` program (``torch.export.save``): its input shape is its example input's; one
    exported with a fixed batch size is run in batches of that size."""
    file = checkpoint.path
    try:
        program = torch.export.load(str(file))
        module: nn.Module = program.module()
    except Exception as err:
        raise CheckpointError(f"cannot load torch.export archive {file}: {one_line(err)}") from err
    shape = input_of_export(program)
    notes: tuple[str, ...] = ()
    c, size, flat = channels, (image_size, image_size) if image_size else None, False
    if shape is not None and len(shape) == 4 and min(shape[1:]) > 0:
        c, size = shape[1], (shape[2], shape[3])
        if (channels is not None and channels != c) or (image_size is not None and (image_size,) * 2 != size):
            raise CheckpointError(
                f"{file} was exported for inputs {list(shape)}: --channels/--image-size cannot change that"
            )
    elif shape is not None and len(shape) == 2 and shape[1] > 0:
        c, size, flat = _flat_image(shape[1], channels)
    batch = shape[0] if shape is not None and shape[0] > 0 else None
    module = Exported(module, batch)
    if batch is not None and batch > 1:
        notes = (f"{file.name} was exported for batches of exactly {batch}; it runs in such batches",)
    return LoadedModel(module, f"exported program from {file}", c, size, flat, notes=notes)


def _flat_image(features: int, channels: int | None) -> tuple[int | None, tuple[int, int] | None, bool]:
    for ch in [channels] if channels else [1, 3]:
        side = int(round((features / ch) ** 0.5))
        if ch * side * side == features:
            return ch, (side, side), True
    return channels, None, True
