"""Normalised prediction distribution errors (Brendel, Comets, Laffont, Laveille & Mentré 2006; Comets, Brendel &
Mentré 2008, the R package npde; Nguyen, Comets & Mentré 2012 for censored data).

With K replicates y_i^(k) of subject i's observations simulated under the fitted model (η ~ N(0, Ω), residual
error included; :mod:`nlmefit.diagnostics.replicates`):

* prediction discrepancy  pd_ij = (1/K) Σ_k 1{y_ij^(k) < y_ij}  (the predictive cdf at the observation);
* decorrelation (on the likelihood scale: log DV for the exponential error model, DV otherwise) with the
  empirical mean E_i and covariance V_i of a second, independent set of K replicates (so that the observation and
  the K reference replicates stay exchangeable and pde is exactly uniform under the model): with the lower
  Cholesky factor V_i = L_i L_iᵀ (npde's default ``decorr.method = "cholesky"``; observations in time order),
  y*_i = L_i⁻¹(y_i − E_i) and y*_i^(k) = L_i⁻¹(y_i^(k) − E_i), then
  pde_ij = (1/K) Σ_k 1{y*_ij^(k) < y*_ij};
* npde_ij = Φ⁻¹(pde_ij) (and npd_ij = Φ⁻¹(pd_ij) without decorrelation).

A pd or pde of 0 or 1 becomes 1/(2K) or 1 − 1/(2K) (as npde does), so Φ⁻¹ stays finite; ties count one half.
Under the model each npde is N(0, 1) (discretised at steps of 1/K) and a subject's npde are uncorrelated; they are
independent only where the predictive distribution of y_i is Gaussian. For strongly nonlinear models they stay
dependent (e.g. their squares correlate), which makes the tests below, which assume independence, somewhat
anti-conservative.

Censored records (M3 data), ``censoring="cdf"`` (npde's default method): for an observation below its limit
(CENS = 1) the probability of being censored is pd_LOQ = (1/K) Σ_k 1{y^(k) ≤ LLOQ}; its pd is imputed uniformly
in (0, pd_LOQ) (above a limit, CENS = −1: in (pd_LOQ, 1)), and the observation is imputed as the empirical quantile
of its simulated values at that pd. As in npde, every simulated value below its observation's LLOQ
(:func:`~nlmefit.diagnostics.replicates.observation_lloq`) is imputed the same way, so that the completed
observations and the completed replicates stay exchangeable; the completed vectors are then decorrelated like any
other. ``censoring="omit"`` gives censored records NaN (they are also left out of their subject's decorrelation,
and the replicates are not censored).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import stats

from nlmefit._html import object_html
from nlmefit.diagnostics.replicates import _simulate, fit_parts, observation_lloq

__all__ = ["NpdeResult", "npde", "npde_tests", "plot_npde"]

_SHAPIRO_MAX = 5000


@dataclass
class NpdeResult:
    """NPDE per observation, aligned with ``FitResult.predictions`` (sorted by ROW).

    ``table`` columns: ROW, ID, TIME, DV, PRED, EPRED (mean of the simulations), CENS, PD, NPD, PDE, NPDE, PD_LOQ
    (probability of being censored, for censored records). Without decorrelation PDE = PD and NPDE = NPD."""

    table: pd.DataFrame
    n_rep: int
    decorrelate: bool
    censoring: str
    seed: int | None
    decorrelation_method: str = "cholesky"
    extra: dict = field(default_factory=dict)

    @property
    def npde(self) -> np.ndarray:
        return self.table["NPDE"].to_numpy(float)

    def tests(self) -> pd.DataFrame:
        """Mean, variance, normality and global tests of the npde (:func:`npde_tests`)."""
        return npde_tests(self.npde)

    def plot(self, **kwargs):
        """:func:`plot_npde` of this result."""
        return plot_npde(self, **kwargs)

    def _repr_html_(self) -> str:
        return object_html("NPDE", [repr(self)], [("tests", self.tests().reset_index())])

    def __repr__(self) -> str:
        g = self.tests().loc["global", "p_value"]
        return (f"NpdeResult(n_obs={len(self.table)}, n_rep={self.n_rep}, decorrelate={self.decorrelate}, "
                f"censoring={self.censoring!r}, global p={g:.3g})")


def npde_tests(x: np.ndarray) -> pd.DataFrame:
    """Tests that ``x`` ~ N(0, 1) (NaN dropped), as the npde package reports them.

    * mean: one-sample Student t-test of mean 0;
    * variance: Fisher's test of variance 1, (n − 1)s² ~ χ²_{n−1}, two-sided;
    * normality: Shapiro–Wilk for n ≤ 5000, else D'Agostino–Pearson (``scipy.stats.normaltest``, as scipy's
      Shapiro–Wilk p-value is not accurate beyond 5000 values);
    * global: Bonferroni, min(1, 3·min p).
    """
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    n = len(x)
    if n < 3:
        raise ValueError(f"the npde tests need at least 3 finite values, got {n}")
    t = stats.ttest_1samp(x, 0.0)
    s2 = float(np.var(x, ddof=1))
    chi = (n - 1) * s2
    p_var = float(min(1.0, 2 * min(stats.chi2.cdf(chi, n - 1), stats.chi2.sf(chi, n - 1))))
    if n <= _SHAPIRO_MAX:
        norm_name, norm = "Shapiro-Wilk", stats.shapiro(x)
    else:
        norm_name, norm = "D'Agostino-Pearson", stats.normaltest(x)
    ps = [float(t.pvalue), p_var, float(norm.pvalue)]
    rows = [
        ("mean", "t-test (mean 0)", float(np.mean(x)), float(t.statistic), ps[0]),
        ("variance", "Fisher (variance 1)", s2, chi, ps[1]),
        ("normality", norm_name, np.nan, float(norm.statistic), ps[2]),
        ("global", "Bonferroni (3 tests)", np.nan, np.nan, min(1.0, 3 * min(ps))),
    ]
    out = pd.DataFrame(rows, columns=["name", "test", "estimate", "statistic", "p_value"]).set_index("name")
    out["n"] = n
    return out


def _clamp(p: torch.Tensor, k: int) -> torch.Tensor:
    return p.clamp(1.0 / (2 * k), 1.0 - 1.0 / (2 * k))


def _discrepancy(sim: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
    """(1/K) Σ_k 1{sim_k < obs} + ½·1{sim_k = obs}, over the leading dimension."""
    return (sim < obs).double().mean(0) + 0.5 * (sim == obs).double().mean(0)


def _quantile(srt: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Empirical quantile (order statistic ⌊qK⌋ + 1) of K sorted replicates ``srt`` [K, N, J] at levels ``q``
    [M, N, J] (one level per position), [M, N, J]."""
    k = srt.shape[0]
    return torch.gather(srt, 0, (q * k).floor().long().clamp(0, k - 1))


def _decorrelate(z_sim: torch.Tensor, z_obs: torch.Tensor, use: torch.Tensor, z_mom: torch.Tensor):
    """L_i⁻¹(z − E_i) for the observation and every replicate, E_i and V_i = L_i L_iᵀ from the replicates
    ``z_mom`` [K', N, J]; entries outside ``use`` are decoupled (identity rows/columns)."""
    e = z_mom.mean(0)  # [N, J]
    cm = torch.where(use, z_mom - e, torch.zeros_like(z_mom))
    v = torch.einsum("kni,knj->nij", cm, cm) / (z_mom.shape[0] - 1)
    c = torch.where(use, z_sim - e, torch.zeros_like(z_sim))  # [K, N, J]
    eye = torch.diag_embed((~use).double())
    v = torch.where(use.unsqueeze(-1) & use.unsqueeze(-2), v, torch.zeros_like(v)) + eye
    chol, info = torch.linalg.cholesky_ex(v)
    if bool((info > 0).any()):  # numerically singular V_i (e.g. a zero-variance observation): a small ridge
        scale = torch.diagonal(v, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-300)
        ridge = 1e-10 * scale[:, None, None] * torch.eye(v.shape[-1], dtype=v.dtype)
        chol = torch.linalg.cholesky(v + ridge)
    rhs = torch.cat([torch.where(use, z_obs - e, torch.zeros_like(e)).unsqueeze(-1), c.permute(1, 2, 0)], -1)
    w = torch.linalg.solve_triangular(chol, rhs, upper=False)  # [N, J, 1 + K]
    return w[..., 0], w[..., 1:].permute(2, 0, 1)


def npde(
    fit: Any,
    n_rep: int = 1000,
    seed: int | None = 0,
    decorrelate: bool = True,
    censoring: str = "cdf",
    data=None,
    progress: bool | None = None,
) -> NpdeResult:
    """NPDE of a fitted model's observations from ``n_rep`` simulated replicates (see the module docstring).

    ``data``: evaluate another data set (DataFrame or Panel, e.g. external validation data) under the fit's
    model and estimates instead of the fitted one. ``censoring``: ``"cdf"`` (impute censored records) or
    ``"omit"`` (NaN). Reproducible for a given ``seed``. ``progress``: a bar over the 2·``n_rep`` simulated
    replicates (None: automatic, :mod:`nlmefit.progress`).
    """
    if censoring not in ("cdf", "omit"):
        raise ValueError(f"censoring must be 'cdf' or 'omit', got {censoring!r}")
    if n_rep < 10:
        raise ValueError(f"n_rep must be at least 10 (1000 is usual), got {n_rep}")
    model, p, mdata = fit_parts(fit, data)
    k = int(n_rep)
    both = torch.as_tensor(_simulate(model, p, mdata, 2 * k, seed, progress=progress,
                                     desc="NPDE replicates"))  # [2K, N, J], DV scale
    mask = mdata.mask.cpu()
    ysim, ymom = (torch.where(mask, b, torch.zeros_like(b)) for b in (both[:k], both[k:]))
    epred = ysim.mean(0).numpy()  # before any imputation of censored replicates
    panel = mdata.panel
    cens = mdata.cens.cpu()
    yobs = torch.as_tensor(np.where(mask.numpy(), panel.dv, 0.0))
    pd_ = _clamp(_discrepancy(ysim, yobs), k)
    is_c = mask & (cens != 0)
    own = torch.as_tensor(np.where(is_c.numpy(), panel.limit, 0.0))
    p_loq = torch.where(is_c, _clamp((ysim <= own).double().mean(0), k), torch.full_like(yobs, float("nan")))
    use = mask.clone()
    if bool(is_c.any()):
        if censoring == "omit":
            pd_ = torch.where(is_c, torch.full_like(pd_, float("nan")), pd_)
            use = use & ~is_c
        else:
            gen = torch.Generator().manual_seed(0 if seed is None else int(seed) + 7919)
            u = torch.rand(yobs.shape, generator=gen, dtype=yobs.dtype)
            imp = torch.where(cens > 0, u * p_loq, p_loq + u * (1 - p_loq))
            pd_ = torch.where(is_c, _clamp(imp, k), pd_)
            srt = torch.sort(ysim, 0).values
            yobs = torch.where(is_c, _quantile(srt, pd_.unsqueeze(0))[0], yobs)
            # the replicates are censored at each observation's LLOQ and imputed the same way (as npde does),
            # so that observation and replicates stay exchangeable
            lloq = torch.as_tensor(observation_lloq(mdata))
            has = mask & torch.isfinite(lloq)
            lloq = torch.where(has, lloq, torch.zeros_like(lloq))
            p_sim = _clamp((ysim <= lloq).double().mean(0), k)
            out = []
            for y in (ysim, ymom):
                below = has & (y < lloq)
                u = torch.rand(y.shape, generator=gen, dtype=y.dtype)
                out.append(torch.where(below, _quantile(srt, u * p_sim), y))
            ysim, ymom = out
    if decorrelate:
        tr = model.error.transform
        one = torch.ones_like(yobs)
        z_obs = tr(torch.where(use, yobs, one).clamp_min(1e-300) if model.error.log_scale else yobs)
        z_sim, z_mom = (tr(torch.where(use, y, one).clamp_min(1e-300)) if model.error.log_scale else y
                        for y in (ysim, ymom))
        w_obs, w_sim = _decorrelate(z_sim, z_obs, use, z_mom)
        pde = _clamp(_discrepancy(w_sim, w_obs), k)
        pde = torch.where(use, pde, torch.full_like(pde, float("nan")))
    else:
        pde = pd_
    with torch.no_grad():
        f0, _ = model.predict(p, torch.zeros(mdata.n_subjects, mdata.q, dtype=mdata.y.dtype,
                                             device=mdata.y.device), mdata)
    pred = model.error.untransform(f0).cpu().numpy()
    m = mask.numpy()
    ids = np.broadcast_to(np.asarray(panel.ids)[:, None], m.shape)
    pdn, pden = pd_.numpy(), pde.numpy()
    table = pd.DataFrame({
        "ROW": panel.obs_row[m], "ID": ids[m], "TIME": panel.obs_time[m], "DV": panel.dv[m], "PRED": pred[m],
        "EPRED": epred[m], "CENS": cens.numpy()[m],
        "PD": pdn[m], "NPD": stats.norm.ppf(pdn[m]), "PDE": pden[m], "NPDE": stats.norm.ppf(pden[m]),
        "PD_LOQ": p_loq.numpy()[m],
    })
    table = table.sort_values("ROW", kind="stable").reset_index(drop=True)
    return NpdeResult(table, k, bool(decorrelate), censoring, seed)


# ---------------------------------------------------------------------------------------------------- plots
def _bands(ax, x: np.ndarray, v: np.ndarray, n_bins: int | None, n_sim: int, rng: np.random.Generator) -> None:
    """Observed 5/50/95th percentiles of ``v`` per quantile bin of ``x``, with the 95 % prediction intervals of
    those percentiles under N(0, 1) (``n_sim`` simulated samples of each bin's size), as the npde package draws
    them; drawn at the bins' median x and carried flat to the outermost values."""
    ok = np.isfinite(x) & np.isfinite(v)
    x, v = x[ok], v[ok]
    if len(x) < 6:
        return
    k = n_bins or min(10, max(1, len(x) // 20))
    edges = np.unique(np.quantile(x, np.linspace(0, 1, k + 1)))
    b = np.clip(np.searchsorted(edges[1:-1], x, side="right"), 0, max(0, len(edges) - 2))
    qs = (0.05, 0.5, 0.95)
    xs, obs, lo, hi = [], [], [], []
    for j in np.unique(b):
        vals = v[b == j]
        xs.append(np.median(x[b == j]))
        obs.append(np.quantile(vals, qs))
        sim = np.quantile(rng.standard_normal((n_sim, len(vals))), qs, axis=1)  # [3, n_sim]
        lo.append(np.quantile(sim, 0.025, axis=1))
        hi.append(np.quantile(sim, 0.975, axis=1))
    xs, obs, lo, hi = map(np.asarray, (xs, obs, lo, hi))
    xs = np.concatenate([[x.min()], xs, [x.max()]])
    obs, lo, hi = (np.concatenate([a[:1], a, a[-1:]]) for a in (obs, lo, hi))
    for c, (col, ls) in enumerate((("#3a7bd5", "--"), ("#d62728", "-"), ("#3a7bd5", "--"))):
        ax.fill_between(xs, lo[:, c], hi[:, c], color=col, alpha=0.18, lw=0)
        ax.plot(xs, obs[:, c], color="#b2182b" if c == 1 else "#1f3b73", ls=ls, lw=1.4)


def plot_npde(result: NpdeResult, bins: int | None = None, n_sim: int = 200, seed: int = 0, figsize=(9.0, 7.0)):
    """Four panels: histogram vs the N(0, 1) density, QQ plot against N(0, 1) (90 % envelope), npde vs TIME and
    npde vs PRED (zero line, ±1.645 lines, observed 5/50/95th percentiles per quantile bin of x — ``bins``, default
    min(10, n/20) — with the 95 % prediction intervals of those percentiles under N(0, 1) shaded). Returns the
    Figure (never shown)."""
    # matplotlib is imported only when plotting
    import matplotlib.pyplot as plt

    t = result.table
    v = t["NPDE"].to_numpy(float)
    fin = np.isfinite(v)
    rng = np.random.default_rng(seed)
    fig, axes = plt.subplots(2, 2, figsize=figsize)
    (a_h, a_q), (a_t, a_p) = axes
    label = "npde" if result.decorrelate else "npd"
    # histogram
    x = np.linspace(-4, 4, 200)
    a_h.hist(v[fin], bins="auto", density=True, color="#9ecae1", edgecolor="white")
    a_h.plot(x, stats.norm.pdf(x), color="#b2182b", lw=1.5, label="N(0, 1)")
    a_h.axvline(0, color="k", lw=0.8)
    a_h.set_xlabel(label)
    a_h.set_ylabel("density")
    a_h.legend(frameon=False, fontsize=8)
    # QQ plot
    vs = np.sort(v[fin])
    n = len(vs)
    theo = stats.norm.ppf((np.arange(1, n + 1) - 0.5) / n)
    if n:
        env = np.quantile(np.sort(rng.standard_normal((n_sim, n)), axis=1), [0.05, 0.95], axis=0)
        a_q.fill_between(theo, env[0], env[1], color="#3a7bd5", alpha=0.2, lw=0, label="90 % envelope")
    a_q.plot(theo, vs, "o", ms=2.5, color="#1f3b73")
    lim = [min(-3.5, vs.min() if n else -3.5), max(3.5, vs.max() if n else 3.5)]
    a_q.plot(lim, lim, color="#b2182b", lw=1)
    a_q.set_xlabel("N(0, 1) quantiles")
    a_q.set_ylabel(f"sample quantiles ({label})")
    # scatter panels
    for ax, col in ((a_t, "TIME"), (a_p, "PRED")):
        xv = t[col].to_numpy(float)
        cen = t["CENS"].to_numpy() != 0
        ax.plot(xv[~cen], v[~cen], "o", ms=2.5, color="#6f6f6f", alpha=0.7)
        if cen.any():
            ax.plot(xv[cen], v[cen], "x", ms=3.5, color="#e6550d", label="censored (imputed)")
            ax.legend(frameon=False, fontsize=8)
        _bands(ax, xv, v, bins, n_sim, rng)
        ax.axhline(0, color="k", lw=0.8)
        for h in (-1.645, 1.645):
            ax.axhline(h, color="k", lw=0.6, ls=":")
        ax.set_xlabel(col)
        ax.set_ylabel(label)
    g = result.tests().loc["global", "p_value"]
    fig.suptitle(f"{label.upper()}  (K = {result.n_rep} replicates, global test p = {g:.3g})", fontsize=10)
    fig.tight_layout()
    return fig
