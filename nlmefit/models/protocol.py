"""The one interface, written down: what a latent-variable model must provide, and the optional capabilities.

Every estimator, posterior family and marginal-likelihood method talks to a model only through
:class:`LatentModel`. For subject i with random effects η_i and population parameters θ (a
:class:`~nlmefit.models.parameters.Params`; Ω and σ inside it):

=====================================  ====================================================================
``prepare(data) -> ObservationData``   bind a DataFrame / Panel: padded ``[N, J]`` tensors, masks, censoring
``log_lik(p, eta, data, mask=None)``   log p(y_i | η_i, θ) per subject, ``[..., N]``, full constants; ``mask``
                                       conditions on a subset of observations (one-step-ahead, held-out)
``log_prior(p, eta, n_occ=0)``         log p(η_i | θ), ``[..., N]``
``sample_eta(p, n, n_occ, generator)`` draws from p(η | θ), ``[*size, n, q]``
``sample_y(p, eta, data, generator)``  draws from p(y | η, θ), ``[..., N, J]`` on the data scale
``parameters``                         the :class:`~nlmefit.models.parameters.ParameterSet`: scalar θ/Ω/σ
                                       and tensor-valued weights (``nn.Module`` parameters), all transforms
``with_initial(params)``               a copy whose initial values are ``params``
=====================================  ====================================================================

Leading dimensions of ``eta`` are sample dimensions (importance sampling, MCMC chains, flow draws).

Optional capabilities, each a small protocol checked with ``isinstance`` where an estimator needs it:

* :class:`Linearisable` — ``predict(p, eta, data) -> (f, Var(y | η))`` and ``prior_covariance(p, n_occ)``:
  what FO/FOCE/FOCE-I need for their linearisation, what the residual table (PRED, CWRES …) and the
  non-centred NUTS parametrisation use;
* :class:`MuReferenced` — ``mu_reference(p, data) -> μ [N, q]``, the per-subject shift that enters each
  individual log-parameter as η does: SAEM samples ψ = μ + η and its θ update becomes a regression.

:class:`nlmefit.Model` (the pharmacometric model) implements all three; a PPCA model implements
``LatentModel`` and ``Linearisable`` in a few lines (see ``tests/test_protocol.py``).
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from nlmefit.errors import ModelSpecError
from nlmefit.models.data import ObservationData
from nlmefit.models.parameters import ParameterSet, Params

__all__ = ["LatentModel", "Linearisable", "MuReferenced", "HasIndividualParameters", "check_latent_model"]


@runtime_checkable
class LatentModel(Protocol):
    """The one interface between models and estimators (see the module docstring)."""

    name: str
    parameters: ParameterSet

    @property
    def eta_names(self) -> list[str]: ...

    def prepare(self, data, device=None, dtype=torch.float64) -> ObservationData: ...

    def log_lik(self, p: Params, eta: torch.Tensor, data: ObservationData,
                mask: torch.Tensor | None = None) -> torch.Tensor: ...

    def log_prior(self, p: Params, eta: torch.Tensor, n_occ: int = 0) -> torch.Tensor: ...

    def sample_eta(self, p: Params, n: int, n_occ: int = 0, generator: torch.Generator | None = None,
                   size: tuple = ()) -> torch.Tensor: ...

    def sample_y(self, p: Params, eta: torch.Tensor, data: ObservationData,
                 generator: torch.Generator | None = None, residual: bool = True) -> torch.Tensor: ...

    def with_initial(self, params: Params) -> LatentModel: ...


@runtime_checkable
class Linearisable(Protocol):
    """Prediction and residual variance on the likelihood scale, and the prior covariance of η."""

    def predict(self, p: Params, eta: torch.Tensor, data: ObservationData) -> tuple[torch.Tensor, torch.Tensor]: ...

    def prior_covariance(self, p: Params, n_occ: int) -> torch.Tensor: ...


@runtime_checkable
class MuReferenced(Protocol):
    """ψ_i = μ_i(θ) + η_i: the individual parameters' mu-referencing (Monolix), for SAEM's closed-form M-step."""

    def mu_reference(self, p: Params, data: ObservationData) -> torch.Tensor: ...


@runtime_checkable
class HasIndividualParameters(Protocol):
    """Named individual (structural) parameters per subject, for the individual-estimates table."""

    def individual_parameters(self, p: Params, eta: torch.Tensor, data: ObservationData) -> dict: ...


def check_latent_model(model, need: tuple[type, ...] = ()) -> None:
    """Raise ModelSpecError unless ``model`` implements :class:`LatentModel` and every protocol in ``need``."""
    for proto in (LatentModel, *need):
        if not isinstance(model, proto):
            missing = [m for m in _members(proto) if not hasattr(model, m)]
            raise ModelSpecError(f"{type(model).__name__} does not implement {proto.__name__} "
                                 f"(missing: {', '.join(missing) or '?'})")


def _members(proto: type) -> list[str]:
    return sorted(n for n in vars(proto) if not n.startswith("_")) + \
        sorted(getattr(proto, "__annotations__", {}))
