"""A generative data prior for `morph`: walk in the latent space of a small autoencoder of the data.

`Autoencoder` is a small convolutional autoencoder for images [C, H, W]; `train_autoencoder` fits one to
reference images (seconds to a minute for 8,000 MNIST digits on a CPU core), with a progress bar and an
optional cache on disk. `LatentShift(autoencoder)` is the prior: `morph` then ascends the classifier's
gradient through the decoder (Cohen et al. 2021, "Gifsplanation via Latent Shift"), so each step can only
make changes the decoder can draw, changes along the data. Each frame is the original plus the change of
the decoded image, ``x0 + decode(z) - decode(z0)``, so the first frame is the original itself (the
autoencoder's blur is never shown as a change) and the morph stops as soon as the model is convinced.

Batched over samples; one forward and one backward pass of the decoder per step besides the classifier's.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peering.errors import PeeringTypeError, PeeringValueError
from peering.morph.priors import Generative, PriorState, Prototypes

__all__ = ["Autoencoder", "LatentShift", "train_autoencoder"]


class Autoencoder(nn.Module):
    """A small convolutional autoencoder for images [B, C, H, W] with values in ``bounds``.

    Encoder: two 4x4 stride-2 convolutions (32, 64 channels, ReLU) and a linear map to ``latent`` numbers;
    decoder: the mirror image (a linear map, two transposed convolutions) with a sigmoid scaled to
    ``bounds``. Sizes that are not a multiple of 4 are padded on the way in and cropped on the way out.
    The latent is standardised with the training codes' mean and spread (buffers set by
    `train_autoencoder`), so one step length suits any data.

    >>> ae = Autoencoder(1, 28, 28, latent=16).eval()
    >>> z = ae.encode(torch.rand(2, 1, 28, 28)); z.shape
    torch.Size([2, 16])
    >>> ae.decode(z).shape
    torch.Size([2, 1, 28, 28])
    """

    z_mean: Tensor
    z_std: Tensor

    def __init__(self, channels: int, height: int, width: int, *, latent: int = 16,
                 bounds: tuple[float, float] = (0.0, 1.0), width_mult: int = 1) -> None:
        super().__init__()
        self.shape = (channels, height, width)
        self.latent = latent
        self.bounds = (float(bounds[0]), float(bounds[1]))
        self._pad = ((-height) % 4, (-width) % 4)
        h4, w4 = (height + self._pad[0]) // 4, (width + self._pad[1]) // 4
        c1, c2 = 32 * width_mult, 64 * width_mult
        self._grid = (c2, h4, w4)
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, c1, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(c1, c2, 4, 2, 1), nn.ReLU(),
            nn.Flatten(), nn.Linear(c2 * h4 * w4, latent),
        )
        self.decoder_in = nn.Sequential(nn.Linear(latent, c2 * h4 * w4), nn.ReLU())
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(c2, c1, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(c1, channels, 4, 2, 1),
        )
        self.register_buffer("z_mean", torch.zeros(latent))
        self.register_buffer("z_std", torch.ones(latent))

    def encode(self, x: Tensor) -> Tensor:
        """Standardised codes [B, latent] of images [B, C, H, W]."""
        lo, hi = self.bounds
        x = (x - lo) / (hi - lo) * 2 - 1
        if any(self._pad):
            x = F.pad(x, (0, self._pad[1], 0, self._pad[0]))
        return (self.encoder(x) - self.z_mean) / self.z_std

    def decode(self, z: Tensor) -> Tensor:
        """Images [B, C, H, W] in ``bounds`` from standardised codes [B, latent]."""
        h = self.decoder_in(z * self.z_std + self.z_mean).view(-1, *self._grid)
        out = self.decoder(h)[..., : self.shape[1], : self.shape[2]]
        lo, hi = self.bounds
        return lo + (hi - lo) * torch.sigmoid(out)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))


def train_autoencoder(
    images: Tensor,
    *,
    latent: int = 16,
    epochs: int = 20,
    batch_size: int = 128,
    lr: float = 2e-3,
    bounds: tuple[float, float] = (0.0, 1.0),
    width_mult: int = 1,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> Autoencoder:
    """Fit an `Autoencoder` to reference images [N, C, H, W] (mean squared error, Adam), in eval mode.

    Deterministic: shuffling and initialisation come from ``seed``; the global RNG is left as it was.
    With ``cache_dir``, the weights are saved there under a name made from a hash of the images and the
    settings, and loaded instead of trained the next time. A progress bar shows the training on a terminal
    (not in a log file; ``progress=False``: never).

    >>> import torch
    >>> ae = train_autoencoder(torch.rand(64, 1, 8, 8), latent=4, epochs=1, progress=False)
    >>> ae.encode(torch.rand(2, 1, 8, 8)).shape
    torch.Size([2, 4])
    """
    if not isinstance(images, Tensor) or not images.is_floating_point() or images.ndim != 4:
        raise PeeringTypeError("images must be a floating-point tensor of images [N, C, H, W]")
    if len(images) < 2:
        raise PeeringValueError(f"need at least 2 reference images, got {len(images)}")
    settings = dict(latent=latent, epochs=epochs, batch_size=batch_size, lr=lr, bounds=tuple(bounds),
                    width_mult=width_mult, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Autoencoder(*images.shape[1:], latent=latent, bounds=bounds, width_mult=width_mult)
    model = model.to(images.device)
    path = None
    if cache_dir is not None:
        data = images.detach().cpu().contiguous()
        digest = hashlib.sha256(data.numpy().tobytes()).hexdigest()[:16]
        text = digest + repr(sorted(settings.items())) + repr(model)
        key = hashlib.sha256(text.encode()).hexdigest()[:16]
        path = Path(cache_dir).expanduser() / f"autoencoder-{key}.pt"
        if path.exists():
            model.load_state_dict(torch.load(path, map_location=images.device, weights_only=True))
            return model.eval()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * math.ceil(len(images) / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(steps, 1))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        # disable=None: only on a terminal (a log file would get a line per refresh)
        bar = tqdm(total=steps, desc="autoencoder", unit="batch", leave=False, disable=None)
    model.train()
    try:
        with torch.enable_grad():
            for _ in range(epochs):
                order = torch.randperm(len(images), generator=generator).to(images.device)
                for start in range(0, len(images), batch_size):
                    batch = images[order[start : start + batch_size]]
                    optimizer.zero_grad(set_to_none=True)
                    loss = F.mse_loss(model.decode(model.encode(batch)), batch)
                    loss.backward()
                    optimizer.step()
                    schedule.step()
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    finally:
        if bar is not None:
            bar.close()
    optimizer.zero_grad(set_to_none=True)  # no gradients left on the returned model
    model.eval()
    with torch.no_grad():
        codes = torch.cat([model.encoder(_prep(model, images[i : i + 512]))
                           for i in range(0, len(images), 512)])
        model.z_mean.copy_(codes.mean(0))
        model.z_std.copy_(codes.std(0).clamp_min(1e-6))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(model.state_dict(), tmp)
        tmp.replace(path)
    return model


def _prep(model: Autoencoder, x: Tensor) -> Tensor:
    lo, hi = model.bounds
    x = (x - lo) / (hi - lo) * 2 - 1
    if any(model._pad):
        x = F.pad(x, (0, model._pad[1], 0, model._pad[0]))
    return x


class LatentShift(Generative):
    """A generative data prior: `morph` walks in an autoencoder's latent space instead of pixel space.

    Each step, the model's gradient (with the other priors' pulls, in pixel units) is carried back through
    the decoder to the code, the code moves ``step`` (standardised latent units) along it, pulled toward the
    codes of the target's nearest reference images when ``images`` and ``labels`` are given (`Prototypes`
    in the latent space), and the frame is ``x0 + decode(z) - decode(z0)``, clamped to the bounds. Once a
    sample's latent walk stalls (3 steps without a new best) or half the steps are gone, a pixel offset
    walks along the blurred gradient too (``pixel`` times morph's ``step_size`` per step) and carries it
    over the line: what the decoder cannot draw (an under-trained model may want sharper strokes). The
    decoder makes the change: strokes of digits, not pixel patterns only the morphed model reads (the
    latent shift of Cohen et al. 2021; the autoencoder and latent prototypes of Van Looveren and Klaise).

    Args:
        autoencoder: an `Autoencoder` (e.g. ``train_autoencoder(reference_images)``), or any module with
            ``encode(x) -> z`` and ``decode(z) -> x``; run in eval mode, never changed.
        images, labels: reference images and their classes for the latent prototype pull (e.g. the
            autoencoder's training images), or None for no pull.
        k, weight, temperature: as for `Prototypes`, in the latent space.
        residual: keep what the autoencoder cannot draw (``x0 - decode(z0)``) in every frame; without it,
            the frames after the first are the decoded images themselves.
        step: the code's step length, in standardised latent units.
        pixel: the late pixel offset's step, as a fraction of morph's ``step_size`` (0: decoded changes
            only).

    Cost per step: one forward and one backward pass of the decoder besides the model's; the encoder runs
    once per chunk.

    >>> import torch, peering
    >>> images = torch.rand(64, 1, 8, 8)
    >>> prior = LatentShift(train_autoencoder(images, latent=4, epochs=1, progress=False))
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    >>> res = peering.morph(model, images[:2], 3, prior=prior, confidence=None, steps=5)
    >>> torch.equal(res.frames[0], images[:2])   # the first frame is the original itself
    True
    """

    def __init__(self, autoencoder: nn.Module, images: Tensor | None = None, labels: Tensor | None = None, *,
                 k: int = 5, weight: float = 2.0, temperature: float = 0.1, residual: bool = True,
                 step: float = 0.25, pixel: float = 0.5) -> None:
        if not all(callable(getattr(autoencoder, name, None)) for name in ("encode", "decode")):
            raise PeeringTypeError(
                "autoencoder must have encode(x) and decode(z) methods "
                "(e.g. peering.priors.train_autoencoder(images))"
            )
        if (images is None) != (labels is None):
            raise PeeringValueError("give both images and labels for the latent prototype pull, or neither")
        if not (step > 0 and math.isfinite(step)):
            raise PeeringValueError(f"step must be a finite number > 0, got {step}")
        if not (pixel >= 0 and math.isfinite(pixel)):
            raise PeeringValueError(f"pixel must be a finite number >= 0, got {pixel}")
        self.autoencoder: Any = autoencoder  # encode() and decode(), checked above
        self.residual = residual
        self.step = float(step)
        self.pixel = float(pixel)
        self._prototypes: Prototypes | None = None
        if images is not None and labels is not None:
            modes = [(m, m.training) for m in autoencoder.modules()]
            autoencoder.eval()
            try:
                encode = cast(Any, autoencoder).encode
                with torch.no_grad():
                    codes = torch.cat([encode(images[i : i + 512])
                                       for i in range(0, len(images), 512)])
            finally:
                for m, training in modes:
                    m.training = training
            self._prototypes = Prototypes(codes, labels, k=k, weight=weight, temperature=temperature,
                                          settle=None)

    def prepare(self, inputs: Tensor, targets: Tensor) -> PriorState:
        ae = self.autoencoder
        with torch.no_grad():
            z0 = ae.encode(inputs)
            rest = inputs - ae.decode(z0) if self.residual else torch.zeros_like(inputs)
        inner = self._prototypes.prepare(z0, targets) if self._prototypes is not None else ()
        return (z0, rest, *inner)

    def decode(self, code: Tensor, state: PriorState) -> Tensor:
        return self.autoencoder.decode(code) + state[1]

    def latent_pull(self, code: Tensor, state: PriorState) -> Tensor | None:
        if self._prototypes is None:
            return None
        return self._prototypes.pull(code, tuple(state[2:]))
