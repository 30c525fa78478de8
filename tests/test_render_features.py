"""`peering.render.features`: tabular inputs as bar charts, checked pixel by pixel."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from peering.render import confusion_panels, explanation_image, input_kind
from peering.render import features as features_module
from peering.render._draw import _lut_np

POSITIVE = _lut_np()[features_module._POSITIVE]
NEGATIVE = _lut_np()[features_module._NEGATIVE]


def bars(img, charts: int = 1) -> list[int]:
    """The signed length in pixels of each bar of a picture: chart by chart (left to right), top to bottom.

    A bar is a run of the positive or negative bar colour in the first pixel row of the bar.
    """
    a = np.array(img)
    width = a.shape[1]
    found = []
    for colour, sign in ((POSITIVE, 1), (NEGATIVE, -1)):
        mask = (a == colour).all(axis=2)
        for y in np.nonzero(mask.any(axis=1))[0]:
            if y > 0 and mask[y - 1].any():
                continue  # not the top row of its bars
            edges = np.diff(np.concatenate([[0], mask[y].astype(int), [0]]))
            for start, stop in zip(np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0], strict=True):
                chart = int(start * charts // width)
                found.append((chart, int(y), sign * int(stop - start)))
    return [length for _, _, length in sorted(found)]


def explanation(attributions, probabilities=None):
    b, k = attributions.shape[:2]
    probs = probabilities if probabilities is not None else torch.full((b, 4), 0.25)
    return SimpleNamespace(
        attributions=attributions, targets=torch.arange(k).expand(b, k), probabilities=probs, output=None
    )


def test_the_rule_and_forcing_it():
    assert [input_kind(s) for s in ([30], [25], [49], [64], [784], [1, 5, 5], [7, 7])] == [
        "features",
        "features",
        "features",
        "image",
        "image",
        "image",
        "image",
    ]
    torch.manual_seed(0)  # a map pixel at full scale has the bar colour: without a seed, 1 run in 4 is 4 px
    exp = explanation(torch.randn(2, 2, 25))
    drawn = explanation_image(exp, torch.rand(2, 25))
    assert bars(drawn)  # 25 flat features: bar charts, not a 5x5 "image"
    forced = explanation_image(exp, torch.rand(2, 25), kind="image")
    assert all(abs(b) <= 1 for b in bars(forced)) and forced.size != drawn.size  # (the legend: 1 px runs)
    with pytest.raises(ValueError, match="flat inputs"):
        explanation_image(explanation(torch.randn(1, 1, 1, 5, 5)), torch.rand(1, 1, 5, 5), kind="features")


def test_bars_are_sorted_by_magnitude_top_n_and_signed():
    values = torch.tensor([0.1, -0.9, 0.5, 0.0, -0.3, 0.7, 0.05, 0.2])
    exp = explanation(values.reshape(1, 1, 8))
    lengths = bars(explanation_image(exp, torch.rand(1, 8), top_n=5))
    assert len(lengths) == 5  # the top 5 of 8; the other 3 summarised in a line of text
    assert [np.sign(v) for v in lengths] == [-1, 1, 1, -1, 1]  # -0.9, 0.7, 0.5, -0.3, 0.2
    assert lengths[0] == -100  # the largest |value| is the full half-bar
    assert [abs(v) for v in lengths] == sorted((abs(v) for v in lengths), reverse=True)
    assert abs(lengths[2]) == pytest.approx(100 * 0.5 / 0.9, abs=1)


def test_classes_of_a_sample_share_one_scale():
    a = torch.randn(1, 1, 12, generator=torch.Generator().manual_seed(0))
    for sign in (1, -1):  # the largest bar to the right, then to the left
        exp = explanation(torch.cat([sign * a, sign * a / 4], dim=1))  # class 1 is 4x weaker
        lengths = bars(explanation_image(exp, torch.rand(1, 12), top_n=3), charts=2)
        first, second = lengths[:3], lengths[3:]
        assert abs(first[0]) == 100
        for x, y in zip(first, second, strict=True):
            assert y == pytest.approx(x / 4, abs=1)


def test_feature_names_are_drawn():
    exp = explanation(torch.randn(1, 1, 6))
    x = torch.rand(1, 6)
    names = ["age", "income", "height", "weight", "zip", "score"]
    plain = np.array(explanation_image(exp, x))
    named = np.array(explanation_image(exp, x, feature_names=names))
    other = np.array(explanation_image(exp, x, feature_names=[n.upper() for n in names]))
    assert not np.array_equal(plain, named) and not np.array_equal(named, other)
    assert bars(explanation_image(exp, x, feature_names=names)) == bars(explanation_image(exp, x))
    with pytest.raises(ValueError, match="3 names"):
        explanation_image(exp, x, feature_names=names[:3])


def test_confusion_panels_draw_flat_inputs_as_bars():
    n, d = 3, 30
    g = torch.Generator().manual_seed(0)
    panels = confusion_panels(
        torch.rand(n, d, generator=g),
        torch.randn(n, d, generator=g),
        torch.randn(n, d, generator=g),
        class_a=torch.tensor([1, 2, 3]),
        class_b=torch.tensor([0, 0, 0]),
        prob_a=torch.full((n,), 0.5),
        prob_b=torch.full((n,), 0.4),
        labels=torch.tensor([1, 0, -1]),
        projection_factor=1.0,
        top_n=4,
        feature_names=[f"f{i}" for i in range(d)],
    )
    assert panels.shape[0] == n
    assert len(bars(panels[0].numpy(), charts=2)) == 2 * 4  # two classes, top 4 each


def test_every_printed_number_fits_inside_its_chart():
    """A value of 3.7e-10 is printed whole ("+3.7e-10", not "+3.7e-1" cut at the edge), as are wide ones:
    the chart is as wide as its longest number, with white to its right."""
    from peering.render._draw import _BACKGROUND
    from peering.render.features import _value_text, bar_tiles

    values = np.array([[[3.7e-10, -1.234e9, 5.0]]], dtype=np.float32)
    tiles = bar_tiles(values, None, feature_names=None, top_n=3, scale=np.array([1.234e9]))
    assert _value_text(3.7e-10) == "+3.7e-10"
    assert (tiles[..., -3:, :] == _BACKGROUND).all()
    narrow = bar_tiles(np.array([[[0.5, -0.25, 0.1]]], dtype=np.float32), None, feature_names=None, top_n=3,
                       scale=np.array([0.5]))
    assert tiles.shape[3] > narrow.shape[3]  # made wider for the long numbers, not cut


def test_a_tabular_morph_is_drawn_as_bars_of_the_changed_features():
    from peering.render import film_strip

    frames = torch.zeros(3, 1, 12)
    frames[1, 0, 4] = 0.5
    frames[2, 0, 4], frames[2, 0, 7] = 1.0, -0.3
    res = SimpleNamespace(frames=frames, frame_steps=torch.arange(3), steps=torch.tensor([2]),
                          targets=torch.tensor([1]), probabilities=torch.tensor([[0.1, 0.9]]))
    names = [f"f{j}" for j in range(12)]
    three = np.asarray(film_strip(res, 0, kind="features", feature_names=names, top_n=3))
    six = np.asarray(film_strip(res, 0, kind="features", feature_names=names, top_n=6))
    assert three.shape[0] > 60 and six.shape[0] > three.shape[0]  # a chart with one row per feature shown
    assert (three != 255).any(axis=2).sum() > 500  # bars and labels, not a 1-pixel row
