"""`peering.render.tokens`: per-token scores drawn as coloured text (PNG and HTML)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from peering.render import token_html, token_image, token_scores
from peering.render._draw import _BACKGROUND, _band_height, _font, _lut_np


def lut_index(rgb: np.ndarray) -> int:
    return int(((_lut_np().astype(float) - rgb.astype(float)) ** 2).sum(1).argmin())


def box_colours(image) -> list[np.ndarray]:
    """The background colour of each token box on the first line of text, left to right."""
    a = np.array(image)
    coloured = (a != _BACKGROUND).any(axis=2)
    rows = np.nonzero(coloured[:, 10:].sum(axis=1) > a.shape[1] // 4)[0]  # the first line of boxes
    y = rows[0] + 1  # just inside the boxes' top padding: no glyph reaches it
    line = coloured[y]
    starts = np.nonzero(np.diff(np.concatenate([[0], line.astype(int)])) == 1)[0]
    return [a[y, x + 1] for x in starts]


def test_token_colours_follow_the_scores_in_order():
    tokens = [["one", "two", "three", "four", "five", "six", "seven"]]
    scores = torch.linspace(-1, 1, 7).reshape(1, 1, 7)
    colours = box_colours(token_image(scores, tokens))
    assert len(colours) == 7
    idx = [lut_index(c) for c in colours]
    assert idx == sorted(idx) and idx[0] == 0 and idx[-1] == 255 and abs(idx[3] - 127.5) <= 1
    reversed_idx = [lut_index(c) for c in box_colours(token_image(-scores, tokens))]
    assert reversed_idx == idx[::-1]
    html = token_html(scores, tokens)
    backgrounds = re.findall(r"background:#([0-9a-f]{6})", html)
    assert [lut_index(np.frombuffer(bytes.fromhex(h), np.uint8)) for h in backgrounds] == idx
    assert re.findall(r">(\w+)</span>", html) == tokens[0]


def test_layer_attributions_are_reduced_by_a_signed_sum():
    attributions = torch.randn(2, 3, 5, 16)
    assert torch.equal(token_scores(attributions), attributions.sum(-1))
    assert torch.equal(token_scores(attributions, reduce="norm"), attributions.norm(dim=-1))
    from_layer = np.array(token_image(attributions, [["a", "b", "c", "d", "e"]] * 2))
    from_scores = np.array(token_image(attributions.sum(-1), [["a", "b", "c", "d", "e"]] * 2))
    assert np.array_equal(from_layer, from_scores)
    with pytest.raises(ValueError, match="reduce"):
        token_scores(attributions, reduce="mean")


def test_a_real_tokenizer_padding_and_word_pieces(tmp_path):
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "act", "##ing", "was", "great"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(str(tmp_path / "vocab.txt"))
    ids = tokenizer(["the acting was great"], padding="max_length", max_length=10, return_tensors="pt")[
        "input_ids"
    ]
    assert int((ids == tokenizer.pad_token_id).sum()) > 0
    scores = torch.linspace(-1, 1, 10).reshape(1, 1, 10)
    html = token_html(scores, ids, tokenizer=tokenizer)
    assert re.findall(r">([^<]+)</span>", html) == ["[CLS]", "the", "act", "ing", "was", "great", "[SEP]"]
    assert "act</span><span" in html  # "##ing" joins "act" without a space
    assert token_image(scores, ids, tokenizer=tokenizer).height > 0
    with pytest.raises(TypeError, match="tokenizer"):
        token_image(scores, ids)


def test_text_is_escaped_and_saturation_is_said():
    html = token_html(torch.ones(1, 1, 2), [["<b>", "&"]])
    assert "<b>" not in html and "&lt;b&gt;" in html and "&amp;" in html
    scores = torch.randn(1, 2, 3)
    kw = dict(targets=torch.tensor([[0, 1]]), probabilities=torch.tensor([[0.999, 0.001]]))
    plain = token_image(scores, [["a", "b", "c"]], **kw, output="logit")
    saturated = token_image(scores, [["a", "b", "c"]], **kw, output="probability")
    assert saturated.height > plain.height
    assert "saturated" in token_html(scores, [["a", "b", "c"]], **kw, output="probability")
    with pytest.raises(ValueError, match="4 tokens for 3 scores"):
        token_image(scores, [["a", "b", "c", "d"]])


def test_a_tiny_bert_explained_at_its_embeddings_and_drawn(tmp_path):
    """The whole path on a real (tiny, random) BERT: explain at the word embeddings with input x gradient,
    reduce to token scores, draw them with a real tokenizer's strings, padding dropped."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    import peering

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "film", "was", "not", "good", "bad", "act", "##ing"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(str(tmp_path / "vocab.txt"))
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, num_labels=2,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BertForSequenceClassification(config).eval()
    batch = tokenizer(["the film was not good", "bad acting"], padding=True, return_tensors="pt")
    exp = peering.explain(
        model,
        batch["input_ids"],
        method="input_x_gradient",
        output="logit",
        layer=model.bert.embeddings.word_embeddings,
        forward_kwargs={"attention_mask": batch["attention_mask"]},
        output_fn=lambda out: out.logits,
    )
    assert exp.attributions.shape == (2, 2, batch["input_ids"].shape[1], 16)  # [B, K, L, H]
    scores = token_scores(exp.attributions)
    html = token_html(exp.attributions, batch["input_ids"], tokenizer=tokenizer, targets=exp.targets,
                      probabilities=exp.probabilities)  # fmt: skip
    spans = re.findall(r'title="([^"]+)">([^<]+)</span>', html)
    words = ["[CLS]", "the", "film", "was", "not", "good", "[SEP]", "[CLS]", "bad", "act", "ing", "[SEP]"]
    first = [w for _, w in spans[:7]]
    assert first == words[:7]  # sample 0, class 0
    second_sample = [w for _, w in spans[14:19]]
    assert second_sample == words[7:12]  # "##ing" joined, the padding dropped
    assert len(spans) == 2 * 7 + 2 * 5
    assert [float(v) for v, _ in spans[:7]] == pytest.approx(scores[0, 0, :7].tolist(), rel=1e-2, abs=1e-3)
    image = token_image(exp.attributions, batch["input_ids"], tokenizer=tokenizer)
    assert image.height > 40 and image.width == 720


def test_token_panels_leave_padding_out_wherever_it_is_and_stack():
    """Left and right padding (an attention mask) are both left out: each panel's first line of boxes has
    the real tokens' colours in order; all panels have one size; without a tokenizer the ids are drawn
    and the panel says so."""
    from peering.render import token_panels

    scores = torch.linspace(-1, 1, 4).repeat(2, 2, 1)  # [2 samples, 2 classes, 4 positions]
    scores = torch.cat([torch.zeros(2, 2, 2), scores], dim=2)  # 2 padded positions first ...
    scores[1] = scores[1].roll(-2, dims=1)  # ... for sample 0; last for sample 1
    real = [100000005, 100000006, 100000007, 100000008]  # long ids: their boxes span the line as words do
    ids = torch.tensor([[0, 0, *real], [*real, 0, 0]])
    mask = (ids != 0).long()
    words = dict(zip(real, ["wonderful", "terrible", "performances", "storyline"], strict=True))
    common = {
        "class_a": torch.tensor([3, 3]),
        "class_b": torch.tensor([1, 1]),
        "prob_a": torch.tensor([0.5, 0.5]),
        "prob_b": torch.tensor([0.4, 0.4]),
        "labels": torch.tensor([3, -1]),
        "mask": mask,
    }
    panels = token_panels(scores, ids, tokenizer=lambda row: [words[i] for i in row], **common)
    assert panels.shape[0] == 2 and panels.dtype == torch.uint8
    for panel in panels.numpy():
        idx = [lut_index(c) for c in box_colours(panel)]
        assert len(idx) == 4 and idx == sorted(idx) and idx[0] == 0 and idx[-1] == 255
    as_ids = token_panels(scores, ids, **common)
    assert as_ids.shape == panels.shape
    top = 4 + _band_height(_font()[0])  # below the label line, which now has the note
    for panel in as_ids.numpy():
        assert [lut_index(c) for c in box_colours(panel[top:])] == [0, 85, 170, 255]
    assert not torch.equal(as_ids[0, :20], panels[0, :20])  # the label line says "tokens shown as ids"
    with pytest.raises(ValueError, match=r"\[N, 2, L\]"):
        token_panels(scores[:, :1], ids, **common)


@pytest.mark.parametrize("where", ["left", "right", "both"])
def test_every_token_picture_reads_each_token_its_own_score_wherever_the_padding_is(tmp_path, where):
    """The words and their scores line up whatever side the padding is on: ids with a real tokenizer (its
    pad id left out), ids with a mask, strings of only the real tokens with a mask. The issue's case:
    ids [0, 0, 0, 11, 12, 13] with scores [0, 0, 0, +1, -1, +0.5] showed every word at +0."""
    from transformers import BertTokenizer

    from peering.render import token_panels
    from peering.render.tokens import unpadded_tokens

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "good", "bad", "film"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(str(tmp_path / "vocab.txt"))
    real, values = [4, 5, 6], [1.0, -1.0, 0.5]
    pad = {"left": (3, 0), "right": (0, 3), "both": (1, 2)}[where]
    ids = torch.tensor([[0] * pad[0] + real + [0] * pad[1]])
    scores = torch.tensor([[[0.0] * pad[0] + values + [0.0] * pad[1]]])
    mask = (ids != 0).long()
    expected = [("+1", "good"), ("-1", "bad"), ("+0.5", "film")]
    for kwargs in ({"tokenizer": tokenizer}, {"tokenizer": tokenizer, "mask": mask}):
        html = token_html(scores, ids, **kwargs)
        assert re.findall(r'title="([^"]+)">([^<]+)</span>', html) == expected
        idx = [lut_index(c) for c in box_colours(token_image(scores, ids, width=300, **kwargs))]
        assert idx[0] == 255 and idx[1] == 0 and 160 < idx[2] < 224  # +1 bright, -1 dark, +0.5 between
    html = token_html(scores, [["good", "bad", "film"]], mask=mask)
    assert re.findall(r'title="([^"]+)">([^<]+)</span>', html) == expected
    with pytest.raises(ValueError, match="mask="):  # fewer strings than positions: where are they?
        token_html(scores, [["good", "bad", "film"]])
    two = scores.expand(1, 2, -1)
    words, kept = unpadded_tokens(two, ids, tokenizer)  # the tokenizer's pad id, no mask
    assert words == [["good", "bad", "film"]] and kept[0][0].tolist() == values
    panels = token_panels(two, ids, class_a=torch.tensor([1]), class_b=torch.tensor([0]),
                          prob_a=torch.tensor([0.5]), prob_b=torch.tensor([0.4]), labels=None,
                          tokenizer=tokenizer, width=300)  # fmt: skip
    assert panels.shape[0] == 1  # drawn from unpadded_tokens' words and scores, checked above


def test_token_pictures_say_what_was_differentiated_and_what_the_colours_mean():
    scores = torch.tensor([[[1.0, -1.0, 0.0]]])
    page = str(token_html(scores, [["good", "bad", "film"]], output="sigmoid", method="integrated_gradients"))
    legend = re.search(r'<p class="peering-tokens-legend">(.*?)</p>', page)
    assert legend is not None and "integrated gradients of σ" in legend.group(1)
    assert "bright yellow: for it" in legend.group(1)
    bare = np.asarray(token_image(scores, [["good", "bad", "film"]], width=400))
    assert has_colour_bar(bare)  # the legend under the text


def has_colour_bar(image: np.ndarray) -> bool:
    """Whether a row of the picture holds the diverging map's colour bar, from -scale to +scale."""
    ramp = _lut_np()[np.clip(np.floor((np.linspace(-1.0, 1.0, 160) + 1.0) * 128.0), 0, 255).astype(np.intp)]
    for row in image:
        starts = np.flatnonzero((row == ramp[0]).all(axis=-1))
        if any(x + 160 <= len(row) and np.array_equal(row[x : x + 160], ramp) for x in starts):
            return True
    return False
