"""Assemble a :class:`FitResult` from an estimator's optimum: OFV, covariance step, η̂, predictions, shrinkage.

The estimator hands over its :class:`~nlmefit.marginal.linearisation.Linearisation` (modes and per-subject
−2 log L); nothing here knows which estimator ran. Parts that need an optional model capability (the residual
table needs :class:`~nlmefit.models.protocol.Linearisable` and an error model, the individual-parameter table
:class:`~nlmefit.models.protocol.HasIndividualParameters`) are left out for models without it.
"""
from __future__ import annotations

import platform
import warnings
from collections.abc import Mapping

import numpy as np
import pandas as pd
import scipy
import torch

from nlmefit import parallel
from nlmefit._version import __version__
from nlmefit.errors import EstimationError, ModelSpecError
from nlmefit.marginal.approximations import LOG_2PI
from nlmefit.marginal.importance import LoglikEstimate
from nlmefit.marginal.laplace import laplace_posterior
from nlmefit.marginal.linearisation import Linearisation
from nlmefit.memory import map_subjects, subjects_per_chunk
from nlmefit.models.initial import initial_record
from nlmefit.models.protocol import HasIndividualParameters, Linearisable
from nlmefit.posteriors import GaussianPosterior
from nlmefit.results.checks import ofv_gradient, plausibility_warnings
from nlmefit.results.covariance import covariance_step
from nlmefit.results.fit_result import FitResult
from nlmefit.results.residuals import prediction_table

__all__ = ["build_result", "versions", "individual_table", "unmoved_parameters", "model_name"]

#: a free parameter "did not move" when |estimate − start| ≤ MOVE_RTOL·max(|start|, MOVE_FLOOR)
MOVE_RTOL = 1e-6
MOVE_FLOOR = 1e-8


def versions() -> dict:
    return {"nlmefit": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "scipy": scipy.__version__, "pandas": pd.__version__, "python": platform.python_version()}


def model_name(model) -> str:
    """The name a report should show: the model's own ``name``; for an :class:`nlmefit.Model` whose name is just
    its structure's (no ``name=`` given) but which has a custom parameter model or covariate effects, that
    structure name says too little, so those are named as well."""
    name = getattr(model, "name", None) or type(model).__name__
    structure = getattr(model, "structure", None)
    if structure is None or name != getattr(structure, "name", None):
        return name
    fn = getattr(model, "params_fn", None)
    if fn is not None:
        return f"{name} with custom parameter model {getattr(fn, '__qualname__', None) or repr(fn)}"
    terms = getattr(model, "terms", None) or []
    if terms:
        params = sorted({t.param for t in terms})
        return f"{name} with covariate effects on {', '.join(params)}"
    return name


def _eta_labels(model, data) -> list[str]:
    names = list(model.eta_names)
    iov = list(getattr(model.parameters, "iov_names", []))
    for k in range(data.n_occ):
        names += [f"{n}_occ{k + 1}" for n in iov]
    return names


def individual_table(model, p, data, eta_hat, posterior=None) -> pd.DataFrame:
    """ID, ETA_<name> (the conditional modes), the individual parameters where the model names them, and the
    posterior mean and SD of each η when the posterior is a set of draws."""
    cols = {"ID": data.ids}
    names = _eta_labels(model, data)
    for k, n in enumerate(names):
        cols[f"ETA_{n}"] = eta_hat[:, k].detach().cpu().numpy()
    if isinstance(model, HasIndividualParameters):
        with torch.no_grad():
            ind = model.individual_parameters(p.detach(), eta_hat, data)
        for k, v in ind.items():
            v = v.detach()
            v = v.expand(data.n_subjects, v.shape[-1] if v.dim() else 1)
            cols[k] = v[:, 0].cpu().numpy()  # value at the first observation when per-observation
    draws = getattr(posterior, "draws", None)
    if draws is not None:
        mean, sd = draws.mean(0).cpu().numpy(), draws.std(0).cpu().numpy()
        for k, n in enumerate(names):
            cols[f"POSTMEAN_{n}"] = mean[:, k]
            cols[f"POSTSD_{n}"] = sd[:, k]
    return pd.DataFrame(cols)


def _covariance(lin: Linearisation, model, data, p_hat, eta_hat, kind: str | None, prefix: str,
                size: int | None = None, shard=None):
    """(cov DataFrame | None, ok, message, condition number)."""
    if not kind or not model.parameters.n_free:
        return None, False, "not requested", None
    try:
        lin.check(model)
        cs = covariance_step(lin, model, data, p_hat, eta_hat, kind=kind, size=size, shard=shard)
    except ModelSpecError as err:
        return None, False, f"{prefix}not run: {err}", None
    except (torch.linalg.LinAlgError, RuntimeError) as err:
        msg = f"{prefix}covariance step failed: {err}"
        warnings.warn(msg, stacklevel=4)
        return None, False, msg, None
    if cs.cov is None:
        warnings.warn(f"{prefix}covariance step failed: {cs.message}", stacklevel=4)
        return None, False, prefix + cs.message, None
    return pd.DataFrame(cs.cov, index=cs.names, columns=cs.names), cs.ok, prefix + cs.message, cs.condition_number


def _default_posterior(model, p_hat, data, eta_hat, size: int | None = None, shard=None):
    """The Laplace posterior at the estimates (None where the curvature is not positive definite), ``size``
    subjects at a time (rank by rank under ``shard``)."""
    def chunk(d, e):
        try:
            post = laplace_posterior(model, p_hat, d, eta0=e.detach())
            return post.loc, post.scale_tril
        except (EstimationError, torch.linalg.LinAlgError, RuntimeError):  # NaN marks the failure for all ranks
            nan = torch.full((d.n_subjects, d.q), float("nan"), dtype=e.dtype, device=e.device)
            return nan, torch.diag_embed(nan)

    loc, tril = map_subjects(chunk, data, eta_hat, size, shard)
    if not bool(torch.isfinite(loc).all()):
        return None
    return GaussianPosterior(loc, tril, kind="laplace")


def _shrinkage(model, p_hat, data, eta_hat, preds):
    om = torch.diagonal(p_hat.omega.detach()).cpu().numpy()
    eta_np = eta_hat[:, : len(model.eta_names)].detach().cpu().numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        shr = 1 - eta_np.std(axis=0, ddof=1) / np.sqrt(om) if data.n_subjects > 1 else np.full(len(om), np.nan)
    eps_shr = None
    if preds is not None:
        iw = preds["IWRES"].to_numpy()
        iw = iw[np.isfinite(iw)]
        eps_shr = float(1 - iw.std(ddof=1)) if iw.size > 1 else None
    return pd.Series(shr, index=list(model.eta_names)), eps_shr


def unmoved_parameters(pset, p_hat) -> list[str] | None:
    """None when some free parameter moved from its start (the model's initial value), else the names of the
    free parameters (all of them stayed within a relative 1e-6 of their starts). Tensor-valued weights count
    as free parameters that moved when any element did."""
    free = set(pset.natural_names)
    if not free:
        return None
    start = pset.natural_dict(pset.initial(torch.float64))
    end = pset.natural_dict(p_hat.detach())
    names = []
    for k in pset.natural_names:
        a, b = float(start[k]), float(end[k])
        if not (np.isfinite(a) and np.isfinite(b)) or abs(b - a) > MOVE_RTOL * max(abs(a), MOVE_FLOOR):
            return None
        names.append(k)
    return names


def steady_state_note(model, data) -> str | None:
    """How the data's steady-state dose records (SS=1/2) were applied, for ``FitResult.messages`` (which
    result.json keeps, so a result read back still says it; the summary prints it as a note). Published reference
    runs on such sets sometimes dropped the SS column, which turns the SS record into a plain dose and moves the
    OFV (by about 1 on Oral_1CPT): the note says how to reproduce that. None without SS records."""
    panel = getattr(data, "panel", None)
    ss = getattr(panel, "dose_ss", None)
    if ss is None or not hasattr(data, "events") or not getattr(model, "needs_doses", True):
        return None
    rec = np.asarray(panel.dose_mask) & np.asarray(panel.dose_is_record)
    parts = []
    for code, how in ((1, "applied as steady state (reset: the state before the dose is the steady state of doses "
                          "every II)"), (2, "added as steady state to the current state")):
        sel = rec & (np.asarray(ss) == code)
        if sel.any():
            ii = ", ".join(f"{v:g}" for v in np.unique(np.asarray(panel.dose_ii)[sel]))
            parts.append(f"{int(sel.sum())} SS={code} dose record{'s' if sel.sum() > 1 else ''} {how}, with II from "
                         f"the data ({ii})")
    if not parts:
        return None
    return ("steady state: " + "; ".join(parts) + ". To reproduce a reference run that ignored them (SS records "
            "read as plain doses), drop the SS column (docs/data.md, 'Steady-state records')")


def build_result(estimator, model, data, p_hat, eta_hat, *, linearisation: Linearisation, n_iter: int,
                 converged: bool, messages: list[str], elapsed: float, seed: int | None,
                 likelihood: LoglikEstimate | None = None, traces: pd.DataFrame | None = None,
                 phases: Mapping[str, int] | None = None, acceptance: Mapping[str, float] | None = None,
                 mcmc: pd.DataFrame | None = None, posterior=None, covariance_prefix: str = "",
                 check_moved: bool = True) -> FitResult:
    """The FitResult of ``estimator`` at ``p_hat`` (modes ``eta_hat``).

    ``likelihood``, when given, supplies the reported OFV instead of ``linearisation``'s −2 log L (SAEM, NUTS:
    their objective is not an OFV). ``covariance_prefix`` says whose linearisation the covariance step used
    when it is not the estimator's own objective. With ``check_moved`` (off for a plain evaluation at the
    initial values, ``maxiter=0``) a fit whose free parameters all stayed at their starts is not converged:
    the data carried no information about them or the optimiser never left the start."""
    pset = model.parameters
    messages = list(messages)
    # per-subject work in memory-sized chunks, and rank by rank in a sharded run (:mod:`nlmefit.memory`)
    size = estimator.chunk_size(data) if hasattr(estimator, "chunk_size") else subjects_per_chunk(data)
    shard = parallel.current() if data.n_subjects > 1 else None
    stuck = unmoved_parameters(pset, p_hat) if check_moved else None
    if stuck:
        msg = (f"{estimator.name}: no free parameter moved from its initial value (relative change < "
               f"{MOVE_RTOL:g} for {', '.join(stuck)}); the estimates are the starting values, not a fit — check "
               f"that the data inform the model (doses, observations, DVID) and the initial values")
        warnings.warn(msg, stacklevel=4)
        messages.append(msg)
        converged = False
    ss_note = steady_state_note(model, data)
    if ss_note:
        messages.append(ss_note)
    likelihoods = {}
    if likelihood is not None:
        m2ll = likelihood.m2ll
        likelihoods[likelihood.method] = likelihood.summary()
    else:
        with torch.enable_grad():
            (m2_i,) = map_subjects(lambda d, e: (linearisation.subject_m2ll(model, p_hat, d, e),), data, eta_hat,
                                   size, shard)
            m2ll = float(m2_i.sum())
    cov_df, cov_ok, cov_msg, cond = _covariance(linearisation, model, data, p_hat, eta_hat,
                                                estimator.covariance, covariance_prefix, size, shard)
    preds = None
    if isinstance(model, Linearisable) and hasattr(model, "error") and hasattr(data, "events"):
        preds = prediction_table(model, p_hat, data, eta_hat, size, shard)
    if posterior is None:
        posterior = _default_posterior(model, p_hat, data, eta_hat, size, shard)
    eta_shr, eps_shr = _shrinkage(model, p_hat, data, eta_hat, preds)
    gradient = None
    if likelihood is None and check_moved and converged:  # the objective is the OFV: its gradient must vanish
        try:
            gradient = ofv_gradient(linearisation, model, data, p_hat, eta_hat, size, shard)
        except (RuntimeError, ValueError, EstimationError) as err:  # a diagnostic: say it, never fail the fit
            messages.append(f"the OFV gradient at the estimates could not be evaluated ({err})")
    fit_warnings = plausibility_warnings(pset, pd.Series(pset.natural_dict(p_hat), dtype=float),
                                         eta_shrinkage=eta_shr, gradient=gradient,
                                         covariance_requested=estimator.covariance is not None,
                                         covariance_ok=cov_ok, covariance_message=cov_msg, n_obs=data.n_obs)
    return FitResult(
        method=estimator.name, options=estimator.options(), estimates=pd.Series(pset.natural_dict(p_hat),
                                                                                dtype=float),
        fixed=sorted(pset.fixed_names()), ofv=m2ll - data.n_uncensored * LOG_2PI, loglik=-m2ll / 2,
        n_subjects=data.n_subjects, n_obs=data.n_obs, n_estimated=pset.n_free, converged=converged,
        n_iter=n_iter, elapsed_s=elapsed, messages=list(messages), seed=seed, versions=versions(),
        model_name=model_name(model), eta_names=list(model.eta_names),
        covariance=cov_df, covariance_ok=cov_ok, covariance_kind=estimator.covariance, covariance_message=cov_msg,
        condition_number=cond, individual_estimates=individual_table(model, p_hat, data, eta_hat, posterior),
        predictions=preds, eta_shrinkage=eta_shr, epsilon_shrinkage=eps_shr, likelihoods=likelihoods,
        traces=traces, phases=dict(phases or {}), acceptance=dict(acceptance or {}), mcmc=mcmc,
        weights={k: v.detach().cpu() for k, v in p_hat.weights.items()}, model=model, data=data,
        posterior=posterior, initial=initial_record(model), warnings=fit_warnings,
    )
