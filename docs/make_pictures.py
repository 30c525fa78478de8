"""Draw the README's pictures into docs/img/ from small models trained here, in a few seconds on a CPU.

    python docs/make_pictures.py            # (with the package importable, e.g. PYTHONPATH=src)

Everything is seeded: the same run draws the same pictures. The data are scikit-learn's bundled data sets
(8x8 digits, breast cancer), so nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch import nn

import peering
from peering.data import load_digits
from peering.models import DigitCNN, accuracy, train_classifier
from peering.render import explanation_image, save_png

OUT = Path(__file__).resolve().parent / "img"


def colour_views() -> None:
    """Digits drawn in red or in green; a CNN told to name the colour. What does it look at?"""
    x, _ = load_digits()
    g = torch.Generator().manual_seed(0)
    green = torch.randint(0, 2, (len(x),), generator=g)
    rgb = torch.zeros(len(x), 3, 8, 8)
    rgb[green == 0, 0] = x[green == 0, 0]  # red strokes
    rgb[green == 1, 1] = x[green == 1, 0]  # green strokes
    model = train_classifier(DigitCNN(image_size=8, in_channels=3, num_classes=2), rgb[:1500], green[:1500])
    print(f"  red/green digits: held-out accuracy {accuracy(model, rgb[1500:], green[1500:]):.3f}")
    held_out = torch.arange(1500, len(x))
    first_red = int(held_out[green[held_out] == 0][0])
    first_green = int(held_out[green[held_out] == 1][0])
    pick = rgb[[first_red, first_green]]
    exp = peering.explain(model, pick, target=torch.tensor([[1], [1]]), output="logit")  # toward "green"
    views = [explanation_image(exp, pick, zoom=10, channels=view) for view in ("colour", "sum", "each")]
    width = sum(v.width for v in views) + 40 * (len(views) - 1)
    sheet = Image.new("RGB", (width, max(v.height for v in views)), "white")
    x0 = 0
    for view in views:  # the three views side by side: default, signed sum, one map per channel
        sheet.paste(view, (x0, 0))
        x0 += view.width + 40
    save_png(sheet, OUT / "colour_views.png")


def saturated_digits() -> None:
    """Two digits and the gradients of their top two probabilities: each with its scale, the second
    saturated (and said so)."""
    x, y = load_digits()
    model = train_classifier(DigitCNN(image_size=8), x[:1500], y[:1500], epochs=4)
    pick = x[1500:1502]
    exp = peering.explain(model, pick, top_k=2, output="probability")
    save_png(explanation_image(exp, pick, zoom=10), OUT / "digits_probability.png")


def tabular() -> None:
    """A small MLP on scikit-learn's breast-cancer table (30 named features), explained as bars."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    features = torch.tensor(data.data, dtype=torch.float32)
    features = (features - features.mean(0)) / features.std(0)
    labels = torch.tensor(data.target)
    model = nn.Sequential(nn.Linear(30, 32), nn.ReLU(), nn.Linear(32, 2))
    model = train_classifier(model, features[:450], labels[:450], epochs=20)
    print(f"  breast cancer: held-out accuracy {accuracy(model, features[450:], labels[450:]):.3f}")
    pick = features[450:451]
    exp = peering.explain(model, pick, top_k=2, output="logit", method="input_x_gradient")
    names = [str(n) for n in data.feature_names]
    save_png(explanation_image(exp, pick, feature_names=names, top_n=8), OUT / "tabular.png")


def main() -> None:
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    for draw in (colour_views, saturated_digits, tabular):
        print(draw.__name__)
        torch.manual_seed(0)  # the models' initial weights
        draw()
    for path in sorted(OUT.glob("*.png")):
        print(f"  {path.relative_to(OUT.parent.parent)}: {path.stat().st_size // 1024} KiB")


if __name__ == "__main__":
    main()
