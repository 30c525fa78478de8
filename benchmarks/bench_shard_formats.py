"""Which file format the dataset shards use: write time, size, and reading back in dataset order.

    PEERING_DATA_DIR=../shared/datasets/mnist .venv/bin/python benchmarks/bench_shard_formats.py

Real attributions (top-2 gradients of the demo CNN trained on 8,000 MNIST t10k digits, for the first
``--samples`` t10k digits) split
as `AttributionWriter` splits them under 2 processes: rank r holds dataset positions r, r + 2, ...
(Lightning's `UnrepeatedDistributedSampler`), in shards of 1,024 samples. Each format writes the shards
(indices, attributions, logits, targets), then the attributions are read back in dataset order, 256
samples at a time, gathering rows from the shards of both ranks. Contenders: safetensors (one file per
shard; rows read through safetensors' own memory-mapped slices, contiguous runs as slices), one ``.npy``
per tensor (``np.load(mmap_mode="r")``), zarr v3 (uncompressed, Blosc-LZ4 with byte shuffle, Zstd level 3;
only when ``zarr`` is installed), and compressed ``.npz`` (no lazy reading: whole shards, one per rank
kept in memory). The
files are read right after being written, from the page cache (the machine's disk is not measured).
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import peering
from _common import parse_args, trained_cnn  # the script's own folder is on sys.path
from peering.data import load_mnist

SHARD, CHUNK, RANKS = 1024, 256, 2


def layout(n: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """The shards' dataset positions, and for every position its shard and row."""
    shards = []
    for rank in range(RANKS):
        own = np.arange(rank, n, RANKS)
        shards += [own[s : s + SHARD] for s in range(0, len(own), SHARD)]
    where, row = np.empty(n, np.int64), np.empty(n, np.int64)
    for k, positions in enumerate(shards):
        where[positions], row[positions] = k, np.arange(len(positions))
    return shards, where, row


def read_in_order(
    rows_of: Callable[[int, np.ndarray], Any],
    n: int,
    where: np.ndarray,
    row: np.ndarray,
    sample_shape: tuple[int, ...],
) -> float:
    out = np.empty((CHUNK, *sample_shape), np.float32)
    check = 0.0
    for start in range(0, n, CHUNK):
        w, r = where[start : start + CHUNK], row[start : start + CHUNK]
        for k in np.unique(w):
            mask = w == k
            out[np.nonzero(mask)[0]] = rows_of(int(k), r[mask])
        check += float(out[0].sum())
    return check


def size_mb(folder: str) -> float:
    return sum(os.path.getsize(os.path.join(p, f)) for p, _, files in os.walk(folder) for f in files) / 1e6


def main() -> None:
    import argparse
    import sys

    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--samples", type=int, default=4096)
    known, rest = extra.parse_known_args()
    sys.argv = [sys.argv[0], *rest]
    args = parse_args(__doc__.splitlines()[0], repeats=5)
    images, _ = load_mnist(args.data_dir, "test")
    model, _, _ = trained_cnn(args.data_dir)
    exp = peering.explain(model, images[: known.samples], top_k=2)
    attributions, logits, targets = exp.attributions.numpy(), exp.logits.numpy(), exp.targets.numpy()
    n, sample_shape = len(attributions), attributions.shape[1:]
    shards, where, row = layout(n)
    tensors = lambda s: {  # noqa: E731
        "indices": s, "attributions": attributions[s], "logits": logits[s], "targets": targets[s]
    }  # fmt: skip

    from safetensors import safe_open
    from safetensors.numpy import save_file

    def write_safetensors(root: str) -> Callable[[int, np.ndarray], Any]:
        for k, s in enumerate(shards):
            save_file(tensors(s), f"{root}/{k}.safetensors")
        slices = [
            safe_open(f"{root}/{k}.safetensors", framework="pt").get_slice("attributions")
            for k in range(len(shards))
        ]

        def rows(k: int, r: np.ndarray) -> Any:
            if r[-1] - r[0] + 1 == len(r):
                return slices[k][int(r[0]) : int(r[-1]) + 1].numpy()
            return slices[k][torch.from_numpy(r)].numpy()

        return rows

    def write_npy(root: str) -> Callable[[int, np.ndarray], Any]:
        for k, s in enumerate(shards):
            os.makedirs(f"{root}/{k}")
            for name, value in tensors(s).items():
                np.save(f"{root}/{k}/{name}.npy", value)
        maps = [np.load(f"{root}/{k}/attributions.npy", mmap_mode="r") for k in range(len(shards))]
        return lambda k, r: maps[k][r]

    def write_npz(root: str) -> Callable[[int, np.ndarray], Any]:
        for k, s in enumerate(shards):
            np.savez_compressed(f"{root}/{k}.npz", **tensors(s))
        cache: dict[int, np.ndarray] = {}

        def rows(k: int, r: np.ndarray) -> Any:
            if k not in cache:
                if len(cache) >= RANKS:  # the ranks' current shards: reading in order alternates them
                    del cache[min(cache)]
                cache[k] = np.load(f"{root}/{k}.npz")["attributions"]
            return cache[k][r]

        return rows

    contenders: dict[str, Callable[[str], Callable[[int, np.ndarray], Any]]] = {
        "safetensors (the choice)": write_safetensors,
        "npy, memory-mapped": write_npy,
    }
    try:
        import zarr
        from zarr.codecs import BloscCodec, ZstdCodec

        def zarr_writer(codec: Any) -> Callable[[str], Callable[[int, np.ndarray], Any]]:
            def write(root: str) -> Callable[[int, np.ndarray], Any]:
                arrays = []
                for k, s in enumerate(shards):
                    group = zarr.open_group(f"{root}/{k}", mode="w")
                    for name, value in tensors(s).items():
                        chunks = (CHUNK, *value.shape[1:])
                        group.create_array(
                            name, data=value, chunks=chunks, compressors=None if codec is None else [codec]
                        )
                    arrays.append(group["attributions"])
                return lambda k, r: arrays[k].get_orthogonal_selection((r,))

            return write

        contenders["zarr, uncompressed"] = zarr_writer(None)
        contenders["zarr, Blosc-LZ4 + shuffle"] = zarr_writer(
            BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
        )
        contenders["zarr, Zstd 3"] = zarr_writer(ZstdCodec(level=3))
    except ImportError:
        print("(zarr is not installed: its rows are left out; pip install zarr to include them)")
    contenders["npz, compressed (whole shards)"] = write_npz

    writes: dict[str, list[float]] = {k: [] for k in contenders}
    reads: dict[str, list[float]] = {k: [] for k in contenders}
    sizes: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as base:
        for _ in range(args.repeats):
            for name, write in contenders.items():
                root = tempfile.mkdtemp(dir=base)
                start = time.perf_counter()
                rows_of = write(root)
                writes[name].append(time.perf_counter() - start)
                start = time.perf_counter()
                read_in_order(rows_of, n, where, row, sample_shape)
                reads[name].append(time.perf_counter() - start)
                sizes[name] = size_mb(root)
                del rows_of
                shutil.rmtree(root)
    raw = attributions.nbytes / 1e6
    print(
        f"\n{n:,} samples x {sample_shape} float32 attributions ({raw:.1f} MB), {RANKS} ranks interleaved, "
        f"shards of {SHARD}; medians of {args.repeats} rounds"
    )
    base_read = statistics.median(reads["safetensors (the choice)"])
    for name in contenders:
        w, r = statistics.median(writes[name]), statistics.median(reads[name])
        print(
            f"  {name:32s} write {w:6.3f} s  size {sizes[name]:6.1f} MB ({sizes[name] / raw:4.2f}x)  "
            f"read in dataset order {1000 * r:7.1f} ms (x{r / base_read:5.1f})"
        )


if __name__ == "__main__":
    main()
