"""`morph`: walk inputs up the gradient of a target class until the model is confident it is that class."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from peering._guesses import check_guesses
from peering._model import (
    CLASS_OUTPUTS,
    ForwardKwargs,
    check_inputs,
    check_output,
    class_scores,
    gradient_context,
    num_classes,
    probabilities,
    transform,
)
from peering._validate import int_at_least, number, one_of, optional
from peering.errors import PeeringTypeError, PeeringValueError
from peering.memory import Footprint, MemoryBudget, SavedBytes, model_tensors
from peering.morph._steps import StepRule, all_settled
from peering.morph.priors import Generative, Noise, Prior
from peering.morph.result import (
    MorphResult,
    _arrived,
    _check_confidence,
    _frame_steps,
    _one_target,
    _progress_bar,
)

__all__ = ["MorphResult", "morph"]


def morph(
    model: nn.Module | Sequence[nn.Module],
    inputs: Tensor,
    target: int | Tensor,
    *,
    steps: int = 100,
    confidence: float | None = 0.99,
    smoothing: float | Literal["auto"] = "auto",
    prior: Prior | Sequence[Prior] | None = None,
    step_size: float | None = None,
    output: Literal["probability", "log_probability", "logit", "sigmoid"] = "log_probability",
    norm: Literal["l2", "linf"] = "l2",
    budget: float | None = None,
    bounds: tuple[float | Tensor, float | Tensor] | None = (0.0, 1.0),
    early_stop: bool = True,
    keep_every: int = 1,
    output_fn: Callable[[Any], Tensor] | None = None,
    chunk_size: int | None = None,
    memory_budget: MemoryBudget | int | float | str | None = None,
    seed: int = 0,
    progress: bool = False,
    forward_kwargs: Mapping[str, Any] | ForwardKwargs | None = None,
    shared_kwargs: Sequence[str] | None = None,
    layer: nn.Module | None = None,
    **text_options: Any,
) -> MorphResult:
    """Change inputs by gradient-ascent steps until the model is confident they are ``target``.

    Each step moves every still-moving sample along its gradient of the target's ``output``: blurred by
    ``smoothing``, plus the pulls of the ``prior`` (see `peering.priors`), without the parts that would push
    pixels already at a bound out of ``bounds``, normalised per sample (unit L2 norm for ``norm="l2"``, its
    sign for ``"linf"``); then projects onto the ``budget`` ball around the original (if given) and clamps
    to ``bounds``. Each sample's step length is ``step_size`` times its own trust factor: x1.2 after a step
    that raised its objective, x0.5 after one that lowered it, within [0.1, 4]; and no longer than the
    first-order estimate of what takes its target to ``confidence`` (so the last step does not overshoot).
    With a generative prior (`peering.priors.LatentShift`), the walk is in the prior's latent space
    instead and every frame is drawn by its decoder. With ``early_stop``, a sample stops moving once it
    meets the stopping rule (the model's top class is the target, with probability >= ``confidence``, and
    every prior with a say lets it stop: `peering.priors.Prior.settled`)
    while the others go on, and a chunk of samples that all arrived stops early. One forward and one
    backward pass of the model per step for the whole (chunk of the) batch (and of the decoder, with a
    generative prior); no loop over samples.

    Plain ascent that stops at the flip (``confidence=None, smoothing=0``) finds the smallest change the
    model falls for, which other models do not read as the target. Going on to ``confidence=0.99`` with
    smoothed steps, and a data prior made from reference images such as the training set
    (`peering.priors.Prototypes`, or `peering.priors.LatentShift` with an autoencoder of them) makes
    changes that independently trained models call the target more often (see `peering.agreement` to
    measure it on your own, and the README for how often on 16 models of 8 families).

    Args:
        model: a classifier mapping [B, ...] to class scores [B, C], or a list of them (an ensemble: they
            are ascended together, through the log of their mean probability); run in eval mode, state
            restored.
        inputs: float tensor [B, ...] inside ``bounds``.
        target: an int (one class for all) or an int64 tensor [B].
        steps: the most ascent steps.
        confidence: the target probability to reach (the stopping rule and ``success``), or None to stop
            as soon as the target is the top class.
        smoothing: standard deviation in pixels of the Gaussian blur of each step's gradient, for images
            [B, C, H, W]; 0 for none. "auto": for images [B, C, H, W], 1.5 pixels, or on images larger
            than 28 px 1.5 per 28 pixels of the shorter side (12 at 224 px); none for other inputs.
        prior: a `peering.priors.Prior` or a list of them, e.g. ``Prototypes(train_images, train_labels)``.
        step_size: the base length of each step in ``norm`` (each sample's trust factor scales it).
            Default: for "l2", 0.005 * sqrt(numel per sample)
            * (hi - lo) (0.14 for 28x28 images in [0, 1]); for "linf", 0.01 * (hi - lo); with per-element
            bounds, (hi - lo) is their mean finite span.
        output: the quantity ascended: "log_probability" (default, does not vanish when the target's
            probability is tiny), "probability" or "logit"; "sigmoid" for a multi-label (or single-logit
            binary) classifier: the target's own sigmoid probability is ascended (the steps are
            normalised, so its direction is that of its log or of its logit) and is what ``confidence``
            and ``success`` are about.
        norm: "l2" or "linf": the step's normalisation and the budget's ball.
        budget: the largest distance from the original (in ``norm``), or None for no limit.
        bounds: the valid input range (lo, hi), or None for no clamping. Each end is a number or a tensor
            broadcastable to one sample (standardised tabular features each have their own range).
        early_stop: stop moving each sample once it meets the stopping rule.
        keep_every: keep a frame every this many steps (the first and the final frame are always kept).
        output_fn: picks the class scores from a model output that is not a plain tensor.
        chunk_size: samples morphed together; the chunks run one after another. Default None: as many
            as fit ``memory_budget``, measured on a forward pass of one sample (a dry run).
        memory_budget: as in `peering.explain`: bytes, a size string, a share of free memory or a
            `peering.memory.MemoryBudget`; default half the free CUDA memory or a quarter of the RAM.
        seed: seed of the priors' random draws (`peering.priors.Jitter`); the global RNG is never used.
        progress: show a tqdm progress bar over the chunks' steps.
        forward_kwargs: extra keyword arguments of the model, as in `peering.explain`: tensors whose
            first dimension is B follow their samples through chunks and early stops.
        shared_kwargs: names of ``forward_kwargs`` passed whole to every forward pass (as in
            `peering.explain`).
        layer: for text: the token embedding module. Token ids (int64 or int32; or any ``layer=``) are
            morphed by token swaps instead of steps (`peering.morph.text.morph_tokens`, whose options
            ``frozen``, ``exclude_ids`` and ``candidates`` are passed through; ``steps`` is then the most
            swaps tried and ``budget`` the most tokens changed).

    >>> import torch, peering
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Linear(64, 10)   # flat inputs: no smoothing
    >>> with torch.no_grad():
    ...     _ = model.weight.mul_(10)  # a confident model
    >>> res = peering.morph(model, torch.rand(4, 64), target=3)
    >>> res.success.tolist(), res.steps.tolist()
    ([True, True, True, True], [21, 23, 18, 23])
    >>> bool((res.probabilities[:, 3] >= 0.99).all())
    True
    >>> res.frames.shape  # 100 steps and the original; the early-stopped samples stand still
    torch.Size([101, 4, 64])
    """
    if layer is not None or (isinstance(inputs, Tensor) and inputs.dtype in (torch.int64, torch.int32)):
        image_only = {"smoothing": (smoothing, "auto"), "prior": (prior, None), "seed": (seed, 0),
                      "step_size": (step_size, None), "norm": (norm, "l2"), "bounds": (bounds, (0.0, 1.0))}
        return _morph_text(
            model, inputs, target, layer=layer, steps=steps, confidence=confidence, output=output,
            budget=budget, early_stop=early_stop, keep_every=keep_every, output_fn=output_fn,
            chunk_size=64 if chunk_size is None else chunk_size,  # text morphs keep a count of sequences
            progress=progress, forward_kwargs=forward_kwargs,
            shared_kwargs=shared_kwargs, ignored={k: v for k, (v, d) in image_only.items() if v != d},
            **text_options,
        )
    if text_options:
        raise PeeringTypeError(
            f"morph got unknown options {sorted(text_options)}; they are options of text morphs, which take "
            "integer token ids and layer=<the embedding module>"
        )
    members = _check_models(model)
    _check_numbers(output, inputs, norm, steps, keep_every, chunk_size, budget, confidence)
    memory = MemoryBudget.parse(memory_budget)
    sigma = _check_smoothing(smoothing, inputs)
    priors = _check_priors(prior)
    clamp = _check_bounds(bounds, inputs)
    step_size = _default_step_size(inputs, clamp, norm) if step_size is None else step_size
    number("step_size", step_size, above=0)

    b = inputs.shape[0]
    frame_steps = _frame_steps(steps, keep_every)
    helpers = [m for p in priors for m in vars(p).values() if isinstance(m, nn.Module)]
    with gradient_context(nn.ModuleList(members + helpers)):
        x0 = inputs.detach().clone()
        kwargs = ForwardKwargs(forward_kwargs, b, shared_kwargs)
        check_guesses(members[0], x0, kwargs, output_fn)
        n_classes = _num_classes(members, x0, output_fn, kwargs)
        targets = _one_target(target, b, n_classes, output, x0.device)
        walker = _Walker(members, output, output_fn, step_size, norm, budget, clamp, early_stop, confidence,
                         sigma, priors, seed)
        out = _Record.empty(x0, len(frame_steps), n_classes)
        spans = list(_chunks(b, chunk_size, memory, members, x0, output_fn, kwargs, out.frames.nbytes))
        bar = _progress_bar(progress, total=len(spans) * steps)
        try:
            for start, stop in spans:
                part = slice(start, stop)
                walker.run(kwargs.select(part), x0[part], targets[part], start, steps, frame_steps,
                           out.part(part), bar)
        finally:
            if bar is not None:
                bar.close()
    final = out.frames[-1]
    sure = _arrived(out.logits, targets, confidence, output)
    success = sure & out.agreed
    if steps and not bool(success.all()):
        _warn_unreached(success, out.logits, targets, confidence, steps, sigma, out.start_top, output,
                        unsettled=int((sure & ~out.agreed).sum()))
    return MorphResult(
        inputs=final.clone(),
        frames=out.frames,
        frame_steps=torch.tensor(frame_steps, dtype=torch.int64),
        targets=targets,
        success=success,
        steps=out.reached,
        distance=(final - x0).flatten(1).norm(dim=1),
        logits=out.logits,
        probabilities=probabilities(out.logits, output),
        confidence=confidence,
        output=output,
    )


def _check_numbers(
    output: str, inputs: Tensor, norm: str, steps: int, keep_every: int, chunk_size: int | None,
    budget: float | None, confidence: float | None,
) -> None:
    check_output(output, CLASS_OUTPUTS)
    check_inputs(inputs)
    one_of("norm", norm, ("l2", "linf"))
    int_at_least("steps", steps, 0)
    int_at_least("keep_every", keep_every, 1)
    optional(int_at_least, "chunk_size", chunk_size, 1)
    optional(number, "budget", budget, least=0)
    _check_confidence(confidence)


def _morph_text(model: Any, inputs: Tensor, target: int | Tensor, **options: Any) -> MorphResult:
    """Token ids: swaps, not steps (`peering.morph.text.morph_tokens`, which takes one model)."""
    from peering.morph.text import morph_tokens

    return morph_tokens(model, inputs, target, **options)
def _chunks(
    b: int,
    chunk_size: int | None,
    memory: MemoryBudget,
    members: list[nn.Module],
    x0: Tensor,
    output_fn: Callable[[Any], Tensor] | None,
    kwargs: ForwardKwargs,
    kept: int,
) -> Iterator[tuple[int, int]]:
    """The chunks [start, stop) of the batch: ``chunk_size`` samples each when given; otherwise even
    chunks that fit the budget, from the footprint of one sample measured by a forward pass of it (a
    dry run: a chunk of one would morph that sample alone through every step, a call per step)."""
    if chunk_size is not None:
        sizes = [min(chunk_size, b - start) for start in range(0, b, chunk_size)]
    elif b:
        leaf = x0[:1].detach().clone().requires_grad_(True)
        tensors = [t for m in members for t in model_tensors(m)]
        with SavedBytes.excluding([*tensors, leaf]) as saved:
            _scores(members, leaf, output_fn, kwargs.rows(slice(0, 1)))
        # a step also keeps the sample, its copy and its gradient: 3 points
        point = leaf.numel() * leaf.element_size()
        one = Footprint(saved=saved.total, largest=saved.largest, point=3 * point)
        sizes = memory.resolve(x0.device).chunks(b, one, x0.device, kept=kept)
    else:
        sizes = []
    start = 0
    for size in sizes:
        yield start, start + size
        start += size


def _default_step_size(inputs: Tensor, clamp: tuple[Tensor, Tensor] | None, norm: str) -> float:
    """For "l2", 0.005 * sqrt(numel per sample) * (hi - lo); for "linf", 0.01 * (hi - lo); (hi - lo) is the
    bounds' mean finite span (1 without bounds)."""
    spans = (clamp[1] - clamp[0]) if clamp is not None else torch.ones(1)
    spans = spans[torch.isfinite(spans)]
    span = float(spans.mean()) if spans.numel() else 1.0
    numel = math.prod(inputs.shape[1:])
    return 0.005 * math.sqrt(numel) * span if norm == "l2" else 0.01 * span


def _warn_unreached(
    success: Tensor, logits: Tensor, targets: Tensor, confidence: float | None, steps: int, smoothing: float,
    start_top: Tensor,
    output: str = "log_probability",
    unsettled: int = 0,
) -> None:
    missed = ~success
    reached = probabilities(logits, output).gather(1, targets[:, None])[:, 0][missed]
    rule = f"with probability >= {confidence}" if confidence is not None else "as the top class"
    remedies = ["more steps"]
    if confidence is not None:
        remedies += ["a lower confidence", "confidence=None to stop at the top class"]
    if smoothing > 0:
        remedies.append("smoothing=0 (for a model that looks at single pixels)")
    note = ""
    if confidence is not None and len(start_top) and float(start_top.median()) < confidence:
        note = (f"; the model is seldom that sure of anything: on the originals its top class has a median "
                f"probability of {float(start_top.median()):.3g}")
    if unsettled:
        note += (f"; the model is sure of {unsettled} of them, but a prior did not let them stop "
                 "(Prototypes: still nearer another class's reference images than the target's)")
    warnings.warn(
        f"{int(missed.sum())} of {len(success)} morphs did not reach their target {rule} within {steps} "
        f"steps (their target probability: median {float(reached.median()):.3g}){note}; pass "
        + ", ".join(remedies[:-1]) + (" or " if len(remedies) > 1 else "") + remedies[-1],
        stacklevel=3,
    )


def _scores(
    members: list[nn.Module], x: Tensor, output_fn: Callable[[Any], Tensor] | None, kwargs: dict[str, Any],
    output: str = "log_probability",
) -> Tensor:
    """Class scores [B, C]: the model's, or for an ensemble the log of the members' mean probability (with
    "sigmoid": the logit of their mean sigmoid)."""
    if len(members) == 1:
        return class_scores(members[0], x, output_fn, kwargs)
    if output == "sigmoid":
        mean = torch.stack([class_scores(m, x, output_fn, kwargs).sigmoid() for m in members]).mean(0)
        return mean.logit(eps=1e-7)
    log_probs = torch.stack([class_scores(m, x, output_fn, kwargs).log_softmax(dim=1) for m in members])
    return torch.logsumexp(log_probs, dim=0) - math.log(len(members))


def _check_models(model: Any) -> list[nn.Module]:
    members = [model] if isinstance(model, nn.Module) else list(model) if isinstance(model, Sequence) else []
    if not members or not all(isinstance(m, nn.Module) for m in members):
        raise PeeringTypeError(
            f"model must be a torch.nn.Module or a non-empty list of them, got {type(model).__name__}"
        )
    return members


def _num_classes(
    members: list[nn.Module], x: Tensor, output_fn: Callable[[Any], Tensor] | None, kwargs: ForwardKwargs
) -> int:
    counts = [num_classes(m, x, output_fn, kwargs) for m in members]
    if len(set(counts)) != 1:
        raise PeeringValueError(f"the models of an ensemble must have the same classes, got {counts} classes")
    return counts[0]


def _check_smoothing(smoothing: Any, inputs: Tensor) -> float:
    if smoothing == "auto":  # 1.5 pixels up to 28x28, in proportion on larger images
        return 1.5 * max(1.0, min(inputs.shape[2:]) / 28) if inputs.ndim == 4 else 0.0
    try:
        number("smoothing", smoothing, least=0)
    except PeeringValueError:
        raise PeeringValueError(
            f"smoothing must be 'auto' or a number of pixels >= 0, got {smoothing!r}"
        ) from None
    if smoothing > 0 and inputs.ndim != 4:
        raise PeeringValueError(
            f"smoothing blurs images [B, C, H, W], but the inputs have shape {list(inputs.shape)}; "
            "pass smoothing=0 (or 'auto')"
        )
    return float(smoothing)


def _check_priors(prior: Any) -> list[Prior]:
    if prior is None:
        return []
    priors = [prior] if isinstance(prior, Prior) else list(prior) if isinstance(prior, Sequence) else None
    if priors is None or not all(isinstance(p, Prior) for p in priors):
        raise PeeringTypeError(
            "prior must be a peering.priors.Prior (e.g. peering.priors.Prototypes(images, labels)), a list "
            f"of them, or None; got {type(prior).__name__}"
        )
    if sum(isinstance(p, Generative) for p in priors) > 1:
        raise PeeringValueError(
            "morph takes at most one generative prior (it walks that prior's latent space)"
        )
    return priors


@dataclass
class _Record:
    """What `morph` fills in per sample: the kept frames [F, B, ...], the final scores, the step each sample
    met the stopping rule (-1: never), whether the priors let it stop, the top probability on the original."""

    frames: Tensor
    logits: Tensor
    reached: Tensor
    agreed: Tensor
    start_top: Tensor

    @classmethod
    def empty(cls, x0: Tensor, n_frames: int, n_classes: int) -> _Record:
        b = x0.shape[0]
        return cls(x0.new_empty((n_frames, *x0.shape)), x0.new_empty((b, n_classes)),
                   torch.full((b,), -1, dtype=torch.int64, device=x0.device),
                   torch.ones(b, dtype=torch.bool, device=x0.device), x0.new_zeros(b))

    def part(self, rows: slice) -> _Record:
        """The record of a chunk of the batch (views: writing to it writes to the whole)."""
        return _Record(self.frames[:, rows], self.logits[rows], self.reached[rows], self.agreed[rows],
                       self.start_top[rows])

    def note(self, picked: Tensor | None, t: int, scores: Tensor, sure: Tensor, agree: Tensor | None,
             output: str) -> Tensor:
        """Record step ``t`` of the samples at hand (``picked``: their rows, None for all): their scores,
        whether the priors let them stop, and the step each first met the stopping rule (the model is sure
        and the priors agree), which is returned (bool [rows])."""
        hit = sure if agree is None else sure & agree
        if t == 0:
            self.start_top.copy_(probabilities(scores, output).amax(dim=1))
        if picked is None:
            self.logits.copy_(scores)
            self.reached.masked_fill_(hit & (self.reached < 0), t)
            if agree is not None:
                self.agreed.copy_(agree)
        else:
            self.logits[picked] = scores
            self.reached[picked[hit & (self.reached[picked] < 0)]] = t
            if agree is not None:
                self.agreed[picked] = agree
        return hit


@dataclass
class _Walker:
    """Morphs one chunk at a time; see `morph` for the step (`peering.morph._steps`). Everything is batched
    over the chunk's samples; one forward and one backward pass of the model per step (and of a generative
    prior's decoder)."""

    models: list[nn.Module]
    output: str
    output_fn: Callable[[Any], Tensor] | None
    step_size: float
    norm: str
    budget: float | None
    bounds: tuple[Tensor, Tensor] | None
    early_stop: bool
    confidence: float | None
    smoothing: float
    priors: list[Prior]
    seed: int

    def __post_init__(self) -> None:
        self.rule = StepRule(self.step_size, self.norm, self.budget, self.bounds, self.confidence,
                             self.output, self.smoothing, self.priors)

    def run(
        self,
        kwargs: ForwardKwargs,
        x0: Tensor,
        targets: Tensor,
        offset: int,
        steps: int,
        frame_steps: list[int],
        out: _Record,
        bar: Any,
    ) -> None:
        """Morph one chunk in place: fills ``out``, the chunk's slice of what `morph` returns."""
        rule = self.rule
        states = [p.prepare(x0, targets) for p in self.priors]
        transforms = any(type(p).model_input is not Prior.model_input for p in self.priors)
        x = x0.clone()
        walk = rule.start(x0, states)  # the walked variables and each sample's trust factor
        moving = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        frame = 0
        for t in range(steps + 1):
            everyone = bool(moving.all())
            # rows: the samples at hand (all of the chunk, or those still moving)
            rows = torch.arange(x.shape[0], device=x.device) if everyone else moving.nonzero().flatten()
            picked = None if everyone else rows
            sub = states if everyone else [tuple(s[rows] for s in state) for state in states]
            here = walk.select(picked)
            x0a = x0 if everyone else x0[rows]
            code = None
            if rule.latent is not None:
                code, xa = rule.draw(here, sub, x0a, first=t == 0)
                if everyone:
                    x = xa.detach()
                else:
                    x[rows] = xa.detach()
            else:
                xa = (x if everyone else x[rows]).clone().requires_grad_(True)
            if frame < len(frame_steps) and frame_steps[frame] == t:
                out.frames[frame] = x
                frame += 1
            ta = targets if everyone else targets[rows]
            xa_kwargs = kwargs.rows(slice(None) if everyone else rows)
            if transforms:
                with torch.no_grad():
                    scores = _scores(self.models, xa, self.output_fn, xa_kwargs, self.output)
            else:
                scores = _scores(self.models, xa, self.output_fn, xa_kwargs, self.output)
            says = [p.settled(xa.detach(), state, t / max(steps, 1))
                    for p, state in zip(self.priors, sub, strict=True)]
            sure = _arrived(scores.detach(), ta, self.confidence, self.output)
            hit = out.note(picked, t, scores.detach(), sure, all_settled(says), self.output)
            if t == steps:
                break
            go: Tensor | None = None
            if self.early_stop and bool(hit.any()):
                go = ~hit
                if everyone:
                    moving = go
                else:
                    moving[rows[hit]] = False
                if not bool(go.any()):
                    if bar is not None:
                        bar.update(steps - t)
                    break
            # the trust factor follows the objective of the input itself (the stopping rule's scores), not
            # of a random draw of what the model is shown (`Prior.model_input`): that one is noise
            objective = transform(scores, self.output).gather(1, ta[:, None])[:, 0]
            clean = objective.detach()
            if transforms:
                seen = xa
                noise = Noise(self.seed, t, rows + offset)
                for p in self.priors:
                    seen = p.model_input(seen, noise)
                scores = _scores(self.models, seen, self.output_fn, xa_kwargs, self.output)
                objective = transform(scores, self.output).gather(1, ta[:, None])[:, 0]
            (grad,) = torch.autograd.grad(objective.sum(), xa, retain_graph=code is not None)
            new = rule.step(here, xa, code, grad, clean, x0a, sub, says, late=t >= steps // 2)
            walk.put(picked, here)
            if new is not None:
                if go is None and everyone:
                    x = new
                else:
                    if go is not None:
                        rows, new = rows[go], new[go]
                    x[rows] = new
            if bar is not None:
                bar.update(1)
        out.frames[frame:] = x  # the chunk stopped early: nothing moves any more


def _check_bounds(bounds: Any, inputs: Tensor) -> tuple[Tensor, Tensor] | None:
    """(lo, hi) as tensors broadcastable to one sample, checked against each other and the inputs."""
    if bounds is None:
        return None
    sample = inputs.shape[1:]
    try:
        lo, hi = bounds
        ends = [torch.as_tensor(v, dtype=inputs.dtype, device=inputs.device) for v in (lo, hi)]
    except (TypeError, ValueError, RuntimeError):
        raise PeeringTypeError(
            f"bounds must be a (low, high) pair of numbers or of tensors broadcastable to one sample "
            f"{list(sample)}, or None; got {bounds!r}"
        ) from None
    try:
        lo_t, hi_t = (torch.broadcast_to(e, sample) for e in ends)
    except RuntimeError:
        raise PeeringValueError(
            f"bounds of shapes {[list(e.shape) for e in ends]} do not broadcast to one sample "
            f"{list(sample)}"
        ) from None
    if not bool((lo_t < hi_t).all()):
        raise PeeringValueError(f"bounds must have low < high everywhere, got {bounds!r}")
    if inputs.numel():
        outside = (inputs < lo_t) | (inputs > hi_t)
        if bool(outside.any()):
            rows = outside.flatten(1).any(dim=1).nonzero().flatten().tolist()
            raise PeeringValueError(
                f"inputs lie outside bounds in {len(rows)} sample(s) (batch indices {rows[:10]}; min "
                f"{float(inputs.min()):.3g}, max {float(inputs.max()):.3g}); scale them into the range "
                "or pass bounds=None"
            )
    return lo_t, hi_t
