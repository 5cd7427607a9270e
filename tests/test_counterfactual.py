"""Counterfactual regimens: the sanity identities (steady-state AUC_τ = F·Dose/CL, superposition, Ω = 0 gives
the typical profile), per-subject counterfactuals against the exact posterior mean, mg/kg dosing, PTA, plots."""
import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import nlmefit  # noqa: E402
from nlmefit.marginal import laplace_posterior  # noqa: E402
from nlmefit.posteriors import seeded  # noqa: E402
from nlmefit.simulation import plot_pta  # noqa: E402

THETA = {"cl": 2.0, "v": 30.0, "ka": 1.2}
OMEGA = {"cl": 0.09, "v": 0.04, "ka": 0.09}


def _oral():
    return nlmefit.library.get("1cmt_oral", theta=THETA, omega=OMEGA, sigma={"add": 0.1})


@pytest.fixture(scope="module")
def theo_fit():
    return nlmefit.fit(nlmefit.library.get("1cmt_oral", error="additive"), nlmefit.datasets.load("theophylline"),
                       method="focei")


@pytest.mark.parametrize("name,regimen,params", [
    ("1cmt_oral", "320 mg po q12h x14", {}),
    ("2cmt_iv", "500 mg infusion over 1h q8h x9", {"q": 3.0, "vp": 40.0}),
    ("2cmt_oral", "100 mg po q24h x5", {"q": 3.0, "vp": 40.0}),
])
def test_steady_state_auc_over_tau_is_f_dose_over_cl(name, regimen, params):
    theta = {k: v for k, v in {**THETA, **params}.items() if k in nlmefit.library.get(name).parameters.theta}
    model = nlmefit.library.get(name, theta=theta, omega={"cl": 0.09, "v": 0.04})
    sim = nlmefit.simulate_regimens(None, regimen, model=model, population=200, steady_state=True, seed=2)
    dose = sim.regimens[0].dose_times()[-1, 1]
    np.testing.assert_allclose(sim.exposures["AUCTAU"], dose / sim.parameters["cl"], rtol=1e-6)
    tau = sim.regimens[0].last_interval()
    np.testing.assert_allclose(sim.exposures["AUC24"], dose * 24 / tau / sim.parameters["cl"], rtol=1e-6)
    assert (sim.exposures["AUC_METHOD"] == "quadrature").all()


def test_superposition_of_single_doses_equals_the_multiple_dose_profile():
    model = _oral()
    t = np.linspace(0, 60, 121)
    multi = nlmefit.simulate_regimens(None, "100 mg po q12h x4", model=model, population=30, times=t, seed=5)
    shifts = [0.0, 12.0, 24.0, 36.0]
    grid = np.unique(np.concatenate([t - s for s in shifts]))
    grid = grid[grid >= 0]
    single = nlmefit.simulate_regimens(None, "100 mg po once", model=model, population=30, times=grid, seed=5,
                                       interval=(0, 60))
    total = np.zeros_like(multi.profiles[0])
    for s in shifts:
        ok = t - s >= 0
        idx = np.searchsorted(grid, t[ok] - s)
        total[:, ok] += single.profiles[0][:, idx]
    np.testing.assert_allclose(multi.profiles[0], total, rtol=1e-10, atol=1e-12)


def test_without_variability_every_virtual_subject_is_the_typical_profile():
    model = _oral()
    truth = {**THETA, "omega_cl": 0.0, "omega_v": 0.0, "omega_ka": 0.0, "sigma_add": 0.1}
    sim = nlmefit.simulate_regimens(None, ["100 mg po q12h x4", "200 mg po q24h x2"], model=model, params=truth,
                                    population=50, seed=1)
    typical = nlmefit.simulate_regimens(None, ["100 mg po q12h x4", "200 mg po q24h x2"], model=model,
                                        params=truth, population=1, seed=9)
    np.testing.assert_array_equal(sim.profiles, np.broadcast_to(typical.profiles, sim.profiles.shape))
    noisy = nlmefit.simulate_regimens(None, "100 mg po q12h x4", model=model, params=truth, population=50,
                                      seed=1, residual=True)
    assert noisy.profiles.std(axis=1).max() > 0.05  # residual error switches on


def test_observed_subject_counterfactual_reproduces_its_posterior_mean(theo_fit):
    """Subject 1 re-simulated under its own dose at its own times, residual error off: the mean over posterior
    draws (sampling-importance-resampling) equals E[f | y_1] from an independent importance sample within 5 MC
    standard errors."""
    df = nlmefit.datasets.load("theophylline")
    sub = df[df["ID"] == 1]
    amt = float(sub.loc[sub["AMT"] > 0, "AMT"].iloc[0])
    times = sub.loc[sub["EVID"] == 0, "TIME"].to_numpy()
    sim = nlmefit.simulate_regimens(theo_fit, f"{amt} mg po once", subjects=[1], n_draws=4000, times=times,
                                    posterior="is", seed=3, interval=(0, float(times.max())))
    mean = sim.profiles[0].mean(0)
    sd = sim.profiles[0].std(0)
    # independent E[f | y_1]: self-normalised IS with a different seed
    model, data = theo_fit.model, theo_fit.data
    p = model.parameters.params_from_dict(theo_fit.estimates.to_dict())
    prop = laplace_posterior(model, p, data, df=4.0)
    with seeded(11):
        eta = prop.sample((20000,))
    with torch.no_grad():
        lw = model.log_lik(p, eta, data) + model.log_prior(p, eta) - prop.log_prob(eta)
        w = torch.softmax(lw[:, 0], 0)
        f, _ = model.predict(p, eta, data)
    obs = data.mask[0]
    exact = (w[:, None] * f[:, 0, :]).sum(0)[obs].numpy()
    np.testing.assert_allclose(mean, exact, atol=5 * sd.max() / np.sqrt(4000 / 4))
    ipred = theo_fit.predictions.loc[theo_fit.predictions["ID"] == 1, "IPRED"].to_numpy()
    assert np.max(np.abs(mean - ipred)) < 0.1 * ipred.max()  # the mode-based IPRED is close, not equal


def test_observed_subjects_keep_their_covariates_and_mg_per_kg_scales_with_weight():
    from nlmefit.models.examples import pheno_real

    fit = nlmefit.fit(pheno_real(), nlmefit.datasets.load("pheno"), method="focei", covariance=None)
    sim = nlmefit.simulate_regimens(fit, "5 mg/kg iv q12h x4", subjects=[1, 2, 3], n_draws=5, weight_col="WGT",
                                    seed=1, posterior="laplace")
    wgt = fit.data.panel.covariates[:3, list(fit.data.panel.covariate_names).index("WGT")]
    np.testing.assert_allclose(sim.covariates["WGT"].to_numpy(), np.repeat(wgt, 5))
    total = 4 * 5 * sim.covariates["WGT"].to_numpy()
    np.testing.assert_allclose(sim.exposures["AUC_INF"], total / sim.parameters["cl"], rtol=1e-12)
    assert list(sim.exposures["ID"][:6]) == [1] * 5 + [2]


def test_population_resamples_covariates_and_parameter_uncertainty_widens(theo_fit):
    base = nlmefit.simulate_regimens(theo_fit, "320 mg po q12h x4", population=3000, seed=4)
    unc = nlmefit.simulate_regimens(theo_fit, "320 mg po q12h x4", population=3000, seed=4, uncertainty=True)
    assert unc.parameters["cl"].std() > base.parameters["cl"].std()
    q = base.quantiles()
    assert set(q.columns) == {"REGIMEN", "TIME", "q5", "q50", "q95"}
    assert (q["q5"] <= q["q50"]).all() and (q["q50"] <= q["q95"]).all()


def test_pta_and_figures(tmp_path):
    model = _oral()
    regs = ["50 mg po q12h x10", "100 mg po q12h x10", "200 mg po q12h x10"]
    sim = nlmefit.simulate_regimens(None, regs, model=model, population=400, seed=1, threshold=2.0,
                                    steady_state=True)
    tab = sim.pta("AUC", 40.0)
    auc = sim.exposures.pivot(columns="REGIMEN", values="AUC")
    for _, row in tab.iterrows():
        assert row["PTA"] == pytest.approx(np.mean(auc[row["REGIMEN"]].dropna() >= 40.0))
    assert tab["PTA"].is_monotonic_increasing  # more drug, more attainment
    mic = sim.pta("AUC", 100.0, mic=[0.25, 0.5, 1, 2])
    assert len(mic) == 12 and mic.groupby("REGIMEN")["PTA"].apply(lambda s: s.is_monotonic_decreasing).all()
    win = sim.pta("CTROUGH", window=(1.0, 4.0))
    assert ((win["PTA"] >= 0) & (win["PTA"] <= 1)).all()
    assert ((sim.exposures["FT_ABOVE_PCT"] >= 0) & (sim.exposures["FT_ABOVE_PCT"] <= 100)).all()
    for k, fig in enumerate([sim.plot_profiles(), sim.plot_exposures("CMAX"), plot_pta(mic), plot_pta(tab)]):
        path = tmp_path / f"f{k}.png"
        fig.savefig(path)
        assert path.stat().st_size > 3000


def test_bad_requests_are_refused(theo_fit):
    with pytest.raises(nlmefit.ModelSpecError, match="exactly one"):
        nlmefit.simulate_regimens(theo_fit, "100 mg po once", population=10, subjects="observed")
    with pytest.raises(nlmefit.ModelSpecError, match="not among"):
        nlmefit.simulate_regimens(theo_fit, "100 mg po q12h x2", subjects=[999])
    with pytest.raises(nlmefit.ModelSpecError, match="posterior draws"):
        nlmefit.simulate_regimens(theo_fit, "100 mg po q12h x2", subjects="observed", posterior="draws")
    with pytest.raises(nlmefit.ModelSpecError, match="per kg"):
        nlmefit.simulate_regimens(theo_fit, "5 mg/kg po q12h x2", population=5, weight_col="BW")
    with pytest.raises(nlmefit.ModelSpecError):
        nlmefit.simulate_regimens(theo_fit, "100 mg every now and then", population=5)
    with pytest.raises(nlmefit.ModelSpecError, match="interval"):
        nlmefit.simulate_regimens(theo_fit, "100 mg po q12h x2", population=5, interval=(5, 1))


def test_ode_models_take_the_general_path():
    """Michaelis–Menten with KM far above the concentrations is linear with CL = VM/KM: the ODE regimen
    simulation must agree with the closed form to the size of that nonlinearity (C/KM ≲ 0.5 %)."""
    mm = nlmefit.library.get("1cmt_oral_mm", theta={"vm": 2000.0, "km": 1000.0, "v": 30.0, "ka": 1.2},
                             omega={"v": 0.04})
    lin = nlmefit.library.get("1cmt_oral", theta={"cl": 2.0, "v": 30.0, "ka": 1.2}, omega={"v": 0.04})
    t = np.linspace(0, 48, 49)
    a = nlmefit.simulate_regimens(None, "100 mg po q12h x4", model=mm, population=4, times=t, seed=2)
    b = nlmefit.simulate_regimens(None, "100 mg po q12h x4", model=lin, population=4, times=t, seed=2)
    assert np.all(np.isfinite(a.profiles))
    np.testing.assert_allclose(a.profiles, b.profiles, rtol=0.01, atol=1e-3)
