"""Marginal likelihoods log p(y_i | θ) and their approximations and bounds, given a model and a posterior.

Depends on :mod:`nlmefit.models` and :mod:`nlmefit.posteriors` only — never on the estimators, which are built
on top of it:

* :mod:`~nlmefit.marginal.approximations` — FO, FOCE, FOCE-I and Laplace per-subject −2 log L;
* :mod:`~nlmefit.marginal.quadrature` — adaptive Gauss–Hermite quadrature (exact for small dim η);
* :mod:`~nlmefit.marginal.importance` — importance sampling with a posterior as proposal, with its MC error;
* :mod:`~nlmefit.marginal.bounds` — ELBO and IWAE bounds for variational posteriors;
* :mod:`~nlmefit.marginal.laplace` — the Laplace posterior N(η̂_i, H_i⁻¹);
* :mod:`~nlmefit.marginal.evaluate` — ``marginal_loglik``: any of these by name at given parameters;
* :mod:`~nlmefit.marginal.linearisation` — (modes, per-subject −2 log L) strategies the result builder uses.
"""
from nlmefit.marginal.approximations import LOG_2PI
from nlmefit.marginal.bounds import elbo, iwae
from nlmefit.marginal.evaluate import PROPOSALS, marginal_loglik
from nlmefit.marginal.importance import LoglikEstimate, importance_loglik
from nlmefit.marginal.laplace import laplace_posterior
from nlmefit.marginal.linearisation import Conditional, Linearisation, Quadrature, get_linearisation
from nlmefit.marginal.quadrature import agq_m2ll, gauss_hermite_grid

__all__ = ["LOG_2PI", "elbo", "iwae", "marginal_loglik", "PROPOSALS", "LoglikEstimate", "importance_loglik",
           "laplace_posterior", "Linearisation", "Conditional", "Quadrature", "get_linearisation", "agq_m2ll",
           "gauss_hermite_grid"]
