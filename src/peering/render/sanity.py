"""Pictures of the randomisation sanity check (`peering.sanity`): the curve per method, example maps.

`sanity_curves` is a line chart, drawn with matplotlib's object API (a `matplotlib.figure.Figure` of its
own, no pyplot state): it is drawn once per run, never on a training thread, and axes, ticks and a
legend are what matplotlib does well. `sanity_maps` is a grid of maps built like the other pictures of
`peering.render` (NumPy and Pillow).

Both take a `peering.sanity.SanityResult`, or any object with the same attributes (duck-typed: render
never imports the module that computes them).
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
from PIL import Image

from peering.errors import PeeringValueError
from peering.render._draw import _colorize, _compose, _maps, _rgb, scale_caption

__all__ = ["sanity_curves", "sanity_maps"]

# one colour per method, the same in every chart (matplotlib's tab10, colour-blind safer than its order)
_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def _step_labels(layers: tuple[str, ...] | list[str]) -> list[str]:
    """"fc2", "+fc1", "+conv2", ...: each step re-initialises one more layer."""
    return [name if i == 0 else f"+{name}" for i, name in enumerate(layers)]


def sanity_curves(result: Any, *, width: float = 6.4, height: float = 4.0, dpi: int = 100) -> Image.Image:
    """The mean rank correlation of |maps| per step, one line per method, as an RGB image.

    ``result`` has ``layers``, ``methods``, ``correlation`` (method -> [L]), ``unrelated`` (method ->
    float), ``passed`` (method -> bool or None) and ``threshold``. The legend gives each method's verdict;
    a dashed line marks the pass threshold, and a cross at the right end of each line the level two
    unrelated random models share.

    >>> import torch
    >>> from types import SimpleNamespace
    >>> from peering.render import sanity_curves
    >>> result = SimpleNamespace(layers=("fc2", "fc1", "conv1"), methods=("gradient",),
    ...                          correlation={"gradient": torch.tensor([0.8, 0.5, 0.3])},
    ...                          unrelated={"gradient": 0.25}, passed={"gradient": True}, threshold=0.5)
    >>> sanity_curves(result).size
    (640, 400)
    """
    from matplotlib.figure import Figure  # lazy: only this chart needs it

    layers = list(result.layers)
    if not layers or not result.methods:
        raise PeeringValueError("the result has no layers or no methods to draw")
    figure = Figure(figsize=(width, height), dpi=dpi)
    axes = figure.add_subplot()
    steps = np.arange(len(layers))
    curves = {m: np.asarray(result.correlation[m], dtype=np.float64) for m in result.methods}
    verdicts = {True: "passes", False: "fails", None: "undecided"}
    for i, name in enumerate(result.methods):
        colour = _COLOURS[i % len(_COLOURS)]
        values = curves[name]
        label = f"{name} ({verdicts[result.passed[name]]})"
        axes.plot(steps, values, marker="o", color=colour, label=label, linewidth=1.8)
        unrelated = float(result.unrelated.get(name, math.nan))
        if math.isfinite(unrelated):
            axes.plot([steps[-1] + 0.35], [unrelated], marker="x", color=colour, markersize=7, linestyle="")
    axes.axhline(result.threshold, color="#555555", linestyle="--", linewidth=1,
                 label=f"pass threshold ({result.threshold:g})")
    axes.plot([], [], marker="x", color="#555555", linestyle="", label="two unrelated random models")
    axes.axhline(0.0, color="#bbbbbb", linewidth=0.8)
    axes.set_xticks(list(steps), _step_labels(layers))
    axes.set_xlim(-0.3, steps[-1] + 0.6)
    lowest = min([0.0] + [float(np.nanmin(c)) for c in curves.values() if np.isfinite(c).any()])
    axes.set_ylim(min(-0.1, lowest - 0.05), 1.05)
    axes.set_xlabel("layers re-initialised, from the output down", fontsize=9)
    axes.set_ylabel("rank correlation of |maps|\nwith the trained model's", fontsize=9)
    axes.tick_params(labelsize=8)
    axes.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    axes.spines[["top", "right"]].set_visible(False)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    buffer.seek(0)
    with Image.open(buffer) as image:
        return image.convert("RGB")


def sanity_maps(result: Any, method: str, *, zoom: int = 4, max_samples: int = 4) -> Image.Image:
    """One row per example sample: the input, its map from the trained model, then after each step.

    ``result`` has ``example_inputs`` [n, ...], ``examples`` (method -> [L + 1, n, ...]) and ``layers``.
    Every map is scaled to its own largest |value|, stated under it (a randomised model's maps can be
    orders of magnitude weaker or stronger): the picture compares where the maps are strong, as the
    check does.

    >>> import torch
    >>> from types import SimpleNamespace
    >>> from peering.render import sanity_maps
    >>> result = SimpleNamespace(layers=("fc2", "fc1"), example_inputs=torch.rand(2, 1, 8, 8),
    ...                          examples={"gradient": torch.randn(3, 2, 1, 8, 8)})
    >>> sanity_maps(result, "gradient", zoom=4).mode
    'RGB'
    """
    if method not in result.examples:
        raise PeeringValueError(f"no example maps for {method!r}; the result has {sorted(result.examples)}")
    inputs = result.example_inputs[:max_samples]
    maps = result.examples[method][:, :max_samples]  # [L + 1, n, ...]
    n = inputs.shape[0]
    if n == 0:
        raise PeeringValueError("the result kept no example maps (examples=0)")
    if maps.shape[0] != len(result.layers) + 1 or maps.shape[1] != n:
        raise PeeringValueError(
            f"example maps {tuple(maps.shape)} do not fit {len(result.layers)} layers and {n} inputs"
        )
    sample_ndim = inputs.ndim - 1
    per_tile = _maps(maps.transpose(0, 1), sample_ndim)  # [n, L + 1, H, W]
    scales = np.abs(per_tile).max(axis=(-2, -1), initial=0.0)  # [n, L + 1]: each map's own
    tiles = np.concatenate([_rgb(inputs, sample_ndim)[:, None], _colorize(per_tile, None)], axis=1)
    heads = ["trained", *_step_labels(result.layers)]
    titles = [
        ["input" if i == 0 else ""]
        + [(h if i == 0 else "") + "\n" + scale_caption(float(s)) for h, s in zip(heads, row, strict=True)]
        for i, row in enumerate(scales)
    ]
    rows = _compose(tiles, titles, zoom=zoom)
    return Image.fromarray(rows.reshape(-1, rows.shape[2], 3))
