"""What people read: messages say it right (counts agree with their nouns, no "give 1 or 1")."""

from __future__ import annotations

import pytest
import torch

from peering.errors import PeeringValueError
from peering.render import explanation_image


def _explanation(channels: int):
    probs = torch.tensor([[0.7, 0.2, 0.1]])
    return type("E", (), {"attributions": torch.rand(1, 1, channels, 4, 4), "targets": torch.tensor([[0]]),
                          "probabilities": probs})()


def test_a_wrong_mean_count_is_said_right():
    one = _explanation(1)
    with pytest.raises(PeeringValueError) as err:
        explanation_image(one, torch.rand(1, 1, 4, 4), display=([0.5, 0.5, 0.5], [0.5]))
    assert "display mean has 3 values; the inputs have 1 channel (give 1)" in str(err.value)
    three = _explanation(3)
    with pytest.raises(PeeringValueError, match=r"the inputs have 3 channels \(give 1 or 3\)"):
        explanation_image(three, torch.rand(1, 3, 4, 4), display=([0.5, 0.5], [0.5]))
