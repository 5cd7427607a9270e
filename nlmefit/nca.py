"""Non-compartmental analysis (NCA), per subject, batched over subjects with numpy.

``nca(data)`` takes a NONMEM-style DataFrame (or a :class:`~nlmefit.panel.Panel`) and returns one row per
subject. Each subject is analysed over one dosing interval: the dose whose interval holds the most observations
(``dose="auto"``; ties go to the earlier dose), the first or the last dose. Observations belong to the last dose
before them in the same reset epoch (the NONMEM ordering rule of :mod:`nlmefit.pk.events`); censored (BLQ)
records are left out; times are relative to the dose.

**Single dose** (no earlier dose in the epoch, no SS flag) — with C(t) the observed concentrations:

* ``cmax``, ``tmax``: the largest observation and its (first) time; ``c0``: the concentration at the dose time —
  0 after an extravascular dose or an infusion, back-extrapolated after an IV bolus by the log-linear line through
  the first two positive points, ``c0 = c1·(c1/c2)^(t1/(t2−t1))`` (c1 when the second is not lower);
* ``auc_last`` = ∫₀^tlast C dt by the **linear-up/log-down** trapezoid: a segment whose concentration falls
  (c2 < c1, both > 0) contributes ``(c1−c2)·Δt / ln(c1/c2)`` (exact for exponential decay), any other segment
  ``(c1+c2)·Δt/2``; ``aumc_last`` = ∫ t·C dt by the same rule (log segment:
  ``(t1c1 − t2c2)/k + (c1−c2)/k²`` with ``k = ln(c1/c2)/Δt``); tlast = the last positive concentration;
* ``lambda_z``: the terminal slope, −slope of the least-squares line of ln C on t over the last k ≥ 3 positive
  points after tmax, k chosen by the best **adjusted R²**, ``1 − (1−R²)(k−1)/(k−2)`` (among fits within
  ``adj_r2_tol`` of the best, the one with the most points — PKNCA's rule); ``half_life = ln 2/λz``;
* ``auc_inf = auc_last + clast/λz``, ``aumc_inf = aumc_last + clast·tlast/λz + clast/λz²``,
  ``pct_extrap = 100·(auc_inf − auc_last)/auc_inf``;
* ``cl = dose/auc_inf`` (CL/F after an extravascular dose), ``vz = cl/λz``, ``mrt = aumc_inf/auc_inf``
  (minus half the infusion time after an infusion) and, for IV doses, ``vss = cl·mrt``.

**Multiple dose** (an earlier dose in the epoch, or SS ≠ 0): the interval [0, τ] after the analysed dose, with
τ = II of that dose, else the time to the next dose, else the previous interval; ``c0`` is the smallest
concentration in the interval (the trough) after an extravascular dose or an infusion; ``auc_tau`` = ∫₀^τ C dt
(the curve is extended from tlast to τ by λz when the last sample is earlier) and ``cl = dose/auc_tau`` (exact
at steady state for linear kinetics), ``vz = cl/λz``. ``auc_inf``, ``mrt`` and ``vss`` are not reported.

Routes: ``route="iv"`` (bolus into the sampled compartment), ``"extravascular"`` (oral, …) or ``None`` (the
default): doses with a RATE or DUR are infusions, the others extravascular unless ``route="iv"`` is given.

Subjects without a usable interval (fewer than one positive observation after a dose) get NaN. A terminal slope
needs ``lambda_z_points`` (3) positive points after tmax with a negative slope, else ``lambda_z`` and everything
that needs it is NaN (``auc_last``, ``cmax``, ``tmax`` are still reported).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from nlmefit.errors import DataError
from nlmefit.panel import Panel

__all__ = ["nca", "nca_arrays", "dose_index", "COLUMNS"]

#: the columns of :func:`nca`'s table, in order
COLUMNS = ("ID", "route", "dose", "dose_time", "tau", "n_obs", "cmax", "tmax", "c0", "tlast", "clast", "auc_last",
           "auc_inf", "auc_tau", "pct_extrap", "aumc_inf", "lambda_z", "lambda_z_n", "lambda_z_r2_adj",
           "lambda_z_lower", "lambda_z_upper", "half_life", "cl", "vz", "mrt", "vss")

_ROUTES = (None, "iv", "extravascular", "oral")


def dose_index(panel: Panel, dose_ok: np.ndarray | None = None) -> np.ndarray:
    """[N, J] int: for each observation, the position of the last dose (among ``dose_ok``, default the real
    doses with AMT or RATE ≠ 0) given before it in the same reset epoch; −1 when there is none."""
    if dose_ok is None:
        dose_ok = panel.dose_mask & ((panel.dose_amt != 0) | (panel.dose_rate != 0))
    ot, oseq, oep = panel.obs_time, panel.obs_seq, panel.obs_epoch
    idx = np.full(ot.shape, -1, dtype=np.int64)
    for d in range(panel.dose_time.shape[1]):  # doses are sorted by time within a subject: the last one wins
        dt, ds = panel.dose_time[:, d, None], panel.dose_seq[:, d, None]
        before = (dt < ot) | ((dt == ot) & (ds < oseq))
        hit = dose_ok[:, d, None] & before & (panel.dose_epoch[:, d, None] == oep)
        idx = np.where(hit, d, idx)
    return idx


def _rows(a: np.ndarray, col: np.ndarray) -> np.ndarray:
    """a[i, col[i]] (col clipped into range)."""
    c = np.clip(col, 0, max(a.shape[1] - 1, 0))
    return np.take_along_axis(a, c[:, None], axis=1)[:, 0] if a.shape[1] else np.full(a.shape[0], np.nan)


def _compact(mask: np.ndarray, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Move the True entries of each row to the front (order kept): (valid [N, K], *arrays [N, K])."""
    order = np.argsort(~mask, axis=1, kind="stable")
    valid = np.take_along_axis(mask, order, axis=1)
    return (valid,) + tuple(np.where(valid, np.take_along_axis(a, order, axis=1), np.nan) for a in arrays)


def _segments(t: np.ndarray, c: np.ndarray, use: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Linear-up/log-down AUC and AUMC of consecutive points (columns k, k+1) where ``use`` [N, K−1] holds."""
    t1, t2, c1, c2 = t[:, :-1], t[:, 1:], c[:, :-1], c[:, 1:]
    dt = t2 - t1
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        logd = use & (c2 < c1) & (c2 > 0) & (c1 > 0) & (dt > 0)
        ratio = np.log(np.where(logd, c1 / np.where(logd, c2, 1.0), 2.0))
        k = ratio / np.where(dt > 0, dt, 1.0)
        auc = np.where(logd, (c1 - c2) * dt / ratio, 0.5 * (c1 + c2) * dt)
        aumc = np.where(logd, (t1 * c1 - t2 * c2) / k + (c1 - c2) / (k * k), 0.5 * (t1 * c1 + t2 * c2) * dt)
    return np.where(use, auc, 0.0).sum(1), np.where(use, aumc, 0.0).sum(1)


def _lambda_z(t: np.ndarray, c: np.ndarray, cand: np.ndarray, min_points: int, tol: float) -> dict:
    """Best-fit terminal slope per row over the last k ≥ ``min_points`` candidate points (adjusted R²)."""
    n_rows = t.shape[0]
    valid, tc, cc = _compact(cand, t, c)
    nc = valid.sum(1)
    width = tc.shape[1]
    out = {k: np.full(n_rows, np.nan) for k in ("lambda_z", "intercept", "r2_adj", "lower", "upper", "ssr_log",
                                                 "ssr_abs")}
    out["n"] = np.zeros(n_rows, dtype=np.int64)
    if width < min_points:
        return out
    # reverse each row's valid run, so that a cumulative sum over columns is a sum over the last k points
    src = nc[:, None] - 1 - np.arange(width)[None, :]
    ok = src >= 0
    tr = np.where(ok, np.take_along_axis(tc, np.clip(src, 0, None), 1), 0.0)
    yr = np.where(ok, np.log(np.take_along_axis(cc, np.clip(src, 0, None), 1)), 0.0)
    k = np.arange(1, width + 1, dtype=np.float64)[None, :]
    st, sy = np.cumsum(tr, 1), np.cumsum(yr, 1)
    stt, sty, syy = np.cumsum(tr * tr, 1), np.cumsum(tr * yr, 1), np.cumsum(yr * yr, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        sxx = stt - st * st / k
        sxy = sty - st * sy / k
        syc = syy - sy * sy / k
        slope = sxy / sxx
        r2 = np.where(syc > 0, sxy * sxy / (sxx * syc), 1.0)
        adj = 1 - (1 - r2) * (k - 1) / (k - 2)
    good = (k >= min_points) & (k <= nc[:, None]) & (sxx > 0) & (slope < 0) & np.isfinite(adj)
    adj_m = np.where(good, adj, -np.inf)
    best = adj_m.max(1)
    near = good & (adj_m >= best[:, None] - tol)
    has = good.any(1)
    # the most points among the fits within tol of the best adjusted R²
    kk = np.where(has, width - 1 - np.argmax(near[:, ::-1], axis=1), 0)
    rows = np.arange(n_rows)
    sl, n = slope[rows, kk], kk + 1
    icpt = (sy[rows, kk] - sl * st[rows, kk]) / n
    pts = np.arange(width)[None, :] <= kk[:, None]
    with np.errstate(all="ignore"):
        pred = np.exp(icpt[:, None] + sl[:, None] * tr)
        abs_res = np.where(pts & ok, np.exp(yr) - pred, 0.0)
        ssr_log = np.clip(syc[rows, kk] - sxy[rows, kk] ** 2 / sxx[rows, kk], 0, None)
    out.update(lambda_z=np.where(has, -sl, np.nan), intercept=np.where(has, icpt, np.nan),
               r2_adj=np.where(has, adj[rows, kk], np.nan), n=np.where(has, n, 0),
               lower=np.where(has, tr[rows, kk], np.nan), upper=np.where(has, tr[:, 0], np.nan),
               ssr_log=np.where(has, ssr_log, np.nan),
               ssr_abs=np.where(has, (abs_res ** 2).sum(1), np.nan))
    return out


def nca_arrays(panel: Panel, depot: np.ndarray, obs_use: np.ndarray | None = None, dose: str = "auto",
               lambda_z_points: int = 3, adj_r2_tol: float = 1e-4) -> dict[str, np.ndarray]:
    """The computation behind :func:`nca`, as arrays [N] (plus ``ssr_log``, ``ssr_abs``: the residual sums of
    squares of the terminal fits, on the log and the concentration scale, and ``dose_pos``, ``window`` [N, J]:
    the analysed dose and its observations). ``depot`` [N, D] bool: doses that are extravascular;
    ``obs_use`` [N, J] bool: the observations to use (default every uncensored observation)."""
    if dose not in ("auto", "first", "last"):
        raise ValueError(f"dose must be 'auto', 'first' or 'last', got {dose!r}")
    if lambda_z_points < 3:
        raise ValueError(f"lambda_z_points must be at least 3, got {lambda_z_points}")
    n_sub, n_obs = panel.obs_time.shape
    use = panel.obs_mask & (panel.cens == 0) & np.isfinite(panel.dv)
    if obs_use is not None:
        use = use & obs_use
    dose_ok = panel.dose_mask & ((panel.dose_amt != 0) | (panel.dose_rate != 0))
    idx = dose_index(panel, dose_ok)
    n_dose = panel.dose_time.shape[1]
    rows = np.arange(n_sub)
    counts = np.zeros((n_sub, max(n_dose, 1)), dtype=np.int64)
    hit = use & (idx >= 0) & (panel.dv > 0)
    np.add.at(counts, (np.broadcast_to(rows[:, None], idx.shape)[hit], idx[hit]), 1)
    has_obs = counts.max(1) > 0
    if dose == "auto":
        pos = counts.argmax(1)
    elif dose == "first":
        pos = (counts > 0).argmax(1)
    else:
        pos = counts.shape[1] - 1 - (counts[:, ::-1] > 0).argmax(1)
    f = lambda a: _rows(a, pos)  # noqa: E731
    amt, t_d = f(panel.dose_amt).astype(float), f(panel.dose_time).astype(float)
    rate, dur, ii = f(panel.dose_rate), f(panel.dose_dur), f(panel.dose_ii)
    ss, epoch = f(panel.dose_ss), f(panel.dose_epoch)
    is_depot = f(depot.astype(bool)) if n_dose else np.zeros(n_sub, bool)
    t_inf = np.where(rate > 0, amt / np.where(rate > 0, rate, 1.0), np.where(dur > 0, dur, 0.0))
    infusion = ~is_depot & ((rate != 0) | (dur > 0))
    bolus = ~is_depot & ~infusion
    j = np.arange(n_dose)[None, :]
    same = dose_ok & (panel.dose_epoch == epoch[:, None])
    earlier = same & (j < pos[:, None])
    later = same & (j > pos[:, None])
    multiple = earlier.any(1) | (ss != 0)
    dt_all = panel.dose_time
    next_t = np.where(later, dt_all, np.inf).min(1) if n_dose else np.full(n_sub, np.inf)
    prev_t = np.where(earlier, dt_all, -np.inf).max(1) if n_dose else np.full(n_sub, -np.inf)
    tau = np.where(ii > 0, ii, np.where(np.isfinite(next_t), next_t - t_d,
                                         np.where(np.isfinite(prev_t), t_d - prev_t, np.nan)))
    tau = np.where(multiple, tau, np.nan)
    window = use & (idx == pos[:, None]) & has_obs[:, None]
    rel = panel.obs_time - t_d[:, None]
    window &= ~(multiple[:, None] & (rel > tau[:, None] * (1 + 1e-9)))
    valid, t, c = _compact(window, rel, panel.dv.astype(float))
    res = profile_stats(t, c, valid, bolus=bolus, infusion=infusion, multiple=multiple, tau=tau, dose=amt,
                        infusion_time=t_inf, extravascular=is_depot, lambda_z_points=lambda_z_points,
                        adj_r2_tol=adj_r2_tol)
    bad = ~has_obs
    route = np.where(is_depot, "extravascular", np.where(infusion, "infusion", "iv"))
    res = {"route": route, "dose": amt, "dose_time": t_d, "tau": tau, **res}
    for k, v in res.items():
        if k in COLUMNS and k not in ("route", "n_obs", "lambda_z_n") and v.dtype.kind == "f":
            res[k] = np.where(bad | ~np.isfinite(v), np.nan, v)
    res.update(dose_pos=pos, window=window, multiple=multiple, infusion_time=t_inf)
    return res


def profile_stats(t: np.ndarray, c: np.ndarray, valid: np.ndarray, *, bolus: np.ndarray, infusion: np.ndarray,
                  multiple: np.ndarray, tau: np.ndarray, dose: np.ndarray, infusion_time: np.ndarray,
                  extravascular: np.ndarray, lambda_z_points: int = 3, adj_r2_tol: float = 1e-4) -> dict:
    """NCA of profiles given as arrays [N, K]: times after the dose ``t`` (increasing), concentrations ``c``,
    ``valid`` (the points of each row, at the front); the other arguments are per row [N]. Returns the columns
    of :data:`COLUMNS` from ``n_obs`` on, plus ``ssr_log``, ``ssr_abs`` and ``intercept`` of the terminal fit."""
    n_sub, n_obs = t.shape
    amt, t_inf, is_depot = dose, infusion_time, extravascular
    n_win = valid.sum(1)
    cpos = valid & (c > 0)
    # Cmax, Tmax over the observed points
    cm = np.where(valid, c, -np.inf)
    jmax = cm.argmax(1) if n_obs else np.zeros(n_sub, dtype=np.int64)
    cmax = np.where(n_win > 0, _rows(np.where(valid, c, np.nan), jmax), np.nan)
    tmax = np.where(n_win > 0, _rows(t, jmax), np.nan)
    # the concentration at the dose time
    first_t, first_c = _rows(t, np.zeros(n_sub, np.int64)), _rows(c, np.zeros(n_sub, np.int64))
    _, tp, cp = _compact(cpos, t, c)
    nan = np.full(n_sub, np.nan)
    t1, c1 = (tp[:, 0], cp[:, 0]) if n_obs else (nan, nan)
    t2, c2 = (tp[:, 1], cp[:, 1]) if n_obs > 1 else (nan, nan)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        back = c1 * (c1 / c2) ** (t1 / (t2 - t1))
    back = np.where(np.isfinite(back) & (c2 < c1) & (t2 > t1) & (t1 > 0), back, c1)
    trough = np.where(cpos, c, np.inf).min(1)
    c0 = np.where(bolus, back, np.where(multiple, np.where(np.isfinite(trough), trough, 0.0), 0.0))
    c0 = np.where(n_win > 0, np.where((first_t <= 0) & np.isfinite(first_c), first_c, c0), np.nan)
    # AUC/AUMC from 0 to tlast, with the point (0, c0) in front
    tf = np.concatenate([np.zeros((n_sub, 1)), t], 1)
    cf = np.concatenate([c0[:, None], c], 1)
    vf = np.concatenate([n_win[:, None] > 0, valid], 1)
    last_pos = np.where(cpos.any(1), cpos.shape[1] - 1 - np.argmax(cpos[:, ::-1], axis=1), -1)
    tlast = np.where(last_pos >= 0, _rows(t, last_pos), np.nan)
    clast = np.where(last_pos >= 0, _rows(c, last_pos), np.nan)
    seg = vf[:, :-1] & vf[:, 1:] & (np.arange(n_obs)[None, :] <= last_pos[:, None])
    auc_last, aumc_last = _segments(tf, np.where(vf, cf, 0.0), seg)
    auc_last = np.where(last_pos >= 0, auc_last, np.nan)
    aumc_last = np.where(last_pos >= 0, aumc_last, np.nan)
    # terminal slope on the positive points after tmax
    cand = cpos & (t > tmax[:, None])
    lz = _lambda_z(t, c, cand, lambda_z_points, adj_r2_tol)
    lam = lz["lambda_z"]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        auc_inf = np.where(multiple, np.nan, auc_last + clast / lam)
        aumc_inf = np.where(multiple, np.nan, aumc_last + clast * tlast / lam + clast / (lam * lam))
        pct = 100 * (auc_inf - auc_last) / auc_inf
        gap = np.clip(tau - tlast, 0.0, None)
        tail = np.where(gap > 0, clast / lam * -np.expm1(-lam * gap), 0.0)
        auc_tau = np.where(multiple, auc_last + tail, np.nan)
        cl = np.where(multiple, amt / auc_tau, amt / auc_inf)
        vz = cl / lam
        mrt = np.where(multiple, np.nan, aumc_inf / auc_inf - np.where(infusion, t_inf / 2, 0.0))
        vss = np.where(is_depot, np.nan, cl * mrt)
    return {"n_obs": n_win, "cmax": cmax, "tmax": tmax, "c0": c0, "tlast": tlast, "clast": clast,
            "auc_last": auc_last, "auc_inf": auc_inf, "auc_tau": auc_tau, "pct_extrap": pct, "aumc_inf": aumc_inf,
            "lambda_z": lam, "lambda_z_n": lz["n"], "lambda_z_r2_adj": lz["r2_adj"], "lambda_z_lower": lz["lower"],
            "lambda_z_upper": lz["upper"], "half_life": math.log(2) / lam, "cl": cl, "vz": vz, "mrt": mrt,
            "vss": vss, "ssr_log": lz["ssr_log"], "ssr_abs": lz["ssr_abs"], "intercept": lz["intercept"]}


def _select_dvid(panel: Panel, dvid) -> np.ndarray:
    codes = np.unique(panel.obs_dvid[panel.obs_mask])
    if dvid is None:
        if len(codes) > 1:
            raise DataError(f"the data have several DVID values ({sorted(panel.dvid_levels or codes.tolist())}); "
                            f"say which one to analyse with dvid=...")
        return panel.obs_mask
    levels = panel.dvid_levels or {}
    code = levels.get(dvid, dvid) if isinstance(levels, dict) else dvid
    try:
        code = int(code)
    except (TypeError, ValueError):
        raise DataError(f"DVID {dvid!r} is not in the data ({list(levels) or codes.tolist()})") from None
    m = panel.obs_mask & (panel.obs_dvid == code)
    if not m.any():
        raise DataError(f"no observation has DVID {dvid!r}")
    return m


def nca(data, route: str | None = None, dose: str = "auto", dvid=None, depot_cmt: int | Sequence[int] | None = None,
        lambda_z_points: int = 3, adj_r2_tol: float = 1e-4, **column_map: str) -> pd.DataFrame:
    """Per-subject non-compartmental analysis (formulas and rules in the module docstring).

    ``data``: a NONMEM-style DataFrame (``column_map`` renames columns as for :meth:`Panel.from_dataframe`) or a
    Panel. ``route``: ``None`` (infusions from RATE/DUR, every other dose extravascular), ``"iv"`` (boluses into
    the sampled compartment) or ``"extravascular"``/``"oral"``; ``depot_cmt``: with ``route=None``, doses into
    these CMT values are extravascular and the others IV. ``dose``: which dosing interval (``"auto"``: the one with
    the most observations, ``"first"``, ``"last"``). ``dvid``: the endpoint, when the data have several.

    Returns one row per subject: the columns of :data:`COLUMNS` (``cl`` is CL/F and ``vz`` Vz/F after an
    extravascular dose)."""
    if route not in _ROUTES:
        raise ValueError(f"route must be None, 'iv', 'extravascular' or 'oral', got {route!r}")
    panel = data if isinstance(data, Panel) else Panel.from_dataframe(data, **column_map)
    use = _select_dvid(panel, dvid)
    if route == "iv":
        depot = np.zeros(panel.dose_time.shape, bool)
    elif route in ("extravascular", "oral"):
        depot = np.ones(panel.dose_time.shape, bool)
    elif depot_cmt is not None:
        cmts = [depot_cmt] if isinstance(depot_cmt, (int, np.integer)) else list(depot_cmt)
        depot = np.isin(panel.dose_cmt, cmts)
    else:
        depot = np.ones(panel.dose_time.shape, bool)
    depot &= ~((panel.dose_rate != 0) | (panel.dose_dur > 0))
    res = nca_arrays(panel, depot, use, dose=dose, lambda_z_points=lambda_z_points, adj_r2_tol=adj_r2_tol)
    out = pd.DataFrame({"ID": panel.ids, **{k: res[k] for k in COLUMNS[1:]}})
    out["lambda_z_n"] = out["lambda_z_n"].astype(np.int64)
    out["n_obs"] = out["n_obs"].astype(np.int64)
    return out
