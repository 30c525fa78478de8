"""Small digit classifiers to explain: a plain `nn.Module` CNN, its Lightning wrapper, and a training loop.

The models take pixels in `[0, 1]` and normalise inside `forward`, so gradients with respect to the input
are gradients with respect to the pixels a person looks at.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peering.errors import PeeringValueError

__all__ = ["DigitCNN", "DigitClassifier", "DigitLeNet", "DigitMLP", "accuracy", "train_classifier"]


class _Standardised(nn.Module):
    """A digit classifier that standardises its pixels first: `standardise(x)` = `(x - mean) / std`."""

    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        if std <= 0:
            raise PeeringValueError(f"std must be positive, got {std}")
        self.mean = float(mean)
        self.std = float(std)

    def standardise(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class DigitCNN(_Standardised):
    """The classic PyTorch MNIST example network, with the input normalisation built in.

    conv3x3(in, 32) - ReLU - conv3x3(32, 64) - ReLU - maxpool 2 - dropout - flatten - Linear(flat, hidden) -
    ReLU - dropout - Linear(hidden, num_classes). The flat width is computed from `image_size` (9216 for
    28x28, 256 for the 8x8 scikit-learn digits).

    Args:
        in_channels: image channels.
        num_classes: number of logits.
        image_size: height and width of the (square) input images; at least 6.
        mean, std: pixel statistics; `forward` computes `(x - mean) / std` first (MNIST's by default).
        hidden: width of the hidden fully connected layer.
        dropout: dropout probabilities after the pooling and after the hidden layer.

    `forward(x)` takes `[B, in_channels, image_size, image_size]` floats in `[0, 1]` and returns logits
    `[B, num_classes]`.

    >>> model = DigitCNN(image_size=8).eval()
    >>> model(torch.rand(4, 1, 8, 8)).shape
    torch.Size([4, 10])
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
        mean: float = 0.1307,
        std: float = 0.3081,
        hidden: int = 128,
        dropout: tuple[float, float] = (0.25, 0.5),
    ) -> None:
        super().__init__(mean, std)
        if image_size < 6:
            raise PeeringValueError(
                f"image_size must be at least 6 (two 3x3 convolutions and a 2x2 pool), got {image_size}"
            )
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.image_size = image_size
        pooled = (image_size - 4) // 2
        self.flat_features = 64 * pooled * pooled
        self.conv1 = nn.Conv2d(in_channels, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(dropout[0])
        self.dropout2 = nn.Dropout(dropout[1])
        self.fc1 = nn.Linear(self.flat_features, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits `[B, num_classes]` for pixels `x` in `[0, 1]` of shape `[B, C, H, W]`."""
        x = self.standardise(x)
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout2(x)
        return self.fc2(x)


class DigitMLP(_Standardised):
    """A fully connected digit classifier: flatten - (Linear - ReLU - dropout) per hidden layer - Linear.

    Another architecture than `DigitCNN`, e.g. to judge morphs (`peering.agreement`): it sees pixels, not
    local patterns, so it is not fooled by the same changes.

    Args:
        in_channels, num_classes, image_size: the input images [B, in_channels, image_size, image_size].
        hidden: widths of the hidden layers.
        dropout: dropout after each hidden layer.
        mean, std: pixel statistics; `forward` computes `(x - mean) / std` first (MNIST's by default).

    >>> DigitMLP(image_size=8).eval()(torch.rand(4, 1, 8, 8)).shape
    torch.Size([4, 10])
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
        hidden: tuple[int, ...] = (512, 256),
        dropout: float = 0.2,
        mean: float = 0.1307,
        std: float = 0.3081,
    ) -> None:
        super().__init__(mean, std)
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_channels * image_size * image_size
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Logits `[B, num_classes]` for pixels `x` in `[0, 1]`."""
        return self.layers(self.standardise(x))


class DigitLeNet(_Standardised):
    """A LeNet-style CNN with batch norm and average pooling: another CNN than `DigitCNN`.

    conv5x5(in, 16) - batch norm - ReLU - avgpool 2 - conv5x5(16, 32) - batch norm - ReLU - avgpool 2 -
    flatten - Linear(32 * (image_size // 4)^2, num_classes); the convolutions are padded ("same").

    Args:
        in_channels, num_classes, image_size: the input images [B, in_channels, image_size, image_size];
            image_size at least 4.
        mean, std: pixel statistics; `forward` computes `(x - mean) / std` first (MNIST's by default).

    >>> DigitLeNet(image_size=8).eval()(torch.rand(4, 1, 8, 8)).shape
    torch.Size([4, 10])
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
        mean: float = 0.1307,
        std: float = 0.3081,
    ) -> None:
        super().__init__(mean, std)
        if image_size < 4:
            raise PeeringValueError(f"image_size must be at least 4 (two 2x2 poolings), got {image_size}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 5, padding=2), nn.BatchNorm2d(16), nn.ReLU(), nn.AvgPool2d(2),
            nn.Conv2d(16, 32, 5, padding=2), nn.BatchNorm2d(32), nn.ReLU(), nn.AvgPool2d(2),
        )
        self.classifier = nn.Linear(32 * (image_size // 4) ** 2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits `[B, num_classes]` for pixels `x` in `[0, 1]` of shape `[B, C, H, W]`."""
        return self.classifier(torch.flatten(self.features(self.standardise(x)), 1))


class DigitClassifier(pl.LightningModule):
    """A `DigitCNN` (`self.model`) trained with cross-entropy and Adam by a Lightning `Trainer`.

    Batches are `(images, labels)` tuples (or `(images, labels, index)`, as `LabelIssues` wants). Logs
    `train_loss`; `val_loss` and `val_acc` (and returns the validation logits); `test_acc`.
    Hyperparameters are saved, so `DigitClassifier.load_from_checkpoint(path)` rebuilds it.

    Args:
        in_channels, num_classes, image_size: passed to `DigitCNN`.
        lr: Adam learning rate.
        **cnn_kwargs: further `DigitCNN` arguments (`mean`, `std`, `hidden`, `dropout`).

    >>> module = DigitClassifier(image_size=8).eval()
    >>> module(torch.rand(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
        lr: float = 1e-3,
        **cnn_kwargs: object,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.lr = lr
        self.model = DigitCNN(in_channels=in_channels, num_classes=num_classes, image_size=image_size,
                              **cnn_kwargs)  # type: ignore[arg-type]

    def forward(self, x: Tensor) -> Tensor:
        """Logits `[B, num_classes]`."""
        return self.model(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch[0], batch[1]  # (images, labels) or (images, labels, index)
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Logs ``val_loss`` and ``val_acc``; returns the loss and the logits (which callbacks such as
        `ConfusedLogitCallback`'s confusion atlas read instead of running the model again)."""
        x, y = batch[0], batch[1]
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log("val_loss", loss, prog_bar=True)
        self.log("val_acc", (logits.argmax(1) == y).float().mean(), prog_bar=True)
        return {"loss": loss, "logits": logits.detach()}

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch[0], batch[1]
        acc = (self(x).argmax(1) == y).float().mean()
        self.log("test_acc", acc)
        return acc

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def train_classifier(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    epochs: int = 2,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
) -> nn.Module:
    """Train `model` with cross-entropy and Adam, deterministically, and return it in eval mode.

    A small plain-torch loop (no Lightning) for getting a trained model quickly. Shuffling uses its own
    `torch.Generator`; dropout runs under `torch.random.fork_rng` seeded with `seed`, so the same call gives
    the same weights and the caller's global RNG state is left exactly as it was. Trains in place.

    >>> from peering.data import load_digits
    >>> x, y = load_digits()
    >>> model = train_classifier(DigitCNN(image_size=8), x[:1500], y[:1500], epochs=3)
    >>> accuracy(model, x[1500:], y[1500:]) > 0.85
    True
    """
    if len(images) != len(labels):
        raise PeeringValueError(f"images and labels differ in length: {len(images)} vs {len(labels)}")
    if epochs < 0 or batch_size < 1:
        raise PeeringValueError(f"need epochs >= 0 and batch_size >= 1, got {epochs} and {batch_size}")
    labels = labels.long()
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        model.train()
        with torch.enable_grad():
            for _ in range(epochs):
                order = torch.randperm(len(images), generator=generator)
                for start in range(0, len(images), batch_size):
                    idx = order[start : start + batch_size]
                    optimizer.zero_grad(set_to_none=True)
                    loss = F.cross_entropy(model(images[idx]), labels[idx])
                    loss.backward()
                    optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 256) -> float:
    """Fraction of `images` whose top logit is the label (NaN for none), with `model` in eval mode.

    Each submodule's training flag is restored afterwards.

    >>> from peering.data import load_digits
    >>> x, y = load_digits()
    >>> 0.0 <= accuracy(DigitCNN(image_size=8), x[:100], y[:100]) <= 1.0
    True
    """
    if len(images) == 0:
        return math.nan
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        correct = 0
        for start in range(0, len(images), batch_size):
            logits = model(images[start : start + batch_size])
            correct += int((logits.argmax(1) == labels[start : start + batch_size]).sum())
    finally:
        for m, training in modes:
            m.training = training
    return correct / len(images)
