"""Plausibility checks of a fit's estimates: the warnings a pharmacometrician reads before trusting an optimum.

A wrong answer that says "converged" is the worst defect an estimation tool can have (GUIDE §9): on the
``Bolus_2CPT`` benchmark set a FOCE-I fit from generic starts "converged" to an OFV hundreds of units above the
truth's, with ω²_V = 2.65 (a 260 % CV) and V half its true value, and nothing said so. Each rule below flags one
symptom of such an optimum (or of an ill-posed model); none of them changes the estimates.

* **on a bound** — a free THETA/SIGMA within ``bound_rtol`` (relative, or absolute at a zero bound) of a finite
  lower or upper bound: the optimum is constrained, its SE and the OFV comparison are not what they seem.
* **large IIV** — a free diagonal Ω (or IOV) variance above ``max_omega`` (default 1.0, a CV of 131 % for a
  log-normal parameter): usually a compensating local optimum or an unidentifiable parameter.
* **η-shrinkage** above ``max_shrinkage`` (default 50 %): the data carry little information on that η, so EBE
  diagnostics and EBE-based covariate searches mislead (Savic & Karlsson 2009 use 20–30 % as a caution level).
* **gradient not small** — for estimators whose objective *is* the reported OFV (FO, FOCE, FOCE-I, Laplace, AGQ):
  the largest |∂OFV/∂ log x| over the free natural parameters x (θ, σ, Ω variances; ∂OFV/∂x for covariances and
  parameters that may be negative) above ``max_gradient`` (default 0.05 OFV units per e-fold — a step of 1 % in x
  would still lower the OFV by 5e-4), times √(n_obs/1000) above 1000 observations: the OFV's curvature grows with
  the data, so the decrease a gradient g still promises, ≈ g²/(2·curvature), shrinks with it (at a million
  subjects a fixed 0.05 fired on σ at |g| = 0.15 with a relative OFV change of 1e-8). The optimiser stopped before
  the optimum (:func:`ofv_gradient`).
* **covariance step failed** — the covariance step was asked for and did not give a positive-definite matrix.

:func:`plausibility_warnings` returns the messages (each naming the parameter and the value); the result
builder stores them in ``FitResult.warnings`` (and result.json) and the summary prints them.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from nlmefit.memory import subject_slices

__all__ = ["THRESHOLDS", "plausibility_warnings", "ofv_gradient"]

#: default thresholds (see the module docstring)
THRESHOLDS = {"bound_rtol": 1e-3, "max_omega": 1.0, "max_shrinkage": 50.0, "max_gradient": 0.05}


def _near(value: float, bound: float, rtol: float) -> bool:
    return math.isfinite(bound) and abs(value - bound) <= rtol * max(1.0, abs(bound))


def plausibility_warnings(pset, estimates: pd.Series, *, eta_shrinkage: pd.Series | None = None,
                          gradient: Mapping[str, float] | None = None, covariance_requested: bool = False,
                          covariance_ok: bool = True, covariance_message: str = "",
                          thresholds: Mapping[str, float] | None = None, n_obs: int | None = None) -> list[str]:
    """The plausibility warnings of estimates ``estimates`` (by reporting name) of a model with parameter set
    ``pset``; ``gradient``: ∂OFV/∂u by free parameter name, where the estimator's objective is the OFV;
    ``n_obs``: the number of observations, which scales the gradient threshold above 1000."""
    th = {**THRESHOLDS, **(thresholds or {})}
    max_gradient = th["max_gradient"] * max(1.0, math.sqrt((n_obs or 0) / 1000.0))
    out: list[str] = []
    bounded = [(n, p) for n, p in pset.theta.items()] + [(f"sigma_{n}", p) for n, p in pset.sigma.items()]
    for name, par in bounded:
        if par.fixed or name not in estimates.index:
            continue
        v = float(estimates[name])
        for side, bound in (("lower", par.lower), ("upper", par.upper)):
            if _near(v, bound, th["bound_rtol"]):
                out.append(f"{name} = {v:.6g} is on its {side} bound ({bound:g}): the optimum is constrained; "
                           f"check the model and the initial values before using its SE or OFV")
    omega_names = [f"omega_{n}" for n in pset.omega.names] + [f"omega_iov_{n}" for n in getattr(pset, "iov_names", ())]
    for name in omega_names:
        if name in estimates.index and float(estimates[name]) > th["max_omega"]:
            v = float(estimates[name])
            out.append(f"{name} = {v:.4g} is a very large IIV variance (> {th['max_omega']:g}; "
                       f"{100 * math.sqrt(math.expm1(min(v, 700.0))):.0f} % CV if log-normal): often a compensating "
                       f"local optimum or an unidentifiable parameter — try other starts (n_starts=, --starts)")
    if eta_shrinkage is not None:
        for name, s in eta_shrinkage.items():
            if np.isfinite(s) and float(s) > th["max_shrinkage"]:
                out.append(f"eta-shrinkage of {name} is {float(s):.0f} % (> {th['max_shrinkage']:g} %): the data "
                           f"carry little information on it; individual estimates and EBE diagnostics of {name} "
                           f"are pulled to the typical value")
    if gradient:
        big = {k: g for k, g in gradient.items() if np.isfinite(g) and abs(g) > max_gradient}
        bad = [k for k, g in gradient.items() if not np.isfinite(g)]
        if big:
            k = max(big, key=lambda n: abs(big[n]))
            out.append(f"the OFV gradient at the estimates is not small: |dOFV/du| = {abs(big[k]):.3g} for {k} "
                       f"(> {max_gradient:.3g}; u = log of a positive parameter){_others(big, k)}: the "
                       f"optimiser stopped before the optimum — refit from the estimates or raise maxiter")
        if bad:
            out.append(f"the OFV gradient at the estimates is not finite for {', '.join(bad)}")
    if covariance_requested and not covariance_ok:
        out.append("the covariance step failed" + (f": {covariance_message}" if covariance_message else "")
                   + " — standard errors are unavailable; a failed covariance step often marks a saddle point "
                     "or an over-parameterised model")
    return out


def _others(big: Mapping[str, float], top: str) -> str:
    rest: Sequence[str] = [k for k in big if k != top]
    return f" and {len(rest)} more ({', '.join(rest)})" if rest else ""


def ofv_gradient(linearisation, model, data, p_hat, eta_hat, size: int | None = None,
                 shard=None) -> dict[str, float]:
    """∂OFV/∂ log x (x > 0 by its bounds or a variance) or ∂OFV/∂x, by free natural parameter name, of the
    objective ``linearisation`` defines, at ``p_hat`` with the modes started at ``eta_hat`` (their implicit
    derivative included, as in the estimator's own gradient). One objective evaluation and one backward pass per
    chunk of ``size`` subjects; under ``shard`` each rank its own subjects, the gradient all-reduced."""
    pset = model.parameters
    x = pset.to_natural_vector(p_hat).detach().clone().requires_grad_(True)
    rows = None if shard is None else shard.rows(data)
    local = data if rows is None else data.index(rows)
    leta = (eta_hat if rows is None else eta_hat[rows]).detach()
    g = torch.zeros_like(x)
    used = False
    for sl in subject_slices(local.n_subjects, size) if local.n_subjects else []:  # memory-sized chunks
        with torch.enable_grad():
            d = local if sl == slice(0, local.n_subjects) else local.index(sl)
            m2 = linearisation.subject_m2ll(model, pset.from_natural_vector(x), d, leta[sl]).sum()
            (gk,) = torch.autograd.grad(m2, x, allow_unused=True)
        if gk is not None:
            g, used = g + gk, True
    if shard is not None:
        tot = shard.allreduce_sum(torch.cat([g, torch.tensor([float(used)], dtype=g.dtype, device=g.device)]))
        g, used = tot[:-1], bool(tot[-1] > 0)
    if not used:
        return {}
    names = pset.natural_names
    lower = {k: p.lower for k, p in pset.theta.items()} | {f"sigma_{k}": p.lower for k, p in pset.sigma.items()}
    diag = {e[0] for e in pset._omega_entries(pset.omega, "omega") if e[1] == e[2]}
    if pset.omega_iov is not None:
        diag |= {e[0] for e in pset._omega_entries(pset.omega_iov, "omega_iov") if e[1] == e[2]}
    out = {}
    for name, gk, xk in zip(names, g.tolist(), x.detach().tolist()):
        positive = xk > 0 and (lower.get(name, -math.inf) >= 0 or name in diag)
        out[name] = gk * xk if positive else gk
    return out
