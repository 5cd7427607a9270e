"""``nlmefit.fit``: one call from a model and a DataFrame (or Panel) to a FitResult."""
from __future__ import annotations

from nlmefit.estimators import get_estimator
from nlmefit.likelihood import loglik
from nlmefit.results.units import data_units

__all__ = ["fit"]


def fit(model, data, method: str = "focei", init=None, seed: int | None = None,
        compute_loglik: str | None = None, loglik_options: dict | None = None, **options):
    """Fit ``model`` to ``data`` (DataFrame in NONMEM event format, or Panel) by ``method``.

    ``method``: ``fo``, ``foce``, ``focei`` (default), ``laplace``, ``agq``, ``saem``, ``nuts``; ``options`` go to the
    estimator (e.g. ``covariance="sandwich"|"r"|"s"|None``, ``maxiter``, ``hessian`` for Laplace/AGQ,
    ``n_nodes`` for AGQ, ``n_explore``/``n_smooth`` for SAEM, ``device``).
    ``init``: a dict of starting values by reporting name (``{"cl": 2.0, "omega_cl": 0.1, "sigma_add": 0.5}``).
    ``compute_loglik``: also evaluate the marginal −2LL at the estimates by ``"is"`` or ``"agq"`` (options in
    ``loglik_options``, see :func:`nlmefit.loglik`); the value lands in ``result.likelihoods``. The fit's own
    ``ofv`` is unchanged (except SAEM's, which is always an IS or AGQ value).
    ``progress``: None (default: a bar when stderr is a terminal or in a notebook), True, False, or — for the
    classical estimators and SAEM — a callable ``(n, ofv)``; see :mod:`nlmefit.progress`.
    """
    result = get_estimator(method, **options).fit(model, data, init=init, seed=seed)
    units = data_units(data)  # df.attrs["units"]: the data's declared column units, shown in the summary
    if units:
        result = result.replace(source={**result.source, "units": units})
    if compute_loglik is not None:
        opts = dict(loglik_options or {})
        if seed is not None:
            opts.setdefault("seed", seed)
        prog = options.get("progress")
        opts.setdefault("progress", False if callable(prog) and not isinstance(prog, bool) else prog)
        result = result.with_likelihood(loglik(result, method=compute_loglik, **opts))
    return result
