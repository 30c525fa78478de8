"""Text morphs: ``morph(model, ids, target, layer=embeddings)`` swaps whole tokens (HotFlip, batched), each
swap verified by a forward pass, within a budget, never touching padding, special tokens or frozen
positions; `peering.render.film_strip` draws the frames as sentences.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import peering
from peering.errors import PeeringValueError
from peering.render import film_strip, token_strip
from tests._close import assert_close

GOOD, BAD, NEUTRAL, PAD = [1, 2, 3, 4], [5, 6, 7, 8], 9, 0


class Sentiment(nn.Module):
    """A bag of words whose answer is known: class 1 (positive) as the good words outnumber the bad ones;
    ``attention_mask`` zeroes the padding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 2)
        weight = torch.zeros(12, 2)
        weight[GOOD, 0], weight[BAD, 1] = 1.0, 1.0
        weight[10:, 0] = 0.5  # tokens 10 and 11 are mildly positive: a swap to them is worth less
        with torch.no_grad():
            self.embed.weight.copy_(weight)
        self.head = nn.Linear(2, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[-2.0, 2.0], [2.0, -2.0]]))
            self.head.bias.zero_()

    def forward(self, ids, attention_mask=None):
        e = self.embed(ids)
        if attention_mask is not None:
            e = e * attention_mask[..., None]
        return self.head(e.sum(dim=1))


def test_swaps_reach_the_target_within_the_budget_and_leave_padding_alone():
    model = Sentiment()
    ids = torch.tensor([
        [PAD, PAD, 5, 6, 9, 9],  # left padding: two bad words
        [5, 9, 9, 9, PAD, PAD],  # right padding
        [5, 6, 7, 8, 5, 9],  # five bad words, but a budget of 2 swaps
    ])
    mask = (ids != PAD).long()
    with pytest.warns(UserWarning, match="1 of 3 text morphs did not reach.*budget 2 tokens"):
        res = peering.morph(model, ids, 1, layer=model.embed, forward_kwargs={"attention_mask": mask},
                            budget=2, confidence=0.9, exclude_ids=[PAD], steps=10)
    final = res.inputs
    assert final.dtype == torch.int64 and res.frames.shape[1:] == ids.shape
    assert torch.equal(final[mask == 0], ids[mask == 0])  # padding never changes
    assert ((final != ids).sum(dim=1) <= 2).all() and torch.equal(res.distance, (final != ids).sum(1).float())
    assert not torch.isin(final[mask == 1], torch.tensor([PAD])).any()  # the excluded token never put in
    # verified: the logits are the model's on the final ids, and the first two reach the target
    assert_close(res.logits, model(final, attention_mask=mask))
    assert res.success.tolist() == [True, True, False]
    # the best swap is taken: a bad word becomes a fully good one (not token 10 or 11, worth half)
    assert torch.isin(final[0, 2:4], torch.tensor(GOOD)).any()
    assert torch.equal(res.padding, mask == 0)


def test_frozen_positions_and_a_sigmoid_head():
    model = Sentiment()
    ids = torch.tensor([[5, 6, 9, 9, 9]])
    frozen = torch.tensor([[True, True, False, False, False]])
    res = peering.morph(model, ids, 1, layer=model.embed, frozen=frozen, output="sigmoid", confidence=0.8,
                        steps=5)
    assert torch.equal(res.inputs[0, :2], ids[0, :2])
    assert res.output == "sigmoid" and bool(res.success[0])
    assert float(model(res.inputs)[0, 1].sigmoid().detach()) >= 0.8


def test_bad_text_morph_arguments_name_themselves():
    model = Sentiment()
    ids = torch.tensor([[5, 6, 9, 9]])
    with pytest.raises(PeeringValueError, match="budget"):
        peering.morph(model, ids, 1, layer=model.embed, budget=0)
    with pytest.raises(PeeringValueError, match="smoothing"):
        peering.morph(model, ids, 1, layer=model.embed, smoothing=0.5)
    with pytest.raises(PeeringValueError, match="frozen"):
        peering.morph(model, ids, 1, layer=model.embed, frozen=torch.ones(2, 4, dtype=torch.bool))


@pytest.mark.filterwarnings("ignore:2 of 2 text morphs did not reach")
@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_a_tiny_transformer_is_morphed_and_drawn(kind, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "bert":
        config = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, intermediate_size=32,
                                         max_position_embeddings=16, num_labels=2)
        net = transformers.BertForSequenceClassification(config).eval()
        ids = torch.tensor([[2, 11, 12, 13, 3, 0, 0], [2, 14, 15, 16, 17, 18, 3]])
        mask = (ids != 0).long()
    else:
        config = transformers.GPT2Config(vocab_size=30, n_embd=16, n_layer=1, n_head=2, n_positions=16,
                                         num_labels=2, pad_token_id=0, bos_token_id=1, eos_token_id=1)
        net = transformers.GPT2ForSequenceClassification(config).eval()
        ids = torch.tensor([[0, 0, 11, 12, 13, 14, 15], [16, 17, 18, 19, 20, 21, 22]])  # left padding
        mask = (ids != 0).long()
    embed = net.get_input_embeddings()
    base = net(ids, attention_mask=mask).logits
    target = (base.argmin(dim=1)).tolist()  # each sample's less likely class
    res = peering.morph(net, ids, torch.tensor(target), layer=embed, output_fn=lambda o: o.logits,
                        forward_kwargs={"attention_mask": mask}, exclude_ids=[0, 1, 2, 3], steps=6,
                        confidence=None)
    assert torch.equal(res.inputs[mask == 0], ids[mask == 0])
    assert_close(res.logits, net(res.inputs, attention_mask=mask).logits)
    gained = res.logits.log_softmax(1).gather(1, res.targets[:, None]) - base.log_softmax(1).gather(
        1, res.targets[:, None])
    assert (gained >= 0).all() and (gained.sum() > 0)  # every kept swap raised the target
    strip = film_strip(res, 0, tokenizer=lambda ids: [f"w{i}" for i in ids])
    assert strip.size == token_strip(res, 0, tokenizer=lambda ids: [f"w{i}" for i in ids]).size
    pixels = np.asarray(strip)
    assert pixels.shape[0] > 40 and (pixels != 255).any()
