"""``nlmefit.fit``: one call from a model and a DataFrame (or Panel) to a FitResult."""
from __future__ import annotations

from nlmefit.estimators import get_estimator

__all__ = ["fit"]


def fit(model, data, method: str = "focei", init=None, seed: int | None = None, **options):
    """Fit ``model`` to ``data`` (DataFrame in NONMEM event format, or Panel) by ``method``.

    ``method``: ``fo``, ``foce``, ``focei`` (default), ``laplace``; ``options`` go to the estimator
    (e.g. ``covariance="sandwich"|"r"|"s"|None``, ``maxiter``, ``hessian`` for Laplace, ``device``).
    ``init``: a dict of starting values by reporting name (``{"cl": 2.0, "omega_cl": 0.1, "sigma_add": 0.5}``).
    """
    return get_estimator(method, **options).fit(model, data, init=init, seed=seed)
