"""A Hugging Face ``save_pretrained`` folder (``config.json``, the weights, and the image processor or the
tokenizer), loaded offline from the folder alone, its weight files verified first.

An image classifier takes images in [0, 1] at its image processor's size, and normalises them itself with
the processor's mean and std (so attributions are of the image as read, and morphs keep to [0, 1]). A
text classifier comes with its tokenizer; it is explained at its word embeddings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from peering.checkpoints.files import verify_file
from peering.checkpoints.loaded import LoadedModel, one_line, output_picker
from peering.errors import CheckpointError

__all__: list[str] = []  # internal: its names are used by its own package only

_WEIGHTS = ("*.safetensors", "pytorch_model*.bin", "*.pt", "*.pth")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model")


def is_hugging_face_folder(path: Path) -> bool:
    """True for a folder holding a ``config.json`` (what ``save_pretrained`` writes).

    >>> import tempfile
    >>> is_hugging_face_folder(Path(tempfile.mkdtemp()))
    False
    """
    return path.is_dir() and (path / "config.json").is_file()


def _config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {folder / 'config.json'}: {one_line(err)}") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{folder / 'config.json'} is not a JSON object")
    return config


def _task(folder: Path, config: dict[str, Any]) -> str:
    """"image" or "text", from the architecture's name, else from the preprocessing files present."""
    names = " ".join(str(a) for a in config.get("architectures") or [])
    if "ImageClassification" in names:
        return "image"
    if "SequenceClassification" in names:
        return "text"
    if (folder / "preprocessor_config.json").is_file():
        return "image"
    if any((folder / f).is_file() for f in _TOKENIZER_FILES):
        return "text"
    raise CheckpointError(
        f"{folder} is a Hugging Face folder of {names or config.get('model_type', 'an unknown model')}, "
        "neither an image nor a text classifier (…ForImageClassification, …ForSequenceClassification)"
    )


def _verify_weights(folder: Path) -> int:
    files = sorted({f for pattern in _WEIGHTS for f in folder.glob(pattern) if f.is_file()})
    if not files:
        raise CheckpointError(
            f"{folder} has a config.json but no weights (model.safetensors or pytorch_model.bin); "
            "save_pretrained writes both"
        )
    return sum(verify_file(f).verified for f in files)


def load_hugging_face(folder: Path) -> LoadedModel:
    """The classifier in a ``save_pretrained`` folder, with its preprocessing; a `CheckpointError` for a
    folder that is not one, damaged weights, or a model or preprocessing that cannot be loaded offline."""
    config = _config(folder)
    task = _task(folder, config)
    _verify_weights(folder)
    try:
        import transformers
    except ImportError as err:
        raise CheckpointError(
            f"{folder} is a Hugging Face model folder; loading it needs transformers (pip install "
            "transformers)"
        ) from err
    auto = (
        transformers.AutoModelForImageClassification
        if task == "image"
        else transformers.AutoModelForSequenceClassification
    )
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # its "Loading weights" bar, for a model of 1 file
    try:
        model = auto.from_pretrained(str(folder), local_files_only=True).eval()
    except Exception as err:  # transformers raises many kinds; one line naming the folder
        raise CheckpointError(f"cannot load the {task} classifier in {folder}: {one_line(err)}") from err
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    labels = _labels(config)
    name = type(model).__name__
    if task == "text":
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as err:
            raise CheckpointError(
                f"{folder} holds a text classifier but its tokenizer cannot be loaded from the folder "
                f"({one_line(err)}); save it there with tokenizer.save_pretrained(folder)"
            ) from err
        return LoadedModel(
            model, f"{name} from {folder}", output_fn=output_picker("logits"), tokenizer=tokenizer,
            labels=labels, num_classes=len(labels) if labels else None,
        )
    return _image_model(folder, model, config, transformers, labels)


def _labels(config: dict[str, Any]) -> tuple[str, ...] | None:
    id2label = config.get("id2label")
    if not isinstance(id2label, dict) or not id2label:
        return None
    try:
        return tuple(str(id2label[k]) for k in sorted(id2label, key=int))
    except (TypeError, ValueError):
        return None


def _image_model(
    folder: Path, model: Any, config: dict[str, Any], transformers: Any, labels: tuple[str, ...] | None
) -> LoadedModel:
    from peering.data.normalisation import Normalisation

    notes: list[str] = []
    channels = int(config.get("num_channels", 3))
    size = config.get("image_size")
    size_hw = (int(size), int(size)) if isinstance(size, int) else None
    norm = None
    if (folder / "preprocessor_config.json").is_file():
        try:
            processor = transformers.AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
        except Exception as err:
            raise CheckpointError(f"cannot load the image processor in {folder}: {one_line(err)}") from err
        size_hw = _processor_size(processor) or size_hw
        if getattr(processor, "do_normalize", False):
            mean, std = processor.image_mean, processor.image_std
            norm = Normalisation.from_dict({"mean": list(mean), "std": list(std)})
    else:
        notes.append(f"{folder} has no preprocessor_config.json: images are fed in [0, 1], not normalised")
    if size_hw is None:
        raise CheckpointError(
            f"{folder}: neither its config nor its image processor gives the image size; pass --image-size"
        )
    module = model if norm is None else norm.wrap(model, (channels, *size_hw))
    return LoadedModel(
        module, f"{type(model).__name__} from {folder}", channels, size_hw, output_fn=output_picker("logits"),
        labels=labels, num_classes=len(labels) if labels else None, notes=tuple(notes),
    )


def _processor_size(processor: Any) -> tuple[int, int] | None:
    """(height, width) the processor's images end at: its crop, or its resize target."""
    crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    for value in (crop, getattr(processor, "size", None)):
        if isinstance(value, dict):
            if "height" in value and "width" in value:
                return int(value["height"]), int(value["width"])
            if "shortest_edge" in value:
                return int(value["shortest_edge"]), int(value["shortest_edge"])
        elif isinstance(value, int):
            return value, value
    return None
