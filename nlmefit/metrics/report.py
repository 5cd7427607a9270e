"""One tidy table comparing model samples with held-out data: every metric of :mod:`nlmefit.metrics`."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from nlmefit.metrics._inputs import as_observed, as_sample, complete_rows, observed_times, time_scale
from nlmefit.metrics.classifier import c2st
from nlmefit.metrics.coverage import DEFAULT_QUANTILES, coverage_error, quantile_coverage
from nlmefit.metrics.distances import energy_distance, mmd, sliced_wasserstein

__all__ = ["compare", "METRICS"]

#: metric → value it takes when the model reproduces the data distribution
METRICS = {"ENERGY": 0.0, "MMD": 0.0, "SLICED_W": 0.0, "C2ST": 0.5, "COVERAGE_MAE": 0.0}


def compare(samples, observed, *, times=None, standardize: bool = True, seed: int = 0,
            quantiles: Sequence[float] = DEFAULT_QUANTILES, bandwidth: float | None = None,
            n_projections: int = 500, n_folds: int = 5, model: str | None = None) -> pd.DataFrame:
    """Compare model ``samples`` [m, d] with held-out ``observed`` [n, d] (NaN = missing, or a PanelView).

    Long ("tidy") format, one row per metric, in this order:

    * ENERGY: squared energy distance, unbiased (:func:`~nlmefit.metrics.energy_distance`); perfect model 0;
    * MMD: squared MMD, unbiased, RBF kernel, median-heuristic bandwidth (:func:`~nlmefit.metrics.mmd`); 0;
    * SLICED_W: sliced W_2 by POT over ``n_projections`` directions (:func:`~nlmefit.metrics.sliced_wasserstein`); 0;
    * C2ST: cross-validated classifier accuracy (:func:`~nlmefit.metrics.c2st`); 0.5;
    * COVERAGE_MAE: mean |COVERAGE − q| over design times × ``quantiles``
      (:func:`~nlmefit.metrics.quantile_coverage`, :func:`~nlmefit.metrics.coverage_error`); 0.

    Columns: [MODEL (when ``model`` is given, so tables of several models concatenate)], METRIC, VALUE,
    NULL_VALUE (the value of a perfect model), N_SAMPLES and N_OBSERVED (rows of each side the metric used:
    C2ST uses min(m, n) of each; COVERAGE_MAE counts non-NaN observations), SCALE ("standardized" or "raw").
    ``attrs`` records ``mmd_bandwidth`` (h, on the SCALE), ``standardize``, ``seed`` and ``quantiles``.

    Scale: with ``standardize=True`` (the default) both samples and observations are transformed per design
    time, z_j = (y_j − mean_j) / sd_j, with mean_j and sd_j (ddof = 0; sd 1 where a time has no spread) from the
    held-out observations' non-NaN values — so every time point counts on the scale of its own spread and late,
    low concentrations are not swamped by the peak. ``standardize=False`` uses the raw values. Coverage does not
    depend on the choice (quantiles commute with increasing affine maps).

    Missing values: the distance metrics and C2ST use the complete rows of ``observed`` only (at least 2, else
    :class:`~nlmefit.errors.DataError`); coverage uses every non-NaN observation. ``samples`` must be finite.
    """
    s = as_sample(samples, "samples")
    y = as_observed(observed, d=s.shape[1])
    t = observed_times(observed, times, s.shape[1])
    yc = complete_rows(y)
    if standardize:
        mean, sd = time_scale(y)
        s_z, y_z = (s - mean) / sd, (yc - mean) / sd
    else:
        s_z, y_z = s, yc
    value, h = mmd(s_z, y_z, bandwidth, return_bandwidth=True)
    cov = quantile_coverage(s, y, times=t, quantiles=quantiles)
    m, n = s.shape[0], yc.shape[0]
    k = min(m, n)
    rows = [
        ("ENERGY", energy_distance(s_z, y_z), m, n),
        ("MMD", value, m, n),
        ("SLICED_W", sliced_wasserstein(s_z, y_z, n_projections=n_projections, seed=seed), m, n),
        ("C2ST", c2st(s_z, y_z, seed=seed, n_folds=n_folds), k, k),
        ("COVERAGE_MAE", coverage_error(cov), m, int(np.isfinite(y).sum())),
    ]
    out = pd.DataFrame(rows, columns=["METRIC", "VALUE", "N_SAMPLES", "N_OBSERVED"])
    out.insert(2, "NULL_VALUE", out["METRIC"].map(METRICS).astype(float))
    out["SCALE"] = "standardized" if standardize else "raw"
    if model is not None:
        out.insert(0, "MODEL", model)
    out.attrs.update(mmd_bandwidth=h, standardize=standardize, seed=seed, quantiles=tuple(float(q) for q in quantiles))
    return out
