"""FO (first order): linearise the model in η around η = 0 (NONMEM ``METHOD=0``)."""
from __future__ import annotations

from nlmefit.estimators.base import register
from nlmefit.estimators.classical import ClassicalEstimator

__all__ = ["FO"]


@register("fo")
class FO(ClassicalEstimator):
    """First-order method: y_i ~ N(f(0), G₀ΩG₀ᵀ + V₀)."""

    approximation = "fo"
