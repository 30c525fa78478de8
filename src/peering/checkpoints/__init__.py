"""Load a trained classifier for the command line, as the user saved it, verified first, with errors that
name the file and the problem.

What is understood (`load_model`):

- a Lightning checkpoint of the demo model (`peering.models.DigitClassifier`, as `peering demo` writes
  it): the model is rebuilt from the hyperparameters saved in it;
- with ``model="package.module:factory"`` (or ``"path/to/file.py:factory"``): a state_dict saved with
  ``torch.save(model.state_dict(), path)``, a training-checkpoint dict holding it under ``state_dict``,
  ``model_state_dict``, ``model`` or ``net`` (a Lightning checkpoint too), or a safetensors file;
  ``factory()`` builds the user's ``nn.Module`` and the weights are loaded into it (strictly; a prefix such
  as ``model.`` that a LightningModule wrapper adds is stripped when that makes them fit);
- a TorchScript model (``torch.jit.save``) or a ``torch.export`` archive (``torch.export.save``, ``.pt2``),
  which need no factory;
- a Hugging Face ``save_pretrained`` folder of an image or text classifier, loaded offline from the folder
  with its own image processor or tokenizer (`peering.checkpoints.hf`).

Every file is verified before it is used (`peering.checkpoints.files`): the CRC-32 of every record of the
zip archives torch writes, the header of a safetensors file. ``torch.load`` runs with
``weights_only=True``: a checkpoint can never run code on loading. The input size and channels are read
from the model where they can be (attributes, its first layer, an export's example input, a processor's
size); where they cannot, a failing first forward pass says to pass ``--image-size``/``--channels``. Every
problem raises `CheckpointError` with a one-line message.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from peering.checkpoints.factory import import_factory
from peering.checkpoints.files import read_checkpoint, verify_file
from peering.checkpoints.hf import is_hugging_face_folder, load_hugging_face
from peering.checkpoints.loaded import LoadedModel, class_scores_of, output_picker
from peering.checkpoints.weights import load_demo, load_export, load_torchscript, load_with_factory
from peering.errors import CheckpointError

__all__ = [
    "CheckpointError",
    "LoadedModel",
    "class_scores_of",
    "import_factory",
    "load_model",
    "output_picker",
    "verify_file",
]


def load_model(
    path: str | os.PathLike[str],
    model: str | None = None,
    *,
    channels: int | None = None,
    image_size: int | None = None,
    output: str | None = None,
) -> LoadedModel:
    """Load a classifier from what the user saved, verified first, checking that it returns class scores.

    Args:
        path: a checkpoint file (see the module docstring for the kinds), or a Hugging Face
            ``save_pretrained`` folder.
        model: ``"package.module:factory"`` or ``"file.py:factory"``: a callable returning the
            ``nn.Module`` a state_dict or safetensors file belongs to. None for the demo model and for
            files that hold a whole model (TorchScript, ``torch.export``, Hugging Face folders).
        channels, image_size: the input the model takes, when it cannot be read from the model.
        output: for a model that returns an object, a dict or a tuple: the attribute, key or index holding
            the class scores (``"logits"``; Hugging Face folders set it themselves). See `output_picker`.

    Returns:
        A `LoadedModel` in eval mode.

    Raises:
        CheckpointError: the file is missing, truncated, damaged (a checksum) or of an unknown kind; holds
            weights for another model; the factory cannot be imported or called; or the model does not
            return class scores [B, C].

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
    if is_hugging_face_folder(file):
        if model is not None:
            raise CheckpointError(f"{file} is a Hugging Face folder, which holds its model: drop --model")
        loaded = load_hugging_face(file)
    else:
        loaded = _load_file(file, model, channels, image_size)
    if output is not None:
        loaded = dataclasses.replace(loaded, output_fn=output_picker(output))
    if loaded.is_text:
        return loaded
    if loaded.size is not None and (loaded.channels is not None or loaded.flat):
        probe = torch.zeros(1, loaded.channels or 1, *loaded.size)
        scores = class_scores_of(loaded, probe)
        loaded = dataclasses.replace(loaded, num_classes=int(scores.shape[1]))
    return loaded


def _load_file(file: Path, model: str | None, channels: int | None, image_size: int | None) -> LoadedModel:
    checkpoint = verify_file(file)
    whole = {"torchscript": load_torchscript, "export": load_export}
    if checkpoint.kind in whole:
        if model is not None:
            raise CheckpointError(
                f"{file} is a {checkpoint.kind} file, which holds its model: leave out --model"
            )
        return whole[checkpoint.kind](checkpoint, channels, image_size)
    if checkpoint.kind == "safetensors" and model is None:
        raise CheckpointError(
            f"{file} holds weights only (safetensors): pass --model package.module:factory (the model they "
            "belong to), or give the Hugging Face folder it was saved in (with its config.json)"
        )
    content = read_checkpoint(checkpoint)
    if model is None:
        return load_demo(file, content)
    return load_with_factory(checkpoint, content, model, channels, image_size)
