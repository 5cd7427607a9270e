"""One-step-ahead predictive log-likelihood: log p(y_ij | y_i,<j, doses, θ) for every observation.

The marginal likelihood factorises autoregressively, log p(y_i | θ) = Σ_j log p(y_ij | y_i,<j, θ): the first
observation is scored by the prior predictive (η ~ N(0, Ω)), every later one by the posterior predictive given the
observations before it (doses always stay in). Observations are taken in record order (time order) within each
subject; M3 records enter as their censored probabilities (the model's ``log_lik`` does that).

Two estimators, both batched over all subjects (the only Python loop is over the observation index j, each step a
tensor operation over every subject):

* ``"agq"`` (q ≤ 3 or so): log p(y_≤j) − log p(y_<j), each marginal by adaptive Gauss–Hermite quadrature at the
  prefix's own mode and exact Hessian (``data.with_mask``). Exact up to quadrature error, which vanishes when
  p(y_≤j, η) is Gaussian × a polynomial of degree < 2·n_nodes in η (exact for a linear-Gaussian model with any
  n_nodes); the terms telescope, so Σ_j equals the AGQ log p(y_i) at the full-data mode to rounding.
* ``"is"``: sequential importance sampling. Each subject starts with K draws from the prior (which is exactly the
  posterior given no observations, so the first score is a plain Monte-Carlo average of p(y_i1 | η)); after each
  observation the weights are multiplied by p(y_ij | η_k) and the score is the ratio Σ_k w_k p(y_ij | η_k) / Σ_k w_k.
  When the effective sample size of the updated weights falls below ``min_ess`` the subject's proposal is
  refreshed: new draws from the equal mixture of t's (``df``) at the Laplace posteriors given y_<j and given
  y_≤j (so a surprising y_j does not leave the numerator without draws), weights p(y_<j, η)/r(η). Between
  refreshes the scores telescope into one importance-sampling ratio, so a subject's total has a delta-method SE
  (segments with independent draws add in variance). Unbiased for p(y_i1) and consistent for every ratio.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from nlmefit._html import object_html
from nlmefit.diagnostics.decomposition import fit_parts
from nlmefit.diagnostics.decomposition_plots import plot_one_step
from nlmefit.marginal.laplace import laplace_posterior
from nlmefit.marginal.quadrature import agq_m2ll
from nlmefit.models.data import ObservationData
from nlmefit.models.parameters import Params
from nlmefit.models.protocol import LatentModel
from nlmefit.posteriors import seeded

__all__ = ["OneStepAhead", "one_step_ahead", "observation_rank"]


@dataclass
class OneStepAhead:
    """``table``: one row per observation (``ID``, ``TIME``, ``j`` (1-based rank within the subject), ``logp``,
    ``se``, and for IS ``ess`` and ``refreshed``); ``per_subject``: ID, logp (sum over the subject's
    observations), se, n_obs (and n_refresh for IS); ``total`` and ``total_se``."""

    table: pd.DataFrame
    per_subject: pd.DataFrame
    method: str
    options: dict

    @property
    def total(self) -> float:
        return float(self.per_subject["logp"].sum())

    @property
    def total_se(self) -> float:
        return float(np.sqrt((self.per_subject["se"] ** 2).sum()))

    def _repr_html_(self) -> str:
        lines = [f"Σ_j log p(y_j | y_<j) = {self.total:.3f} ± {self.total_se:.3f} ({self.method}, "
                 f"{len(self.table)} observations, {len(self.per_subject)} subjects)"]
        return object_html("One-step-ahead predictive log-likelihood", lines, [("per subject", self.per_subject)])

    def plot(self, **kwargs):
        """The score over time (:func:`~nlmefit.diagnostics.decomposition_plots.plot_one_step`)."""
        return plot_one_step(self, **kwargs)


def observation_rank(data: ObservationData) -> torch.Tensor:
    """0-based rank of each used observation within its subject in record order, −1 for padding [N, J]."""
    r = torch.cumsum(data.mask.to(torch.int64), -1) - 1
    return torch.where(data.mask, r, torch.full_like(r, -1))


def _times(data: ObservationData) -> np.ndarray:
    t = getattr(data.panel, "obs_time", None)
    if t is None or np.shape(t) != tuple(data.mask.shape):
        return np.tile(np.arange(data.mask.shape[1], dtype=float), (data.n_subjects, 1))
    return np.asarray(t, dtype=float)


def _frame(data: ObservationData, rank: torch.Tensor, logp: torch.Tensor, se: torch.Tensor,
           extra: dict[str, torch.Tensor]) -> pd.DataFrame:
    """Rows for the used observations, from per-subject-per-step tensors [N, nmax] (step = rank)."""
    m = data.mask.cpu().numpy()
    ii, jj = np.nonzero(m)
    rk = rank.cpu().numpy()[ii, jj]
    out = pd.DataFrame({"ID": data.ids[ii], "TIME": _times(data)[ii, jj], "j": rk + 1,
                        "logp": logp.cpu().numpy()[ii, rk], "se": se.cpu().numpy()[ii, rk]})
    for k, v in extra.items():
        out[k] = v.cpu().numpy()[ii, rk]
    return out


def _per_subject(data: ObservationData, logp: torch.Tensor, se: torch.Tensor) -> pd.DataFrame:
    return pd.DataFrame({"ID": data.ids, "logp": logp.sum(-1).cpu().numpy(), "se": se.cpu().numpy(),
                         "n_obs": data.mask.sum(-1).cpu().numpy()})


def one_step_ahead(fit: Any, method: str = "is", n_samples: int = 2000, n_nodes: int = 7, seed: int | None = 0,
                   min_ess: float | None = None, df: float = 4.0) -> OneStepAhead:
    """log p(y_ij | y_i,<j, θ) for every observation of ``fit`` at its estimates, by ``"is"`` (``n_samples``
    draws per subject, proposal refreshed when the ESS falls below ``min_ess``, default K/4) or ``"agq"``
    (``n_nodes`` per dimension)."""
    model, p, data = fit_parts(fit)
    p = p.detach()
    if method == "agq":
        return _one_step_agq(model, p, data, n_nodes)
    if method == "is":
        return _one_step_is(model, p, data, n_samples, seed, n_samples / 4 if min_ess is None else min_ess, df)
    raise ValueError(f"method must be 'is' or 'agq', got {method!r}")


def _one_step_agq(model: LatentModel, p: Params, data: ObservationData, n_nodes: int) -> OneStepAhead:
    rank = observation_rank(data)
    nmax = int(data.mask.sum(1).max())
    n = data.n_subjects
    prev = torch.zeros(n, dtype=data.dtype, device=data.device)  # log p(y_<1) = log 1
    eta = torch.zeros(n, data.q, dtype=data.dtype, device=data.device)
    steps = []
    for j in range(nmax):  # each step: every subject's prefix y_≤j at once
        sub = data.with_mask(rank <= j)
        eta = laplace_posterior(model, p, sub, eta0=eta).loc
        cur = (-0.5 * agq_m2ll(model, p, sub, eta, n_nodes)).detach()  # needs autograd for the Hessian
        steps.append(cur - prev)
        prev = cur
    logp = torch.stack(steps, -1)  # [N, nmax]; zero where a subject has fewer observations
    zero = torch.zeros_like(logp)
    table = _frame(data, rank, logp, zero, {})
    per = _per_subject(data, logp, torch.zeros(data.n_subjects, dtype=logp.dtype))
    return OneStepAhead(table, per, "agq", {"n_nodes": n_nodes})


def _lse(x: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(x, 0)


def _ratio_var(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Delta-method variance of log(mean a / mean b) with the same K draws: Var(a/ā − b/b̄)/K, [N]."""
    k = log_a.shape[0]
    u = torch.exp(log_a - _lse(log_a) + math.log(k)) - torch.exp(log_b - _lse(log_b) + math.log(k))
    return torch.nan_to_num(u.var(0, unbiased=True) / k, nan=0.0)


def _ess(log_w: torch.Tensor) -> torch.Tensor:
    return torch.exp(2 * _lse(log_w) - _lse(2 * log_w))


def _obs_terms(model: LatentModel, p: Params, eta: torch.Tensor, data: ObservationData,
               rank: torch.Tensor, nmax: int) -> torch.Tensor:
    """log p(y_ij | η_k) for every draw and used observation, [K, N, J] (0 at padding, NaN → −inf): one model
    evaluation when the model exposes ``obs_log_lik``, else one masked ``log_lik`` per observation rank."""
    if hasattr(model, "obs_log_lik"):
        terms = model.obs_log_lik(p, eta, data)
    else:
        terms = torch.zeros(*eta.shape[:-1], data.mask.shape[-1], dtype=data.dtype, device=data.device)
        for j in range(nmax):  # each step batched over every draw and subject
            cur = rank == j
            terms = torch.where(cur, model.log_lik(p, eta, data, mask=cur).unsqueeze(-1), terms)
    terms = torch.nan_to_num(terms, nan=-math.inf)
    return torch.where(data.mask, terms, torch.zeros_like(terms))


def _masked_sum(terms: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_j over the observations in ``mask`` [N, J] of terms [K, N, J] (a −inf outside the mask stays out)."""
    return torch.where(mask, terms, torch.zeros_like(terms)).sum(-1)


def _refresh(model: LatentModel, p: Params, data: ObservationData, rank: torch.Tensor, j: int, bad: torch.Tensor,
             eta: torch.Tensor, log_w: torch.Tensor, loc: torch.Tensor, df: float):
    """New draws for the subjects in ``bad`` from the equal mixture of t's at the Laplace posteriors given y_<j
    and given y_≤j (it covers both ends of the ratio p(y_≤j)/p(y_<j), also after a surprising observation);
    half the draws from each component (deterministic-mixture weights, unbiased). Returns (η, log w, modes, the
    new draws' per-observation log-likelihoods)."""
    k = eta.shape[0]
    before = data.mask & (rank < j) & (rank >= 0)
    upto = data.mask & (rank <= j) & (rank >= 0)
    with torch.enable_grad():  # the Laplace posteriors need autograd for their Hessians
        r1 = laplace_posterior(model, p, data.with_mask(before), eta0=loc, df=df)
        r2 = laplace_posterior(model, p, data.with_mask(upto), eta0=r1.loc, df=df)
    new = torch.cat([r1.sample((k // 2,)), r2.sample((k - k // 2,))]).to(data.dtype)
    log_r = torch.logaddexp(r1.log_prob(new), r2.log_prob(new)) - math.log(2.0)
    terms = _obs_terms(model, p, new, data, rank, int(data.mask.sum(1).max()))
    new_w = torch.nan_to_num(_masked_sum(terms, before) + model.log_prior(p, new, data.n_occ) - log_r, nan=-math.inf)
    return (torch.where(bad[None, :, None], new, eta), torch.where(bad[None], new_w, log_w),
            torch.where(bad[:, None], r2.loc, loc), terms)


def _one_step_is(model: LatentModel, p: Params, data: ObservationData, k: int, seed: int | None, min_ess: float,
                 df: float) -> OneStepAhead:
    if k < 2:
        raise ValueError(f"n_samples must be at least 2, got {k}")
    rank = observation_rank(data)
    nmax = int(data.mask.sum(1).max())
    n, dev = data.n_subjects, data.device
    steps, ses, esss, refreshed = [], [], [], []
    with torch.no_grad(), seeded(seed, dev):
        eta = model.sample_eta(p, n, data.n_occ, size=(k,)).to(data.dtype)  # [K, N, q]: exact for y_<1
        log_w = torch.zeros(k, n, dtype=data.dtype, device=dev)  # log p(y_<j, η)/r(η) up to the prior's 1
        log_w0 = log_w.clone()  # weights at the start of the subject's current segment
        seg_var = torch.zeros(n, dtype=data.dtype, device=dev)
        loc = torch.zeros(n, data.q, dtype=data.dtype, device=dev)
        terms = _obs_terms(model, p, eta, data, rank, nmax)  # [K, N, J], refreshed with the draws
        for j in range(nmax):  # one step = the j-th observation of every subject, batched
            cur = rank == j
            has = cur.any(-1)
            log_a = log_w + _masked_sum(terms, cur)
            bad = has & (_ess(log_a) < min_ess)
            if bool(bad.any()):  # refresh these subjects: t's at the Laplace posteriors given y_<j and y_≤j
                seg_var = seg_var + torch.where(bad, _ratio_var(log_w, log_w0), torch.zeros_like(seg_var))
                eta, log_w, loc, new_terms = _refresh(model, p, data, rank, j, bad, eta, log_w, loc, df)
                terms = torch.where(bad[None, :, None], new_terms, terms)
                log_w0 = torch.where(bad[None], log_w, log_w0)
                log_a = log_w + _masked_sum(terms, cur)
            step = _lse(log_a) - _lse(log_w)
            steps.append(torch.where(has, step, torch.zeros_like(step)))
            ses.append(torch.where(has, _ratio_var(log_a, log_w).sqrt(), torch.zeros_like(step)))
            esss.append(_ess(log_a))
            refreshed.append(bad)
            log_w = log_a
    seg_var = seg_var + _ratio_var(log_w, log_w0)
    logp, se = torch.stack(steps, -1), torch.stack(ses, -1)
    ess, ref = torch.stack(esss, -1), torch.stack(refreshed, -1)
    table = _frame(data, rank, logp, se, {"ess": ess, "refreshed": ref})
    if not np.all(np.isfinite(table["logp"])):
        bad_id = table.loc[~np.isfinite(table["logp"]), "ID"].iloc[0]
        raise ValueError(f"one-step-ahead IS: no draw with a finite likelihood for ID {bad_id}")
    low = table["ess"] < min(min_ess, 0.5 * k) / 2
    if low.any():
        warnings.warn(f"one-step-ahead IS: effective sample size below {min(min_ess, 0.5 * k) / 2:g} after "
                      f"refreshing for {int(low.sum())} observations (lowest {table['ess'].min():.1f}); use more "
                      f"samples", stacklevel=3)
    per = _per_subject(data, logp, seg_var.sqrt())
    per["n_refresh"] = ref.sum(-1).cpu().numpy()
    return OneStepAhead(table, per, "is", {"n_samples": k, "min_ess": min_ess, "df": df, "seed": seed})
