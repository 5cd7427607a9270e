"""Counterfactual dosing: what concentrations would a population — or an observed subject — have under regimens
that were never given?

    sim = nlmefit.simulate_regimens(fit, ["1000 mg loading then 500 mg q12h x14, infusion 1h", "500 mg q8h x21"],
                                    population=1000, seed=1)            # virtual subjects, η ~ N(0, Ω)
    sim = nlmefit.simulate_regimens(fit, "500 mg q12h x14", subjects="observed", n_draws=200)  # η ~ p(η | y_i)
    sim.quantiles(); sim.exposures; sim.pta("AUC24", 400, mic=1.0); sim.plot_profiles()

**Exposure windows** (:mod:`nlmefit.simulation.exposure`): ``AUC24`` is the AUC over the last 24 h of dosing (per
24 h; the same daily dose gives the same AUC24 at steady state whatever the interval), ``AUCTAU`` and the other
metrics are over ``interval`` (the last dosing interval τ by default); the tables name both windows.

**Models of one endpoint** (``Model(..., dvid=...)``): the regimen's template subject observes that endpoint.

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
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from nlmefit import parallel
from nlmefit._html import object_html
from nlmefit.errors import ModelSpecError
from nlmefit.marginal.laplace import laplace_posterior
from nlmefit.models.model import Model, ModelData
from nlmefit.models.parameters import Params
from nlmefit.models.structure import ClosedForm
from nlmefit.pk.trains import DoseTrain
from nlmefit.posteriors.rng import seeded
from nlmefit.simulation.concentrations import broadcasts, copies, template
from nlmefit.simulation.exposure import auc24_window, pta, window_label
from nlmefit.simulation.plots import plot_exposure_distributions, plot_profile_bands
from nlmefit.simulation.population import SimulatedPopulation
from nlmefit.simulation.regimen import Regimen
from nlmefit.simulation.simulate import resolve_params
from nlmefit.simulation.stream import regimen_chunks, shared_seed

__all__ = ["RegimenSimulation", "simulate_regimens", "as_regimen"]


def as_regimen(r):
    """A :class:`~nlmefit.simulation.regimen.Regimen` from a Regimen or its string form."""
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
    interval: list[tuple[float, float]]  # per regimen, the exposure interval (AUCTAU, CMAX, ... ; column WINDOW)
    auc24_window: list[tuple[float, float, float]] | None = None  # per regimen (t0, t1, span h) of AUC24
    allow_negative: bool = False  # residual draws below 0 kept (True) or set to 0 (False)

    def _repr_html_(self) -> str:
        R, S, T = self.profiles.shape
        lines = [f"{R} regimen(s) × {S} {self.mode} subjects × {T} times"
                 f"{', residual error added' if self.residual else ''}", "regimens: " + "; ".join(self.labels)]
        return object_html("RegimenSimulation", lines, [("exposure quantiles", self.summary().reset_index())])

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
        """Quantiles of every exposure metric per regimen (windows: ``window_labels()``)."""
        metrics = [c for c in self.exposures.select_dtypes("number").columns if c not in ("ID", "DRAW")]
        g = self.exposures.groupby("REGIMEN", sort=False)[metrics]
        out = g.quantile(list(probs)).unstack()
        out.columns = [f"{m}_q{100 * p:g}" for m, p in out.columns]
        return out.reindex(self.labels)

    def window_labels(self) -> pd.DataFrame:
        """Per regimen: the AUC24 window and the exposure interval (of AUCTAU, CMAX, CTROUGH, ...), as text."""
        a24 = self.auc24_window or [(max(0.0, b - 24.0), b, 24.0) for _, b in self.interval]
        return pd.DataFrame({"REGIMEN": self.labels, "AUC24_WINDOW": [window_label(*w) for w in a24],
                             "WINDOW": [window_label(*w) for w in self.interval]})

    def pta(self, metric: str, threshold: float | None = None, *, mic: float | Sequence[float] | None = None,
            window: tuple[float, float] | None = None) -> pd.DataFrame:
        """Probability of target attainment per regimen (see :func:`nlmefit.simulation.exposure.pta`); ``"AUC"``
        means ``"AUC24"``, ``"AUCTAU"`` is per dosing interval; the WINDOW column says over which times."""
        return pta(self.exposures, metric, threshold, mic=mic, window=window, order=self.labels)

    def plot_profiles(self, probs=(0.05, 0.5, 0.95), ax=None, log_y: bool = False):
        """Concentration quantile bands per regimen (see :func:`nlmefit.simulation.plots.plot_profile_bands`)."""
        return plot_profile_bands(self, probs=probs, ax=ax, log_y=log_y)

    def plot_exposures(self, metric: str = "AUC24", ax=None):
        """Box plots of one exposure metric per regimen (see :mod:`nlmefit.simulation.plots`)."""
        return plot_exposure_distributions(self, metric=metric, ax=ax)


# ---------------------------------------------------------------------------------------------- data plumbing
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
    """[n_draws, N, q] draws of η_i | y_i for every observed subject: from the fit's own posterior
    (``draws``: SAEM/NUTS draws, or any posterior family the fit carries), from the Laplace posterior, or by
    sampling–importance–resampling from a t proposal (``is``)."""
    n = data_obs.n_subjects
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=gen))
    if posterior == "draws":
        post = fit.posterior
        dr = getattr(post, "draws", None)
        if dr is not None:
            pick = torch.randint(0, dr.shape[0], (n_draws, n), generator=gen, device=dr.device)
            return torch.gather(dr, 0, pick.unsqueeze(-1).expand(n_draws, n, dr.shape[-1])).to(data_obs.y.device)
        if post is None or getattr(post, "kind", None) == "laplace":
            raise ModelSpecError(f"posterior='draws' needs posterior draws or a fitted posterior family; a "
                                 f"{fit.method} fit has none (SAEM, NUTS and VEM do); use posterior='laplace' or 'is'")
        with seeded(seed, data_obs.y.device):
            return post.sample((n_draws,)).to(data_obs.y.device)
    eta0 = _modes_of(fit, data_obs)
    if posterior == "laplace":
        prop = laplace_posterior(model, p, data_obs, eta0)
        with seeded(seed, data_obs.y.device):
            return prop.sample((n_draws,))
    if posterior == "is":
        prop = laplace_posterior(model, p, data_obs, eta0, df=4.0)
        m = max(20 * n_draws, 2000)
        with seeded(seed, data_obs.y.device):
            eta = prop.sample((m,))  # [M, N, q]
        with torch.no_grad():
            lw = model.log_lik(p, eta, data_obs) + model.log_prior(p, eta, data_obs.n_occ) - prop.log_prob(eta)
        w = torch.softmax(torch.nan_to_num(lw, nan=-math.inf), 0)  # [M, N]
        pick = torch.multinomial(w.T, n_draws, replacement=True, generator=gen).T  # [n_draws, N]
        return torch.gather(eta, 0, pick.unsqueeze(-1).expand(n_draws, n, eta.shape[-1]))
    raise ModelSpecError(f"posterior must be 'laplace', 'is' or 'draws', got {posterior!r}")


def _modes_of(fit, data_obs: ModelData) -> torch.Tensor | None:
    """The fit's conditional modes as a starting point, when they belong to these subjects."""
    ind = fit.individual_estimates
    if ind is None:
        return None
    cols = [c for c in ind.columns if c.startswith("ETA_")]
    if len(cols) != data_obs.q or len(ind) != data_obs.n_subjects:
        return None
    return torch.as_tensor(np.array(ind[cols].to_numpy(float)), dtype=data_obs.y.dtype, device=data_obs.y.device)


# ---------------------------------------------------------------------------------------------- entry point
def simulate_regimens(fit, regimens, *, population: int | None = None, subjects=None, n_draws: int = 1,
                      times: Sequence[float] | None = None, n_times: int = 200,
                      covariates: pd.DataFrame | str | None = "observed", uncertainty: bool = False,
                      posterior: str = "laplace", residual: bool = False, allow_negative: bool = False,
                      steady_state: bool = False,
                      interval: str | tuple[float, float] = "last", threshold: float | None = None, fu: float = 1.0,
                      auc: str = "quadrature", weight_col: str = "WT", iv_cmt: int | None = None,
                      seed: int | None = 0, chunk: int = 10000, model: Model | None = None, params=None,
                      device=None, fast: bool = True, progress: bool | None = None,
                      out: str | os.PathLike | None = None, chunk_size: int | None = None,
                      format: str = "csv") -> RegimenSimulation:
    """Simulate ``regimens`` (Regimen objects or strings) for virtual (``population=N``) or observed
    (``subjects="observed"`` or a list of IDs) subjects of ``fit`` (a FitResult; or pass ``fit=None, model=,
    params=`` for a model without a fit, population mode only).

    Exposures (residual-free) are computed over ``interval`` (``"last"`` dosing interval, ``"all"``, or
    ``(t0, t1)``), except ``AUC24``: the AUC over the last 24 h of dosing (per 24 h, see
    :func:`nlmefit.simulation.exposure.auc24_window`); with ``steady_state=True`` the maintenance phase starts at
    steady state (NONMEM SS=1). ``threshold`` adds time above it (and %fT>threshold, with free fraction ``fu``);
    ``auc="quadrature"`` integrates exactly between dose events (Gauss–Legendre), ``"trapezoid"`` uses the time
    grid. Residual error is off unless ``residual``; residual draws below 0 are then set to 0 (censored at 0)
    unless ``allow_negative``.
    ``fast``: sum regular bolus/oral dose trains in closed form (:mod:`nlmefit.pk.trains`) when the model is a
    linear closed form; ``False`` forces the general dose-by-dose path (same numbers to ~1e−12).
    ``progress``: a bar over the regimens (None: automatic, :mod:`nlmefit.progress`).

    **Chunks, ranks and streaming** (:mod:`nlmefit.simulation.stream`): with ``chunk_size`` (subjects per chunk),
    ``out`` (a folder) or under several ranks (:mod:`nlmefit.parallel`), the simulated subjects are processed in
    chunks (default: about 4 million profile values each), chunk c by rank c % world. Who is simulated (η,
    covariates, θ draws, posterior draws) is drawn once from ``seed`` on every rank, as in one process; only the
    residual draws (``residual=True``) are per chunk (chunk 0: the seeded generator; c ≥ 1: ``SeedSequence([seed,
    c])``). The exposures are summed over the ranks, so ``summary()``, ``pta()`` and ``exposures`` cover all
    subjects on every rank, and the result is the same on any number of ranks (without residual error it equals the
    unchunked result). ``profiles`` (hence ``quantiles()`` and the plots) are gathered onto every rank when
    R·S·T ≤ 2e8 values; beyond that ``out`` is needed and they hold the first ⌊2e8/(R·T)⌋ subjects (a warning says
    so; the part files hold all). With ``out`` each chunk's profiles are written to
    ``out/profiles-part-XXXXX.csv`` (REGIMEN, ID, DRAW, TIME, CONC; ``format="parquet"`` needs pyarrow) and rank 0
    writes ``out/manifest.json``.
    """
    if (population is None) == (subjects is None):
        raise ModelSpecError("give exactly one of population=N (virtual subjects) or subjects='observed' / a list "
                             "of IDs (counterfactuals for observed subjects)")
    model, p = _model_and_params(fit, model, params)
    regs, labels = _regimens_and_labels(regimens)
    data_obs, panel, dev = _fitted_data(fit, device)
    p = _params_on(p, dev)
    shard = parallel.current()
    seed = shared_seed(seed, shard)  # the same subjects on every rank
    gen = _generator(dev, seed)
    cov_names = list(panel.covariate_names) if panel is not None else []
    if population is not None:
        who = _virtual_subjects(fit, model, p, panel, cov_names, population, covariates, uncertainty, gen)
    else:
        who = _observed_subjects(fit, model, p, data_obs, subjects, n_draws, posterior, gen)
    cov_t, cov_frame = _covariate_tensors(who.cov, cov_names, dev)
    # one template per regimen, S copies, batched predictions in chunks
    grid = _time_grid(regs, times, n_times, interval)
    pops, intervals, windows24 = [], [], []
    for reg in regs:  # a handful of regimens: not a hot loop
        recs = _records(reg, model, steady_state, iv_cmt, weight_col)
        intervals.append(_interval(reg, interval, float(grid[-1])))
        windows24.append(auc24_window(reg))
        pops.append(SimulatedPopulation(model, who.p, who.eta, cov_t, template(model, recs, grid, cov_names, dev),
                                        recs, _dose_scale(reg, cov_frame, weight_col, dev),
                                        _trains(reg, model, steady_state, iv_cmt) if fast else None))
    if out is None and chunk_size is None and shard is None:
        chunk_size = len(who.ids)  # one process in memory: one chunk, the seeded stream as it always was
    profiles, tables = regimen_chunks(pops, labels, grid, intervals, windows24, who.ids, who.draw, gen=gen,
                                      seed=seed, chunk_size=chunk_size, chunk=chunk, residual=residual,
                                      allow_negative=allow_negative,
                                      exposure_options=dict(threshold=threshold, fu=fu, auc=auc), out=out,
                                      format=format, progress=progress)
    exposures = [_label_rows(ex, lab, who) for ex, lab in zip(tables, labels)]
    return RegimenSimulation(regs, labels, grid, profiles, who.ids, who.draw, cov_frame,
                             _parameters_frame(pops[-1]), pd.concat(exposures, ignore_index=True), who.mode,
                             residual, intervals, windows24, allow_negative)


@dataclass(frozen=True)
class _Subjects:
    """Who is simulated: θ (shared or per subject), η [S, q], covariates [S, C], source IDs and draw numbers."""

    p: Params
    eta: torch.Tensor
    cov: np.ndarray
    ids: np.ndarray
    draw: np.ndarray
    mode: str  # "population" or "observed"


def _model_and_params(fit, model: Model | None, params) -> tuple[Model, Params]:
    """The model (given, or the fit's) and its parameters (given, or the fit's estimates)."""
    model = model if model is not None else getattr(fit, "model", None)
    if model is None:
        raise ModelSpecError("no model: pass a FitResult with its model attached, or model=")
    return model, resolve_params(model, params if params is not None else fit)


def _regimens_and_labels(regimens) -> tuple[list[Regimen], list[str]]:
    """The regimens as Regimen objects and their (distinct) labels."""
    regs = [as_regimen(r) for r in (regimens if isinstance(regimens, (list, tuple)) else [regimens])]
    if not regs:
        raise ModelSpecError("no regimen given")
    labels = [getattr(r, "label", None) or str(r) for r in regs]
    if len(set(labels)) != len(labels):
        raise ModelSpecError(f"regimen labels must be distinct, got {labels}")
    return regs, labels


def _fitted_data(fit, device) -> tuple[ModelData | None, object, object]:
    """The fitted data (None without a fit or data), its panel, and the device (given, or that of the data)."""
    data_obs = getattr(fit, "data", None) if fit is not None else None
    panel = data_obs.panel if data_obs is not None else None
    dev = data_obs.y.device if data_obs is not None and device is None else device
    return data_obs, panel, dev


def _generator(dev, seed: int | None) -> torch.Generator:
    """A generator on ``dev`` seeded with ``seed`` (a random seed from torch's global generator when None)."""
    gen = torch.Generator(device=dev if dev is not None else "cpu")
    gen.manual_seed(int(seed) if seed is not None else int(torch.randint(0, 2 ** 62, ()).item()))
    return gen


def _virtual_subjects(fit, model: Model, p: Params, panel, cov_names: list[str], population: int, covariates,
                      uncertainty: bool, gen: torch.Generator) -> _Subjects:
    """``population`` virtual subjects: covariates resampled or given, θ ~ N(θ̂, Cov(θ̂)) if ``uncertainty``,
    η ~ N(0, Ω)."""
    if population < 1:
        raise ModelSpecError(f"population must be a positive number of virtual subjects, got {population}")
    s = int(population)
    cov_np = _population_covariates(covariates, cov_names, panel, s, gen)
    if uncertainty:
        p = _theta_uncertainty(fit, p, s, gen)
    eta = _sample_iiv(model, p, s, gen)
    return _Subjects(p, eta, cov_np, np.arange(1, s + 1), np.zeros(s, dtype=int), "population")


def _population_covariates(covariates, cov_names: list[str], panel, s: int, gen: torch.Generator) -> np.ndarray:
    """Covariates [S, C] of the virtual subjects: from a table (one row each) or resampled from the fitted ones."""
    if isinstance(covariates, pd.DataFrame):
        missing = [c for c in cov_names if c not in covariates]
        if missing:
            raise ModelSpecError(f"the covariate table lacks {missing} (the model's data has {cov_names})")
        if len(covariates) != s:
            raise ModelSpecError(f"the covariate table has {len(covariates)} rows; give one per virtual "
                                 f"subject ({s})")
        return _encode(covariates[cov_names], panel)
    if cov_names:
        if covariates != "observed":
            raise ModelSpecError("covariates must be 'observed' (resampled from the fitted subjects) or a table")
        pick = torch.randint(0, panel.n_subjects, (s,), generator=gen).numpy()
        return panel.covariates[pick]
    return np.zeros((s, 0))


def _observed_subjects(fit, model: Model, p: Params, data_obs: ModelData | None, subjects, n_draws: int,
                       posterior: str, gen: torch.Generator) -> _Subjects:
    """``n_draws`` posterior η per selected observed subject (subject-major), with that subject's covariates."""
    if data_obs is None:
        raise ModelSpecError("subjects=... needs the fitted data (a FitResult from nlmefit.fit, not one read "
                             "from JSON without data)")
    if model.n_iov:
        raise ModelSpecError("per-subject counterfactuals with IOV are not supported: the new regimen has no "
                             "occasions of the observed data")
    panel = data_obs.panel
    all_ids = np.asarray(panel.ids)
    sel = _selected_subjects(subjects, all_ids)
    if n_draws < 1:
        raise ModelSpecError(f"n_draws must be at least 1, got {n_draws}")
    post = _posterior_draws(fit, model, p, data_obs, n_draws, posterior, gen)  # [D, N, q]
    post = post[:, torch.as_tensor(sel, device=post.device)]
    eta = post.transpose(0, 1).reshape(-1, post.shape[-1])  # subject-major: [S = n_sel·D, q]
    return _Subjects(p, eta, np.repeat(panel.covariates[sel], n_draws, axis=0), np.repeat(all_ids[sel], n_draws),
                     np.tile(np.arange(n_draws), len(sel)), "observed")


def _selected_subjects(subjects, all_ids: np.ndarray) -> np.ndarray:
    """Positions of the requested observed subjects (``"observed"``: all of them)."""
    if isinstance(subjects, str):
        if subjects != "observed":
            raise ModelSpecError(f"subjects must be 'observed' or a list of IDs, got {subjects!r}")
        return np.arange(len(all_ids))
    want = list(subjects)
    pos = {v: k for k, v in enumerate(all_ids.tolist())}
    bad = [w for w in want if w not in pos]
    if bad:
        raise ModelSpecError(f"IDs {bad} are not among the fitted subjects")
    return np.array([pos[w] for w in want])


def _covariate_tensors(cov: np.ndarray, cov_names: list[str], dev) -> tuple[dict[str, torch.Tensor], pd.DataFrame]:
    """Covariates [S, C] as {name: [S, 1]} float64 tensors on ``dev`` and as a DataFrame."""
    cov_t = {n: torch.as_tensor(cov[:, k:k + 1], dtype=torch.float64, device=dev) for k, n in enumerate(cov_names)}
    return cov_t, pd.DataFrame(cov, columns=cov_names)


def _time_grid(regs: list[Regimen], times: Sequence[float] | None, n_times: int, interval) -> np.ndarray:
    """The given times (sorted, unique), or ``n_times`` points to the end of the longest regimen or interval."""
    if times is None:  # one grid for every regimen, to the end of the longest (or of the exposure interval)
        t_end = max(float(r.end_time()) for r in regs)
        if not isinstance(interval, str):
            t_end = max(t_end, float(interval[1]))
        if not t_end > 0:
            raise ModelSpecError("the regimens end at time 0 (single bolus doses): give times= or interval=(t0, t1)")
        return np.linspace(0.0, t_end, n_times)
    grid = np.asarray(times, dtype=float)
    if grid.ndim != 1 or not len(grid) or not np.all(np.isfinite(grid)) or grid.min() < 0:
        raise ModelSpecError("times must be a non-empty 1-D sequence of finite times >= 0")
    return np.unique(grid)


def _label_rows(ex: pd.DataFrame, label: str, who: _Subjects) -> pd.DataFrame:
    """The exposure table with leading REGIMEN, ID and DRAW columns."""
    ex.insert(0, "REGIMEN", label)
    ex.insert(1, "ID", who.ids)
    ex.insert(2, "DRAW", who.draw)
    return ex


def _parameters_frame(pop: SimulatedPopulation) -> pd.DataFrame:
    """Individual structural parameters, one row per simulated subject."""
    s = pop.n
    with torch.no_grad():
        ind = pop.model.individual_parameters(pop.p, pop.eta, copies(pop.data1, pop.cov_t, None, s,
                                                                     broadcasts(pop.model)))
    return pd.DataFrame({k: (v.reshape(-1, v.shape[-1])[:, 0] if v.dim() else v).expand(s).cpu().numpy()
                         for k, v in ind.items()})


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
                raise ModelSpecError(f"covariate {c!r}: levels {unknown} were not in the fitted data "
                                     f"({sorted(levels)})")
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
