"""`ShortcutAlarm`'s statistics (internal to it; its names are used by its own package only):

- `signal_region`: where the probe inputs carry signal (the rest is *quiet*);
- `class_maps`: per class, the mean magnitude of its probe samples' attributions, normalised to sum 1;
- `quiet_patches`: per class, the largest share of its map on the quiet pixels of one patch, and that
  share over the median class's;
- `paint_test`: paint each quiet patch on other classes' probe samples and count who turns into whom;
- `spearman`: the rank correlation of two maps; `check_probe`: the probe, checked.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from peering._model import class_scores, eval_mode
from peering.errors import PeeringTypeError, PeeringValueError

__all__: list[str] = []  # internal: its names are used by its own package only


def signal_region(inputs: Tensor, *, tolerance: float = 0.02, margin: int = 1) -> Tensor:
    """Bool [H, W]: the pixels where the inputs [n, C, H, W] carry signal, widened by ``margin`` pixels.

    A pixel carries signal when its mean absolute deviation from its median over the inputs (summed over
    channels) is above ``tolerance`` times the largest such deviation in the image.

    >>> x = torch.zeros(10, 1, 8, 8); x[:, :, 3:5, 3:5] = torch.rand(10, 1, 2, 2)
    >>> signal_region(x, margin=1).sum().item()
    16
    """
    x = inputs.detach().float()
    x = x if x.ndim == 4 else x[:, None]
    deviation = (x - x.median(dim=0, keepdim=True).values).abs().mean(dim=0).sum(dim=0)  # [H, W]
    top = float(deviation.max())
    signal = deviation > tolerance * top if top > 0 else torch.zeros_like(deviation, dtype=torch.bool)
    if margin > 0:
        signal = F.max_pool2d(signal.float()[None, None], 2 * margin + 1, 1, margin)[0, 0] > 0
    return signal


def class_maps(attributions: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Per class, the mean over its samples of the attributions' magnitudes (summed over channels),
    normalised to sum 1: float [K, H, W] (NaN for a class without samples), and the counts [K]."""
    a = attributions.detach().float().abs()
    a = a.sum(dim=1) if a.ndim == 4 else a  # [n, H, W]
    maps = torch.full((num_classes, *a.shape[1:]), math.nan)
    counts = torch.bincount(labels.cpu(), minlength=num_classes)[:num_classes]
    for c in range(num_classes):
        if counts[c]:
            m = a[labels.cpu() == c].mean(dim=0)
            total = m.sum()
            maps[c] = m / total if total > 0 else m
    return maps, counts


def quiet_patches(maps: Tensor, quiet: Tensor, window: int) -> tuple[Tensor, Tensor, Tensor]:
    """For each class: the largest share of its map on the quiet pixels (bool [H, W]: no signal) of one
    ``window`` x ``window`` patch, that share divided by the median over the classes of their own largest
    share, and the patch's top-left corner.

    Returns ``(shares [K], ratios [K], corners [K, 2])``; NaN where a class has no map or no pixel is
    quiet. Only the quiet pixels of a patch count, so a patch may straddle the edge of the signal region
    (a corner patch often does).
    """
    k, h, w = maps.shape
    nan = torch.full((k,), math.nan)
    window = min(window, h, w)
    if not bool(quiet.any()):
        return nan, nan.clone(), torch.zeros(k, 2, dtype=torch.long)
    masked = torch.nan_to_num(maps) * quiet
    share = (F.avg_pool2d(masked[:, None], window, 1)[:, 0] * window * window).flatten(1)
    best = share.argmax(dim=1)
    shares = share.gather(1, best[:, None])[:, 0]
    known = ~torch.isnan(maps).flatten(1).any(dim=1)
    baseline = shares[known].median() if bool(known.any()) else torch.tensor(math.nan)
    ratios = shares / baseline.clamp_min(1e-12)
    cols = w - window + 1
    corners = torch.stack([best // cols, best % cols], dim=1)
    return torch.where(known, shares, nan), torch.where(known, ratios, nan), corners


def paint_test(
    model: torch.nn.Module,
    inputs: Tensor,
    labels: Tensor,
    quiet: Tensor,
    window: int,
    *,
    value: Tensor | float,
    num_classes: int,
    output_fn: Callable[[Any], Tensor] | None = None,
    chunk_size: int = 512,
) -> tuple[Tensor, Tensor]:
    """Paint each ``window`` x ``window`` patch lying (at least 3/4) on quiet pixels, stride ``window // 2``,
    with ``value`` on every probe input, and count, per class c, the share of the probe samples of the
    other classes (that the model did not already call c) that the model calls c once painted.

    Returns ``(fooled [K], corners [K, 2])``: for each class its largest share over the patches and that
    patch's top-left corner; zeros where no patch is quiet. Runs the model in eval mode, without
    gradients; the RNG and every module's mode are left as they were.
    """
    h, w = quiet.shape[-2:]
    window = min(window, h, w)
    stride = max(1, window // 2)
    # a patch qualifies when at least 3/4 of its pixels are quiet: a corner patch often grazes the edge
    # of the signal region (one probe digit's stroke, widened by the margin)
    spots = [
        (r, c)
        for r in range(0, h - window + 1, stride)
        for c in range(0, w - window + 1, stride)
        if float(quiet[r : r + window, c : c + window].float().mean()) >= 0.75
    ]
    fooled = torch.zeros(num_classes)
    corners = torch.zeros(num_classes, 2, dtype=torch.long)
    if not spots:
        return fooled, corners
    x = inputs if inputs.ndim == 4 else inputs[:, None]
    with eval_mode(model), torch.no_grad():
        before = _predict(model, inputs, output_fn, chunk_size)
        labels = labels.to(before.device)
        for r, c in spots:
            painted = x.clone()
            painted[:, :, r : r + window, c : c + window] = value
            after = _predict(model, painted.reshape(inputs.shape), output_fn, chunk_size)
            for k in range(num_classes):
                eligible = (labels != k) & (before != k)
                if bool(eligible.any()):
                    share = float((after[eligible] == k).float().mean())
                    if share > fooled[k]:
                        fooled[k], corners[k] = share, torch.tensor([r, c])
    return fooled, corners


def _predict(
    model: torch.nn.Module, x: Tensor, output_fn: Callable[[Any], Tensor] | None, chunk_size: int
) -> Tensor:
    chunks = range(0, len(x), chunk_size)
    return torch.cat([class_scores(model, x[i : i + chunk_size], output_fn).argmax(1) for i in chunks])


def spearman(a: Tensor, b: Tensor) -> float:
    if torch.isnan(a).any() or torch.isnan(b).any():
        return math.nan
    ra = a.flatten().argsort().argsort().double()
    rb = b.flatten().argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denominator if denominator > 0 else math.nan


def check_probe(probe: Any) -> tuple[Tensor, Tensor]:
    if not isinstance(probe, Sequence) or len(probe) != 2:
        raise PeeringTypeError(
            "probe must be (inputs, labels): clean images [n, C, H, W] and their integer labels [n], got "
            f"{type(probe).__name__}"
        )
    inputs, labels = probe
    if not isinstance(inputs, Tensor) or not inputs.is_floating_point() or inputs.ndim not in (3, 4):
        what = f"{inputs.dtype} {list(inputs.shape)}" if isinstance(inputs, Tensor) else type(inputs).__name__
        raise PeeringTypeError(
            f"the probe's inputs must be float images [n, C, H, W] or [n, H, W], got {what}"
        )
    if (
        not isinstance(labels, Tensor)
        or labels.ndim != 1
        or labels.is_floating_point()
        or labels.is_complex()
        or labels.shape[0] != inputs.shape[0]
    ):
        what = f"{labels.dtype} {list(labels.shape)}" if isinstance(labels, Tensor) else type(labels).__name__
        raise PeeringTypeError(
            f"the probe's labels must be integer class indices [n] = [{inputs.shape[0]}], got {what}"
        )
    if inputs.shape[0] == 0 or int(labels.min()) < 0:
        raise PeeringValueError("the probe must hold at least one sample, with labels >= 0")
    if not torch.isfinite(inputs).all():
        raise PeeringValueError("the probe's inputs contain NaN or Inf")
    return inputs.detach().cpu().clone(), labels.detach().cpu().long().clone()


def paint_mark(inputs: Tensor, signal: Tensor) -> Tensor:
    """The mark the paint test paints: per channel, the probe's extreme value farthest from the quiet
    pixels' typical value (white on MNIST's black background, black on a white one); [C, 1, 1] for
    images [n, C, H, W], a scalar tensor for [n, H, W]."""
    x = inputs if inputs.ndim == 4 else inputs[:, None]
    quiet = ~signal
    if bool(quiet.any()):
        typical = x[:, :, quiet].median(dim=2).values.median(dim=0).values
    else:
        typical = x.mean((0, 2, 3))
    high, low = x.amax(dim=(0, 2, 3)), x.amin(dim=(0, 2, 3))
    mark = torch.where(high - typical >= typical - low, high, low)
    return mark[:, None, None] if inputs.ndim == 4 else mark[0]


def alarm_sentence(c: int, kind: str, value: float, ratio: float, patch: tuple[int, int, int, int],
                   epoch: int) -> str:
    """The human sentence of an alarm of class ``c`` ("patch": ``value`` is its share, "paint": the
    share of other classes' probe samples turned into ``c``).

    >>> alarm_sentence(3, "paint", 0.5, math.nan, (0, 0, 4, 4), 1)[:48]
    'class 3: painting the 4x4 patch at rows 0-3, col'
    """
    r, col, h, w = patch
    where = f"the {h}x{w} patch at rows {r}-{r + h - 1}, columns {col}-{col + w - 1}"
    if kind == "paint":
        return (f"class {c}: painting {where} (where clean inputs carry no signal) turns {100 * value:.0f}% "
                f"of the other classes' probe samples into {c} (epoch {epoch}). Check whether its training "
                "inputs carry a mark there.")
    return (f"class {c}: {100 * value:.1f}% of its evidence on clean probe samples sits in {where}, where "
            f"clean inputs carry no signal ({ratio:.1f}x the median class's share in such a patch; epoch "
            f"{epoch}). Check whether its training inputs carry a mark there.")
