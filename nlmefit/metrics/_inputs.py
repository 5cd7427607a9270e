"""Input checks and the per-time-point scale shared by the metrics (private).

Samples are [m, d] arrays on the design's d sampling times; observations are [n, d] with NaN where a scheduled
sample is missing (or anything with ``.y`` [n, d] and ``.times`` [d], such as a
:class:`~nlmefit.baselines.design.PanelView`). Every check raises :class:`~nlmefit.errors.DataError` naming the
argument and the expected shape.
"""
from __future__ import annotations

import numpy as np

from nlmefit.errors import DataError

__all__ = ["as_sample", "as_observed", "observed_times", "complete_rows", "time_scale"]


def _array(x, name: str) -> np.ndarray:
    try:
        a = np.asarray(x, dtype=float)
    except (TypeError, ValueError) as e:
        raise DataError(f"{name}: expected a numeric [n, d] array ({e})") from None
    if a.ndim != 2:
        raise DataError(f"{name}: expected a 2-D array [n, d] (rows = subjects or samples, columns = design times), "
                        f"got shape {a.shape}; pass x[:, None] for one-dimensional data")
    return a


def _check_dim(a: np.ndarray, name: str, d: int | None) -> None:
    if d is not None and a.shape[1] != d:
        raise DataError(f"{name}: expected [n, {d}] (the same {d} design times as the other sample), got {a.shape}")


def as_sample(x, name: str, *, d: int | None = None, min_rows: int = 2) -> np.ndarray:
    """``x`` as a float [n, d] array of finite values with at least ``min_rows`` rows (and ``d`` columns)."""
    a = _array(x, name)
    _check_dim(a, name, d)
    if a.shape[0] < min_rows:
        raise DataError(f"{name}: expected at least {min_rows} rows in the [n, {a.shape[1]}] array, got {a.shape[0]}")
    if a.shape[1] == 0:
        raise DataError(f"{name}: expected at least one column (design time), got shape {a.shape}")
    if not np.isfinite(a).all():
        i, j = np.argwhere(~np.isfinite(a))[0]
        raise DataError(f"{name}: non-finite value {a[i, j]} at row {i}, column {j}; expected finite [n, d] values")
    return a


def as_observed(observed, name: str = "observed", *, d: int | None = None) -> np.ndarray:
    """Held-out observations as a float [n, d] array: NaN marks a missing sample, ±inf is refused."""
    y = getattr(observed, "y", observed)
    a = _array(y, name)
    _check_dim(a, name, d)
    if a.shape[0] == 0:
        raise DataError(f"{name}: expected at least one row in the [n, {a.shape[1]}] array")
    if np.isinf(a).any():
        i, j = np.argwhere(np.isinf(a))[0]
        raise DataError(f"{name}: infinite value at row {i}, column {j}; use NaN for a missing observation")
    return a


def observed_times(observed, times, d: int) -> np.ndarray:
    """The design times: ``times`` if given, else ``observed.times`` (a PanelView), else 0, 1, …, d − 1."""
    if times is None:
        times = getattr(observed, "times", None)
    if times is None:
        return np.arange(d, dtype=float)
    t = np.asarray(times, dtype=float)
    if t.shape != (d,):
        raise DataError(f"times: expected {d} values (one per column), got shape {t.shape}")
    return t


def complete_rows(y: np.ndarray, name: str = "observed", *, min_rows: int = 2) -> np.ndarray:
    """The rows of ``y`` with every design time observed; at least ``min_rows`` of them."""
    keep = np.isfinite(y).all(1)
    if int(keep.sum()) < min_rows:
        raise DataError(f"{name}: the distance metrics need at least {min_rows} complete rows (no NaN in any of the "
                        f"{y.shape[1]} columns), got {int(keep.sum())} of {y.shape[0]}")
    return y[keep]


def time_scale(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean_j, sd_j) per column over the non-NaN values of ``y``: population SD (ddof = 0), and scale 1 (no
    rescaling) where a column has no spread or no observation — the convention of
    :class:`~nlmefit.baselines.design.Standardizer`."""
    obs = np.isfinite(y)
    cnt = obs.sum(0)
    yz = np.where(obs, y, 0.0)
    mean = np.where(cnt > 0, yz.sum(0) / np.maximum(cnt, 1), 0.0)
    var = np.where(obs, (y - mean) ** 2, 0.0).sum(0) / np.maximum(cnt, 1)
    sd = np.sqrt(var)
    sd = np.where((cnt > 1) & np.isfinite(sd) & (sd > 1e-12 * (1.0 + np.abs(mean))), sd, 1.0)
    return mean, sd
