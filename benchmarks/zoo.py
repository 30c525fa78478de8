"""A model zoo for the morph benchmarks: 8 families of digit classifiers, each under- and well trained.

    from zoo import load_zoo, load_judges, morph_split   # benchmarks/ on sys.path

Every zoo model trains itself on MNIST t10k 0-7999 (`peering.models.train_classifier`: Adam, cross-entropy,
its own seeded shuffling) in seconds to a minute on one CPU core, and is cached on disk under
``$PEERING_ZOO_CACHE`` (default ``~/.cache/peering-zoo``), keyed by the family, the training settings, the
seed and a hash of the training data, so reruns load instead of train. Each family comes twice: "1ep"
(one epoch: under-trained) and "well" (several epochs). Every model takes pixels in [0, 1], shaped
[B, 1, 28, 28].

Splits (fixed): train on t10k 0-7999; morph t10k 8000-8255 (256 digits, held out from every model and
judge) to (label + 1) mod 10; held-out accuracy on t10k 8000-9999.

Judges (`load_judges`): two models that never take part in a morph, trained on the same 8,000 digits with
other architectures than their zoo namesakes and other seeds, as in bench_morph_judges.py: `DigitMLP`
(512-256, dropout, seed 1, 15 epochs) and `DigitLeNet` (5x5 convolutions, batch norm, ReLU, seed 2, 3
epochs). The zoo's MLP (400-200, no dropout, no standardisation) and LeNet (LeNet-5: tanh, 6/16 channels,
three fully connected layers) are other networks than these judges.

The two halves: `TUNE` (mlp, lenet, bncnn, vit; both training levels) is where morph's defaults were
chosen; `REPORT` (resnet, gelu_ln, maxpool, ensemble) was only measured with the chosen defaults.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peering.data import load_mnist
from peering.models import DigitCNN, DigitLeNet, DigitMLP, accuracy, train_classifier

TRAIN = slice(0, 8000)
MORPH = slice(8000, 8256)
HELD_OUT = slice(8000, 10000)
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


# ---------- the families ----------


class MLP(nn.Module):
    """784-400-200-10, ReLU, raw pixels (no standardisation, no dropout)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Flatten(), nn.Linear(784, 400), nn.ReLU(), nn.Linear(400, 200),
                                    nn.ReLU(),
                                    nn.Linear(200, 10))

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class LeNet5(nn.Module):
    """LeNet-5: conv5x5(6) tanh avgpool - conv5x5(16) tanh avgpool - 120 - 84 - 10 (tanh)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2), nn.Tanh(), nn.AvgPool2d(2),
            nn.Conv2d(6, 16, 5), nn.Tanh(), nn.AvgPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.Tanh(), nn.Linear(120, 84),
                                  nn.Tanh(),
                                  nn.Linear(84, 10))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features((x - MNIST_MEAN) / MNIST_STD))


class BatchNormCNN(nn.Module):
    """The issue's model: normalisation inside, three 3x3 stride-2 convolutions with batch norm, adaptive
    average pooling, dropout, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(MNIST_MEAN))
        self.register_buffer("std", torch.tensor(MNIST_STD))
        layers: list[nn.Module] = []
        width = 1
        for out in (32, 64, 128):
            layers += [nn.Conv2d(width, out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out),
                       nn.ReLU()]
            width = out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.3))
        self.head = nn.Linear(128, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features((x - self.mean) / self.std))


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.skip(x))


class SmallResNet(nn.Module):
    """A ResNet: stem conv3x3(16) - basic blocks 16, 32 (stride 2), 64 (stride 2) - global average -
    linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.Sequential(_Block(16, 16, 1), _Block(16, 32, 2), _Block(32, 64, 2))
        self.head = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.stem((x - MNIST_MEAN) / MNIST_STD))
        return self.head(x.mean(dim=(2, 3)))


class _ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of [B, C, H, W] (as in ConvNeXt)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class WideGeluCNN(nn.Module):
    """A wide CNN with GELU and LayerNorm: conv5x5(48) - [GELU, LN, conv3x3 stride 2] x 2 (96, 160) -
    GELU - LN - global average - linear."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 48, 5, padding=2), nn.GELU(), _ChannelNorm(48),
            nn.Conv2d(48, 96, 3, stride=2, padding=1), nn.GELU(), _ChannelNorm(96),
            nn.Conv2d(96, 160, 3, stride=2, padding=1), nn.GELU(), _ChannelNorm(160),
        )
        self.head = nn.Linear(160, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.net(x * 2 - 1).mean(dim=(2, 3)))


class TinyViT(nn.Module):
    """A small vision transformer: 7x7 patches (16 tokens), width 64, 4 pre-norm layers of 4 heads, MLP 128,
    learned positions, mean-pooled tokens, linear head."""

    def __init__(self, dim: int = 64, depth: int = 4, heads: int = 4) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, dim, 7, stride=7)
        self.pos = nn.Parameter(torch.randn(1, 16, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, activation="gelu",
                                           batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patch((x - MNIST_MEAN) / MNIST_STD).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.encoder(tokens)).mean(dim=1))


class Ensemble(nn.Module):
    """Three small CNNs of different seeds and shapes; returns the log of their mean probability."""

    def __init__(self) -> None:
        super().__init__()
        self.members = nn.ModuleList([_small_cnn(k) for k in (3, 5, 3)])

    def forward(self, x: Tensor) -> Tensor:
        x = (x - MNIST_MEAN) / MNIST_STD
        log_probs = torch.stack([m(x).log_softmax(dim=1) for m in self.members])
        return torch.logsumexp(log_probs, dim=0) - math.log(len(self.members))


def _small_cnn(kernel: int) -> nn.Module:
    pad = kernel // 2
    return nn.Sequential(
        nn.Conv2d(1, 16, kernel, padding=pad), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, kernel, padding=pad), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10),
    )


@dataclass(frozen=True)
class Family:
    build: Callable[[], nn.Module]
    epochs: int  # "well" trained; "1ep" is one epoch
    lr: float
    seed: int
    about: str


FAMILIES: dict[str, Family] = {
    "mlp": Family(MLP, 10, 1e-3, 11, "MLP 784-400-200-10, ReLU"),
    "lenet": Family(LeNet5, 8, 2e-3, 12, "LeNet-5, tanh, average pooling"),
    "bncnn": Family(BatchNormCNN, 6, 2e-3, 13, "batch-norm CNN, 3x3 stride 2, normalisation inside, dropout"),
    "vit": Family(TinyViT, 10, 1e-3, 14, "ViT, 7x7 patches, 4 layers of width 64"),
    "resnet": Family(SmallResNet, 4, 2e-3, 15, "ResNet, 3 basic blocks 16-32-64, batch norm"),
    "gelu_ln": Family(WideGeluCNN, 3, 1e-3, 16, "wide CNN 48-96-160, GELU, LayerNorm"),
    "maxpool": Family(DigitCNN, 4, 1e-3, 17, "max-pool CNN with dropout (peering's DigitCNN)"),
    "ensemble": Family(Ensemble, 4, 2e-3, 18, "ensemble of three max-pool CNNs (mean probability)"),
}
TUNE = ("mlp", "lenet", "bncnn", "vit")        # the half the defaults were chosen on
REPORT = ("resnet", "gelu_ln", "maxpool", "ensemble")  # the half only measured afterwards
LEVELS = ("1ep", "well")
NAMES = tuple(f"{f}-{lvl}" for f in FAMILIES for lvl in LEVELS)


def cache_dir() -> Path:
    return Path(os.environ.get("PEERING_ZOO_CACHE", "~/.cache/peering-zoo")).expanduser()


def _key(name: str, model: nn.Module, settings: dict, x: Tensor, y: Tensor) -> str:
    digest = hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()[:12]
    text = name + repr(model) + repr(sorted(settings.items())) + digest
    return f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:16]}.pt"


def _cached(name: str, build: Callable[[], nn.Module], settings: dict, x: Tensor, y: Tensor,
            log: Callable[[str], None]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings["seed"])
        model = build()
    path = cache_dir() / _key(name, model, settings, x, y)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    start = time.perf_counter()
    train_classifier(model, x, y, **settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    log(f"  trained {name} in {time.perf_counter() - start:.0f} s -> {path}")
    return model.eval()


def mnist(data_dir: str | None) -> tuple[Tensor, Tensor]:
    return load_mnist(data_dir, "test")


def morph_split(data_dir: str | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(train_x, train_y, x, target): the 8,000 training digits, the 256 to morph and their targets."""
    images, labels = mnist(data_dir)
    return images[TRAIN], labels[TRAIN], images[MORPH].contiguous(), (labels[MORPH] + 1) % 10


def load_zoo(data_dir: str | None, names: tuple[str, ...] = NAMES, log: Callable[[str], None] = print
             ) -> dict[str, nn.Module]:
    """The zoo models named (``family-level``), trained or loaded from the cache, in eval mode."""
    images, labels = mnist(data_dir)
    x, y = images[TRAIN], labels[TRAIN]
    out = {}
    for name in names:
        family, level = name.rsplit("-", 1)
        spec = FAMILIES[family]
        epochs = 1 if level == "1ep" else spec.epochs
        settings = {"epochs": epochs, "batch_size": 64, "lr": spec.lr, "seed": spec.seed}
        out[name] = _cached(name, spec.build, settings, x, y, log)
    return out


def load_judges(data_dir: str | None, log: Callable[[str], None] = print) -> dict[str, nn.Module]:
    """The two judges of bench_morph_judges.py: same 8,000 digits, other architectures and seeds."""
    images, labels = mnist(data_dir)
    x, y = images[TRAIN], labels[TRAIN]
    return {
        "MLP judge": _cached("judge-mlp", DigitMLP, {"epochs": 15, "batch_size": 64, "lr": 1e-3, "seed": 1},
                             x, y, log),
        "LeNet judge": _cached("judge-lenet", DigitLeNet,
                               {"epochs": 3, "batch_size": 64, "lr": 2e-3, "seed": 2},
                               x, y, log),
    }


def describe(models: dict[str, nn.Module], data_dir: str | None) -> list[str]:
    """One line per model: name, half, seed, epochs, held-out accuracy."""
    images, labels = mnist(data_dir)
    hx, hy = images[HELD_OUT], labels[HELD_OUT]
    lines = []
    for name, model in models.items():
        family, level = name.rsplit("-", 1) if name in NAMES else (name, "")
        if family in FAMILIES:
            spec = FAMILIES[family]
            epochs = 1 if level == "1ep" else spec.epochs
            half = "tune" if family in TUNE else "report"
            what = f"{spec.about}; seed {spec.seed}, {epochs} epoch(s), lr {spec.lr}, {half} half"
        else:
            what = "judge"
        lines.append(f"{name:16s} held-out accuracy {accuracy(model, hx, hy):.4f}  ({what})")
    return lines


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="train (or load) the zoo and print its accuracies")
    parser.add_argument("--data-dir", default=os.environ.get("PEERING_DATA_DIR"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("splits: train t10k 0-7999, morph t10k 8000-8255 -> (label + 1) mod 10, accuracy on 8000-9999")
    zoo = load_zoo(args.data_dir)
    zoo.update(load_judges(args.data_dir))
    print("\n".join(describe(zoo, args.data_dir)))
