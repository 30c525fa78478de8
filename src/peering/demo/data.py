"""The demo's data: its train/test split of digits, and the digits a demo run trained on."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from torch import Tensor

from peering.errors import PeeringValueError
from peering.runs import names, read_run_json

__all__ = ["DEFAULT_EPOCHS", "load_demo_data", "mnist_folder", "training_data"]

log = logging.getLogger(__name__)

DEFAULT_EPOCHS: dict[str, int] = {"digits": 10, "mnist": 2}
"""Epochs when none are given: about 3 s of training on 2 CPU cores for digits, 25 s for MNIST."""


def load_demo_data(
    dataset: str,
    data_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    say: Callable[[str], None] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, str]:
    """The demo's split: ``(train_x, train_y, test_x, test_y, description)``, as `run_demo` makes it.

    ``dataset`` is "digits" (scikit-learn's 8x8 digits, 80/20) or "mnist" (the t10k digits, 80/20, from
    ``data_dir``, else ``$PEERING_DATA_DIR``, else downloaded with checksums, said through ``say``); the
    split is shuffled with ``seed``. `peering check` uses it to test a demo checkpoint on the digits the
    demo held out.

    >>> train_x, train_y, test_x, test_y, described = load_demo_data("digits")
    >>> tuple(test_x.shape), described
    ((359, 1, 8, 8), '1,438 scikit-learn 8x8 digits')
    """
    if dataset not in DEFAULT_EPOCHS:
        raise PeeringValueError(f"dataset must be 'digits' or 'mnist', got {dataset!r}")
    say = say or log.info
    from peering.data import available_mnist_splits, load_digits, load_mnist, train_test_split

    if dataset == "digits":
        images, labels = load_digits()
        train_x, train_y, test_x, test_y = train_test_split(images, labels, test_fraction=0.2, seed=seed)
        return train_x, train_y, test_x, test_y, f"{len(train_x):,} scikit-learn 8x8 digits"
    folder = mnist_folder(data_dir)
    download = "test" not in (available_mnist_splits(folder) if folder.is_dir() else [])
    if download:
        say(f"Downloading MNIST's t10k digits to {folder} (checksummed)")
    images, labels = load_mnist(folder, "test", download=download)
    train_x, train_y, test_x, test_y = train_test_split(images, labels, test_fraction=0.2, seed=seed)
    return train_x, train_y, test_x, test_y, f"{len(train_x):,} MNIST digits (t10k)"


def mnist_folder(data_dir: str | os.PathLike[str] | None) -> Path:
    """Where the demo reads MNIST from: ``data_dir``, else ``$PEERING_DATA_DIR``, else the download cache.

    >>> mnist_folder("/data/mnist").as_posix()
    '/data/mnist'
    """
    from peering.data import DATA_DIR_ENV

    root = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "peering" / "mnist"


def training_data(run_dir: str | os.PathLike[str]) -> tuple[Tensor, Tensor]:
    """The digits a demo run trained its model on, rebuilt from its ``run.json`` (dataset, seed, folder).

    The reference data for `morph`'s data prior (`peering.priors.Prototypes`) when morphing with a demo
    checkpoint: ``peering morph`` and ``peering portraits`` use it. Raises `FileNotFoundError` when
    ``run_dir`` holds no ``run.json``, ValueError when it does not say which data the run used.

    >>> import tempfile
    >>> run_dir = Path(tempfile.mkdtemp())
    >>> _ = (run_dir / names.RUN_FILE).write_text('{"dataset": "digits", "seed": 0}')  # a digits run
    >>> images, labels = training_data(run_dir)
    >>> images.shape, labels.shape
    (torch.Size([1438, 1, 8, 8]), torch.Size([1438]))
    """
    path = Path(run_dir) / names.RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {names.RUN_FILE} in {run_dir}")
    summary = read_run_json(run_dir)
    dataset, seed = summary.get("dataset"), summary.get("seed")
    if dataset not in DEFAULT_EPOCHS or not isinstance(seed, int):
        raise PeeringValueError(f"{path} does not say which data set and seed the run used")
    train_x, train_y, _, _, _ = load_demo_data(dataset, summary.get("data_dir"), seed, lambda line: None)
    return train_x, train_y
