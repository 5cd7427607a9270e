"""FOCE and FOCE-I: linearise around each subject's conditional mode η̂_i (NONMEM ``METHOD=1 [INTERACTION]``)."""
from __future__ import annotations

from nlmefit.estimators.base import register
from nlmefit.estimators.classical import ClassicalEstimator

__all__ = ["FOCE", "FOCEI"]


@register("foce")
class FOCE(ClassicalEstimator):
    """FOCE without interaction: the residual variance is evaluated at η = 0."""

    approximation = "foce"


@register("focei")
class FOCEI(ClassicalEstimator):
    """FOCE with interaction: the residual variance is evaluated at η̂_i."""

    approximation = "focei"
