"""Figures for the Q/KL decomposition and the one-step-ahead score. Each function returns a matplotlib Figure (or
draws on ``ax=``) and never calls ``plt.show()``."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["plot_q_kl", "plot_aggregate_posterior", "plot_one_step"]


def plot_q_kl(dec: Any, ax: Any = None, annotate: bool = True):
    """Q_i against KL_i, one point per subject. The dashed lines Q − KL = c are iso-ELBO lines; each point's
    colour is gap_i = log p(y_i) − ELBO_i, so log p(y_i) = Q_i − KL_i + gap_i can be read off the figure. Subjects
    far to the right moved far from the prior (informative data or an atypical subject); low Q is a poor fit."""
    # matplotlib is imported only when plotting
    import matplotlib.pyplot as plt

    t = dec.table
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(5.2, 4.2))
    sc = ax.scatter(t["kl"], t["q"], c=t["gap"], cmap="viridis", s=28, zorder=3)
    cb = (fig or ax.figure).colorbar(sc, ax=ax)
    cb.set_label("gap = log p(y) − (Q − KL)", fontsize=8)
    if t["kl_se"].gt(0).any() or t["q_se"].gt(0).any():
        ax.errorbar(t["kl"], t["q"], xerr=2 * t["kl_se"], yerr=2 * t["q_se"], fmt="none", ecolor="grey", lw=0.7,
                    zorder=2)
    kl = np.linspace(0.0, max(1e-9, float(t["kl"].max())) * 1.05, 50)
    for c in np.quantile(t["elbo"], [0.1, 0.5, 0.9]):
        ax.plot(kl, c + kl, ls="--", lw=0.6, color="grey", zorder=1)
    if annotate:
        for _, r in t.iterrows():
            ax.annotate(str(r["ID"]), (r["kl"], r["q"]), fontsize=6, xytext=(2, 2), textcoords="offset points")
    ax.set_xlabel("KL_i = KL(q_i ‖ prior)")
    ax.set_ylabel("Q_i = E_q log p(y_i | η)")
    tot = dec.totals
    ax.set_title(f"Σ log p = {tot['loglik']:.2f} = ΣQ {tot['q']:.2f} − ΣKL {tot['kl']:.2f} + Σgap {tot['gap']:.2f}",
                 fontsize=8)
    return fig if fig is not None else ax.figure


def plot_aggregate_posterior(dec: Any, dims: Sequence[int] | None = None, bins: int = 40, ncols: int = 3):
    """For each η dimension: the histogram of draws from the aggregate posterior (1/N) Σ_i q_i against the prior
    density N(0, ω_dd). A mixture narrower than the prior (shrinkage) or shifted from it says the prior does not
    describe the population of posteriors."""
    # matplotlib is imported only when plotting
    import matplotlib.pyplot as plt

    draws = dec.mixture_draws.reshape(-1, dec.mixture_draws.shape[-1])
    dims = list(range(draws.shape[-1])) if dims is None else list(dims)
    nrows = max(1, math.ceil(len(dims) / ncols))
    nc = min(ncols, len(dims))
    fig, axes = plt.subplots(nrows, nc, figsize=(3.2 * nc, 2.6 * nrows), squeeze=False)
    agg = dec.aggregate
    for ax, d in zip(axes.ravel(), dims):
        x = draws[:, d]
        ax.hist(x, bins=bins, density=True, alpha=0.5, color="C0", label="aggregate posterior")
        if dec.prior_cov is not None:
            sd = math.sqrt(float(dec.prior_cov[d, d]))
            lim = max(4 * sd, float(np.abs(x).max()))
            g = np.linspace(-lim, lim, 200)
            ax.plot(g, np.exp(-0.5 * (g / sd) ** 2) / (sd * math.sqrt(2 * math.pi)), color="C3", label="prior")
        ax.set_title(dec.eta_names[d] if d < len(dec.eta_names) else f"eta{d + 1}", fontsize=9)
    for ax in axes.ravel()[len(dims):]:
        ax.set_visible(False)
    axes.ravel()[0].legend(fontsize=7)
    fig.suptitle(f"KL(aggregate ‖ prior) = {agg['aggregate_kl']:.3f} ± {agg['aggregate_kl_se']:.3f};  "
                 f"mean KL_i = {agg['mean_kl']:.3f};  I(i; η) = {agg['mutual_information']:.3f}", fontsize=8)
    fig.tight_layout()
    return fig


def plot_one_step(osa: Any, ids: Sequence | None = None, ax: Any = None, max_subjects: int = 8):
    """The one-step-ahead score log p(y_j | y_<j) against time for the chosen subjects (default: the
    ``max_subjects`` with the lowest total), with ±2 SE bars for the IS estimator. A score that keeps falling
    over time says the model's predictions degrade as the subject's history grows (misspecified dynamics,
    time-varying parameters); an isolated dip is a surprising observation."""
    # matplotlib is imported only when plotting
    import matplotlib.pyplot as plt

    t = osa.table
    if ids is None:
        ids = list(osa.per_subject.sort_values("logp")["ID"].iloc[:max_subjects])
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.0, 3.8))
    for i in ids:
        s = t[t["ID"] == i]
        ax.errorbar(s["TIME"], s["logp"], yerr=2 * s["se"] if s["se"].gt(0).any() else None, marker="o", ms=3,
                    lw=1, capsize=2, label=str(i))
    ax.set_xlabel("TIME")
    ax.set_ylabel("log p(y_j | y_<j)")
    ax.set_title(f"one-step-ahead score ({osa.method}); total {osa.total:.2f}", fontsize=9)
    ax.legend(fontsize=7, title="ID", title_fontsize=7, ncol=2)
    return fig if fig is not None else ax.figure
