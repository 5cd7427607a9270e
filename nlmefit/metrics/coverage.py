"""VPC-style quantile coverage: how often held-out observations fall below the model's simulated quantiles."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from nlmefit.errors import DataError
from nlmefit.metrics._inputs import as_observed, as_sample, observed_times

__all__ = ["quantile_coverage", "coverage_error", "DEFAULT_QUANTILES"]

DEFAULT_QUANTILES = (0.05, 0.5, 0.95)


def _quantiles(quantiles) -> np.ndarray:
    q = np.asarray(quantiles, dtype=float)
    if q.ndim != 1 or q.size == 0 or not ((q > 0) & (q < 1)).all():
        raise DataError(f"quantiles: expected a non-empty sequence of levels in (0, 1), got {quantiles!r}")
    return q


def quantile_coverage(samples, observed, times=None,
                      quantiles: Sequence[float] = DEFAULT_QUANTILES) -> pd.DataFrame:
    """Per design time j and level q: the fraction of held-out observations y_ij below the model's q-quantile.

    COVERAGE_jq = #{i : y_ij observed, y_ij < Q̂_j(q)} / N_OBS_j, with Q̂_j(q) the empirical q-quantile
    (``numpy.quantile``, linear interpolation) of ``samples[:, j]``. A well-calibrated model has COVERAGE ≈ q,
    within binomial error √(q(1 − q)/N_OBS). Every non-NaN observation counts (incomplete subjects too).

    ``samples`` [m, d] (finite), ``observed`` [n, d] (NaN = missing) or a PanelView; ``times`` [d] default
    ``observed.times`` or 0..d−1. Returns one row per (TIME, QUANTILE), sorted: TIME, QUANTILE, SIM_QUANTILE
    (Q̂_j(q), data scale), COVERAGE (NaN where N_OBS = 0), N_OBS.
    """
    s = as_sample(samples, "samples")
    y = as_observed(observed, d=s.shape[1])
    t = observed_times(observed, times, s.shape[1])
    q = _quantiles(quantiles)
    sim = np.quantile(s, q, axis=0)                                        # [Q, d]
    obs = np.isfinite(y)
    n_obs = obs.sum(0)                                                     # [d]
    below = (obs[None] & (y[None] < sim[:, None, :])).sum(1)               # [Q, d]
    with np.errstate(invalid="ignore", divide="ignore"):
        cov = np.where(n_obs > 0, below / n_obs, np.nan)
    n_q, d = q.size, s.shape[1]
    return pd.DataFrame({
        "TIME": np.repeat(t, n_q),
        "QUANTILE": np.tile(q, d),
        "SIM_QUANTILE": sim.T.reshape(-1),
        "COVERAGE": cov.T.reshape(-1),
        "N_OBS": np.repeat(n_obs, n_q).astype(int),
    })


def coverage_error(table: pd.DataFrame) -> float:
    """Mean absolute coverage error: mean over the (TIME, QUANTILE) rows with N_OBS > 0 of |COVERAGE − QUANTILE|
    (unweighted: every time point counts the same)."""
    ok = table["N_OBS"].to_numpy() > 0
    if not ok.any():
        raise DataError("observed: no non-NaN observation at any design time")
    return float(np.abs(table["COVERAGE"].to_numpy()[ok] - table["QUANTILE"].to_numpy()[ok]).mean())
