"""Goodness-of-fit panels (xpose style): DV vs PRED, DV vs IPRED, CWRES vs TIME, CWRES vs PRED; on request also
|IWRES| vs IPRED and a normal QQ plot of CWRES.

Each panel shows the records (open circles), a reference line (identity, or zero with ±2 bands) and a LOWESS
smoother. Censored records (CENS ≠ 0) are drawn at their limit with a distinct marker in the DV panels and left
out of every smoother and of the residual panels (their residuals are undefined).

Panels (``plot_gof(fit, panels=[...])``; ``extended=True`` is the default four followed by the two extra ones):

* ``"dv_pred"``, ``"dv_ipred"``: DV against PRED / IPRED with the identity line;
* ``"res_idv"``, ``"res_pred"``: the residual (``residual=``, CWRES by default) against ``idv`` / PRED with 0 and ±2;
* ``"absiwres_ipred"``: |IWRES| against IPRED with a LOWESS smoother and the reference E|N(0, 1)| = √(2/π) ≈ 0.80
  (a smoother that rises or falls with IPRED points at a misspecified residual error model);
* ``"res_qq"``: sample quantiles of the residual against N(0, 1) quantiles (plotting positions (k − ½)/n), with the
  identity line (slope ≠ 1: residual variance misspecified; curvature: skewed or heavy-tailed residuals).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["plot_gof", "lowess", "log_axis", "STYLE", "GOF_PANELS"]

#: Panel names of :func:`plot_gof` (the first four are the default figure).
GOF_PANELS = ("dv_pred", "dv_ipred", "res_idv", "res_pred", "absiwres_ipred", "res_qq")
_DEFAULT_PANELS = GOF_PANELS[:4]
_E_ABS_NORMAL = float(np.sqrt(2 / np.pi))  # E|Z| for Z ~ N(0, 1)

#: Shared look of the diagnostic figures.
STYLE = {
    "point": dict(marker="o", s=14, facecolors="none", edgecolors="#3b4a5a", linewidths=0.7, alpha=0.75),
    "censored": dict(marker="v", s=22, color="#d62728", linewidths=0.0, alpha=0.9),
    "reference": dict(color="black", lw=1.0),
    "band": dict(color="grey", lw=0.9, ls="--"),
    "smooth": dict(color="#d62728", lw=1.6),
}


def lowess(x: np.ndarray, y: np.ndarray, frac: float = 2 / 3, iterations: int = 2,
           n_eval: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Locally weighted linear regression (Cleveland 1979), vectorised over ``n_eval`` evaluation points.

    Tricube weights over the ``ceil(frac·n)`` nearest points, then ``iterations`` robustness passes with
    bisquare weights on the residuals (interpolated from the evaluation grid). Returns ``(x_eval, y_smooth)``;
    empty arrays when fewer than 3 finite points.
    """
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n = len(x)
    if n < 3 or np.ptp(x) == 0:
        return np.zeros(0), np.zeros(0)
    xe = np.linspace(x.min(), x.max(), n_eval)
    k = min(n, max(3, int(np.ceil(frac * n))))
    dist = np.abs(xe[:, None] - x[None, :])  # [m, n]
    h = np.partition(dist, k - 1, axis=1)[:, k - 1]
    h = np.maximum(h, 1e-12 * max(np.ptp(x), 1.0))
    tri = np.clip(1 - (dist / h[:, None]) ** 3, 0, None) ** 3
    robust = np.ones(n)
    for it in range(iterations + 1):
        w = tri * robust[None, :]
        sw = w.sum(1)
        sw = np.where(sw > 0, sw, np.nan)
        mx = (w * x).sum(1) / sw
        my = (w * y).sum(1) / sw
        dx = x[None, :] - mx[:, None]
        sxx = (w * dx * dx).sum(1)
        sxy = (w * dx * (y[None, :] - my[:, None])).sum(1)
        flat = ~(sxx > 1e-12 * sw * np.ptp(x) ** 2)  # (nearly) one distinct x in the window: local mean
        slope = np.where(flat, 0.0, sxy / np.where(flat, 1.0, sxx))
        ys = my + slope * (xe - mx)
        if it == iterations:
            break
        r = y - np.interp(x, xe, ys)
        s = np.median(np.abs(r[np.isfinite(r)])) if np.isfinite(r).any() else 0.0
        if not s > 0:
            break
        u = r / (6 * s)
        robust = np.where(np.abs(u) < 1, (1 - u * u) ** 2, 0.0)
    good = np.isfinite(ys)
    return xe[good], ys[good]


def _smooth(ax, x, y, frac: float = 2 / 3) -> None:
    xs, ys = lowess(x, y, frac=frac)
    if len(xs):
        ax.plot(xs, ys, **STYLE["smooth"], zorder=4)


def log_axis(ax, axis) -> None:
    """Log scale with plain labels at 1-2-5 steps (no overlapping minor labels)."""
    # matplotlib is imported only when plotting
    from matplotlib import ticker

    (ax.set_xscale if axis is ax.xaxis else ax.set_yscale)("log", nonpositive="mask")
    axis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(ticker.NullFormatter())


def _identity(ax, x, y, log: bool) -> None:
    vals = np.concatenate([np.asarray(x, float), np.asarray(y, float)])
    vals = vals[np.isfinite(vals) & ((vals > 0) if log else True)]
    if not len(vals):
        return
    lo, hi = vals.min(), vals.max()
    if log:
        lo, hi = lo / 1.3, hi * 1.3
        for axis in (ax.xaxis, ax.yaxis):
            log_axis(ax, axis)
    else:
        pad = 0.04 * (hi - lo if hi > lo else 1.0)
        lo, hi = lo - pad, hi + pad
    ax.plot([lo, hi], [lo, hi], **STYLE["reference"], zorder=3)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal", adjustable="box")


def _dv_panel(ax, pred, dv, cens, xlabel: str, log: bool) -> None:
    unc = cens == 0
    keep = (pred > 0) & (dv > 0) if log else np.ones_like(unc)
    ax.scatter(pred[unc & keep], dv[unc & keep], **STYLE["point"], zorder=2)
    if (~unc & keep).any():
        ax.scatter(pred[~unc & keep], dv[~unc & keep], **STYLE["censored"], zorder=3, label="censored (at limit)")
        ax.legend(loc="upper left", fontsize=7, frameon=False)
    _identity(ax, pred[keep], dv[keep], log)
    if log:
        sx, sy = lowess(np.log(pred[unc & keep]), np.log(dv[unc & keep]))
        if len(sx):
            ax.plot(np.exp(sx), np.exp(sy), **STYLE["smooth"], zorder=4)
    else:
        _smooth(ax, pred[unc], dv[unc])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("Observations (DV)")


def _res_panel(ax, x, res, xlabel: str, ylabel: str) -> None:
    ok = np.isfinite(x) & np.isfinite(res)
    ax.scatter(x[ok], res[ok], **STYLE["point"], zorder=2)
    ax.axhline(0.0, **STYLE["reference"], zorder=3)
    for v in (-2.0, 2.0):
        ax.axhline(v, **STYLE["band"], zorder=1)
    _smooth(ax, x[ok], res[ok])
    m = np.abs(res[ok]).max() if ok.any() else 2.0
    lim = max(3.0, 1.08 * m)
    ax.set_ylim(-lim, lim)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)


def _absres_panel(ax, ipred, iwres) -> None:
    a = np.abs(iwres)
    ok = np.isfinite(ipred) & np.isfinite(a)
    ax.scatter(ipred[ok], a[ok], **STYLE["point"], zorder=2)
    ax.axhline(_E_ABS_NORMAL, **STYLE["band"], zorder=1, label="E|N(0, 1)| ≈ 0.80")
    _smooth(ax, ipred[ok], a[ok])
    ax.set_ylim(0, max(3.0, 1.08 * a[ok].max()) if ok.any() else 3.0)
    ax.legend(loc="upper right", fontsize=7, frameon=False)
    ax.set_xlabel("Individual predictions (IPRED)")
    ax.set_ylabel("|IWRES|")


def _qq_panel(ax, res, label: str) -> None:
    # scipy is imported only when plotting a QQ panel
    from scipy import stats

    v = np.sort(res[np.isfinite(res)])
    n = len(v)
    theo = stats.norm.ppf((np.arange(1, n + 1) - 0.5) / n) if n else np.zeros(0)
    ax.scatter(theo, v, **STYLE["point"], zorder=2)
    m = max(3.0, 1.08 * float(np.abs(np.concatenate([v, theo])).max())) if n else 3.0
    ax.plot([-m, m], [-m, m], **STYLE["reference"], zorder=3)
    ax.set_xlim(-m, m)
    ax.set_ylim(-m, m)
    ax.set_aspect("equal", adjustable="box")
    ax.set_xlabel("N(0, 1) quantiles")
    ax.set_ylabel(f"{label} quantiles")
    ax.set_title(f"QQ plot of {label} (n = {n})", fontsize=9)


def plot_gof(fit, ax: Sequence | np.ndarray | None = None, *, log: bool = False, residual: str = "CWRES",
             idv: str = "TIME", title: str | None = None, panels: Sequence[str] | None = None,
             extended: bool = False):
    """The goodness-of-fit figure of a fit: by default the 2×2 panels DV vs PRED, DV vs IPRED, ``residual`` vs
    ``idv`` and vs PRED.

    ``panels``: names from :data:`GOF_PANELS` in the order to draw (see the module docstring); ``extended=True``
    (without ``panels``) adds |IWRES| vs IPRED and the QQ plot of ``residual`` (2×3). ``ax``: one axis per panel
    (any array shape, row-major), else a new figure. ``log``: log-log DV panels. ``residual``: a residual column of
    ``fit.predictions`` (CWRES, WRES, IWRES, NPDE ...). Returns the Figure.
    """
    # matplotlib is imported only when plotting
    import matplotlib.pyplot as plt

    if panels is None:
        panels = GOF_PANELS if extended else _DEFAULT_PANELS
    elif isinstance(panels, str):
        panels = [panels]
    panels = list(panels)
    bad = [p for p in panels if p not in GOF_PANELS]
    if bad or not panels:
        raise ValueError(f"panels: unknown panel(s) {bad}; choose from {list(GOF_PANELS)}")
    pr = fit.predictions
    if residual not in pr.columns:
        raise ValueError(f"residual {residual!r} is not a column of fit.predictions ({list(pr.columns)})")
    if idv not in pr.columns:
        raise ValueError(f"idv {idv!r} is not a column of fit.predictions ({list(pr.columns)})")
    if "absiwres_ipred" in panels and "IWRES" not in pr.columns:
        raise ValueError(f"panel 'absiwres_ipred' needs an IWRES column in fit.predictions ({list(pr.columns)})")
    n_p = len(panels)
    if ax is None:
        ncol = 2 if n_p == 4 else min(3, n_p)
        nrow = -(-n_p // ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(4.0 * ncol, 3.7 * nrow), squeeze=False)
        axes = axes.ravel()
        for a in axes[n_p:]:
            a.remove()
        axes = axes[:n_p]
    else:
        axes = np.asarray(ax, dtype=object).ravel()
        if len(axes) != n_p:
            raise ValueError(f"ax: expected {n_p} axes, got {len(axes)}")
        fig = axes[0].figure
    dv = pr["DV"].to_numpy(float)
    pred = pr["PRED"].to_numpy(float)
    ipred = pr["IPRED"].to_numpy(float)
    cens = pr["CENS"].to_numpy() if "CENS" in pr.columns else np.zeros(len(pr), int)
    unc = cens == 0
    res = np.where(unc, pr[residual].to_numpy(float), np.nan)
    for a, name in zip(axes, panels):
        if name == "dv_pred":
            _dv_panel(a, pred, dv, cens, "Population predictions (PRED)", log)
        elif name == "dv_ipred":
            _dv_panel(a, ipred, dv, cens, "Individual predictions (IPRED)", log)
        elif name == "res_idv":
            _res_panel(a, pr[idv].to_numpy(float), res, "Time" if idv == "TIME" else idv, residual)
        elif name == "res_pred":
            _res_panel(a, pred, res, "Population predictions (PRED)", residual)
        elif name == "absiwres_ipred":
            _absres_panel(a, ipred, np.where(unc, pr["IWRES"].to_numpy(float), np.nan))
        else:  # "res_qq"
            _qq_panel(a, res, residual)
    for a in axes:
        a.grid(True, color="0.92", lw=0.6, zorder=0)
        a.set_axisbelow(True)
        a.tick_params(labelsize=8)
        a.xaxis.label.set_size(9)
        a.yaxis.label.set_size(9)
    if ax is None:
        n_c = int((~unc).sum())
        extra = f", {n_c} censored" if n_c else ""
        fig.suptitle(title or f"{fit.model_name} — {fit.method.upper()}: {fit.n_subjects} subjects, "
                              f"{len(pr)} observations{extra}", fontsize=10)
        fig.tight_layout()
    return fig
