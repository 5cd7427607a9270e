"""Estimator contract (every method × a few models) and robustness / simulate-and-recover checks."""
import math

import numpy as np
import pandas as pd
import pytest
import torch

import nlmefit
from nlmefit.models.examples import pheno_real
from nlmefit.results import FitResult

METHODS = ["fo", "foce", "focei", "laplace"]


@pytest.fixture(scope="module")
def theo():
    return nlmefit.datasets.load("theophylline")


@pytest.mark.parametrize("method", METHODS)
def test_contract_shapes_gradients_json(method, theo, tmp_path):
    model = nlmefit.library.get("1cmt_oral", error="combined2", theta={"cl": 2.8, "v": 32.0, "ka": 1.5},
                                sigma={"add": 0.5, "prop": 0.1})
    res = nlmefit.fit(model, theo, method=method, seed=1)
    assert isinstance(res, FitResult) and res.method == method
    assert np.isfinite(res.ofv) and res.n_subjects == 12 and res.n_obs == 132
    assert res.loglik == pytest.approx(-(res.ofv + 132 * math.log(2 * math.pi)) / 2)
    assert res.aic == pytest.approx(-2 * res.loglik + 2 * res.n_estimated)
    assert res.n_estimated == 8
    s = res.summary()
    assert list(s.columns)[:6] == ["estimate", "se", "rse_pct", "ci_low", "ci_high", "fixed"]
    assert res.omega.shape == (3, 3)
    p = res.predictions
    assert len(p) == 132 and p["ROW"].is_monotonic_increasing
    assert {"PRED", "IPRED", "RES", "WRES", "CWRES", "IWRES"} <= set(p.columns)
    assert res.individual_estimates.shape[0] == 12
    res.to_json(tmp_path / "r.json")
    back = FitResult.from_json(tmp_path / "r.json")
    pd.testing.assert_series_equal(back.estimates, res.estimates)
    pd.testing.assert_series_equal(back.se, res.se)
    assert back.ofv == res.ofv and back.aic == res.aic
    pd.testing.assert_frame_equal(back.predictions, res.predictions, check_dtype=False)


def test_gradient_matches_finite_differences(theo):
    """The exact outer gradient (implicit-function step) equals central differences of the OFV."""
    model = nlmefit.library.get("1cmt_oral", error="combined2", theta={"cl": 2.5, "v": 30.0, "ka": 1.2},
                                sigma={"add": 0.3, "prop": 0.2})
    est = nlmefit.get_estimator("focei")
    data = model.prepare(theo)
    pset = model.parameters
    u0 = pset.to_unconstrained(pset.initial()).detach()
    eta = torch.zeros(12, 3, dtype=torch.float64)

    def f(u):
        return est.evaluate(model, pset.from_unconstrained(u), data, eta)[0]

    u = u0.clone().requires_grad_(True)
    est.evaluate(model, pset.from_unconstrained(u), data, eta, backward_to=u)
    h = 1e-5
    fd = [(f(u0 + h * e) - f(u0 - h * e)) / (2 * h) for e in torch.eye(len(u0), dtype=torch.float64)]
    np.testing.assert_allclose(u.grad.numpy(), fd, rtol=1e-5, atol=1e-5)


def test_seed_determinism_and_no_mutation(theo):
    before = theo.copy()
    model = nlmefit.library.get("1cmt_oral")
    a = nlmefit.fit(model, theo, method="fo", seed=3, covariance=None)
    b = nlmefit.fit(model, theo, method="fo", seed=3, covariance=None)
    assert a.ofv == b.ofv
    pd.testing.assert_frame_equal(theo, before)


def test_non_pd_r_matrix_reported_not_patched(theo):
    """Far above its optimum the OFV is concave in a variance (n·log ω + S/ω has negative curvature for
    ω > 2S/n), so R is indefinite there: the result must say so and report no SEs."""
    model = nlmefit.library.get("1cmt_oral", theta={"cl": 2.8, "v": 32.0, "ka": 1.5},
                                omega={"cl": 50.0, "v": 0.02, "ka": 0.4}, sigma={"add": 0.7})
    with pytest.warns(UserWarning, match="covariance step failed: R matrix is not positive definite"):
        res = nlmefit.fit(model, theo, method="focei", maxiter=0)
    assert not res.covariance_ok
    assert res.se.isna().all()
    assert "not positive definite" in res.covariance_message


def _robustness(model_fn, df, n_starts, seed):
    rng = np.random.default_rng(seed)
    ref = nlmefit.fit(model_fn(), df, method="focei", covariance=None)
    base = ref.estimates
    ofvs = []
    for _ in range(n_starts):
        init = {}
        for name, value in base.items():
            if name.startswith(("theta", "sigma_")) or name in ref.theta.index or name.startswith("omega_"):
                if name.startswith("omega_") and "_" in name[6:] and name[6:] not in ref.eta_names:
                    continue
                init[name] = value * (1 + rng.uniform(-0.5, 0.5))
        r = nlmefit.fit(model_fn(), df, method="focei", covariance=None, init=init)
        ofvs.append(r.ofv)
    ok = sum(abs(o - ref.ofv) <= 0.01 for o in ofvs)
    return ok, ref.ofv, ofvs


@pytest.mark.parametrize("case", ["theo", "pheno"])
def test_robust_to_starting_values_fast(case):
    """Fast version (4 starts) of the 20-start robustness check (tests marked slow)."""
    if case == "theo":
        ok, _, ofvs = _robustness(lambda: nlmefit.library.get("1cmt_oral"), nlmefit.datasets.load("theophylline"),
                                  4, 11)
    else:
        ok, _, ofvs = _robustness(pheno_real, nlmefit.datasets.load("pheno"), 4, 12)
    assert ok == 4, ofvs


@pytest.mark.slow
@pytest.mark.parametrize("case", ["theo", "pheno"])
def test_robust_to_starting_values_20_starts(case):
    if case == "theo":
        ok, _, ofvs = _robustness(lambda: nlmefit.library.get("1cmt_oral"), nlmefit.datasets.load("theophylline"),
                                  20, 21)
    else:
        ok, _, ofvs = _robustness(pheno_real, nlmefit.datasets.load("pheno"), 20, 22)
    assert ok >= 19, ofvs


def _recover(structure, n, truth_theta, truth_omega, seed, times):
    model = nlmefit.library.get(structure, error="proportional", theta=truth_theta, omega=truth_omega,
                                sigma={"prop": 0.15})
    truth = dict(truth_theta, **{f"omega_{k}": v for k, v in truth_omega.items()}, sigma_prop=0.15)
    df = nlmefit.simulate(model, truth, times=times, doses=[{"TIME": 0.0, "AMT": 100.0, "CMT": 1}],
                          n_subjects=n, seed=seed).drop(columns="REP")
    start = nlmefit.library.get(structure, error="proportional",
                                theta={k: v * 1.3 for k, v in truth_theta.items()},
                                omega={k: 0.1 for k in truth_omega}, sigma={"prop": 0.3})
    res = nlmefit.fit(start, df, method="focei")
    assert res.converged and res.covariance_ok
    z = ((res.estimates[list(truth)] - pd.Series(truth)) / res.se[list(truth)]).abs()
    return z


def test_simulate_and_recover_1cmt_fast():
    z = _recover("1cmt_oral", 60, {"cl": 2.0, "v": 30.0, "ka": 1.2}, {"cl": 0.09, "v": 0.04, "ka": 0.16}, 5,
                 [0.25, 0.5, 1, 2, 4, 6, 8, 12, 24])
    assert (z < 3).all(), z


@pytest.mark.slow
def test_simulate_and_recover_2cmt_oral_200():
    z = _recover("2cmt_oral", 200, {"cl": 4.0, "v": 70.0, "q": 4.0, "vp": 50.0, "ka": 1.0},
                 {"cl": 0.09, "v": 0.09, "q": 0.09, "vp": 0.09, "ka": 0.09}, 7,
                 [0.25, 0.5, 1, 2, 3, 4, 6, 8, 12, 24, 36, 48, 72])
    assert (z < 3).all(), z


def test_predict_new_data_matches_fitted_predictions(theo):
    res = nlmefit.fit(nlmefit.library.get("1cmt_oral"), theo, method="focei", covariance=None)
    new = res.predict(theo, individual=True)
    np.testing.assert_allclose(new["PRED"], res.predictions["PRED"], rtol=1e-10)
    np.testing.assert_allclose(new["IPRED"], res.predictions["IPRED"], rtol=1e-8)
    # a counterfactual: double the dose doubles the population prediction (linear model)
    doubled = theo.assign(AMT=theo["AMT"] * 2)
    np.testing.assert_allclose(res.predict(doubled)["PRED"], 2 * res.predictions["PRED"], rtol=1e-10)
    back = FitResult.from_dict(res.to_dict())
    with pytest.raises(ValueError, match="no model"):
        back.predict(theo)
