"""What `AttributionWriter` costs over bare `peering.explain`, and 1 against 2 processes.

    PEERING_DATA_DIR=../shared/datasets/mnist .venv/bin/python benchmarks/bench_dataset.py

Top-2 gradients of the demo CNN (seeded initial weights: the cost does not depend on training) for the
first ``--samples`` MNIST t10k digits, batches of 64, the same DataLoader everywhere:

- ``explain loop``: ``peering.explain`` on each batch of the DataLoader in one process, results dropped;
- ``writer``: ``Trainer.predict`` with the writer in one process (Lightning's loop, the hooks, the shards
  written to disk by the writer thread), a fresh output folder each run; the LightningModule's
  ``predict_step`` returns nothing;
- ``writer, predict_step runs the model``: the same with a ``predict_step`` that runs the model (what most
  LightningModules do), to show what that forward pass costs;
- ``writer, 2 processes``: ``Trainer(strategy="ddp_spawn", devices=2)``, one torch thread each (the
  one-process runs use ``--threads``, 2 by default: the same cores either way).

Contenders run in rounds, the order flipping every round. Times are seconds of the predict loop (first
batch to last shard on disk on every rank; for DDP without the seconds spent starting processes, shown
apart) and the whole call. The writer also times its own work (its hooks minus ``explain``, and the
writer thread's CPU time) as a share of the loop: steadier than the ratio on a shared machine. Target
(issue #11): the writer costs <= 10% over the explain loop in one process.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

import peering
import peering.lightning.writer as writer_module
from _common import parse_args  # the script's own folder is on sys.path
from peering.data import load_mnist
from peering.lightning import AttributionWriter
from peering.models import DigitCNN

BATCH = 64


class Explained(pl.LightningModule):
    def __init__(self, model: torch.nn.Module, forward_in_predict: bool = False) -> None:
        super().__init__()
        self.model = model
        self.forward_in_predict = forward_in_predict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def predict_step(self, batch: Any, batch_idx: int) -> Any:
        return self(batch[0]) if self.forward_in_predict else ()


class LoopTimer(Callback):
    """Rank 0 writes the seconds from the first batch to the end of the writer's epoch (all ranks done)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.start = 0.0

    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.strategy.barrier()
        self.start = time.perf_counter()

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.strategy.barrier()  # after the writer's own end-of-epoch work, which comes first
        if trainer.is_global_zero:
            Path(self.path).write_text(json.dumps(time.perf_counter() - self.start))


class TimedWriter(AttributionWriter):
    """The writer, timing its hooks and its `explain` calls on the predict thread."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hook_seconds = 0.0
        self.explain_seconds = 0.0

    def _timed(self, name: str, *args: Any) -> Any:
        start = time.perf_counter()
        try:
            return getattr(super(), name)(*args)
        finally:
            self.hook_seconds += time.perf_counter() - start

    def on_predict_start(self, *args: Any) -> None:
        self._timed("on_predict_start", *args)

    def write_on_batch_end(self, *args: Any) -> None:
        self._timed("write_on_batch_end", *args)

    def on_predict_epoch_end(self, *args: Any) -> None:
        self._timed("on_predict_epoch_end", *args)

    def _explain(self, *args: Any) -> Any:
        start = time.perf_counter()
        try:
            return super()._explain(*args)
        finally:
            self.explain_seconds += time.perf_counter() - start


_THREAD_CPU = [0.0]
_write_parts = writer_module._write_parts


@functools.wraps(_write_parts)
def _timed_write_parts(*args: Any) -> None:
    start = time.thread_time()
    try:
        _write_parts(*args)
    finally:
        _THREAD_CPU[0] += time.thread_time() - start


writer_module._write_parts = _timed_write_parts  # type: ignore[assignment]


def explain_loop(model: torch.nn.Module, loader: DataLoader) -> tuple[float, float]:
    start = time.perf_counter()
    for x, _ in loader:
        peering.explain(model, x, top_k=2)
    seconds = time.perf_counter() - start
    return seconds, seconds


def with_writer(
    model: torch.nn.Module, loader: DataLoader, root: str, devices: int, forward_in_predict: bool = False
) -> tuple[float, float, float | None]:
    """(loop seconds, whole call seconds, the writer's own share of the loop or None under DDP)."""
    out = tempfile.mkdtemp(dir=root)
    timer_file = os.path.join(out, "loop.json")
    writer = TimedWriter(os.path.join(out, "attributions"), top_k=2)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[writer, LoopTimer(timer_file)],
    )
    _THREAD_CPU[0] = 0.0
    start = time.perf_counter()
    trainer.predict(Explained(model, forward_in_predict), loader, return_predictions=False)
    whole = time.perf_counter() - start
    loop = float(json.loads(Path(timer_file).read_text()))
    share = None
    if devices == 1:
        share = (writer.hook_seconds - writer.explain_seconds + _THREAD_CPU[0]) / loop
    return loop, whole, share


def main() -> None:
    import argparse
    import sys

    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--samples", type=int, default=2048, help="MNIST digits to explain")
    known, rest = extra.parse_known_args()
    sys.argv = [sys.argv[0], *rest]
    args = parse_args(__doc__.splitlines()[0], repeats=3)
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)

    images, labels = load_mnist(args.data_dir, "test")
    loader = DataLoader(TensorDataset(images[: known.samples], labels[: known.samples]), batch_size=BATCH)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DigitCNN().eval()
    n = len(loader.dataset)  # type: ignore[arg-type]

    contenders = {
        "explain loop": lambda root: (*explain_loop(model, loader), None),
        "writer": lambda root: with_writer(model, loader, root, 1),
        "writer, predict_step runs the model": lambda root: with_writer(model, loader, root, 1, True),
        "writer, 2 processes": lambda root: with_writer(model, loader, root, 2),
    }
    loops: dict[str, list[float]] = {k: [] for k in contenders}
    wholes: dict[str, list[float]] = {k: [] for k in contenders}
    shares: dict[str, list[float]] = {k: [] for k in contenders}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as root:
        for fn in contenders.values():  # warm-up
            fn(root)
        order = list(contenders.items())
        for round_ in range(args.repeats):
            for name, fn in order if round_ % 2 == 0 else order[::-1]:
                loop, whole, share = fn(root)
                loops[name].append(loop)
                wholes[name].append(whole)
                if share is not None:
                    shares[name].append(share)

    print(
        f"\nTop-2 gradients of {n:,} MNIST digits (batches of {BATCH}), {args.threads} threads in one "
        f"process, 1 thread per process under DDP; median of {args.repeats} alternated rounds; 1-minute "
        f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after ({os.cpu_count()} CPUs)"
    )
    base = statistics.median(loops["explain loop"])
    for name in contenders:
        loop, whole = statistics.median(loops[name]), statistics.median(wholes[name])
        runs = " ".join(f"{x:.2f}" for x in loops[name])
        share = f"  writer's own work {100 * statistics.median(shares[name]):.1f}%" if shares[name] else ""
        print(
            f"  {name:38s} loop {loop:6.2f} s ({n / loop:6.0f} samples/s, x{loop / base:5.3f})  "
            f"whole call {whole:6.2f} s  runs [{runs}]{share}"
        )
    ratio = statistics.median(loops["writer"]) / base
    paired = statistics.median(a / b for a, b in zip(loops["writer"], loops["explain loop"], strict=True))
    speedup = statistics.median(loops["writer"]) / statistics.median(loops["writer, 2 processes"])
    startup = statistics.median(wholes["writer, 2 processes"]) - statistics.median(
        loops["writer, 2 processes"]
    )
    print(
        f"\nwriter / explain loop, one process: {ratio:.3f} (per-round median {paired:.3f}; target <= 1.10); "
        f"the writer's own work: {100 * statistics.median(shares['writer']):.1f}% of its loop"
    )
    print(
        f"2 processes / 1 process: {speedup:.2f}x the samples per second in the loop "
        f"({startup:.1f} s more to start the processes)"
    )


if __name__ == "__main__":
    main()
