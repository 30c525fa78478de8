"""Data: digit data sets, image files and normalisation.

- `peering.data.mnist`: MNIST from the official IDX files (`load_mnist`, verified; `download_mnist`);
- `peering.data.digits`: scikit-learn's bundled 8x8 digits (`load_digits`) and `train_test_split`;
- `peering.data.images`: image files for a model (`read_image`, `list_images`, `ImageFiles`);
- `peering.data.normalisation`: a model's input normalisation as one object (`Normalisation`).

Images come back as float32 tensors `[N, C, H, W]` with pixels in `[0, 1]` and labels as int64 `[N]`, so
that pixel space is the input space the gradients are taken in.

>>> from peering.data import load_digits
>>> tuple(load_digits()[0].shape)
(1797, 1, 8, 8)
"""

from peering.data.digits import load_digits, train_test_split
from peering.data.images import IMAGE_SUFFIXES, ImageFiles, list_images, read_image
from peering.data.mnist import (
    DATA_DIR_ENV,
    MNIST_FILES,
    MNIST_MIRRORS,
    available_mnist_splits,
    download_mnist,
    load_mnist,
)
from peering.data.normalisation import Normalisation
from peering.errors import DatasetError, ImageError

__all__ = [
    "DATA_DIR_ENV",
    "IMAGE_SUFFIXES",
    "MNIST_FILES",
    "MNIST_MIRRORS",
    "DatasetError",
    "ImageError",
    "ImageFiles",
    "Normalisation",
    "available_mnist_splits",
    "download_mnist",
    "list_images",
    "load_digits",
    "load_mnist",
    "read_image",
    "train_test_split",
]
