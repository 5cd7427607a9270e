"""Random-effect diagnostics: the distribution of η̂ against its prior N(0, ω²), and η̂ against covariates.

Both figures read :func:`eta_table` (one row per subject: ID, η̂, baseline covariates) and carry each η's
shrinkage (1 − SD(η̂)/ω, in %) in the panel titles: with high shrinkage the η̂ collapse towards 0 and neither
their spread nor their covariate trends can be trusted.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from nlmefit.diagnostics.gof import STYLE, lowess

__all__ = ["eta_table", "plot_eta_distributions", "plot_eta_covariates", "is_categorical"]


def _prefix(fit, kind: str) -> str:
    cols = fit.individual_estimates.columns
    if not any(str(c).startswith(f"{kind}_") for c in cols):
        have = sorted({str(c).split("_")[0] for c in cols if "_" in str(c)})
        raise ValueError(f"the fit's individual estimates have no {kind}_ columns (prefixes: {have})")
    return f"{kind}_"


def eta_table(fit, kind: str = "ETA") -> pd.DataFrame:
    """One row per subject: ID, ``<kind>_<η>`` for every IIV η (``kind`` ETA = the conditional modes; POSTMEAN
    for the posterior means of a SAEM fit), then the baseline covariates (text covariates as their labels)."""
    pre = _prefix(fit, kind)
    ind = fit.individual_estimates
    cols = [f"{pre}{n}" for n in fit.eta_names if f"{pre}{n}" in ind.columns]
    out = ind[["ID"] + cols].reset_index(drop=True).copy()
    panel = fit.data.panel
    cov = pd.DataFrame(np.asarray(panel.covariates, float), columns=list(panel.covariate_names))
    for name, levels in (panel.covariate_levels or {}).items():
        inv = {code: lab for lab, code in levels.items()}
        cov[name] = cov[name].map(inv)
    cov.insert(0, "ID", np.asarray(panel.ids))
    return out.merge(cov, on="ID", how="left")


def _shrinkage(fit, name: str) -> str:
    s = None if fit.eta_shrinkage is None else fit.eta_shrinkage.get(name)
    return "shrinkage n/a" if s is None or not np.isfinite(s) else f"shrinkage {100 * s:.0f}%"


def _omega(fit, name: str) -> float:
    v = fit.estimates.get(f"omega_{name}", np.nan)
    return float(v)


def is_categorical(values: pd.Series, max_levels: int = 10) -> bool:
    """Text, boolean or categorical values, or numbers with at most ``max_levels`` distinct values."""
    v = values.dropna()
    if not pd.api.types.is_numeric_dtype(v.dtype) or pd.api.types.is_bool_dtype(v.dtype):
        return True
    return v.nunique() <= max_levels


def _style(ax) -> None:
    ax.grid(True, color="0.92", lw=0.6)
    ax.set_axisbelow(True)
    ax.tick_params(labelsize=7)


def plot_eta_distributions(fit, kind: str = "ETA", bins: int | str = "auto", ncols: int = 3):
    """Histogram of η̂ per IIV component with the N(0, ω²) density of the fit; shrinkage in each title.
    Returns the Figure."""
    # matplotlib is imported only when plotting
    import matplotlib.pyplot as plt

    tab = eta_table(fit, kind)
    names = [n for n in fit.eta_names if f"{kind}_{n}" in tab.columns]
    ncols = max(1, min(ncols, len(names)))
    nrows = max(1, math.ceil(len(names) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.7 * nrows), squeeze=False)
    for ax, n in zip(axes.ravel(), names):
        e = tab[f"{kind}_{n}"].to_numpy(float)
        e = e[np.isfinite(e)]
        om = _omega(fit, n)
        sd = math.sqrt(om) if om > 0 else float("nan")
        half = max(4 * sd if np.isfinite(sd) else 0.0, 1.1 * np.abs(e).max(initial=0.0), 1e-3)
        ax.hist(e, bins=bins, range=(-half, half) if bins != "auto" else None, density=True, color="#9fb7cf",
                edgecolor="white", lw=0.6, label="η̂")
        if np.isfinite(sd) and sd > 0:
            x = np.linspace(-half, half, 300)
            ax.plot(x, np.exp(-0.5 * (x / sd) ** 2) / (sd * math.sqrt(2 * math.pi)), color="black", lw=1.3,
                    label=f"N(0, ω²={om:.3g})")
        ax.axvline(0.0, color="grey", lw=0.8, ls=":")
        if len(e):
            ax.axvline(e.mean(), color=STYLE["smooth"]["color"], lw=1.0, ls="--", label=f"mean {e.mean():.3f}")
        ax.set_xlim(-half, half)
        ax.set_title(f"η {n} ({_shrinkage(fit, n)})", fontsize=9)
        ax.set_xlabel(f"{kind}_{n}", fontsize=8)
        ax.set_ylabel("density", fontsize=8)
        ax.legend(fontsize=6.5, frameon=False, loc="upper right")
        _style(ax)
    for ax in axes.ravel()[len(names):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def _categorical_panel(ax, x: pd.Series, e: np.ndarray) -> None:
    ok = x.notna().to_numpy() & np.isfinite(e)
    xs, es = x[ok], e[ok]
    levels = sorted(pd.unique(xs), key=lambda v: (isinstance(v, str), v))
    groups = [es[(xs == lev).to_numpy()] for lev in levels]
    pos = np.arange(len(levels))
    ax.boxplot(groups, positions=pos, widths=0.55, showfliers=False, patch_artist=True,
               boxprops=dict(facecolor="#dde6ef", edgecolor="#3b4a5a", lw=0.8),
               medianprops=dict(color=STYLE["smooth"]["color"], lw=1.4),
               whiskerprops=dict(color="#3b4a5a", lw=0.8), capprops=dict(color="#3b4a5a", lw=0.8))
    rng = np.random.default_rng(0)
    for k, g in enumerate(groups):
        ax.scatter(k + rng.uniform(-0.15, 0.15, len(g)), g, s=9, color="#3b4a5a", alpha=0.6, lw=0, zorder=3)
    labels = [f"{v:g}" if isinstance(v, (int, float, np.number)) else str(v) for v in levels]
    ax.set_xticks(pos, labels, fontsize=7)
    ax.set_xlim(-0.6, len(levels) - 0.4)


def _continuous_panel(ax, x: np.ndarray, e: np.ndarray) -> None:
    ax.scatter(x, e, **STYLE["point"], zorder=2)
    xs, ys = lowess(x, e)
    if len(xs):
        ax.plot(xs, ys, **STYLE["smooth"], zorder=4)


def plot_eta_covariates(fit, covariates: Sequence[str] | None = None, kind: str = "ETA", max_levels: int = 10):
    """η̂ (rows) against each covariate (columns): scatter + LOWESS for continuous covariates, box plots for
    categorical ones (text, or at most ``max_levels`` distinct values). Default covariates: every baseline
    covariate of the data that varies between subjects. Returns the Figure."""
    # matplotlib is imported only when plotting
    import matplotlib.pyplot as plt

    tab = eta_table(fit, kind)
    names = [n for n in fit.eta_names if f"{kind}_{n}" in tab.columns]
    cov_names = list(fit.data.panel.covariate_names)
    if covariates is None:
        covariates = [c for c in cov_names if tab[c].nunique(dropna=True) > 1]
    else:
        covariates = [covariates] if isinstance(covariates, str) else list(covariates)
        missing = [c for c in covariates if c not in tab.columns]
        if missing:
            raise ValueError(f"covariates {missing} are not in the data (covariates: {cov_names})")
    if not covariates:
        raise ValueError("no covariate to plot: the data has none that varies between subjects")
    nr, nc = len(names), len(covariates)
    fig, axes = plt.subplots(nr, nc, figsize=(2.9 * nc, 2.5 * nr), squeeze=False)
    for i, n in enumerate(names):
        e = tab[f"{kind}_{n}"].to_numpy(float)
        for j, c in enumerate(covariates):
            ax = axes[i, j]
            ax.axhline(0.0, **STYLE["reference"], zorder=1)
            if is_categorical(tab[c], max_levels):
                _categorical_panel(ax, tab[c], e)
            else:
                _continuous_panel(ax, tab[c].to_numpy(float), e)
            ax.set_title(f"η {n} vs {c} ({_shrinkage(fit, n)})", fontsize=8)
            ax.set_xlabel(c, fontsize=8)
            if j == 0:
                ax.set_ylabel(f"{kind}_{n}", fontsize=8)
            _style(ax)
    fig.tight_layout()
    return fig
