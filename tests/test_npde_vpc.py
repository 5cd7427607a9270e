"""NPDE and (pc)VPC: calibration at the true parameters, misspecification, decorrelation, censoring, plots, rows.

Calibration design: 1-cmt oral, additive error, θ = (ka 1, cl 2, v 20), ω² = 0.1 on each, σ = 0.5, 100 mg at 0,
samples at 7 (NPDE) or 10 (VPC) times; evaluated at the truth (a FOCE-I "fit" with maxiter=0 at the true values).
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

import nlmefit  # noqa: E402
from nlmefit.diagnostics.npde import npde, npde_tests, plot_npde  # noqa: E402
from nlmefit.diagnostics.replicates import observation_lloq, simulate_replicates  # noqa: E402
from nlmefit.diagnostics.vpc import plot_vpc, vpc, vpc_bins  # noqa: E402

TRUTH = {"theta": {"ka": 1.0, "cl": 2.0, "v": 20.0}, "omega": {"ka": 0.1, "cl": 0.1, "v": 0.1}}
DOSE = [{"TIME": 0, "AMT": 100, "CMT": 1}]
T_NPDE = [0.5, 1, 2, 4, 8, 12, 24]
T_VPC = [0.25, 0.5, 1, 2, 3, 4, 6, 8, 12, 24]


def model(error: str = "additive", omega_scale: float = 1.0, **sigma):
    om = {k: v * omega_scale for k, v in TRUTH["omega"].items()}
    sig = sigma or ({"add": 0.5} if error == "additive" else {"prop": 0.2})
    return nlmefit.library.get("1cmt_oral", error=error, theta=TRUTH["theta"], omega=om, sigma=sig)


def dataset(m, times, n_subjects: int, seed: int, n: int = 1, **kw) -> pd.DataFrame:
    df = nlmefit.simulate(m, None, times=times, doses=DOSE, n_subjects=n_subjects, seed=seed, n=n, **kw)
    return df.drop(columns="REP") if n == 1 else df


def at_truth(m, df):
    """A FitResult at the model's initial values (the truth): no iterations, no covariance step."""
    return nlmefit.fit(m, df, method="focei", maxiter=0, covariance=None)


def censor(df: pd.DataFrame, q: float = 0.25) -> tuple[pd.DataFrame, float]:
    """M3 records: DV below the q-quantile of the observations becomes CENS = 1 with DV = LLOQ."""
    obs = df["EVID"] == 0
    lloq = float(np.quantile(df.loc[obs, "DV"], q))
    out = df.copy()
    out["CENS"] = (obs & (out["DV"] < lloq)).astype(int)
    out.loc[out["CENS"] == 1, "DV"] = lloq
    return out, lloq


@pytest.fixture(scope="module")
def fit_npde():
    m = model()
    return at_truth(m, dataset(m, T_NPDE, 50, seed=1))


@pytest.fixture(scope="module")
def fit_vpc():
    m = model()
    return at_truth(m, dataset(m, T_VPC, 200, seed=2))


@pytest.fixture(scope="module")
def fit_cens():
    m = model()
    df, lloq = censor(dataset(m, T_VPC, 100, seed=3))
    return at_truth(m, df), lloq


# ---------------------------------------------------------------------------------------------------- replicates
def test_replicates_shape_mask_seed_chunks(fit_npde):
    y = simulate_replicates(fit_npde, 30, seed=5)
    mask = fit_npde.data.mask.numpy()
    assert y.shape == (30, *mask.shape)
    assert np.isfinite(y[:, mask]).all() and np.isnan(y[:, ~mask]).all()
    np.testing.assert_array_equal(y, simulate_replicates(fit_npde, 30, seed=5, chunk=7))  # chunk-invariant
    assert not np.allclose(y[:, mask], simulate_replicates(fit_npde, 30, seed=6)[:, mask])
    ipred = simulate_replicates(fit_npde, 30, seed=5, residual=False)
    assert np.isfinite(ipred[:, mask]).all() and (ipred[:, mask] > 0).all()  # concentrations without noise
    y2, blq = simulate_replicates(fit_npde, 30, seed=5, return_blq=True)
    np.testing.assert_array_equal(y, y2)
    assert blq.dtype == bool and not blq.any()  # no censoring in these data
    _, blq = simulate_replicates(fit_npde, 30, seed=5, return_blq=True, lloq=1.0)
    assert blq.any() and not blq[:, ~mask].any()


def test_replicates_other_data_and_missing_model(fit_npde, tmp_path):
    other = dataset(fit_npde.model, [1, 2], 4, seed=9)
    assert simulate_replicates(fit_npde, 3, data=other).shape == (3, 4, 2)
    path = tmp_path / "fit.json"
    fit_npde.to_json(path)
    loaded = nlmefit.FitResult.from_json(path, restore_model=False)
    with pytest.raises(ValueError, match="no model"):
        simulate_replicates(loaded, 3)
    with_model = nlmefit.FitResult.from_json(path, model=fit_npde.model)
    with pytest.raises(ValueError, match="no data"):
        npde(with_model, 100)
    assert simulate_replicates(with_model, 3, data=other).shape == (3, 4, 2)


def test_observation_lloq(fit_cens):
    fit, lloq = fit_cens
    lim = observation_lloq(fit.data)
    mask = fit.data.mask.numpy()
    np.testing.assert_allclose(lim[mask], lloq)
    assert np.isnan(lim[~mask]).all()
    np.testing.assert_allclose(observation_lloq(fit.data, 2.5)[mask], 2.5)


# ---------------------------------------------------------------------------------------------------- NPDE
def test_npde_table_lines_up_with_predictions(fit_npde):
    res = npde(fit_npde, n_rep=200, seed=0)
    pred = fit_npde.predictions
    pd.testing.assert_frame_equal(res.table[["ROW", "ID", "TIME", "DV"]], pred[["ROW", "ID", "TIME", "DV"]])
    np.testing.assert_allclose(res.table["PRED"], pred["PRED"], rtol=1e-10)
    assert np.isfinite(res.table[["PD", "PDE", "NPD", "NPDE"]].to_numpy()).all()
    k = res.n_rep
    assert res.table["PDE"].between(1 / (2 * k), 1 - 1 / (2 * k)).all()
    again = npde(fit_npde, n_rep=200, seed=0)
    pd.testing.assert_frame_equal(res.table, again.table)  # seeded
    no_dec = npde(fit_npde, n_rep=200, seed=0, decorrelate=False)
    np.testing.assert_allclose(no_dec.table["NPDE"], no_dec.table["NPD"])
    np.testing.assert_allclose(no_dec.table["PD"], res.table["PD"])  # pd do not depend on the decorrelation


def test_npde_tests_frame():
    rng = np.random.default_rng(0)
    t = npde_tests(rng.standard_normal(400))
    assert list(t.index) == ["mean", "variance", "normality", "global"]
    assert t.loc["normality", "test"] == "Shapiro-Wilk"
    assert t.loc["global", "p_value"] == pytest.approx(min(1.0, 3 * t["p_value"].iloc[:3].min()))
    big = npde_tests(rng.standard_normal(6000))
    assert big.loc["normality", "test"] == "D'Agostino-Pearson"
    bad = npde_tests(1.5 * rng.standard_normal(400) + 0.3)
    assert bad.loc["global", "p_value"] < 1e-6


def test_npde_calibration_fast(fit_npde):
    """Global test at the truth over 20 replicated data sets: about 1 rejection expected at 5 %."""
    sims = dataset(fit_npde.model, T_NPDE, 50, seed=100, n=20)
    p = [npde(fit_npde, 1000, seed=r, data=sims[sims["REP"] == r + 1].drop(columns="REP")).tests()
         .loc["global", "p_value"] for r in range(20)]
    assert sum(x < 0.05 for x in p) <= 4


@pytest.mark.slow
def test_npde_calibration_slow():
    m = model()
    sims = dataset(m, T_NPDE, 50, seed=201, n=100)
    rejected = 0
    for r in range(100):
        fit = at_truth(m, sims[sims["REP"] == r + 1].drop(columns="REP"))
        rejected += npde(fit, 1000, seed=r).tests().loc["global", "p_value"] < 0.05
    assert 1 <= rejected <= 12


def test_npde_detects_misspecification():
    truth = model("proportional", prop=0.3)
    df = dataset(truth, T_NPDE, 50, seed=11)
    wrong = at_truth(model("additive", add=0.5), df)  # additive error where the data have proportional error
    assert npde(wrong, 1000, seed=0).tests().loc["global", "p_value"] < 1e-3
    wide = at_truth(model(omega_scale=4.0), dataset(model(), T_NPDE, 100, seed=12))  # Ω ×4
    tests = npde(wide, 1000, seed=0).tests()
    assert tests.loc["global", "p_value"] < 1e-3 and tests.loc["variance", "estimate"] < 0.9  # too wide a model


def test_npde_decorrelation():
    """Subjects with one design are i.i.d., so the J×J correlation of their npde estimates that of one subject's
    npde under the model: ≈ identity with decorrelation, clearly not without (IIV correlates a subject's pd)."""
    m = model()
    n = 400
    fit = at_truth(m, dataset(m, T_NPDE, n, seed=13))
    J = len(T_NPDE)
    z = npde(fit, 1000, seed=0).table["NPDE"].to_numpy().reshape(n, J)  # ROW order = subject, then time
    off = np.corrcoef(z.T)[np.triu_indices(J, 1)]
    assert np.abs(off).max() < 0.2 and abs(off.mean()) < 0.05
    zd = npde(fit, 1000, seed=0, decorrelate=False).table["NPDE"].to_numpy().reshape(n, J)
    assert np.corrcoef(zd.T)[np.triu_indices(J, 1)].max() > 0.5


def test_npde_censored(fit_cens):
    fit, lloq = fit_cens
    res = npde(fit, 1000, seed=0)
    t = res.table
    c = t["CENS"] == 1
    assert 0.15 < c.mean() < 0.35
    assert np.isfinite(t["NPDE"]).all()
    # "cdf" rule: a censored record's pd is drawn in (0, P(y_sim <= LLOQ)]
    assert (t.loc[c, "PD"] <= t.loc[c, "PD_LOQ"]).all() and (t.loc[c, "PD"] > 0).all()
    assert t.loc[~c, "PD_LOQ"].isna().all() and (t.loc[c, "PD_LOQ"] > 0.2).mean() > 0.5
    assert res.tests().loc["global", "p_value"] > 0.01
    omit = npde(fit, 1000, seed=0, censoring="omit").table
    assert omit.loc[c, ["PD", "NPDE"]].isna().all().all() and np.isfinite(omit.loc[~c, "NPDE"]).all()
    with pytest.raises(ValueError, match="censoring"):
        npde(fit, 100, censoring="m3")


# ---------------------------------------------------------------------------------------------------- VPC
def test_vpc_bins():
    x = np.repeat([0.5, 1, 2, 4, 8, 24], 5)
    np.testing.assert_allclose(vpc_bins(x), [0.5, 0.75, 1.5, 3, 6, 16, 24])
    rng = np.random.default_rng(0)
    nominal = np.repeat([0.25, 0.5, 1, 2, 3, 4, 6, 8, 10, 12, 16, 24], 20)
    actual = nominal * rng.uniform(0.95, 1.05, nominal.size)  # actual times around 12 nominal ones
    e = vpc_bins(actual)
    assert 8 <= len(e) - 1 <= 10 and e[0] == actual.min() and e[-1] == actual.max()
    counts = np.histogram(actual, e)[0]
    assert counts.min() >= 20 and counts.max() <= 60
    # no cluster of nominal times is split between two bins
    for t in np.unique(nominal):
        assert len(np.unique(np.searchsorted(e[1:-1], actual[nominal == t]))) == 1
    np.testing.assert_allclose(vpc_bins(actual, [0, 5, 30]), [0, 5, 30])
    assert len(vpc_bins(actual, 4)) == 5
    with pytest.raises(ValueError):
        vpc_bins(actual, [3, 1])


def test_vpc_tables_and_calibration(fit_vpc):
    res = vpc(fit_vpc, n_rep=500, seed=0)
    t = res.percentiles
    assert set(t.columns) >= {"strata", "bin", "x", "n", "pi", "obs", "sim_lo", "sim_median", "sim_hi"}
    assert len(t) == 3 * len(T_VPC) and res.blq is None
    assert (t["sim_lo"] <= t["sim_median"]).all() and (t["sim_median"] <= t["sim_hi"]).all()
    assert res.coverage() >= 0.85
    pd.testing.assert_frame_equal(res.observed[["ROW", "ID", "TIME", "DV"]],
                                  fit_vpc.predictions[["ROW", "ID", "TIME", "DV"]])
    np.testing.assert_allclose(res.observed["PRED"], fit_vpc.predictions["PRED"], rtol=1e-10)
    pc = vpc(fit_vpc, n_rep=500, seed=0, pred_corrected=True)
    assert pc.coverage() >= 0.85
    # every subject shares the design, so PRED is constant within a bin and the correction is the identity
    np.testing.assert_allclose(pc.observed["Y"], pc.observed["DV"], rtol=1e-10)


@pytest.mark.slow
def test_vpc_calibration_slow():
    m = model()
    sims = dataset(m, T_VPC, 100, seed=300, n=20)
    cov = [vpc(at_truth(m, sims[sims["REP"] == r + 1].drop(columns="REP")), 500, seed=r).coverage()
           for r in range(20)]
    assert np.mean(cov) >= 0.85


def test_vpc_detects_misspecification():
    df = dataset(model(), T_VPC, 100, seed=21)
    wide = at_truth(model(omega_scale=4.0), df)
    assert vpc(wide, 300, seed=0).coverage() < 0.7
    wrong = at_truth(model("additive", add=0.5), dataset(model("proportional", prop=0.3), T_VPC, 100, seed=22))
    assert vpc(wrong, 300, seed=0).coverage() < 0.85


def test_vpc_censored(fit_cens):
    fit, lloq = fit_cens
    res = vpc(fit, 500, seed=0)
    b = res.blq
    assert b is not None and len(b) == len(T_VPC)
    assert b["obs"].iloc[0] > 0.3  # the early samples are mostly below the limit
    inside = (b["obs"] >= b["sim_lo"]) & (b["obs"] <= b["sim_hi"])
    assert inside.mean() >= 0.8
    obs_frac = (fit.data.cens.numpy()[fit.data.mask.numpy()] == 1).mean()
    assert np.average(b["obs"], weights=b["n"]) == pytest.approx(obs_frac)
    t = res.percentiles
    low = t[(t["pi"] == 0.05) & (t["bin"] == 0)]
    assert low["obs"].isna().all()  # the observed 5th percentile of the first bin is below the LLOQ: not drawn
    assert (t["obs"].dropna() >= lloq).all()
    assert res.coverage() >= 0.8


def test_vpc_stratified_tad_and_validation(fit_npde):
    m = fit_npde.model
    cov = pd.DataFrame({"SEX": np.arange(40) % 2})
    df = dataset(m, T_NPDE, 40, seed=31, covariates=cov)
    fit = at_truth(m, df)
    res = vpc(fit, 100, seed=0, stratify="SEX", idv="TAD")
    assert set(res.percentiles["strata"]) == {"SEX=0", "SEX=1"}
    assert res.idv == "TAD"
    # a user LLOQ on uncensored data: observed and simulated values below it are censored
    low = vpc(fit, 100, seed=0, lloq=1.0)
    dv = low.observed["DV"]
    assert low.blq is not None and low.observed["BLQ"].equals(dv < 1.0)
    assert (low.percentiles["obs"].dropna() >= 1.0).all()
    with pytest.raises(ValueError, match="covariate"):
        vpc(fit, 10, stratify="WT")
    with pytest.raises(ValueError, match="pi"):
        vpc(fit, 10, pi=(0.05, 1.5))


# ---------------------------------------------------------------------------------------------------- plots
def _png(fig, path) -> None:
    fig.savefig(path, dpi=60)
    plt.close(fig)
    assert path.stat().st_size > 1000


def test_plots_render(fit_npde, fit_cens, tmp_path):
    assert matplotlib.get_backend().lower() == "agg"
    _png(plot_npde(npde(fit_npde, 200, seed=0)), tmp_path / "npde.png")
    fit, _ = fit_cens
    _png(npde(fit, 200, seed=0).plot(), tmp_path / "npde_cens.png")
    _png(plot_vpc(vpc(fit_npde, 100, seed=0)), tmp_path / "vpc.png")
    _png(plot_vpc(vpc(fit_npde, 100, seed=0, pred_corrected=True), log_y=True), tmp_path / "pcvpc.png")
    res = vpc(fit, 100, seed=0)
    fig = plot_vpc(res)
    assert len(fig.axes) == 2  # main panel + BLQ fraction panel
    _png(fig, tmp_path / "vpc_cens.png")
    fig, ax = plt.subplots()
    assert plot_vpc(res, ax=ax) is fig
    _png(fig, tmp_path / "vpc_ax.png")
