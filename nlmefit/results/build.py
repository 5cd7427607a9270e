"""Assemble a :class:`FitResult` from an estimator's optimum: OFV, covariance step, η̂, predictions, shrinkage."""
from __future__ import annotations

import platform
import warnings

import numpy as np
import pandas as pd
import torch

from nlmefit.estimators.objectives import LOG_2PI
from nlmefit.results.covariance import covariance_step
from nlmefit.results.fit_result import FitResult
from nlmefit.results.residuals import prediction_table

__all__ = ["build_result", "versions"]


def versions() -> dict:
    import scipy

    from nlmefit import __version__

    return {"nlmefit": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "scipy": scipy.__version__, "pandas": pd.__version__, "python": platform.python_version()}


def individual_table(model, p, data, eta_hat) -> pd.DataFrame:
    with torch.no_grad():
        ind = model.individual_parameters(p.detach(), eta_hat, data)
    cols = {"ID": np.asarray(data.panel.ids)}
    names = list(model.eta_names)
    for k in range(data.n_occ):
        names += [f"{n}_occ{k + 1}" for n in model.parameters.iov_names]
    for k, n in enumerate(names):
        cols[f"ETA_{n}"] = eta_hat[:, k].cpu().numpy()
    for k, v in ind.items():
        v = v.detach()
        v = v.expand(data.n_subjects, v.shape[-1] if v.dim() else 1)
        cols[k] = v[:, 0].cpu().numpy()  # value at the first observation when per-observation
    return pd.DataFrame(cols)


def build_result(estimator, model, data, p_hat, eta_hat, *, n_iter, converged, messages, elapsed, seed,
                 likelihood=None, extra=None, posterior_draws=None):
    """``likelihood`` (a :class:`~nlmefit.estimators.importance.LoglikEstimate`), when given, supplies the
    reported OFV instead of the estimator's own objective (SAEM: its objective is not an OFV)."""
    pset = model.parameters
    extra = dict(extra or {})
    if likelihood is not None:
        m2ll = likelihood.m2ll
        extra.setdefault("likelihoods", {})[likelihood.method] = likelihood.summary()
    else:
        with torch.enable_grad():
            m2 = estimator.subject_m2ll(model, p_hat, data, eta_hat).detach()
        m2ll = float(m2.sum())
    ofv = m2ll - data.n_uncensored * LOG_2PI
    estimates = pd.Series(pset.natural_dict(p_hat), dtype=float)
    cov_df, cov_ok, cov_msg, cond, kind = None, False, "not requested", None, estimator.covariance
    if estimator.covariance and pset.n_free:
        try:
            cs = covariance_step(estimator, model, data, p_hat, eta_hat, kind=estimator.covariance)
            cov_ok, cov_msg = cs.ok, cs.message
            if cs.cov is not None:
                cov_df = pd.DataFrame(cs.cov, index=cs.names, columns=cs.names)
                cond = cs.condition_number
            else:
                warnings.warn(f"covariance step failed: {cs.message}", stacklevel=3)
        except (torch.linalg.LinAlgError, RuntimeError) as err:
            cov_msg = f"covariance step failed: {err}"
            warnings.warn(cov_msg, stacklevel=3)
    preds = prediction_table(model, p_hat, data, eta_hat)
    ind = individual_table(model, p_hat, data, eta_hat)
    if posterior_draws is not None:
        names = [c[4:] for c in ind.columns if c.startswith("ETA_")]
        mean = posterior_draws.mean(0).cpu().numpy()
        sd = posterior_draws.std(0).cpu().numpy()
        for k, n in enumerate(names):
            ind[f"POSTMEAN_{n}"] = mean[:, k]
            ind[f"POSTSD_{n}"] = sd[:, k]
    om = torch.diagonal(p_hat.omega.detach()).cpu().numpy()
    eta_np = eta_hat[:, : model.n_iiv].cpu().numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        shr = 1 - eta_np.std(axis=0, ddof=1) / np.sqrt(om) if data.n_subjects > 1 else np.full(len(om), np.nan)
    iw = preds["IWRES"].to_numpy()
    iw = iw[np.isfinite(iw)]
    eps_shr = float(1 - iw.std(ddof=1)) if iw.size > 1 else None
    return FitResult(
        method=estimator.name, options=estimator.options(), estimates=estimates,
        fixed=sorted(pset.fixed_names()), ofv=ofv, loglik=-m2ll / 2, n_subjects=data.n_subjects,
        n_obs=data.n_obs, n_estimated=pset.n_free, converged=converged, n_iter=n_iter, elapsed_s=elapsed,
        messages=messages, seed=seed, versions=versions(), model_name=model.name, eta_names=model.eta_names,
        covariance=cov_df, covariance_ok=cov_ok, covariance_kind=kind, covariance_message=cov_msg,
        condition_number=cond, individual_estimates=ind, predictions=preds,
        eta_shrinkage=pd.Series(shr, index=model.eta_names), epsilon_shrinkage=eps_shr, model=model,
        extra=extra, data=data, posterior_draws=posterior_draws,
    )
