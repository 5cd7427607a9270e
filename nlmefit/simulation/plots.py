"""Figures for regimen simulations: concentration quantile bands per regimen, exposure distributions, PTA (lines
against MIC, bars per regimen); exposure and PTA figures name the time window of their metric.

Each returns a matplotlib Figure (drawing on ``ax=`` when given) and never calls ``plt.show()``.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

__all__ = ["plot_profile_bands", "plot_exposure_distributions", "plot_pta"]


def _ax(ax, figsize=(6.4, 4.0)):
    import matplotlib.pyplot as plt  # matplotlib is imported only when plotting

    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
        return fig, ax
    return ax.figure, ax


def plot_profile_bands(sim, probs: Sequence[float] = (0.05, 0.5, 0.95), ax=None, log_y: bool = False):
    """Median line and outer-quantile band per regimen on one axis."""
    fig, ax = _ax(ax)
    q = np.nanquantile(sim.profiles, probs, axis=1)  # [P, R, T]
    lo, mid, hi = 0, len(probs) // 2, len(probs) - 1
    for r, lab in enumerate(sim.labels):
        line, = ax.plot(sim.times, q[mid, r], lw=1.6, label=lab)
        ax.fill_between(sim.times, q[lo, r], q[hi, r], color=line.get_color(), alpha=0.2, lw=0)
    ax.set_xlabel("time")
    ax.set_ylabel("concentration")
    if log_y:
        ax.set_yscale("log")
    who = "virtual subjects" if sim.mode == "population" else "posterior draws"
    res = ""
    if getattr(sim, "residual", False):
        res = ", with residual error" + ("" if getattr(sim, "allow_negative", False) else " (draws < 0 set to 0)")
    ax.set_title(f"median and {100 * probs[lo]:g}–{100 * probs[hi]:g}% of {sim.profiles.shape[1]} {who}{res}",
                 fontsize=9)
    ax.legend(fontsize=8, frameon=False)
    return fig


def _windows_text(windows: Sequence[str]) -> str | None:
    """One window (all regimens share it) or None (they differ; shown per regimen)."""
    uniq = list(dict.fromkeys(str(w) for w in windows))
    return uniq[0] if len(uniq) == 1 else None


def plot_exposure_distributions(sim, metric: str = "AUC24", ax=None):
    """Box plots of one exposure metric per regimen; the title (or each label) names the window it is over."""
    fig, ax = _ax(ax)
    m = metric.upper()
    if m == "AUC" and "AUC24" in sim.exposures:
        m = "AUC24"  # the bare name is AUC24
    if m not in sim.exposures:
        raise ValueError(f"no exposure metric {metric!r}; have {list(sim.exposures.columns)}")
    vals = [sim.exposures.loc[sim.exposures["REGIMEN"] == lab, m].to_numpy(float) for lab in sim.labels]
    ax.boxplot(vals, showfliers=False)
    col = "AUC24_WINDOW" if m == "AUC24" else "WINDOW"
    if m == "AUC_INF":
        wins = ["[first dose, inf) h"] * len(sim.labels)
    elif col in sim.exposures:
        wins = [str(sim.exposures.loc[sim.exposures["REGIMEN"] == lab, col].iloc[0]) for lab in sim.labels]
    else:
        wins = [f"[{a:g}, {b:g}] h" for a, b in sim.interval]
    one = _windows_text(wins)
    ax.set_xticks(range(1, len(sim.labels) + 1))
    ax.set_xticklabels(sim.labels if one else [f"{lab}\n{w}" for lab, w in zip(sim.labels, wins)], rotation=20,
                       ha="right", fontsize=7)
    ax.set_ylabel(m)
    ax.set_title(f"{m} over {one} per regimen" if one else f"{m} per regimen (window under each regimen)",
                 fontsize=9)
    fig.tight_layout()
    return fig


def plot_pta(table: pd.DataFrame, ax=None, x: str | None = None, target: float | None = 0.9):
    """PTA per regimen: lines against MIC (when the table has one) or against a numeric column ``x``; bars for
    the regimens themselves (categories). ``target`` draws a line; the title names the metric's window."""
    fig, ax = _ax(ax)
    wins = list(table["WINDOW"]) if "WINDOW" in table else []
    one = _windows_text(wins) if wins else None
    if "MIC" in table and x is None:
        for lab, g in table.groupby("REGIMEN", sort=False):
            ax.plot(g["MIC"], g["PTA"], marker="o", ms=3, label=lab)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("MIC")
        ax.legend(fontsize=8, frameon=False)
    elif x is not None:
        ax.plot(table[x].to_numpy(), table["PTA"], marker="o")
        ax.set_xlabel(x)
    else:  # regimens are categories: one bar each, nothing joins them
        xs = np.arange(len(table))
        ax.bar(xs, table["PTA"].to_numpy(float), width=0.6, color="C0", alpha=0.8)
        labels = table["REGIMEN"].astype(str).tolist()
        if wins and one is None:
            labels = [f"{lab}\n{w}" for lab, w in zip(labels, wins)]
        ax.set_xticks(xs)
        ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=7)
    if target is not None:
        ax.axhline(target, color="grey", ls=":", lw=1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("probability of target attainment")
    title = str(table["TARGET"].iloc[0])
    if wins:
        title += f", over {one}" if one else ", window per regimen"
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig
