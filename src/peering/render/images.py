"""Pictures of attributions on images: colour maps, explanation rows, the callback's confusion panels.

- An *image* is a float tensor [C, H, W] with C = 1 or 3 and values in [0, 1] (values outside are
  clamped, NaN shows as 0, and the picture says so); ``display=`` shows inputs in any other range as a
  person would see them (``(mean, std)`` undoes a normalisation, or any function). A *flat* input is a
  feature vector [D]: a flattened square image when D = s * s with s >= 8, else tabular features drawn
  as bar charts (`peering.render.features`; ``kind=`` forces either).
- Attributions are shown with a diverging colour map: negative values (the class wants *less* intensity
  there) dark, positive values (it wants *more*) bright, zero the middle of the map. Every picture states
  its scale (the |value| drawn at full colour, "scale ±3.7e-4"), and the maps that are compared (the K
  classes of a sample) share it, so a class with 100x weaker gradients looks 100x fainter.
- Colour images: ``channels=`` picks the view. "colour" (the default for 3 channels) draws the
  attribution itself as a colour picture around grey: each channel brighter where the class wants more of
  that colour, darker where it wants less, so evidence that opposes channels (more red, less green) shows;
  "sum" adds the channels with their signs into one diverging map (1-channel default; opposed channels
  cancel there); "each" draws one diverging map per channel; "magnitude" the length over channels
  (grey for 0 to bright yellow).
- With ``output="probability"``, a class whose probability is above 0.99 or below 0.01 has a saturated,
  tiny gradient: the picture says so and suggests "log_probability" or "logit".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from peering._validate import int_at_least
from peering.errors import PeeringValueError
from peering.render._draw import (
    PYTHON_HINT,
    Display,
    _canonical,
    _colorize,
    _compose,
    _infer_sample_ndim,
    _maps,
    _numpy,
    _rgb,
    attribution_tiles,
    channel_view,
    display_images,
    join_notes,
    range_notes,
    saturation_note,
    scale_caption,
)
from peering.render._legend import above, differentiated, headed, legend_band, overlay_tiles, value_caption
from peering.render.features import bar_tiles, resolve_kind

if TYPE_CHECKING:  # only for type hints: render never imports the modules that produce these
    from peering.attribution.explanation import Explanation

__all__ = ["confusion_panels", "diverging", "explanation_image", "to_rgb"]


def diverging(
    attribution: Tensor, scale: float | Tensor | None = None, *, flat: bool | None = None
) -> Tensor:
    """Attribution maps as colour pictures: uint8 RGB [..., H, W, 3].

    Args:
        attribution: [..., C, H, W] (C = 1 or 3), [..., H, W], or a flat feature vector [D] (shown as a
            near-square grid when D is a perfect square, else as a 1-row strip). Channels are summed,
            signs kept, into one map per picture. NaN counts as 0.
        scale: the value drawn at full colour: maps are divided by it and clipped to [-1, 1]. A float, or
            a tensor broadcastable to the leading dims (e.g. [B, 1] for one scale per row of [B, K, ...]).
            Default: each map's own max |value|. Zero (an all-zero map) is guarded: it renders neutral.
        flat: True when the last dim is a feature vector and all leading dims are batch dims ([B, D]);
            by default only a 1-D tensor is read as flat, and [B, H, W] is told from [C, H, W] by C in
            {1, 3}.

    Colours: matplotlib's 'cividis' (built once into a 256-entry table): -1 (the class wants less
    intensity) is dark blue, 0 the neutral grey in the middle, +1 (it wants more) bright yellow. Cividis
    was chosen because its lightness rises (nearly) linearly and it reads the same with colour blindness,
    so the sign survives any viewer. Value v in [-1, 1] goes to entry floor(128 (v + 1)), clipped to 255.

    >>> import torch
    >>> from peering.render import diverging
    >>> diverging(torch.rand(2, 3, 28, 28) - 0.5).shape
    torch.Size([2, 28, 28, 3])
    >>> diverging(torch.rand(64) - 0.5).shape  # a flat 64-vector is drawn as 8x8
    torch.Size([8, 8, 3])
    """
    maps = _maps(attribution, _infer_sample_ndim(attribution, flat))
    return torch.from_numpy(_colorize(maps, scale))


def to_rgb(images: Tensor, *, flat: bool | None = None) -> Tensor:
    """Images in [0, 1] as uint8 RGB [..., H, W, 3] (grey images repeated over the three channels).

    Args:
        images: [..., C, H, W] with C = 1 or 3, [..., H, W] (grey), or a flat vector [D] (drawn as in
            `diverging`). Values are clamped to [0, 1]; NaN shows as black.
        flat: True for a batch of flat vectors [..., D]; see `diverging`.

    >>> import torch
    >>> from peering.render import to_rgb
    >>> to_rgb(torch.rand(4, 1, 28, 28)).shape
    torch.Size([4, 28, 28, 3])
    >>> to_rgb(torch.rand(784)).shape
    torch.Size([28, 28, 3])
    """
    return torch.from_numpy(_rgb(images, _infer_sample_ndim(images, flat)))


_KEPT = 2 / 3  # below this share kept by the channel sum, the picture says that channels cancel


def _check_top_n(top_n: int) -> None:
    int_at_least("top_n", top_n, 1)


def _map_rows(
    attributions: Tensor | np.ndarray,
    sample_ndim: int,
    channels: str | None,
    shared_scale: bool,
    heads: Sequence[Sequence[str]],
    shown: np.ndarray,
) -> tuple[np.ndarray, list[list[str]], str, np.ndarray | None]:
    """Tiles [N, K * m, h, w, 3] and their captions ("head suffix" over "scale ±s") for attributions
    [N, K, ...]; ``heads`` [N][K] are the first caption lines; ``shown`` the inputs as displayed (the
    overlay view draws over them). Also the view drawn and each row's scale (None when every map has its
    own), for the legend."""
    attr = _canonical(attributions, sample_ndim)  # [N, K, C, H, W]
    n, k = attr.shape[:2]
    view = channel_view(channels, attr.shape[2])
    if view == "overlay":
        values = np.nan_to_num(attr, nan=0.0, posinf=0.0, neginf=0.0).sum(axis=2)  # [N, K, H, W]
        grey = _canonical(shown, sample_ndim).mean(axis=-3)  # [N, H, W]
        per_map = np.abs(values).reshape(n, k, -1).max(axis=2, initial=0.0)
        scales = np.repeat(per_map.max(axis=1, keepdims=True), k, axis=1) if shared_scale else per_map
        tiles = np.stack([overlay_tiles(values[:, j : j + 1], grey, scales[:, j])[:, 0] for j in range(k)], 1)
        suffixes = [""]
    elif shared_scale:
        tiles, suffixes, scale = attribution_tiles(attr, view)
        scales = np.repeat(scale[:, None], k, axis=1)
    else:  # every map on its own scale
        tiles, suffixes, scale = attribution_tiles(attr.reshape(n * k, 1, *attr.shape[2:]), view)
        tiles = tiles.reshape(n, -1, *tiles.shape[2:])
        scales = scale.reshape(n, k)
    signed = view != "magnitude"
    titles = [
        [
            f"{head} {suffix}".rstrip() + "\n" + scale_caption(float(s), signed)
            for head, s in zip(row, row_scales, strict=True)
            for suffix in suffixes
        ]
        for row, row_scales in zip(heads, scales.tolist(), strict=True)
    ]
    return tiles, titles, view, scales[:, 0] if shared_scale else None


def _cancel_notes(attributions: Tensor | np.ndarray, sample_ndim: int, channels: str | None) -> list[str]:
    """Per sample, a note when the "sum" or "overlay" view of colour attributions (both add the channels)
    loses most of them to cancellation."""
    attr = _canonical(attributions, sample_ndim)  # [N, K, C, H, W]
    n, c = attr.shape[0], attr.shape[2]
    if c == 1 or channel_view(channels, c) not in ("sum", "overlay"):  # the views that add the channels
        return [""] * n
    a = np.nan_to_num(attr, nan=0.0).reshape(n, attr.shape[1], c, -1)
    total = np.abs(a).sum(axis=(1, 2, 3))
    kept = np.abs(a.sum(axis=2)).sum(axis=(1, 2)) / np.maximum(total, np.finfo(np.float32).tiny)
    return [
        f"The channel sum keeps {q:.0%} of the attribution (channels cancel); "
        'channels="colour" or "each" shows them.'
        if t > 0 and q < _KEPT
        else ""
        for q, t in zip(kept.tolist(), total.tolist(), strict=True)
    ]


def explanation_image(
    explanation: Explanation,
    inputs: Tensor,
    *,
    zoom: int = 4,
    shared_scale: bool = True,
    max_samples: int | None = 16,
    channels: Literal["overlay", "colour", "sum", "each", "magnitude"] | None = None,
    display: Display = None,
    kind: Literal["auto", "image", "features"] = "auto",
    feature_names: Sequence[str] | None = None,
    top_n: int = 10,
    saturation_hint: str = PYTHON_HINT,
) -> Image.Image:
    """One row per sample: the input, then its K attribution maps, each captioned "class: p=prob" and
    with its scale ("scale ±3.7e-4": the |value| drawn at full colour).

    Args:
        explanation: an `Explanation` (or any object with ``.attributions`` [B, K, *input_shape],
            ``.targets`` int64 [B, K], ``.probabilities`` [B, C], and optionally ``.output``).
        inputs: the explained inputs [B, *input_shape] (images or flat vectors).
        zoom: integer nearest-neighbour magnification of images.
        shared_scale: one scale per row (the row's max |value|), so the K maps of a sample compare
            directly (a class with 100x weaker gradients looks 100x fainter); False scales every map to
            its own max (each caption still states its scale).
        max_samples: draw at most this many samples (the first ones); None for all.
        channels: the view of colour attributions: "colour", "sum", "each" or "magnitude" (see the
            module's docstring); None: "colour" for 3 channels, "sum" otherwise.
        display: how inputs become pictures: None (already in [0, 1]), ``(mean, std)`` to undo a
            normalisation, or a function of the batch.
        kind: "image", "features" (bar charts of flat inputs), or "auto" (`input_kind`'s rule).
        feature_names: names of the D features of flat inputs drawn as bar charts.
        top_n: bars per chart; the other features are summarised in one line.

    Samples skipped by ``explain`` (target -1) are drawn neutral and captioned "skipped". With
    ``output="probability"`` a row whose classes have p > 0.99 or p < 0.01 gets a note under it: the
    gradient is saturated, and "log_probability" or "logit" shows more (``saturation_hint`` says how:
    ``output="log_probability" or "logit"`` by default; the command line names its ``--output`` option).

    >>> import torch
    >>> from types import SimpleNamespace
    >>> from peering.render import explanation_image
    >>> x = torch.rand(3, 1, 28, 28)
    >>> probs = torch.rand(3, 10).softmax(1)
    >>> exp = SimpleNamespace(attributions=torch.rand(3, 2, 1, 28, 28) - 0.5,
    ...                       targets=probs.topk(2).indices, probabilities=probs)
    >>> explanation_image(exp, x).mode
    'RGB'
    """
    attributions, targets = explanation.attributions, explanation.targets
    if targets.ndim != 2 or attributions.shape[:2] != targets.shape:
        raise PeeringValueError(
            f"attributions {tuple(attributions.shape)} and targets {tuple(targets.shape)} must start [B, K]"
        )
    if inputs.shape[0] != attributions.shape[0] or inputs.shape[1:] != attributions.shape[2:]:
        raise PeeringValueError(
            f"inputs {tuple(inputs.shape)} do not match attributions {tuple(attributions.shape)} "
            "([B, K, ...])"
        )
    _check_top_n(top_n)
    n = attributions.shape[0] if max_samples is None else min(attributions.shape[0], max_samples)
    if n < 1:
        raise PeeringValueError("no samples to draw")
    t = targets[:n].detach().cpu().to(torch.int64)
    output = getattr(explanation, "output", None)
    heads, saturated = _heads(
        t, explanation.probabilities[:n], getattr(explanation, "logits", None), output, saturation_hint
    )
    what = differentiated(output, getattr(explanation, "method", None))

    if resolve_kind(kind, inputs.shape[1:]) == "features":
        a = _numpy(attributions[:n]).reshape(n, attributions.shape[1], -1)
        a = np.nan_to_num(a, nan=0.0)
        scale = np.abs(a).reshape(n, -1).max(axis=1, initial=0.0)
        if not shared_scale:
            raise PeeringValueError(
                "shared_scale=False is for images; feature charts always share a sample's scale"
            )
        tiles = bar_tiles(a, inputs[:n], feature_names=feature_names, top_n=top_n, scale=scale)
        titles = [
            [f"{h}\n{scale_caption(float(s))}" for h in row] for row, s in zip(heads, scale, strict=True)
        ]
        rows = _compose(tiles, titles, zoom=1, notes=saturated)
        return _picture(headed(rows, [what] * n) if what else rows)

    sample_ndim = inputs.ndim - 1
    shown = display_images(inputs[:n], display, sample_ndim)
    maps, map_titles, view, scales = _map_rows(attributions[:n], sample_ndim, channels, shared_scale, heads,
                                               shown)
    tiles = np.concatenate([_rgb(shown, sample_ndim)[:, None], maps], axis=1)
    titles = [["input", *row] for row in map_titles]
    cancelled = _cancel_notes(attributions[:n], sample_ndim, channels)
    notes = join_notes(range_notes(shown, display), cancelled, saturated)
    rows = _compose(tiles, titles, zoom=zoom, notes=notes)
    legend = legend_band(view, list(scales) if scales is not None else [None] * n, rows.shape[2], what)
    return _picture(above(rows, legend))


def _heads(
    targets: Tensor, probabilities: Tensor, logits: Tensor | None, output: str | None, hint: str = PYTHON_HINT
) -> tuple[list[list[str]], list[str]]:
    """Each map's first caption line ("3: p=0.91", "3: σ=0.48", "0: out=2.5", "skipped") and each row's
    saturation note, for targets [n, K]."""
    n = targets.shape[0]
    p = probabilities[:n].detach().cpu().float().gather(1, targets.clamp_min(0))
    z = logits[:n].detach().cpu().float().gather(1, targets.clamp_min(0)) if logits is not None else p
    heads = [
        [f"{k}: {value_caption(output, q, v)}" if k >= 0 else "skipped"
         for k, q, v in zip(ks, qs, vs, strict=True)]
        for ks, qs, vs in zip(targets.tolist(), p.tolist(), z.tolist(), strict=True)
    ]
    notes = [
        saturation_note(ks, qs, output, hint) for ks, qs in zip(targets.tolist(), p.tolist(), strict=True)
    ]
    return heads, notes


def _picture(rows: np.ndarray) -> Image.Image:
    """Rows [R, H, W, 3] stacked into one picture."""
    return Image.fromarray(rows.reshape(-1, rows.shape[2], 3))


def confusion_panels(
    images: Tensor,
    grad_a: Tensor,
    grad_b: Tensor,
    *,
    class_a: Tensor,
    class_b: Tensor,
    prob_a: Tensor,
    prob_b: Tensor,
    labels: Tensor | None,
    projection_factor: float,
    zoom: int = 4,
    output: str | None = None,
    channels: Literal["overlay", "colour", "sum", "each", "magnitude"] | None = None,
    display: Display = None,
    kind: Literal["auto", "image", "features"] = "auto",
    feature_names: Sequence[str] | None = None,
    top_n: int = 10,
    method: str | None = None,
) -> Tensor:
    """One panel per confused sample, uint8 [N, H', W', 3], all the same size so they stack.

    For images, each panel is five captioned tiles in a row:

    1. the input, captioned with its true label ("label 3", or "label ?" without labels or for -1);
    2. and 3. the input gradients toward class a and class b ("→4 p=0.41", "→9 p=0.39"), drawn on ONE
       scale per sample (the larger max |value| of the two), stated under the class ("scale ±0.012"), so
       their strengths compare; with ``channels="each"`` one tile per channel;
    4. and 5. where following each gradient leads: input + projection_factor * grad, shown through
       ``display`` and clamped to [0, 1], captioned "x+f·∇4" and "x+f·∇9".

    For tabular inputs (``kind``, see `input_kind`), each panel is the two classes' bar charts, on one
    scale, with the label in a note under them.

    Args:
        images: [N, ...] inputs (images [N, C, H, W] or flat vectors [N, D]).
        grad_a, grad_b: [N, ...] gradients of the two classes' outputs w.r.t. the inputs.
        class_a, class_b: int [N]: the two classes. prob_a, prob_b: [N]: their probabilities.
        labels: int [N] true labels, or None.
        projection_factor: the step ``f`` along each gradient for tiles 4 and 5.
        zoom: integer nearest-neighbour magnification.
        output: what the gradients are of ("probability", "log_probability", "logit"); with
            "probability", a saturated class (p > 0.99 or < 0.01) gets a note under the panel.
        channels, display, kind, feature_names, top_n: as in `explanation_image`.

    The tensor work is vectorised over N; only the captions are drawn in a loop.

    >>> import torch
    >>> from peering.render import confusion_panels
    >>> x, ga, gb = torch.rand(4, 1, 28, 28), torch.randn(4, 1, 28, 28), torch.randn(4, 1, 28, 28)
    >>> confusion_panels(x, ga, gb, class_a=torch.tensor([4, 1, 3, 7]), class_b=torch.tensor([9, 7, 5, 1]),
    ...                  prob_a=torch.full((4,), 0.41), prob_b=torch.full((4,), 0.39), labels=None,
    ...                  projection_factor=0.5).shape
    torch.Size([4, 190, 596, 3])
    """
    if grad_a.shape != images.shape or grad_b.shape != images.shape:
        raise PeeringValueError(
            f"images {tuple(images.shape)}, grad_a {tuple(grad_a.shape)} and grad_b {tuple(grad_b.shape)} "
            "must have the same shape"
        )
    _check_top_n(top_n)
    sample_ndim = images.ndim - 1
    x, ga, gb = _numpy(images), _numpy(grad_a), _numpy(grad_b)
    n = x.shape[0]
    ca, cb = class_a.reshape(n).tolist(), class_b.reshape(n).tolist()
    pa, pb = prob_a.detach().reshape(n).float().tolist(), prob_b.detach().reshape(n).float().tolist()
    ls = [-1] * n if labels is None else labels.reshape(n).tolist()
    heads = [
        [f"→{a} {value_caption(output, qa)}", f"→{b} {value_caption(output, qb)}"]
        for a, b, qa, qb in zip(ca, cb, pa, pb, strict=True)
    ]
    saturated = [
        saturation_note([a, b], [qa, qb], output) for a, b, qa, qb in zip(ca, cb, pa, pb, strict=True)
    ]
    label_text = [f"label {y}" if y >= 0 else "label ?" for y in ls]
    both = np.stack([ga, gb], axis=1)  # [N, 2, ...]
    what = differentiated(output, method)

    if resolve_kind(kind, images.shape[1:]) == "features":
        a = np.nan_to_num(both.reshape(n, 2, -1), nan=0.0)
        scale = np.abs(a).reshape(n, -1).max(axis=1, initial=0.0)
        tiles = bar_tiles(a, x, feature_names=feature_names, top_n=top_n, scale=scale)
        titles = [
            [f"{h}\n{scale_caption(float(s))}" for h in row] for row, s in zip(heads, scale, strict=True)
        ]
        notes = join_notes([f"True {t}." for t in label_text], saturated)
        panels = _compose(tiles, titles, zoom=1, notes=notes)
        return torch.from_numpy(headed(panels, [what] * n) if what else panels)

    shown = display_images(x, display, sample_ndim)
    maps, map_titles, view, scales = _map_rows(both, sample_ndim, channels, True, heads, shown)
    projected = display_images(
        np.concatenate([x + projection_factor * ga, x + projection_factor * gb]), display, sample_ndim
    )  # [2N, ...]
    projected = np.stack([projected[:n], projected[n:]], axis=1)
    tiles = np.concatenate(
        [_rgb(shown, sample_ndim)[:, None], maps, _rgb(projected, sample_ndim)], axis=1
    )  # _rgb clamps the projections to [0, 1]
    f = f"{projection_factor:g}"
    titles = [
        [label, *row, f"x+{f}·∇{a}", f"x+{f}·∇{b}"]
        for label, row, a, b in zip(label_text, map_titles, ca, cb, strict=True)
    ]
    cancelled = _cancel_notes(both, sample_ndim, channels)
    notes = join_notes(range_notes(shown, display), cancelled, saturated)
    panels = _compose(tiles, titles, zoom=zoom, notes=notes)
    legend = legend_band(view, list(scales) if scales is not None else [None] * n, panels.shape[2], what)
    return torch.from_numpy(above(panels, legend))
