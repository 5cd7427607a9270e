"""``nlmefit.loglik``: the marginal likelihood of a fit at its estimates, by a method other than the fit's own.

    ll = nlmefit.loglik(fit, method="is", n_samples=5000, proposal="t")
    ll.ofv, ll.se, ll.per_subject            # −2LL (NONMEM convention), its Monte-Carlo SE, ESS per subject
    fit2 = fit.with_likelihood(ll)           # a new FitResult that records it (fit itself is unchanged)

Methods: ``is`` (importance sampling, proposals ``laplace`` | ``t`` | ``posterior`` — the fit's own posterior:
MCMC draws for SAEM/NUTS, the flow for VEM, Laplace otherwise), ``agq`` (adaptive Gauss–Hermite quadrature,
``n_nodes`` per dimension), and the approximations ``laplace``, ``focei``, ``foce``, ``fo``
(:func:`nlmefit.marginal.marginal_loglik` does the work).
"""
from __future__ import annotations

import numpy as np
import torch

from nlmefit.marginal.evaluate import PROPOSALS, marginal_loglik
from nlmefit.marginal.importance import LoglikEstimate

__all__ = ["loglik", "PROPOSALS"]


def _fit_inputs(fit, data):
    if fit.model is None:
        raise ValueError("this FitResult has no model attached (read from JSON?): use FitResult.from_json(path, "
                         "model=...) and pass data=")
    model = fit.model
    if data is None:
        data = fit.data
        if data is None:
            raise ValueError("this FitResult holds no data: pass data= (the DataFrame or Panel that was fitted)")
    elif not hasattr(data, "mask"):
        data = model.prepare(data)
    p = fit.population_parameters(device=data.y.device)
    eta0 = None
    ind = fit.individual_estimates
    if ind is not None:
        cols = [c for c in ind.columns if c.startswith("ETA_")]
        if len(cols) == data.q and len(ind) == data.n_subjects and np.array_equal(ind["ID"].to_numpy(), data.ids):
            eta0 = torch.as_tensor(np.array(ind[cols].to_numpy(float)), dtype=data.y.dtype, device=data.y.device)
    return model, p, data, eta0


def loglik(fit, method: str = "is", data=None, progress: bool | None = None, **options) -> LoglikEstimate:
    """Marginal −2LL of ``fit``'s model at its estimates (options: :func:`nlmefit.marginal.marginal_loglik`).
    ``progress``: a bar over the importance draws (or the AGQ stages), :mod:`nlmefit.progress`.

    ``proposal="posterior"`` uses the fit's posterior. Nothing is written into ``fit``: record the value with
    ``fit.with_likelihood(estimate)``, which returns a new FitResult."""
    model, p, data, eta0 = _fit_inputs(fit, data)
    if options.get("proposal") == "posterior" and options.get("posterior") is None:
        if fit.posterior is None or (data is not fit.data and fit.data is not None):
            raise ValueError(f"proposal='posterior' needs the fit's posterior draws or family on the fitted data; "
                             f"this {fit.method} fit has none here — use 'laplace' or 't'")
        options["posterior"] = fit.posterior
    return marginal_loglik(model, p, data, method=method, eta0=eta0, progress=progress, **options)
