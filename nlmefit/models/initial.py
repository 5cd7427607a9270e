"""Automatic initial estimates (``init="auto"``): NCA, curve stripping and a naive-pooled fit of the model.

:func:`auto_initial` gives natural-scale starting values for the parameters whose names it knows; the estimators
reach it through :func:`resolve_initial` (``Estimator.bind``), which also decides *whose* value each parameter
starts from and records it (``FitResult.initial``):

* ``init=None`` (default): library models (:func:`nlmefit.library.get`) start from automatic values for every
  parameter that was not given to ``library.get``; other models from their own values;
* ``init="auto"``: automatic values for every parameter not given explicitly (custom models: the names it knows —
  ``cl v q vp q2 vp2 ka vm km``, their ``omega_*`` and ``sigma_add``/``sigma_prop``; a warning names the rest);
* ``init="model"``: the model's own values, as before automatic starts existed;
* ``init={name: value}``: those values win; the other parameters follow the default rule above;
* ``init=Params``: exactly those values.

Fixed parameters are never changed. The rules (``tests/test_initial.py`` checks them on simulated data, on the
nlmixr2 ``Bolus_2CPT`` set and on the sparse pheno data):

1. **NCA per subject** (:mod:`nlmefit.nca`) over the dosing interval with the most observations, with the dose
   routes of the model (oral models: CMT 1 doses are extravascular): CL = dose/AUC∞ (or dose/AUCτ after repeated
   doses), λz by best-fit adjusted R², Vz = CL/λz, Tmax, C0 (IV bolus, back-extrapolated).
2. **Structural starts.** Typical values are robust geometric means (exp of the median log) of the individual
   values. 1 compartment: ``cl`` = CL, ``v`` = Vz; oral ``ka`` from Tmax and λz by the one-compartment relation
   ``Tmax = ln(ka/k)/(ka − k)`` solved for ``ka > k`` (k = λz; when λz·Tmax ≥ 0.9, ka = 1.22·λz). 2 and 3
   compartments: **curve stripping** of the naive-pooled, dose-normalised profile — terminal line (β, B), then
   the line through the early residuals C − B·e^(−βt) (α, A), corrected for the infusion time
   (``A·λT/(e^(λT) − 1)``) or absorption (``A·(ka − λ)/ka``), and the standard macro → micro formulas
   ``V1 = 1/(A + B)``, ``k21 = (Aβ + Bα)/(A + B)``, ``k10 = αβ/k21``, ``k12 = α + β − k21 − k10``,
   ``cl = k10·V1``, ``q = k12·V1``, ``vp = q/k21``; a second candidate splits Vz: ``v`` = dose/C0 (IV bolus) or
   Vz/2, ``vp`` = Vss − v (or Vz − v, at least 0.3·v), ``q`` = CL. 3 compartments add ``q2 = 0.3·q``,
   ``vp2 = vp``.
3. **Naive-pooled fit.** The model itself (η = 0, every dosing record: infusions, multiple doses, steady state)
   is fitted to the log concentrations of all subjects (at most 100, evenly spread) by
   ``scipy.optimize.least_squares`` over the log parameters (soft-L1 loss), from each candidate; the best one
   wins. For one-compartment oral models the flip-flop twin is resolved to ``ka > cl/v``. When NCA has no subject
   (sparse data), the NCA of the pooled profile gives the candidates. Michaelis–Menten (ODE) models fit their
   linear closed-form analog instead (an ODE solve per evaluation costs ~0.5 s), then
   ``1/CL_i = km/vm + (Cmax_i/2)/vm`` — exact for a one-compartment bolus, where CL_nca = vm/(km + C0/2) — is a
   line in Cmax_i/2 whose slope and intercept give vm and km; without saturation in the data (no positive slope)
   ``km`` = median Cmax and ``vm = 1.5·CL·km``. Other ODE models get the NCA rules without a pooled fit.
4. **Ω** (variances of the log parameters): the robust variance ``(1.4826·MAD)²`` of the individual log values
   (CL; Vz, or dose/C0 for multi-compartment IV bolus; ka), floored at 0.05 and capped at 1; parameters without
   individual values get the median of those, else 0.1.
5. **σ** from the residuals of the per-subject terminal-phase regressions, pooled over subjects
   (``√(Σ SSR / Σ (n − 2))``): proportional (and exponential) on the log scale, additive on the concentration
   scale; combined: proportional as above, additive = that SD times the 10th percentile of the observations.
   When those fits have fewer than 2 residual degrees of freedom per subject on average (the best-fit selection
   then makes the residuals far too small) or there are none, the residuals around the pooled curve with one free
   level per subject are used instead (log scale: centred per subject; concentration scale: scaled per subject).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import numpy as np
import scipy.optimize
import torch

from nlmefit.errors import ModelSpecError
from nlmefit.models.model import Model
from nlmefit.models.parameters import Params
from nlmefit.models.spec import _ATTR as _SPEC_ATTR
from nlmefit.models.structure import ClosedForm
from nlmefit.nca import dose_index, nca_arrays, profile_stats
from nlmefit.panel import Panel

__all__ = ["auto_initial", "resolve_initial", "initial_record", "library_given", "KNOWN_THETA", "SOURCE_AUTO",
           "OMEGA_FLOOR", "OMEGA_CAP"]

#: structural parameter names auto_initial knows
KNOWN_THETA = ("cl", "v", "q", "vp", "q2", "vp2", "ka", "vm", "km")
SOURCE_AUTO = "auto (NCA)"
SOURCE_USER = "user"
SOURCE_MODEL = "model"
OMEGA_FLOOR, OMEGA_CAP, OMEGA_DEFAULT = 0.05, 1.0, 0.1
_REC_ATTR = "_nlmefit_initial"
_DATA_ATTR = "_nlmefit_initial_data"
_MIN_SPREAD = 5  # individual values needed for an Ω from their spread
_POOL_SUBJECTS = 100  # subjects in the naive-pooled fit (evenly spread)
_MIN_DF = 2  # mean residual degrees of freedom of the terminal fits for σ from them


# ---------------------------------------------------------------------------------------------- small helpers
def _gm(x) -> float | None:
    """Robust geometric mean: exp(median log) of the positive finite values (None without any)."""
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x) & (x > 0)]
    return float(np.exp(np.median(np.log(x)))) if x.size else None


def _log_var(x) -> float | None:
    """Robust variance of log x: (1.4826·MAD)², None with fewer than _MIN_SPREAD values."""
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x) & (x > 0)]
    if x.size < _MIN_SPREAD:
        return None
    lx = np.log(x)
    return float((1.4826 * np.median(np.abs(lx - np.median(lx)))) ** 2)


def _ka_from_tmax(tmax: np.ndarray, k: np.ndarray) -> np.ndarray:
    """ka > k with ln(ka/k)/(ka − k) = tmax (one compartment), by bisection on u = ln(ka/k)."""
    x = np.clip(np.asarray(k, float) * np.asarray(tmax, float), 1e-6, 0.9)
    lo, hi = np.full_like(x, 1e-9), np.full_like(x, 40.0)
    for _ in range(80):  # g(u) = u/(e^u − 1) decreases from 1 to 0
        mid = 0.5 * (lo + hi)
        g = mid / np.expm1(mid)
        lo, hi = np.where(g > x, mid, lo), np.where(g > x, hi, mid)
    return np.asarray(k, float) * np.exp(0.5 * (lo + hi))


def _ncmt(model) -> int:
    st = model.structure
    n = getattr(st, "ncmt", None)
    if n:
        return int(n)
    names = set(st.param_names)
    return 3 if "q2" in names else 2 if "q" in names else 1


def _is_mm(model) -> bool:
    return {"vm", "km"} <= set(model.structure.param_names)


# ---------------------------------------------------------------------------------------------- pooled profile
def _pooled_profile(panel: Panel, res: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """The naive-pooled, dose-normalised profile (times after the dose, geometric-mean C/dose per time bin),
    from single-dose intervals when there are any, else from the repeated-dose ones."""
    window = res["window"]
    single = ~res["multiple"]
    rows = single if (single & window.any(1)).any() else np.ones_like(single)
    m = window & rows[:, None] & (panel.dv > 0)
    if m.sum() < 3:
        return None
    t = (panel.obs_time - res["dose_time"][:, None])[m]
    c = (panel.dv / res["dose"][:, None])[m]
    ok = np.isfinite(t) & np.isfinite(c) & (c > 0)
    t, c = t[ok], c[ok]
    if t.size < 3:
        return None
    scale = max(float(np.max(np.abs(t))), 1e-12)
    key = np.round(t / scale, 3)
    uniq = np.unique(key)
    if uniq.size > 40:  # individual sampling times: 30 bins of equal counts
        edges = np.quantile(t, np.linspace(0, 1, 31))
        key = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, 29)
        uniq = np.unique(key)
    tb = np.array([np.median(t[key == u]) for u in uniq])
    cb = np.array([np.exp(np.mean(np.log(c[key == u]))) for u in uniq])
    order = np.argsort(tb)
    return tb[order], cb[order]


def _profile_nca(t, c, bolus: bool, infusion: bool, multiple: bool, tau: float, t_inf: float, oral: bool) -> dict:
    one = lambda v, dt=float: np.array([v], dtype=dt)  # noqa: E731
    out = profile_stats(t[None, :], c[None, :], np.ones((1, t.size), bool), bolus=one(bolus, bool),
                        infusion=one(infusion, bool), multiple=one(multiple, bool), tau=one(tau),
                        dose=one(1.0), infusion_time=one(t_inf), extravascular=one(oral, bool))
    return {k: v[0] for k, v in out.items()}


def _strip(t, c, pooled: dict, route: str, t_inf: float, ka: float | None) -> dict | None:
    """Biexponential curve stripping of the pooled unit-dose profile → (cl, v, q, vp), or None."""
    beta, icpt, lower = pooled["lambda_z"], pooled["intercept"], pooled["lambda_z_lower"]
    if not (np.isfinite(beta) and beta > 0 and np.isfinite(icpt)):
        return None
    b_obs = math.exp(icpt)
    tmax = pooled["tmax"]
    early = (t < lower) & ((t >= tmax) if route == "iv" else (t > tmax)) & (t > (t_inf if route == "infusion"
                                                                                  else 0.0))
    r = c[early] - b_obs * np.exp(-beta * t[early])
    tt = t[early][r > 0]
    r = r[r > 0]
    if r.size < 2:
        return None
    slope, a_icpt = np.polyfit(tt, np.log(r), 1)
    alpha = -slope
    if not (np.isfinite(alpha) and alpha > 1.5 * beta):
        return None
    a_obs = math.exp(a_icpt)

    def coef(x_obs: float, lam: float) -> float:
        if route == "infusion" and t_inf > 0:
            return x_obs * lam * t_inf / math.expm1(lam * t_inf)
        if route == "extravascular":
            return x_obs * (ka - lam) / ka
        return x_obs

    if route == "extravascular" and not (ka and ka > 1.1 * alpha):
        return None
    a, b = coef(a_obs, alpha), coef(b_obs, beta)
    if not (a > 0 and b > 0):
        return None
    v1 = 1.0 / (a + b)
    k21 = (a * beta + b * alpha) / (a + b)
    k10 = alpha * beta / k21
    k12 = alpha + beta - k21 - k10
    out = {"cl": k10 * v1, "v": v1, "q": k12 * v1, "vp": k12 * v1 / k21}
    return out if all(np.isfinite(v) and v > 0 for v in out.values()) else None


# ---------------------------------------------------------------------------------------------- pooled fit
class _Pooled:
    """Least squares of log DV − log f(θ, η = 0) over the log of some θ, all subjects at once."""

    def __init__(self, model, data, names: list[str], obs: np.ndarray, max_subjects: int):
        dv = data.panel.dv
        keep = np.flatnonzero(obs.any(1))
        if keep.size > max_subjects:  # evenly spread over the subjects (dose groups are usually ID blocks)
            keep = keep[np.unique(np.linspace(0, keep.size - 1, max_subjects).round().astype(np.int64))]
        if keep.size < data.n_subjects:
            sel = torch.as_tensor(keep, device=data.y.device)
            data, obs, dv = data.index(sel), obs[keep], dv[keep]
        self.model, self.data, self.names = model, data, names
        dev = data.y.device
        self.base = model.initial_params(torch.float64, dev)
        self.eta0 = torch.zeros(data.n_subjects, data.q, dtype=torch.float64, device=dev)
        self.obs = torch.as_tensor(obs, device=dev)
        self.logy = np.log(dv[obs])
        self.subject = np.broadcast_to(np.arange(obs.shape[0])[:, None], obs.shape)[obs]
        self.n_obs = int(obs.sum())

    def predict(self, x: np.ndarray) -> np.ndarray:
        theta = dict(self.base.theta)
        for n, v in zip(self.names, x):
            theta[n] = torch.tensor(math.exp(min(float(v), 700.0)), dtype=torch.float64, device=self.eta0.device)
        p = Params(theta, self.base.omega, self.base.sigma, self.base.omega_iov, self.base.weights)
        with torch.no_grad():
            f, _ = self.model.predict(p, self.eta0, self.data)
        if getattr(self.model.error, "log_scale", False):
            f = torch.exp(f)
        return f[self.obs].cpu().numpy()

    def residuals(self, x: np.ndarray) -> np.ndarray:
        f = self.predict(x)
        with np.errstate(divide="ignore", invalid="ignore"):
            r = self.logy - np.log(np.where(f > 0, f, np.nan))
        return np.where(np.isfinite(r), r, 30.0)

    def residual_sd(self, values: Mapping[str, float]) -> tuple[float, float]:
        """Residual SDs around the pooled curve with one free level per subject: (log scale, centred per
        subject; concentration scale, the curve scaled per subject). They hold what a per-subject volume explains
        out of the between-subject spread, not the rest: an upper reference for σ."""
        f = self.predict(np.log([values[n] for n in self.names]))
        y = np.exp(self.logy)
        ok = f > 0
        sub, f, y = self.subject[ok], f[ok], y[ok]
        n, k = y.size, np.unique(sub).size
        if n <= k:
            return float("nan"), float("nan")
        size = int(sub.max()) + 1
        lr = np.log(y) - np.log(f)
        lr -= (np.bincount(sub, lr, size) / np.maximum(np.bincount(sub, None, size), 1))[sub]
        a = np.bincount(sub, y * f, size) / np.maximum(np.bincount(sub, f * f, size), 1e-300)
        r = y - a[sub] * f
        return math.sqrt(float(np.sum(lr * lr)) / (n - k)), math.sqrt(float(np.sum(r * r)) / (n - k))

    def fit(self, start: Mapping[str, float], max_nfev: int) -> tuple[dict, float]:
        x0 = np.log([start[n] for n in self.names])
        r0 = self.residuals(x0)
        try:
            sol = scipy.optimize.least_squares(self.residuals, x0, jac="2-point", method="trf", loss="soft_l1",
                                               f_scale=1.0, max_nfev=max_nfev, bounds=(x0 - 12, x0 + 12),
                                               ftol=1e-6, xtol=1e-6)
            x, cost = sol.x, float(sol.cost)
        except (ValueError, RuntimeError, np.linalg.LinAlgError, torch.linalg.LinAlgError):
            x, cost = x0, float(np.sum(2 * (np.sqrt(1 + r0 ** 2) - 1)) / 2)
        return {n: float(math.exp(v)) for n, v in zip(self.names, x)}, cost


# ---------------------------------------------------------------------------------------------- auto_initial
def _model_data(model, data):
    if hasattr(data, "events") and hasattr(data, "panel"):
        return data
    panel = data if isinstance(data, Panel) else Panel.from_dataframe(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.prepare(panel, check_likelihood=False)


def _reporting_names(pset) -> list[str]:
    return list(pset.natural_dict(pset.initial(torch.float64)))


def auto_initial(model, data, names=None) -> tuple[dict[str, float], list[str]]:
    """Natural-scale initial values from the data (the rules are in the module docstring).

    ``model``: an :class:`nlmefit.Model` (library or custom); ``data``: a DataFrame, Panel or the model's bound
    data (``model.prepare(...)``). ``names``: the reporting names to fill (default: every name it knows).
    Returns ``(values, notes)``: the values it could set, and notes — the first says what was done, others name
    the parameters it has no rule for (they keep the model's values)."""
    pset = model.parameters
    every = _reporting_names(pset)
    for n in names or []:
        if n not in every:
            raise ModelSpecError(f"auto_initial: {n!r} is not a parameter of {getattr(model, 'name', 'the model')}")
    want = list(every) if names is None else list(names)
    structure = getattr(model, "structure", None)
    if structure is None or not hasattr(model, "predict") or not getattr(model, "needs_doses", True):
        return {}, [f"auto initial values need a PK model with dose records; {getattr(model, 'name', '')} keeps its "
                    f"own values"]
    mdata = _model_data(model, data)
    fixed = pset.fixed_names()
    theta_known = [n for n in pset.theta if n in KNOWN_THETA and n in want and n not in fixed
                   and pset.theta[n].init > 0]  # positive parameters
    eta_known = [e for e in pset.eta_names if e in KNOWN_THETA and f"omega_{e}" in want
                 and f"omega_{e}" not in fixed]
    sigma_known = [s for s in pset.sigma if s in ("add", "prop") and f"sigma_{s}" in want
                   and f"sigma_{s}" not in fixed]
    with np.errstate(all="ignore"), warnings.catch_warnings():  # NaN for what the data cannot say, no noise
        warnings.simplefilter("ignore")
        nc = _subject_nca(model, mdata)
        best, fit_note = _pooled_best(model, mdata, nc, _candidates(model, nc), theta_known)
        values: dict[str, float] = {n: float(best[n]) for n in theta_known if n in best}
        values.update(_omegas(model, nc, eta_known))
        values.update(_sigmas(model, nc, sigma_known))
    notes = [f"NCA on {nc['n_cl']} of {nc['n_sub']} subjects{fit_note}"]
    for n in list(values):  # keep values inside their bounds
        par = pset.theta.get(n) or (pset.sigma.get(n[6:]) if n.startswith("sigma_") else None)
        v = values[n]
        if not (np.isfinite(v) and v > 0) or (par is not None and not par.lower < v < par.upper):
            notes.append(f"auto value {v:.4g} for {n} is outside its bounds; the model's value is kept")
            del values[n]
    known = set(theta_known) | {f"omega_{e}" for e in eta_known} | {f"sigma_{s}" for s in sigma_known}
    unknown = [n for n in want if n not in known and n not in fixed and not _quiet_name(model, n)]
    if unknown:
        notes.append(f"no automatic rule for {', '.join(unknown)} (auto knows {', '.join(KNOWN_THETA)}, their "
                     f"omega_* and sigma_add/sigma_prop): they keep the model's values")
    return values, notes


def _subject_nca(model, mdata) -> dict:
    """Per-subject NCA with the model's dose routes, the pooled profile and the typical values derived from
    them (CL, Vz, λz, ka from Tmax, V1 = dose/C0, Vss)."""
    panel = mdata.panel
    depot = mdata.events.dose_route.cpu().numpy() == 1
    obs_use = mdata.mask.cpu().numpy() & (mdata.cens.cpu().numpy() == 0)
    res = nca_arrays(panel, depot, obs_use)
    oral = bool(model.structure.oral)
    routes = res["route"][res["n_obs"] > 0]
    route = max(("iv", "infusion", "extravascular"), key=lambda r: int(np.sum(routes == r)))
    inf_t = res["infusion_time"][res["route"] == "infusion"]
    t_inf = float(np.median(inf_t)) if route == "infusion" and inf_t.size else 0.0
    single = ~res["multiple"]
    prof = _pooled_profile(panel, res)
    pooled = None
    if prof is not None:
        multiple = not (single & res["window"].any(1)).any()
        tau = float(np.nanmedian(res["tau"])) if multiple and np.isfinite(res["tau"]).any() else float("nan")
        pooled = _profile_nca(prof[0], prof[1], route == "iv", route == "infusion", multiple, tau, t_inf,
                              route == "extravascular")
    cl0, vz0, lam0 = _gm(res["cl"]), _gm(res["vz"]), _gm(res["lambda_z"])
    if pooled is not None:  # sparse data: the NCA of the naive-pooled profile (C/dose, so cl = 1/AUC)
        cl0 = cl0 or (pooled["cl"] if np.isfinite(pooled["cl"]) else None)
        vz0 = vz0 or (pooled["vz"] if np.isfinite(pooled["vz"]) else None)
        lam0 = lam0 or (pooled["lambda_z"] if np.isfinite(pooled["lambda_z"]) else None)
    if cl0 is None or vz0 is None:  # no terminal phase anywhere: a volume from the concentrations' scale
        cmax_per_dose = _gm(res["cmax"] / res["dose"])
        vz0 = vz0 or (1.0 / cmax_per_dose if cmax_per_dose else 1.0)
        cl0 = cl0 or vz0 * (lam0 or 0.1)
    lam0 = lam0 or cl0 / vz0
    ka_i = _ka_from_tmax(res["tmax"], res["lambda_z"]) if oral else np.full(panel.n_subjects, np.nan)
    ka0 = (_gm(ka_i) or 3.0 * lam0) if oral else None
    v1_i = np.where(single & (res["route"] == "iv"), res["dose"] / res["c0"], np.nan)
    dv_pos = panel.dv[obs_use & (panel.dv > 0)]
    return {"res": res, "route": route, "t_inf": t_inf, "prof": prof, "pooled": pooled, "cl": cl0, "vz": vz0,
            "lam": lam0, "ka_i": ka_i, "ka": ka0, "v1_i": v1_i, "vss": _gm(res["vss"]), "obs_use": obs_use,
            "n_cl": int(np.isfinite(res["cl"]).sum()), "n_sub": panel.n_subjects, "dv_pos": dv_pos}


def _candidates(model, nc: dict) -> list[dict]:
    """Starting points of the linear structure (cl, v[, q, vp[, q2, vp2]][, ka]) for the pooled fit."""
    ncmt, oral = _ncmt(model), bool(model.structure.oral)
    cl0, vz0 = nc["cl"], nc["vz"]
    if ncmt == 1:
        cands = [{"cl": cl0, "v": vz0}]
    else:
        cands = []
        if nc["prof"] is not None and nc["pooled"] is not None:
            s = _strip(nc["prof"][0], nc["prof"][1], nc["pooled"], nc["route"], nc["t_inf"], nc["ka"])
            if s is not None:  # per unit dose → the data's scale (volumes and clearances do not depend on dose)
                cands.append(s)
        v1 = _gm(nc["v1_i"]) if nc["route"] == "iv" else None
        v1 = v1 if v1 and v1 < vz0 else 0.5 * vz0
        vss = nc["vss"]
        vp = max((vss if vss and vss > v1 else vz0) - v1, 0.3 * v1)
        cands.append({"cl": cl0, "v": v1, "q": cl0, "vp": vp})
        if ncmt == 3:
            cands = [{**c, "q2": 0.3 * c["q"], "vp2": c["vp"]} for c in cands]
    if oral:
        cands = [{**c, "ka": nc["ka"]} for c in cands]
    return cands


def _mm_constants(nc: dict, cl: float) -> dict:
    """vm, km from the individual NCA clearances: for a one-compartment bolus CL_nca = vm/(km + C0/2) exactly,
    so 1/CL_i = km/vm + (Cmax_i/2)/vm is a line in Cmax_i/2; without a positive slope and intercept (no
    saturation seen), km = median Cmax and vm = CL·(km + km/2)."""
    res = nc["res"]
    x, y = res["cmax"] / 2, 1.0 / res["cl"]
    ok = np.isfinite(x) & np.isfinite(y) & (y > 0)
    if ok.sum() >= _MIN_SPREAD and np.ptp(x[ok]) > 0:
        slope, icpt = np.polyfit(x[ok], y[ok], 1)
        if slope > 0 and icpt > 0:
            return {"vm": 1.0 / slope, "km": icpt / slope}
    cmax = res["cmax"][np.isfinite(res["cmax"])]
    km = float(np.median(cmax)) if cmax.size else 1.0
    return {"vm": 1.5 * cl * km, "km": km}


def _pooled_best(model, mdata, nc: dict, cands: list[dict], theta_known: list[str]) -> tuple[dict, str]:
    """The best candidate after a naive-pooled fit (of the model, or of its linear analog for an ODE
    Michaelis–Menten model); for MM models vm, km follow from the fitted clearance."""
    structure = model.structure
    mm, oral, ncmt = _is_mm(model), bool(structure.oral), _ncmt(model)
    ode = not getattr(structure, "per_observation", True)
    fit_model, fit_data = model, mdata
    lin = [n for n in ("cl", "v", "q", "vp", "q2", "vp2", "ka") if n in cands[0]]
    if mm and getattr(model, "params_fn", None) is None:  # the linear analog: closed form, fast
        fit_model = Model(ClosedForm(ncmt, oral), {n: cands[0][n] for n in lin}, {}, error=model.error,
                          dvid=getattr(model, "dvid", None), name=f"linear analog of {model.name}")
        fit_data = _model_data(fit_model, mdata.panel)
        names = lin
    elif ode:  # a custom ODE model: each evaluation is an ODE solve; the rules alone
        names = []
    else:
        names = [n for n in theta_known if n in structure.param_names]
    panel = mdata.panel
    obs = nc["obs_use"] & (panel.dv > 0) & np.isfinite(panel.dv) & (dose_index(panel) >= 0)
    best, note = dict(cands[0]), ""
    if names and obs.sum() > len(names):
        pool = _Pooled(fit_model, fit_data, names, obs, _POOL_SUBJECTS)
        base = {n: float(pool.base.theta[n]) for n in names}
        results = []
        for c in cands:
            start = {n: float(c.get(n, base[n])) for n in names}
            if all(np.isfinite(v) and v > 0 for v in start.values()):
                results.append(pool.fit(start, 60 * (len(names) + 1)))
        if results:
            best = {**best, **min(results, key=lambda r: r[1])[0]}
            note = f", naive-pooled fit of {fit_model.name} to {pool.n_obs} observations"
            nc["pooled_sd"] = pool.residual_sd({**base, **best})
    elif ode and not mm:
        note = f"; no pooled fit ({model.name} is an ODE model)"
    if oral and ncmt == 1 and {"ka", "cl", "v"} <= set(best) and best["ka"] < best["cl"] / best["v"]:
        best = {**best, "ka": best["cl"] / best["v"], "v": best["cl"] / best["ka"]}  # the flip-flop twin
    if mm:
        best.update(_mm_constants(nc, best["cl"]))
    return best, note


def _omegas(model, nc: dict, eta_known: list[str]) -> dict[str, float]:
    """Ω diagonal from the robust spread of the individual log values, floored and capped."""
    res, oral = nc["res"], bool(model.structure.oral)
    multi_iv = _ncmt(model) > 1 and nc["route"] == "iv"
    spread = {"cl": _log_var(res["cl"]), "ka": _log_var(nc["ka_i"]) if oral else None,
              "v": _log_var(nc["v1_i"] if multi_iv else res["vz"])}
    found = [v for v in spread.values() if v is not None]
    other = float(np.median(found)) if found else OMEGA_DEFAULT
    out = {}
    for e in eta_known:
        w = spread.get(e)
        out[f"omega_{e}"] = float(np.clip(w if w is not None else other, OMEGA_FLOOR, OMEGA_CAP))
    return out


def _sigmas(model, nc: dict, sigma_known: list[str]) -> dict[str, float]:
    """σ from the pooled residuals of the per-subject terminal-phase regressions."""
    res = nc["res"]
    df = np.where(np.isfinite(res["ssr_log"]), res["lambda_z_n"] - 2, 0)
    tot = float(df.sum())
    s_log = math.sqrt(float(np.nansum(np.where(df > 0, res["ssr_log"], 0))) / tot) if tot > 0 else float("nan")
    s_abs = math.sqrt(float(np.nansum(np.where(df > 0, res["ssr_abs"], 0))) / tot) if tot > 0 else float("nan")
    pool_log, pool_abs = nc.get("pooled_sd", (float("nan"), float("nan")))
    if not tot >= _MIN_DF * max(int((df > 0).sum()), 1) and np.isfinite(pool_log):
        # few terminal points per subject: the best-fit selection makes those residuals far too small
        s_log, s_abs = pool_log, pool_abs
    s_log = float(np.clip(s_log if np.isfinite(s_log) else 0.2, 0.02, 1.0))
    s_abs = s_abs if np.isfinite(s_abs) else 0.0
    dv_pos = nc["dv_pos"]
    p10 = float(np.quantile(dv_pos, 0.1)) if dv_pos.size else 1.0
    err = model.error
    out = {}
    for s in sigma_known:
        if s == "prop" or getattr(err, "log_scale", False):
            out[f"sigma_{s}"] = s_log
        elif "prop" in err.sigma_names:  # combined: equal parts at the 10th percentile of the observations
            out[f"sigma_{s}"] = s_log * p10
        else:
            out[f"sigma_{s}"] = s_abs if s_abs > 0 else s_log * float(np.median(dv_pos) if dv_pos.size else 1.0)
    return out


def _quiet_name(model, name: str) -> bool:
    """Names whose model value is the right start: covariate coefficients (0 = no effect), Ω covariances
    (rescaled with their variances) and tensor-valued weights."""
    terms = getattr(model, "terms", None) or []
    if any(t.coef == name for t in terms):
        return True
    pset = model.parameters
    if name in pset.weight_names:
        return True  # tensor-valued weights: their own initialisation
    if name.startswith("omega_iov_"):
        return False
    if name.startswith("omega_") and name[6:] not in pset.eta_names:
        return True  # a covariance: rescaled with its variances
    return False


# ---------------------------------------------------------------------------------------------- resolution
def library_given(model) -> dict | None:
    """For a :func:`nlmefit.library.get` model, the reporting names given explicitly to ``library.get``
    (``{"names": set, "omega": bool, "sigma": bool}``); None for other models."""
    spec = getattr(model, _SPEC_ATTR, None)
    if not isinstance(spec, Mapping) or spec.get("kind") != "library":
        return None
    pset = model.parameters
    every = _reporting_names(pset)
    names = set(spec.get("theta") or {})
    if spec.get("omega") is not None:
        names |= {n for n in every if n.startswith("omega_") and not n.startswith("omega_iov_")}
    if spec.get("iov") is not None:
        names |= {n for n in every if n.startswith("omega_iov_")}
    if spec.get("sigma") is not None:
        names |= {n for n in every if n.startswith("sigma_")}
    return {"names": names & set(every), "omega": spec.get("omega") is not None,
            "sigma": spec.get("sigma") is not None}


def _with_values(model, values: Mapping[str, float]):
    """A copy of ``model`` with ``values`` (reporting names) as initial values; Ω covariances keep their
    correlations when their variances change."""
    pset = model.parameters
    cur = pset.natural_dict(pset.initial(torch.float64))
    new = {**cur, **{k: float(v) for k, v in values.items()}}
    for blk in pset.omega.block_list:
        for a_pos, a in enumerate(blk):
            for c in blk[:a_pos]:
                key = f"omega_{c}_{a}"
                if key in cur and key not in values:
                    va, vc = cur[f"omega_{a}"], cur[f"omega_{c}"]
                    if va > 0 and vc > 0:
                        new[key] = cur[key] / math.sqrt(va * vc) * math.sqrt(new[f"omega_{a}"] * new[f"omega_{c}"])
    return model.with_initial(pset.params_from_dict(new))


def _record(model, sources: Mapping[str, str], method: str, notes: list[str]) -> dict:
    pset = model.parameters
    vals = pset.natural_dict(pset.initial(torch.float64))
    return {"values": vals, "source": {k: sources.get(k, SOURCE_MODEL) for k in vals}, "method": method,
            "notes": list(notes)}


def initial_record(model) -> dict:
    """What a fit of ``model`` started from: the record :func:`resolve_initial` attached, else the model's own
    values (``{"values", "source", "method", "notes"}``; empty when the model has no ParameterSet)."""
    rec = getattr(model, _REC_ATTR, None)
    if rec is not None:
        return rec
    try:
        return _record(model, {}, SOURCE_MODEL, [])
    except Exception:  # a LatentModel without natural-scale reporting: nothing to record
        return {}


def _attach(model, record: dict, data):
    setattr(model, _REC_ATTR, record)
    setattr(model, _DATA_ATTR, data)
    return model


def resolve_initial(model, data, init=None):
    """The model with its starting values for ``init`` (see the module docstring for the rules); ``data`` is the
    model's bound data. The record of where each value came from (:func:`initial_record`) is attached to the
    returned model, which is a copy whenever anything was resolved: the user's model is never modified."""
    if init is not None and not isinstance(init, (str, Mapping, Params)):
        raise ModelSpecError(f"init must be None, 'auto', 'model', a dict of initial values or Params, got "
                             f"{type(init).__name__}")
    if isinstance(init, str) and init.lower() not in ("auto", "model"):
        raise ModelSpecError(f"init must be 'auto', 'model', a dict or Params, got {init!r}")
    pset = getattr(model, "parameters", None)
    rec = getattr(model, _REC_ATTR, None)
    if init is None and rec is not None and getattr(model, _DATA_ATTR, None) is data \
            and rec.get("values") == pset.natural_dict(pset.initial(torch.float64)):
        return model  # already resolved for these data (an estimator that binds twice)
    if isinstance(init, Params):
        m = model.with_initial(init)
        every = _reporting_names(m.parameters)
        return _attach(m, _record(m, dict.fromkeys(every, SOURCE_USER), SOURCE_USER, []), data)
    lib = library_given(model) if pset is not None else None
    mode = init.lower() if isinstance(init, str) else ("auto" if lib is not None else "model")
    user = set(lib["names"]) if lib else set()
    if isinstance(init, Mapping):
        model = model.with_initial(pset.params_from_dict(init))
        pset = model.parameters
        user |= set(init)
    if mode == "model":
        if lib is None and not isinstance(init, Mapping):
            return model
        m = model if isinstance(init, Mapping) else model.with_initial(pset.initial(torch.float64))
        return _attach(m, _record(m, dict.fromkeys(user, SOURCE_USER), SOURCE_MODEL, []), data)
    fixed = pset.fixed_names()
    want = [n for n in _reporting_names(pset) if n not in user and n not in fixed]
    try:
        values, notes = auto_initial(model, data, names=want)
    except ModelSpecError:
        raise
    except Exception as e:  # automatic starts are a convenience: never a traceback from NCA or the pooled fit
        values, notes = {}, [f"automatic initial values failed ({type(e).__name__}: {e}); the model's values are "
                             f"used"]
        warnings.warn(notes[0], stacklevel=4)
    if lib is None or init == "auto":  # asked for explicitly: say what auto could not do
        for n in notes[1:] if values else notes:
            warnings.warn(f"init='auto': {n}", stacklevel=4)
    m = _with_values(model, values) if values else model.with_initial(pset.initial(torch.float64))
    sources = {**dict.fromkeys(user, SOURCE_USER), **dict.fromkeys(values, SOURCE_AUTO)}
    for blk in pset.omega.block_list:  # covariances rescaled with auto variances count as auto
        for a_pos, a in enumerate(blk):
            for c in blk[:a_pos]:
                if f"omega_{c}_{a}" not in user and (f"omega_{a}" in values or f"omega_{c}" in values):
                    sources[f"omega_{c}_{a}"] = SOURCE_AUTO
    method = f"auto ({notes[0]})" if values else SOURCE_MODEL
    return _attach(m, _record(m, sources, method, notes), data)
