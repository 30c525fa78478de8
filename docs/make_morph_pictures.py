"""Make the README's pictures: a held-out MNIST 5 morphed into an 8, before and after the priors.

    PEERING_DATA_DIR=../shared/datasets/mnist .venv/bin/python docs/make_morph_pictures.py

Trains the demo CNN as the benchmarks do (the first 8,000 MNIST t10k digits, seed 0, about 30 s on two
cores), takes the first 5 among the held-out digits 8000-9999, and writes to docs/img/:

- morph_5_to_8_plain.png: plain ascent that stops at the flip (`confidence=None, smoothing=0`, the old
  default);
- morph_5_to_8_prior.png: `morph`'s defaults with `prior=Prototypes(train_x, train_y)`;
- morph_5_to_8_sure.png: the same with `confidence=0.9999` and up to 300 steps.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

import peering
from peering.data import load_mnist
from peering.models import DigitCNN, train_classifier
from peering.morph.priors import Prototypes
from peering.render import film_strip, save_png

OUT = Path(__file__).parent / "img"


def main() -> None:
    data_dir = os.environ.get("PEERING_DATA_DIR")
    if not data_dir:
        sys.exit("set PEERING_DATA_DIR to the folder with the MNIST IDX files")
    torch.set_num_threads(2)
    images, labels = load_mnist(data_dir, "test")
    train_x, train_y = images[:8000], labels[:8000]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DigitCNN()
    model = train_classifier(model, train_x, train_y, epochs=2, seed=0)
    index = 8000 + int((labels[8000:] == 5).nonzero()[0])
    x = images[index : index + 1]
    runs = {
        "plain": peering.morph(model, x, 8, confidence=None, smoothing=0),
        "prior": peering.morph(model, x, 8, prior=Prototypes(train_x, train_y)),
        "sure": peering.morph(model, x, 8, prior=Prototypes(train_x, train_y), confidence=0.9999, steps=300),
    }
    for name, res in runs.items():
        strip = film_strip(res, 0, zoom=3, max_frames=8)  # ends where the morph stopped
        path = save_png(strip, OUT / f"morph_5_to_8_{name}.png")
        print(f"{path}: t10k digit {index}, {int(res.steps[0])} steps, L2 {float(res.distance[0]):.2f}, "
              f"p(8) = {float(res.probabilities[0, 8]):.3f}")


if __name__ == "__main__":
    main()
