"""nlmefit.metrics: two-sample distances, C2ST, quantile coverage and the tidy ``compare`` table.

Exact checks against independent brute-force computations (scipy cdist/pdist, double loops, sorted differences,
scipy.stats.wasserstein_distance); statistical checks with seeded data and tolerances of ≈ 4 binomial (or
simulated) standard deviations, stated at each assertion.
"""
from __future__ import annotations

import inspect
import math
import time

import numpy as np
import ot
import pandas as pd
import pytest
from scipy.spatial.distance import cdist
from scipy.stats import energy_distance as scipy_energy
from scipy.stats import norm, wasserstein_distance

import nlmefit.metrics._pairwise as pairwise
from nlmefit.baselines.design import PanelView
from nlmefit.errors import DataError
from nlmefit.metrics import (
    METRICS,
    c2st,
    compare,
    coverage_error,
    energy_distance,
    median_heuristic,
    mmd,
    quantile_coverage,
    sliced_wasserstein,
)


def _gauss(rng, n, d, shift=0.0, scale=1.0):
    return rng.normal(size=(n, d)) * scale + shift


# ---------------------------------------------------------------------------------------------- energy distance
def test_energy_matches_brute_force_u_statistic():
    rng = np.random.default_rng(0)
    x, y = _gauss(rng, 7, 3), _gauss(rng, 9, 3, shift=0.7)
    m, n = len(x), len(y)
    ref = 2 * cdist(x, y).mean() - cdist(x, x).sum() / (m * (m - 1)) - cdist(y, y).sum() / (n * (n - 1))
    assert energy_distance(x, y) == pytest.approx(ref, rel=1e-10, abs=1e-12)


def test_energy_blocks_give_the_same_sum(monkeypatch):
    rng = np.random.default_rng(1)
    x, y = _gauss(rng, 23, 4), _gauss(rng, 31, 4, shift=0.3)
    full, full_mmd = energy_distance(x, y), mmd(x, y, bandwidth=1.3)
    monkeypatch.setattr(pairwise, "BLOCK_ELEMENTS", 40)          # blocks of one or two rows
    assert energy_distance(x, y) == pytest.approx(full, rel=1e-12)
    assert mmd(x, y, bandwidth=1.3) == pytest.approx(full_mmd, rel=1e-12)


def test_energy_closed_form_gaussian_shift():
    # 1-D N(0,1) vs N(mu,1): D² = 2 E|N(mu, 2)| − 2 E|N(0, 2)|, E|N(mu, s²)| = s√(2/π) e^{−mu²/2s²} + mu(1 − 2Φ(−mu/s))
    mu, s = 1.0, math.sqrt(2.0)
    e_abs = s * math.sqrt(2 / math.pi) * math.exp(-mu ** 2 / (2 * s * s)) + mu * (1 - 2 * norm.cdf(-mu / s))
    exact = 2 * e_abs - 2 * (2 / math.sqrt(math.pi))
    rng = np.random.default_rng(2)
    est = energy_distance(_gauss(rng, 4000, 1), _gauss(rng, 4000, 1, shift=mu))
    assert est == pytest.approx(exact, abs=0.1)                  # simulated SD of the estimate ≈ 0.028 at n = 4000


def test_energy_null_and_monotone_in_shift():
    rng = np.random.default_rng(3)
    x = _gauss(rng, 400, 5)
    null = energy_distance(x, _gauss(rng, 400, 5))
    vals = [energy_distance(x, _gauss(rng, 400, 5, shift=s)) for s in (0.25, 0.5, 1.0, 2.0)]
    assert abs(null) < 0.02                                      # unbiased: E = 0, SD ≈ 0.004 here
    assert 0.05 < vals[0] < vals[1] < vals[2] < vals[3]


def test_energy_one_dimension_agrees_with_scipy_v_statistic():
    # scipy.stats.energy_distance = sqrt(2A − B_V − C_V), within-sample V-statistics = U · (n − 1)/n
    rng = np.random.default_rng(4)
    x, y = _gauss(rng, 30, 1), _gauss(rng, 45, 1, shift=0.5)
    m, n = len(x), len(y)
    a = cdist(x, y).mean()
    u = energy_distance(x, y)
    bu, cu = cdist(x, x).sum() / (m * (m - 1)), cdist(y, y).sum() / (n * (n - 1))
    assert u == pytest.approx(2 * a - bu - cu, rel=1e-10)
    v = 2 * a - bu * (m - 1) / m - cu * (n - 1) / n
    assert math.sqrt(v) == pytest.approx(scipy_energy(x[:, 0], y[:, 0]), rel=1e-9)


# ---------------------------------------------------------------------------------------------------------- MMD
def _mmd_loop(x, y, h):
    k = lambda a, b: math.exp(-float(((a - b) ** 2).sum()) / (2 * h * h))  # noqa: E731
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_mmd_matches_double_loop():
    rng = np.random.default_rng(5)
    x, y = _gauss(rng, 6, 2), _gauss(rng, 8, 2, shift=0.5)
    assert mmd(x, y, bandwidth=0.8) == pytest.approx(_mmd_loop(x, y, 0.8), rel=1e-10, abs=1e-13)
    z = np.concatenate([x, y])
    dists = [float(np.linalg.norm(z[i] - z[j])) for i in range(len(z)) for j in range(i + 1, len(z))]
    h_ref = float(np.median(dists))
    value, h = mmd(x, y, return_bandwidth=True)
    assert h == pytest.approx(h_ref, rel=1e-12)
    assert value == pytest.approx(_mmd_loop(x, y, h_ref), rel=1e-10, abs=1e-13)
    assert mmd(x, y) == pytest.approx(value, rel=1e-14)


def test_median_heuristic_subsamples_large_pools():
    rng = np.random.default_rng(6)
    x, y = _gauss(rng, 1500, 3), _gauss(rng, 1500, 3)
    h = median_heuristic(x, y)
    # the exact median for N(0, I_3) pairs: √2 · sqrt(chi²_3 median) ≈ 2.18; a subsample of 2000 points is close
    assert h == pytest.approx(math.sqrt(2 * 2.366), rel=0.03)
    assert median_heuristic(x, y, seed=0) == h


def test_mmd_null_and_monotone_in_shift():
    rng = np.random.default_rng(7)
    x = _gauss(rng, 400, 5)
    null = mmd(x, _gauss(rng, 400, 5), bandwidth=2.0)
    vals = [mmd(x, _gauss(rng, 400, 5, shift=s), bandwidth=2.0) for s in (0.25, 0.5, 1.0, 2.0)]
    assert abs(null) < 0.005                                     # unbiased: E = 0
    assert 0.005 < vals[0] < vals[1] < vals[2] < vals[3]


# -------------------------------------------------------------------------------------------- sliced Wasserstein
def test_sliced_wasserstein_default_p_is_pots():
    assert inspect.signature(ot.sliced_wasserstein_distance).parameters["p"].default == 2
    assert inspect.signature(sliced_wasserstein).parameters["p"].default == 2


def test_sliced_wasserstein_1d_is_exact_w2_and_w1():
    rng = np.random.default_rng(8)
    x, y = _gauss(rng, 200, 1), _gauss(rng, 200, 1, shift=0.4, scale=1.5)
    w2 = math.sqrt(float(np.mean((np.sort(x[:, 0]) - np.sort(y[:, 0])) ** 2)))  # equal sizes: sorted differences
    assert sliced_wasserstein(x, y) == pytest.approx(w2, rel=1e-9)
    y2 = _gauss(rng, 137, 1, shift=-0.3)                          # unequal sizes, p = 1
    assert sliced_wasserstein(x, y2, p=1) == pytest.approx(wasserstein_distance(x[:, 0], y2[:, 0]), rel=1e-9)


def test_sliced_wasserstein_null_small_and_monotone():
    rng = np.random.default_rng(9)
    x = _gauss(rng, 500, 5)
    assert sliced_wasserstein(x, x) == pytest.approx(0.0, abs=1e-12)
    null = sliced_wasserstein(x, _gauss(rng, 500, 5))
    vals = [sliced_wasserstein(x, _gauss(rng, 500, 5, shift=s)) for s in (0.5, 1.0, 2.0)]
    assert null < 0.15                                           # finite-sample bias O(n^-1/2) only
    assert null < vals[0] < vals[1] < vals[2]
    assert vals[2] == pytest.approx(2.0, rel=0.15)               # a shift by 2 in every coordinate: E(θ·s)² = 4
    assert sliced_wasserstein(x, x + 1, seed=3) == sliced_wasserstein(x, x + 1, seed=3)


# -------------------------------------------------------------------------------------------------------- C2ST
C2ST_TOL = 4 * 0.5 / math.sqrt(1000)                             # 4 binomial SDs for 2 × 500 held-out predictions


def test_c2st_identical_distributions_near_half():
    rng = np.random.default_rng(10)
    acc = c2st(_gauss(rng, 500, 10), _gauss(rng, 500, 10), seed=0)
    assert abs(acc - 0.5) <= C2ST_TOL


def test_c2st_separated_and_monotone():
    rng = np.random.default_rng(11)
    x = _gauss(rng, 500, 10)
    assert c2st(x, _gauss(rng, 500, 10, shift=1.0)) > 0.9         # Bayes accuracy Φ(√10 / 2) ≈ 0.94
    assert c2st(x, _gauss(rng, 500, 10, scale=1.6)) > 0.75        # a variance change: quadratic features see it
    vals = [c2st(x, _gauss(rng, 500, 10, shift=s)) for s in (0.1, 0.3, 0.6)]
    assert vals[0] < vals[1] < vals[2]


def test_c2st_unbalanced_sizes_and_speed():
    rng = np.random.default_rng(12)
    c2st(_gauss(rng, 20, 2), _gauss(rng, 20, 2))                  # warm-up: torch.optim's one-time import
    acc = c2st(_gauss(rng, 300, 3), _gauss(rng, 1000, 3), seed=1)
    assert abs(acc - 0.5) <= 4 * 0.5 / math.sqrt(600)
    x, y = _gauss(rng, 500, 10), _gauss(rng, 500, 10, shift=0.2)
    t0 = time.perf_counter()
    first = c2st(x, y, seed=4)
    assert time.perf_counter() - t0 < 2.0
    assert c2st(x, y, seed=4) == first                            # seeded: reproducible


# ---------------------------------------------------------------------------------------------------- coverage
def test_quantile_coverage_exact_small_case():
    samples = np.tile(np.arange(101.0)[:, None], (1, 2))          # quantile q of column j = 100 q
    observed = np.array([[10.0, 1.0], [60.0, 99.0], [np.nan, 96.0], [49.9, np.nan]])
    tab = quantile_coverage(samples, observed, times=[0.5, 2.0], quantiles=(0.5, 0.95))
    assert list(tab.columns) == ["TIME", "QUANTILE", "SIM_QUANTILE", "COVERAGE", "N_OBS"]
    assert tab["TIME"].tolist() == [0.5, 0.5, 2.0, 2.0]
    assert tab["QUANTILE"].tolist() == [0.5, 0.95, 0.5, 0.95]
    np.testing.assert_allclose(tab["SIM_QUANTILE"], [50, 95, 50, 95])
    np.testing.assert_allclose(tab["COVERAGE"], [2 / 3, 1.0, 1 / 3, 1 / 3])
    assert tab["N_OBS"].tolist() == [3, 3, 3, 3]
    assert coverage_error(tab) == pytest.approx(np.mean([abs(2 / 3 - .5), .05, abs(1 / 3 - .5), abs(1 / 3 - .95)]))


def test_quantile_coverage_calibrated_model():
    rng = np.random.default_rng(13)
    d, m, n = 4, 4000, 1000
    loc = np.array([5.0, 3.0, 1.0, 0.2])
    samples = _gauss(rng, m, d) * loc + loc
    observed = _gauss(rng, n, d) * loc + loc
    observed[rng.random((n, d)) < 0.2] = np.nan                   # 20 % missing
    tab = quantile_coverage(samples, observed, times=[1, 2, 4, 8], quantiles=(0.05, 0.25, 0.5, 0.95))
    assert len(tab) == 16
    np.testing.assert_array_equal(tab["N_OBS"].to_numpy().reshape(d, 4)[:, 0], np.isfinite(observed).sum(0))
    q, cov, n_obs = tab["QUANTILE"].to_numpy(), tab["COVERAGE"].to_numpy(), tab["N_OBS"].to_numpy()
    tol = 4 * np.sqrt(q * (1 - q) * (1 / n_obs + 1 / m))          # binomial error of the data + of the quantile
    assert (np.abs(cov - q) <= tol).all(), tab


def test_quantile_coverage_detects_shift_and_empty_time():
    rng = np.random.default_rng(14)
    samples = _gauss(rng, 2000, 2)
    observed = _gauss(rng, 500, 2, shift=2.0)
    observed[:, 1] = np.nan
    tab = quantile_coverage(samples, observed, quantiles=(0.5,))
    assert tab["TIME"].tolist() == [0.0, 1.0]                     # default times 0..d−1
    assert tab["COVERAGE"].iloc[0] == pytest.approx(norm.cdf(-2.0), abs=0.03)
    assert np.isnan(tab["COVERAGE"].iloc[1]) and tab["N_OBS"].iloc[1] == 0


def test_quantile_coverage_reads_a_panel_view():
    rng = np.random.default_rng(15)
    view = PanelView.from_arrays(_gauss(rng, 50, 3), times=[0.5, 1.0, 6.0])
    tab = quantile_coverage(_gauss(rng, 100, 3), view)
    assert sorted(set(tab["TIME"])) == [0.5, 1.0, 6.0]


# ----------------------------------------------------------------------------------------------------- compare
def test_compare_tidy_structure():
    rng = np.random.default_rng(16)
    samples, observed = _gauss(rng, 300, 4), _gauss(rng, 200, 4)
    observed[:5, 2] = np.nan
    out = compare(samples, observed, seed=0)
    assert list(out.columns) == ["METRIC", "VALUE", "NULL_VALUE", "N_SAMPLES", "N_OBSERVED", "SCALE"]
    assert out["METRIC"].tolist() == ["ENERGY", "MMD", "SLICED_W", "C2ST", "COVERAGE_MAE"] == list(METRICS)
    assert out["NULL_VALUE"].tolist() == [0.0, 0.0, 0.0, 0.5, 0.0]
    assert (out["SCALE"] == "standardized").all()
    row = out.set_index("METRIC")
    assert row.loc["ENERGY", "N_OBSERVED"] == 195                # complete rows only
    assert row.loc["C2ST", "N_SAMPLES"] == row.loc["C2ST", "N_OBSERVED"] == 195
    assert row.loc["COVERAGE_MAE", "N_OBSERVED"] == 200 * 4 - 5  # every non-NaN observation
    assert out.attrs["mmd_bandwidth"] > 0 and out.attrs["standardize"] is True
    assert abs(row.loc["ENERGY", "VALUE"]) < 0.05 and abs(row.loc["MMD", "VALUE"]) < 0.01
    assert abs(row.loc["C2ST", "VALUE"] - 0.5) <= 4 * 0.5 / math.sqrt(2 * 195)
    assert row.loc["COVERAGE_MAE", "VALUE"] < 0.05

    named = compare(samples, observed, model="A")
    assert named.columns[0] == "MODEL" and (named["MODEL"] == "A").all()
    both = pd.concat([named, compare(samples + 1.0, observed, model="B")], ignore_index=True)
    wide = both.pivot(index="MODEL", columns="METRIC", values="VALUE")
    assert (wide.loc["B"] > wide.loc["A"]).all()                  # the shifted model is worse on every metric


def test_compare_standardizes_per_time_point_by_the_observed_data():
    rng = np.random.default_rng(17)
    scale = np.array([100.0, 10.0, 1.0, 0.01])                   # a peak and a tiny late concentration
    samples = _gauss(rng, 300, 4) * scale + scale
    observed = _gauss(rng, 250, 4) * scale + scale
    samples[:, 3] += 0.02                                         # the model misses only the late time point
    out = compare(samples, observed).set_index("METRIC")["VALUE"]
    mean, sd = np.nanmean(observed, 0), np.nanstd(observed, 0)   # ddof = 0, from the held-out data
    assert out["ENERGY"] == pytest.approx(energy_distance((samples - mean) / sd, (observed - mean) / sd), rel=1e-9)
    assert out["MMD"] == pytest.approx(mmd((samples - mean) / sd, (observed - mean) / sd), rel=1e-9)
    raw = compare(samples, observed, standardize=False).set_index("METRIC")
    assert (raw["SCALE"] == "raw").all()
    assert raw.loc["COVERAGE_MAE", "VALUE"] == pytest.approx(out["COVERAGE_MAE"])  # scale-free
    # standardised, a 2-SD error at the late time is plain; on the raw scale the peak's spread swamps it
    assert out["ENERGY"] > 0.5 and out["MMD"] > 0.1
    assert raw.loc["ENERGY", "VALUE"] < 0.1 * out["ENERGY"] and raw.loc["MMD", "VALUE"] < 0.01
    # C2ST standardises its features itself: the same on both scales
    assert out["C2ST"] > 0.75 and raw.loc["C2ST", "VALUE"] == pytest.approx(out["C2ST"], abs=0.02)


# -------------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("fn", [energy_distance, mmd, sliced_wasserstein, c2st])
def test_two_sample_bad_inputs(fn):
    x = np.zeros((10, 3)) + np.arange(10)[:, None]
    with pytest.raises(DataError, match=r"y: expected \[n, 3\]"):
        fn(x, np.ones((10, 2)))
    with pytest.raises(DataError, match="x: expected a 2-D array"):
        fn(np.arange(10.0), x)
    with pytest.raises(DataError, match="y: expected at least 2 rows"):
        fn(x, x[:1])
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(DataError, match="x: non-finite value nan at row 3, column 1"):
        fn(bad, x)
    bad[3, 1] = np.inf
    with pytest.raises(DataError, match="y: non-finite"):
        fn(x, bad)


def test_parameter_errors():
    x = np.random.default_rng(18).normal(size=(10, 2))
    with pytest.raises(DataError, match="bandwidth"):
        mmd(x, x, bandwidth=0.0)
    with pytest.raises(DataError, match="n_folds"):
        c2st(x, x, n_folds=1)
    with pytest.raises(DataError, match="at least 5 rows in each sample"):
        c2st(x, x[:4])
    with pytest.raises(DataError, match="n_projections"):
        sliced_wasserstein(x, x, n_projections=0)
    with pytest.raises(DataError, match="median pairwise distance"):
        mmd(np.zeros((5, 2)), np.zeros((5, 2)))
    with pytest.raises(DataError, match="quantiles"):
        quantile_coverage(x, x, quantiles=(0.5, 1.0))
    with pytest.raises(DataError, match="times: expected 2 values"):
        quantile_coverage(x, x, times=[1.0, 2.0, 3.0])
    assert issubclass(DataError, ValueError)


def test_compare_bad_inputs():
    rng = np.random.default_rng(19)
    samples, observed = rng.normal(size=(20, 3)), rng.normal(size=(20, 3))
    observed[1:, 0] = np.nan                                      # one complete row left
    with pytest.raises(DataError, match="observed: the distance metrics need at least 2 complete rows"):
        compare(samples, observed)
    with pytest.raises(DataError, match=r"observed: expected \[n, 3\]"):
        compare(samples, np.ones((5, 4)))
    with pytest.raises(DataError, match="observed: infinite value"):
        compare(samples, np.full((5, 3), np.inf))
    samples[0, 0] = np.nan
    with pytest.raises(DataError, match="samples: non-finite"):
        compare(samples, rng.normal(size=(20, 3)))
