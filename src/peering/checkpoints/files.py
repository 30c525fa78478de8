"""Reading what users saved, verified first: the kind of file, its checksums, and its contents.

- ``torch.save`` files, TorchScript (``torch.jit.save``) and ``torch.export`` archives (``.pt2``) are zip
  archives whose every record carries a CRC-32: `verify_file` checks them all (``ZipFile.testzip``) before
  anything is loaded, so one changed byte in the weights is an error naming the damaged record.
- safetensors files have no checksum; their header is checked (JSON, every tensor's byte range inside the
  file, of the size its dtype and shape need, the ranges tiling the data without gaps or overlaps), as the
  format's own loader does.
- A ``torch.save`` file in the legacy (pre-1.6, not zip) format carries no checksum: it is read as it is.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import struct
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from peering.checkpoints.loaded import one_line
from peering.errors import CheckpointError

__all__ = ["Checkpoint", "state_dict_of", "verify_file"]

_ZIP_MAGIC = b"PK\x03\x04"
_SAFETENSORS_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
    "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "C64": 8,
}  # fmt: skip
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net")
"""The entries of a training-checkpoint dict that may hold the model's weights, in the order tried."""


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint file: its ``kind`` ("torch", "torchscript", "export", "safetensors") and the
    number of records whose checksum was checked (0 where the format has none)."""

    path: Path
    kind: str
    verified: int


def kind_of(file: Path) -> str:
    """The kind of checkpoint a file is, from its first bytes and (for zip archives) its record names."""
    with open(file, "rb") as f:
        head = f.read(16)
    if head.startswith(_ZIP_MAGIC):
        try:
            with zipfile.ZipFile(file) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, ValueError) as err:
            raise CheckpointError(
                f"cannot read checkpoint {file}: it is truncated, corrupt or not a PyTorch checkpoint "
                f"({one_line(err)}); save it again"
            ) from err
        if any(n.endswith("/models/model.json") or n.endswith("/archive_format") for n in names):
            return "export"
        if any("/code/" in n for n in names) or any(n.endswith("/constants.pkl") for n in names):
            return "torchscript"
        return "torch"
    if len(head) >= 9:
        (length,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 0 < length < (1 << 31):
            return "safetensors"
    return "torch"


def verify_file(file: Path) -> Checkpoint:
    """Check a checkpoint file's integrity before it is loaded; a `Checkpoint` or a `CheckpointError`.

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "w.pt"
    >>> torch.save({"weight": torch.ones(3)}, path)
    >>> verify_file(path).kind
    'torch'
    >>> data = bytearray(path.read_bytes())
    >>> at = data.index(b"\\x00\\x00\\x80?")  # the bytes of 1.0
    >>> data[at + 3] ^= 1
    >>> _ = path.write_bytes(bytes(data))
    >>> verify_file(path)
    Traceback (most recent call last):
    ...
    peering.errors.CheckpointError: checkpoint .../w.pt is damaged: its record 'w/data/0' fails its CRC-32 ...
    """
    if not file.exists():
        raise CheckpointError(f"checkpoint not found: {file}")
    if file.is_dir():
        raise CheckpointError(
            f"checkpoint {file} is a folder: give a checkpoint file, or a Hugging Face save_pretrained "
            "folder (with its config.json)"
        )
    if file.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {file} is empty (0 bytes); it was not written completely")
    kind = kind_of(file)
    if kind == "safetensors":
        return Checkpoint(file, kind, _verify_safetensors(file))
    with open(file, "rb") as f:
        zipped = f.read(4) == _ZIP_MAGIC
    if not zipped:
        return Checkpoint(file, kind, 0)
    try:
        with zipfile.ZipFile(file) as archive:
            bad = archive.testzip()
            count = len(archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as err:
        raise CheckpointError(
            f"cannot read checkpoint {file}: it is truncated, corrupt or not a PyTorch checkpoint "
            f"({one_line(err)}); save it again"
        ) from err
    if bad is not None:
        raise CheckpointError(
            f"checkpoint {file} is damaged: its record {bad!r} fails its CRC-32 check (bytes changed on "
            "disk or in a copy); copy it again or save it again"
        )
    return Checkpoint(file, kind, count)


def _verify_safetensors(file: Path) -> int:
    """Check a safetensors header against the file; returns the number of tensors."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if 8 + length > size:
            raise CheckpointError(
                f"safetensors file {file} is truncated: its header says {length} bytes, the file has {size}"
            )
        try:
            header = json.loads(f.read(length))
        except ValueError as err:
            raise CheckpointError(f"safetensors file {file} has a corrupt header ({one_line(err)})") from err
    if not isinstance(header, dict):
        raise CheckpointError(f"safetensors file {file} has a corrupt header (not a JSON object)")
    data = size - 8 - length
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(v) for v in info["data_offsets"])
            need = math.prod(int(d) for d in info["shape"]) * _SAFETENSORS_BYTES[str(info["dtype"])]
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(
                f"safetensors file {file} has a corrupt header entry for {name!r} ({one_line(err)})"
            ) from err
        if not 0 <= begin <= end <= data or end - begin != need:
            raise CheckpointError(
                f"safetensors file {file} is damaged: tensor {name!r} claims bytes {begin}-{end} of a "
                f"{data}-byte data section ({need} needed); save it again"
            )
        spans.append((begin, end))
    spans.sort()
    reach = 0
    for begin, end in spans:
        if begin != reach:
            raise CheckpointError(f"safetensors file {file} is damaged: its tensors overlap or leave gaps")
        reach = end
    if reach != data:
        raise CheckpointError(
            f"safetensors file {file} is damaged: {data - reach} bytes after its last tensor; save it again"
        )
    return len(spans)


def read_checkpoint(checkpoint: Checkpoint) -> Any:
    """Load a verified ``torch.save`` or safetensors file's contents (tensors on the CPU).

    ``torch.load`` runs with ``weights_only=True``: a checkpoint can never run code on loading.
    """
    file = checkpoint.path
    if checkpoint.kind == "safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(file), device="cpu")
        except Exception as err:  # safetensors raises its own error type for every kind of damage
            raise CheckpointError(f"cannot read safetensors file {file}: {one_line(err)}") from err
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if "Unsupported global" in text:
            what = f" ({found.group(1)})" if found else ""
            raise CheckpointError(
                f"checkpoint {file} holds Python objects{what} that cannot be loaded safely (saved with "
                "torch.save(model)?); save model.state_dict() instead and pass --model "
                "package.module:factory, or save it with torch.jit.save or torch.export.save"
            ) from err
        raise CheckpointError(
            f"cannot read checkpoint {file}: it is corrupt or not a PyTorch checkpoint "
            f"({type(err).__name__}: {_useful_line(text)})"
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        raise CheckpointError(
            f"cannot read checkpoint {file}: it is truncated, corrupt or not a PyTorch checkpoint "
            f"({one_line(err)})"
        ) from err


def _useful_line(text: str) -> str:
    """The line of torch's long multi-line messages that says what went wrong."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    useful = [ln for ln in lines if "error" in ln.lower() or "unsupported" in ln.lower()]
    pick = useful[-1] if useful else (lines[0] if lines else "")
    return pick[:200]


def _is_state(value: Any) -> bool:
    return (
        isinstance(value, Mapping)
        and len(value) > 0
        and all(isinstance(k, str) for k in value)
        and all(isinstance(v, Tensor) for v in value.values())
    )


def state_dict_of(content: Any, file: Path, spec: str) -> Mapping[str, Tensor]:
    """The state_dict in a loaded file: the file itself (a dict of tensors), or the ``state_dict``,
    ``model_state_dict``, ``model`` or ``net`` entry of a training-checkpoint dict; otherwise a
    `CheckpointError` listing the keys it found.

    >>> weights = {"w": torch.zeros(1)}
    >>> state_dict_of({"epoch": 3, "model": weights, "optimizer": {}}, Path("ckpt.pt"), "m:f") is weights
    True
    >>> state_dict_of({"epoch": 3, "weights": [1]}, Path("ckpt.pt"), "m:f")
    Traceback (most recent call last):
    ...
    peering.errors.CheckpointError: ckpt.pt holds no state_dict ... it has the keys ['epoch', 'weights']...
    """
    if _is_state(content):
        return content
    if isinstance(content, Mapping):
        for key in STATE_DICT_KEYS:
            if _is_state(content.get(key)):
                return content[key]
        keys = sorted(str(k) for k in content)
        shown = f"{keys[:12]}{' ...' if len(keys) > 12 else ''}"
        raise CheckpointError(
            f"{file} holds no state_dict (a dict of tensors) to load into {spec}: it has the keys {shown}, "
            f"none of {list(STATE_DICT_KEYS)} holding one; save model.state_dict() (alone or under one of "
            "those keys)"
        )
    raise CheckpointError(
        f"{file} holds a {type(content).__name__}, not a state_dict (a dict of tensors) to load into {spec}"
    )
