"""Linearisation strategies: the conditional modes and per-subject −2 log L of one approximation.

A :class:`Linearisation` is what the result builder, the covariance step and the residual table need from
"the method": ``modes(model, p, data, eta0)`` and a differentiable ``subject_m2ll(model, p, data, eta_hat)``.
The classical estimators *are* one of these plus an outer optimiser; estimators whose own objective is not an
OFV (SAEM, NUTS, VEM) pass the FOCE-I one to the result builder for standard errors and CWRES, and say so.

========================  ==============================================================================
``Conditional("fo")``     η̂ = 0, the FO marginal (needs :class:`~nlmefit.models.protocol.Linearisable`)
``Conditional("foce")``   modes of the FOCE objective (residual variance frozen at η = 0)
``Conditional("focei")``  FOCE-I (interaction), first-order Hessian
``Conditional("laplace")`` exact Hessian (``laplace_gn``: the FOCE-I Hessian); needs only ``log_lik``
``Quadrature(n, h)``      adaptive Gauss–Hermite quadrature with ``n`` nodes per dimension
========================  ==============================================================================
"""
from __future__ import annotations

import abc

import torch

from nlmefit.errors import ModelSpecError
from nlmefit.marginal.approximations import conditional_m2ll, conditional_objective, fo_m2ll
from nlmefit.marginal.autodiff import grad_sep, hessian_sep
from nlmefit.marginal.modes import find_modes
from nlmefit.marginal.quadrature import agq_m2ll
from nlmefit.models.data import ObservationData
from nlmefit.models.parameters import Params
from nlmefit.models.protocol import LatentModel, Linearisable

__all__ = ["Linearisation", "Conditional", "Quadrature", "get_linearisation", "APPROXIMATIONS"]

APPROXIMATIONS = ("fo", "foce", "focei", "laplace", "laplace_gn")


class Linearisation(abc.ABC):
    """Base: the pair (modes, per-subject −2 log L with full constants) of an approximation."""

    name: str = "?"
    needs_linearisable: bool = True

    @abc.abstractmethod
    def modes(self, model: LatentModel, p: Params, data: ObservationData, eta0: torch.Tensor) -> torch.Tensor:
        """The conditional modes η̂_i [N, q], started from ``eta0``."""

    @abc.abstractmethod
    def subject_m2ll(self, model: LatentModel, p: Params, data: ObservationData,
                     eta_hat: torch.Tensor) -> torch.Tensor:
        """−2 log L_i per subject [N] at the modes, differentiable in ``p``."""

    def check(self, model) -> None:
        """ModelSpecError when ``model`` lacks a capability this approximation needs."""
        if self.needs_linearisable and not isinstance(model, Linearisable):
            raise ModelSpecError(f"the {self.name} approximation needs predict() and prior_covariance() "
                                 f"(the Linearisable capability); {type(model).__name__} has no such methods — "
                                 f"use 'laplace'")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class Conditional(Linearisation):
    """FO, FOCE, FOCE-I or Laplace (see :mod:`nlmefit.marginal.approximations`)."""

    def __init__(self, approximation: str = "focei", inner_tol: float = 1e-9) -> None:
        if approximation not in APPROXIMATIONS:
            raise ModelSpecError(f"unknown approximation {approximation!r}; choose from {APPROXIMATIONS}")
        self.name = approximation
        self.inner_tol = inner_tol
        self.needs_linearisable = approximation != "laplace"

    def modes(self, model, p, data, eta0):
        if self.name == "fo":
            return torch.zeros_like(eta0)
        with torch.no_grad():
            pd = p.detach()
            var0 = model.predict(pd, torch.zeros_like(eta0), data)[1] if self.name == "foce" else None
        lfun = conditional_objective(model, pd, data, self.name, var0)
        return find_modes(lfun, eta0, tol=self.inner_tol).eta

    def subject_m2ll(self, model, p, data, eta_hat):
        if self.name == "fo":
            return fo_m2ll(model, p, data)
        return conditional_m2ll(model, p, data, eta_hat, self.name)

    def mode_shift(self, model: LatentModel, p_of, data: ObservationData, eta_hat: torch.Tensor
                   ) -> torch.Tensor | None:
        """The first-order move of the modes [N, q] along a parameter path ``p_of(t)`` (a scalar tensor t → Params)
        from t = 0, where ``eta_hat`` are the modes, to t = 1: dη̂/dt = −H⁻¹ ∂g/∂t, g = ∂l/∂η at η̂ (the implicit
        function theorem). ∂g/∂t by double vjp: the derivative of ⟨g, w⟩ in t is linear in w, its gradient in w is
        ∂g/∂t. None for FO (no modes)."""
        if self.name == "fo" or not eta_hat.shape[-1]:
            return None
        t = torch.zeros((), dtype=eta_hat.dtype, device=eta_hat.device, requires_grad=True)
        with torch.enable_grad():
            p = p_of(t)
            var0 = model.predict(p, torch.zeros_like(eta_hat), data)[1] if self.name == "foce" else None
            lfun = conditional_objective(model, p, data, self.name, var0)
            e = eta_hat.detach().requires_grad_(True)
            g = grad_sep(lfun(e), e, create_graph=True)
            H = hessian_sep(g, e).detach()
            w = torch.zeros_like(g, requires_grad=True)
            (a,) = torch.autograd.grad((g * w).sum(), t, create_graph=True, allow_unused=True)
            if a is None or not a.requires_grad:
                return torch.zeros_like(eta_hat)
            (dg,) = torch.autograd.grad(a, w, allow_unused=True)
        if dg is None:
            return torch.zeros_like(eta_hat)
        return -torch.linalg.solve(H, dg.unsqueeze(-1)).squeeze(-1)


class Quadrature(Conditional):
    """Adaptive Gauss–Hermite quadrature centred at the Laplace modes (``n_nodes`` per dimension; ``hessian``
    ``exact`` or ``gauss-newton`` for the scale of the rule)."""

    def __init__(self, n_nodes: int = 5, hessian: str = "exact", inner_tol: float = 1e-9) -> None:
        if hessian not in ("exact", "gauss-newton"):
            raise ModelSpecError(f"hessian must be 'exact' or 'gauss-newton', got {hessian!r}")
        if int(n_nodes) != n_nodes or n_nodes < 1:
            raise ModelSpecError(f"n_nodes must be a positive integer, got {n_nodes!r}")
        super().__init__("laplace", inner_tol)
        self.n_nodes = int(n_nodes)
        self.hessian = hessian
        self.name = "agq"
        self.needs_linearisable = hessian != "exact"

    def subject_m2ll(self, model, p, data, eta_hat):
        return agq_m2ll(model, p, data, eta_hat, self.n_nodes, self.hessian)


def get_linearisation(method: str, **options) -> Linearisation:
    """By name: ``fo``, ``foce``, ``focei``, ``laplace`` (``hessian="gauss-newton"`` for laplace_gn) or ``agq``
    (``n_nodes``, ``hessian``)."""
    key = method.lower().replace("-", "").replace("_", "")
    if key == "agq":
        return Quadrature(**options)
    if key in ("laplace", "laplacegn"):
        h = options.pop("hessian", "exact" if key == "laplace" else "gauss-newton")
        return Conditional("laplace" if h == "exact" else "laplace_gn", **options)
    if key in ("fo", "foce", "focei"):
        return Conditional(key, **options)
    raise ModelSpecError(f"no approximation named {method!r}; choose from fo, foce, focei, laplace, agq")
