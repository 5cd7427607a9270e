"""Likelihood-profile confidence intervals: ``nlmefit.profile(fit, ["cl", "v"])``, ``nlmefit profile RESULT_DIR``.

For a parameter ψ_j the profile is OFV_p(ψ_j) = min over the other parameters of the fit's objective with ψ_j held
fixed; the level-(1 − α) interval is {ψ_j : OFV_p(ψ_j) − OFV_min ≤ χ²₁(1 − α)} (3.84 at 95 %), the likelihood-ratio
test inverted — unlike the Wald interval est ± 1.96·SE it follows the likelihood's asymmetry and needs no
covariance step.

Method. Each parameter is profiled on the optimiser's unconstrained scale u_j (log for positive parameters, logit
between bounds), where pinning u_j pins ψ_j; Ω elements inside a block are not single coordinates there and are
refused. Both ends of every requested parameter are searched at once: every round refits all pending (parameter,
side) problems as replicas of the whole data set in one batched lockstep minimisation
(:func:`nlmefit.estimators.multistart.replica_minimize`, the pinned coordinate held by equal L-BFGS-B bounds),
each warm-started from its previous solution. The first trial is û_j ± z·SE(u_j) (Wald, z = √χ²); later trials
treat the signed root r(u) = √ΔOFV as linear in u — the exact shape for a quadratic profile — extrapolating from
the last point until the end is bracketed, then interpolating (regula falsi) inside the bracket, until
|ΔOFV − χ²| < ``tol``. An end that is not reached in ``max_rounds`` (a flat profile towards a bound) is reported
as NaN with ``lower_ok``/``upper_ok`` False. ΔOFV is measured from a refit of the unpinned problem run in the
same batch, so all OFVs come from one objective at one tolerance.
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy.stats import chi2

from nlmefit._html import object_html
from nlmefit.errors import EstimationError, ModelSpecError
from nlmefit.estimators.multistart import replica_minimize
from nlmefit.progress import progress_bar
from nlmefit.resampling import _check
from nlmefit.threads import limit_threads, resolve_threads

__all__ = ["profile", "ProfileResult"]


@dataclass
class ProfileResult:
    """Likelihood-profile intervals (``intervals``: parameter, estimate, lower, upper, wald_low, wald_high,
    lower_ok, upper_ok), every refit point (``points``: parameter, side, value, delta_ofv) and the settings."""

    intervals: pd.DataFrame
    points: pd.DataFrame
    level: float
    ofv: float
    method: str
    elapsed_s: float
    n_refits: int

    def plot(self, ncols: int = 3):
        """ΔOFV against each parameter with the χ² threshold and the interval ends; returns the Figure."""
        import matplotlib.pyplot as plt  # local: plotting is optional at import time

        names = list(self.intervals["parameter"])
        ncols = max(1, min(ncols, len(names)))
        nrows = -(-len(names) // ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 3.0 * nrows), squeeze=False)
        crit = chi2.ppf(self.level, 1)
        for ax, (_, row) in zip(axes.flat, self.intervals.iterrows()):
            pts = self.points[self.points["parameter"] == row["parameter"]].sort_values("value")
            ax.plot(pts["value"], pts["delta_ofv"], "o-", ms=3)
            ax.axhline(crit, color="grey", ls="--", lw=0.8)
            for x in (row["lower"], row["upper"]):
                if math.isfinite(x):
                    ax.axvline(x, color="C1", lw=0.8)
            ax.axvline(row["estimate"], color="k", lw=0.6)
            ax.set_xlabel(row["parameter"])
            ax.set_ylabel("ΔOFV")
        for ax in list(axes.flat)[len(names):]:
            ax.set_visible(False)
        fig.suptitle(f"likelihood profiles ({self.method}, {100 * self.level:g} %: ΔOFV ≤ {crit:.2f})")
        fig.tight_layout()
        return fig

    def _repr_html_(self) -> str:
        return object_html(f"likelihood-profile {100 * self.level:g} % intervals",
                           [f"{self.method} fit, OFV {self.ofv:.4f}; {self.n_refits} refits in {self.elapsed_s:.1f} s"],
                           [("intervals (Wald for comparison)", self.intervals)])


def profile(fit, params: Sequence[str] | None = None, *, level: float = 0.95, tol: float = 0.01,
            max_rounds: int = 12, progress: bool | None = None) -> ProfileResult:
    """Likelihood-profile intervals of ``params`` (reporting names; default: every typical value θ) of ``fit``, a
    FO/FOCE/FOCE-I/Laplace FitResult with its model and data attached (the method: module docstring).

    ``level``: interval level; ``tol``: how close ΔOFV must come to χ²₁(level) at each end; ``max_rounds``: batched
    refit rounds at most; ``progress``: a bar over the rounds (None: automatic)."""
    t0 = time.perf_counter()
    est, model, mdata, _ = _check(fit, 2, level, None, what="profile")
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise ModelSpecError(f"profile: tol must be positive, got {tol!r}")
    if isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or max_rounds < 1:
        raise ModelSpecError(f"profile: max_rounds must be a positive integer, got {max_rounds!r}")
    pset = model.parameters
    names = pset.natural_names
    dev = mdata.y.device
    p_hat = fit.population_parameters(device=dev)
    u_hat = pset.to_unconstrained(p_hat).detach().cpu().numpy()
    jac = _jacobian(pset, u_hat)  # d natural / d u [P, P]
    if params is None:
        params = [n for n in names if n in pset.theta]
    params = list(params)
    if not params:
        raise ModelSpecError("profile: no parameter to profile")
    cols = []
    for name in params:
        if name not in names:
            raise ModelSpecError(f"profile: {name!r} is not an estimated parameter of this fit "
                                 f"(estimated: {', '.join(names)})")
        j = names.index(name)
        off = np.abs(jac[:, j]).copy()
        off[j] = 0.0
        off_row = np.abs(jac[j]).copy()
        off_row[j] = 0.0
        if off.max() > 1e-10 or off_row.max() > 1e-10:
            raise ModelSpecError(f"profile: {name!r} is an element of a block Ω (it moves with other elements on "
                                 "the estimation scale); profile the parameters outside blocks")
        cols.append(j)
    crit = float(chi2.ppf(level, 1))
    z = math.sqrt(crit)
    x_hat = pset.to_natural_vector(p_hat).detach().cpu().numpy()
    se = fit.summary()["se"].reindex(names).to_numpy(float)  # NaN without a covariance step: _se_u's default
    # problems: (param position k, side ±1); state: evaluated (u, ΔOFV) and the warm start
    probs = [(k, s) for k in range(len(cols)) for s in (-1, 1)]
    seen: dict[tuple[int, int], list[tuple[float, float]]] = {p: [] for p in probs}
    warm = {p: u_hat.copy() for p in probs}
    done: dict[tuple[int, int], float] = {}
    nsub = mdata.n_subjects
    lin = est.linearisation
    eta_hat = lin.modes(model, p_hat, mdata, torch.zeros(nsub, mdata.q, dtype=torch.float64, device=dev)).detach()
    options = dict(maxiter=est.maxiter, maxcor=30, ftol=1e-13, gtol=est.gtol, maxls=50)
    ofv_min, n_refits, rows = math.inf, 0, []
    bar = progress_bar(max_rounds, "profile rounds", "round", enabled=progress)
    with bar:
        for rnd in range(max_rounds):
            pending = [p for p in probs if p not in done]
            if not pending:
                break
            trials = [_next_trial(seen[p], u_hat[cols[p[0]]], p[1], _se_u(se, jac, cols[p[0]]), z, crit)
                      for p in pending]
            reps = pending + ([None] if rnd == 0 else [])  # round 0 also refits the unpinned problem
            U0, bounds = [], []
            for p, t in zip(reps, trials + [None] * (len(reps) - len(trials))):
                if p is None:
                    U0.append(u_hat.copy())
                    bounds.append(None)
                    continue
                u0 = warm[p].copy()
                u0[cols[p[0]]] = t
                U0.append(u0)
                bounds.append([(t, t) if i == cols[p[0]] else (None, None) for i in range(len(u_hat))])
            threads = resolve_threads(est.threads, len(reps) * nsub, len(reps) * mdata.n_obs)
            with limit_threads(threads):
                res = replica_minimize(model, lin, mdata, [np.arange(nsub)] * len(reps), np.array(U0), options,
                                       eta0=eta_hat.repeat(len(reps), 1), bounds=bounds)
            n_refits += len(reps)
            if rnd == 0:
                ofv_min = min(float(res[-1].fun), _raw_ofv(fit, mdata))
                if not math.isfinite(ofv_min):
                    raise EstimationError("profile: the refit at the estimates has no finite objective")
            for p, t, r in zip(pending, trials, res):
                delta = float(r.fun) - ofv_min if r.fun < 1e20 else math.inf
                warm[p] = np.asarray(r.x, dtype=float)
                seen[p].append((t, delta))
                value = float(pset.to_natural_vector(pset.from_unconstrained(
                    torch.as_tensor(r.x, dtype=torch.float64))).detach().numpy()[cols[p[0]]])
                rows.append({"parameter": params[p[0]], "side": "lower" if p[1] < 0 else "upper", "value": value,
                             "delta_ofv": delta, "round": rnd})
                if math.isfinite(delta) and abs(delta - crit) < tol:
                    done[p] = value
            bar.update(1)
    points = pd.DataFrame(rows, columns=["parameter", "side", "value", "delta_ofv", "round"])
    if len(points) and points["delta_ofv"].min() < -max(tol, 1e-3):
        low = points.loc[points["delta_ofv"].idxmin()]
        raise EstimationError(f"profile: holding {low['parameter']} at {low['value']:.6g} gives an OFV "
                              f"{-low['delta_ofv']:.3f} below the fit's: the fit is not at its minimum; refit "
                              "(e.g. with n_starts) before profiling")
    out = []
    for k, name in enumerate(params):
        j = cols[k]
        wl, wh = x_hat[j] - z * se[j], x_hat[j] + z * se[j]
        out.append({"parameter": name, "estimate": float(x_hat[j]), "lower": done.get((k, -1), math.nan),
                    "upper": done.get((k, 1), math.nan), "wald_low": float(wl), "wald_high": float(wh),
                    "lower_ok": (k, -1) in done, "upper_ok": (k, 1) in done})
    return ProfileResult(intervals=pd.DataFrame(out), points=points, level=float(level),
                         ofv=float(fit.ofv), method=str(fit.method), elapsed_s=time.perf_counter() - t0,
                         n_refits=n_refits)


# ---------------------------------------------------------------------- helpers
def _jacobian(pset, u_hat: np.ndarray) -> np.ndarray:
    u = torch.as_tensor(u_hat, dtype=torch.float64)
    return torch.autograd.functional.jacobian(
        lambda v: pset.to_natural_vector(pset.from_unconstrained(v)), u).detach().numpy()


def _se_u(se: np.ndarray, jac: np.ndarray, j: int) -> float:
    """SE on the unconstrained scale (delta method); 0.3 when the fit has no SE (no covariance step)."""
    s = se[j] / abs(jac[j, j]) if jac[j, j] != 0 else math.nan
    return float(s) if math.isfinite(s) and s > 0 else 0.3


def _raw_ofv(fit, mdata) -> float:
    """The fit's OFV on the replica objective's scale (n·log 2π included)."""
    n_unc = int((mdata.mask & (mdata.cens == 0)).sum())
    return float(fit.ofv) + n_unc * math.log(2 * math.pi)


def _next_trial(seen: list[tuple[float, float]], u_hat: float, side: int, se_u: float, z: float,
                crit: float) -> float:
    """Next pinned value: Wald first; then r = √ΔOFV linear in u (extrapolate, or regula falsi once bracketed)."""
    if not seen:
        return u_hat + side * z * se_u
    pts = [(abs(u - u_hat), math.sqrt(max(d, 0.0)) if math.isfinite(d) else math.inf) for u, d in seen]
    below = [(a, r) for a, r in pts if r < z]
    above = [(a, r) for a, r in pts if r >= z]
    if below and above:
        a0, r0 = max(below)  # the farthest point inside, the nearest point outside
        a1, r1 = min(above)
        if not math.isfinite(r1):
            a = 0.5 * (a0 + a1)
        else:
            a = a0 + (z - r0) * (a1 - a0) / (r1 - r0)
    elif below:
        a0, r0 = max(below)
        a = a0 * min(z / r0 * 1.05, 4.0) if r0 > 1e-8 else 2.0 * max(a0, se_u)
    else:
        a1, r1 = min(above)
        a = a1 * max(z / r1, 0.25) if math.isfinite(r1) else 0.5 * a1
    return u_hat + side * a
