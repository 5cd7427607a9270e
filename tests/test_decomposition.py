"""The per-subject Q_i/KL_i decomposition and the one-step-ahead predictive log-likelihood.

Outside truths: the linear-Gaussian model's closed forms (marginal, posterior, Gaussian conditionals), AGQ on
theophylline and pheno (the chain rule Σ_j log p(y_j | y_<j) = log p(y_i)), the exact (AGQ-normalised) posterior
for which the gap vanishes, and the convexity of the KL for the aggregate posterior."""
import linear_gaussian as lg
import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import multivariate_normal

import nlmefit
from nlmefit.diagnostics import (
    Decomposition,
    decomposition,
    exact_posterior,
    one_step_ahead,
    plot_aggregate_posterior,
    plot_one_step,
    plot_q_kl,
)
from nlmefit.diagnostics.decomposition import fit_parts
from nlmefit.marginal import agq_m2ll, laplace_posterior
from nlmefit.models.examples import pheno_real

COLUMNS = ["ID", "q", "kl", "kl_se", "elbo", "loglik", "loglik_se", "gap"]


@pytest.fixture(scope="module")
def line():
    df = lg.data()
    return df, nlmefit.fit(lg.model(), df, method="laplace", maxiter=0, covariance=None)


@pytest.fixture(scope="module")
def theo():
    return nlmefit.fit(nlmefit.library.get("1cmt_oral"), nlmefit.datasets.load("theophylline"), method="focei",
                       covariance=None)


@pytest.fixture(scope="module")
def pheno():
    return nlmefit.fit(pheno_real(), nlmefit.datasets.load("pheno"), method="focei", covariance=None)


def _agq_loglik(fit, n_nodes: int) -> np.ndarray:
    """log p(y_i) by AGQ at the full-data modes (the reference of the chain rule)."""
    model, p, data = fit_parts(fit)
    lap = laplace_posterior(model, p, data)
    return (-0.5 * agq_m2ll(model, p, data, lap.loc, n_nodes)).detach().numpy()


# ---------------------------------------------------------------- linear-Gaussian: everything exact
def test_linear_gaussian_decomposition_is_exact(line):
    df, fit = line
    mean, cov = lg.posterior(df)
    np.testing.assert_allclose(fit.posterior.loc.numpy(), mean, atol=1e-8)  # Laplace = exact posterior
    np.testing.assert_allclose(fit.posterior.covariance_matrix.numpy(), cov, atol=1e-8)
    d = decomposition(fit, proposal="laplace", n_samples=300)
    assert isinstance(d, Decomposition) and list(d.table.columns[:2]) == ["ID", "q"]
    assert set(COLUMNS) <= set(d.table.columns) and d.kl_method == "closed form"
    exact = lg.exact_loglik(df)
    np.testing.assert_allclose(d.table["loglik"], exact, atol=1e-8)
    np.testing.assert_allclose(d.table["elbo"], exact, atol=1e-8)
    assert d.table["gap"].abs().max() < 1e-8
    # KL(N(m, C) ‖ N(0, Ω)) by hand
    P = np.linalg.inv(lg.OMEGA)
    kl = [0.5 * (np.trace(P @ C) + m @ P @ m - 2 + np.log(np.linalg.det(lg.OMEGA) / np.linalg.det(C)))
          for m, C in zip(mean, cov)]
    np.testing.assert_allclose(d.table["kl"], kl, atol=1e-10)
    np.testing.assert_allclose(d.table["q"], d.table["elbo"] + d.table["kl"], atol=1e-12)
    assert d.table["q_se"].max() < 1e-8  # control variate: zero variance at the exact posterior


def test_linear_gaussian_one_step_ahead_is_the_gaussian_conditional(line):
    df, fit = line
    osa = one_step_ahead(fit, method="agq", n_nodes=1)  # one node: Laplace, exact for a Gaussian integrand
    expected = []
    for _, g in df.groupby("ID", sort=True):  # log p(y_j | y_<j) from the joint Gaussian of y_i
        X = np.column_stack([np.ones(len(g)), g["TIME"].to_numpy()])
        mu = X @ np.array([lg.THETA["ta"], lg.THETA["tb"]])
        S = X @ lg.OMEGA @ X.T + lg.SIGMA ** 2 * np.eye(len(g))
        y = g["DV"].to_numpy()
        for j in range(len(g)):
            full = multivariate_normal(mu[:j + 1], S[:j + 1, :j + 1]).logpdf(y[:j + 1])
            expected.append(full - (multivariate_normal(mu[:j], S[:j, :j]).logpdf(y[:j]) if j else 0.0))
    np.testing.assert_allclose(osa.table["logp"], expected, atol=1e-8)
    np.testing.assert_allclose(osa.per_subject["logp"], lg.exact_loglik(df), atol=1e-8)
    assert osa.total == pytest.approx(lg.exact_loglik(df).sum(), abs=1e-8)
    isa = one_step_ahead(fit, method="is", n_samples=2000, seed=0)
    z = (isa.per_subject["logp"] - lg.exact_loglik(df)) / isa.per_subject["se"]
    assert z.abs().max() < 3
    assert list(isa.table.columns[:3]) == ["ID", "TIME", "j"] and "logp" in isa.table


# ---------------------------------------------------------------- chain rule on theo and pheno
@pytest.mark.parametrize("name", ["theo", "pheno"])
def test_chain_rule_agq_and_is(name, request):
    fit = request.getfixturevalue(name)
    ref = _agq_loglik(fit, 7)
    agq = one_step_ahead(fit, method="agq", n_nodes=7)
    err = np.abs(agq.per_subject["logp"].to_numpy() - ref)
    assert err.max() < 0.01
    assert agq.table.groupby("ID", sort=False)["logp"].sum().to_numpy() == pytest.approx(ref, abs=0.01)
    isa = one_step_ahead(fit, method="is", n_samples=2000 if name == "theo" else 1000, seed=0)
    z = (isa.per_subject["logp"].to_numpy() - ref) / isa.per_subject["se"].to_numpy()
    assert np.abs(z).max() < 3, np.abs(z).max()
    assert len(isa.table) == fit.data.n_obs and np.isfinite(isa.table["logp"]).all()
    # the first observation of each subject is scored by the prior predictive
    first = isa.table["j"] == 1
    assert (np.abs(isa.table["logp"][first] - agq.table["logp"][first]) < 4 * isa.table["se"][first] + 1e-9).all()


# ---------------------------------------------------------------- Q − KL and the gap on theo
def test_exact_posterior_closes_the_gap_and_laplace_leaves_a_nonnegative_one(theo):
    model, p, data = fit_parts(theo)
    ref = _agq_loglik(theo, 9)
    exact = decomposition(theo, posterior=exact_posterior(model, p, data, n_nodes=9), n_samples=1000,
                          n_is=4000, seed=1)
    t = exact.table
    assert exact.kl_method == "monte carlo"
    np.testing.assert_allclose(t["q"] - t["kl"], t["elbo"], atol=1e-10)
    np.testing.assert_allclose(t["elbo"], ref, atol=1e-8)  # Q − KL = log p(y_i) draw by draw
    assert (np.abs(t["gap"]) <= 3 * t["gap_se"] + 1e-3).all()
    assert (np.abs(t["loglik"] - ref) <= 3 * t["loglik_se"] + 1e-3).all()
    lap = decomposition(theo, n_samples=1000, n_is=4000, seed=1)  # the fit's Laplace posterior
    assert lap.posterior_kind == "laplace" and lap.kl_method == "closed form"
    assert (lap.table["gap"] >= -3 * lap.table["gap_se"]).all()
    assert lap.totals["gap"] > 0
    # Q differs from the exact posterior's, KL too, but both are close: Laplace is good on theo
    assert np.abs(lap.table["kl"] - t["kl"]).max() < 0.5


@pytest.mark.parametrize("name", ["theo", "pheno"])
def test_aggregate_kl_is_below_the_mean_kl_by_the_mutual_information(name, request):
    d = decomposition(request.getfixturevalue(name), n_samples=500, n_mixture=400, seed=2)
    a = d.aggregate
    assert a["mean_kl"] == pytest.approx(d.table["kl"].mean())
    assert a["mean_kl"] >= a["aggregate_kl"]
    assert 0 <= a["mutual_information"] <= a["log_n"]
    se = np.hypot(a["aggregate_kl_se"], a["mutual_information_se"])
    assert abs(a["mi_by_difference"] - a["mutual_information"]) < 3 * se
    assert d.mixture_draws.shape == (400, d.table.shape[0], len(d.eta_names))


# ---------------------------------------------------------------- every estimator's posterior
FITS = {
    "laplace": dict(maxiter=3),
    "agq": dict(n_nodes=3, maxiter=2),
    "saem": dict(n_explore=30, n_smooth=30, n_samples=200),
    "nuts": dict(num_chains=1, num_samples=40, warmup_steps=40),
    "vem": dict(max_steps=150, n_elbo=200, n_is=300),
    "vem-maf": dict(posterior="maf", max_steps=100, n_elbo=200, n_is=300),
}


@pytest.mark.filterwarnings("ignore:.*max_steps")
@pytest.mark.parametrize("method", ["focei", "laplace", "agq", "saem", "vem", "vem-maf",
                                    pytest.param("nuts", marks=pytest.mark.slow)])  # NUTS alone takes 15–25 s
def test_decomposition_runs_for_every_estimator(method, theo):
    df = nlmefit.datasets.load("theophylline")
    if method == "focei":
        fit = theo
    else:
        fit = nlmefit.fit(theo.model, df, method=method.split("-")[0], covariance=None,
                          init=theo.estimates.to_dict(), seed=1, **FITS[method])
    d = decomposition(fit, n_samples=300)
    t = d.table
    assert len(t) == df["ID"].nunique() and np.isfinite(t[COLUMNS[1:]].to_numpy()).all()
    np.testing.assert_allclose(t["gap"], t["loglik"] - t["elbo"])
    if method in ("saem", "nuts"):
        assert d.kl_method.startswith("moment-matched Gaussian")
        assert "draws" in d.q_method
    elif method == "vem":  # the fitted Gaussian family: closed-form KL, a proper bound
        assert d.kl_method == "closed form" and d.posterior_kind == "gaussian"
        assert (t["gap"] >= -3 * t["gap_se"]).all()
    elif method == "vem-maf":  # a flow: Monte-Carlo KL with its SE
        assert d.posterior_kind == "maf" and (t["kl_se"] > 0).all()
        assert (t["gap"] >= -3 * t["gap_se"] - 1e-9).all()
    else:
        assert d.kl_method == "closed form" and d.posterior_kind == "laplace"
        assert (t["gap"] >= -3 * t["gap_se"]).all()


# ---------------------------------------------------------------- IOV and M3
@pytest.fixture(scope="module")
def iov_m3():
    model = nlmefit.library.get("1cmt_oral", theta={"cl": 2.0, "v": 30.0, "ka": 1.2},
                                omega={"cl": 0.09, "v": 0.04, "ka": 0.09}, sigma={"add": 0.1}, iov={"cl": 0.04})
    from nlmefit.simulation import design_frame  # test helper only

    times = [0.5, 1, 2, 4, 8, 12]
    design = design_frame(times + [t + 48 for t in times],
                          [{"TIME": 0.0, "AMT": 30.0, "CMT": 1}, {"TIME": 48.0, "AMT": 30.0, "CMT": 1}], n_subjects=6)
    design["OCC"] = np.where(design["TIME"] < 48, 1, 2)
    truth = {"cl": 2.0, "v": 30.0, "ka": 1.2, "omega_cl": 0.09, "omega_v": 0.04, "omega_ka": 0.09,
             "sigma_add": 0.1, "omega_iov_cl": 0.04}
    sim = nlmefit.simulate(model, truth, design, seed=9).drop(columns="REP")
    obs = sim["EVID"] == 0
    below = obs & (sim["DV"] < 0.5)
    sim["CENS"] = below.astype(int)
    sim.loc[below, "DV"] = 0.5
    assert below.sum() > 0
    return nlmefit.fit(model, sim, method="laplace", maxiter=0, covariance=None)


def test_iov_and_censoring(iov_m3):
    fit = iov_m3
    model, p, data = fit_parts(fit)
    assert data.n_occ == 2 and data.q == 5
    d = decomposition(fit, n_samples=300)
    assert d.prior_cov.shape == (5, 5)
    np.testing.assert_allclose(d.prior_cov[3:, 3:], 0.04 * np.eye(2), atol=1e-6)  # the IOV blocks
    assert np.isfinite(d.table[COLUMNS[1:]].to_numpy()).all() and (d.table["kl"] > 0).all()
    assert (d.table["gap"] >= -3 * d.table["gap_se"]).all()
    ref = _agq_loglik(fit, 2)
    agq = one_step_ahead(fit, method="agq", n_nodes=2)  # 32 nodes: telescopes to the same rule's log p(y_i)
    np.testing.assert_allclose(agq.per_subject["logp"], ref, atol=1e-6)
    isa = one_step_ahead(fit, method="is", n_samples=1500, seed=0)
    ll = nlmefit.loglik(fit, "is", n_samples=4000, seed=5)
    z = (isa.per_subject["logp"] - ll.loglik_i) / np.hypot(isa.per_subject["se"], ll.se_i)
    assert np.abs(z).max() < 3
    cens_rows = data.cens.numpy()[data.mask.numpy()] != 0
    assert np.isfinite(isa.table["logp"].to_numpy()[cens_rows]).all()


def test_t_posterior_gets_monte_carlo_kl(theo):
    model, p, data = fit_parts(theo)
    t_post = laplace_posterior(model, p, data, df=5.0)
    d = decomposition(theo, posterior=t_post, n_samples=2000, seed=4)
    t = d.table
    assert d.kl_method == "monte carlo" and (t["kl_se"] > 0).all()
    np.testing.assert_allclose(t["q"] - t["kl"], t["elbo"], atol=1e-10)
    assert (t["gap"] >= -3 * t["gap_se"]).all()
    # the t's KL is close to its Gaussian's (same location and scale, heavier tails)
    lap = decomposition(theo, n_samples=200)
    assert np.abs(t["kl"] - lap.table["kl"]).max() < 1.0


# ---------------------------------------------------------------- figures
def test_figures(theo):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = decomposition(theo, n_samples=200, n_mixture=100)
    osa = one_step_ahead(theo, method="agq", n_nodes=3)
    for fig in (plot_q_kl(d), plot_aggregate_posterior(d), plot_one_step(osa, ids=[1, 5]), d.plot(),
                osa.plot()):
        assert isinstance(fig, matplotlib.figure.Figure)
        plt.close(fig)


def test_bad_requests(line):
    _, fit = line
    bare = decomposition(fit.replace(posterior=None), n_samples=50, proposal="laplace")  # as read from JSON
    assert bare.posterior_kind == "laplace" and bare.table["gap"].abs().max() < 1e-6
    with pytest.raises(ValueError, match="no model"):
        one_step_ahead(fit.replace(model=None))
    with pytest.raises(ValueError, match="method"):
        one_step_ahead(fit, method="vb")
    with pytest.raises(ValueError, match="proposal"):
        decomposition(fit, proposal="flow")
    with pytest.raises(ValueError, match="batch shape"):
        decomposition(fit, posterior=torch.distributions.MultivariateNormal(torch.zeros(2), torch.eye(2)))


# ---------------------------------------------------------------- slow: NUTS at fixed θ is the exact posterior
@pytest.mark.slow
def test_long_nuts_at_fixed_theta_matches_the_exact_decomposition(theo):
    nuts = nlmefit.fit(theo.model, nlmefit.datasets.load("theophylline"), method="nuts", covariance=None,
                       init=theo.estimates.to_dict(), seed=3, num_chains=1, num_samples=400, warmup_steps=200,
                       sample_population=False)
    d = decomposition(nuts.replace(estimates=theo.estimates), n_samples=2000, n_is=4000)
    ref = _agq_loglik(theo, 9)
    # Q over exact-posterior draws, KL of their moment-matched Gaussian: Q − KL exceeds log p(y_i) by
    # KL(posterior ‖ its Gaussian), which is small on theo
    assert (np.abs(d.table["elbo"] - ref) < 0.1 + 4 * d.table["elbo_se"]).all()


@pytest.mark.slow
def test_one_step_is_standard_errors_are_honest(line):
    """30 seeds: the spread of each subject's IS total matches its reported SE and the mean is unbiased."""
    df, fit = line
    exact = lg.exact_loglik(df)
    runs = [one_step_ahead(fit, method="is", n_samples=1000, seed=s).per_subject for s in range(30)]
    vals = np.array([r["logp"].to_numpy() for r in runs])
    se = np.array([r["se"].to_numpy() for r in runs]).mean(0)
    ratio = vals.std(0, ddof=1) / se
    assert (0.5 < ratio).all() and (ratio < 1.6).all(), ratio
    assert (np.abs(vals.mean(0) - exact) < 4 * se / np.sqrt(30)).all()


def test_fit_result_methods_and_cli_write_the_reports(tmp_path, capsys):
    """FitResult.decomposition / one_step_ahead delegate to the diagnostics; `nlmefit diagnose
    --decomposition --one-step-ahead` writes the tables and figures."""
    from nlmefit.cli import main

    out = tmp_path / "fit"
    assert main(["fit", "theophylline", "--no-cov", "--quiet", "--out", str(out)]) == 0
    fit = nlmefit.FitResult.from_json(out / "result.json")
    fit = fit.replace(data=fit.model.prepare(nlmefit.datasets.load("theophylline")))
    dec = fit.decomposition(n_samples=200)
    assert list(dec.table["ID"]) == list(range(1, 13))
    osa = fit.one_step_ahead(method="agq", n_nodes=3)
    assert abs(osa.total - osa.per_subject["logp"].sum()) < 1e-9
    assert main(["diagnose", str(out), "--n-rep", "20", "--decomposition", "--one-step-ahead", "--osa-method",
                 "agq"]) == 0
    d = out / "diagnostics"
    for f in ("decomposition.csv", "q_kl.png", "aggregate_posterior.png", "one_step_ahead.csv",
              "one_step_ahead_subjects.csv", "one_step_ahead.png"):
        assert (d / f).exists(), f
    table = pd.read_csv(d / "decomposition.csv")
    assert {"ID", "q", "kl", "kl_se", "elbo", "loglik", "loglik_se", "gap"} <= set(table.columns)
    assert "Traceback" not in capsys.readouterr().err
