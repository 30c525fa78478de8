"""Priors for `morph`: what keeps a morph on the data.

Plain gradient ascent finds the smallest change that flips the model, and that change is a pattern only
the morphed model sees: two independently trained models call such a morph the target 3% of the time.
A prior steers every step toward changes that other models (and people) read as the target too:

- `Prototypes` (a data prior): pulls each sample from the images of its current class toward the images
  of the target class nearest to it, taken from reference images you pass (the anchor is Van Looveren and
  Klaise's prototype-guided counterfactuals; here batched, in pixel space, with no training).
- `TotalVariation`: keeps the change (morph minus original) piecewise smooth.
- `Jitter`: the model sees each sample shifted by a few pixels and with a little noise, a new draw every
  step: an expectation over transformations at the cost of one extra forward pass.
- `smooth`: the Gaussian blur that `morph(..., smoothing=...)` applies to each step's gradient.

A prior is an object with up to three hooks (see `Prior`); `morph(..., prior=...)` takes one or a list.
Everything is batched over samples; a prior never runs the model.
"""

from __future__ import annotations

import functools
import math
from typing import TypeAlias

import torch
import torch.nn.functional as F
from torch import Tensor

from peering._lazy import exports
from peering._validate import int_at_least
from peering.errors import PeeringTypeError, PeeringValueError

__all__ = ["Generative", "Jitter", "Noise", "Prior", "PriorState", "Prototypes", "TotalVariation", "smooth"]

PriorState: TypeAlias = tuple[Tensor, ...]
"""Per-sample state of a prior: tensors whose first dimension is the batch (sliced with the samples)."""


class Noise:
    """Random numbers for one morph step that do not depend on how the batch is chunked.

    Each number is a hash of (seed, step, draw, sample index in the whole batch, element), so a sample gets
    the same noise whether it is morphed alone, in a chunk of 7 or in a batch of 256, on any device. The
    global RNG is never touched.

    Args:
        seed: morph's ``seed``.
        step: the step number.
        rows: int64 [b]: the index of each sample at hand in the whole batch.

    >>> Noise(seed=0, step=3, rows=torch.tensor([4, 9])).normal(2, 2).shape
    torch.Size([2, 2, 2])
    >>> pair = Noise(0, 3, torch.tensor([4, 9])).uniform(5)   # samples 4 and 9 of a batch
    >>> torch.equal(pair[1], Noise(0, 3, torch.tensor([9])).uniform(5)[0])   # sample 9 alone
    True
    """

    def __init__(self, seed: int, step: int, rows: Tensor) -> None:
        self._key = _mix(_mix(torch.tensor(int(seed) & _MASK63, dtype=torch.int64)) ^ int(step))
        self._rows = rows.to(torch.int64)
        self._draws = 0

    def uniform(self, *shape: int) -> Tensor:
        """float32 [b, *shape], uniform in [0, 1); each call is a new draw."""
        key = _mix(self._key.to(self._rows.device) ^ self._draws)
        self._draws += 1
        numel = math.prod(shape)
        index = self._rows[:, None] * numel + torch.arange(numel, device=self._rows.device)
        bits = _mix(index ^ key)
        return ((bits >> 40) & ((1 << 24) - 1)).to(torch.float32).div_(1 << 24).view(-1, *shape)

    def normal(self, *shape: int) -> Tensor:
        """float32 [b, *shape], standard normal (Box-Muller); each call is a new draw."""
        u1, u2 = self.uniform(*shape), self.uniform(*shape)
        return torch.sqrt(-2.0 * torch.log1p(-u1)) * torch.cos(2.0 * math.pi * u2)


_MASK63 = (1 << 63) - 1


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


_M1 = _signed(0xBF58476D1CE4E5B9)
_M2 = _signed(0x94D049BB133111EB)
_GOLDEN = _signed(0x9E3779B97F4A7C15)


def _mix(z: Tensor) -> Tensor:
    """splitmix64's finaliser on int64 tensors (multiplication wraps; shifts made logical by masking)."""
    z = z * _GOLDEN + 1
    z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * _M1
    z = (z ^ ((z >> 27) & ((1 << 37) - 1))) * _M2
    return z ^ ((z >> 31) & ((1 << 33) - 1))


class Prior:
    """What a prior may change in a morph step. Subclass it and override any of the three hooks.

    One step of `morph`, for the samples still moving, all batched:

    1. the model sees ``model_input(x, noise)`` (default: ``x`` itself); the gradient of the target's
       score is taken with respect to ``x`` through it;
    2. the gradient is blurred (``morph(smoothing=...)``) and scaled to unit length;
    3. every prior's ``pull(x, state)`` is added: a direction in the same units (a pull of length 1 pulls
       as hard as the model's gradient), or None for no pull; for a sample the prior is not ``settled``
       about, its ``toward(x, state)`` instead;
    4. the sum, scaled to ``step_size``, is the step.

    A sample stops (and counts as a success) once the model's stopping rule holds and every prior that has
    a say, ``settled(x, state, progress)``, is settled about it: a data prior can ask that the morph also
    look like the target's reference images before it stops (``progress``: the share of the steps gone).

    ``prepare(inputs, targets)`` runs once per chunk, before the first step, on the original inputs and
    their targets; what it returns (tensors whose first dimension is the batch) is handed back to ``pull``,
    sliced to the samples still moving.

    >>> class TowardGray(Prior):      # a toy prior: pull every pixel toward 0.5
    ...     def pull(self, x, state):
    ...         return 0.5 * (0.5 - x)
    >>> import torch, peering
    >>> model = torch.nn.Linear(64, 10)
    >>> res = peering.morph(model, torch.rand(2, 64), 3, prior=TowardGray(), confidence=None)
    >>> res.success.tolist()
    [True, True]
    """

    def prepare(self, inputs: Tensor, targets: Tensor) -> PriorState:
        """Per-sample state from the originals [b, ...] and the targets int64 [b]. Default: none."""
        return ()

    def model_input(self, x: Tensor, noise: Noise) -> Tensor:
        """What the model sees instead of ``x`` (differentiable in ``x``). Default: ``x``."""
        return x

    def pull(self, x: Tensor, state: PriorState) -> Tensor | None:
        """A direction added to the unit-length gradient step, shaped like ``x``, or None."""
        return None

    def settled(self, x: Tensor, state: PriorState, progress: float) -> Tensor | None:
        """bool [b]: whether the prior lets each sample stop, ``progress`` (in [0, 1]) of the steps gone.
        Default None: the prior has no say (the model's stopping rule alone decides)."""
        return None

    def toward(self, x: Tensor, state: PriorState) -> Tensor | None:
        """The pull used instead of ``pull`` for the samples the prior is not settled about. Default: the
        same as ``pull``."""
        return self.pull(x, state)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class Generative(Prior):
    """A prior that moves the morph into a latent space: `morph` then walks codes, not pixels.

    ``prepare(inputs, targets)`` must return a state whose first tensor is each original's code [b, ...];
    ``decode(code, state)`` draws the frame for codes (differentiable). Each step, the model's gradient
    (with the other priors' pulls) is carried back through ``decode`` to the code, ``latent_pull`` may add
    a direction in the latent space, and the code takes a step of length ``step`` (times the sample's
    trust factor). Once the sample's latent walk stalls (3 steps without a new best) or half the steps are
    gone, a pixel offset walks along the blurred gradient too, with ``pixel`` times morph's
    ``step_size``: what the decoder cannot draw. At most one per morph. See `peering.priors.LatentShift`.

    >>> import torch, peering
    >>> class Itself(Generative):   # a toy: the code is the image itself
    ...     def prepare(self, inputs, targets):
    ...         return (inputs.clone(),)
    ...     def decode(self, code, state):
    ...         return code
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    >>> peering.morph(model, torch.rand(2, 1, 8, 8), 3, prior=Itself(), confidence=None, steps=3).inputs.shape
    torch.Size([2, 1, 8, 8])
    """

    step: float = 0.25
    pixel: float = 0.5

    def decode(self, code: Tensor, state: PriorState) -> Tensor:
        """The frame [b, ...] for codes [b, ...] (differentiable in ``code``)."""
        raise NotImplementedError

    def latent_pull(self, code: Tensor, state: PriorState) -> Tensor | None:
        """A direction in the latent space added to the unit-length carried gradient, or None."""
        return None


def smooth(x: Tensor, sigma: float) -> Tensor:
    """Blur images [B, C, H, W] with a Gaussian of ``sigma`` pixels (separable, edges replicated).

    ``morph(..., smoothing=sigma)`` blurs each step's gradient with it, so every step is a smooth change.

    >>> x = torch.zeros(1, 1, 9, 9); x[0, 0, 4, 4] = 1.0
    >>> y = smooth(x, 1.0)
    >>> round(float(y.sum()), 4), round(float(y[0, 0, 4, 4]), 3)
    (1.0, 0.159)
    """
    if x.ndim != 4:
        raise PeeringValueError(f"smooth blurs images [B, C, H, W], got shape {list(x.shape)}")
    if sigma <= 0:
        return x
    along_h = _blur_matrix(x.shape[2], float(sigma), x.device, x.dtype)
    along_w = _blur_matrix(x.shape[3], float(sigma), x.device, x.dtype)
    return torch.matmul(torch.matmul(along_h, x), along_w.T)


@functools.lru_cache(maxsize=16)
def _blur_matrix(n: int, sigma: float, device: torch.device, dtype: torch.dtype) -> Tensor:
    """[n, n]: a 1-d Gaussian blur of ``sigma`` along n pixels with edges replicated, as a matrix (two
    small matrix products blur an image 10x faster than a depthwise convolution, at any size)."""
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    columns = (torch.arange(n)[:, None] + torch.arange(-radius, radius + 1)[None, :]).clamp(0, n - 1)
    matrix = torch.zeros(n, n, dtype=torch.float64)
    matrix.scatter_add_(1, columns, kernel.expand(n, -1).contiguous())
    return matrix.to(device=device, dtype=dtype)


def _unit(x: Tensor) -> Tensor:
    return x / x.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.ndim - 1)))


class Prototypes(Prior):
    """A data prior: pull each sample from its current class toward the target's nearest reference images.

    For every sample, ``prepare`` finds, in each class, the ``k`` reference images nearest to the original
    (L2 in pixel space) and averages them: one prototype per class. At each step it measures how close the
    morph is to each prototype (a softmax of minus the squared distances) and pulls along ``target
    prototype - sum_c q_c prototype_c``: at first from the original's own class toward the target's, then
    less and less as the morph comes nearer to the target's prototype than to any other. The pull's length
    is ``weight`` times its length at the start divided by the distance from the original to the target's
    prototype, so ``weight=1`` pulls about as hard as the model's unit gradient.

    It also has a say in when a sample stops (``settle``): only once the morph is clearly nearer the
    target's prototype than any other class's: its squared distance to the target's prototype, times a
    margin, is at most that to any other. The margin starts at ``settle`` and eases to 1 (merely nearest)
    by half the steps, so a morph stops well onto the target's images where the model allows it and
    still arrives where the model is only sure of the target off them (an under-trained model). Until a
    sample is settled, the pull points straight at the target's prototype, with length ``weight``. A
    well-trained model is sure of the target long before the morph looks like it: on the well-trained
    models of benchmarks/zoo.py's tune half, a judge trained apart called 8-39% of the morphs the target
    without ``settle`` and 83-94% with ``settle=16``, at a mean L2 larger by 1.7-2.3 (docs/morph_zoo.md).

    Args:
        images: reference images [N, ...], the same shape per sample as the inputs to morph (e.g. the
            model's training images). At least one of each target class.
        labels: int [N] class of each reference image.
        k: reference images averaged into each prototype.
        weight: strength of the pull, relative to the model's unit gradient (4: four times as hard; chosen on
            half of benchmarks/zoo.py, where 1 left most morphs of well-trained models unconvincing).
        temperature: softness of "which prototype is the morph nearest to", relative to each original's
            squared distance to its nearest prototype (so it does not depend on the data's scale).
        settle: the margin (a ratio of squared distances, >= 1) by which a morph must be nearer the
            target's prototype than any other class's before it may stop, at the start (eased to 1 by half
            the steps); None: no say in stopping. 16 was chosen on half of benchmarks/zoo.py.

    Memory: ``prepare`` computes the distances of a chunk to all N references, [chunk, N].

    >>> import torch, peering
    >>> from peering.data import load_digits
    >>> from peering.models import DigitCNN, train_classifier
    >>> x, y = load_digits()
    >>> model = train_classifier(DigitCNN(image_size=8), x[:1500], y[:1500], epochs=10, lr=2e-3)
    >>> prior = Prototypes(x[:1500], y[:1500])
    >>> res = peering.morph(model, x[1500:1504], (y[1500:1504] + 1) % 10, prior=prior)
    >>> bool(res.success.all())
    True
    """

    def __init__(self, images: Tensor, labels: Tensor, *, k: int = 5, weight: float = 4.0,
                 temperature: float = 0.1, settle: float | None = 16.0) -> None:
        if not isinstance(images, Tensor) or not images.is_floating_point() or images.ndim < 2:
            raise PeeringTypeError("images must be a floating-point tensor of reference images [N, ...]")
        if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.ndim != 1:
            raise PeeringTypeError("labels must be an integer tensor [N] of classes")
        if len(images) != len(labels) or len(images) == 0:
            raise PeeringValueError(
                f"need as many labels as images (at least one), got {len(images)} and {len(labels)}"
            )
        if labels.min() < 0:
            raise PeeringValueError(f"labels must be class indices >= 0, got {int(labels.min())}")
        if not torch.isfinite(images).all():
            raise PeeringValueError("the reference images contain NaN or Inf")
        int_at_least("k", k, 1)
        if not (weight >= 0 and math.isfinite(weight)):
            raise PeeringValueError(f"weight must be a finite number >= 0, got {weight}")
        if not (temperature > 0 and math.isfinite(temperature)):
            raise PeeringValueError(f"temperature must be a finite number > 0, got {temperature}")
        if settle is not None and not (settle >= 1 and math.isfinite(settle)):
            raise PeeringValueError(f"settle must be a finite number >= 1, or None, got {settle}")
        self.k = k
        self.weight = float(weight)
        self.settle = None if settle is None else float(settle)
        self.temperature = float(temperature)
        labels = labels.to(torch.int64)
        self._images = images.detach().flatten(1)
        self._shape = tuple(images.shape[1:])
        self._counts = torch.bincount(labels.cpu())
        # the references of each class side by side: index [C, Nmax] into images (padded; _valid marks real)
        order = torch.argsort(labels.cpu(), stable=True)
        n_max = int(self._counts.max())
        starts = torch.cumsum(self._counts, 0) - self._counts
        slot = torch.arange(n_max)
        self._valid = slot[None, :] < self._counts[:, None]
        self._index = order[(starts[:, None] + slot[None, :]).clamp(max=len(order) - 1)]

    @property
    def num_classes(self) -> int:
        """One more than the largest reference label."""
        return len(self._counts)

    def prepare(self, inputs: Tensor, targets: Tensor) -> PriorState:
        if tuple(inputs.shape[1:]) != self._shape:
            raise PeeringValueError(
                f"the reference images are {list(self._shape)} per sample but the inputs are "
                f"{list(inputs.shape[1:])}; give reference images shaped like the inputs"
            )
        if targets.numel() and int(targets.max()) >= self.num_classes:
            raise PeeringValueError(
                f"target class {int(targets.max())} has no reference images (the labels go up to "
                f"{self.num_classes - 1}); give reference images of every target class"
            )
        if targets.numel() and bool((self._counts.to(targets.device)[targets] == 0).any()):
            missing = sorted({int(t) for t in targets[self._counts.to(targets.device)[targets] == 0]})
            raise PeeringValueError(
                f"no reference images of target class(es) {missing}; give some of every target class"
            )
        device, dtype = inputs.device, inputs.dtype
        refs = self._images.to(device=device, dtype=dtype)
        valid = self._valid.to(device)
        flat = inputs.detach().flatten(1)
        dist = torch.cdist(flat, refs)[:, self._index.to(device)]                     # [b, C, Nmax]
        dist = dist.masked_fill(~valid, math.inf)
        k = min(self.k, dist.shape[2])
        near, idx = dist.topk(k, dim=2, largest=False)                                 # [b, C, k]
        use = torch.isfinite(near).to(dtype)
        members = refs[self._index.to(device)[torch.arange(len(valid), device=device)[None, :, None], idx]]
        protos = (members * use[..., None]).sum(2) / use.sum(2, keepdim=True).clamp_min(1)  # [b, C, D]
        present = self._counts.to(device) > 0
        sq = _squared_distances(flat, protos, present)
        tau = (self.temperature * sq.amin(dim=1)).clamp_min(1e-12)                      # [b]
        rows = torch.arange(len(flat), device=device)
        own = protos[rows, targets]
        scale = self.weight / (own - flat).norm(dim=1).clamp_min(1e-12)
        return protos, tau, targets, scale, protos.pow(2).sum(2), own

    def pull(self, x: Tensor, state: PriorState) -> Tensor:
        protos, tau, _, scale, squares, own = state
        flat = x.flatten(1)
        present = self._counts.to(x.device) > 0
        q = torch.softmax(-_squared_distances(flat, protos, present, squares) / tau[:, None], dim=1)
        direction = own - torch.bmm(q[:, None, :], protos)[:, 0]
        return (direction * scale[:, None]).view_as(x)

    def settled(self, x: Tensor, state: PriorState, progress: float) -> Tensor | None:
        if self.settle is None:
            return None
        protos, _, targets, _, squares, _ = state
        present = self._counts.to(x.device) > 0
        sq = _squared_distances(x.flatten(1), protos, present, squares)
        rows = torch.arange(len(sq), device=x.device)
        others = sq.scatter(1, targets[:, None], math.inf).amin(dim=1)
        margin = self.settle ** max(0.0, 1.0 - 2.0 * progress)
        return sq[rows, targets] * margin <= others

    def toward(self, x: Tensor, state: PriorState) -> Tensor:
        return (self.weight * _unit(state[5] - x.flatten(1))).view_as(x)


def _squared_distances(
    flat: Tensor, protos: Tensor, present: Tensor, squares: Tensor | None = None
) -> Tensor:
    """[b, C]: squared L2 from each sample [b, D] to its prototypes [b, C, D]; +inf for absent classes.

    As |x|^2 - 2 x.p + |p|^2 (a batched matrix product, no [b, C, D] temporary); ``squares``: the
    prototypes' |p|^2 [b, C] if known."""
    cross = torch.bmm(protos, flat[:, :, None])[:, :, 0]
    if squares is None:
        squares = protos.pow(2).sum(2)
    sq = (squares - 2 * cross + flat.pow(2).sum(1, keepdim=True)).clamp_min(0)
    return sq.masked_fill(~present[None, :], math.inf)


class TotalVariation(Prior):
    """Keep the change piecewise smooth: pull down the total variation of (morph - original).

    The pull is minus the gradient of a smoothed anisotropic total variation of the change, scaled to
    length ``weight``. For images [B, C, H, W].

    Args:
        weight: length of the pull, relative to the model's unit gradient.

    >>> import torch, peering
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    >>> res = peering.morph(model, torch.rand(2, 1, 8, 8), 3, prior=TotalVariation(0.3))
    >>> res.inputs.shape
    torch.Size([2, 1, 8, 8])
    """

    def __init__(self, weight: float = 0.3) -> None:
        if not (weight >= 0 and math.isfinite(weight)):
            raise PeeringValueError(f"weight must be a finite number >= 0, got {weight}")
        self.weight = float(weight)

    def prepare(self, inputs: Tensor, targets: Tensor) -> PriorState:
        if inputs.ndim != 4:
            raise PeeringValueError(
                f"TotalVariation needs images [B, C, H, W], got shape {list(inputs.shape)}"
            )
        return (inputs.detach(),)

    def pull(self, x: Tensor, state: PriorState) -> Tensor:
        (inputs,) = state
        change = x - inputs
        eps = 1e-3
        dh = change[..., 1:, :] - change[..., :-1, :]
        dw = change[..., :, 1:] - change[..., :, :-1]
        sh = dh / torch.sqrt(dh * dh + eps * eps)
        sw = dw / torch.sqrt(dw * dw + eps * eps)
        grad = torch.zeros_like(x)
        grad[..., 1:, :] += sh
        grad[..., :-1, :] -= sh
        grad[..., :, 1:] += sw
        grad[..., :, :-1] -= sw
        return -self.weight * _unit(grad)


class Jitter(Prior):
    """Expectation over transformations: the model sees each sample shifted and noisy, a new draw per step.

    Every step shifts each image by a random whole number of pixels in [-shift, shift] along height and
    width (zeros come in at the edges) and adds Gaussian noise of standard deviation ``noise``. The
    gradient is taken through the shift, so the step is one that works wherever the digit sits. The
    stopping rule still looks at the unshifted, noiseless input (one more forward pass per step). Draws
    come from `Noise`: the same for a sample whatever the chunking.

    Args:
        shift: the largest shift in pixels (0: none).
        noise: standard deviation of the added noise, in input units (0: none).

    >>> import torch, peering
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    >>> res = peering.morph(model, torch.rand(2, 1, 8, 8), 3, prior=Jitter(shift=1, noise=0.1))
    >>> res.inputs.shape
    torch.Size([2, 1, 8, 8])
    """

    def __init__(self, shift: int = 1, noise: float = 0.0) -> None:
        int_at_least("shift", shift, 0)
        if not (noise >= 0 and math.isfinite(noise)):
            raise PeeringValueError(f"noise must be a finite number >= 0, got {noise}")
        self.shift = shift
        self.noise = float(noise)

    def model_input(self, x: Tensor, noise: Noise) -> Tensor:
        if self.shift:
            if x.ndim != 4:
                raise PeeringValueError(
                    f"Jitter(shift=...) needs images [B, C, H, W], got shape {list(x.shape)}"
                )
            x = _shift(x, noise.uniform(2), self.shift)
        if self.noise:
            x = x + self.noise * noise.normal(*x.shape[1:]).to(device=x.device, dtype=x.dtype)
        return x


def _shift(x: Tensor, u: Tensor, most: int) -> Tensor:
    """Shift each image [B, C, H, W] by whole pixels drawn from ``u`` [B, 2] in [0, 1); zeros fill in."""
    b, _, h, w = x.shape
    pixels = (u.to(x.device) * (2 * most + 1)).floor().clamp(max=2 * most) - most  # [B, 2], in [-most, most]
    padded = F.pad(x, (most, most, most, most))
    rows = (torch.arange(h, device=x.device)[None, :] + most - pixels[:, 0:1].long())  # [B, H]
    cols = (torch.arange(w, device=x.device)[None, :] + most - pixels[:, 1:2].long())  # [B, W]
    out = padded.gather(2, rows[:, None, :, None].expand(b, x.shape[1], h, padded.shape[3]))
    return out.gather(3, cols[:, None, None, :].expand(b, x.shape[1], h, w))


# peering.morph.generative imports this module, so its names are re-exported here on first use
__getattr__ = exports(
    dict.fromkeys(("Autoencoder", "LatentShift", "train_autoencoder"), "peering.morph.generative"), __name__
)
