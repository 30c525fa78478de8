"""Load a trained classifier for the command line, with errors that name the file and the problem.

Two kinds of checkpoint are understood:

- a Lightning checkpoint of the demo model (`peering.models.DigitClassifier`, as `peering demo` writes
  it): the model is rebuilt from the hyperparameters saved in it;
- any file holding a ``state_dict`` (a plain ``torch.save(model.state_dict(), path)``, a dict with a
  ``"state_dict"`` entry, or a Lightning checkpoint) together with ``model="package.module:factory"``
  (or ``"path/to/file.py:factory"``): ``factory()`` builds the user's own ``nn.Module`` and the weights
  are loaded into it (strictly; a prefix such as ``model.`` that a LightningModule wrapper adds is
  stripped when that makes them fit).

Files are read with ``torch.load(..., weights_only=True)``: a checkpoint can never run code on loading.
Every problem (a missing, truncated or corrupt file, weights for another model, a factory that cannot be
imported, a model that does not return class scores) raises `CheckpointError` with a one-line message.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import math
import os
import pickle
import re
import sys
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from peering.errors import CheckpointError

__all__ = [
    "CheckpointError",
    "LoadedModel",
    "class_scores_of",
    "import_factory",
    "load_model",
    "output_picker",
]




@dataclass(frozen=True)
class LoadedModel:
    """A classifier ready to explain, and the input it expects.

    Attributes:
        model: the `nn.Module`, in eval mode.
        source: a short description for messages, e.g. ``"DigitClassifier from runs/demo/model.ckpt"``.
        channels: image channels the model takes (1 or 3), or None when unknown (then the images' own).
        size: (height, width) the model takes, or None when unknown (then the first image's size).
        flat: the model takes flat vectors [B, C * H * W] rather than images [B, C, H, W].
        num_classes: the number of class scores, or None until the model has been run once.
        output_fn: picks the class scores out of the model's output (``--output-fn``), or None when the
            model returns them as a tensor; pass it on as `peering.explain`'s ``output_fn``.
    """

    model: nn.Module
    source: str
    channels: int | None = None
    size: tuple[int, int] | None = None
    flat: bool = False
    num_classes: int | None = None
    output_fn: Callable[[Any], Any] | None = None

    def batch(self, images: Tensor) -> Tensor:
        """Images [B, C, H, W] in the layout the model takes (flattened for a flat model).

        >>> m = LoadedModel(nn.Linear(64, 10), "example", channels=1, size=(8, 8), flat=True)
        >>> m.batch(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 64])
        """
        return images.flatten(1) if self.flat else images


def load_model(
    path: str | os.PathLike[str],
    model: str | None = None,
    *,
    channels: int | None = None,
    image_size: int | None = None,
    output: str | None = None,
) -> LoadedModel:
    """Load a classifier from a checkpoint file, checking that it returns class scores.

    Args:
        path: a Lightning checkpoint of the demo model, or (with ``model``) any file holding a state_dict.
        model: ``"package.module:factory"`` or ``"file.py:factory"``: a callable returning the
            ``nn.Module`` the weights belong to. None for the demo model.
        channels, image_size: the input the model takes, when it cannot be read from the model (the demo
            model knows; otherwise ``in_channels``/``image_size`` attributes or the first layer are used).
        output: for a model that returns an object, a dict or a tuple: the attribute, key or index holding
            the class scores (``"logits"`` for Hugging Face models). See `output_picker`.

    Returns:
        A `LoadedModel` in eval mode.

    Raises:
        CheckpointError: the file is missing, truncated or corrupt; holds weights for another model; the
            factory cannot be imported or called; or the model does not return class scores [B, C].

    >>> import tempfile
    >>> from peering.models import DigitClassifier
    >>> import lightning.pytorch as pl
    >>> path = Path(tempfile.mkdtemp()) / "model.ckpt"
    >>> torch.save({"state_dict": DigitClassifier(image_size=8).state_dict(),
    ...             "hyper_parameters": {"image_size": 8}, "pytorch-lightning_version": pl.__version__}, path)
    >>> loaded = load_model(path)
    >>> loaded.channels, loaded.size, loaded.num_classes
    (1, (8, 8), 10)
    >>> load_model(path.with_name("nope.ckpt"))
    Traceback (most recent call last):
    ...
    peering.errors.CheckpointError: checkpoint not found: .../nope.ckpt
    """
    file = Path(path)
    content = _read(file)
    if model is None:
        loaded = _load_demo(file, content)
    else:
        loaded = _load_with_factory(file, content, model, channels, image_size)
    if output is not None:
        loaded = dataclasses.replace(loaded, output_fn=output_picker(output))
    if loaded.size is not None and (loaded.channels is not None or loaded.flat):
        probe = torch.zeros(1, loaded.channels or 1, *loaded.size)
        scores = class_scores_of(loaded, probe)
        loaded = dataclasses.replace(loaded, num_classes=int(scores.shape[1]))
    return loaded


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

    return pick


def _parts(out: Any) -> list[str]:
    """The names `output_picker` can take for this output."""
    if isinstance(out, Mapping):
        return [str(k) for k in out]
    if isinstance(out, (tuple, list)):
        return [str(i) for i in range(len(out))]
    return [k for k in vars(out) if not k.startswith("_")] if hasattr(out, "__dict__") else []


def class_scores_of(loaded: LoadedModel, images: Tensor) -> Tensor:
    """Run the model on images [B, C, H, W] without gradients; class scores [B, C] or a `CheckpointError`.
    One output (C = 1) is taken: a single-logit binary model or a regression, which `peering.explain`
    takes with ``output="sigmoid"`` or ``"raw"`` (and refuses with a softmax, naming both).

    >>> m = LoadedModel(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval(), "example", 1, (8, 8))
    >>> class_scores_of(m, torch.zeros(3, 1, 8, 8)).shape
    torch.Size([3, 10])
    """
    x = loaded.batch(images)
    try:
        with torch.no_grad():
            out = loaded.model(x)
    except Exception as err:  # a user's model can raise anything
        raise CheckpointError(
            f"{loaded.source} failed on an input of shape {list(x.shape)}: {_one_line(err)}"
        ) from err
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


def import_factory(spec: str) -> Callable[[], Any]:
    """The callable named by ``"package.module:factory"`` or ``"path/to/file.py:factory"``.

    The current directory is searched too (as ``python -m`` would), so a module beside the user's data
    works without installing it.

    >>> import_factory("peering.models:DigitCNN").__name__
    'DigitCNN'
    >>> import_factory("peering.models")
    Traceback (most recent call last):
    ...
    peering.errors.CheckpointError: --model must look like package.module:factory, got 'peering.models'
    """
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise CheckpointError(f"--model must look like package.module:factory, got {spec!r}")
    try:
        if module_name.endswith(".py"):
            file = Path(module_name)
            if not file.is_file():
                raise CheckpointError(f"--model {spec}: file {file} not found")
            name = f"_peering_user_{file.stem}"
            module_spec = importlib.util.spec_from_file_location(name, file)
            if module_spec is None or module_spec.loader is None:
                raise CheckpointError(f"--model {spec}: cannot import {file}")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
        else:
            cwd = os.getcwd()
            added = cwd not in sys.path
            if added:
                sys.path.insert(0, cwd)
            try:
                module = importlib.import_module(module_name)
            finally:
                if added and cwd in sys.path:
                    sys.path.remove(cwd)
    except CheckpointError:
        raise
    except Exception as err:  # ImportError, or anything the module raises while importing
        raise CheckpointError(f"--model {spec}: cannot import {module_name}: {_one_line(err)}") from err
    factory = module
    for part in attr.split("."):
        try:
            factory = getattr(factory, part)
        except AttributeError:
            raise CheckpointError(f"--model {spec}: {module_name} has no attribute {attr!r}") from None
    if not callable(factory):
        raise CheckpointError(f"--model {spec}: {attr} is not callable")
    return factory


# ------------------------------------------------------------------------------------------------ private


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _first_line(text: str) -> str:
    """The last non-empty line of torch's long multi-line messages that says what went wrong."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    useful = [ln for ln in lines if "error" in ln.lower() or "unsupported" in ln.lower()]
    pick = useful[-1] if useful else (lines[0] if lines else "")
    return pick[:200]


def _read(file: Path) -> Any:
    if not file.exists():
        raise CheckpointError(f"checkpoint not found: {file}")
    if file.is_dir():
        raise CheckpointError(f"checkpoint {file} is a directory, not a file")
    if file.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {file} is empty (0 bytes); it was not written completely")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if "Unsupported global" in text:
            what = f" ({found.group(1)})" if found else ""
            raise CheckpointError(
                f"checkpoint {file} holds Python objects{what} that cannot be loaded safely (saved with "
                "torch.save(model)?); save model.state_dict() instead and pass --model package.module:factory"
            ) from err
        raise CheckpointError(
            f"cannot read checkpoint {file}: it is corrupt or not a PyTorch checkpoint "
            f"({type(err).__name__}: {_first_line(text)})"
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        raise CheckpointError(
            f"cannot read checkpoint {file}: it is truncated, corrupt or not a PyTorch checkpoint "
            f"({_one_line(err)})"
        ) from err


def _state_dict_of(content: Any) -> Mapping[str, Any] | None:
    """The state_dict inside a loaded file, or None when there is none."""
    if isinstance(content, Mapping):
        inner = content.get("state_dict")
        if isinstance(inner, Mapping):
            content = inner
        if (
            content
            and all(isinstance(k, str) for k in content)
            and all(isinstance(v, Tensor) for v in content.values())
        ):
            return content
    return None


def _is_lightning(content: Any) -> bool:
    return (
        isinstance(content, Mapping)
        and "state_dict" in content
        and ("pytorch-lightning_version" in content or "hyper_parameters" in content)
    )


def _load_demo(file: Path, content: Any) -> LoadedModel:
    from peering.models import DigitClassifier

    hint = "; for your own model pass --model package.module:factory"
    if not _is_lightning(content):
        what = "a plain state_dict" if _state_dict_of(content) is not None else f"a {type(content).__name__}"
        raise CheckpointError(
            f"{file} is {what}, not a Lightning checkpoint of the demo model (DigitClassifier){hint}"
        )
    hparams = content.get("hyper_parameters") or {}
    if not isinstance(hparams, Mapping):
        kind = type(hparams).__name__
        raise CheckpointError(f"{file}: its hyper_parameters are a {kind}, not a dict{hint}")
    try:
        module = DigitClassifier(**dict(hparams))
    except Exception as err:
        raise CheckpointError(
            f"{file} is a checkpoint of another model: its hyperparameters {sorted(hparams)} do not fit "
            f"DigitClassifier ({_one_line(err)}){hint}"
        ) from err
    state = content["state_dict"]
    try:
        module.load_state_dict(state, strict=True)
    except Exception as err:
        raise CheckpointError(
            f"{file} is a checkpoint of another model: its weights do not fit DigitClassifier "
            f"({_summarise_keys(module, state) or _one_line(err)}){hint}"
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


def _load_with_factory(
    file: Path, content: Any, spec: str, channels: int | None, image_size: int | None
) -> LoadedModel:
    factory = import_factory(spec)
    try:
        module = factory()
    except Exception as err:
        raise CheckpointError(f"--model {spec}: calling it failed: {_one_line(err)}") from err
    if not isinstance(module, nn.Module):
        raise CheckpointError(
            f"--model {spec} returned {type(module).__name__} {module!r:.60}, not a torch.nn.Module"
        )
    state = _state_dict_of(content)
    if state is None:
        raise CheckpointError(f"{file} holds no state_dict (a dict of tensors) to load into {spec}")
    if not _load_fitting(module, state):
        detail = _summarise_keys(module, state)
        raise CheckpointError(
            f"the weights in {file} do not fit the model from {spec}" + (f" ({detail})" if detail else "")
        )
    module.eval()
    c, size, flat = _input_of(module, channels, image_size)
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


def _input_of(
    module: nn.Module, channels: int | None, image_size: int | None
) -> tuple[int | None, tuple[int, int] | None, bool]:
    """(channels, size, flat) the model takes: given, from attributes, or from its first layer."""
    c = channels if channels is not None else getattr(module, "in_channels", None)
    s = image_size if image_size is not None else getattr(module, "image_size", None)
    c = c if isinstance(c, int) else None
    size = (int(s), int(s)) if isinstance(s, int) else None
    first = next((m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
    if isinstance(first, nn.Conv2d) and c is None:
        c = first.in_channels
    if isinstance(first, nn.Linear) and not any(isinstance(m, nn.Conv2d) for m in module.modules()):
        d = first.in_features
        for ch in [c] if c else [1, 3]:
            side = math.isqrt(d // ch) if d % ch == 0 else 0
            if side and ch * side * side == d and (size is None or size == (side, side)):
                return ch, (side, side), True
        raise CheckpointError(
            f"the model's first layer takes {d} features, which is not a square image of 1 or 3 channels; "
            "peering's CLI feeds it images"
        )
    return c, size, False
