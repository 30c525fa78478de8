"""Text morphs: token swaps that make a text classifier confident of a target class (HotFlip, batched).

Token ids are discrete, so a text morph does not step along the gradient: it swaps whole tokens. Each
step takes ONE gradient of the target's output at the token embeddings ``e`` [B, L, H] (``layer=``, the
embedding module, whose weight ``E`` [V, H] holds every token's embedding) and from it the first-order
estimate of the change of the target's output for putting token ``v`` at position ``i``, for every
token at every position of every sample at once (Ebrahimi et al., 2018, "HotFlip"):

    estimate[b, i, v] = grad[b, i] . E[v] - grad[b, i] . e[b, i]

(one matrix product ``grad @ E.T``, in chunks of samples that keep it under ~64 MiB). The ``candidates``
best swaps of each sample are then run through the model (one no-grad forward pass for all of them), and
the one that raises the target's output most is kept: every swap is verified, none is taken on the
estimate alone. A sample stops when it meets the stopping rule of `peering.morph` (its target is the top
class, with probability >= ``confidence``), when no candidate raises its target any more, or after
``steps`` swaps; at most ``budget`` of its positions ever differ from the original, and the ``frozen``
positions (padding, special tokens) never change.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from peering._guesses import check_guesses
from peering._model import (
    CLASS_OUTPUTS,
    ForwardKwargs,
    check_output,
    class_scores,
    gradient_context,
    num_classes,
    probabilities,
    transform,
)
from peering._validate import int_at_least
from peering.attribution.engine import ClassGradients
from peering.errors import PeeringTypeError, PeeringValueError
from peering.morph.result import (
    MorphResult,
    _arrived,
    _check_confidence,
    _frame_steps,
    _one_target,
    _progress_bar,
)

__all__ = ["TextMorphResult", "morph_tokens"]

_ESTIMATE_BYTES = 64 << 20  # the [n, L, V] estimates are computed for chunks of samples this large at most


@dataclass(frozen=True)
class TextMorphResult(MorphResult):
    """What `morph_tokens` returns: a `peering.morph.MorphResult` whose inputs and frames are token ids
    ([B, L] and [F, B, L], int64), whose ``distance`` is the number of tokens changed, plus:

    Attributes:
        frozen: bool [B, L]: the positions that could not change (padding, special tokens, ``frozen``).
        padding: bool [B, L]: the padding (``attention_mask == 0``), left out of the pictures; all False
            without an attention mask.
    """

    frozen: Tensor | None = None
    padding: Tensor | None = None


def morph_tokens(
    model: nn.Module,
    ids: Tensor,
    target: int | Tensor,
    *,
    layer: nn.Module | None,
    steps: int = 100,
    confidence: float | None = 0.99,
    output: str = "log_probability",
    budget: float | None = None,
    frozen: Tensor | None = None,
    exclude_ids: Sequence[int] | Tensor | None = None,
    candidates: int = 8,
    early_stop: bool = True,
    keep_every: int = 1,
    output_fn: Callable[[Any], Tensor] | None = None,
    chunk_size: int = 64,
    progress: bool = False,
    forward_kwargs: Mapping[str, Any] | ForwardKwargs | None = None,
    shared_kwargs: Sequence[str] | None = None,
    ignored: Mapping[str, Any] | None = None,
) -> TextMorphResult:
    """Swap tokens of each text until the model is confident it is ``target``: `peering.morph` for token
    ids (``morph(model, ids, target, layer=embeddings)`` calls this).

    Args:
        model: a text classifier mapping token ids [B, L] (and ``forward_kwargs``) to class scores [B, C].
        ids: int token ids [B, L].
        target: an int (one class for all) or an int64 tensor [B].
        layer: the token embedding module (``bert.embeddings.word_embeddings``, GPT-2's ``transformer.wte``,
            ``model.get_input_embeddings()``): its output must be the rows of its weight [V, H] for the
            ids (checked), the vocabulary every swap is chosen from.
        steps: the most swaps per sample (each step makes at most one).
        confidence: the target probability to reach, or None (the top class is enough); with "sigmoid",
            the target's own sigmoid probability (>= 0.5 without one).
        output: what is raised: "log_probability" (default), "probability", "logit" or "sigmoid" (a
            multi-label model). The estimates of p and log p rank a sample's swaps alike.
        budget: the most positions of a sample that may differ from the original (None: no limit but
            ``steps``); once spent, only those positions may change again.
        frozen: bool [B, L], True where a token must not change. Padding (``attention_mask == 0`` among
            the forward arguments) and positions holding an ``exclude_ids`` token are frozen too.
        exclude_ids: token ids never put in (and, where they are, never changed), e.g.
            ``tokenizer.all_special_ids``.
        candidates: the best estimated swaps of each sample verified by a forward pass at each step.
        early_stop: stop swapping a sample once it meets the stopping rule.
        keep_every: keep a frame every this many steps (the first and the last are always kept).
        output_fn, chunk_size, progress, forward_kwargs, shared_kwargs: as in `peering.morph`.
        ignored: options of image morphs that were given (refused: text has no pixels to smooth).

    Returns:
        A `TextMorphResult`; ``steps`` is the swap at which each sample first met the stopping rule (0:
        already, -1: never).

    >>> import torch
    >>> from peering.morph.text import morph_tokens
    >>> class Bag(torch.nn.Module):   # class 1 when tokens 1-4 outnumber tokens 5-8
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.embed = torch.nn.Embedding(10, 1)
    ...         with torch.no_grad():
    ...             self.embed.weight.copy_(torch.tensor([0, 1, 1, 1, 1, -1, -1, -1, -1, 0.0])[:, None])
    ...     def forward(self, ids):
    ...         s = self.embed(ids).sum(dim=(1, 2))
    ...         return torch.stack([-3 * s, 3 * s], dim=1)
    >>> model, ids = Bag(), torch.tensor([[5, 6, 9, 9, 0], [9, 7, 9, 9, 9]])
    >>> res = morph_tokens(model, ids, 1, layer=model.embed, exclude_ids=[0], confidence=0.99)
    >>> res.success.tolist(), res.distance.tolist()
    ([True, True], [2.0, 1.0])
    >>> res.inputs[0, 4].item()   # token 0 is excluded: it stays where it is
    0
    """
    if ignored:
        raise PeeringValueError(
            f"token ids are morphed by swaps, which take no {sorted(ignored)} (options of image morphs); "
            "leave them out"
        )
    if not isinstance(model, nn.Module):
        raise PeeringTypeError(
            f"model must be a torch.nn.Module (text morphs take one model, not an ensemble), got "
            f"{type(model).__name__}"
        )
    output = check_output(output, CLASS_OUTPUTS)
    _check_ids(ids)
    weight = _embedding_weight(model, layer)
    assert layer is not None  # _embedding_weight refuses None
    b, length = ids.shape
    int_at_least("steps", steps, 0)
    int_at_least("keep_every", keep_every, 1)
    int_at_least("chunk_size", chunk_size, 1)
    int_at_least("candidates", candidates, 1)
    cap = _check_budget(budget, length)
    _check_confidence(confidence)
    allowed = _allowed_tokens(exclude_ids, weight.shape[0], weight.device)
    frame_steps = _frame_steps(steps, keep_every)
    with gradient_context(model):
        x0 = ids.detach().clone()
        kwargs = ForwardKwargs(forward_kwargs, b, shared_kwargs)
        check_guesses(model, x0, kwargs, output_fn)
        n_classes = num_classes(model, x0, output_fn, kwargs)
        targets = _one_target(target, b, n_classes, output, x0.device)
        padding = _padding(kwargs, b, length, x0.device)
        fixed = _frozen(frozen, padding, x0, allowed)
        _check_layer_output(model, layer, weight, x0, kwargs, output_fn)
        swapper = _Swapper(model, layer, weight, output, output_fn, chunk_size, candidates, allowed, cap,
                           confidence, early_stop)
        frames = x0.new_empty((len(frame_steps), b, length))
        logits = torch.empty((b, n_classes))
        reached = torch.full((b,), -1, dtype=torch.int64, device=x0.device)
        bar = _progress_bar(progress, total=math.ceil(b / chunk_size) * steps)
        try:
            for start in range(0, b, chunk_size):
                rows = slice(start, min(start + chunk_size, b))
                logits[rows] = swapper.run(
                    x0[rows], targets[rows], fixed[rows], kwargs.select(rows), steps, frame_steps,
                    frames[:, rows], reached[rows], bar,
                )
        finally:
            if bar is not None:
                bar.close()
    final = frames[-1]
    success = _arrived(logits, targets.cpu(), confidence, output)
    if steps and not bool(success.all()):
        _warn_unreached(success, logits, targets.cpu(), confidence, output, steps, cap)
    return TextMorphResult(
        inputs=final.clone(),
        frames=frames,
        frame_steps=torch.tensor(frame_steps, dtype=torch.int64),
        targets=targets,
        success=success,
        steps=reached,
        distance=(final != x0).sum(dim=1).float(),
        logits=logits,
        probabilities=probabilities(logits, output),
        confidence=confidence,
        output=output,
        frozen=fixed,
        padding=padding,
    )


@dataclass
class _Swapper:
    """One morph's settings; `run` morphs one chunk of samples."""

    model: nn.Module
    layer: nn.Module
    weight: Tensor  # [V, H]
    output: str
    output_fn: Callable[[Any], Tensor] | None
    chunk_size: int
    candidates: int
    allowed: Tensor  # bool [V]: tokens that may be put in
    cap: int  # the most positions that may differ from the original
    confidence: float | None
    early_stop: bool

    def run(
        self, x0: Tensor, targets: Tensor, fixed: Tensor, kwargs: ForwardKwargs, steps: int,
        frame_steps: list[int], frames: Tensor, reached: Tensor, bar: Any,
    ) -> Tensor:
        """Morph one chunk: fills its ``frames`` and ``reached``, returns its final class scores."""
        x = x0.clone()
        moving = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        logits: Tensor | None = None
        frame = 0
        for t in range(steps + 1):
            if frame < len(frame_steps) and frame_steps[frame] == t:
                frames[frame] = x
                frame += 1
            rows = moving.nonzero().flatten()
            if t == steps or not len(rows):
                if len(rows):
                    with torch.no_grad():
                        scores = self._scores(x[rows], kwargs, rows)
                    logits = _put(logits, rows, scores, x.shape[0])
                    reached[rows] = torch.where(
                        _arrived(scores, targets[rows], self.confidence, self.output) & (reached[rows] < 0),
                        t, reached[rows],
                    )
                if bar is not None:
                    bar.update(steps - t)
                break
            # one gradient at the embeddings of the moving samples, and their scores (the same pass)
            gradients = ClassGradients(self.model, self.output, self.output_fn, self.chunk_size, "per_class",
                                       kwargs.select(rows), self.layer, x[rows])
            grads, scores, _ = gradients(self.weight[x[rows]].detach(), targets[rows, None])
            logits = _put(logits, rows, scores, x.shape[0])
            hit = _arrived(scores, targets[rows], self.confidence, self.output)
            reached[rows[hit & (reached[rows] < 0)]] = t
            go = ~hit if self.early_stop else torch.ones_like(hit)
            moving[rows[~go]] = False
            if bool(go.any()):
                now = transform(scores[go], self.output).gather(1, targets[rows[go], None])[:, 0]
                best, gain = self._best_swaps(x, x0, fixed, rows[go], grads[go, 0], targets, kwargs, now)
                improved = gain > 0
                moving[rows[go][~improved]] = False  # no verified swap raises the target: stuck
                x[rows[go][improved]] = best[improved]
            if bar is not None:
                bar.update(1)
        frames[frame:] = x
        assert logits is not None
        return logits

    def _scores(self, x: Tensor, kwargs: ForwardKwargs, rows: Tensor) -> Tensor:
        """No-grad class scores of the sequences ``x`` [n, L], which belong to the samples ``rows``."""
        out = [
            class_scores(self.model, x[i : i + self.chunk_size], self.output_fn,
                         kwargs.rows(rows[i : i + self.chunk_size]))
            for i in range(0, x.shape[0], self.chunk_size)
        ]
        return torch.cat(out) if out else torch.empty(0)

    def _best_swaps(
        self, x: Tensor, x0: Tensor, fixed: Tensor, rows: Tensor, grad: Tensor, targets: Tensor,
        kwargs: ForwardKwargs, now: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """For the samples ``rows``: the best verified sequence [n, L] and its gain in the target's output
        over ``now`` [n] (<= 0: no candidate raises it)."""
        n, length = rows.shape[0], x.shape[1]
        changed = x[rows] != x0[rows]  # [n, L]
        may_change = ~fixed[rows]
        spent = changed.sum(dim=1) >= self.cap
        may_change &= ~spent[:, None] | changed  # over budget: only positions already changed
        k = min(self.candidates, length * int(self.allowed.sum()))
        picks = []
        v = self.weight.shape[0]
        per_chunk = max(1, _ESTIMATE_BYTES // max(1, length * v * 4))
        for i in range(0, n, per_chunk):
            g = grad[i : i + per_chunk].float()  # [c, L, H]
            current = x[rows[i : i + per_chunk]]
            estimate = g @ self.weight.float().T  # [c, L, V]
            estimate -= estimate.gather(2, current[..., None])  # minus the current token's term
            estimate.masked_fill_(~self.allowed, -math.inf)
            estimate.masked_fill_(~may_change[i : i + per_chunk, :, None], -math.inf)
            estimate.scatter_(2, current[..., None], -math.inf)  # no swap for the same token
            picks.append(estimate.flatten(1).topk(k, dim=1))
        values = torch.cat([p.values for p in picks])  # [n, k]
        flat = torch.cat([p.indices for p in picks])
        position, token = flat // v, flat % v
        trial = x[rows].repeat_interleave(k, dim=0).view(n, k, length).clone()
        trial.scatter_(2, position[..., None], token[..., None])
        owners = rows.repeat_interleave(k)
        with torch.no_grad():
            scores = self._scores(trial.view(n * k, length), kwargs, owners)
        value = transform(scores, self.output).gather(1, targets[owners, None])[:, 0].view(n, k)
        value = value.masked_fill(~torch.isfinite(values), -math.inf)  # not a real candidate
        choice = value.argmax(dim=1)
        best = trial[torch.arange(n, device=x.device), choice]
        return best, value.gather(1, choice[:, None])[:, 0] - now.detach()


def _put(logits: Tensor | None, rows: Tensor, scores: Tensor, n: int) -> Tensor:
    """``logits`` [n, C] (made at the first call) with the rows ``rows`` set to ``scores``."""
    if logits is None:
        logits = torch.full((n, scores.shape[1]), float("nan"))
    logits[rows.cpu()] = scores.detach().float().cpu()
    return logits


def _check_ids(ids: Any) -> None:
    if not isinstance(ids, Tensor) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        what = f"a {ids.dtype} tensor" if isinstance(ids, Tensor) else type(ids).__name__
        raise PeeringTypeError(
            f"token ids must be an integer tensor [B, L], got {what}; float inputs are morphed by steps, "
            "without layer="
        )
    if ids.ndim != 2:
        hint = "; for one text use ids.unsqueeze(0)" if ids.ndim == 1 else ""
        raise PeeringValueError(f"token ids must be [B, L], got shape {list(ids.shape)}{hint}")


def _embedding_weight(model: nn.Module, layer: Any) -> Tensor:
    """The token embedding matrix [V, H] of ``layer``, which must be a submodule of the model."""
    if layer is None:
        hint = " (here: layer=model.get_input_embeddings())" if hasattr(model, "get_input_embeddings") else ""
        raise PeeringValueError(
            "token ids are morphed by swapping tokens, chosen through the token embeddings: pass "
            f"layer=<the embedding module>{hint}. (Images must be floating-point: e.g. x.float() / 255.)"
        )
    if not isinstance(layer, nn.Module) or not any(m is layer for m in model.modules()):
        raise PeeringValueError(f"layer must be a submodule of the model, got {type(layer).__name__}")
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, Tensor) or weight.ndim != 2:
        raise PeeringValueError(
            f"layer {type(layer).__name__} has no embedding matrix [V, H]; pass the token embedding module "
            "(an nn.Embedding, e.g. bert.embeddings.word_embeddings)"
        )
    return weight.detach()


def _check_layer_output(
    model: nn.Module, layer: nn.Module, weight: Tensor, ids: Tensor, kwargs: ForwardKwargs,
    output_fn: Callable[[Any], Tensor] | None,
) -> None:
    """The layer's output must be its weight's rows for the ids: the estimates assume it."""
    if ids.shape[0] == 0:
        return
    seen = ClassGradients(model, "logit", output_fn, 1, "per_class", kwargs.select(slice(0, 1)), layer,
                          ids[:1]).layer_values(ids[:1])
    if seen.shape != (1, ids.shape[1], weight.shape[1]) or not torch.allclose(
        seen.float(), weight[ids[:1]].float(), rtol=1e-4, atol=1e-6
    ):
        raise PeeringValueError(
            f"layer {type(layer).__name__}'s output (shape {list(seen.shape)}) is not the rows of its weight "
            "for the token ids; pass the token embedding module itself (e.g. bert.embeddings."
            "word_embeddings, not bert.embeddings, which adds positions)"
        )


def _check_budget(budget: Any, length: int) -> int:
    if budget is None:
        return length
    number = isinstance(budget, (int, float)) and not isinstance(budget, bool)
    if not number or budget < 1 or budget != int(budget):
        raise PeeringValueError(
            f"budget of a text morph is the most tokens changed per text: an int >= 1 or None; got {budget!r}"
        )
    return int(budget)


def _allowed_tokens(exclude_ids: Any, vocab: int, device: torch.device) -> Tensor:
    allowed = torch.ones(vocab, dtype=torch.bool, device=device)
    if exclude_ids is None:
        return allowed
    try:
        excluded = torch.as_tensor(exclude_ids, dtype=torch.int64, device=device).flatten()
    except (TypeError, ValueError, RuntimeError):
        raise PeeringTypeError(f"exclude_ids must be token ids (ints), got {exclude_ids!r}") from None
    if excluded.numel() and (int(excluded.min()) < 0 or int(excluded.max()) >= vocab):
        raise PeeringValueError(
            f"exclude_ids must be token ids in [0, {vocab - 1}], got {excluded.tolist()[:10]}"
        )
    allowed[excluded] = False
    if not bool(allowed.any()):
        raise PeeringValueError("exclude_ids leaves no token to put in")
    return allowed


def _padding(kwargs: ForwardKwargs, b: int, length: int, device: torch.device) -> Tensor:
    """bool [B, L]: where the attention mask (a per-sample ``attention_mask`` [B, L]) is zero."""
    mask = kwargs.per_sample.get("attention_mask")
    if isinstance(mask, Tensor) and tuple(mask.shape) == (b, length):
        return (mask == 0).to(device)
    return torch.zeros((b, length), dtype=torch.bool, device=device)


def _frozen(frozen: Any, padding: Tensor, ids: Tensor, allowed: Tensor) -> Tensor:
    fixed = padding | ~allowed[ids]
    if frozen is None:
        return fixed
    if not isinstance(frozen, Tensor) or tuple(frozen.shape) != tuple(ids.shape):
        shape = list(frozen.shape) if isinstance(frozen, Tensor) else type(frozen).__name__
        raise PeeringValueError(f"frozen must be bool [B, L] like the ids {list(ids.shape)}; got {shape}")
    return fixed | frozen.to(device=ids.device, dtype=torch.bool)


def _warn_unreached(
    success: Tensor, logits: Tensor, targets: Tensor, confidence: float | None, output: str, steps: int,
    cap: int,
) -> None:
    missed = ~success
    reached = probabilities(logits, output).gather(1, targets[:, None])[:, 0][missed]
    rule = f"with probability >= {confidence}" if confidence is not None else "as the top class"
    warnings.warn(
        f"{int(missed.sum())} of {len(success)} text morphs did not reach their target {rule} within "
        f"{steps} swaps (budget {cap} tokens; their target probability: median "
        f"{float(reached.median()):.3g}): "
        "no verified swap raised it further, or the swaps ran out; pass more steps, a larger budget, more "
        "candidates or a lower confidence",
        stacklevel=3,
    )
