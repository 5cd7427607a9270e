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
interval), is reported in ``VpcResult.blq``. Limits above (CENS = −1) are treated as observed values. The plot
draws the LLOQ as a dotted line (per-bin steps in a pcVPC, where it is prediction-corrected like the data) and a
band reaching below it from the LLOQ up.

Floor at zero (``clip="auto"``): when every observation has DV ≥ 0 (concentrations) and ``pc_log`` is off, simulated
values below 0 (an additive or combined error model makes them) are set to 0 before anything is computed from them,
so tables, bands and simulated medians never go below zero; observed values are never changed. ``clip`` may also
be a number or None (no floor); ``VpcResult.floor`` records what was applied. The LLOQ, being positive, censors
above the floor.

Stratification (``stratify``): a covariate, ``"DVID"``, ``"DOSE"`` (the subject's first dose amount unless the data
has a DOSE covariate) or a list of these; one stratum per value for at most 6 distinct values (and for categorical
covariates), else ``stratify_groups`` quantile groups; each stratum gets its own bins and its own panel.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from nlmefit._html import object_html
from nlmefit.diagnostics.gof import log_axis
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
    floor: float | None = None  # simulated values were clipped at this value (``clip``); None: not clipped
    stratify: Any = None  # the ``stratify`` argument

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

    def _repr_html_(self) -> str:
        return object_html("VPC", [repr(self)], [("percentiles", self.percentiles)])

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


_MAX_LEVELS = 6  # a stratifying variable with more distinct values is split into quantile groups


def _stratum_values(panel, mask: np.ndarray, name: str) -> tuple[np.ndarray, dict]:
    """Values ``[N, J]`` of one stratifying variable at the observations and a code -> label map of its levels
    (empty for numeric values): a covariate column, else DVID (the observation's DVID) or DOSE (the amount of the
    subject's first dose)."""
    covs = list(panel.covariate_names)
    if name in covs:
        levels = (panel.covariate_levels or {}).get(name) or {}
        return panel.obs_covariates[:, :, covs.index(name)].astype(float), {v: k for k, v in levels.items()}
    if name.upper() == "DVID":
        levels = panel.dvid_levels or {}
        return panel.obs_dvid.astype(float), {v: k for k, v in levels.items()}
    if name.upper() == "DOSE":
        dm = panel.dose_mask
        first = np.where(dm.any(1), panel.dose_amt[np.arange(len(dm)), np.argmax(dm, 1)], np.nan)
        return np.broadcast_to(first.astype(float)[:, None], mask.shape).copy(), {}
    raise ValueError(f"stratify: {name!r} is not a covariate of the data ({covs}), 'DVID' or 'DOSE'")


def _strata_labels(panel, mask: np.ndarray, stratify, groups: int = 2) -> tuple[np.ndarray, list]:
    """Stratum label per observation ``[N, J]`` and the strata in display order.

    Each variable with at most ``_MAX_LEVELS`` distinct values at the observations gives one stratum per value
    ("SEX=male", "DOSE=320"); one with more is split at the quantiles of its observation values into ``groups``
    groups of about equal counts ("WT<70.5", "70.5≤WT<82", "WT≥82"). Several variables: their crossing."""
    if stratify is None:
        return np.full(mask.shape, "all", dtype=object), ["all"]
    names = [stratify] if isinstance(stratify, str) else list(stratify)
    if not names:
        raise ValueError("stratify: give a column name or a list of names")
    labels, keys = [], []
    for nm in names:
        vals, inv = _stratum_values(panel, mask, nm)
        on = vals[mask]
        u = np.unique(on[np.isfinite(on)])
        if len(u) <= _MAX_LEVELS or inv:
            code = vals
            lab = np.vectorize(lambda v: f"{nm}={inv.get(int(v), _fmt(v)) if inv else _fmt(v)}"
                               if np.isfinite(v) else f"{nm}=none", otypes=[object])(vals)
        else:
            g = max(2, int(groups))
            cuts = np.unique(np.quantile(on[np.isfinite(on)], np.linspace(0, 1, g + 1)[1:-1]))
            cuts = cuts[cuts > u[0]]  # each group keeps at least one value
            code = np.where(np.isfinite(vals), np.searchsorted(cuts, vals, side="right"), np.nan)
            inner = [f"{_fmt(lo)}≤{nm}<{_fmt(hi)}" for lo, hi in zip(cuts[:-1], cuts[1:])]
            names_g = [f"{nm}<{_fmt(cuts[0])}", *inner, f"{nm}≥{_fmt(cuts[-1])}"] if len(cuts) else [f"{nm}: all"]
            lab = np.vectorize(lambda c: names_g[int(c)] if np.isfinite(c) else f"{nm}=none", otypes=[object])(code)
        labels.append(lab)
        keys.append(np.where(np.isfinite(code), code, np.inf))
    out = labels[0]
    for p in labels[1:]:
        out = out + ", " + p
    labs_o = out[mask].astype(str)
    uniq, first = np.unique(labs_o, return_index=True)
    key = {st: tuple(k[mask][i] for k in keys) for st, i in zip(uniq.tolist(), first)}
    return out, sorted(key, key=lambda st: (key[st], st))


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:.4g}"


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
    clip: str | float | None = "auto",
    stratify_groups: int = 2,
    progress: bool | None = None,
) -> VpcResult:
    """(pc)VPC of a fit from ``n_rep`` simulated replicates (see the module docstring for the definitions).

    ``idv``: ``"TIME"`` or ``"TAD"`` (time after the last dose). ``stratify``: covariate name(s), ``"DVID"`` or
    ``"DOSE"`` (the subject's first dose amount, unless the data has a DOSE covariate); one stratum per level, a
    variable with more than 6 distinct values is split into ``stratify_groups`` quantile groups; bins are built per
    stratum. ``lloq``: censor observed and simulated values below this value (default: the data's own censoring).
    ``clip``: floor of the simulated values, ``"auto"`` (0 when every observed DV is ≥ 0 and ``pc_log`` is off,
    else none), a number, or None. ``pred_corrected=True``: the pcVPC. ``data``: another data set evaluated under
    the fit (external VPC). ``progress``: a bar over the simulated replicates (None: automatic,
    :mod:`nlmefit.progress`)."""
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
    ysim = _simulate(model, p, mdata, int(n_rep), seed, progress=progress,
                     desc="pcVPC replicates" if pred_corrected else "VPC replicates")  # [R, N, J]
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
    strata, order = _strata_labels(panel, mask, stratify, stratify_groups)
    if isinstance(clip, str):
        if clip != "auto":
            raise ValueError(f"clip must be 'auto', a number or None, got {clip!r}")
        dv_m = dv[mask]
        floor = 0.0 if (not pc_log and len(dv_m) and np.nanmin(dv_m) >= 0) else None
    else:
        floor = None if clip is None else float(clip)
    if floor is not None:
        ysim = np.maximum(ysim, floor)  # NaN (off the mask) stays NaN
        with np.errstate(invalid="ignore"):
            blq_sim = np.isfinite(lim)[None] & (ysim < lim[None])
    m_idx = np.nonzero(mask)  # observation positions, row-major (subject, then time order)
    x_o, s_o, y_o, pred_o, lim_o, b_o = (a[m_idx] for a in (xv, strata, dv, pred, lim, blq_obs))
    ysim_o, bsim_o = ysim[:, m_idx[0], m_idx[1]], blq_sim[:, m_idx[0], m_idx[1]]  # [R, n]
    bin_o = np.full(len(x_o), -1)
    y_plot = y_o.astype(float).copy()
    prow, brow, edges_all, lloq_all = [], [], {}, {}
    qlo, qhi = (1 - ci) / 2, (1 + ci) / 2
    for st in order:  # loops over strata and bins only
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
                     lloq_all, raw, floor=floor, stratify=stratify)


# ---------------------------------------------------------------------------------------------------- plot
_BAND_OUTER = "#3a7bd5"
_BAND_MED = "#e8474f"
_OBS_LINE = "#b2182b"


def _display_floor(result: VpcResult, strata) -> float:
    """Smallest positive value shown on a log axis: half the smallest positive observed value, percentile or LLOQ."""
    vals = [result.observed.loc[result.observed["STRATA"].isin(strata), "Y"].to_numpy(float),
            result.percentiles[["obs", "sim_lo", "sim_median", "sim_hi"]].to_numpy(float).ravel()]
    vals += [np.asarray(v, float) for v in result.lloq.values()]
    v = np.concatenate(vals)
    v = v[np.isfinite(v) & (v > 0)]
    return float(v.min()) / 2 if len(v) else 1e-3


def _lloq_line(a, result: VpcResult, st) -> None:
    """The LLOQ: a horizontal line when one value applies to the whole stratum, else a step per bin (pcVPC)."""
    ll = np.asarray(result.lloq.get(st, []), float)
    if not np.isfinite(ll).any():
        return
    fin = ll[np.isfinite(ll)]
    label = "LLOQ (prediction-corrected)" if result.pred_corrected else "LLOQ"
    if np.allclose(fin, fin[0], rtol=1e-9, atol=0):
        a.axhline(float(fin[0]), color="k", ls=":", lw=1, label=label, zorder=4)
    else:
        e = result.edges[st]
        a.stairs(ll, e, color="k", ls=":", lw=1, label=label, zorder=4, baseline=None)


def plot_vpc(result: VpcResult, ax=None, log_y: bool = False, show_points: bool = True, figsize=None,
             ncols: int | None = None, sharey: bool = True):
    """The VPC in the style of Bergstrand et al. (2011): observations as points, observed median (solid) and outer
    percentiles (dashed) as lines, the medians of the simulated percentiles as thin lines and their ``ci``
    intervals as shaded bands (outer percentiles blue, median red), the LLOQ dotted; with censoring, a panel of the
    fraction below the LLOQ (observed line, simulated interval shaded) underneath.

    One panel per stratum (``ncols`` per row, default up to 4; ``sharey``: a common y axis); with ``ax`` (one axis
    per stratum) only the main panels are drawn there. ``log_y``: log-scale y; bands and lines at or below zero are
    drawn from half the smallest positive value shown. Returns the Figure (never shown)."""
    # matplotlib is imported only when plotting
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    strata = list(result.edges)
    blq = result.blq
    n_s = len(strata)
    if ax is not None:
        axes_main = [ax] if not isinstance(ax, (list, tuple, np.ndarray)) else list(np.ravel(ax))
        if len(axes_main) < n_s:
            raise ValueError(f"{n_s} strata need {n_s} axes")
        fig = axes_main[0].figure
        axes_blq = [None] * n_s
    else:
        nc = max(1, min(n_s, int(ncols) if ncols else 4))
        nr = -(-n_s // nc)
        per = 2 if blq is not None else 1
        fs = figsize or (4.6 * nc if n_s > 1 else 5.2, (5.6 if per == 2 else 4.4) * nr)
        fig, axs = plt.subplots(nr * per, nc, figsize=fs, squeeze=False,
                                gridspec_kw={"height_ratios": [3, 1] * nr} if per == 2 else None)
        axes_main = [axs[per * (k // nc), k % nc] for k in range(n_s)]
        axes_blq = [axs[per * (k // nc) + 1, k % nc] for k in range(n_s)] if per == 2 else [None] * n_s
        for r in range(nr * per):
            for c in range(nc):
                if (r // per) * nc + c >= n_s:
                    axs[r, c].remove()
        for a, ab in zip(axes_main, axes_blq):
            if ab is not None:
                ab.sharex(a)
                a.tick_params(labelbottom=False)
        if sharey and n_s > 1:
            for a in axes_main[1:]:
                a.sharey(axes_main[0])
    obs = result.observed
    kind = "pcVPC" if result.pred_corrected else "VPC"
    floor = _display_floor(result, strata) if log_y else None
    raw_all = result._raw if result._raw is not None else result.percentiles
    for a, ab, st in zip(axes_main, axes_blq, strata):
        t = result.percentiles[result.percentiles["strata"] == st]
        o = obs[(obs["STRATA"] == st) & (obs["BIN"] >= 0)]
        if show_points:
            a.plot(o.loc[~o["BLQ"], "IDV"], o.loc[~o["BLQ"], "Y"], "o", ms=2.8, color="#4d6f8f", alpha=0.45,
                   mec="none", zorder=1, label="observations")
        raw = raw_all[raw_all["strata"] == st]
        for q in result.pi:
            tq = t[t["pi"] == q].sort_values("x")
            rq = raw[raw["pi"] == q].sort_values("x")
            central = abs(q - 0.5) < 1e-9
            col = _BAND_MED if central else _BAND_OUTER
            # an interval reaching below the LLOQ is drawn from the LLOQ up (not at all when wholly below)
            part = np.isneginf(rq["sim_lo"].to_numpy()) & np.isfinite(rq["sim_hi"].to_numpy())
            lo = np.where(part, rq["lloq"].to_numpy() if "lloq" in rq else np.nan, tq["sim_lo"].to_numpy())
            hi = tq["sim_hi"].to_numpy(float)
            med = tq["sim_median"].to_numpy(float)
            if floor is not None:  # log axis: a band reaching down to zero is drawn from the display floor,
                below = ~(hi > floor)  # one wholly below it not at all
                lo = np.where(below, np.nan, np.where(lo <= floor, floor, lo))
                hi = np.where(below, np.nan, hi)
            pname = "median" if central else f"{100 * q:g}th percentile"
            a.fill_between(tq["x"], lo, hi, color=col, alpha=0.25 if central else 0.22, lw=0, zorder=0,
                           label=f"simulated {pname} {100 * result.ci:g}% CI")
            a.plot(tq["x"], med, color=col, lw=0.9, ls="-" if central else "--", alpha=0.9, zorder=2,
                   label=f"simulated {pname}")
            a.plot(tq["x"], tq["obs"], color=_OBS_LINE, lw=1.6 if central else 1.2, ls="-" if central else "--",
                   zorder=3, label=f"observed {pname}")
        _lloq_line(a, result, st)
        edges = result.edges[st]
        a.plot(edges, np.zeros_like(edges), "|", transform=a.get_xaxis_transform(), color="k", ms=6, mew=0.8,
               clip_on=False, label="bin edges")
        if log_y:
            log_axis(a, a.yaxis)
        a.set_ylabel("prediction-corrected DV" if result.pred_corrected else "DV")
        a.set_title(kind if st == "all" else f"{kind}: {st}", fontsize=10)
        if ab is None:
            a.set_xlabel(result.idv)
        else:
            tb = blq[blq["strata"] == st].sort_values("x")
            ab.fill_between(tb["x"], tb["sim_lo"], tb["sim_hi"], color=_BAND_OUTER, alpha=0.25, lw=0,
                            label=f"simulated {100 * result.ci:g}% CI")
            ab.plot(tb["x"], tb["sim_median"], color=_BAND_OUTER, lw=0.9, label="simulated median")
            ab.plot(tb["x"], tb["obs"], color=_OBS_LINE, lw=1.4, marker="o", ms=3, label="observed")
            ab.set_ylim(-0.02, max(0.1, float(np.nanmax(tb[["obs", "sim_hi"]].to_numpy())) * 1.15))
            ab.set_ylabel("fraction < LLOQ")
            ab.set_xlabel(result.idv)
    pct = lambda q: f"{100 * q:g}th"  # noqa: E731
    outer = [q for q in result.pi if abs(q - 0.5) > 1e-9]
    handles = [Line2D([], [], color=_OBS_LINE, lw=1.6, label="observed median"),
               Line2D([], [], color=_BAND_MED, lw=0.9, label="simulated median"),
               Patch(color=_BAND_MED, alpha=0.35, label=f"{100 * result.ci:g}% CI simulated median")]
    if outer:
        handles[1:1] = [Line2D([], [], color=_OBS_LINE, ls="--", lw=1.2,
                               label="observed " + "/".join(pct(q) for q in outer))]
        handles += [Line2D([], [], color=_BAND_OUTER, ls="--", lw=0.9,
                           label="simulated " + "/".join(pct(q) for q in outer)),
                    Patch(color=_BAND_OUTER, alpha=0.3, label=f"{100 * result.ci:g}% CI simulated "
                          + "/".join(pct(q) for q in outer))]
    if any(np.isfinite(np.asarray(result.lloq.get(st, []), float)).any() for st in strata):
        handles.append(Line2D([], [], color="k", ls=":", lw=1, label="LLOQ"))
    axes_main[0].legend(handles=handles, frameon=False, fontsize=7, loc="best")
    if ax is None:
        fig.tight_layout()
    return fig
