"""Residual-error models: y = f + g(f, σ)·ε, ε ~ N(0, 1), and the observation density (with M3 censoring).

Each model gives the residual *variance* on the scale where the density is Gaussian; ``exponential`` (log-
transform-both-sides) works on log(DV) and log(f). σ parameters are standard deviations:

=============  ========================  =====================
name           variance                  σ names
=============  ========================  =====================
additive       a²                        add
proportional   (b·f)²                    prop
combined1      (a + b·f)²                add, prop
combined2      a² + (b·f)²               add, prop
exponential    a² on log scale           add (log-scale SD)
=============  ========================  =====================

Censored observations (M3, Beal 2001): an observation below its limit (``cens = 1``) contributes
``log Φ((limit − f)/sd)``; above (``cens = −1``) ``log Φ((f − limit)/sd)``.
"""
from __future__ import annotations

import abc
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from nlmefit.errors import ModelSpecError

__all__ = ["ErrorModel", "Additive", "Proportional", "Combined1", "Combined2", "ERROR_MODELS", "get_error_model",
           "obs_loglik", "LOG_2PI"]

LOG_2PI = math.log(2 * math.pi)


@dataclass(frozen=True)
class ErrorModel(abc.ABC):
    """Base class: ``name`` (what users write), the σ names, and whether the likelihood lives on log(DV).
    Subclasses implement :meth:`variance` (one class per error model, no dispatch on the name)."""

    name: str
    sigma_names: tuple[str, ...]
    log_scale: bool = False

    @abc.abstractmethod
    def variance(self, f: torch.Tensor, sigma: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Residual variance at prediction f (f already on the likelihood scale for ``exponential``)."""

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """Map DV (or a limit, or a prediction) to the likelihood scale."""
        return torch.log(x) if self.log_scale else x

    def untransform(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(x) if self.log_scale else x

    def _sigma(self, sigma: Mapping[str, torch.Tensor], f: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: _expand(v, f) for k, v in sigma.items()}


class Additive(ErrorModel):
    """Var = a² (on the log scale for the exponential model)."""

    def variance(self, f, sigma):
        return (self._sigma(sigma, f)["add"] ** 2).expand_as(f)


class Proportional(ErrorModel):
    """Var = (b·f)²."""

    def variance(self, f, sigma):
        return (self._sigma(sigma, f)["prop"] * f) ** 2


class Combined1(ErrorModel):
    """SD = a + b·|f|."""

    def variance(self, f, sigma):
        s = self._sigma(sigma, f)
        return (s["add"] + s["prop"] * f.abs()) ** 2


class Combined2(ErrorModel):
    """Var = a² + (b·f)²."""

    def variance(self, f, sigma):
        s = self._sigma(sigma, f)
        return s["add"] ** 2 + (s["prop"] * f) ** 2


def _expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-subject parameter copies ([N]) broadcast against [..., N, J]; scalars pass through."""
    return v.unsqueeze(-1) if v.dim() > 0 else v


ERROR_MODELS: dict[str, ErrorModel] = {
    "additive": Additive("additive", ("add",)),
    "proportional": Proportional("proportional", ("prop",)),
    "combined1": Combined1("combined1", ("add", "prop")),
    "combined2": Combined2("combined2", ("add", "prop")),
    "exponential": Additive("exponential", ("add",), log_scale=True),
}
_ALIASES = {"add": "additive", "prop": "proportional", "combined": "combined2", "comb1": "combined1",
            "comb2": "combined2", "log": "exponential", "ltbs": "exponential", "exp": "exponential"}


def get_error_model(name: str | ErrorModel) -> ErrorModel:
    """The residual-error model called ``name`` (case-insensitive; aliases ``add``, ``prop``, ``combined`` =
    ``combined2``, ``comb1``, ``comb2``, ``exp``/``log``/``ltbs`` = ``exponential``); an ErrorModel passes through.
    An unknown name raises ModelSpecError."""
    if isinstance(name, ErrorModel):
        return name
    key = _ALIASES.get(str(name).lower(), str(name).lower())
    if key not in ERROR_MODELS:
        raise ModelSpecError(f"unknown error model {name!r}; expected one of {sorted(ERROR_MODELS)}")
    return ERROR_MODELS[key]


def obs_loglik(
    y: torch.Tensor,
    f: torch.Tensor,
    var: torch.Tensor,
    mask: torch.Tensor,
    cens: torch.Tensor | None = None,
    limit: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-observation log density [..., N, J] (0 where ``mask`` is False), with M3 for censored records.

    The full Gaussian constant −½·log 2π is included for uncensored observations.
    """
    safe_var = torch.where(mask, var, torch.ones_like(var))
    r = torch.where(mask, y - f, torch.zeros_like(f))
    ll = -0.5 * (r * r / safe_var + torch.log(safe_var) + LOG_2PI)
    if cens is not None and bool((cens != 0).any()):
        sd = torch.sqrt(safe_var)
        lim = torch.where(cens != 0, limit, f.detach())
        z = torch.where(cens > 0, (lim - f) / sd, (f - lim) / sd)
        ll = torch.where(cens != 0, torch.special.log_ndtr(z), ll)
    return torch.where(mask, ll, torch.zeros_like(ll))
