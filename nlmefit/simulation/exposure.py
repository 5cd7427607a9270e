"""Exposure metrics over an interval and probability of target attainment (PTA), as tidy DataFrames.

Per simulated subject, over [t0, t1] (the last dosing interval by default), from residual-free predictions:

=================  ====================================================================================
``AUC``            ∫ C dt over [t0, t1]. ``auc="quadrature"``: Gauss–Legendre (16 nodes) on 8 geometrically
                   growing sub-pieces of every smooth piece between dose events (doses, infusion ends): ~1e−9
                   relative for compartment models;
                   ``"trapezoid"``: the trapezoid rule on a 101-point grid (fast, approximate).
``AUC_INF``        F·ΣDose/CL — analytic for linear models with a ``cl`` parameter (total exposure of the
                   whole regimen, to infinity); NaN otherwise.
``CMAX``/``TMAX``  maximum over a 101-point grid of the interval (plus the quadrature nodes) and its time
                   after the start of the interval (time after dose for the last dosing interval).
``CMIN``           minimum over the same points; ``CTROUGH`` is C(t1), the concentration at the end.
``CAVG``           AUC/(t1 − t0).
``T_ABOVE``        time with fu·C above ``threshold`` (linear interpolation between grid points) and
``FT_ABOVE_PCT``   as % of the interval (%fT>MIC with ``threshold`` = MIC and ``fu`` the unbound fraction).
=================  ====================================================================================

:func:`pta` turns the table into the probability of attaining a target per regimen: ``metric ≥ threshold``,
``metric/MIC ≥ threshold`` for a range of MICs (AUC/MIC, Cmax/MIC), or ``metric`` within a window (troughs).
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

__all__ = ["exposure_table", "pta", "METRICS"]

METRICS = ("AUC", "AUC_INF", "CMAX", "TMAX", "CMIN", "CTROUGH", "CAVG", "T_ABOVE", "FT_ABOVE_PCT")
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


def exposure_table(pop: SimulatedPopulation, interval: tuple[float, float], *, threshold: float | None = None,
                   fu: float = 1.0, auc: str = "quadrature", chunk: int = 10000) -> pd.DataFrame:
    """Exposure metrics over ``interval`` for the S subjects of ``pop`` under its regimen (module docstring)."""
    if auc not in ("quadrature", "trapezoid"):
        raise ModelSpecError(f"auc must be 'quadrature' or 'trapezoid', got {auc!r}")
    if not 0 < fu <= 1:
        raise ModelSpecError(f"fu (unbound fraction) must be in (0, 1], got {fu}")
    t0, t1 = interval
    fine, quad = _eval_times(pop.data1, t0, t1, auc)
    times = fine if quad is None else np.concatenate([fine, quad[0]])
    n_f = len(fine)
    s = pop.n
    cols = {k: np.empty(s) for k in ("AUC", "CMAX", "TMAX", "CMIN", "CTROUGH")}
    if threshold is not None:
        cols["T_ABOVE"] = np.empty(s)
    for a in range(0, s, chunk):  # metrics chunk by chunk: the [S, T] concentrations are never held at once
        sl = slice(a, min(s, a + chunk))
        conc = pop.rows(sl).concentrations(times, chunk)
        c_fine = conc[:, :n_f]
        cols["AUC"][sl] = np.trapezoid(c_fine, fine, axis=1) if quad is None else conc[:, n_f:] @ quad[1]
        k = np.argmax(conc, axis=1)
        cols["CMAX"][sl] = conc[np.arange(conc.shape[0]), k]
        cols["TMAX"][sl] = times[k] - t0
        cols["CMIN"][sl] = conc.min(axis=1)
        cols["CTROUGH"][sl] = c_fine[:, -1]
        if threshold is not None:
            cols["T_ABOVE"][sl] = _time_above(fu * c_fine, fine, float(threshold))
    out = {"AUC": cols["AUC"], "AUC_INF": _auc_inf(pop), "CMAX": cols["CMAX"],
           "TMAX": cols["TMAX"], "CMIN": cols["CMIN"], "CTROUGH": cols["CTROUGH"], "CAVG": cols["AUC"] / (t1 - t0)}
    if threshold is not None:
        out["T_ABOVE"] = cols["T_ABOVE"]
        out["FT_ABOVE_PCT"] = 100.0 * cols["T_ABOVE"] / (t1 - t0)
    df = pd.DataFrame(out)
    df["AUC_METHOD"] = "trapezoid" if quad is None else "quadrature"
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


def pta(exposures: pd.DataFrame, metric: str, threshold: float | None = None, *,
        mic: float | Sequence[float] | None = None, window: tuple[float, float] | None = None,
        order: Sequence[str] | None = None) -> pd.DataFrame:
    """Probability of target attainment per regimen (and MIC).

    * ``pta(ex, "AUC", 400, mic=[0.25, 0.5, 1, 2])`` — P(AUC/MIC ≥ 400) for each MIC;
    * ``pta(ex, "FT_ABOVE_PCT", 50)`` — P(%fT>MIC ≥ 50) (``threshold=`` when the table was built);
    * ``pta(ex, "CTROUGH", window=(10, 20))`` — P(10 ≤ trough ≤ 20).
    Returns REGIMEN, [MIC,] TARGET, PTA, N."""
    m = metric.upper()
    if m not in exposures:
        raise ModelSpecError(f"no exposure metric {metric!r}; available: "
                             f"{[c for c in exposures.columns if c in METRICS]}")
    if (threshold is None) == (window is None):
        raise ModelSpecError("give either threshold= (metric ≥ threshold) or window=(low, high)")
    labels = list(order) if order is not None else list(dict.fromkeys(exposures["REGIMEN"]))
    rows = []
    mics = [None] if mic is None else list(np.atleast_1d(mic).astype(float))
    for lab in labels:
        v = exposures.loc[exposures["REGIMEN"] == lab, m].to_numpy(float)
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
            rows.append(row)
    out = pd.DataFrame(rows)
    cols = ["REGIMEN"] + (["MIC"] if mic is not None else []) + ["TARGET", "PTA", "N"]
    return out[cols]
