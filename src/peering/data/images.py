"""Image files: reading one for a model (`read_image`), listing a folder's (`list_images`) and reading
them one by one as a data set (`ImageFiles`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from peering.errors import ImageError

__all__ = ["IMAGE_SUFFIXES", "ImageError", "ImageFiles", "list_images", "read_image"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
"""The file suffixes `list_images` takes for images."""


def read_image(
    path: str | Path,
    channels: int | None = 1,
    size: tuple[int, int] | None = None,
    *,
    invert: bool = False,
) -> tuple[Tensor, list[str]]:
    """Read an image file as a float tensor [C, H, W] in [0, 1], converted for a model.

    Args:
        path: a PNG or JPEG file (any format Pillow reads).
        channels: 1 (grey) or 3 (RGB) to convert to; None keeps grey images grey and makes others RGB.
        size: (height, width) to resize to; None keeps the image's size.
        invert: replace each pixel p by 1 - p (dark digits on a light background -> light on dark).

    Returns:
        The image and the notes on what was changed (empty when nothing was).

    An animated image (GIF, PNG, WebP) is read as its first frame, with a note. Float images (32-bit
    TIFFs) with NaN or Inf pixels are refused: there is no honest pixel to make of them.

    Raises:
        ImageError: the file is missing, is not an image Pillow can read, or has NaN/Inf pixels.

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "digit.png"
    >>> Image.new("RGB", (28, 28)).save(path)
    >>> image, notes = read_image(path, channels=1, size=(8, 8))
    >>> tuple(image.shape), notes
    ((1, 8, 8), ['converted RGB to grey', 'resized 28x28 to 8x8'])
    """
    file = Path(path)
    if not file.exists():
        raise ImageError(f"image not found: {file}")
    if file.is_dir():
        raise ImageError(f"image {file} is a directory, not a file")
    notes: list[str] = []
    try:
        with Image.open(file) as opened:
            frames = int(getattr(opened, "n_frames", 1) or 1)
            opened.load()
            image = opened.copy()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        detail = " ".join(str(err).split())
        raise ImageError(f"cannot read image {file}: not a PNG/JPEG image, or truncated ({detail})") from err
    if frames > 1:
        notes.append(f"an animated image of {frames} frames: read its first frame")
    image = _to_mode(image, channels, notes, file)
    if size is not None and (image.height, image.width) != tuple(size):
        h, w = size
        shrinking = h * w < image.height * image.width
        resample = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
        notes.append(f"resized {image.width}x{image.height} to {w}x{h}")
        image = image.resize((w, h), resample=resample)
    array = np.asarray(image, dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array[None] if array.ndim == 2 else array.transpose(2, 0, 1).copy())
    if invert:
        tensor = 1.0 - tensor
        notes.append("inverted")
    return tensor.contiguous(), notes


def _to_mode(image: Image.Image, channels: int | None, notes: list[str], file: Path) -> Image.Image:
    """Convert to "L" (grey) or "RGB", flattening transparency onto white and scaling 16-bit images."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        bad = int((~np.isfinite(array)).sum())
        if bad:
            raise ImageError(
                f"image {file} has {bad} NaN or Inf pixel(s) (a float image); replace them (e.g. "
                "numpy.nan_to_num) and save it again"
            )
        top = 65535.0 if mode.startswith("I;16") else max(float(array.max()), 1.0)
        image = Image.fromarray(np.clip(array / top * 255.0, 0, 255).astype(np.uint8), mode="L")
        notes.append(f"scaled {mode} pixels to 8 bits")
        mode = "L"
    if "A" in image.getbands() or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba).convert("RGB" if mode not in ("LA", "La") else "L")
        notes.append("flattened transparency onto white")
        mode = image.mode
    want = channels
    if want is None:
        want = 1 if mode in ("L", "1") else 3
    target = "L" if want == 1 else "RGB"
    if want not in (1, 3):
        raise ImageError(f"the model takes {want} channels; images can only be made grey (1) or RGB (3)")
    if mode != target:
        names = {"L": "grey", "RGB": "RGB", "1": "black-and-white", "P": "palette", "CMYK": "CMYK"}
        notes.append(f"converted {names.get(mode, mode)} to {names[target]}")
        image = image.convert(target)
    return image


def list_images(folder: str | Path) -> list[str]:
    """The image files under ``folder`` (any depth), as sorted paths relative to it.

    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> (root / "3").mkdir(); Image.new("L", (4, 4)).save(root / "3" / "a.png")
    >>> list_images(root)
    ['3/a.png']
    """
    root = Path(folder)
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )


class ImageFiles(Dataset):
    """The images ``files`` of a folder, read one by one when asked (converted with `read_image`), with
    their labels: ``(image [C, H, W], label)`` pairs.

    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> Image.new("L", (28, 28)).save(root / "a.png")
    >>> data = ImageFiles(root, ["a.png"], 1, (8, 8), False, [3])
    >>> len(data), tuple(data[0][0].shape), data[0][1]
    (1, (1, 8, 8), 3)
    """

    def __init__(
        self, root: Path, files: list[str], channels: int | None, size: tuple[int, int], invert: bool,
        labels: list[int],
    ) -> None:
        self.root, self.files, self.channels, self.size = root, files, channels, size
        self.invert, self.labels = invert, labels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, _ = read_image(self.root / self.files[index], self.channels, self.size, invert=self.invert)
        return image, self.labels[index]
