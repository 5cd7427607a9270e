"""Individual fits: each subject's observations with its IPRED and PRED curves on a fine time grid, paged.

Curves come from :func:`~nlmefit.diagnostics._grid.grid_predictions` (one batched prediction for every subject
shown), so they follow the subject's whole dosing history between observations. Dose times are marked with
triangles on the time axis, censored records (BLQ) with a distinct marker at their limit (the LLOQ).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from nlmefit.diagnostics._grid import grid_predictions
from nlmefit.diagnostics.gof import log_axis

__all__ = ["plot_individuals", "observation_table"]

_OBS = dict(marker="o", s=16, color="#1f2f3f", zorder=4, linewidths=0)
_BLQ = dict(marker="v", s=30, facecolors="white", edgecolors="#d62728", linewidths=1.1, zorder=5)
_IPRED = dict(color="#d62728", lw=1.4, zorder=3)
_PRED = dict(color="#1f77b4", lw=1.2, ls="--", zorder=2)
_DOSE = dict(marker="^", s=24, color="#555555", clip_on=False, zorder=6, linewidths=0)


def observation_table(fit) -> pd.DataFrame:
    """The fit's observations: ID, TIME, DV, CENS and LIMIT (the censoring limit, NaN when not censored)."""
    panel = fit.data.panel
    m = panel.obs_mask
    lim = pd.Series(panel.limit[m], index=panel.obs_row[m])
    pr = fit.predictions
    out = pr[["ID", "TIME", "DV"]].copy()
    out["CENS"] = pr["CENS"].to_numpy() if "CENS" in pr.columns else 0
    out["LIMIT"] = lim.reindex(pr["ROW"].to_numpy()).to_numpy() if "ROW" in pr.columns else np.nan
    out.loc[out["CENS"] == 0, "LIMIT"] = np.nan
    return out


def _dose_times(fit) -> dict:
    panel = fit.data.panel
    return {i: panel.dose_time[k][panel.dose_mask[k]] for k, i in enumerate(np.asarray(panel.ids).tolist())}


def _draw(ax, sid, obs: pd.DataFrame, grid: pd.DataFrame, doses: np.ndarray, log_y: bool) -> None:
    # matplotlib is imported only when plotting
    from matplotlib.transforms import blended_transform_factory

    ax.plot(grid["TIME"], grid["PRED"], **_PRED, label="PRED")
    ax.plot(grid["TIME"], grid["IPRED"], **_IPRED, label="IPRED")
    unc = obs["CENS"].to_numpy() == 0
    ax.scatter(obs["TIME"][unc], obs["DV"][unc], **_OBS, label="Observed")
    if (~unc).any():
        lim = obs["LIMIT"].where(obs["LIMIT"].notna(), obs["DV"])[~unc]
        ax.scatter(obs["TIME"][~unc], lim, **_BLQ, label="BLQ (at LLOQ)")
    if log_y:
        log_axis(ax, ax.yaxis)
        vals = np.concatenate([obs["DV"].to_numpy(float), obs["LIMIT"].to_numpy(float),
                               grid["IPRED"].to_numpy(float)])
        vals = vals[np.isfinite(vals) & (vals > 0)]
        if len(vals):
            floor = np.nanmin(np.concatenate([obs["DV"][obs["DV"] > 0], obs["LIMIT"].dropna(), [vals.max()]]))
            ax.set_ylim(floor / 3, vals.max() * 1.6)
    else:
        ax.set_ylim(bottom=0)
    if len(doses):
        tr = blended_transform_factory(ax.transData, ax.transAxes)
        ax.scatter(doses, np.full(len(doses), 0.035), transform=tr, **_DOSE, label="Dose")
    ax.set_title(f"ID {sid}", fontsize=9, pad=3)
    ax.tick_params(labelsize=7)
    ax.grid(True, color="0.92", lw=0.6)
    ax.set_axisbelow(True)


def plot_individuals(fit, ids: Sequence | None = None, per_page: int = 12, ncols: int = 4, log_y: bool = False,
                     n_points: int = 200, title: str | None = None) -> list:
    """Individual-fit figures, ``per_page`` subjects each (``ceil(len(ids) / per_page)`` figures).

    Each panel: observations (dots), IPRED (solid) and PRED (dashed) on a grid of ``n_points`` from 0 to the
    last observation, dose times (triangles on the time axis), censored records at their LLOQ (open triangles).
    ``log_y``: log concentration axis. ``title``: a heading on every page.
    Returns a list of matplotlib Figures (never shown).
    """
    # matplotlib is imported only when plotting
    import matplotlib.pyplot as plt

    if per_page < 1 or ncols < 1:
        raise ValueError(f"per_page and ncols must be positive, got per_page={per_page}, ncols={ncols}")
    all_ids = np.asarray(fit.data.panel.ids).tolist()
    id_list = all_ids if ids is None else list(ids)
    grid = grid_predictions(fit, n_points=n_points, ids=id_list)
    obs = observation_table(fit)
    doses = _dose_times(fit)
    g_by, o_by = dict(tuple(grid.groupby("ID", sort=False))), dict(tuple(obs.groupby("ID", sort=False)))
    empty_o = obs.iloc[:0]
    ncols = min(ncols, per_page, max(len(id_list), 1))
    nrows = math.ceil(min(per_page, max(len(id_list), 1)) / ncols)
    figs = []
    for start in range(0, len(id_list), per_page):
        page = id_list[start:start + per_page]
        head = 0.32 if title else 0.0  # inches for the title band, then 0.35 for the legend
        fig, axes = plt.subplots(nrows, ncols, figsize=(2.9 * ncols, 2.3 * nrows + 0.9 + head), squeeze=False)
        height = fig.get_figheight()
        if title:
            fig.suptitle(title, fontsize=10, y=1 - 0.06 / height, va="top")
        for ax, sid in zip(axes.ravel(), page):
            _draw(ax, sid, o_by.get(sid, empty_o), g_by[sid], doses.get(sid, np.zeros(0)), log_y)
        for ax in axes.ravel()[len(page):]:
            ax.set_visible(False)
        handles: dict = {}
        for ax in axes.ravel()[:len(page)]:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(lab, h)
        order = [k for k in ("Observed", "BLQ (at LLOQ)", "IPRED", "PRED", "Dose") if k in handles]
        fig.legend([handles[k] for k in order], order, loc="upper center", ncol=len(order), fontsize=8,
                   frameon=False, bbox_to_anchor=(0.5, 1 - (0.02 + head) / height))
        fig.supxlabel("Time", fontsize=9)
        fig.supylabel("Concentration (DV)", fontsize=9)
        n_pages = math.ceil(len(id_list) / per_page)
        fig.tight_layout(rect=(0, 0, 1, 1 - (0.3 + 0.5 * head) / height))
        if n_pages > 1:
            fig.text(0.995, 0.005, f"page {start // per_page + 1}/{n_pages}", ha="right", va="bottom", fontsize=7,
                     color="0.4")
        figs.append(fig)
    return figs
