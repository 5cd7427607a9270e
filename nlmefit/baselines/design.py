"""The panel view the generative baselines see: subjects on a common design as vectors y_i ∈ R^d.

A NONMEM event panel whose subjects share their sampling times (and, unless ``common_regimen=False``, their
regimen) becomes ``y`` [n, d] (NaN where a scheduled sample is missing) with ``mask`` [n, d]. The dose
information every dose-conditioned baseline receives is the **context** ``c_ij = Σ_k AMT_k 1[t_k ≤ t_j]``, the
cumulative amount dosed up to each sampling time: a single 100 mg dose is the constant vector 100, a 300 mg dose
the constant 300, a q12h regimen a staircase. It is a per-time-point vector, so a regimen that differs only in
its later doses changes only the later entries.

:class:`Standardizer` standardises per time point, z_j = (y_j − m_j) / s_j, so that every baseline trains on
O(1) values. Densities transform with the Jacobian: log p_y(y) = log p_z(z) − Σ_{j observed} log s_j, which
:class:`~nlmefit.baselines.base.Baseline` applies to every reported log-likelihood, so that NLLs of all
models are per subject on the original data scale and comparable.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from nlmefit.errors import DataError
from nlmefit.panel import Panel

__all__ = ["PanelView", "Standardizer"]


def _as_panel(data) -> Panel:
    if isinstance(data, Panel):
        return data
    if isinstance(data, pd.DataFrame):
        return Panel.from_dataframe(data)
    raise DataError(f"expected a NONMEM-style DataFrame or a Panel, got {type(data).__name__}")


@dataclass(frozen=True)
class PanelView:
    """Subjects on a common design: ``y`` [n, d] (NaN where missing), ``mask`` [n, d], ``context`` [n, d].

    ``times`` [d] are the design's sampling times; ``regimen`` is the shared dose table (TIME, AMT, RATE, CMT)
    when all subjects have the same one, else None; ``covariates`` holds the baseline covariates per subject.
    """

    ids: np.ndarray
    times: np.ndarray
    y: np.ndarray
    mask: np.ndarray
    context: np.ndarray
    regimen: pd.DataFrame | None
    covariates: pd.DataFrame

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_panel(cls, data, *, times=None, common_regimen: bool = True, min_fraction: float = 0.5,
                   decimals: int = 6) -> PanelView:
        """The view of a DataFrame or Panel.

        ``times``: the design's sampling times (default: every distinct observation time, rounded to
        ``decimals``); a subject observed at a time that is not in the design raises :class:`DataError`, as
        does a design time sampled in fewer than ``min_fraction`` of the subjects (the design is then not
        common — pass ``times=`` or bin the times first). ``common_regimen=True`` requires every subject to
        receive the same doses (the unconditional baselines model one regimen); with False the regimens may
        differ and reach the dose-conditioned baselines through ``context``. Censored (BLQ) observations and a
        second endpoint (DVID) are refused: the baselines model one continuous endpoint.
        """
        panel = _as_panel(data)
        if panel.n_subjects == 0:
            raise DataError("the panel has no subjects")
        m = panel.obs_mask
        if len(np.unique(panel.obs_dvid[m])) > 1:
            raise DataError("the generative baselines model one endpoint; the data have several DVID values "
                            f"({sorted(np.unique(panel.obs_dvid[m]).tolist())}) — select one first")
        if bool((panel.cens[m] != 0).any()):
            i, j = np.argwhere(m & (panel.cens != 0))[0]
            raise DataError(f"censored observation (ID {panel.ids[i]}, TIME {panel.obs_time[i, j]:g}): the "
                            "baselines need continuous values; drop or impute BLQ records first")
        t_obs = np.round(panel.obs_time, decimals)
        if times is None:
            grid = np.unique(t_obs[m])
        else:
            grid = np.unique(np.round(np.asarray(times, dtype=float), decimals))
            if grid.size != np.asarray(times).size:
                raise DataError("times: the design times must be distinct")
        if grid.size == 0:
            raise DataError("the panel has no observations")
        n, d = panel.n_subjects, grid.size
        col = np.searchsorted(grid, t_obs)
        col_c = np.clip(col, 0, d - 1)
        off = m & (grid[col_c] != t_obs)
        if off.any():
            i, j = np.argwhere(off)[0]
            raise DataError(f"ID {panel.ids[i]}: observation at TIME {panel.obs_time[i, j]:g} is not a design time "
                            f"{grid.tolist()[:12]}{' …' if d > 12 else ''}; the baselines need a common design")
        y = np.full((n, d), np.nan)
        mask = np.zeros((n, d), dtype=bool)
        rows, cols = np.nonzero(m)
        dup = pd.DataFrame({"i": rows, "j": col_c[rows, cols]}).duplicated()
        if dup.any():
            k = int(np.flatnonzero(dup.to_numpy())[0])
            raise DataError(f"ID {panel.ids[rows[k]]}: two observations at TIME {grid[col_c[rows[k], cols[k]]]:g}")
        y[rows, col_c[rows, cols]] = panel.dv[rows, cols]
        mask[rows, col_c[rows, cols]] = True
        frac = mask.mean(0)
        if times is None and (frac < min_fraction).any():
            j = int(np.argmin(frac))
            raise DataError(f"not a common design: TIME {grid[j]:g} is sampled in {int(mask[:, j].sum())} of {n} "
                            f"subjects (< {min_fraction:.0%}); pass times= with the nominal times, or bin the "
                            "sampling times first")
        dm = panel.dose_mask
        amt = np.where(dm, panel.dose_amt, 0.0)
        context = (amt[:, None, :] * (dm[:, None, :] & (panel.dose_time[:, None, :] <= grid[None, :, None]))).sum(-1)
        tables = [tuple(zip(np.round(panel.dose_time[i, dm[i]], decimals), np.round(amt[i, dm[i]], 9),
                            np.round(panel.dose_rate[i, dm[i]], 9), panel.dose_cmt[i, dm[i]]))
                  for i in range(n)]
        same = all(t == tables[0] for t in tables)
        if common_regimen and not same:
            i = next(k for k, t in enumerate(tables) if t != tables[0])
            raise DataError(f"ID {panel.ids[i]} receives a different regimen from ID {panel.ids[0]}; the "
                            "unconditional baselines need one regimen (pass common_regimen=False to carry the "
                            "doses as context for the dose-conditioned baselines)")
        regimen = pd.DataFrame(list(tables[0]), columns=["TIME", "AMT", "RATE", "CMT"]) if same else None
        cov = pd.DataFrame(panel.covariates, columns=list(panel.covariate_names), index=pd.Index(panel.ids, name="ID"))
        return cls(ids=np.asarray(panel.ids), times=grid, y=y, mask=mask, context=context, regimen=regimen,
                   covariates=cov)

    @classmethod
    def from_arrays(cls, y, *, times=None, context=None, ids=None) -> PanelView:
        """A view of a plain [n, d] array (NaN = missing); ``times`` default 0..d−1, ``context`` default 0."""
        y = np.asarray(y, dtype=float)
        if y.ndim != 2:
            raise DataError(f"y: expected an [n, d] array, got shape {y.shape}")
        n, d = y.shape
        times = np.arange(d, dtype=float) if times is None else np.asarray(times, dtype=float)
        if times.shape != (d,):
            raise DataError(f"times: expected {d} values, got {times.shape}")
        ctx = np.zeros((n, d)) if context is None else np.broadcast_to(np.asarray(context, dtype=float), (n, d)).copy()
        ids = np.arange(1, n + 1) if ids is None else np.asarray(ids)
        return cls(ids=ids, times=times, y=y, mask=np.isfinite(y), context=ctx, regimen=None,
                   covariates=pd.DataFrame(index=pd.Index(ids, name="ID")))

    # ------------------------------------------------------------------ shape and subsets
    @property
    def n(self) -> int:
        return int(self.y.shape[0])

    @property
    def d(self) -> int:
        return int(self.y.shape[1])

    @property
    def complete_cases(self) -> np.ndarray:
        """[n] bool: subjects with every design time observed."""
        return self.mask.all(1)

    def subset(self, index) -> PanelView:
        """The view of some subjects (positions: ints, slice or boolean mask)."""
        idx = np.atleast_1d(np.arange(self.n)[index])
        return replace(self, ids=self.ids[idx], y=self.y[idx], mask=self.mask[idx], context=self.context[idx],
                       covariates=self.covariates.iloc[idx])

    def complete(self) -> PanelView:
        """Only the subjects with no missing design time."""
        return self.subset(self.complete_cases)

    def split(self, test_fraction: float = 0.2, seed: int = 0) -> tuple[PanelView, PanelView]:
        """(train, test) by subject, at random (seeded); at least one subject on each side."""
        if not 0.0 < test_fraction < 1.0:
            raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
        if self.n < 2:
            raise DataError("a split needs at least two subjects")
        perm = np.random.default_rng(seed).permutation(self.n)
        k = min(max(int(round(test_fraction * self.n)), 1), self.n - 1)
        return self.subset(np.sort(perm[k:])), self.subset(np.sort(perm[:k]))

    def with_values(self, y) -> PanelView:
        """The same design with other values (e.g. samples of a model), mask from finiteness."""
        y = np.asarray(y, dtype=float)
        if y.ndim != 2 or y.shape[1] != self.d:
            raise DataError(f"values: expected [n, {self.d}], got {y.shape}")
        n = y.shape[0]
        ctx = self.context if n == self.n else np.broadcast_to(self.context[:1], (n, self.d)).copy()
        ids = self.ids if n == self.n else np.arange(1, n + 1)
        cov = self.covariates if n == self.n else pd.DataFrame(index=pd.Index(ids, name="ID"))
        return replace(self, ids=ids, y=y, mask=np.isfinite(y), context=ctx, covariates=cov)

    def observations_frame(self, y=None) -> pd.DataFrame:
        """Long frame ID, TIME, DV (observed entries only) plus CTX (the context at that time)."""
        y = self.y if y is None else np.asarray(y, dtype=float)
        mask = np.isfinite(y)
        i, j = np.nonzero(mask)
        return pd.DataFrame({"ID": self.ids[i], "TIME": self.times[j], "DV": y[i, j], "CTX": self.context[i, j]})

    def __repr__(self) -> str:
        return (f"PanelView(n={self.n}, d={self.d}, missing={int((~self.mask).sum())}, "
                f"regimen={'common' if self.regimen is not None else 'varies'})")


@dataclass(frozen=True)
class Standardizer:
    """z_j = (y_j − mean_j) / scale_j per design time, fitted on the training view's observed values.

    ``log_scale_sum(mask)`` = Σ_{j observed} log scale_j per subject: log p_y = log p_z − log_scale_sum.
    A time point with zero spread keeps scale 1 (no rescaling). ``ctx_scale`` scales the dose context.
    """

    mean: np.ndarray
    scale: np.ndarray
    ctx_scale: float = 1.0

    @classmethod
    def fit(cls, view: PanelView) -> Standardizer:
        empty = ~view.mask.any(0)
        if empty.any():
            raise DataError(f"design time {view.times[int(np.argmax(empty))]:g} has no observation in the training "
                            "subjects")
        with np.errstate(invalid="ignore"):
            mean = np.nanmean(view.y, 0)
            sd = np.nanstd(view.y, 0)
        sd = np.where(np.isfinite(sd) & (sd > 1e-12 * (1.0 + np.abs(mean))), sd, 1.0)
        c = float(np.abs(view.context).max())
        return cls(mean=mean, scale=sd, ctx_scale=c if c > 0 else 1.0)

    def transform(self, y: np.ndarray) -> np.ndarray:
        return (np.asarray(y, dtype=float) - self.mean) / self.scale

    def inverse(self, z: np.ndarray) -> np.ndarray:
        return np.asarray(z, dtype=float) * self.scale + self.mean

    def context(self, c: np.ndarray) -> np.ndarray:
        return np.asarray(c, dtype=float) / self.ctx_scale

    def log_scale_sum(self, mask: np.ndarray) -> np.ndarray:
        return (np.asarray(mask, dtype=float) * np.log(self.scale)).sum(-1)
