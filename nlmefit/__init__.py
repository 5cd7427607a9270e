"""nlmefit: nonlinear mixed-effects models in PyTorch, from NONMEM-style panel data.

The public surface: ``Panel`` (data), ``Model`` and ``library`` (models), ``fit`` and the estimators,
``FitResult``, ``simulate``, ``datasets``.
"""
from __future__ import annotations

import torch as _torch  # noqa: F401  (import order: torch before the modules that use it)

from nlmefit import datasets
from nlmefit._version import __version__
from nlmefit.api import fit
from nlmefit.errors import DataError, EstimationError, ModelSpecError
from nlmefit.estimators import AGQ, FO, FOCE, FOCEI, SAEM, Laplace, get_estimator
from nlmefit.likelihood import loglik
from nlmefit.models import Model, Omega, Param, Params, fix, library
from nlmefit.panel import Panel
from nlmefit.results import FitResult
from nlmefit.simulation import Regimen, simulate, simulate_regimens


__all__ = [
    "DataError", "EstimationError", "ModelSpecError", "Panel", "Model", "Omega", "Param", "Params", "fix",
    "library", "fit", "loglik", "get_estimator", "FO", "FOCE", "FOCEI", "Laplace", "AGQ", "SAEM", "FitResult", "simulate", "simulate_regimens", "Regimen", "datasets",
    "__version__",
]
