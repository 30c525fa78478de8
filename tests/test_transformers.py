"""`explain` and `morph` on real `transformers` models: per-sample masks (`forward_kwargs`) that follow
every chunk, noisy copy and path point, and attributions at a layer (`layer=`) for integer token ids.

The models are built from tiny configs with random weights (nothing is downloaded). Every number is checked
against a per-sample, per-class `torch.autograd.grad` reference that runs each sample alone with its own
mask, with a batch larger than `chunk_size` so that chunking is exercised.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peering
from peering._model import transform
from tests._close import assert_close
from tests._state import assert_same_state, snapshot

transformers = pytest.importorskip("transformers")

B, L, CHUNK = 10, 12, 4
LENGTHS = [12, 5, 8, 12, 3, 9, 12, 6, 7, 10]
NOISE, N_NOISY, SEED, IG_STEPS = 0.2, 3, 5, 4


@pytest.fixture(scope="module")
def bert():
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=5,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return transformers.BertForSequenceClassification(config).eval()


@pytest.fixture(scope="module")
def tokens():
    """Token ids [B, L] padded with 0 after each sample's length, and the attention mask."""
    gen = torch.Generator().manual_seed(1)
    mask = (torch.arange(L)[None] < torch.tensor(LENGTHS)[:, None]).long()
    ids = torch.randint(1, 100, (B, L), generator=gen) * mask
    return ids, mask


class ByEmbeddings(nn.Module):
    """BERT fed `inputs_embeds` (what its word-embedding layer outputs) instead of token ids."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, embeds, attention_mask):
        return self.bert(inputs_embeds=embeds, attention_mask=attention_mask).logits


def reference(model, x, mask, targets, output, points=None, combine=None):
    """Each sample alone, with its own mask row, each class by its own torch.autograd.grad."""
    out = torch.empty((x.shape[0], targets.shape[1], *x.shape[1:]))
    for b in range(x.shape[0]):
        for k in range(targets.shape[1]):
            grads = []
            for p in points(b) if points else x[b : b + 1]:
                xi = p.unsqueeze(0).clone().requires_grad_(True)
                q = transform(model(xi, attention_mask=mask[b : b + 1]), output)[0, targets[b, k]]
                grads.append(torch.autograd.grad(q, xi)[0][0])
            g = torch.stack(grads).mean(0)
            out[b, k] = combine(b, g) if combine else g
    return out


def method_reference(method, model, x, mask, targets, output):
    """The reference for each method: where the gradients are taken, and how they are combined."""
    if method == "gradient":
        return reference(model, x, mask, targets, output)
    if method == "input_x_gradient":
        return reference(model, x, mask, targets, output, combine=lambda b, g: x[b] * g)
    if method == "smoothgrad":  # the same draws as SmoothGrad's own generator: one [B, ...] set at a time
        gen = torch.Generator().manual_seed(SEED)
        noise = torch.stack([torch.randn(x.shape, generator=gen) for _ in range(N_NOISY)])
        sigma = NOISE * (x.flatten(1).amax(1) - x.flatten(1).amin(1))
        return reference(model, x, mask, targets, output, points=lambda b: x[b] + sigma[b] * noise[:, b])
    alphas = (torch.arange(IG_STEPS) + 0.5) / IG_STEPS
    shape = (-1, *[1] * (x.ndim - 1))
    return reference(
        model, x, mask, targets, output,
        points=lambda b: alphas.view(shape) * x[b], combine=lambda b, g: x[b] * g,
    )


OPTIONS = {
    "gradient": {},
    "input_x_gradient": {},
    "smoothgrad": {"noise_level": NOISE, "n_samples": N_NOISY, "seed": SEED},
    "integrated_gradients": {"steps": IG_STEPS},
}


@pytest.mark.parametrize("method", list(OPTIONS))
def test_masks_follow_their_samples_through_chunks_noise_and_paths(bert, tokens, method):
    ids, mask = tokens
    model = ByEmbeddings(bert)
    with torch.no_grad():
        x = bert.bert.embeddings.word_embeddings(ids)
    exp = peering.explain(
        model, x, top_k=2, method=method, output="log_probability", chunk_size=CHUNK,
        forward_kwargs={"attention_mask": mask}, **OPTIONS[method],
    )
    with torch.no_grad():
        alone = torch.cat([model(x[b : b + 1], attention_mask=mask[b : b + 1]) for b in range(B)])
    assert_close(exp.logits, alone)
    assert torch.equal(exp.targets, alone.topk(2, dim=1).indices)
    ref = method_reference(method, model, x, mask, exp.targets, "log_probability")
    assert_close(exp.attributions, ref)
    assert exp.attributions.abs().max() > 1e-3  # not trivially zero


@pytest.mark.parametrize("strategy", ["per_class", "vmap"])
def test_masks_with_both_gradient_strategies(bert, tokens, strategy):
    ids, mask = tokens
    model = ByEmbeddings(bert)
    with torch.no_grad():
        x = bert.bert.embeddings.word_embeddings(ids)
    exp = peering.explain(model, x, top_k=5, grad_strategy=strategy, chunk_size=CHUNK,
                          forward_kwargs={"attention_mask": mask})
    assert_close(exp.attributions, reference(model, x, mask, exp.targets, "probability"))


@pytest.mark.parametrize("method", list(OPTIONS))
def test_layer_attributions_equal_the_inputs_embeds_reference(bert, tokens, method):
    """Token ids explained at the word embeddings == the same model fed those embeddings."""
    ids, mask = tokens
    before = snapshot(bert)
    exp = peering.explain(
        bert, ids, top_k=2, method=method, output="logit", chunk_size=CHUNK,
        forward_kwargs={"attention_mask": mask}, output_fn=lambda o: o.logits,
        layer=bert.bert.embeddings.word_embeddings, **OPTIONS[method],
    )
    assert_same_state(before, bert)
    assert exp.attributions.shape == (B, 2, L, 32)
    with torch.no_grad():
        x = bert.bert.embeddings.word_embeddings(ids)
    ref = method_reference(method, ByEmbeddings(bert), x, mask, exp.targets, "logit")
    assert_close(exp.attributions, ref)
    assert exp.attributions.abs().max() > 1e-3


def test_padded_tokens_get_no_attribution(bert, tokens):
    """BERT's attention mask removes the padded positions from every other token's view, and the [CLS]
    head reads nothing from them, so the gradient there is exactly zero: a mask paired with the wrong
    sample would break this."""
    ids, mask = tokens
    exp = peering.explain(bert, ids, forward_kwargs={"attention_mask": mask}, output_fn=lambda o: o.logits,
                          layer=bert.bert.embeddings.word_embeddings, chunk_size=CHUNK)
    padded = (mask == 0)[:, None, :, None].expand_as(exp.attributions)
    assert (exp.attributions[padded] == 0).all()
    assert (exp.attributions[~padded] != 0).float().mean() > 0.9


def test_morph_with_masks_equals_each_sample_alone(bert, tokens):
    ids, mask = tokens
    model = ByEmbeddings(bert)
    with torch.no_grad():
        x = bert.bert.embeddings.word_embeddings(ids)
    target = torch.arange(B) % 5
    res = peering.morph(model, x, target, steps=4, bounds=None, chunk_size=CHUNK,
                        forward_kwargs={"attention_mask": mask})
    for b in (0, 4, 9):  # a few samples, each alone: the batched walk must match
        one = peering.morph(model, x[b : b + 1], int(target[b]), steps=4, bounds=None,
                            forward_kwargs={"attention_mask": mask[b : b + 1]})
        assert_close(res.inputs[b], one.inputs[0])
        assert res.steps[b] == one.steps[0]


def test_token_ids_need_a_layer(bert, tokens):
    ids, mask = tokens
    with pytest.raises(TypeError, match="layer=<the embedding module>"):
        peering.explain(bert, ids, forward_kwargs={"attention_mask": mask}, output_fn=lambda o: o.logits)


def test_bad_layers_are_clear_errors(bert, tokens):
    ids, mask = tokens
    kw = {"forward_kwargs": {"attention_mask": mask}, "output_fn": lambda o: o.logits}
    with pytest.raises(ValueError, match="not a submodule"):
        peering.explain(bert, ids, layer=nn.Linear(2, 2), **kw)
    with pytest.raises(TypeError, match="returns a .*not a tensor"):
        peering.explain(bert, ids, layer=bert.bert, **kw)  # returns a ModelOutput
    model = nn.ModuleDict({"used": nn.Embedding(100, 3), "spare": nn.Embedding(100, 3)})
    model.forward = lambda ids: model["used"](ids).sum(1)  # "spare" is never called
    with pytest.raises(ValueError, match="was not called by the model's forward"):
        peering.explain(model, ids, layer=model["spare"])
    with pytest.raises(TypeError, match="forward_kwargs must be a mapping"):
        peering.explain(bert, ids, forward_kwargs=[mask], output_fn=lambda o: o.logits,
                        layer=bert.bert.embeddings.word_embeddings)
