"""Counterfactual dosing: what concentrations would a population — or an observed subject — have under regimens
that were never given?

    sim = nlmefit.simulate_regimens(fit, ["1000 mg loading then 500 mg q12h x14, infusion 1h", "500 mg q8h x21"],
                                    population=1000, seed=1)            # virtual subjects, η ~ N(0, Ω)
    sim = nlmefit.simulate_regimens(fit, "500 mg q12h x14", subjects="observed", n_draws=200)  # η ~ p(η | y_i)
    sim.quantiles(); sim.exposures; sim.pta("auc", 400, mic=1.0); sim.plot_profiles()

**Population** (``population=N``): η ~ N(0, Ω); covariates resampled with replacement from the fitted subjects
(``covariates="observed"``, default) or taken from a table (one row per virtual subject); with
``uncertainty=True`` each virtual subject also gets its own θ drawn from N(θ̂, Cov(θ̂)) of the covariance step
(the predictive distribution that integrates over parameter uncertainty; Ω and σ stay at their estimates).

**Observed subjects** (``subjects="observed"`` or a list of IDs): ``n_draws`` η per subject from that subject's
posterior: ``posterior="laplace"`` — N(η̂_i, H_i⁻¹); ``"is"`` — sampling–importance–resampling from a t
proposal (exact posterior as the number of proposals grows); ``"draws"`` — the estimator's own posterior draws
(SAEM's chains, later VEM's q_i). The subject keeps its covariates.

Batched: every regimen is one template subject (its dose records and the time grid); the S virtual or
posterior copies are that template's events repeated, with per-copy covariates, doses scaled for mg/kg
regimens, and one ``model.predict`` call per chunk of copies — no Python loop over subjects. Time-constant
covariates only (a counterfactual subject carries no observed covariate history).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from nlmefit.errors import ModelSpecError
from nlmefit.models.model import Model, ModelData
from nlmefit.models.parameters import Params
from nlmefit.simulation.simulate import resolve_params

__all__ = ["RegimenSimulation", "simulate_regimens", "as_regimen"]


def as_regimen(r):
    """A :class:`~nlmefit.simulation.regimen.Regimen` from a Regimen or its string form."""
    from nlmefit.simulation.regimen import Regimen

    if isinstance(r, Regimen):
        return r
    if isinstance(r, str):
        return Regimen.parse(r)
    raise ModelSpecError(f"a regimen must be a Regimen or a string such as '500 mg q12h x14', got {type(r).__name__}")


@dataclass
class RegimenSimulation:
    """Profiles [R, S, T] (DV scale) for R regimens × S simulated subjects × T times, and their exposures."""

    regimens: list
    labels: list[str]
    times: np.ndarray  # [T]
    profiles: np.ndarray  # [R, S, T]
    subject_ids: np.ndarray  # [S] source subject (observed ID, or virtual index 1..S)
    draw: np.ndarray  # [S] draw number within a subject (0 for population simulations)
    covariates: pd.DataFrame  # [S] rows: covariates of each simulated subject
    parameters: pd.DataFrame  # [S] rows: individual structural parameters of each simulated subject
    exposures: pd.DataFrame  # one row per regimen × simulated subject
    mode: str  # "population" or "observed"
    residual: bool
    interval: list[tuple[float, float]]  # per regimen, the exposure interval

    def profile_frame(self, max_subjects: int | None = None) -> pd.DataFrame:
        """Tidy profiles: REGIMEN, ID, DRAW, TIME, CONC (first ``max_subjects`` simulated subjects)."""
        R, S, T = self.profiles.shape
        s = S if max_subjects is None else min(S, max_subjects)
        return pd.DataFrame({
            "REGIMEN": np.repeat(np.asarray(self.labels, dtype=object), s * T),
            "ID": np.tile(np.repeat(self.subject_ids[:s], T), R),
            "DRAW": np.tile(np.repeat(self.draw[:s], T), R),
            "TIME": np.tile(self.times, R * s),
            "CONC": self.profiles[:, :s, :].reshape(-1),
        })

    def quantiles(self, probs: Sequence[float] = (0.05, 0.5, 0.95)) -> pd.DataFrame:
        """Concentration quantiles over simulated subjects per regimen and time (tidy)."""
        q = np.nanquantile(self.profiles, probs, axis=1)  # [P, R, T]
        out = []
        for r, lab in enumerate(self.labels):
            d = {"REGIMEN": lab, "TIME": self.times}
            for k, pr in enumerate(probs):
                d[f"q{100 * pr:g}"] = q[k, r]
            out.append(pd.DataFrame(d))
        return pd.concat(out, ignore_index=True)

    def summary(self, probs: Sequence[float] = (0.05, 0.5, 0.95)) -> pd.DataFrame:
        """Quantiles of every exposure metric per regimen."""
        metrics = [c for c in self.exposures.columns if c not in ("REGIMEN", "ID", "DRAW", "AUC_METHOD")]
        g = self.exposures.groupby("REGIMEN", sort=False)[metrics]
        out = g.quantile(list(probs)).unstack()
        out.columns = [f"{m}_q{100 * p:g}" for m, p in out.columns]
        return out.reindex(self.labels)

    def pta(self, metric: str, threshold: float | None = None, *, mic: float | Sequence[float] | None = None,
            window: tuple[float, float] | None = None) -> pd.DataFrame:
        """Probability of target attainment per regimen (see :func:`nlmefit.simulation.exposure.pta`)."""
        from nlmefit.simulation.exposure import pta

        return pta(self.exposures, metric, threshold, mic=mic, window=window, order=self.labels)

    def plot_profiles(self, probs=(0.05, 0.5, 0.95), ax=None, log_y: bool = False):
        from nlmefit.simulation.plots import plot_profile_bands

        return plot_profile_bands(self, probs=probs, ax=ax, log_y=log_y)

    def plot_exposures(self, metric: str = "AUC", ax=None):
        from nlmefit.simulation.plots import plot_exposure_distributions

        return plot_exposure_distributions(self, metric=metric, ax=ax)


# ---------------------------------------------------------------------------------------------- data plumbing
def _template(model: Model, records: pd.DataFrame, times: np.ndarray, cov_names, device):
    """ModelData of one subject: ``records`` (dose rows, ID 1) + observation rows at ``times``."""
    from nlmefit.panel import Panel

    obs = pd.DataFrame({"ID": 1, "TIME": times.astype(float), "AMT": 0.0, "EVID": 0, "MDV": 0, "DV": np.nan})
    if "CMT" in records:
        obs_cmt = 2 if model.structure.oral else 1
        obs["CMT"] = obs_cmt
    recs = pd.concat([records.assign(ID=1), obs], ignore_index=True, sort=False)
    for c in ("RATE", "II", "ADDL", "SS"):
        if c in recs:
            recs[c] = recs[c].fillna(0.0)
    for n in cov_names:
        recs[n] = 0.0
    order = np.lexsort((-recs["EVID"].to_numpy(), recs["TIME"].to_numpy()))  # doses before observations
    recs = recs.iloc[order].reset_index(drop=True)
    panel = Panel.from_dataframe(recs, require_dv=False)
    return model.prepare(panel, device=device, check_likelihood=False)


def _copies(data1: ModelData, cov: dict[str, torch.Tensor], dose_scale: torch.Tensor | None,
            s: int, broadcast: bool) -> ModelData:
    """S copies of a one-subject template with per-copy covariates [S, 1] and dose scaling [S] (mg/kg).

    Closed-form structures broadcast a one-subject design against [S, 1] parameters, so the design tensors stay
    [1, ...] (the dose-by-observation work is done once, not S times); other structures get expanded views."""
    ev = data1.events
    if not broadcast:
        ev = replace(ev, **{f.name: getattr(ev, f.name).expand(s, *getattr(ev, f.name).shape[1:]).contiguous()
                            for f in fields(ev)})
    if dose_scale is not None:
        sc = dose_scale.unsqueeze(-1)
        ev = replace(ev, dose_amt=ev.dose_amt * sc, dose_rate=torch.where(ev.dose_rate > 0, ev.dose_rate * sc,
                                                                             ev.dose_rate))

    def ex(t: torch.Tensor) -> torch.Tensor:
        return t.expand(s, *t.shape[1:])

    return replace(data1, events=ev, y=ex(data1.y), mask=ex(data1.mask), cens=ex(data1.cens),
                   limit=ex(data1.limit), occ=ex(data1.occ), cov={k: cov[k] for k in data1.cov})


def _broadcasts(model: Model) -> bool:
    from nlmefit.models.structure import ClosedForm

    return isinstance(model.structure, ClosedForm)


def _params_on(p: Params, device) -> Params:
    return Params({k: v.to(device) for k, v in p.theta.items()}, p.omega.to(device),
                  {k: v.to(device) for k, v in p.sigma.items()},
                  None if p.omega_iov is None else p.omega_iov.to(device))


def _theta_uncertainty(fit, p: Params, s: int, gen: torch.Generator) -> Params:
    """Per-subject copies of θ drawn from N(θ̂, Cov(θ̂)) (natural scale; draws outside bounds are redrawn)."""
    cov = getattr(fit, "covariance", None)
    if cov is None or not getattr(fit, "covariance_ok", False):
        raise ModelSpecError("uncertainty=True needs a fit with a successful covariance step")
    pset = fit.model.parameters
    names = [n for n in cov.index if n in pset.theta]
    if not names:
        return p
    C = torch.as_tensor(np.array(cov.loc[names, names].to_numpy(float)), dtype=torch.float64)
    mean = torch.stack([p.theta[n].cpu() for n in names])
    L = torch.linalg.cholesky(C + 1e-300 * torch.eye(len(names), dtype=torch.float64))
    lo = torch.tensor([pset.theta[n].lower for n in names], dtype=torch.float64)
    hi = torch.tensor([pset.theta[n].upper for n in names], dtype=torch.float64)
    draws = mean + torch.randn(s, len(names), generator=gen, dtype=torch.float64) @ L.T
    for _ in range(20):  # redraw the few that fall outside the bounds
        bad = ((draws <= lo) | (draws >= hi)).any(-1)
        if not bool(bad.any()):
            break
        redo = mean + torch.randn(int(bad.sum()), len(names), generator=gen, dtype=torch.float64) @ L.T
        draws[bad] = redo
    draws = torch.minimum(torch.maximum(draws, lo + 1e-12), hi - 1e-12)
    theta = dict(p.theta)
    dev = p.omega.device
    for k, n in enumerate(names):
        theta[n] = draws[:, k].to(dev)
    for n, v in list(theta.items()):
        if v.dim() == 0:
            theta[n] = v.expand(s)
    return Params(theta, p.omega, p.sigma, p.omega_iov)


def _posterior_draws(fit, model, p, data_obs: ModelData, n_draws: int, posterior: str, gen) -> torch.Tensor:
    """[n_draws, N, q] draws of η_i | y_i for every observed subject."""
    from nlmefit.estimators.importance import laplace_proposal

    n = data_obs.n_subjects
    eta0 = None
    ind = fit.individual_estimates
    if ind is not None:
        cols = [c for c in ind.columns if c.startswith("ETA_")]
        if len(cols) == data_obs.q and len(ind) == n:
            eta0 = torch.as_tensor(np.array(ind[cols].to_numpy(float)), dtype=data_obs.y.dtype,
                                   device=data_obs.y.device)
    if posterior == "draws":
        dr = getattr(fit, "posterior_draws", None)
        if dr is None:
            raise ModelSpecError(f"posterior='draws' needs posterior draws; a {fit.method} fit has none (SAEM "
                                 f"keeps them); use posterior='laplace' or 'is'")
        pick = torch.randint(0, dr.shape[0], (n_draws, n), generator=gen, device=dr.device)
        return torch.gather(dr, 0, pick.unsqueeze(-1).expand(n_draws, n, dr.shape[-1])).to(data_obs.y.device)
    if posterior == "laplace":
        prop = laplace_proposal(model, p, data_obs, eta0)
        return prop.sample(n_draws, gen)
    if posterior == "is":
        prop = laplace_proposal(model, p, data_obs, eta0, df=4.0)
        m = max(20 * n_draws, 2000)
        eta = prop.sample(m, gen)  # [M, N, q]
        with torch.no_grad():
            lw = model.log_lik(p, eta, data_obs) + model.log_prior(p, eta, data_obs.n_occ) - prop.log_prob(eta)
        w = torch.softmax(torch.nan_to_num(lw, nan=-math.inf), 0)  # [M, N]
        pick = torch.multinomial(w.T, n_draws, replacement=True, generator=gen).T  # [n_draws, N]
        return torch.gather(eta, 0, pick.unsqueeze(-1).expand(n_draws, n, eta.shape[-1]))
    raise ModelSpecError(f"posterior must be 'laplace', 'is' or 'draws', got {posterior!r}")


# ---------------------------------------------------------------------------------------------- entry point
def simulate_regimens(
    fit,
    regimens,
    *,
    population: int | None = None,
    subjects=None,
    n_draws: int = 1,
    times: Sequence[float] | None = None,
    n_times: int = 200,
    covariates: pd.DataFrame | str | None = "observed",
    uncertainty: bool = False,
    posterior: str = "laplace",
    residual: bool = False,
    steady_state: bool = False,
    interval: str | tuple[float, float] = "last",
    threshold: float | None = None,
    fu: float = 1.0,
    auc: str = "quadrature",
    weight_col: str = "WT",
    iv_cmt: int | None = None,
    seed: int | None = 0,
    chunk: int = 10000,
    model: Model | None = None,
    params=None,
    device=None,
    fast: bool = True,
) -> RegimenSimulation:
    """Simulate ``regimens`` (Regimen objects or strings) for virtual (``population=N``) or observed
    (``subjects="observed"`` or a list of IDs) subjects of ``fit`` (a FitResult; or pass ``fit=None, model=,
    params=`` for a model without a fit, population mode only).

    Exposures are computed over ``interval`` (``"last"`` dosing interval, ``"all"``, or ``(t0, t1)``); with
    ``steady_state=True`` the maintenance phase starts at steady state (NONMEM SS=1). ``threshold`` adds time
    above it (and %fT>threshold, with free fraction ``fu``); ``auc="quadrature"`` integrates exactly between
    dose events (Gauss–Legendre), ``"trapezoid"`` uses the time grid. Residual error is off unless ``residual``.
    ``fast``: sum regular bolus/oral dose trains in closed form (:mod:`nlmefit.pk.trains`) when the model is a
    linear closed form; ``False`` forces the general dose-by-dose path (same numbers to ~1e−12).
    """
    from nlmefit.simulation.exposure import exposure_table

    if (population is None) == (subjects is None):
        raise ModelSpecError("give exactly one of population=N (virtual subjects) or subjects='observed' / a list "
                             "of IDs (counterfactuals for observed subjects)")
    model = model if model is not None else getattr(fit, "model", None)
    if model is None:
        raise ModelSpecError("no model: pass a FitResult with its model attached, or model=")
    p = resolve_params(model, params if params is not None else fit)
    regs = [as_regimen(r) for r in (regimens if isinstance(regimens, (list, tuple)) else [regimens])]
    if not regs:
        raise ModelSpecError("no regimen given")
    labels = [getattr(r, "label", None) or str(r) for r in regs]
    if len(set(labels)) != len(labels):
        raise ModelSpecError(f"regimen labels must be distinct, got {labels}")
    data_obs = getattr(fit, "data", None) if fit is not None else None
    panel = data_obs.panel if data_obs is not None else None
    dev = data_obs.y.device if data_obs is not None and device is None else device
    p = _params_on(p, dev)
    gen = torch.Generator(device=dev if dev is not None else "cpu")
    gen.manual_seed(int(seed) if seed is not None else int(torch.randint(0, 2 ** 62, ()).item()))
    cov_names = list(panel.covariate_names) if panel is not None else []

    # --- who is simulated: covariates [S, C], η [S, q], source ids
    if population is not None:
        if population < 1:
            raise ModelSpecError(f"population must be a positive number of virtual subjects, got {population}")
        s = int(population)
        if isinstance(covariates, pd.DataFrame):
            missing = [c for c in cov_names if c not in covariates]
            if missing:
                raise ModelSpecError(f"the covariate table lacks {missing} (the model's data has {cov_names})")
            if len(covariates) != s:
                raise ModelSpecError(f"the covariate table has {len(covariates)} rows; give one per virtual "
                                     f"subject ({s})")
            cov_np = _encode(covariates[cov_names], panel)
        elif cov_names:
            if covariates != "observed":
                raise ModelSpecError("covariates must be 'observed' (resampled from the fitted subjects) or a table")
            pick = torch.randint(0, panel.n_subjects, (s,), generator=gen).numpy()
            cov_np = panel.covariates[pick]
        else:
            cov_np = np.zeros((s, 0))
        if uncertainty:
            p = _theta_uncertainty(fit, p, s, gen)
        n_occ = 0
        eta = _sample_iiv(model, p, s, gen)
        ids, draw_no, mode = np.arange(1, s + 1), np.zeros(s, dtype=int), "population"
    else:
        if data_obs is None:
            raise ModelSpecError("subjects=... needs the fitted data (a FitResult from nlmefit.fit, not one read "
                                 "from JSON without data)")
        if model.n_iov:
            raise ModelSpecError("per-subject counterfactuals with IOV are not supported: the new regimen has no "
                                 "occasions of the observed data")
        all_ids = np.asarray(panel.ids)
        if isinstance(subjects, str):
            if subjects != "observed":
                raise ModelSpecError(f"subjects must be 'observed' or a list of IDs, got {subjects!r}")
            sel = np.arange(len(all_ids))
        else:
            want = list(subjects)
            pos = {v: k for k, v in enumerate(all_ids.tolist())}
            bad = [w for w in want if w not in pos]
            if bad:
                raise ModelSpecError(f"IDs {bad} are not among the fitted subjects")
            sel = np.array([pos[w] for w in want])
        if n_draws < 1:
            raise ModelSpecError(f"n_draws must be at least 1, got {n_draws}")
        post = _posterior_draws(fit, model, p, data_obs, n_draws, posterior, gen)  # [D, N, q]
        post = post[:, torch.as_tensor(sel, device=post.device)]
        eta = post.transpose(0, 1).reshape(-1, post.shape[-1])  # subject-major: [S = n_sel·D, q]
        cov_np = np.repeat(panel.covariates[sel], n_draws, axis=0)
        ids = np.repeat(all_ids[sel], n_draws)
        draw_no = np.tile(np.arange(n_draws), len(sel))
        mode = "observed"
        s = eta.shape[0]
    cov_t = {n: torch.as_tensor(cov_np[:, k:k + 1], dtype=torch.float64, device=dev)
             for k, n in enumerate(cov_names)}
    cov_frame = pd.DataFrame(cov_np, columns=cov_names)

    # --- one template per regimen, S copies, batched predictions in chunks
    if times is None:  # one grid for every regimen, to the end of the longest (or of the exposure interval)
        t_end = max(float(r.end_time()) for r in regs)
        if not isinstance(interval, str):
            t_end = max(t_end, float(interval[1]))
        if not t_end > 0:
            raise ModelSpecError("the regimens end at time 0 (single bolus doses): give times= or interval=(t0, t1)")
        grid = np.linspace(0.0, t_end, n_times)
    else:
        grid = np.asarray(times, dtype=float)
        if grid.ndim != 1 or not len(grid) or not np.all(np.isfinite(grid)) or grid.min() < 0:
            raise ModelSpecError("times must be a non-empty 1-D sequence of finite times >= 0")
        grid = np.unique(grid)
    profiles, exposures, intervals = [], [], []
    for reg, lab in zip(regs, labels):  # a handful of regimens: not a hot loop
        recs = _records(reg, model, steady_state, iv_cmt, weight_col)
        t0, t1 = _interval(reg, interval, float(grid[-1]))
        data1 = _template(model, recs, grid, cov_names, dev)
        scale = _dose_scale(reg, cov_frame, weight_col, dev)
        trains = _trains(reg, model, steady_state, iv_cmt) if fast else None
        prof = concentrations(model, p, eta, cov_t, scale, recs, grid, trains, chunk, residual, gen)
        profiles.append(prof)
        ex = exposure_table(model, p, data1, eta, cov_t, scale, (t0, t1), recs, trains, threshold=threshold,
                            fu=fu, auc=auc, chunk=chunk)
        ex.insert(0, "REGIMEN", lab)
        ex.insert(1, "ID", ids)
        ex.insert(2, "DRAW", draw_no)
        exposures.append(ex)
        intervals.append((t0, t1))
    with torch.no_grad():
        ind = model.individual_parameters(p, eta, _copies(data1, cov_t, None, eta.shape[0], _broadcasts(model)))
    params_frame = pd.DataFrame({k: (v.reshape(-1, v.shape[-1])[:, 0] if v.dim() else v).expand(eta.shape[0])
                                 .cpu().numpy() for k, v in ind.items()})
    return RegimenSimulation(regs, labels, grid, np.stack(profiles), ids, draw_no, cov_frame, params_frame,
                             pd.concat(exposures, ignore_index=True), mode, residual, intervals)


def _sample_iiv(model: Model, p: Params, s: int, gen) -> torch.Tensor:
    if p.omega.dim() == 2:
        return model.sample_eta(p, s, 0, generator=gen)
    base = Params({k: (v[0] if v.dim() else v) for k, v in p.theta.items()}, p.omega, p.sigma, p.omega_iov)
    return model.sample_eta(base, s, 0, generator=gen)


def _encode(table: pd.DataFrame, panel) -> np.ndarray:
    out = np.empty(table.shape, dtype=float)
    for k, c in enumerate(table.columns):
        col = table[c]
        levels = (panel.covariate_levels or {}).get(c) if panel is not None else None
        if levels:
            unknown = sorted(set(col) - set(levels))
            if unknown:
                raise ModelSpecError(f"covariate {c!r}: levels {unknown} were not in the fitted data ({sorted(levels)})")
            out[:, k] = col.map(levels).to_numpy(float)
        else:
            try:
                out[:, k] = pd.to_numeric(col).to_numpy(float)
            except (TypeError, ValueError):
                raise ModelSpecError(f"covariate {c!r} must be numeric") from None
    return out


def _per_kg(reg) -> bool:
    kinds = {p.per_kg for p in reg.phases}
    if len(kinds) > 1:
        raise ModelSpecError(f"regimen {reg} mixes per-kg and fixed doses; simulate them as separate regimens")
    return kinds == {True}


def _records(reg, model: Model, steady_state: bool, iv_cmt: int | None, weight_col: str) -> pd.DataFrame:
    """Dose records of the template subject (ID 1); per-kg amounts for 1 kg (scaled per copy later)."""
    if iv_cmt is None:
        iv_cmt = 2 if model.structure.oral else 1  # IV doses of a model with a depot go to the central cmt
    cov = pd.DataFrame({"ID": [1], weight_col: [1.0]}) if _per_kg(reg) else None
    recs = reg.to_records(ids=[1], covariates=cov, weight_col=weight_col, iv_cmt=iv_cmt)
    if steady_state:
        ii = recs["II"].fillna(0).to_numpy() if "II" in recs else np.zeros(len(recs))
        rows = np.flatnonzero(ii > 0)
        if not len(rows):
            raise ModelSpecError(f"steady_state=True needs a repeated-dose phase; {reg} has none")
        recs = recs.copy()
        recs["SS"] = 0
        recs.loc[recs.index[rows[-1]], "SS"] = 1
    return recs


def _interval(reg, interval, grid_end: float) -> tuple[float, float]:
    """Exposure window: ``"last"`` = the last dosing interval (or last dose → end of the grid for a regimen
    without one), ``"all"`` = 0 → end of the grid, or explicit (t0, t1)."""
    if interval == "all":
        return 0.0, grid_end
    if interval == "last":
        t_last = float(np.max(reg.dose_times()[:, 0]))
        tau = reg.last_interval()
        t1 = t_last + tau if tau else grid_end
        if not t1 > t_last:
            raise ModelSpecError(f"the grid ends at the last dose of {reg}; give times= or interval=(t0, t1)")
        return t_last, t1
    try:
        t0, t1 = (float(x) for x in interval)
    except (TypeError, ValueError):
        raise ModelSpecError(f"interval must be 'last', 'all' or (t0, t1), got {interval!r}") from None
    if not t1 > t0 >= 0:
        raise ModelSpecError(f"interval (t0, t1) needs 0 <= t0 < t1, got {interval!r}")
    return t0, t1


def _dose_scale(reg, cov_frame: pd.DataFrame, weight_col: str, dev) -> torch.Tensor | None:
    if not _per_kg(reg):
        return None
    if weight_col not in cov_frame:
        raise ModelSpecError(f"regimen {reg} is dosed per kg, but the simulated subjects have no {weight_col!r} "
                             f"covariate (have {list(cov_frame.columns)}); pass weight_col=")
    return torch.as_tensor(np.array(cov_frame[weight_col].to_numpy(float)), dtype=torch.float64, device=dev)


def _trains(reg, model: Model, steady_state: bool, iv_cmt: int | None):
    """The regimen as closed-form dose trains (:mod:`nlmefit.pk.trains`) when that fast path applies: a linear
    closed-form model, bolus/oral phases only, no steady state, default compartments; else None."""
    from nlmefit.models.structure import ClosedForm
    from nlmefit.pk.trains import DoseTrain

    st = model.structure
    if not isinstance(st, ClosedForm) or steady_state or iv_cmt is not None:
        return None
    out = []
    for ph in reg.phases:
        if ph.route == "infusion":
            return None
        amt, _ = reg._amount_rate(ph, None)
        out.append(DoseTrain(float(ph.start + ph.lag), float(ph.interval or 1.0), int(ph.n_doses), float(amt),
                             depot=ph.route == "oral" and st.oral))
    return out


def concentrations(model, p, eta, cov_t, scale, recs, times: np.ndarray, trains, chunk: int,
                   residual: bool = False, gen=None) -> np.ndarray:
    """DV-scale predictions [S, T] at ``times`` (in the given order) for the S simulated subjects, in chunks;
    by dose trains when ``trains`` is given, else through the model on a one-subject template."""
    from nlmefit.pk.trains import train_concentration

    s = eta.shape[0]
    dev = eta.device
    cov_names = list(cov_t)
    if trains is None:
        tmpl = _template(model, recs, times, cov_names, dev)
        back = np.empty(len(times), dtype=int)  # the template holds its observation rows in time order
        back[np.argsort(times, kind="stable")] = np.arange(len(times))
    else:
        one = _template(model, recs, times[:1], cov_names, dev)  # covariates/params plumbing only
        t_t = torch.as_tensor(np.asarray(times, dtype=float), dtype=torch.float64, device=dev)
    out = np.empty((s, len(times)))
    bc = _broadcasts(model)
    with torch.no_grad():
        for a in range(0, s, chunk):  # chunks of copies bound memory; each chunk is one batched call
            sl = slice(a, min(s, a + chunk))
            cv = {k: v[sl] for k, v in cov_t.items()}
            sc = None if scale is None else scale[sl]
            pc = _slice_params(p, sl)
            if trains is None:
                d = _copies(tmpl, cv, sc, sl.stop - sl.start, bc)
                f, var = model.predict(pc, eta[sl], d)
                f, var = f[:, back], var[:, back]
            else:
                d = _copies(one, cv, None, sl.stop - sl.start, bc)
                ind = model.individual_parameters(pc, eta[sl], d)
                conc = train_concentration(ind, trains, t_t, model.structure.ncmt, sc)
                f = model.error.transform(conc.clamp_min(1e-300)) if model.error.log_scale else conc
                var = model.error.variance(f, pc.sigma).expand_as(f)
            if residual:
                f = f + torch.sqrt(var) * torch.randn(f.shape, generator=gen, dtype=f.dtype, device=f.device)
            out[sl] = model.error.untransform(f).cpu().numpy()
    return out


def _slice_params(p: Params, sl: slice) -> Params:
    th = {k: (v[sl] if v.dim() else v) for k, v in p.theta.items()}
    return Params(th, p.omega, p.sigma, p.omega_iov)
