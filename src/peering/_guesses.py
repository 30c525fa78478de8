"""Checking a guess: a forward argument taken per sample only because its first dimension is the batch's.

Private: `explain`, `morph`, text morphs and the callback call `check_guesses` before slicing such an
argument with its samples.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from peering._model import ForwardKwargs, class_scores
from peering.errors import PeeringValueError

_SPLIT_ROWS = 8  # check_guesses compares sample 0 run alone with sample 0 run among this many


def check_guesses(
    model: nn.Module, x: Tensor, kwargs: ForwardKwargs, output_fn: Callable[[Any], Tensor] | None = None
) -> None:
    """Check the arguments `ForwardKwargs` took per sample only because their first dimension is the batch
    size (``kwargs.unchecked``): the model's class scores for sample 0 run alone, with its own rows, must
    equal those of sample 0 run among the first few samples, with theirs, as they do when the rows really
    belong to their samples. A table the model takes whole (10 prototypes next to a batch of 10) changes
    them, or makes the model fail: that is refused, naming the argument and ``shared_kwargs``. Costs one
    no-grad forward pass of at most 9 samples, once per call (the names are then marked checked).

    >>> import torch
    >>> class Protos(torch.nn.Module):   # the distance of each sample to every prototype
    ...     def forward(self, x, protos):
    ...         return -torch.cdist(x, protos)
    >>> x = torch.rand(4, 2)
    >>> kw = ForwardKwargs({"protos": torch.rand(4, 2)}, batch=4)
    >>> check_guesses(Protos(), x, kw)
    Traceback (most recent call last):
    ...
    peering.errors.PeeringValueError: forward_kwargs['protos'] was taken per sample ... takes it whole: ...
    >>> kw = ForwardKwargs({"protos": torch.rand(4, 2)}, batch=4, shared=["protos"])
    >>> check_guesses(Protos(), x, kw)   # declared: nothing to check
    """
    names = kwargs.unchecked
    if not names:
        return
    if x.shape[0] != kwargs.batch or kwargs.batch < 2:
        kwargs.unchecked = ()
        return
    m = min(kwargs.batch, _SPLIT_ROWS)
    with torch.no_grad():
        try:
            whole = class_scores(model, x[:m], output_fn, kwargs.rows(slice(0, m)))[0]
        except Exception as err:
            if m == kwargs.batch:
                raise
            class_scores(model, x, output_fn, kwargs.rows(slice(None)))  # the whole batch fails too: not ours
            why = f"run on {m} samples with their rows, the model fails ({err})"
            raise _taken_whole(names, kwargs.batch, why) from None
        try:
            alone: Tensor | None = class_scores(model, x[:1], output_fn, kwargs.rows(slice(0, 1)))[0]
            failure = ""
        except Exception as err:  # one row of it is not what the model takes
            alone, failure = None, f"run on one sample with its row, the model fails ({err})"
        if alone is None or not _same_scores(alone, whole):
            culprits = [n for n in names if _works_whole(model, x, output_fn, kwargs, n, m, whole)]
            if not failure and alone is not None:
                if alone.shape == whole.shape:
                    what = f"class scores {float((alone - whole).abs().max()):.3g} away from those it gets"
                else:
                    what = f"{alone.shape[0]} class scores, where it gets {whole.shape[0]}"
                failure = f"sample 0 run alone with its row gets {what} among {m} samples with theirs"
            raise _taken_whole(tuple(culprits) or names, kwargs.batch, failure)
    kwargs.unchecked = ()


def _works_whole(
    model: nn.Module, x: Tensor, output_fn: Callable[[Any], Tensor] | None, kwargs: ForwardKwargs, name: str,
    m: int, whole: Tensor,
) -> bool:
    """Whether sample 0, run with ``name``'s first ``m`` rows whole (the rest its own rows), gets the scores
    it gets among ``m`` samples: then ``name`` is the argument the model takes whole."""
    try:
        whole_table = {**kwargs.rows(slice(0, 1)), name: kwargs.per_sample[name][:m]}
        scores = class_scores(model, x[:1], output_fn, whole_table)
    except Exception:
        return False
    return _same_scores(scores[0], whole)


def _same_scores(a: Tensor, b: Tensor) -> bool:
    if a.shape != b.shape:
        return False
    tolerance = 2e-2 if a.dtype in (torch.float16, torch.bfloat16) else 1e-3
    atol = tolerance * float(b.abs().nan_to_num().max()) + 1e-6
    return bool(torch.allclose(a.float(), b.float(), rtol=tolerance, atol=atol, equal_nan=True))


def _taken_whole(names: tuple[str, ...], batch: int, why: str) -> PeeringValueError:
    which = " and ".join(f"forward_kwargs[{n!r}]" for n in names)
    return PeeringValueError(
        f"{which} {'was' if len(names) == 1 else 'were'} taken per sample because the first dimension is "
        f"the batch size {batch}, but the model takes {'it' if len(names) == 1 else 'them'} whole: {why}. "
        f"Pass shared_kwargs={list(names)!r} to pass {'it' if len(names) == 1 else 'them'} whole to every "
        "forward pass. (If it really is per sample, the model mixes the samples of a batch, and peering "
        "cannot explain them one by one.)"
    )
