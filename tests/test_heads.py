"""Models that are not softmax classifiers, and the edges of the model contract: ``output="sigmoid"``
(multi-label) and ``output="raw"`` (a regression), a softmax over one output refused, shared forward
arguments declared or checked, unbatched inputs and wrong baselines refused with one clear error.

Every number is checked against plain `torch.autograd.grad`, sample by sample and class by class.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peering
from peering.errors import PeeringValueError
from tests._close import assert_close


def torch_reference(model, x, targets, quantity, **kwargs):
    """d quantity(model(x_b))[target] / d x_b for every sample and class, one autograd call each."""
    out = torch.empty((x.shape[0], targets.shape[1], *x.shape[1:]))
    for b in range(x.shape[0]):
        for k in range(targets.shape[1]):
            xi = x[b : b + 1].clone().requires_grad_(True)
            q = quantity(model(xi, **kwargs))[0, targets[b, k]]
            out[b, k] = torch.autograd.grad(q, xi)[0][0]
    return out


@pytest.fixture
def multilabel():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)).eval()


def test_sigmoid_explains_each_class_by_its_own_probability(multilabel):
    x = torch.randn(9, 6)
    exp = peering.explain(multilabel, x, top_k=3, output="sigmoid", chunk_size=4)
    logits = multilabel(x).detach()
    # top-k over the independent probabilities, reported as sigmoids (they need not sum to 1)
    assert_close(exp.probabilities, logits.sigmoid())
    assert torch.equal(exp.targets, logits.sigmoid().topk(3, dim=1).indices)
    want = torch_reference(multilabel, x, exp.targets, torch.sigmoid)
    assert_close(exp.attributions, want)
    # the softmax gradients are another thing entirely (what a multi-label head got before)
    softmax = torch_reference(multilabel, x, exp.targets, lambda s: s.softmax(dim=1))
    assert (softmax - want).norm() > 0.3 * want.norm()


def test_a_single_logit_binary_head_and_a_regression():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1)).eval()
    x = torch.randn(6, 5)
    for output in ("probability", "log_probability"):
        with pytest.raises(PeeringValueError, match="one output") as err:
            peering.explain(model, x, top_k=1, output=output)
        assert "output='sigmoid'" in str(err.value) and "output='raw'" in str(err.value)
    zero = torch.zeros(6, 1, dtype=torch.int64)
    binary = peering.explain(model, x, top_k=1, output="sigmoid")
    assert_close(binary.attributions, torch_reference(model, x, zero, torch.sigmoid))
    assert binary.attributions.abs().sum() > 0
    regression = peering.explain(model, x, output="raw", method="input_x_gradient")
    assert regression.attributions.shape == (6, 1, 5)  # top_k=1 whatever is passed: one output
    assert_close(regression.attributions, x[:, None] * torch_reference(model, x, zero, lambda s: s))
    assert regression.probabilities.isnan().all() and torch.equal(regression.targets, zero)
    with pytest.raises(PeeringValueError, match="one output"):
        peering.morph(model, x, 0, output="probability", steps=2, bounds=None)


class Prototypes(nn.Module):
    """Class scores = minus the distance of each sample to each of the class prototypes."""

    def forward(self, x, protos, temperature=1.0):
        return -torch.cdist(x, protos) / temperature


def test_a_shared_table_as_large_as_the_batch_is_never_sliced_silently():
    torch.manual_seed(2)
    x, protos = torch.randn(10, 3), torch.randn(10, 3)  # 10 prototypes next to a batch of 10
    model = Prototypes()
    for method in ("smoothgrad", "integrated_gradients"):
        named = r"forward_kwargs\['protos'\].*shared_kwargs=\['protos'\]"
        with pytest.raises(PeeringValueError, match=named):
            peering.explain(model, x, method=method, forward_kwargs={"protos": protos}, chunk_size=4)
    exp = peering.explain(
        model, x, top_k=2, output="logit", forward_kwargs={"protos": protos}, shared_kwargs=["protos"],
        chunk_size=4,
    )
    assert_close(exp.attributions, torch_reference(model, x, exp.targets, lambda s: s, protos=protos))
    with pytest.warns(UserWarning, match="did not reach"):
        res = peering.morph(model, x, 3, forward_kwargs={"protos": protos}, shared_kwargs=["protos"], steps=3,
                            bounds=None, chunk_size=4)
    assert_close(res.logits, model(res.inputs, protos))  # the table went whole into every step


def test_per_sample_arguments_are_checked_and_wrong_sizes_named():
    torch.manual_seed(3)
    x, protos = torch.randn(5, 3), torch.randn(4, 3)
    model = Prototypes()
    # a tensor of another size than the batch is shared only when declared
    named = r"forward_kwargs\['protos'\] has shape \[4, 3\].*shared_kwargs"
    with pytest.raises(PeeringValueError, match=named):
        peering.explain(model, x, forward_kwargs={"protos": protos})
    with pytest.raises(PeeringValueError, match=r"shared_kwargs names \['nope'\]"):
        peering.explain(model, x, forward_kwargs={"protos": protos}, shared_kwargs=["nope"])
    # a real per-sample argument passes the check and follows every chunk
    temperature = torch.rand(5, 1) + 0.5
    exp = peering.explain(
        model, x, output="logit", forward_kwargs={"protos": protos, "temperature": temperature},
        shared_kwargs=["protos"], chunk_size=2,
    )
    want = torch.stack([
        torch_reference(model, x[b : b + 1], exp.targets[b : b + 1], lambda s: s, protos=protos,
                        temperature=temperature[b : b + 1])[0]
        for b in range(5)
    ])
    assert_close(exp.attributions, want)


def test_a_tiny_bert_refuses_an_attention_mask_of_another_batch():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=16,
                                     num_labels=3)
    torch.manual_seed(0)
    bert = transformers.BertForSequenceClassification(config).eval()
    ids = torch.randint(1, 50, (4, 6))
    with pytest.raises(PeeringValueError, match=r"forward_kwargs\['attention_mask'\] has shape \[3, 6\]"):
        peering.explain(bert, ids, layer=bert.bert.embeddings.word_embeddings, output_fn=lambda o: o.logits,
                        forward_kwargs={"attention_mask": torch.ones(3, 6, dtype=torch.int64)})


def test_unbatched_inputs_and_wrong_baselines_are_one_clear_error():
    torch.manual_seed(4)
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)).eval()
    image = torch.rand(3, 16, 16)
    with pytest.raises(PeeringValueError, match=r"\[3, 16, 16\] look like one sample.*unsqueeze\(0\)"):
        peering.explain(conv, image)
    with pytest.raises(PeeringValueError, match=r"baseline of shape \[3, 8, 8\] does not fit.*\[3, 16, 16\]"):
        peering.explain(conv, image[None], method="integrated_gradients", baseline=torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="baseline token id 99 is not in"):
        emb = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2))
        peering.explain(emb, torch.randint(0, 10, (2, 3)), layer=emb[0], method="integrated_gradients",
                        baseline=99)


def test_ig_at_a_token_layer_matches_captum_with_the_same_baseline_token():
    """``baseline=<token id>`` at the embedding is Captum's LayerIntegratedGradients with baseline ids all
    that token; the default (the zero vector) is not, on GPT-2, whose token 0 has an embedding."""
    transformers = pytest.importorskip("transformers")
    captum_attr = pytest.importorskip("captum.attr")
    config = transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2, n_positions=16,
                                     num_labels=3, pad_token_id=0, bos_token_id=1, eos_token_id=1)
    torch.manual_seed(0)
    gpt2 = transformers.GPT2ForSequenceClassification(config).eval()

    class Logits(nn.Module):
        def __init__(self):
            super().__init__()
            self.gpt2 = gpt2

        def forward(self, ids):
            return self.gpt2(ids).logits

    model = Logits()
    ids = torch.randint(1, 40, (3, 5))
    wte = gpt2.transformer.wte
    steps = 8
    ours = peering.explain(model, ids, target=1, output="logit", layer=wte, method="integrated_gradients",
                           baseline=0, steps=steps).attributions[:, 0]
    lig = captum_attr.LayerIntegratedGradients(model, wte)
    theirs = lig.attribute(ids, baselines=torch.zeros_like(ids), target=1, n_steps=steps,
                           method="riemann_middle")
    assert_close(ours, theirs.detach())
    zero = peering.explain(model, ids, target=1, output="logit", layer=wte, method="integrated_gradients",
                           steps=steps).attributions[:, 0]
    assert (zero - theirs).norm() > 0.05 * theirs.norm()
