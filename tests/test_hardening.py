"""Odd models, odd inputs: each case either works or gives an error that says what to do (issue #5)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import peering
from tests._close import assert_close
from tests._state import assert_same_state, snapshot


@pytest.fixture(scope="module")
def digit_batch(digits_split):
    return digits_split[2][:16]


# ---------- model outputs that are not a plain tensor ----------


class Wrapped(nn.Module):
    """A digits CNN whose forward returns its logits inside another structure."""

    def __init__(self, inner: nn.Module, kind: str):
        super().__init__()
        self.inner, self.kind = inner, kind

    def forward(self, x):
        logits = self.inner(x)
        if self.kind == "tuple":
            return logits, x.mean()
        if self.kind == "dict":
            return {"logits": logits, "hidden": x}
        return SimpleNamespace(logits=logits, loss=None)  # Hugging Face style


@pytest.mark.parametrize(
    ("kind", "hint", "output_fn"),
    [
        ("tuple", r"output_fn=lambda out: out\[0\]", lambda out: out[0]),
        ("dict", r"output_fn=lambda out: out\['logits'\]", lambda out: out["logits"]),
        ("object", r"output_fn=lambda out: out.logits", lambda out: out.logits),
    ],
)
def test_structured_outputs_need_and_accept_output_fn(digits_cnn, digit_batch, kind, hint, output_fn):
    model = Wrapped(digits_cnn, kind)
    with pytest.raises(TypeError, match=hint):
        peering.explain(model, digit_batch)
    with pytest.raises(TypeError, match=hint):
        peering.morph(model, digit_batch, 3, steps=2)
    exp = peering.explain(model, digit_batch, output_fn=output_fn)
    plain = peering.explain(digits_cnn, digit_batch)
    assert torch.equal(exp.attributions, plain.attributions)
    res = peering.morph(model, digit_batch, 3, steps=10, output_fn=output_fn)
    assert torch.equal(res.inputs, peering.morph(digits_cnn, digit_batch, 3, steps=10).inputs)


def test_output_fn_returning_garbage(digits_cnn, digit_batch):
    with pytest.raises(TypeError, match="output_fn must return a tensor"):
        peering.explain(Wrapped(digits_cnn, "dict"), digit_batch, output_fn=lambda out: out.keys())


# ---------- layouts, dtypes, compilation ----------


def test_flat_and_image_layouts_of_the_same_model(digits_mlp, digit_batch):
    """[B, 1, 8, 8] through a Flatten and [B, 64] directly give the same attributions, reshaped."""
    image_model = nn.Sequential(nn.Flatten(), digits_mlp)
    a = peering.explain(image_model, digit_batch)
    b = peering.explain(digits_mlp, digit_batch.flatten(1))
    assert torch.equal(a.targets, b.targets)
    assert_close(a.attributions.flatten(2), b.attributions)


def test_channels_last(digits_cnn, digit_batch):
    model = copy.deepcopy(digits_cnn).to(memory_format=torch.channels_last)
    x = digit_batch.to(memory_format=torch.channels_last)
    a = peering.explain(model, x)
    b = peering.explain(digits_cnn, digit_batch)
    assert_close(a.attributions, b.attributions)
    assert peering.morph(model, x, 4, steps=10).inputs.shape == x.shape


def test_float64_model(digits_cnn, digit_batch):
    model = copy.deepcopy(digits_cnn).double()
    exp = peering.explain(model, digit_batch.double())
    assert exp.attributions.dtype == torch.float64
    assert_close(exp.attributions.float(), peering.explain(digits_cnn, digit_batch).attributions)
    assert peering.morph(model, digit_batch.double(), 4, steps=5).inputs.dtype == torch.float64
    with pytest.raises(TypeError, match=r"inputs are torch.float32 but the model's parameters are "
                                        r"torch.float64.*inputs.to\(torch.float64\)"):
        peering.explain(model, digit_batch)


def test_bf16_autocast_on_cpu(digits_cnn, digit_batch):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        exp = peering.explain(digits_cnn, digit_batch)
        res = peering.morph(digits_cnn, digit_batch, 4, steps=30, confidence=None, smoothing=0)
    ref = peering.explain(digits_cnn, digit_batch)
    assert exp.attributions.dtype == torch.float32 and exp.logits.dtype == torch.float32
    assert torch.isfinite(exp.attributions).all()
    # bf16 has 8 bits of mantissa: close to the float32 answer, not equal
    cos = nn.functional.cosine_similarity(exp.attributions.flatten(1), ref.attributions.flatten(1))
    assert cos.min() > 0.9
    assert res.success.float().mean() >= 0.8


def _batch_norm_cnn():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AvgPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10),
    )
    with torch.no_grad():  # running statistics of its own, as after training
        model.train()(torch.rand(64, 1, 8, 8))
    return model.eval()


class CountingBackend:
    """A torch.compile backend that counts the graphs it is asked to compile and runs them as they are."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        return graph_module.forward


@pytest.mark.parametrize(
    ("method", "k"), [("gradient", 2), ("gradient", 6), ("smoothgrad", 2), ("integrated_gradients", 6)]
)
def test_compiled_models_give_the_eager_numbers(digit_batch, k, method):
    """A batch-norm CNN compiled whole and compiled as a submodule: explain and morph give the eager model's
    numbers at every batch size (torch 2.13's compiled graphs gave all-zero input gradients at some), and
    nothing is compiled on peering's behalf; the caller's compiled model still compiles afterwards."""
    eager = _batch_norm_cnn()
    backend = CountingBackend()
    whole = torch.compile(copy.deepcopy(eager), backend=backend)
    inner = copy.deepcopy(eager)
    inner[4] = torch.compile(inner[4], backend=backend)
    x = torch.cat([digit_batch, digit_batch.flip(-1)])[:13]
    options = {"smoothgrad": {"n_samples": 3}, "integrated_gradients": {"steps": 4}}.get(method, {})
    for model in (whole, inner):
        for size in (1, 5, 13):
            exp = peering.explain(model, x[:size], top_k=k, method=method, chunk_size=4, **options)
            ref = peering.explain(eager, x[:size], top_k=k, method=method, chunk_size=4, **options)
            assert torch.equal(exp.targets, ref.targets)
            assert_close(exp.attributions, ref.attributions)
            assert exp.attributions.abs().max() > 0
        res = peering.morph(model, x, 3, steps=5, chunk_size=4)
        assert_close(res.inputs, peering.morph(eager, x, 3, steps=5, chunk_size=4).inputs)
    assert backend.graphs == 0  # run eagerly: nothing compiled for peering
    whole(x)
    assert backend.graphs == 1  # the stance was put back: the user's compiled model compiles as before


def test_compiled_model_with_inductor(digits_mlp, digit_batch):
    x = digit_batch.flatten(1)
    compiled = torch.compile(copy.deepcopy(digits_mlp))
    exp = peering.explain(compiled, x)
    ref = peering.explain(digits_mlp, x)
    assert torch.equal(exp.targets, ref.targets)
    assert_close(exp.attributions, ref.attributions)
    assert peering.morph(compiled, x, 2, steps=5, bounds=None).inputs.shape == x.shape


# ---------- frozen models, modes, contexts ----------


def test_frozen_model_in_eval_mode(digits_cnn, digit_batch):
    model = copy.deepcopy(digits_cnn).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    before = snapshot(model)
    exp = peering.explain(model, digit_batch)
    assert_same_state(before, model)
    assert_close(exp.attributions, peering.explain(digits_cnn, digit_batch).attributions)


def test_batch_norm_in_training_mode_is_explained_in_eval_mode(digit_batch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))
    with torch.no_grad():
        model(torch.rand(64, 1, 8, 8))  # running statistics that differ from any one batch's
    model.train()
    before = snapshot(model)
    stats = model[2].running_mean.clone(), model[2].num_batches_tracked.clone()
    one = peering.explain(model, digit_batch[:1])  # a batch of one would fail in training mode
    many = peering.explain(model, digit_batch)
    assert_same_state(before, model)
    assert torch.equal(model[2].running_mean, stats[0])
    assert torch.equal(model[2].num_batches_tracked, stats[1])
    assert model.training
    # eval mode makes each sample independent of the rest of the batch
    assert_close(one.attributions[0], many.attributions[0])


def test_inference_mode_inputs_work(digits_cnn, digit_batch):
    with torch.inference_mode():
        x = digit_batch.clone()  # an inference tensor
        exp = peering.explain(digits_cnn, x)
        res = peering.morph(digits_cnn, x, 1, steps=5)
    assert not exp.attributions.is_inference() and exp.attributions.abs().max() > 0
    assert res.frames.shape[0] == 6


# ---------- batch sizes ----------


def test_batch_of_one_and_empty_batches(digits_cnn, digit_batch):
    one = peering.explain(digits_cnn, digit_batch[:1], top_k=3)
    assert one.attributions.shape == (1, 3, 1, 8, 8)
    empty = peering.explain(digits_cnn, digit_batch[:0], top_k=3)
    assert empty.attributions.shape == (0, 3, 1, 8, 8) and empty.valid.shape == (0,)
    res = peering.morph(digits_cnn, digit_batch[:0], 3)
    assert res.inputs.shape == (0, 1, 8, 8) and res.frames.shape == (101, 0, 1, 8, 8)
    assert res.success.shape == (0,) and res.steps.shape == (0,)
    sel = peering.select_confused(torch.zeros(0, 10))
    assert len(sel) == 0 and sel.num_candidates == 0


def test_nonfinite_logits_are_skipped(digits_cnn, digit_batch):
    """A model that produces Inf for some samples: those are skipped with one warning."""

    class Explodes(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = digits_cnn

        def forward(self, x):
            logits = self.inner(x)
            bad = x.flatten(1)[:, 0] > 0.5  # no digit has ink in the top-left pixel; we add it
            return logits / (~bad).float()[:, None]  # +-Inf for the bad rows only

    x = digit_batch.clone()
    x[[2, 5], 0, 0, 0] = 1.0
    with pytest.raises(ValueError, match=r"logits are NaN or Inf for batch indices \[2, 5\]"):
        peering.explain(Explodes(), x)
    with pytest.warns(RuntimeWarning, match="skipped 2 sample"):
        exp = peering.explain(Explodes(), x, nonfinite="skip")
    assert exp.valid.tolist() == [i not in (2, 5) for i in range(16)]
    assert torch.isfinite(exp.attributions[exp.valid]).all()
    assert (exp.targets[~exp.valid] == -1).all()
    sel = peering.select_confused(exp.logits, max_difference=100.0)
    assert not set(sel.indices.tolist()) & {2, 5}


# ---------- property-based: shapes, dtypes, batch sizes, K ----------


def small_model(kind: str, shape: tuple[int, ...], classes: int, dtype: torch.dtype) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if kind == "flat":
            model = nn.Sequential(nn.Linear(shape[0], 8), nn.Tanh(), nn.Linear(8, classes))
        else:
            c, h, w = shape
            model = nn.Sequential(nn.Conv2d(c, 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
                                  nn.Linear(3 * h * w, classes))
    return model.to(dtype)


shapes = st.one_of(
    st.tuples(st.integers(1, 20)).map(lambda s: ("flat", s)),
    st.tuples(st.sampled_from([1, 3]), st.integers(3, 7), st.integers(3, 7)).map(lambda s: ("image", s)),
)
PROPERTY = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(
    spec=shapes,
    batch=st.integers(0, 6),
    classes=st.integers(2, 7),
    data=st.data(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    method=st.sampled_from(["gradient", "input_x_gradient", "smoothgrad", "integrated_gradients"]),
    output=st.sampled_from(["probability", "log_probability", "logit"]),
    train_mode=st.booleans(),
)
def test_explain_properties(spec, batch, classes, data, dtype, method, output, train_mode):
    kind, shape = spec
    model = small_model(kind, shape, classes, dtype).train(train_mode)
    k = data.draw(st.integers(1, classes), label="top_k")
    x = torch.rand((batch, *shape), dtype=dtype)
    before = snapshot(model)
    options = {"smoothgrad": {"n_samples": 3}, "integrated_gradients": {"steps": 3}}.get(method, {})
    exp = peering.explain(model, x, top_k=k, method=method, output=output, chunk_size=4, **options)
    assert exp.attributions.shape == (batch, k, *shape) and exp.attributions.dtype == dtype
    assert exp.targets.shape == (batch, k) and exp.targets.dtype == torch.int64
    assert exp.logits.shape == exp.probabilities.shape == (batch, classes)
    assert torch.isfinite(exp.attributions).all()
    if batch:
        assert torch.equal(exp.targets[:, 0], exp.logits.argmax(1))
        assert len(set(exp.targets[0].tolist())) == k
    assert_same_state(before, model)


@PROPERTY
@given(
    spec=shapes,
    batch=st.integers(0, 5),
    classes=st.integers(2, 6),
    steps=st.integers(0, 6),
    keep_every=st.integers(1, 4),
    norm=st.sampled_from(["l2", "linf"]),
    budget=st.one_of(st.none(), st.floats(0.0, 0.5)),
    early_stop=st.booleans(),
    data=st.data(),
)
def test_morph_properties(spec, batch, classes, steps, keep_every, norm, budget, early_stop, data):
    kind, shape = spec
    model = small_model(kind, shape, classes, torch.float32)
    x = torch.rand((batch, *shape))
    target = torch.tensor(data.draw(st.lists(st.integers(0, classes - 1), min_size=batch, max_size=batch)),
                          dtype=torch.int64)
    before = snapshot(model)
    res = peering.morph(model, x, target, steps=steps, norm=norm, budget=budget, early_stop=early_stop,
                        keep_every=keep_every, chunk_size=3)
    frames = len(range(0, steps + 1, keep_every)) + (steps % keep_every != 0)
    assert res.frames.shape == (frames, batch, *shape)
    assert res.inputs.shape == x.shape
    assert torch.equal(res.frames[0], x) and torch.equal(res.frames[-1], res.inputs)
    assert res.success.shape == res.steps.shape == res.distance.shape == (batch,)
    assert ((res.steps >= 0) | ~res.success).all()  # success means it got there at some step
    assert res.inputs.min() >= 0 if batch else True
    assert res.inputs.max() <= 1 if batch else True
    if budget is not None and batch:
        delta = (res.inputs - x).flatten(1)
        size = delta.norm(dim=1) if norm == "l2" else delta.abs().amax(dim=1)
        assert size.max() <= budget + 1e-5
    assert_same_state(before, model)


@PROPERTY
@given(
    batch=st.integers(0, 40),
    classes=st.integers(2, 12),
    max_difference=st.floats(0.0, 3.0),
    margin=st.sampled_from(["logit", "probability"]),
    top_n=st.one_of(st.none(), st.integers(0, 10)),
    min_top=st.one_of(st.none(), st.floats(-2.0, 2.0)),
    seed=st.integers(0, 2**16),
)
def test_select_confused_properties(batch, classes, max_difference, margin, top_n, min_top, seed):
    logits = torch.randn((batch, classes), generator=torch.Generator().manual_seed(seed)) * 2
    sel = peering.select_confused(logits, max_difference=max_difference, margin=margin, top_n=top_n,
                                  min_top_value=min_top)
    n = len(sel)
    assert sel.classes.shape == (n, 2) and sel.margins.shape == (n,)
    assert n == (sel.num_confused if top_n is None else min(top_n, sel.num_confused))
    assert sel.num_confused <= sel.num_candidates <= batch
    assert (sel.margins <= max_difference).all() and (sel.margins >= 0).all()
    assert (sel.margins[1:] >= sel.margins[:-1]).all()  # most confused first
    assert len(set(sel.indices.tolist())) == n
    if n:
        assert torch.equal(sel.classes, logits[sel.indices].topk(2, dim=1).indices)
    # nobody left out was more confused than someone kept
    scores = logits if margin == "logit" else logits.softmax(1)
    top2 = scores.topk(2, dim=1).values
    gaps = top2[:, 0] - top2[:, 1]
    eligible = gaps <= max_difference
    if min_top is not None:
        eligible &= logits.max(1).values >= min_top
    assert sel.num_confused == int(eligible.sum())
    if n and top_n is not None:
        rest = torch.ones(batch, dtype=torch.bool)
        rest[sel.indices] = False
        assert (gaps[rest & eligible] >= sel.margins.max() - 1e-6).all()
