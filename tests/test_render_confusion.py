"""The confusion atlas's pictures: what the colours of the matrix stand for, and what a pair's panel holds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from peering.render import confused_pair_panels, confusion_matrix_image, diverging, to_rgb
from peering.render.confusion import _mistake_lut

MATRIX = torch.tensor(
    [
        [50, 3, 0, 0],
        [1, 40, 9, 0],
        [0, 2, 45, 0],
        [0, 0, 0, 0],  # a class without samples
    ]
)


def colour_count(image: np.ndarray, colour) -> int:
    return int((image.reshape(-1, 3) == np.asarray(colour, dtype=np.uint8)).all(axis=1).sum())


def test_the_largest_mistake_is_darkest_and_outlined():
    image = confusion_matrix_image(MATRIX, highlight=torch.tensor([[1, 2]]), title="epoch 3").numpy()
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    darkest = _mistake_lut()[255]
    # the mistake 1 -> 2 (9 of 50) is the largest share of its row: drawn in the darkest colour, a whole
    # cell of it (minus its outline and its number)
    assert colour_count(image, darkest) > 100
    assert colour_count(image, (214, 39, 40)) > 4 * 10  # its red outline
    # 0 -> 1 (3 of 53) and 2 -> 1 (2 of 47): lighter shades of the same map
    lighter = _mistake_lut()[int(round(3 / 53 / (9 / 50) * 255))]
    assert colour_count(image, lighter) > 50

    no_mistakes = confusion_matrix_image(torch.diag(torch.tensor([5, 6, 7]))).numpy()
    lut = {tuple(c) for c in _mistake_lut()[1:].tolist()}
    assert not any(tuple(c) in lut for c in np.unique(no_mistakes.reshape(-1, 3), axis=0).tolist())


def test_more_classes_make_a_larger_picture_and_many_classes_still_draw():
    small = confusion_matrix_image(torch.eye(3, dtype=torch.int64) * 4)
    large = confusion_matrix_image(torch.eye(10, dtype=torch.int64) * 4)
    assert large.shape[0] > small.shape[0] and large.shape[1] > small.shape[1]
    hundred = torch.randint(0, 5, (100, 100)) + torch.eye(100, dtype=torch.int64) * 50
    assert confusion_matrix_image(hundred).shape[0] > 100 * 6  # no numbers, small cells, still a matrix


@pytest.mark.parametrize(
    ("matrix", "kwargs", "message"),
    [
        (torch.zeros(3, 4), {}, "square"),
        (torch.tensor([[1, -1], [0, 1]]), {}, "counts"),
        (MATRIX, {"class_names": ["a", "b"]}, "class names"),
        (MATRIX, {"highlight": torch.tensor([[0, 4]])}, "outside"),
    ],
)
def test_matrix_bad_input(matrix, kwargs, message):
    with pytest.raises(ValueError, match=message):
        confusion_matrix_image(matrix, **kwargs)


def test_pair_panels_hold_the_examples_and_the_direction():
    torch.manual_seed(0)
    examples = torch.rand(5, 1, 8, 8)
    pair_index = torch.tensor([0, 0, 0, 1, 1])
    directions = torch.randn(3, 1, 8, 8)
    directions[2] = float("nan")  # a pair without examples
    pairs = torch.tensor([[4, 9], [7, 1], [3, 5]])
    zoom = 2
    panels = confused_pair_panels(
        examples,
        pair_index,
        directions,
        pairs,
        counts=torch.tensor([12, 5, 1]),
        totals=torch.tensor([100, 98, 90]),
        probabilities=torch.tensor([0.6, 0.7, 0.8, 0.55, 0.9]),
        zoom=zoom,
    ).numpy()
    assert panels.shape[0] == 3 and panels.dtype == np.uint8

    def contains(panel, tile) -> bool:
        """Whether the zoomed tile appears in the panel (searched along the tiles' row)."""
        tile = np.repeat(np.repeat(tile, zoom, 0), zoom, 1)
        h, w = tile.shape[:2]
        rows = [y for y in range(panel.shape[0] - h + 1) if (panel[y, :, :] == tile[0, 0]).all(axis=1).any()]
        return any(
            np.array_equal(panel[y : y + h, x : x + w], tile)
            for y in rows
            for x in range(panel.shape[1] - w + 1)
            if np.array_equal(panel[y, x], tile[0, 0])
        )

    inputs = to_rgb(examples).numpy()
    maps = diverging(directions[:2]).numpy()
    assert contains(panels[0], inputs[0]) and contains(panels[0], inputs[2]) and contains(panels[0], maps[0])
    assert contains(panels[1], inputs[4]) and contains(panels[1], maps[1])
    assert not contains(panels[1], inputs[0])  # each pair shows its own examples
    # the pair without examples: no example tiles, its direction neutral grey
    neutral = diverging(torch.zeros(1, 8, 8)).numpy()
    assert contains(panels[2], neutral) and not contains(panels[2], inputs[0])


def test_pair_panels_bad_input():
    with pytest.raises(ValueError, match="P >= 1"):
        confused_pair_panels(
            torch.rand(0, 1, 4, 4),
            torch.zeros(0, dtype=torch.int64),
            torch.rand(0, 1, 4, 4),
            torch.zeros(0, 2, dtype=torch.int64),
        )
    with pytest.raises(ValueError, match="pair_index must be in"):
        confused_pair_panels(
            torch.rand(2, 1, 4, 4),
            torch.tensor([0, 3]),
            torch.rand(2, 1, 4, 4),
            torch.tensor([[0, 1], [1, 0]]),
        )


def test_pair_panels_state_the_scale_of_their_directions():
    """Each direction's scale is drawn: a colour legend with the diverging map's bar from -scale to +scale
    (and the scale in words under the direction)."""
    from tests.test_render_tokens import has_colour_bar

    panels = confused_pair_panels(
        torch.rand(2, 1, 8, 8), torch.tensor([0, 0]), torch.randn(1, 1, 8, 8), torch.tensor([[4, 9]])
    ).numpy()
    assert has_colour_bar(panels[0])
