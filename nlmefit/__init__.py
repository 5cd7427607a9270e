"""nlmefit: nonlinear mixed-effects models in PyTorch, from NONMEM-style panel data.

The public surface: ``Panel`` (data), ``Model``, ``library`` and the ``LatentModel`` protocol (models), ``fit`` and
the estimators, ``FitResult``, ``loglik`` and the ``marginal`` and ``posteriors`` packages, ``simulate``,
``datasets``; ``progress`` (progress bars and logging of the long operations).
"""
from __future__ import annotations

import os as _os

# OpenMP reads its wait policy when torch starts it: set it first, unless the user chose one (nlmefit.threads)
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch as _torch  # noqa: F401  (import order: torch before the modules that use it)

from nlmefit import datasets, marginal, posteriors, progress
from nlmefit._version import __version__
from nlmefit.api import fit
from nlmefit.covariate_search import ScmResult, scm
from nlmefit.errors import DataError, EstimationError, ModelSpecError
from nlmefit.estimators import AGQ, FO, FOCE, FOCEI, NUTS, SAEM, VEM, Laplace, get_estimator
from nlmefit.likelihood import loglik
from nlmefit.models import Model, Omega, Param, Params, fix, library
from nlmefit.models.protocol import LatentModel
from nlmefit.nonmem import NonmemRun, from_nonmem
from nlmefit.panel import Panel
from nlmefit.profile_likelihood import ProfileResult, profile
from nlmefit.resampling import BootstrapResult, bootstrap
from nlmefit.results import FitResult
from nlmefit.simulation import Regimen, simulate, simulate_regimens

__all__ = [
    "DataError", "EstimationError", "ModelSpecError", "Panel", "Model", "Omega", "Param", "Params", "fix",
    "library", "fit", "loglik", "get_estimator", "FO", "FOCE", "FOCEI", "Laplace", "AGQ", "SAEM", "NUTS", "VEM",
    "FitResult", "simulate", "simulate_regimens", "Regimen", "datasets", "LatentModel", "marginal", "posteriors",
    "progress", "bootstrap", "BootstrapResult", "scm", "ScmResult", "from_nonmem", "NonmemRun", "profile",
    "ProfileResult", "__version__",
]
