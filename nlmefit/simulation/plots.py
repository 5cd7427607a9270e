"""Figures for regimen simulations: concentration quantile bands per regimen, exposure distributions, PTA curves.

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
    ax.set_title(f"median and {100 * probs[lo]:g}–{100 * probs[hi]:g}% of {sim.profiles.shape[1]} {who}",
                 fontsize=9)
    ax.legend(fontsize=8, frameon=False)
    return fig


def plot_exposure_distributions(sim, metric: str = "AUC", ax=None):
    """Box plots of one exposure metric per regimen."""
    fig, ax = _ax(ax)
    m = metric.upper()
    if m not in sim.exposures:
        raise ValueError(f"no exposure metric {metric!r}; have {list(sim.exposures.columns)}")
    vals = [sim.exposures.loc[sim.exposures["REGIMEN"] == lab, m].to_numpy(float) for lab in sim.labels]
    ax.boxplot(vals, showfliers=False)
    ax.set_xticks(range(1, len(sim.labels) + 1))
    ax.set_xticklabels(sim.labels, rotation=20, ha="right", fontsize=7)
    ax.set_ylabel(m)
    ax.set_title(f"{m} over [{sim.interval[0][0]:g}, {sim.interval[0][1]:g}] per regimen", fontsize=9)
    fig.tight_layout()
    return fig


def plot_pta(table: pd.DataFrame, ax=None, x: str | None = None, target: float | None = 0.9):
    """PTA per regimen against MIC (when the table has one) or against the regimens; ``target`` draws a line."""
    fig, ax = _ax(ax)
    if "MIC" in table and x is None:
        for lab, g in table.groupby("REGIMEN", sort=False):
            ax.plot(g["MIC"], g["PTA"], marker="o", ms=3, label=lab)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("MIC")
        ax.legend(fontsize=8, frameon=False)
    else:
        xs = table[x].to_numpy() if x is not None else np.arange(len(table))
        ax.plot(xs, table["PTA"], marker="o")
        if x is None:
            ax.set_xticks(xs)
            ax.set_xticklabels(table["REGIMEN"], rotation=20, ha="right", fontsize=7)
        else:
            ax.set_xlabel(x)
    if target is not None:
        ax.axhline(target, color="grey", ls=":", lw=1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("probability of target attainment")
    ax.set_title(str(table["TARGET"].iloc[0]), fontsize=9)
    fig.tight_layout()
    return fig
