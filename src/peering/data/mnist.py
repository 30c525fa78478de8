"""MNIST from the official IDX files.

Images come back as float32 tensors `[N, 1, H, W]` with pixels in `[0, 1]` and labels as int64 `[N]`, so
that pixel space is the input space the gradients are taken in.

`load_mnist` reads the four official files (`.gz` or decompressed) from a folder, checks them (md5 where
the checksum is known, the IDX header and size always) and raises `DatasetError` naming the file and what
was expected when something is wrong. It never touches the network unless asked (`download=True` or
`download_mnist`).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from peering._files import atomic_path
from peering.errors import DatasetError, PeeringValueError

__all__ = [
    "DATA_DIR_ENV",
    "MNIST_FILES",
    "MNIST_MIRRORS",
    "DatasetError",
    "available_mnist_splits",
    "download_mnist",
    "load_mnist",
]

DATA_DIR_ENV = "PEERING_DATA_DIR"
"""Environment variable naming the folder with the MNIST IDX files when `root` is not given."""

MNIST_MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

Split = Literal["train", "test"]

MNIST_FILES: dict[str, dict[str, str]] = {
    "train": {"images": "train-images-idx3-ubyte", "labels": "train-labels-idx1-ubyte"},
    "test": {"images": "t10k-images-idx3-ubyte", "labels": "t10k-labels-idx1-ubyte"},
}

# Official checksums of the compressed files (as published with the data set and used by torchvision).
_GZ_MD5: dict[str, str] = {
    "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
}

# Checksums of the decompressed files, computed by decompressing the md5-verified official t10k .gz files.
# No verified copy of the train .gz files was at hand to compute the raw train checksums from, so raw train
# files are checked by their IDX header (magic number, shape) and exact size only (see `_read_idx`).
_RAW_MD5: dict[str, str] = {
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}

# Expected IDX header of each file: magic number and dimensions.
_IDX_MAGIC = {"images": 2051, "labels": 2049}
_EXPECTED_DIMS: dict[str, tuple[int, ...]] = {
    "train-images-idx3-ubyte": (60000, 28, 28),
    "train-labels-idx1-ubyte": (60000,),
    "t10k-images-idx3-ubyte": (10000, 28, 28),
    "t10k-labels-idx1-ubyte": (10000,),
}




# --------------------------------------------------------------------------------------------- helpers


def _md5(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _resolve_root(root: str | os.PathLike[str] | None, *, download: bool = False) -> Path:
    if root is None:
        env = os.environ.get(DATA_DIR_ENV)
        if not env:
            hint = " (download=True needs an explicit root)" if download else ""
            raise DatasetError(
                f"no MNIST folder given{hint}: pass root=... or set the {DATA_DIR_ENV} environment variable "
                "to a folder holding the IDX files (train-images-idx3-ubyte[.gz], ...), or call "
                "load_mnist(root, download=True) / download_mnist(root) to fetch them"
            )
        root = env
    return Path(root).expanduser()


def _find(root: Path, name: str) -> Path | None:
    """The `.gz` file if present, else the raw one, else None."""
    for candidate in (root / f"{name}.gz", root / name):
        if candidate.is_file():
            return candidate
    return None


def _check_md5(path: Path, name: str) -> None:
    expected = (_GZ_MD5 if path.suffix == ".gz" else _RAW_MD5).get(name)
    if expected is None:
        return  # raw train files: checked by header and size in _read_idx
    got = _md5(path)
    if got != expected:
        raise DatasetError(
            f"md5 mismatch for {path}: expected {expected}, got {got}; delete it and download again"
        )


def _read_idx(path: Path, name: str, kind: str) -> np.ndarray:
    """Parse an IDX file (`.gz` or raw) into a uint8 array, checking magic number, shape and size."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DatasetError(f"cannot read {path}: {err}; delete it and download again") from err
    magic_expected = _IDX_MAGIC[kind]
    ndim = 3 if kind == "images" else 1
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(
            f"{path} is truncated: {len(data)} bytes, expected at least a {header}-byte IDX header; "
            "delete it and download again"
        )
    magic = int.from_bytes(data[:4], "big")
    if magic != magic_expected:
        raise DatasetError(
            f"{path} is not an IDX {kind} file: magic number {magic}, expected {magic_expected} "
            f"(unsigned bytes, {ndim} dimensions)"
        )
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected_dims = _EXPECTED_DIMS[name]
    if dims != expected_dims:
        raise DatasetError(f"{path} has shape {dims} in its IDX header, expected {expected_dims}")
    expected_size = header + int(np.prod(dims))
    if len(data) != expected_size:
        raise DatasetError(
            f"{path} has {len(data)} bytes of data, expected {expected_size} for shape {dims} "
            "(truncated or corrupt); delete it and download again"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


# ------------------------------------------------------------------------------------------------ MNIST


def available_mnist_splits(root: str | os.PathLike[str]) -> list[str]:
    """The MNIST splits (`"train"`, `"test"`) whose image and label files are both present in `root`.

    Only checks that the files exist (`.gz` or raw); `load_mnist` verifies them.

    >>> import tempfile
    >>> available_mnist_splits(tempfile.mkdtemp())
    []
    """
    folder = Path(root).expanduser()
    return [
        split
        for split, names in MNIST_FILES.items()
        if all(_find(folder, name) is not None for name in names.values())
    ]


def load_mnist(
    root: str | os.PathLike[str] | None = None,
    split: Split = "test",
    *,
    download: bool = False,
) -> tuple[Tensor, Tensor]:
    """Load an MNIST split from the official IDX files in `root`.

    Args:
        root: folder holding `{train,t10k}-{images-idx3,labels-idx1}-ubyte`, each `.gz` or raw. None reads
            the `PEERING_DATA_DIR` environment variable.
        split: `"train"` (60,000 digits) or `"test"` (the 10,000 t10k digits).
        download: fetch missing files into `root` first (see `download_mnist`); needs network access.

    Returns:
        `(images, labels)`: float32 `[N, 1, 28, 28]` with pixels in `[0, 1]`, and int64 `[N]`.

    Raises:
        DatasetError: no folder given, or a file is missing, fails its md5 check, or is truncated or
            malformed; the message names the file and what was expected.

    Example (skipped when MNIST is not on this machine; `load_digits` is the offline stand-in):

    >>> import os
    >>> if os.environ.get("PEERING_DATA_DIR"):
    ...     x, y = load_mnist(split="test")
    ...     assert x.shape == (10000, 1, 28, 28) and y.dtype == torch.int64
    """
    if split not in MNIST_FILES:
        raise PeeringValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = _resolve_root(root, download=download)
    if download:
        download_mnist(folder, (split,))
    if not folder.is_dir():
        raise DatasetError(
            f"MNIST folder {folder} does not exist; pass the folder with the IDX files as root (or set "
            f"{DATA_DIR_ENV}), or use download=True"
        )
    arrays = {}
    for kind, name in MNIST_FILES[split].items():
        path = _find(folder, name)
        if path is None:
            available = available_mnist_splits(folder)
            raise DatasetError(
                f"missing {folder / name}(.gz); available splits in {folder}: "
                f"{', '.join(available) if available else 'none'}"
            )
        _check_md5(path, name)
        arrays[kind] = _read_idx(path, name, kind)
    images = torch.from_numpy(arrays["images"].astype(np.float32) / 255.0).unsqueeze(1)
    labels = torch.from_numpy(arrays["labels"].astype(np.int64))
    if int(labels.max()) > 9:
        raise DatasetError(
            f"{_find(folder, MNIST_FILES[split]['labels'])} holds label {int(labels.max())}, expected 0-9"
        )
    return images.contiguous(), labels


def _fetch(url: str, destination: Path, expected_md5: str, progress: bool) -> None:
    """Download `url` to a temp file beside `destination`, check its md5, then move it into place."""
    with atomic_path(destination) as tmp:
        digest = hashlib.md5(usedforsecurity=False)
        with open(tmp, "xb") as out, urllib.request.urlopen(url, timeout=60) as response:
            total = response.headers.get("Content-Length")
            bar = None
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(
                    total=int(total) if total else None, unit="B", unit_scale=True, desc=destination.name,
                    leave=False,
                )
            try:
                while block := response.read(1 << 16):
                    out.write(block)
                    digest.update(block)
                    if bar is not None:
                        bar.update(len(block))
            finally:
                if bar is not None:
                    bar.close()
        got = digest.hexdigest()
        if got != expected_md5:
            raise DatasetError(
                f"md5 mismatch for {url} (to be saved as {destination}): expected {expected_md5}, got {got}"
            )


def _already_valid(path: Path, name: str) -> bool:
    if not path.is_file():
        return False
    kind = "images" if "images" in name else "labels"
    try:
        _check_md5(path, name)
        _read_idx(path, name, kind)
    except DatasetError:
        return False
    return True


def download_mnist(
    root: str | os.PathLike[str],
    splits: Iterable[Split] = ("train", "test"),
    *,
    mirrors: Sequence[str] = MNIST_MIRRORS,
    progress: bool = True,
) -> Path:
    """Download the official MNIST `.gz` files for `splits` into `root` and return the folder.

    Each file is tried on each mirror in turn, checked against its official md5, and written atomically (a
    temp file in `root`, then `os.replace`), so an interrupted or corrupt download never leaves a file
    that looks valid. Files already present and valid are skipped.

    Raises:
        DatasetError: every mirror failed for a file (the errors of each are in the message).

    Example (with a local mirror, so it runs offline; real use leaves `mirrors` as it is):

    >>> import tempfile
    >>> empty_mirror = Path(tempfile.mkdtemp()).as_uri() + "/"
    >>> download_mnist(tempfile.mkdtemp(), splits=(), mirrors=[empty_mirror]).is_dir()
    True
    """
    folder = Path(root).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    for split in splits:
        if split not in MNIST_FILES:
            raise PeeringValueError(f"split must be 'train' or 'test', got {split!r}")
        for name in MNIST_FILES[split].values():
            gz = folder / f"{name}.gz"
            if _already_valid(gz, name) or _already_valid(folder / name, name):
                continue
            errors = []
            for mirror in mirrors:
                url = mirror.rstrip("/") + f"/{name}.gz"
                try:
                    _fetch(url, gz, _GZ_MD5[name], progress)
                    break
                except (OSError, DatasetError) as err:  # URLError is an OSError
                    errors.append(f"{url}: {err}")
            else:
                raise DatasetError(f"could not download {gz}:\n  " + "\n  ".join(errors))
    return folder
