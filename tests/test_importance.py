"""Importance-sampling −2LL: exact on a linear-Gaussian model, honest Monte-Carlo SE, ESS warnings, and agreement
with many-node AGQ on theo_sd and pheno_real at the FOCE-I optimum (the issue's ±0.05)."""
import linear_gaussian as lg
import numpy as np
import pytest
import torch

import nlmefit
from nlmefit.marginal import importance_loglik, laplace_posterior
from nlmefit.models.examples import pheno_real
from nlmefit.posteriors import GaussianPosterior


@pytest.fixture(scope="module")
def line_fit():
    df = lg.data()
    return df, nlmefit.fit(lg.model(), df, method="laplace", maxiter=0, covariance=None)


def test_laplace_proposal_is_the_exact_posterior_for_a_linear_gaussian_model(line_fit):
    df, fit = line_fit
    ll = nlmefit.loglik(fit, "is", n_samples=500, proposal="laplace", seed=1)
    np.testing.assert_allclose(ll.loglik_i, lg.exact_loglik(df), atol=1e-9)
    assert ll.se < 1e-6  # every weight equal
    np.testing.assert_allclose(ll.ess_i, 500, rtol=1e-9)
    assert "is" not in fit.likelihoods  # loglik() returns a value and leaves the fit as it was
    recorded = fit.with_likelihood(ll)
    assert recorded.likelihoods["is"]["n_samples"] == 500 and recorded is not fit


def test_t_proposal_is_unbiased_and_its_se_is_honest(line_fit):
    """20 seeds of a noisy estimator: their spread matches the reported MC SE (within a factor of 2) and the
    mean is within 4 SE of the exact value."""
    df, fit = line_fit
    exact = lg.exact_loglik(df).sum()
    runs = [nlmefit.loglik(fit, "is", n_samples=100, proposal="t", df=3, seed=s) for s in range(20)]
    vals = np.array([r.loglik for r in runs])
    se = np.mean([r.se for r in runs]) / 2  # .se is on the −2LL scale
    assert 0.5 < vals.std(ddof=1) / se < 2.0
    assert abs(vals.mean() - exact) < 4 * se / np.sqrt(20) + 1e-3
    assert all(r.ofv == pytest.approx(r.m2ll - r.n_uncensored * np.log(2 * np.pi)) for r in runs)


def test_low_ess_warns_and_bad_requests_are_refused(line_fit):
    df, fit = line_fit
    data, model = fit.data, fit.model
    p = model.parameters.params_from_dict(fit.estimates.to_dict())
    q = data.q
    narrow = GaussianPosterior(torch.full((data.n_subjects, q), 3.0, dtype=torch.float64),
                               0.05 * torch.eye(q, dtype=torch.float64).expand(data.n_subjects, q, q).clone())
    with pytest.warns(UserWarning, match="effective sample size"):
        importance_loglik(model, p, data, narrow, n_samples=200)
    with pytest.raises(ValueError, match="posterior"):
        nlmefit.loglik(fit.replace(posterior=None), "is", proposal="posterior")
    with pytest.raises(nlmefit.ModelSpecError, match="proposal"):
        nlmefit.loglik(fit, "is", proposal="flow")


def test_chunking_does_not_change_the_estimate(line_fit):
    _, fit = line_fit
    p = fit.model.parameters.params_from_dict(fit.estimates.to_dict())

    prop = laplace_posterior(fit.model, p, fit.data, df=4.0)
    a = importance_loglik(fit.model, p, fit.data, prop, n_samples=300, seed=5, chunk=300)
    b = importance_loglik(fit.model, p, fit.data, prop, n_samples=300, seed=5, chunk=300)
    c = importance_loglik(fit.model, p, fit.data, prop, n_samples=300, seed=6, chunk=7)
    assert a.loglik == b.loglik  # seeded
    assert abs(a.loglik - c.loglik) < 5 * (a.se + c.se) / 2


@pytest.mark.parametrize("name", ["theo", "pheno"])
def test_is_and_agq_agree_at_the_focei_optimum(name):
    """Acceptance (issue 4): AGQ with many nodes and IS with many samples agree to ±0.05 on −2LL. The FOCE-I
    and Laplace OFVs differ from that exact value by the approximation error reported here."""
    if name == "theo":
        model, df = nlmefit.library.get("1cmt_oral", error="additive"), nlmefit.datasets.load("theophylline")
        n_samples, nodes = 20000, 15
    else:
        model, df = pheno_real(), nlmefit.datasets.load("pheno")
        n_samples, nodes = 10000, 20
    fit = nlmefit.fit(model, df, method="focei", covariance=None)
    agq = nlmefit.loglik(fit, "agq", n_nodes=nodes)
    agq_more = nlmefit.loglik(fit, "agq", n_nodes=nodes + 4)
    assert abs(agq.ofv - agq_more.ofv) < 0.005  # converged in the node count
    is_ = nlmefit.loglik(fit, "is", n_samples=n_samples, proposal="laplace", seed=11)
    assert is_.se < 0.05
    assert abs(is_.ofv - agq.ofv) < 0.05
    lap = nlmefit.loglik(fit, "laplace").ofv
    # measured: theo FOCE-I 116.803 vs exact 118.121 (FOCE-I 1.32 low), Laplace 118.527 (0.41 high);
    # pheno FOCE-I 586.276 vs exact 586.265, Laplace 586.352
    expected = {"theo": (-1.32, 0.41), "pheno": (0.011, 0.088)}[name]
    assert fit.ofv - agq.ofv == pytest.approx(expected[0], abs=0.02)
    assert lap - agq.ofv == pytest.approx(expected[1], abs=0.02)
