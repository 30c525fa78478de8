"""Dataset attributions on disk: the shards `AttributionWriter` writes, read back in dataset order.

An output folder holds::

    <out>/manifest.json                                   what was run, and which shards make it complete
    <out>/shards/dl<d>-r<rank>-<first index>.safetensors   one shard: whole batches of one rank

A shard is one `safetensors <https://github.com/huggingface/safetensors>`_ file (a JSON header, then the
raw tensors) holding, for ``n`` samples: ``indices`` int64 [n] (their positions in the dataset),
``attributions`` [n, K, *input or layer shape], ``targets`` int64 [n, K], ``logits`` float32 [n, C],
``labels`` int64 [n] (-1 when the batch had none) and ``valid`` bool [n]. Its header metadata says which
run it belongs to (``config_hash``), the rank and dataloader that wrote it, and a CRC-32 of every tensor's
bytes. Any safetensors reader opens it (``safetensors.torch.load_file``, numpy, JAX, Rust, the Hugging Face
tools). Shards are written under a temporary name and renamed, so a shard on disk is always whole.

``manifest.json`` holds the run's arguments (``config``, and its hash), the dataset length per dataloader,
and, once every rank has finished, ``complete``: per dataloader, the number of samples and the shards
that hold them. `load_attributions` reads a complete run back in dataset order, whatever the number of
ranks that wrote it.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import Tensor

from peering._files import atomic_write
from peering.errors import PeeringIndexError, PeeringValueError, ShardError
from peering.runs.names import MANIFEST, SHARDS

__all__ = [
    "DatasetAttributions",
    "ShardError",
    "ShardedAttributions",
    "config_hash",
    "load_attributions",
    "read_manifest",
    "shard_path",
    "tensor_crc32",
    "verify_shard",
    "write_manifest",
    "write_shard",
]

FORMAT = "peering-attributions"
VERSION = 1
TENSORS = ("indices", "attributions", "targets", "logits", "labels", "valid")
_CRC_BLOCK_BYTES = 64 << 20  # verify attributions in blocks of about this many bytes (bounded memory)




# ------------------------------------------------------------------------------------------------ writing


def config_hash(config: Mapping[str, Any]) -> str:
    """A short, stable hash of a JSON-able run configuration (what makes two runs "the same").

    >>> config_hash({"method": "gradient", "top_k": 2}) == config_hash({"top_k": 2, "method": "gradient"})
    True
    """
    text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def shard_path(out_dir: str | os.PathLike[str], dataloader: int, rank: int, first_index: int) -> Path:
    """Where a shard of ``dataloader`` written by ``rank``, whose smallest dataset index is ``first_index``,
    goes (names sort by dataloader, then rank, then position).

    >>> shard_path("out", 0, 1, 42).as_posix()
    'out/shards/dl0-r1-0000000042.safetensors'
    """
    return Path(out_dir) / SHARDS / f"dl{dataloader}-r{rank}-{first_index:010d}.safetensors"


def tensor_crc32(tensor: Tensor, crc: int = 0) -> int:
    """CRC-32 of a tensor's bytes (any dtype, bf16 included; copied to the CPU), continuing from ``crc``.

    >>> tensor_crc32(torch.zeros(0)), tensor_crc32(torch.tensor([1.0])) == tensor_crc32(torch.tensor([1.0]))
    (0, True)
    """
    t = tensor.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return crc
    data: Any = t.reshape(-1).view(torch.uint8).numpy()
    return zlib.crc32(data, crc)


def write_shard(
    path: str | os.PathLike[str], tensors: Mapping[str, Tensor], metadata: Mapping[str, str]
) -> Path:
    """Write one shard atomically: the tensors (on the CPU), the metadata, and a CRC-32 per tensor.

    >>> import tempfile
    >>> p = write_shard(Path(tempfile.mkdtemp()) / "s.safetensors",
    ...                 {"indices": torch.arange(3)}, {"config_hash": "abc"})
    >>> from safetensors.torch import load_file
    >>> load_file(p)["indices"].tolist()
    [0, 1, 2]
    """
    from safetensors.torch import save

    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    meta = dict(metadata)
    meta["format"] = f"{FORMAT}/{VERSION}"
    meta["crc32"] = json.dumps({name: tensor_crc32(t) for name, t in cpu.items()}, sort_keys=True)
    payload = save(cpu, metadata=meta)

    def write(f: IO[bytes]) -> None:
        f.write(payload)

    return atomic_write(path, write)


def read_manifest(out_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The manifest of an attributions folder, or None when it has none.

    Raises:
        ShardError: the manifest exists but cannot be read.

    >>> import tempfile
    >>> read_manifest(tempfile.mkdtemp()) is None
    True
    """
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ShardError(
            f"cannot read the manifest {path}: it is corrupt ({' '.join(str(err).split())[:120]}); rerun the "
            "same command (or Trainer.predict with the same writer) to rebuild it from the shards, or delete "
            "the folder to start over"
        ) from err
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ShardError(f"{path} is not the manifest of a peering attributions folder")
    if data.get("version") != VERSION:
        raise ShardError(
            f"{path} has format version {data.get('version')!r}; this peering reads version {VERSION}"
        )
    return data


def write_manifest(out_dir: str | os.PathLike[str], manifest: Mapping[str, Any]) -> Path:
    """Write ``manifest.json`` atomically (``format`` and ``version`` are filled in).

    >>> import tempfile
    >>> out = tempfile.mkdtemp()
    >>> _ = write_manifest(out, {"config": {}, "config_hash": config_hash({})})
    >>> read_manifest(out)["version"]
    1
    """
    data = {"format": FORMAT, "version": VERSION, **manifest}
    text = json.dumps(data, indent=1, sort_keys=True) + "\n"

    def write(f: IO[bytes]) -> None:
        f.write(text.encode())

    return atomic_write(Path(out_dir) / MANIFEST, write)


# ------------------------------------------------------------------------------------------------ reading


@dataclass
class _Shard:
    """One opened shard: its path, metadata, and the small tensors read eagerly."""

    path: Path
    metadata: dict[str, str]
    indices: Tensor
    shapes: dict[str, list[int]] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)


def _describe_error(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())[:300]


def _open(path: Path) -> Any:
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt")
    except FileNotFoundError as err:
        raise ShardError(f"shard missing: {path}; rerun the same command to recompute it") from err
    except Exception as err:  # safetensors raises its own error type for every kind of damage
        raise ShardError(
            f"shard {path} is corrupt or truncated ({_describe_error(err)}); delete it and rerun the same "
            "command to recompute its samples"
        ) from err


def _corrupt(path: Path, what: str) -> ShardError:
    return ShardError(
        f"shard {path} is corrupt: {what}; delete it and rerun the same command to recompute its samples"
    )


def open_shard(path: str | os.PathLike[str], expected_hash: str | None = None) -> _Shard:
    """Open a shard, check its header and read its ``indices``; raise `ShardError` naming it if anything
    is wrong (missing, truncated, not a peering shard, another run's shard, a tensor missing or of the
    wrong shape, or indices whose checksum does not match)."""
    file = Path(path)
    handle = _open(file)
    meta = dict(handle.metadata() or {})
    if meta.get("format") != f"{FORMAT}/{VERSION}":
        raise _corrupt(file, f"it is not a peering attributions shard (format {meta.get('format')!r})")
    if expected_hash is not None and meta.get("config_hash") != expected_hash:
        raise ShardError(
            f"shard {file} belongs to another run (config {meta.get('config_hash')}, this folder's manifest "
            f"says {expected_hash}); remove it or use another output folder"
        )
    keys = set(handle.keys())
    missing = [name for name in TENSORS if name not in keys]
    if missing:
        raise _corrupt(file, f"it lacks the tensors {missing}")
    try:
        crcs = json.loads(meta.get("crc32", ""))
    except ValueError:
        raise _corrupt(file, "its checksums are unreadable") from None
    shapes = {name: list(handle.get_slice(name).get_shape()) for name in TENSORS}
    dtypes = {name: str(handle.get_slice(name).get_dtype()) for name in TENSORS}
    n = shapes["indices"][0] if len(shapes["indices"]) == 1 else -1
    if n < 0 or any(shapes[name][:1] != [n] for name in TENSORS) or len(shapes["attributions"]) < 2:
        raise _corrupt(file, f"its tensors disagree in length ({ {k: v for k, v in shapes.items()} })")
    indices = handle.get_tensor("indices")
    if tensor_crc32(indices) != crcs.get("indices"):
        raise _corrupt(file, "the checksum of its indices does not match")
    return _Shard(file, meta, indices, shapes, dtypes)


def verify_shard(path: str | os.PathLike[str], expected_hash: str | None = None) -> int:
    """Check one shard whole: its header (as `open_shard`) and the CRC-32 of every tensor's bytes, read in
    blocks of 64 MiB. Returns its number of samples; raises `ShardError` naming the file and the damaged
    tensor.

    >>> import tempfile
    >>> p = write_shard(Path(tempfile.mkdtemp()) / "s.safetensors", {"indices": torch.arange(2),
    ...     "attributions": torch.rand(2, 1, 3), "targets": torch.zeros(2, 1, dtype=torch.int64),
    ...     "logits": torch.zeros(2, 3), "labels": torch.zeros(2, dtype=torch.int64),
    ...     "valid": torch.ones(2, dtype=torch.bool)}, {"config_hash": "x"})
    >>> verify_shard(p, "x")
    2
    """
    shard = open_shard(path, expected_hash)
    _verify(shard)
    return len(shard.indices)


def _verify(shard: _Shard) -> None:
    """Check every tensor's CRC-32, reading the attributions in bounded blocks."""
    handle = _open(shard.path)
    crcs = json.loads(shard.metadata["crc32"])
    for name in TENSORS:
        sl = handle.get_slice(name)
        shape = shard.shapes[name]
        n = shape[0]
        row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * 8)
        step = max(1, _CRC_BLOCK_BYTES // row_bytes)
        crc = 0
        for start in range(0, n, step):
            crc = tensor_crc32(sl[start : start + step], crc)
        if crc != crcs.get(name):
            raise _corrupt(shard.path, f"the checksum of its {name!r} does not match (bytes were changed)")


class ShardedAttributions:
    """The attributions of a whole dataset, [N, K, ...] in dataset order, read lazily from the shards.

    Nothing is read until indexed: ``a[i]`` (one sample [K, ...]), ``a[i:j]``, ``a[tensor_of_positions]``
    read only those rows, through safetensors' memory-mapped slices, and return CPU tensors. A range in
    dataset order reads one contiguous block per shard. `batches` walks the whole array in order with
    bounded memory. ``len(a)``, ``a.shape`` and ``a.dtype`` need no reading.

    >>> import tempfile
    >>> out = tempfile.mkdtemp()
    >>> _ = write_shard(shard_path(out, 0, 0, 0), {"indices": torch.tensor([0, 2]),
    ...     "attributions": torch.tensor([[[0.0]], [[2.0]]]), "targets": torch.zeros(2, 1, dtype=torch.int64),
    ...     "logits": torch.zeros(2, 3), "labels": torch.zeros(2, dtype=torch.int64),
    ...     "valid": torch.ones(2, dtype=torch.bool)}, {"config_hash": "x"})
    >>> _ = write_shard(shard_path(out, 0, 1, 1), {"indices": torch.tensor([1]),
    ...     "attributions": torch.tensor([[[1.0]]]), "targets": torch.zeros(1, 1, dtype=torch.int64),
    ...     "logits": torch.zeros(1, 3), "labels": torch.zeros(1, dtype=torch.int64),
    ...     "valid": torch.ones(1, dtype=torch.bool)}, {"config_hash": "x"})
    >>> a = load_attributions(out, allow_incomplete=True).attributions
    >>> a.shape, a[:].flatten().tolist(), a[torch.tensor([2, 0])].flatten().tolist()
    (torch.Size([3, 1, 1]), [0.0, 1.0, 2.0], [2.0, 0.0])
    """

    def __init__(self, shards: Sequence[_Shard], shard_of: Tensor, row_of: Tensor) -> None:
        self._paths = [s.path for s in shards]
        self._shard_of = shard_of
        self._row_of = row_of
        self._slices: dict[int, Any] = {}
        first = shards[0] if shards else None
        tail = tuple(first.shapes["attributions"][1:]) if first is not None else ()
        self.shape = torch.Size((len(shard_of), *tail))
        self.dtype = _dtype_of(first.dtypes["attributions"]) if first is not None else torch.float32
        for s in shards:
            if (
                tuple(s.shapes["attributions"][1:]) != tail
                or _dtype_of(s.dtypes["attributions"]) != self.dtype
            ):
                raise _corrupt(
                    s.path,
                    f"its attributions are {s.dtypes['attributions']} {s.shapes['attributions'][1:]} per "
                    f"sample, the other shards' {self.dtype} {list(tail)}",
                )

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return (
            f"ShardedAttributions(shape={tuple(self.shape)}, dtype={self.dtype}, shards={len(self._paths)})"
        )

    def _slice(self, shard: int) -> Any:
        """The memory-mapped attributions of one shard (opened on first use, then kept)."""
        if shard not in self._slices:
            self._slices[shard] = _open(self._paths[shard]).get_slice("attributions")
        return self._slices[shard]

    def _rows(self, positions: Tensor) -> Tensor:
        out = torch.empty((len(positions), *self.shape[1:]), dtype=self.dtype)
        if len(positions) == 0:
            return out
        shards = self._shard_of[positions]
        rows = self._row_of[positions]
        for shard in torch.unique(shards).tolist():
            where = (shards == shard).nonzero().flatten()
            wanted = rows[where]
            lo, hi = int(wanted.min()), int(wanted.max()) + 1
            sl = self._slice(shard)
            if hi - lo == len(wanted) and bool((wanted[1:] > wanted[:-1]).all()):
                out[where] = sl[lo:hi]  # a contiguous run: one slice
            else:
                out[where] = sl[wanted]
        return out

    def __getitem__(self, key: Any) -> Tensor:
        """Rows by position in dataset order: an int, a slice, or positions (int tensor/list/array, or a
        bool mask of length N); a tuple indexes the rows first, then the rest of each row."""
        rest: tuple[Any, ...] = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        n = len(self)
        if isinstance(key, (int, np.integer)):
            i = int(key) + (n if key < 0 else 0)
            if not 0 <= i < n:
                raise PeeringIndexError(f"index {int(key)} is out of range for {n} samples")
            return self._rows(torch.tensor([i]))[0][rest]
        if isinstance(key, slice):
            positions = torch.arange(n)[key]
        else:
            positions = torch.as_tensor(key if isinstance(key, Tensor) else np.asarray(key))
            if positions.dtype == torch.bool:
                if positions.shape != (n,):
                    raise PeeringIndexError(
                        f"a boolean mask must have shape [{n}], got {list(positions.shape)}"
                    )
                positions = positions.nonzero().flatten()
            positions = positions.to("cpu", torch.int64).flatten()
            if len(positions) and (positions.min() < -n or positions.max() >= n):
                raise PeeringIndexError(f"positions out of range for {n} samples")
            positions = torch.where(positions < 0, positions + n, positions)
        return self._rows(positions)[(slice(None),) + rest]

    def batches(self, batch_size: int = 256) -> Iterator[tuple[int, Tensor]]:
        """``(start, attributions[start : start + batch_size])`` over the whole dataset, in order.

        >>> import tempfile
        >>> out = tempfile.mkdtemp()
        >>> _ = write_shard(shard_path(out, 0, 0, 0), {"indices": torch.arange(3),
        ...     "attributions": torch.rand(3, 1, 2), "targets": torch.zeros(3, 1, dtype=torch.int64),
        ...     "logits": torch.zeros(3, 2), "labels": torch.zeros(3, dtype=torch.int64),
        ...     "valid": torch.ones(3, dtype=torch.bool)}, {"config_hash": "x"})
        >>> [(start, len(b)) for start, b in load_attributions(out, allow_incomplete=True)
        ...                                  .attributions.batches(2)]
        [(0, 2), (2, 1)]
        """
        if batch_size < 1:
            raise PeeringValueError(f"batch_size must be >= 1, got {batch_size}")
        for start in range(0, len(self), batch_size):
            yield start, self[start : start + batch_size]


def _dtype_of(name: str) -> torch.dtype:
    table = {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
        "BOOL": torch.bool,
    }  # fmt: skip
    return table.get(name, torch.float32)


@dataclass(frozen=True)
class DatasetAttributions:
    """A dataset's attributions as `load_attributions` returns them: every sample once, in dataset order.

    Attributes:
        attributions: lazy [N, K, ...] (`ShardedAttributions`): index it to read rows.
        indices: int64 [N]: each sample's position in the dataset, increasing.
        targets: int64 [N, K]: the classes explained (-1 for a skipped non-finite sample).
        logits: float32 [N, C]: the model's class scores.
        labels: int64 [N]: the batch's labels, -1 where it had none.
        valid: bool [N]: False for samples skipped because their inputs or logits were not finite.
        config: the run's arguments (method, output, top_k or target, model fingerprint, ...).
        complete: True when every rank finished the run.

    Everything but ``attributions`` is read into memory (a few numbers per sample).
    """

    attributions: ShardedAttributions
    indices: Tensor
    targets: Tensor
    logits: Tensor
    labels: Tensor
    valid: Tensor
    config: dict[str, Any]
    complete: bool

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def probabilities(self) -> Tensor:
        """float32 [N, C]: softmax of the logits."""
        return self.logits.softmax(dim=1)

    @property
    def method(self) -> str:
        """The attribution method's name."""
        return str(self.config.get("method", "?"))

    @property
    def output(self) -> str:
        """What was differentiated: "probability", "log_probability" or "logit"."""
        return str(self.config.get("output", "?"))


def _shard_files(out_dir: Path, dataloader: int) -> list[Path]:
    folder = out_dir / SHARDS
    if not folder.is_dir():
        return []
    return sorted(folder.glob(f"dl{dataloader}-r*-*.safetensors"))


def load_attributions(
    out_dir: str | os.PathLike[str],
    *,
    dataloader: int = 0,
    verify: bool = True,
    allow_incomplete: bool = False,
) -> DatasetAttributions:
    """Read the attributions an `AttributionWriter` wrote: every sample once, in dataset order, whatever
    the number of ranks (and of resumed runs) that wrote them.

    Args:
        out_dir: the writer's output folder.
        dataloader: which predict dataloader (0 unless ``Trainer.predict`` got several).
        verify: check every shard's CRC-32 checksums now (reads all the bytes once, in blocks of 64 MiB;
            about 2 GB/s). With False only the headers, sizes, indices and their checksums are checked.
        allow_incomplete: read an unfinished (interrupted or running) run's shards as they are: the
            samples written so far, in dataset order.

    Returns:
        A `DatasetAttributions`; its ``attributions`` are read lazily from the memory-mapped shards, so a
        dataset's attributions may be larger than memory.

    Raises:
        ShardError: a shard listed in the manifest is missing; a shard is truncated, corrupt (checksum),
            from another run, or overlaps another; the run is incomplete (unless ``allow_incomplete``).
            The message names the file.

    >>> import tempfile
    >>> out = tempfile.mkdtemp()
    >>> _ = write_shard(shard_path(out, 0, 0, 0), {"indices": torch.tensor([1, 0]),
    ...     "attributions": torch.rand(2, 2, 4), "targets": torch.tensor([[3, 1], [0, 2]]),
    ...     "logits": torch.rand(2, 5), "labels": torch.tensor([3, 0]),
    ...     "valid": torch.ones(2, dtype=torch.bool)}, {"config_hash": "x"})
    >>> run = load_attributions(out, allow_incomplete=True)
    >>> run.indices.tolist(), run.targets.tolist(), run.attributions.shape
    ([0, 1], [[0, 2], [3, 1]], torch.Size([2, 2, 4]))
    """
    root = Path(out_dir)
    if not root.is_dir():
        raise ShardError(f"attributions folder not found: {root}")
    manifest = read_manifest(root)
    complete_info = (manifest or {}).get("complete", {}).get(str(dataloader)) if manifest else None
    shards = _listed_shards(root, manifest, complete_info, dataloader, allow_incomplete)
    if verify:
        for shard in shards:
            _verify(shard)
    sorted_indices, order, shard_of, row_of = _dataset_order(shards)
    if complete_info is not None and int(complete_info["samples"]) != len(sorted_indices):
        raise ShardError(
            f"{root}: the finished run wrote {complete_info['samples']} samples of dataloader {dataloader} "
            f"but its shards hold {len(sorted_indices)}; the shards were changed after the run"
        )
    lazy = ShardedAttributions(shards, shard_of, row_of)
    small = {}
    for name in ("targets", "logits", "labels", "valid"):
        parts = [_open(s.path).get_tensor(name) for s in shards]
        if parts:
            widths = {tuple(p.shape[1:]) for p in parts}
            if len(widths) > 1:
                raise ShardError(f"the shards of {root} disagree on the shape of {name!r}: {sorted(widths)}")
            small[name] = torch.cat(parts)[order]
        else:
            small[name] = torch.zeros((0,), dtype=torch.int64)
    return DatasetAttributions(
        attributions=lazy,
        indices=sorted_indices,
        targets=small["targets"],
        logits=small["logits"],
        labels=small["labels"],
        valid=small["valid"],
        config=dict((manifest or {}).get("config", {})),
        complete=complete_info is not None,
    )

def _listed_shards(
    root: Path,
    manifest: dict[str, Any] | None,
    complete_info: dict[str, Any] | None,
    dataloader: int,
    allow_incomplete: bool,
) -> list[_Shard]:
    """The shards of a finished run (those its manifest lists; others are warned about and ignored), or of
    an unfinished one when ``allow_incomplete`` (else a clear error)."""
    expected_hash = manifest.get("config_hash") if manifest else None
    if complete_info is not None:
        files = [root / SHARDS / name for name in complete_info["shards"]]
    else:
        if not allow_incomplete:
            found = len(_shard_files(root, dataloader))
            what = "no manifest" if manifest is None else "no record that every rank finished"
            raise ShardError(
                f"{root} holds an unfinished run ({what}; {found} shard(s) of dataloader {dataloader} so "
                "far): rerun the same command to finish it, or pass allow_incomplete=True to read what is "
                "there"
            )
        files = _shard_files(root, dataloader)
    shards = [open_shard(f, expected_hash) for f in files]
    if complete_info is not None:
        extra = sorted(set(_shard_files(root, dataloader)) - set(files))
        if extra:
            import warnings

            warnings.warn(
                f"peering: {len(extra)} shard(s) in {root / SHARDS} are not part of the finished run and are "
                f"ignored (e.g. {extra[0].name})",
                RuntimeWarning,
                stacklevel=3,
            )
    return shards


def _dataset_order(shards: list[_Shard]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(the dataset indices sorted, the order that sorts them, and for each the shard and row it is in);
    a clear error when an index is in two shards."""
    if shards:
        all_indices = torch.cat([s.indices for s in shards])
        shard_ids = torch.cat(
            [torch.full((len(s.indices),), k, dtype=torch.int32) for k, s in enumerate(shards)]
        )
        rows = torch.cat([torch.arange(len(s.indices)) for s in shards])
    else:
        all_indices = torch.zeros(0, dtype=torch.int64)
        shard_ids = torch.zeros(0, dtype=torch.int32)
        rows = torch.zeros(0, dtype=torch.int64)
    order = torch.sort(all_indices, stable=True).indices
    sorted_indices = all_indices[order]
    repeated = (sorted_indices[1:] == sorted_indices[:-1]).nonzero().flatten()
    if len(repeated):
        at = int(repeated[0])
        index = int(sorted_indices[at])
        a, b = shards[int(shard_ids[order[at]])].path, shards[int(shard_ids[order[at + 1]])].path
        raise ShardError(
            f"dataset index {index} is in two shards, {a} and {b} ({len(repeated)} repeated sample(s) in "
            "all): did every rank see the whole dataset (Trainer(use_distributed_sampler=False))? Delete "
            "the folder and rerun with Lightning's distributed sampler"
        )
    return sorted_indices, order, shard_ids[order], rows[order]
