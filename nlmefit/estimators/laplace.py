"""Laplace: second-order expansion of −log p(y_i, η | θ) at η̂_i (NONMEM ``METHOD=1 LAPLACIAN``).

``hessian="exact"`` (default) uses the exact Hessian of the individual objective — the true Laplace
approximation, equal to one-node adaptive Gauss–Hermite quadrature. ``hessian="gauss-newton"`` uses the
first-order (expected-information) Hessian of FOCE-I; for the Wang (2007) example that is the number nlmixr2's
``laplace`` reports.
"""
from __future__ import annotations

from nlmefit.estimators.base import register
from nlmefit.estimators.classical import ClassicalEstimator

__all__ = ["Laplace"]


@register("laplace")
class Laplace(ClassicalEstimator):
    """Laplace approximation, ``method="laplace"``: ``−2 log L_i ≈ 2 l_i(η̂_i) − q log 2π + log det H_i`` with
    ``l_i(η) = −log p(y_i | η) − log p(η)`` and H_i its Hessian at the mode η̂_i.

    ``hessian``: ``"exact"`` (default; the true Laplace approximation, one-node AGQ) or ``"gauss-newton"`` (the
    FOCE-I Hessian); the other options (``maxiter``, ``covariance``, ``n_starts`` …) are those of :class:`FOCEI`.
    """

    approximation = "laplace"

    def __init__(self, hessian: str = "exact", **kwargs) -> None:
        if hessian not in ("exact", "gauss-newton"):
            raise ValueError(f"hessian must be 'exact' or 'gauss-newton', got {hessian!r}")
        super().__init__(**kwargs)
        self.hessian = hessian

    @property
    def method_key(self) -> str:
        return "laplace" if self.hessian == "exact" else "laplace_gn"
