"""The confusion atlas's computation on real models and real digits: the matrix against scikit-learn's, the
kept examples against a brute-force choice, the pair directions against a per-sample autograd loop.

(The atlas inside a training run, under DDP, and its pictures are tested in test_callback*.py.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix

from peering.attribution.confusion import pair_directions, top_confused_pairs
from peering.lightning.atlas import ConfusionAtlas, PairExamples, pick_examples
from tests._close import assert_close
from tests._state import assert_same_state, snapshot

BATCHES = (64, 1, 0, 200, 7, 128)  # uneven, with an empty batch and a batch of one


def logits_of(model, x):
    with torch.no_grad():
        return torch.cat([model(x[i : i + 256]) for i in range(0, len(x), 256)])


def batches(n):
    start = 0
    for size in BATCHES:
        yield slice(start, start + size)
        start += size
    while start < n:
        yield slice(start, min(start + 256, n))
        start += 256


@pytest.fixture(scope="module")
def held_out(mnist_split, trained_cnn):
    """The 2,000 held-out digits, their labels (some -1) and logits (some rows NaN)."""
    _, _, x, y = mnist_split
    y = y.clone()
    y[::97] = -1  # unknown labels: not counted
    logits = logits_of(trained_cnn, x)
    logits[5::211] = float("nan")  # a model that blew up on a few samples: not counted either
    return x, y, logits


def test_matrix_matches_scikit_learn_over_uneven_batches(held_out):
    x, y, logits = held_out
    atlas = ConfusionAtlas()
    for s in batches(len(x)):
        atlas.update(x[s], y[s], logits[s])
    result = atlas.compute()
    counted = (y >= 0) & torch.isfinite(logits).all(dim=1)
    expected = confusion_matrix(y[counted].numpy(), logits[counted].argmax(1).numpy(), labels=range(10))
    assert result.reason is None
    np.testing.assert_array_equal(result.matrix.numpy(), expected)
    assert result.ignored == int((~counted).sum()) > 0
    assert result.samples + result.ignored == len(x)
    assert 0 < int(expected.trace()) < result.samples  # a real model: mostly right, some mistakes

    atlas.reset()  # the next validation run starts from zero
    atlas.update(x[:10], y[:10], logits[:10])
    assert atlas.compute().samples == int(counted[:10].sum())


def test_kept_examples_are_those_closest_to_the_boundary(mnist_split, random_cnn):
    """An untrained CNN makes many kinds of mistakes: per kind, the examples with the smallest
    logit(predicted) - logit(true) over all batches are kept, whatever the batch boundaries."""
    _, _, x, y = mnist_split
    logits = logits_of(random_cnn, x)
    per_pair = 3
    atlas = ConfusionAtlas(examples_per_pair=per_pair)
    for s in batches(len(x)):
        atlas.update(x[s], y[s], logits[s])
    predicted = logits.argmax(1)
    gaps = logits.gather(1, predicted[:, None])[:, 0] - logits.gather(1, y[:, None])[:, 0]
    cells = sorted({(int(a), int(b)) for a, b in zip(y, predicted, strict=True) if a != b})
    assert len(cells) > 10
    pairs = torch.tensor(cells)
    kept = atlas.examples_for(pairs)
    kept_rows = {
        (int(a), int(b), round(float(g), 5))
        for a, b, g in zip(kept.true, kept.predicted, kept.gaps, strict=True)
    }
    expected = set()
    for a, b in cells:  # brute force, one pair at a time
        rows = ((y == a) & (predicted == b)).nonzero().flatten()
        best = rows[torch.sort(gaps[rows], stable=True).indices[:per_pair]]
        expected |= {(a, b, round(float(gaps[i]), 5)) for i in best}
        for i in best:  # and the kept inputs are those samples' inputs
            match = (kept.true == a) & (kept.predicted == b) & torch.isclose(kept.gaps, gaps[i])
            assert any(torch.equal(kept.inputs[j], x[i]) for j in match.nonzero().flatten())
    assert kept_rows == expected
    assert len(kept) == len(expected)


def test_at_most_max_cells_kinds_of_mistake_are_kept_the_most_frequent(mnist_split, random_cnn):
    _, _, x, y = mnist_split
    logits = logits_of(random_cnn, x)
    atlas = ConfusionAtlas(examples_per_pair=2, max_cells=4)
    for s in batches(len(x)):
        atlas.update(x[s], y[s], logits[s])
    matrix = atlas.compute().matrix
    everything = top_confused_pairs(matrix, 100)
    kept = atlas.examples_for(everything)
    kept_cells = {(int(a), int(b)) for a, b in zip(kept.true, kept.predicted, strict=True)}
    assert len(kept_cells) == 4
    # the cells kept at the end are among the most frequent overall (counts can only settle late for a
    # cell tied with the fifth, so compare with the five most frequent)
    top5 = {tuple(p) for p in top_confused_pairs(matrix, 5).tolist()}
    assert kept_cells <= top5


def test_top_confused_pairs():
    matrix = torch.tensor([[9, 3, 0, 1], [3, 8, 0, 0], [0, 5, 7, 0], [0, 0, 0, 4]])
    assert top_confused_pairs(matrix, 3).tolist() == [[2, 1], [0, 1], [1, 0]]  # ties in row-major order
    assert top_confused_pairs(matrix, 10).tolist() == [[2, 1], [0, 1], [1, 0], [0, 3]]  # no zero cells
    assert top_confused_pairs(torch.eye(3, dtype=torch.int64) * 5, 3).shape == (0, 2)  # no mistakes
    with pytest.raises(ValueError, match="square"):
        top_confused_pairs(torch.zeros(3, 4), 2)


def test_pair_directions_match_a_per_sample_autograd_loop(mnist_split, trained_cnn):
    _, _, x, y = mnist_split
    logits = logits_of(trained_cnn, x)
    atlas = ConfusionAtlas(examples_per_pair=4)
    atlas.update(x, y, logits)
    pairs = top_confused_pairs(atlas.compute().matrix, 3)
    examples, index = pick_examples(atlas.examples_for(pairs), pairs, 4)
    assert len(pairs) == 3 and len(examples) >= 3
    # a fourth pair with no example: its direction is NaN, not a made-up number
    all_pairs = torch.cat([pairs, torch.tensor([[0, 0]])])
    model = trained_cnn.train()  # any mode: explained in eval mode, then put back
    before = snapshot(model)
    try:
        directions = pair_directions(model, examples.inputs, all_pairs, index)
        assert_same_state(before, model)
    finally:
        model.eval()
    assert directions.shape == (4, *x.shape[1:])
    assert torch.isnan(directions[3]).all()

    reference = torch.zeros(3, *x.shape[1:])
    for i in range(len(examples)):  # the slow way: one sample, one backward pass at a time
        sample = examples.inputs[i : i + 1].clone().requires_grad_(True)
        a, b = pairs[index[i]].tolist()
        log_p = torch.log_softmax(trained_cnn(sample), dim=1)[0]
        (grad,) = torch.autograd.grad(log_p[b] - log_p[a], sample)
        reference[index[i]] += grad[0]
    reference /= torch.bincount(index, minlength=3).float().view(-1, 1, 1, 1)
    assert_close(directions[:3], reference)
    # and it is what turns an a into a b: one small step along it raises log p(b) - log p(a) for the examples
    with torch.no_grad():
        step = 0.05 * directions[index] / directions[index].flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        before_gap = logit_gap(trained_cnn, examples.inputs, pairs[index])
        after_gap = logit_gap(trained_cnn, examples.inputs + step, pairs[index])
    assert (after_gap > before_gap).float().mean() >= 0.9


def logit_gap(model, x, pairs):
    log_p = torch.log_softmax(model(x), dim=1)
    return log_p.gather(1, pairs[:, 1:]) - log_p.gather(1, pairs[:, :1])


def test_bad_labels_and_class_counts_are_refused(digits_cnn, digits_split):
    _, _, x, y = digits_split
    logits = logits_of(digits_cnn, x[:32])
    atlas = ConfusionAtlas()
    bad = y[:32].clone()
    bad[3] = 10
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 9\]"):
        atlas.update(x[:32], bad, logits)
    atlas.update(x[:32], y[:32], logits)  # ignored from now on: the run's matrix cannot be trusted
    result = atlas.compute()
    assert result.matrix is None and "labels must be class indices" in result.reason

    atlas.reset()
    atlas.update(x[:32], y[:32], logits)
    with pytest.raises(ValueError, match="gave 5 class scores, but 10"):
        atlas.update(x[:32], y[:32] % 5, logits[:, :5])
    assert atlas.compute().matrix is None

    assert "no validation batch" in ConfusionAtlas().compute().reason
    with pytest.raises(ValueError, match="pairs must be a positive int"):
        ConfusionAtlas(pairs=0)


def test_inference_mode_batches_and_state(digits_cnn, digits_split):
    """Validation batches are inference tensors: the atlas's state must stay usable outside that mode."""
    _, _, x, y = digits_split
    atlas = ConfusionAtlas(examples_per_pair=2)
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()
        atlas.update(xi, yi, logits_of(digits_cnn, xi))
        atlas.compute()
        atlas.reset()
        atlas.update(xi, yi, logits_of(digits_cnn, xi))
    result = atlas.compute()
    assert not result.matrix.is_inference()
    kept = atlas.examples_for(top_confused_pairs(result.matrix, 3))
    assert len(kept) > 0 and not kept.inputs.is_inference()
    atlas.update(x[:8], y[:8], logits_of(digits_cnn, x[:8]))  # outside inference mode, after one inside
    assert atlas.compute().samples == len(x) + 8


def test_pick_examples_orders_by_pair_then_gap():
    ex = PairExamples(
        torch.arange(6.0).view(6, 1),
        torch.tensor([1, 2, 1, 1, 2, 3]),
        torch.tensor([0, 0, 0, 0, 0, 0]),
        torch.tensor([0.3, 0.2, 0.1, 0.3, 0.9, 0.0]),
    )
    chosen, index = pick_examples(ex, torch.tensor([[2, 0], [1, 0]]), per_pair=2)
    assert index.tolist() == [0, 0, 1, 1]
    assert chosen.inputs.flatten().tolist() == [1.0, 4.0, 2.0, 0.0]  # ties: the earlier first
