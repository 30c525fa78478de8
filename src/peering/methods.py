"""The older path of `peering.attribution.methods` (and of the engine, `ClassGradients`), kept so that
existing imports go on working."""

from peering.attribution.engine import ClassGradients, GradStrategy, top_classes
from peering.attribution.methods import (
    METHODS,
    AttributionMethod,
    Gradient,
    InputXGradient,
    IntegratedGradients,
    SmoothGrad,
    make_method,
)

__all__ = [
    "METHODS",
    "AttributionMethod",
    "ClassGradients",
    "GradStrategy",
    "Gradient",
    "InputXGradient",
    "IntegratedGradients",
    "SmoothGrad",
    "make_method",
    "top_classes",
]
