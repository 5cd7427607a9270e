"""``nlmefit.loglik``: the marginal likelihood of a fit at its estimates, by a method other than the fit's own.

    ll = nlmefit.loglik(fit, method="is", n_samples=5000, proposal="t")
    ll.ofv, ll.se, ll.per_subject            # −2LL (NONMEM convention), its Monte-Carlo SE, ESS per subject

Methods: ``is`` (importance sampling, proposals ``laplace`` | ``t`` | ``posterior``), ``agq`` (adaptive
Gauss–Hermite quadrature, ``n_nodes`` per dimension), and the approximations ``laplace``, ``focei``, ``foce``,
``fo``. The exact methods (IS with many samples, AGQ with many nodes) are the yardstick the others are judged by.
"""
from __future__ import annotations

import numpy as np
import torch

from nlmefit.errors import ModelSpecError
from nlmefit.estimators.importance import (LoglikEstimate, importance_loglik, laplace_proposal,
                                           posterior_proposal)

__all__ = ["loglik", "loglik_at", "PROPOSALS"]

PROPOSALS = ("laplace", "t", "posterior")


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
    p = model.parameters.params_from_dict(fit.estimates.to_dict(), device=data.y.device)
    eta0 = None
    ind = fit.individual_estimates
    if ind is not None:
        cols = [c for c in ind.columns if c.startswith("ETA_")]
        if len(cols) == data.q and len(ind) == data.n_subjects and \
                np.array_equal(ind["ID"].to_numpy(), np.asarray(data.panel.ids)):
            eta0 = torch.as_tensor(np.array(ind[cols].to_numpy(float)), dtype=data.y.dtype, device=data.y.device)
    return model, p, data, eta0


def loglik(fit, method: str = "is", data=None, **options) -> LoglikEstimate:
    """Marginal −2LL of ``fit``'s model at its estimates; see :func:`loglik_at` for the options.

    ``proposal="posterior"`` uses the fit's posterior draws (SAEM). The result is also recorded in
    ``fit.extra["likelihoods"][method]`` (so it is serialised with the fit)."""
    model, p, data, eta0 = _fit_inputs(fit, data)
    if options.get("proposal") == "posterior" and "draws" not in options:
        if fit.posterior_draws is None:
            raise ValueError(f"proposal='posterior' needs posterior draws; a {fit.method} fit has none "
                             f"(SAEM keeps them); use 'laplace' or 't'")
        options["draws"] = fit.posterior_draws
    est = loglik_at(model, p, data, method=method, eta0=eta0, **options)
    fit.extra.setdefault("likelihoods", {})[est.method] = est.summary()
    return est


def loglik_at(model, p, data, method: str = "is", *, n_samples: int = 2000, proposal: str = "t",
              df: float | None = None, draws: torch.Tensor | None = None, n_nodes: int = 7,
              hessian: str = "exact", seed: int | None = 0, min_ess: float = 50.0,
              eta0: torch.Tensor | None = None) -> LoglikEstimate:
    """Marginal −2LL of ``model`` at parameters ``p`` on ``data`` (a ModelData).

    IS: ``n_samples`` draws per subject from ``proposal`` (``df`` degrees of freedom for ``t``, default 4; a
    ``posterior`` proposal needs ``draws`` [S, N, q]); ``seed`` makes it reproducible. AGQ: ``n_nodes`` per
    dimension, scale from the ``hessian`` (``exact`` | ``gauss-newton``)."""
    from nlmefit.estimators import get_estimator
    from nlmefit.estimators.quadrature import AGQ

    key = method.lower().replace("-", "").replace("_", "")
    if key == "is":
        if proposal not in PROPOSALS:
            raise ModelSpecError(f"proposal must be one of {PROPOSALS}, got {proposal!r}")
        if proposal == "posterior":
            if draws is None:
                raise ValueError("proposal='posterior' needs draws=[S, N, q] posterior samples")
            prop = posterior_proposal(draws.to(device=data.y.device, dtype=data.y.dtype), df=df)
        else:
            prop = laplace_proposal(model, p, data, eta0, df=(df or 4.0) if proposal == "t" else df)
        return importance_loglik(model, p, data, prop, n_samples=n_samples, seed=seed, min_ess=min_ess)
    est = AGQ(n_nodes=n_nodes, hessian=hessian) if key == "agq" else get_estimator(method)
    eta = torch.zeros(data.n_subjects, data.q, dtype=data.y.dtype, device=data.y.device) if eta0 is None else eta0
    pd_ = p.detach()
    eta_hat = est.modes(model, pd_, data, eta)
    with torch.enable_grad():
        m2 = est.subject_m2ll(model, pd_, data, eta_hat).detach().cpu().numpy()
    n = data.n_subjects
    return LoglikEstimate(np.asarray(data.panel.ids), -m2 / 2, np.zeros(n), np.full(n, np.nan), 0, "",
                          data.n_uncensored, method=est.name, n_nodes=n_nodes if key == "agq" else None)

