"""Shared set-up for the benchmarks: MNIST t10k, the demo CNN trained on its first 8,000 digits, a timer."""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from peering.data import load_mnist
from peering.models import DigitCNN, accuracy, train_classifier


def parse_args(
    description: str,
    repeats: int | None = 7,
    morphed: tuple[str, ...] | None = None,
    *,
    threads: int = 2,
    options: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    """The arguments every benchmark takes (``--data-dir``, ``--threads``, and ``--repeats`` unless
    ``repeats`` is None), plus those ``options`` adds; sets torch's threads."""
    parser = argparse.ArgumentParser(description=description)
    if morphed:
        parser.add_argument("--morphed", choices=morphed, default=morphed[0], help="the model to morph")
    parser.add_argument("--data-dir", default=os.environ.get("PEERING_DATA_DIR"),
                        help="folder with the MNIST IDX files (default: $PEERING_DATA_DIR)")
    if repeats is not None:
        parser.add_argument("--repeats", type=int, default=repeats, help="timed repeats of each contender")
    parser.add_argument("--threads", type=int, default=threads)
    if options is not None:
        options(parser)
    args = parser.parse_args()
    if not args.data_dir:
        parser.error("pass --data-dir or set PEERING_DATA_DIR to the MNIST folder")
    torch.set_num_threads(args.threads)
    return args


def trained_cnn(data_dir: str) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The demo CNN trained on the first 8,000 t10k digits, and the 2,000 held out."""
    images, labels = load_mnist(data_dir, "test")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the same initial weights, so every run benchmarks the same model
        model = DigitCNN()
    model = train_classifier(model, images[:8000], labels[:8000], epochs=2, seed=0)
    test_x, test_y = images[8000:], labels[8000:]
    print(f"demo CNN: held-out accuracy {accuracy(model, test_x, test_y):.4f}")
    return model, test_x, test_y


def race(contenders: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each contender, run alternately (round-robin) after one warm-up each."""
    for fn in contenders.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
