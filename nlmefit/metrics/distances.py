"""Two-sample distances between model samples x [m, d] and data y [n, d]: energy distance, MMD, sliced W_p.

All three are 0 for identical distributions and take the samples as given (no rescaling here:
:func:`nlmefit.metrics.compare` standardises per design time first). Rows must be complete and finite.
"""
from __future__ import annotations

import numpy as np
import ot
from scipy.spatial.distance import pdist

from nlmefit.errors import DataError
from nlmefit.metrics._inputs import as_sample
from nlmefit.metrics._pairwise import pairwise_sum

__all__ = ["energy_distance", "mmd", "median_heuristic", "sliced_wasserstein", "MEDIAN_HEURISTIC_MAX_POINTS"]

#: the median heuristic uses at most this many pooled points (a seeded subsample beyond), i.e. ≤ 2 M distances
MEDIAN_HEURISTIC_MAX_POINTS = 2000


def _pair(x, y) -> tuple[np.ndarray, np.ndarray]:
    """Checked float arrays, centred on the pooled mean (distances are translation invariant)."""
    x = as_sample(x, "x")
    y = as_sample(y, "y", d=x.shape[1])
    c = np.concatenate([x, y]).mean(0)
    return x - c, y - c


def energy_distance(x, y) -> float:
    """Squared energy distance D² = 2 E‖X − Y‖ − E‖X − X'‖ − E‖Y − Y'‖ (Székely & Rizzo), Euclidean norm.

    Estimator: the cross term is the mean over all m·n pairs, the within-sample terms are U-statistics (mean over
    the i ≠ j pairs, divided by m(m − 1) and n(n − 1)), so the estimate is unbiased for D² and can be slightly
    negative when the distributions agree. (scipy.stats.energy_distance is the square root of the V-statistic
    version, in 1-D only.)
    """
    x, y = _pair(x, y)
    m, n = x.shape[0], y.shape[0]
    xy = pairwise_sum(x, y, np.sqrt) / (m * n)
    xx = pairwise_sum(x, None, np.sqrt) / (m * (m - 1))
    yy = pairwise_sum(y, None, np.sqrt) / (n * (n - 1))
    return float(2.0 * xy - xx - yy)


def median_heuristic(x, y, seed: int = 0) -> float:
    """The median of the pairwise Euclidean distances ‖z_i − z_j‖, i < j, of the pooled sample z = (x, y).

    Beyond ``MEDIAN_HEURISTIC_MAX_POINTS`` pooled points, the median over a seeded random subsample of that size.
    """
    x, y = _pair(x, y)
    z = np.concatenate([x, y])
    if z.shape[0] > MEDIAN_HEURISTIC_MAX_POINTS:
        z = z[np.random.default_rng(seed).choice(z.shape[0], MEDIAN_HEURISTIC_MAX_POINTS, replace=False)]
    h = float(np.median(pdist(z)))
    if not h > 0:
        raise DataError("x, y: the median pairwise distance of the pooled sample is 0 (more than half the points "
                        "coincide); pass bandwidth= explicitly")
    return h


def mmd(x, y, bandwidth: float | None = None, *, return_bandwidth: bool = False) -> float | tuple[float, float]:
    """Squared maximum mean discrepancy, unbiased estimator (Gretton et al. 2012, eq. 3), RBF kernel.

    k(a, b) = exp(−‖a − b‖² / (2 h²));  MMD²_u = Σ_{i≠j} k(x_i, x_j) / (m(m−1)) + Σ_{i≠j} k(y_i, y_j) / (n(n−1))
    − 2 Σ_{i,j} k(x_i, y_j) / (mn). It can be slightly negative when the distributions agree.

    ``bandwidth`` h: default the median heuristic (:func:`median_heuristic` of the pooled sample). With
    ``return_bandwidth=True`` the result is (MMD², h), so the bandwidth used can be recorded.
    """
    x, y = _pair(x, y)
    if bandwidth is None:
        h = median_heuristic(x, y)
    else:
        h = float(bandwidth)
        if not (np.isfinite(h) and h > 0):
            raise DataError(f"bandwidth: expected a positive finite number, got {bandwidth!r}")
    m, n = x.shape[0], y.shape[0]
    g = -0.5 / h ** 2

    def k(sq: np.ndarray) -> np.ndarray:
        return np.exp(g * sq)

    xy = pairwise_sum(x, y, k) / (m * n)
    xx = pairwise_sum(x, None, k) / (m * (m - 1))
    yy = pairwise_sum(y, None, k) / (n * (n - 1))
    value = float(xx + yy - 2.0 * xy)
    return (value, h) if return_bandwidth else value


def sliced_wasserstein(x, y, n_projections: int = 500, seed: int = 0, p: int = 2) -> float:
    """Sliced Wasserstein distance SW_p = (E_θ W_p^p(θ#μ_x, θ#μ_y))^{1/p}, θ uniform on the unit sphere S^{d−1}.

    Computed by POT (``ot.sliced_wasserstein_distance``, Monte Carlo over ``n_projections`` seeded directions,
    exact 1-D W_p of the empirical measures on each); p = 2 is POT's default. In 1-D it is the exact W_p.
    """
    x, y = _pair(x, y)
    if int(n_projections) < 1:
        raise DataError(f"n_projections: expected a positive integer, got {n_projections!r}")
    if not p >= 1:
        raise DataError(f"p: expected p ≥ 1, got {p!r}")
    return float(ot.sliced_wasserstein_distance(x, y, n_projections=int(n_projections), p=p, seed=seed))
