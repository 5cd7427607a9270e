"""Visual predictive checks: VPC and prediction-corrected VPC (Bergstrand, Hooker, Wallin & Karlsson 2011).

R replicates of the data are simulated under the fitted model (:mod:`nlmefit.diagnostics.replicates`). The
observations are grouped into bins of the independent variable (TIME, or time after the last dose, TAD); in each
bin b and for each percentile π:

* the observed percentile Q_π(y_b);
* over replicates, the median and the ``ci`` interval (e.g. the 5th and 95th percentiles for ci = 0.90) of the
  simulated percentiles Q_π(y_b^(r)).

``pred_corrected=True`` (pcVPC): observed and simulated values are multiplied by PRED_bin / PRED_ij, PRED_bin the
median population prediction (η = 0) of the bin; with a lower bound lb (``pc_lower_bound``) the correction is
lb + (y − lb)·(PRED_bin − lb)/(PRED_ij − lb), and for log-scale DV (``pc_log=True``) it is additive,
y + PRED_bin − PRED_ij (Bergstrand et al. 2011, eqs. 1–2).

Binning (``bins="auto"``): with at most ``max_bins`` (10) distinct values of the independent variable, one bin per
value; otherwise k = min(10, ⌊n/10⌋) bins of about equal counts whose interior edges, started at the i/k quantiles,
are moved to the midpoint of the widest gap between consecutive sorted values within half a bin's count either
side, so that clusters of nominal times are not split (edges that meet are merged, and a bin left with fewer than
a quarter of n/k values joins its smaller neighbour). ``bins=k`` uses the same rule with k bins; a
sequence gives the edges (values outside them are left out). Bins are [e_b, e_{b+1}), the last one closed.

Censoring (observations with CENS = 1, or any ``lloq`` given): simulated values are censored at the same limit
(see :func:`~nlmefit.diagnostics.replicates.observation_lloq`); censored values stay in the percentile
computations as "below the limit", and a percentile (observed or simulated) that falls below the bin's LLOQ is
not drawn (NaN in the tables). The fraction below the LLOQ per bin, observed and simulated (median and ``ci``
interval), is reported in ``VpcResult.blq``. Limits above (CENS = −1) are treated as observed values.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from nlmefit.diagnostics.replicates import _simulate, fit_parts, observation_lloq

__all__ = ["VpcResult", "vpc", "vpc_bins", "plot_vpc"]

_BELOW = -1e250  # stands for "below the limit" inside percentile computations


@dataclass
class VpcResult:
    """Tidy VPC tables.

    ``percentiles``: strata, bin, lower, upper, x (median independent variable of the bin), n, pi, obs,
    sim_lo, sim_median, sim_hi (NaN where below the LLOQ). ``blq`` (None without censoring): strata, bin, lower,
    upper, x, n, obs, sim_lo, sim_median, sim_hi (fractions below the LLOQ). ``observed``: one row per
    observation (ROW, ID, TIME, IDV, DV, PRED, Y — the plotted value, pred-corrected for a pcVPC —, BLQ, BIN,
    STRATA), ROW order as in ``FitResult.predictions``."""

    percentiles: pd.DataFrame
    blq: pd.DataFrame | None
    observed: pd.DataFrame
    edges: dict
    pi: tuple
    ci: float
    n_rep: int
    pred_corrected: bool
    idv: str
    lloq: dict = field(default_factory=dict)  # strata -> LLOQ per bin (NaN where none)
    _raw: pd.DataFrame | None = field(default=None, repr=False)  # percentiles with -inf for "below LLOQ"

    def coverage(self) -> float:
        """Fraction of (stratum, bin, percentile) pairs whose observed percentile lies inside the simulated
        ``ci`` interval of that percentile (a percentile below the LLOQ counts as inside when the interval's lower
        end is below it too)."""
        r = self._raw if self._raw is not None else self.percentiles
        inside = (r["obs"] >= r["sim_lo"]) & (r["obs"] <= r["sim_hi"])
        return float(inside.mean())

    def plot(self, **kwargs):
        """:func:`plot_vpc` of this result."""
        return plot_vpc(self, **kwargs)

    def __repr__(self) -> str:
        kind = "pcVPC" if self.pred_corrected else "VPC"
        nb = self.percentiles.groupby("strata")["bin"].nunique().sum()
        return (f"VpcResult({kind}, idv={self.idv}, bins={nb}, n_rep={self.n_rep}, pi={self.pi}, ci={self.ci}, "
                f"coverage={self.coverage():.2f})")


# ---------------------------------------------------------------------------------------------------- binning
def _snap(xs: np.ndarray, k: int) -> np.ndarray:
    """Interior edges of k bins of ~equal counts, each moved to the widest gap near its quantile; bins left with
    fewer than a quarter of the target count are merged into their smaller neighbour."""
    n = len(xs)
    edges = []
    half = max(1, int(n / (2 * k)))
    for i in range(1, k):
        r = int(round(i * n / k))
        lo, hi = max(1, r - half), min(n - 1, r + half)
        gaps = xs[lo:hi + 1] - xs[lo - 1:hi]  # gap between xs[m-1] and xs[m], m in [lo, hi]
        if gaps.max() <= 0:  # one run of ties: no edge here
            continue
        m = lo + int(np.argmax(gaps))
        edges.append(0.5 * (xs[m - 1] + xs[m]))
    edges = list(np.unique(np.asarray(edges, float)))
    while edges:
        counts = np.diff(np.searchsorted(xs, [-np.inf, *edges, np.inf], side="left"))
        b = int(np.argmin(counts))
        if counts[b] >= n / (4 * k):
            break
        if b == 0:
            edges.pop(0)
        elif b == len(counts) - 1:
            edges.pop()
        else:  # merge with the smaller neighbour
            edges.pop(b - 1 if counts[b - 1] <= counts[b + 1] else b)
    return np.asarray(edges, float)


def vpc_bins(x: np.ndarray, bins: str | int | Sequence[float] = "auto", max_bins: int = 10) -> np.ndarray:
    """Bin edges (outer edges included) for the values ``x`` of the independent variable (module docstring)."""
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        raise ValueError("no observations to bin")
    xs = np.sort(x)
    lo, hi = float(xs[0]), float(xs[-1])
    if isinstance(bins, str):
        if bins != "auto":
            raise ValueError(f"bins must be 'auto', an int or a sequence of edges, got {bins!r}")
        u = np.unique(xs)
        if len(u) <= max_bins:
            inner = 0.5 * (u[1:] + u[:-1])
        else:
            inner = _snap(xs, int(min(max_bins, max(1, len(xs) // 10))))
    elif np.ndim(bins) == 0:
        k = int(bins)
        if k < 1:
            raise ValueError(f"the number of bins must be at least 1, got {k}")
        inner = _snap(xs, k) if k > 1 else np.zeros(0)
    else:
        e = np.asarray(bins, float)
        if e.ndim != 1 or len(e) < 2 or np.any(np.diff(e) <= 0):
            raise ValueError("bin edges must be an increasing sequence of at least two values")
        return e
    return np.concatenate([[lo], inner, [hi]])


def _assign(x: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin index per value ([e_b, e_{b+1}), last closed); −1 outside the edges."""
    b = np.searchsorted(edges, x, side="right") - 1
    b = np.where(x == edges[-1], len(edges) - 2, b)
    return np.where((x < edges[0]) | (x > edges[-1]) | ~np.isfinite(x), -1, b)


# ---------------------------------------------------------------------------------------------------- the VPC
def _tad(panel, mask: np.ndarray) -> np.ndarray:
    """Time after the last dose at or before each observation (time itself before any dose), [N, J]."""
    ot, dt = panel.obs_time, panel.dose_time
    before = panel.dose_mask[:, None, :] & (dt[:, None, :] <= ot[:, :, None])
    last = np.where(before, dt[:, None, :], -np.inf).max(-1)
    return np.where(np.isfinite(last), ot - last, ot)


def _strata_labels(panel, mask: np.ndarray, stratify) -> np.ndarray:
    if stratify is None:
        return np.full(mask.shape, "all", dtype=object)
    names = [stratify] if isinstance(stratify, str) else list(stratify)
    parts = []
    for nm in names:
        if nm not in panel.covariate_names:
            raise ValueError(f"stratify: {nm!r} is not a covariate of the data ({list(panel.covariate_names)})")
        vals = panel.obs_covariates[:, :, list(panel.covariate_names).index(nm)]
        levels = (panel.covariate_levels or {}).get(nm) or {}
        inv = {v: k for k, v in levels.items()}
        lab = np.vectorize(lambda v: f"{nm}={inv.get(int(v), v) if inv else _fmt(v)}", otypes=[object])(vals)
        parts.append(lab)
    out = parts[0]
    for p in parts[1:]:
        out = out + ", " + p
    return out


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def _pc(y: np.ndarray, pred: np.ndarray, pred_bin: np.ndarray, lb: float, log: bool) -> np.ndarray:
    if log:
        return y + (pred_bin - pred)
    with np.errstate(divide="ignore", invalid="ignore"):
        return lb + (y - lb) * (pred_bin - lb) / (pred - lb)


def vpc(
    fit: Any,
    n_rep: int = 500,
    bins: str | int | Sequence[float] = "auto",
    pred_corrected: bool = False,
    pi: Sequence[float] = (0.05, 0.5, 0.95),
    ci: float = 0.90,
    seed: int | None = 0,
    stratify: str | Sequence[str] | None = None,
    lloq: float | None = None,
    idv: str = "TIME",
    max_bins: int = 10,
    pc_lower_bound: float = 0.0,
    pc_log: bool = False,
    data=None,
) -> VpcResult:
    """(pc)VPC of a fit from ``n_rep`` simulated replicates (see the module docstring for the definitions).

    ``idv``: ``"TIME"`` or ``"TAD"`` (time after the last dose). ``stratify``: covariate name(s); bins are built
    per stratum. ``lloq``: censor observed and simulated values below this value (default: the data's own
    censoring). ``data``: another data set evaluated under the fit (external VPC)."""
    pi = tuple(float(q) for q in pi)
    if not all(0 < q < 1 for q in pi):
        raise ValueError(f"pi must lie in (0, 1), got {pi}")
    if not 0 < ci < 1:
        raise ValueError(f"ci must lie in (0, 1), got {ci}")
    if idv.upper() not in ("TIME", "TAD"):
        raise ValueError(f"idv must be 'TIME' or 'TAD', got {idv!r}")
    idv = idv.upper()
    model, p, mdata = fit_parts(fit, data)
    panel = mdata.panel
    mask = mdata.mask.cpu().numpy()
    ysim = _simulate(model, p, mdata, int(n_rep), seed)  # [R, N, J]
    with torch.no_grad():
        f0, _ = model.predict(p, torch.zeros(mdata.n_subjects, mdata.q, dtype=mdata.y.dtype,
                                             device=mdata.y.device), mdata)
    pred = model.error.untransform(f0).cpu().numpy()
    lim = observation_lloq(mdata, lloq)  # [N, J], NaN where none
    cens = mdata.cens.cpu().numpy()
    dv = np.asarray(panel.dv, float)
    with np.errstate(invalid="ignore"):
        blq_obs = mask & ((cens == 1) | (np.isfinite(lim) & (dv < lim)))
        blq_sim = np.isfinite(lim)[None] & (ysim < lim[None])
    censored = bool(np.isfinite(lim[mask]).any())
    xv = panel.obs_time if idv == "TIME" else _tad(panel, mask)
    strata = _strata_labels(panel, mask, stratify)
    m_idx = np.nonzero(mask)  # observation positions, row-major (subject, then time order)
    x_o, s_o, y_o, pred_o, lim_o, b_o = (a[m_idx] for a in (xv, strata, dv, pred, lim, blq_obs))
    ysim_o, bsim_o = ysim[:, m_idx[0], m_idx[1]], blq_sim[:, m_idx[0], m_idx[1]]  # [R, n]
    bin_o = np.full(len(x_o), -1)
    y_plot = y_o.astype(float).copy()
    prow, brow, edges_all, lloq_all = [], [], {}, {}
    qlo, qhi = (1 - ci) / 2, (1 + ci) / 2
    for st in sorted(set(s_o.tolist()), key=str):  # loops over strata and bins only
        sel = np.flatnonzero(s_o == st)
        edges = vpc_bins(x_o[sel], bins, max_bins)
        bsel = _assign(x_o[sel], edges)
        bin_o[sel] = bsel
        edges_all[st] = edges
        lloqs = []
        for b in range(len(edges) - 1):
            ix = sel[bsel == b]
            if len(ix) == 0:
                lloqs.append(np.nan)
                continue
            yo, ys, lb_ = y_o[ix].astype(float), ysim_o[:, ix].copy(), lim_o[ix]
            if pred_corrected:
                pb = float(np.median(pred_o[ix]))
                yo, ys = _pc(yo, pred_o[ix], pb, pc_lower_bound, pc_log), _pc(ys, pred_o[ix], pb, pc_lower_bound,
                                                                             pc_log)
                lb_ = _pc(lb_, pred_o[ix], pb, pc_lower_bound, pc_log)
            y_plot[ix] = yo
            bin_lloq = float(np.nanmax(lb_)) if np.isfinite(lb_).any() else np.nan
            lloqs.append(bin_lloq)
            yo = np.where(b_o[ix], _BELOW, yo)
            ys = np.where(bsim_o[:, ix], _BELOW, ys)
            q_obs = np.quantile(yo, pi)  # [P]
            q_sim = np.quantile(ys, pi, axis=1)  # [P, R]
            band = np.quantile(q_sim, [qlo, 0.5, qhi], axis=1)  # [3, P]
            x_mid = float(np.median(x_o[ix]))
            for k, q in enumerate(pi):
                prow.append((st, b, edges[b], edges[b + 1], x_mid, len(ix), q, q_obs[k], *band[:, k], bin_lloq))
            if censored:
                fr = bsim_o[:, ix].mean(1)
                brow.append((st, b, edges[b], edges[b + 1], x_mid, len(ix), float(b_o[ix].mean()),
                             *np.quantile(fr, [qlo, 0.5, qhi])))
        lloq_all[st] = np.asarray(lloqs)
    cols = ["strata", "bin", "lower", "upper", "x", "n", "pi", "obs", "sim_lo", "sim_median", "sim_hi"]
    raw = pd.DataFrame(prow, columns=cols + ["lloq"])
    below = {c: raw[c].to_numpy(float) < np.where(np.isfinite(raw["lloq"]), raw["lloq"], -np.inf)
             for c in cols[7:]}
    table = raw[cols].copy()
    for c, bl in below.items():
        table.loc[bl, c] = np.nan
        raw.loc[bl, c] = -np.inf
    blq = pd.DataFrame(brow, columns=cols[:6] + cols[7:]) if censored else None
    ids = np.broadcast_to(np.asarray(panel.ids)[:, None], mask.shape)[m_idx]
    observed = pd.DataFrame({"ROW": panel.obs_row[m_idx], "ID": ids, "TIME": panel.obs_time[m_idx], "IDV": x_o,
                             "DV": y_o, "PRED": pred_o, "Y": y_plot, "BLQ": b_o, "BIN": bin_o, "STRATA": s_o})
    observed = observed.sort_values("ROW", kind="stable").reset_index(drop=True)
    return VpcResult(table, blq, observed, edges_all, pi, float(ci), int(n_rep), bool(pred_corrected), idv,
                     lloq_all, raw)


# ---------------------------------------------------------------------------------------------------- plot
_BAND_OUTER = "#3a7bd5"
_BAND_MED = "#e8474f"
_OBS_LINE = "#b2182b"


def plot_vpc(result: VpcResult, ax=None, log_y: bool = False, show_points: bool = True, figsize=None):
    """The VPC in the style of Bergstrand et al. (2011): observations as points, observed median (solid) and outer
    percentiles (dashed) as lines, the ``ci`` intervals of the simulated percentiles as shaded bands (outer
    percentiles blue, median red), the LLOQ dotted; with censoring, a panel of the fraction below the LLOQ
    (observed line, simulated interval shaded) underneath. One column per stratum; with ``ax`` (one axis per
    stratum) only the main panels are drawn there. Returns the Figure (never shown)."""
    # matplotlib is imported only when plotting
    import matplotlib.pyplot as plt

    strata = list(result.edges)
    blq = result.blq
    if ax is not None:
        axes_main = [ax] if not isinstance(ax, (list, tuple, np.ndarray)) else list(np.ravel(ax))
        if len(axes_main) < len(strata):
            raise ValueError(f"{len(strata)} strata need {len(strata)} axes")
        fig = axes_main[0].figure
        axes_blq = [None] * len(strata)
    else:
        nrow = 2 if blq is not None else 1
        fs = figsize or (5.2 * len(strata), 5.6 if nrow == 2 else 4.4)
        fig, axs = plt.subplots(nrow, len(strata), figsize=fs, squeeze=False, sharex="col",
                                gridspec_kw={"height_ratios": [3, 1]} if nrow == 2 else None)
        axes_main = list(axs[0])
        axes_blq = list(axs[1]) if nrow == 2 else [None] * len(strata)
    obs = result.observed
    kind = "pcVPC" if result.pred_corrected else "VPC"
    for a, ab, st in zip(axes_main, axes_blq, strata):
        t = result.percentiles[result.percentiles["strata"] == st]
        o = obs[(obs["STRATA"] == st) & (obs["BIN"] >= 0)]
        if show_points:
            a.plot(o.loc[~o["BLQ"], "IDV"], o.loc[~o["BLQ"], "Y"], "o", ms=2.8, color="#4d6f8f", alpha=0.45,
                   mec="none", zorder=1)
        raw = result._raw if result._raw is not None else result.percentiles
        raw = raw[raw["strata"] == st]
        for q in result.pi:
            tq = t[t["pi"] == q].sort_values("x")
            rq = raw[raw["pi"] == q].sort_values("x")
            central = abs(q - 0.5) < 1e-9
            col = _BAND_MED if central else _BAND_OUTER
            # an interval reaching below the LLOQ is drawn from the LLOQ up (not at all when wholly below)
            part = np.isneginf(rq["sim_lo"].to_numpy()) & np.isfinite(rq["sim_hi"].to_numpy())
            lo = np.where(part, rq["lloq"].to_numpy() if "lloq" in rq else np.nan, tq["sim_lo"].to_numpy())
            a.fill_between(tq["x"], lo, tq["sim_hi"], color=col, alpha=0.25 if central else 0.22, lw=0, zorder=0)
            a.plot(tq["x"], tq["obs"], color=_OBS_LINE, lw=1.6 if central else 1.2, ls="-" if central else "--",
                   zorder=3)
        ll = result.lloq.get(st)
        if ll is not None and np.isfinite(ll).any() and not result.pred_corrected:
            a.axhline(float(np.nanmax(ll)), color="k", ls=":", lw=1, label="LLOQ")
        edges = result.edges[st]
        a.plot(edges, np.zeros_like(edges), "|", transform=a.get_xaxis_transform(), color="k", ms=6, mew=0.8,
               clip_on=False)
        if log_y:
            a.set_yscale("log")
        a.set_ylabel("prediction-corrected DV" if result.pred_corrected else "DV")
        a.set_title(kind if st == "all" else f"{kind}: {st}", fontsize=10)
        if ab is None:
            a.set_xlabel(result.idv)
        else:
            tb = blq[blq["strata"] == st].sort_values("x")
            ab.fill_between(tb["x"], tb["sim_lo"], tb["sim_hi"], color=_BAND_OUTER, alpha=0.25, lw=0)
            ab.plot(tb["x"], tb["obs"], color=_OBS_LINE, lw=1.4, marker="o", ms=3)
            ab.set_ylim(-0.02, max(0.1, float(np.nanmax(tb[["obs", "sim_hi"]].to_numpy())) * 1.15))
            ab.set_ylabel("fraction < LLOQ")
            ab.set_xlabel(result.idv)
    # matplotlib is imported only when plotting
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    pct = lambda q: f"{100 * q:g}th"  # noqa: E731
    outer = [q for q in result.pi if abs(q - 0.5) > 1e-9]
    handles = [Line2D([], [], color=_OBS_LINE, lw=1.6, label="observed median"),
               Patch(color=_BAND_MED, alpha=0.35, label=f"{100 * result.ci:g}% CI simulated median")]
    if outer:
        handles[1:1] = [Line2D([], [], color=_OBS_LINE, ls="--", lw=1.2,
                               label="observed " + "/".join(pct(q) for q in outer))]
        handles.append(Patch(color=_BAND_OUTER, alpha=0.3, label=f"{100 * result.ci:g}% CI simulated "
                             + "/".join(pct(q) for q in outer)))
    axes_main[0].legend(handles=handles, frameon=False, fontsize=7.5, loc="best")
    if ax is None:
        fig.tight_layout()
    return fig
