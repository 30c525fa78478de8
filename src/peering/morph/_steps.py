"""`morph`'s step rule: where each sample moves and how far, batched over the samples of a chunk.

Each sample has its own trust factor on ``step_size``: x1.2 after a step that raised its objective, x0.5
after one that lowered it (unless a prior is pulling it to where it may stop), within [0.1, 4]; no step is
longer than the first-order estimate of what takes the target to the confidence asked for (so the last step
does not overshoot), except for a sample a prior does not let stop yet (`Prior.settled`). The blur of the
gradient fades with the trust factor: a sample whose smooth steps keep failing mixes in the plain gradient
(a model that reads fine strokes). The direction is the blurred gradient plus the priors' pulls, without the
parts that push pixels already at a bound out of ``bounds``. With a generative prior
(`peering.morph.priors.Generative`) the walk is in its latent space: the model's gradient is carried back
through the decoder to the code, and a pixel offset joins in once the sample's latent walk stalls. Nothing
here looks at which model is morphed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from peering.morph.priors import Generative, Prior, PriorState, _unit, smooth

__all__: list[str] = []

GROW, SHRINK = 1.2, 0.5  # the trust factor after a step that raised / lowered the sample's objective
LEAST, MOST = 0.1, 4.0  # the trust factor's range
STALL = 3  # steps without a new best after which a latent walk adds its pixel offset
SHARPEN = 2.0  # below this trust factor, a sample's step mixes in the unblurred gradient


@dataclass
class Walk:
    """Per-sample state of the walk of one chunk (rows: samples): the trust factor, the objective one step
    ago and, with a generative prior, the code, the pixel offset, the best objective and the steps since."""

    factor: Tensor
    last: Tensor
    code: Tensor | None = None
    offset: Tensor | None = None
    best: Tensor | None = None
    since: Tensor | None = None

    def select(self, rows: Tensor | None) -> Walk:
        """The walk of ``rows`` (all of them for None: the same tensors)."""
        if rows is None:
            return self
        def pick(v: Tensor | None) -> Tensor | None:
            return None if v is None else v[rows]

        return Walk(self.factor[rows], self.last[rows], pick(self.code), pick(self.offset), pick(self.best),
                    pick(self.since))

    def put(self, rows: Tensor | None, part: Walk) -> None:
        """Write the walk of ``rows`` back (all of them for None)."""
        for f, mine, theirs in zip(fields(self), self._values(), part._values(), strict=True):
            if mine is None or theirs is None:
                continue
            if rows is None:
                setattr(self, f.name, theirs)
            else:
                mine[rows] = theirs

    def _values(self) -> tuple[Tensor | None, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))


@dataclass
class StepRule:
    """The step of `morph` (see the module's docstring); the options are `morph`'s own."""

    step_size: float
    norm: str
    budget: float | None
    bounds: tuple[Tensor, Tensor] | None
    confidence: float | None
    output: str
    smoothing: float
    priors: list[Prior]

    def __post_init__(self) -> None:
        self.latent = next((p for p in self.priors if isinstance(p, Generative)), None)

    def start(self, x0: Tensor, states: list[PriorState]) -> Walk:
        """The walk of a chunk of originals ``x0`` [n, ...] whose priors have ``states``."""
        n = x0.shape[0]
        walk = Walk(x0.new_ones(n), x0.new_full((n,), -math.inf))
        if self.latent is not None:
            walk.code = states[self.priors.index(self.latent)][0].clone()
            walk.offset = torch.zeros_like(x0)
            walk.best = x0.new_full((n,), -math.inf)
            walk.since = torch.zeros(n, dtype=torch.int64, device=x0.device)
        return walk

    def draw(self, walk: Walk, states: list[PriorState], x0: Tensor, first: bool) -> tuple[Tensor, Tensor]:
        """With a generative prior: (code, frame), the code a leaf that requires grad and the frame drawn
        from it (differentiable); the first frame is the original, exactly."""
        assert self.latent is not None and walk.code is not None and walk.offset is not None
        code = walk.code.detach().clone().requires_grad_(True)
        drawn = self.latent.decode(code, states[self.priors.index(self.latent)]) + walk.offset
        frame = self.project(drawn, x0)
        if first:
            frame = frame + (x0 - frame).detach()
        return code, frame

    def step(self, walk: Walk, x: Tensor, code: Tensor | None, grad: Tensor, objective: Tensor, x0: Tensor,
             states: list[PriorState], says: list[Tensor | None], late: bool) -> Tensor | None:
        """Move the samples of ``walk`` (in place): returns the new inputs, or None when the walk is in a
        latent space (its code and offset moved instead). ``x``: the inputs (with a generative prior, the
        frame drawn from ``code``), ``grad``: the objective's gradient in ``x``, ``says``: each prior's
        `Prior.settled` (None: no say), ``late``: half the steps are gone."""
        # a step that lowered the objective shrinks the factor, except while a prior pulls the sample toward
        # where it may stop: the model's objective may well fall on the way there
        agree = all_settled(says)
        open_ = None if agree is None else ~agree
        shrunk = walk.factor * SHRINK
        if open_ is not None:
            shrunk = torch.where(open_, walk.factor, shrunk)
        factor = torch.where(objective >= walk.last, walk.factor * GROW, shrunk)
        factor = factor.where(torch.isfinite(walk.last), walk.factor).clamp(LEAST, MOST)
        walk.last = objective
        pixel = [(p, s, say) for p, s, say in zip(self.priors, states, says, strict=True)
                 if p is not self.latent]
        if self.latent is None:
            unit = self.unit(self.direction(x.detach(), grad, pixel, factor))
            capped = self.cap(factor, objective, self.step_size * (grad * unit).flatten(1).sum(1))
            # a sample a prior holds back goes on at its pace: the cap is about the model's confidence
            factor = capped if open_ is None else torch.where(open_, factor, capped)
            walk.factor = factor
            return self.project(x.detach() + (self.step_size * factor).view(_shape(x)) * unit, x0)
        walk.factor = factor
        self._latent_step(walk, x, code, grad, objective, states, pixel, late)
        return None

    def _latent_step(self, walk: Walk, x: Tensor, code: Tensor | None, grad: Tensor, objective: Tensor,
                     states: list[PriorState], pixel: list[tuple[Prior, PriorState, Tensor | None]],
                     late: bool) -> None:
        assert self.latent is not None and code is not None and walk.code is not None
        assert walk.offset is not None and walk.best is not None and walk.since is not None
        # the decoder carries the gradient (plus the pixel priors' pulls) back to the code
        carried = grad
        if pixel:
            carried = grad / _norms(grad).view(_shape(grad)) + _pulls(x.detach(), pixel)
        (in_code,) = torch.autograd.grad(x, code, carried)
        pulled = self.latent.latent_pull(code.detach(), states[self.priors.index(self.latent)])
        along = in_code / _norms(in_code).view(_shape(in_code))
        unit_code = self.unit(along + pulled if pulled is not None else in_code)
        unit_px = self.unit(self.direction(x.detach(), grad, [], torch.full_like(walk.factor, SHARPEN)))
        # the pixel offset moves once the latent walk stalls or half the steps are gone, and from then on
        walk.since = torch.where(objective > walk.best, 0, walk.since + 1)
        walk.best = torch.maximum(walk.best, objective)
        on = (walk.since >= STALL) | late | (walk.offset.flatten(1).abs().amax(dim=1) > 0)
        px_step = self.latent.pixel * self.step_size * on.to(x.dtype)
        walk.code = code.detach() + (self.latent.step * walk.factor).view(_shape(code)) * unit_code
        walk.offset = walk.offset + (px_step * walk.factor).view(_shape(x)) * unit_px

    def direction(self, x: Tensor, grad: Tensor, pulls: list[tuple[Prior, PriorState, Tensor | None]],
                  factor: Tensor) -> Tensor:
        """The step's direction in input space: the blurred gradient (unit length if priors pull too) plus
        the priors' pulls, without the parts that push pixels already at a bound out of it. The blur
        fades per sample with its trust ``factor``: below ``SHARPEN`` the direction is a mix of the blurred
        and the plain gradient (each of unit length), in proportion factor / SHARPEN : the rest."""
        direction = grad
        if self.smoothing > 0:
            blurred = smooth(grad, self.smoothing)
            share = (factor / SHARPEN).clamp(max=1.0).view(_shape(grad))
            direction = share * _unit(blurred) + (1 - share) * _unit(grad)
        if pulls:
            direction = direction / _norms(direction).view(_shape(direction)) + _pulls(x, pulls)
        if self.bounds is not None:
            lo, hi = self.bounds
            outward = ((x <= lo) & (direction < 0)) | ((x >= hi) & (direction > 0))
            direction = direction.masked_fill(outward, 0)
        return direction

    def unit(self, direction: Tensor) -> Tensor:
        """Unit length per sample for "l2", the sign for "linf"."""
        if self.norm == "l2":
            return direction / _norms(direction).view(_shape(direction))
        return direction.sign()

    def cap(self, factor: Tensor, objective: Tensor, gain: Tensor) -> Tensor:
        """No step longer than the first-order estimate of what reaches the confidence (no overshoot);
        ``gain``: the objective's rise per unit of the factor."""
        if self.confidence is None or self.output != "log_probability":
            return factor
        want = (math.log(self.confidence) - objective).clamp_min(0)
        return torch.minimum(factor, (want / gain.clamp_min(1e-12)).clamp_min(LEAST))

    def project(self, new: Tensor, x0: Tensor) -> Tensor:
        """Onto the ``budget`` ball around the originals ``x0`` (if any), then into ``bounds``."""
        if self.budget is not None:
            delta = new - x0
            if self.norm == "l2":
                length = delta.flatten(1).norm(dim=1).view(_shape(new))
                delta = delta * (self.budget / length.clamp_min(1e-12)).clamp(max=1.0)
            else:
                delta = delta.clamp(-self.budget, self.budget)
            new = x0 + delta
        if self.bounds is not None:
            new = torch.minimum(torch.maximum(new, self.bounds[0]), self.bounds[1])
        return new


def _pulls(x: Tensor, pulls: list[tuple[Prior, PriorState, Tensor | None]]) -> Tensor | float:
    """The sum of the priors' pulls on ``x``: `Prior.toward` for the samples a prior is not settled about,
    `Prior.pull` for the rest (0. if none pulls)."""
    total: Tensor | float = 0.0
    for p, state, say in pulls:
        if say is None or bool(say.all()):
            pulled = p.pull(x, state)
        elif not bool(say.any()):
            pulled = p.toward(x, state)
        else:
            pulled, toward = p.pull(x, state), p.toward(x, state)
            if pulled is None or toward is None:
                pulled = pulled if toward is None else toward
            else:
                pulled = torch.where(say.view(_shape(x)), pulled, toward)
        if pulled is not None:
            total = total + pulled
    return total


def all_settled(says: list[Tensor | None]) -> Tensor | None:
    """bool [b]: every prior that has a say (`Prior.settled`) lets the sample stop; None if none has a say."""
    out = None
    for say in says:
        if say is not None:
            out = say if out is None else out & say
    return out


def _shape(x: Tensor) -> tuple[int, ...]:
    """A view shape that broadcasts a [B] tensor over the rest of ``x``'s dimensions."""
    return (-1, *([1] * (x.ndim - 1)))


def _norms(x: Tensor) -> Tensor:
    return x.flatten(1).norm(dim=1).clamp_min(1e-12)
