"""Exposure metrics over an interval and probability of target attainment (PTA), as tidy DataFrames.

Per simulated subject, from residual-free predictions. Two windows, both stated in the table:

* the **AUC24 window** (column ``AUC24_WINDOW``, :func:`auc24_window`): the last 24 h of dosing — the 24 h that
  end one dosing interval after the last dose (at steady state with ``steady_state=True``, or near it after
  enough doses). When the last dosing interval τ does not divide 24 h, the window is the last whole dosing
  intervals that span at least 24 h and AUC24 is their AUC per 24 h (``[144, 192] h per 24 h`` for q48h), so
  AUC24 = F·daily dose/CL at steady state for every τ. After single doses only: the 24 h after the last dose.
* the **exposure interval** ``[t0, t1]`` (column ``WINDOW``): the last dosing interval τ by default, or the
  caller's window.

=================  ====================================================================================
``AUC24``          ∫ C dt over the AUC24 window (per 24 h). ``auc="quadrature"``: Gauss–Legendre (16 nodes)
                   on 8 geometrically growing sub-pieces of every smooth piece between dose events (doses,
                   infusion ends): ~1e−9 relative for compartment models; ``"trapezoid"``: the trapezoid
                   rule on a 101-point grid (fast, approximate).
``AUC``            the same values as ``AUC24`` (kept for backward compatibility; :func:`pta` reports it as
                   AUC24).
``AUCTAU``         ∫ C dt over the exposure interval (AUC_τ, per dosing interval, by default), same methods.
``AUC_INF``        F·ΣDose/CL — analytic for linear models with a ``cl`` parameter (total exposure of the
                   whole regimen, to infinity); NaN otherwise.
``CMAX``/``TMAX``  maximum over a 101-point grid of the interval (plus the quadrature nodes) and its time
                   after the start of the interval (time after dose for the last dosing interval).
``CMIN``           minimum over the same points; ``CTROUGH`` is C(t1), the concentration at the end.
``CAVG``           AUCTAU/(t1 − t0).
``T_ABOVE``        time with fu·C above ``threshold`` (linear interpolation between grid points) and
``FT_ABOVE_PCT``   as % of the interval (%fT>MIC with ``threshold`` = MIC and ``fu`` the unbound fraction).
=================  ====================================================================================

:func:`pta` turns the table into the probability of attaining a target per regimen: ``metric ≥ threshold``,
``metric/MIC ≥ threshold`` for a range of MICs (AUC/MIC, Cmax/MIC), or ``metric`` within a window (troughs);
each row names the window its metric was computed over.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from nlmefit.errors import ModelSpecError
from nlmefit.models.structure import ClosedForm
from nlmefit.simulation.concentrations import broadcasts, copies, slice_params
from nlmefit.simulation.population import SimulatedPopulation

__all__ = ["exposure_table", "pta", "METRICS", "auc24_window", "window_label"]

METRICS = ("AUC24", "AUCTAU", "AUC", "AUC_INF", "CMAX", "TMAX", "CMIN", "CTROUGH", "CAVG", "T_ABOVE",
           "FT_ABOVE_PCT")
_ALIASES = {"AUC": "AUC24"}  # the bare name: AUC per 24 h (reported as AUC24)
_DAY = 24.0
_GL_NODES = 16
_SUBPIECES = 8


def _breakpoints(data1, t0: float, t1: float) -> np.ndarray:
    ev = data1.events
    m = ev.dose_mask[0]
    t = ev.dose_time[0][m].cpu().numpy()
    rate = ev.dose_rate[0][m].cpu().numpy()
    amt = ev.dose_amt[0][m].cpu().numpy()
    ends = t[rate > 0] + amt[rate > 0] / rate[rate > 0]
    pts = np.concatenate([[t0, t1], t, ends])
    return np.unique(pts[(pts >= t0) & (pts <= t1)])


def _eval_times(data1, t0: float, t1: float, auc: str):
    """Evaluation points: a 101-point grid, and (quadrature) Gauss–Legendre nodes of every smooth piece."""
    fine = np.linspace(t0, t1, 101)
    if auc == "trapezoid":
        return fine, None
    x, w = np.polynomial.legendre.leggauss(_GL_NODES)
    bp = _breakpoints(data1, t0, t1)
    # each smooth piece is split geometrically (widths ∝ 2^k) so the early peak and the long exponential tail
    # of a piece are both resolved
    geo = (2.0 ** np.arange(_SUBPIECES + 1) - 1) / (2.0 ** _SUBPIECES - 1)
    sub = bp[:-1, None] + (bp[1:] - bp[:-1])[:, None] * geo[None, :]
    a, b = sub[:, :-1].ravel(), sub[:, 1:].ravel()
    nodes = (0.5 * (b - a))[:, None] * x[None, :] + (0.5 * (a + b))[:, None]
    weights = (0.5 * (b - a))[:, None] * w[None, :]
    return fine, (nodes.ravel(), weights.ravel())


def auc24_window(regimen) -> tuple[float, float, float]:
    """The AUC24 window ``(t0, t1, span)`` of a regimen (module docstring): AUC24 = AUC over [t0, t1] · 24/span.

    With a dosing interval τ: t1 = last dose + τ and span = the smallest whole number of intervals ≥ 24 h
    (24 h when τ divides 24 h); t0 = max(0, t1 − span). Single doses only: [last dose, last dose + 24 h]."""
    t_last = float(np.max(regimen.dose_times()[:, 0]))
    tau = regimen.last_interval()
    if not tau:
        return t_last, t_last + _DAY, _DAY
    tau = float(tau)
    span = tau * max(1, int(np.ceil(_DAY / tau - 1e-9)))
    t1 = t_last + tau
    return max(0.0, t1 - span), t1, span


def window_label(t0: float, t1: float, span: float | None = None) -> str:
    """``[t0, t1] h``, with `` per 24 h`` when the AUC over it is scaled from ``span`` hours to 24 h."""
    per = "" if span is None or abs(span - _DAY) < 1e-9 else " per 24 h"
    return f"[{t0:g}, {t1:g}] h{per}"


def _auc_points(data1, t0: float, t1: float, auc: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Points of an AUC over [t0, t1]: (times, weights) for quadrature, (grid, None) for the trapezoid rule."""
    fine, quad = _eval_times(data1, t0, t1, auc)
    return (fine, None) if quad is None else quad


def exposure_table(pop: SimulatedPopulation, interval: tuple[float, float], *,
                   auc24: tuple[float, float, float] | None = None, threshold: float | None = None,
                   fu: float = 1.0, auc: str = "quadrature", chunk: int = 10000) -> pd.DataFrame:
    """Exposure metrics over ``interval`` and AUC24 over ``auc24`` = (t0, t1, span) (default: the 24 h ending at
    the end of ``interval``) for the S subjects of ``pop`` under its regimen (module docstring)."""
    if auc not in ("quadrature", "trapezoid"):
        raise ModelSpecError(f"auc must be 'quadrature' or 'trapezoid', got {auc!r}")
    if not 0 < fu <= 1:
        raise ModelSpecError(f"fu (unbound fraction) must be in (0, 1], got {fu}")
    t0, t1 = interval
    if auc24 is None:
        auc24 = (max(0.0, t1 - _DAY), t1, _DAY)
    a0, a1, span = (float(x) for x in auc24)
    fine, quad = _eval_times(pop.data1, t0, t1, auc)
    times = fine if quad is None else np.concatenate([fine, quad[0]])
    same = abs(a0 - t0) < 1e-12 and abs(a1 - t1) < 1e-12  # AUC24 over the exposure interval itself (q24h)
    t24, w24 = (np.empty(0), None) if same else _auc_points(pop.data1, a0, a1, auc)
    n_f, n_i = len(fine), len(times)
    times_all, back = np.unique(np.concatenate([times, t24]), return_inverse=True)  # a template has no duplicates
    s = pop.n
    cols = {k: np.empty(s) for k in ("AUC24", "AUCTAU", "CMAX", "TMAX", "CMIN", "CTROUGH")}
    if threshold is not None:
        cols["T_ABOVE"] = np.empty(s)
    for a in range(0, s, chunk):  # metrics chunk by chunk: the [S, T] concentrations are never held at once
        sl = slice(a, min(s, a + chunk))
        conc_all = pop.rows(sl).concentrations(times_all, chunk)[:, back]
        conc, c24 = conc_all[:, :n_i], conc_all[:, n_i:]
        c_fine = conc[:, :n_f]
        cols["AUCTAU"][sl] = np.trapezoid(c_fine, fine, axis=1) if quad is None else conc[:, n_f:] @ quad[1]
        if same:
            cols["AUC24"][sl] = cols["AUCTAU"][sl] * (_DAY / span)
        else:
            cols["AUC24"][sl] = (np.trapezoid(c24, t24, axis=1) if w24 is None else c24 @ w24) * (_DAY / span)
        k = np.argmax(conc, axis=1)
        cols["CMAX"][sl] = conc[np.arange(conc.shape[0]), k]
        cols["TMAX"][sl] = times[k] - t0
        cols["CMIN"][sl] = conc.min(axis=1)
        cols["CTROUGH"][sl] = c_fine[:, -1]
        if threshold is not None:
            cols["T_ABOVE"][sl] = _time_above(fu * c_fine, fine, float(threshold))
    out = {"AUC24": cols["AUC24"], "AUCTAU": cols["AUCTAU"], "AUC": cols["AUC24"], "AUC_INF": _auc_inf(pop),
           "CMAX": cols["CMAX"], "TMAX": cols["TMAX"], "CMIN": cols["CMIN"], "CTROUGH": cols["CTROUGH"],
           "CAVG": cols["AUCTAU"] / (t1 - t0)}
    if threshold is not None:
        out["T_ABOVE"] = cols["T_ABOVE"]
        out["FT_ABOVE_PCT"] = 100.0 * cols["T_ABOVE"] / (t1 - t0)
    df = pd.DataFrame(out)
    df["AUC_METHOD"] = "trapezoid" if quad is None else "quadrature"
    df["AUC24_WINDOW"] = window_label(a0, a1, span)
    df["WINDOW"] = window_label(t0, t1)
    return df


def _auc_inf(pop: SimulatedPopulation) -> np.ndarray:
    """F·ΣDose/CL for linear closed-form models with ``cl``; NaN where not analytic."""
    model, eta = pop.model, pop.eta
    s = eta.shape[0]
    if not isinstance(model.structure, ClosedForm):
        return np.full(s, np.nan)
    d = copies(pop.data1, pop.cov_t, pop.scale, s, broadcasts(model))
    with torch.no_grad():
        ind = model.individual_parameters(slice_params(pop.p, slice(0, s)), eta, d)
    if "cl" not in ind:
        return np.full(s, np.nan)
    def col(v: torch.Tensor) -> torch.Tensor:  # scalar, [S] or [S, 1] → [S]
        return v.reshape(-1, v.shape[-1])[:, 0].expand(s) if v.dim() else v.expand(s)

    cl = col(ind["cl"])
    f = col(ind["f"]) if "f" in ind else torch.ones_like(cl)
    ev = d.events
    ss_any = bool((ev.dose_ss[ev.dose_mask] != 0).any())
    if ss_any:  # a steady-state history has no finite total dose
        return np.full(s, np.nan)
    total = torch.where(ev.dose_mask, ev.dose_amt, torch.zeros_like(ev.dose_amt)).sum(-1)
    return (f * total / cl).cpu().numpy()


def _time_above(c: np.ndarray, t: np.ndarray, thr: float) -> np.ndarray:
    """Time with c > thr on a piecewise-linear interpolation of c(t), per row."""
    a, b = c[:, :-1], c[:, 1:]
    dt = np.diff(t)[None, :]
    both = (a > thr) & (b > thr)
    cross_up = (a <= thr) & (b > thr)
    cross_dn = (a > thr) & (b <= thr)
    with np.errstate(divide="ignore", invalid="ignore"):
        frac_up = np.where(cross_up, (b - thr) / (b - a), 0.0)
        frac_dn = np.where(cross_dn, (a - thr) / (a - b), 0.0)
    return (dt * (both + frac_up + frac_dn)).sum(axis=1)


def _metric_window(exposures: pd.DataFrame, m: str, rows: pd.Series) -> str | None:
    """The window (text) a metric was computed over, for the rows of one regimen; None when not recorded."""
    if m == "AUC_INF":
        return "[first dose, inf) h"
    col = "AUC24_WINDOW" if m in ("AUC24", "AUC") else "WINDOW"
    if col not in exposures:
        return None
    vals = list(dict.fromkeys(exposures.loc[rows, col]))
    return "; ".join(str(v) for v in vals) if vals else None


def pta(exposures: pd.DataFrame, metric: str, threshold: float | None = None, *,
        mic: float | Sequence[float] | None = None, window: tuple[float, float] | None = None,
        order: Sequence[str] | None = None) -> pd.DataFrame:
    """Probability of target attainment per regimen (and MIC).

    * ``pta(ex, "AUC24", 400, mic=[0.25, 0.5, 1, 2])`` — P(AUC24/MIC ≥ 400) for each MIC;
    * ``pta(ex, "AUCTAU", 200)`` — P(AUC over the dosing interval τ ≥ 200);
    * ``pta(ex, "FT_ABOVE_PCT", 50)`` — P(%fT>MIC ≥ 50) (``threshold=`` when the table was built);
    * ``pta(ex, "CTROUGH", window=(10, 20))`` — P(10 ≤ trough ≤ 20).
    ``"AUC"`` means AUC24 (and is reported as such). Returns REGIMEN, [MIC,] TARGET, PTA, N and WINDOW (the
    time window the metric was computed over, per regimen; when the table records it)."""
    m = metric.upper()
    m = _ALIASES.get(m, m) if _ALIASES.get(m, m) in exposures else m
    if m not in exposures:
        raise ModelSpecError(f"no exposure metric {metric!r}; available: "
                             f"{[c for c in exposures.columns if c in METRICS]}")
    if (threshold is None) == (window is None):
        raise ModelSpecError("give either threshold= (metric ≥ threshold) or window=(low, high)")
    labels = list(order) if order is not None else list(dict.fromkeys(exposures["REGIMEN"]))
    rows = []
    mics = [None] if mic is None else list(np.atleast_1d(mic).astype(float))
    for lab in labels:
        sel = exposures["REGIMEN"] == lab
        v = exposures.loc[sel, m].to_numpy(float)
        win = _metric_window(exposures, m, sel)
        for mc in mics:
            x = v if mc is None else v / mc
            if window is not None:
                lo, hi = window
                ok = (x >= lo) & (x <= hi)
                target = f"{lo:g} <= {m} <= {hi:g}"
            else:
                ok = x >= threshold
                target = f"{m}{'' if mc is None else '/MIC'} >= {threshold:g}"
            row = {"REGIMEN": lab, "TARGET": target, "PTA": float(np.mean(ok)) if len(x) else np.nan, "N": len(x)}
            if mc is not None:
                row["MIC"] = mc
            if win is not None:
                row["WINDOW"] = win
            rows.append(row)
    out = pd.DataFrame(rows)
    cols = ["REGIMEN"] + (["MIC"] if mic is not None else []) + ["TARGET", "PTA", "N"]
    cols += ["WINDOW"] if "WINDOW" in out else []
    return out[cols]
