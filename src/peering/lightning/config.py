"""`CallbackConfig`: `ConfusedLogitCallback`'s settings, every argument checked once, frozen.

The callback's constructor hands its arguments here; what comes back is valid or the constructor raised
one `peering.errors.PeeringError` naming the argument. The callback reads its settings from here only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import Tensor, nn

from peering._model import CLASS_OUTPUTS
from peering._validate import callable_or_none, int_at_least, number, one_of, optional
from peering.attribution.methods import AttributionMethod, make_method
from peering.errors import PeeringTypeError, PeeringValueError
from peering.lightning.selection import Thresholds
from peering.memory import MemoryBudget
from peering.render import Display
from peering.runs.names import STAGES

__all__ = ["CallbackConfig"]


@dataclass(frozen=True)
class CallbackConfig:
    """The settings of `peering.lightning.ConfusedLogitCallback` (its docstring says what each does),
    checked and normalised: ``method`` resolved to its default, ``on`` to a tuple of stage names, numbers to
    floats, ``method_options`` and ``feature_names`` copied.

    >>> CallbackConfig(top_k=2, on="val").on
    ('validation',)
    >>> CallbackConfig(layer="model.embed").method
    'input_x_gradient'
    >>> CallbackConfig(top_k=0)
    Traceback (most recent call last):
    ...
    peering.errors.PeeringValueError: top_k must be a positive int, got 0
    """

    top_k: int = 4
    projection_factor: float = 3.0
    min_logit_value: float | None = None
    logging_batch_interval: int = 20
    max_logit_difference: float = 1.0
    margin: Literal["logit", "probability"] = "logit"
    method: str | AttributionMethod | None = None
    output: Literal["logit", "probability", "log_probability", "sigmoid"] = "logit"
    method_options: Mapping[str, Any] | None = None
    on: str | Sequence[str] = STAGES
    max_pictures_per_epoch: int | None = 64
    unpack: Callable[[Any], tuple[Any, ...]] | None = None
    track: int = 0
    atlas: bool = True
    pairs: int = 3
    examples_per_pair: int = 4
    output_fn: Callable[[Any], Tensor] | None = None
    layer: nn.Module | str | None = None
    tokenizer: Any = None
    zoom: int = 4
    display: Display = None
    input_kind: Literal["auto", "image", "features"] = "auto"
    feature_names: Sequence[str] | None = field(default=None)
    background: bool = True
    shared_kwargs: Sequence[str] | None = None
    memory_budget: MemoryBudget | int | float | str | None = None

    def __post_init__(self) -> None:
        self._set("top_k", int_at_least("top_k", self.top_k, 1))
        self._set("projection_factor", number("projection_factor", self.projection_factor))
        self._set("min_logit_value", optional(number, "min_logit_value", self.min_logit_value, finite=False))
        int_at_least("logging_batch_interval", self.logging_batch_interval, 1)
        self._set("max_logit_difference",
                  number("max_logit_difference", self.max_logit_difference, least=0, finite=False))
        one_of("margin", self.margin, ("logit", "probability"))
        one_of("output", self.output, CLASS_OUTPUTS)
        options = dict(self.method_options or {})
        method = self.method if self.method is not None else (
            "gradient" if self.layer is None else "input_x_gradient"
        )
        make_method(method, options)  # raises on an unknown method or a bad option, now rather than mid-run
        self._set("method", method)
        self._set("method_options", options)
        self._set("on", _stages(self.on))
        optional(int_at_least, "max_pictures_per_epoch", self.max_pictures_per_epoch, 1)
        takes = "batch -> (inputs, labels) or (inputs, labels, forward_kwargs)"
        callable_or_none("unpack", self.unpack, takes)
        int_at_least("track", self.track, 0)
        if not isinstance(self.atlas, bool):
            raise PeeringValueError(f"atlas must be True or False, got {self.atlas!r}")
        int_at_least("pairs", self.pairs, 1)
        int_at_least("examples_per_pair", self.examples_per_pair, 0)
        shared = self.shared_kwargs
        if shared is not None and (isinstance(shared, str) or not all(isinstance(n, str) for n in shared)):
            raise PeeringTypeError(f"shared_kwargs must be a list of forward argument names, got {shared!r}")
        self._set("shared_kwargs", None if shared is None else tuple(shared))
        if self.layer is not None and not isinstance(self.layer, (nn.Module, str)):
            raise PeeringTypeError(
                f"layer must be a submodule of the model or its name (e.g. 'model.embed'), got {self.layer!r}"
            )
        _check_drawing(self)
        self._set("memory_budget", MemoryBudget.parse(self.memory_budget))

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    @property
    def thresholds(self) -> Thresholds:
        """What makes a sample confused."""
        head: Literal["softmax", "sigmoid"] = "sigmoid" if self.output == "sigmoid" else "softmax"
        return Thresholds(self.max_logit_difference, self.margin, self.min_logit_value, head)

    @property
    def drawing(self) -> dict[str, Any]:
        """`peering.render.confusion_panels`' options."""
        return {
            "projection_factor": self.projection_factor,
            "zoom": self.zoom,
            "output": self.output,
            "method": self.method if isinstance(self.method, str) else type(self.method).__name__,
            "display": self.display,
            "kind": self.input_kind,
            "feature_names": self.feature_names,
        }

    def to_dict(self) -> dict[str, Any]:
        """The settings a run summary records (JSON-ready)."""
        method = self.method if isinstance(self.method, str) else type(self.method).__name__
        gap = self.max_logit_difference
        return {
            "top_k": self.top_k,
            "projection_factor": self.projection_factor,
            "min_logit_value": self.min_logit_value,
            "logging_batch_interval": self.logging_batch_interval,
            "max_logit_difference": gap if math.isfinite(gap) else "inf",
            "margin": self.margin,
            "method": method,
            "output": self.output,
            "on": list(self.on),
            "max_pictures_per_epoch": self.max_pictures_per_epoch,
            "track": self.track,
        }


def _stages(on: Any) -> tuple[str, ...]:
    stages = (on,) if isinstance(on, str) else tuple(on)
    stages = tuple("validation" if s == "val" else s for s in stages)
    if not stages or any(s not in STAGES for s in stages):
        raise PeeringValueError(f"on must name stages among {STAGES}, got {on!r}")
    return stages


def _check_drawing(config: CallbackConfig) -> None:
    """The pictures' settings: zoom, display, tokenizer, input kind, feature names."""
    int_at_least("zoom", config.zoom, 1)
    display = config.display
    if display is not None and not callable(display) and not (
        isinstance(display, (tuple, list)) and len(display) == 2
    ):
        raise PeeringTypeError(
            f"display must be None, (mean, std) or a function of the inputs, got {display!r}"
        )
    tokenizer = config.tokenizer
    if tokenizer is not None and not (
        callable(getattr(tokenizer, "convert_ids_to_tokens", None)) or callable(tokenizer)
    ):
        raise PeeringTypeError(
            "tokenizer must have convert_ids_to_tokens (a Hugging Face tokenizer) or be a function from "
            f"a list of ids to a list of strings, got {type(tokenizer).__name__}"
        )
    one_of("input_kind", config.input_kind, ("auto", "image", "features"))
    names = config.feature_names
    if names is not None and (isinstance(names, str) or not all(isinstance(n, str) for n in names)):
        raise PeeringTypeError("feature_names must be a sequence of strings (one per feature), or None")
    object.__setattr__(config, "feature_names", None if names is None else list(names))
