"""Posterior families as torch Distributions (batch [N], event [q]): shapes, sample-vs-log_prob goodness of fit,
seeded reproducibility, the empirical family's moments, and the Laplace posterior of a linear-Gaussian model
equal to its exact posterior."""
import linear_gaussian as lg
import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import gammaln

import nlmefit
from nlmefit.marginal import laplace_posterior
from nlmefit.posteriors import EmpiricalPosterior, GaussianPosterior, StudentTPosterior, seeded


def _family(kind: str):
    g = torch.Generator().manual_seed(0)
    n, q = 5, 3
    loc = torch.randn(n, q, generator=g, dtype=torch.float64)
    A = torch.randn(n, q, q, generator=g, dtype=torch.float64)
    L = torch.linalg.cholesky(A @ A.transpose(-1, -2) + 0.5 * torch.eye(q, dtype=torch.float64))
    return GaussianPosterior(loc, L) if kind == "gaussian" else StudentTPosterior(5.0, loc, L)


@pytest.mark.parametrize("kind", ["gaussian", "t"])
def test_shapes_and_reparameterised_draws(kind):
    d = _family(kind)
    assert tuple(d.batch_shape) == (5,) and tuple(d.event_shape) == (3,)
    x = d.rsample((7,))
    assert x.shape == (7, 5, 3) and d.log_prob(x).shape == (7, 5)
    with seeded(3):
        a = d.sample((4,))
    with seeded(3):
        b = d.sample((4,))
    assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["gaussian", "t"])
def test_log_prob_agrees_with_samples(kind):
    """Goodness of fit: the squared Mahalanobis distance of draws follows χ²_q (Gaussian) or q·F(q, ν) (t);
    Kolmogorov–Smirnov p > 0.001 on 4000 draws per subject."""
    d = _family(kind)
    with seeded(1):
        x = d.sample((4000,))
    z = torch.linalg.solve_triangular(d.scale_tril, (x - d.loc).unsqueeze(-1), upper=False).squeeze(-1)
    m2 = (z * z).sum(-1).numpy()
    for i in range(5):
        dist = stats.chi2(3) if kind == "gaussian" else stats.f(3, 5.0)
        sample = m2[:, i] if kind == "gaussian" else m2[:, i] / 3
        assert stats.kstest(sample, dist.cdf).pvalue > 1e-3
    # log_prob is the density of those draws: at the draws it equals the closed form in the Mahalanobis distance
    lp = d.log_prob(x)[:, 0].numpy()
    logdet = float(torch.log(torch.diagonal(d.scale_tril[0])).sum())
    if kind == "gaussian":
        ref = -0.5 * (3 * np.log(2 * np.pi) + m2[:, 0]) - logdet
    else:
        nu = 5.0
        ref = _t_logpdf(m2[:, 0], 3, nu) - logdet
    np.testing.assert_allclose(lp, ref, rtol=1e-10, atol=1e-10)


def _t_logpdf(m2, q, nu):
    return gammaln((nu + q) / 2) - gammaln(nu / 2) - 0.5 * q * np.log(nu * np.pi) - 0.5 * (nu + q) * np.log1p(m2 / nu)


def test_gaussian_entropy_is_the_closed_form():
    d = _family("gaussian")
    q = 3
    logdet = 2 * torch.log(torch.diagonal(d.scale_tril, dim1=-2, dim2=-1)).sum(-1)
    np.testing.assert_allclose(d.entropy().numpy(), (0.5 * q * (1 + np.log(2 * np.pi)) + 0.5 * logdet).numpy(),
                               rtol=1e-12)


def test_empirical_posterior_moments_and_refusals():
    draws = torch.randn(400, 6, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2 + 1
    e = EmpiricalPosterior(draws)
    assert tuple(e.batch_shape) == (6,) and tuple(e.event_shape) == (2,)
    torch.testing.assert_close(e.mean, draws.mean(0))
    assert e.sample((10,)).shape == (10, 6, 2)
    with pytest.raises(NotImplementedError, match="moment_matched"):
        e.log_prob(draws[0])
    g = e.moment_matched()
    torch.testing.assert_close(g.covariance_matrix, e.covariance_matrix, rtol=1e-6, atol=1e-9)
    assert isinstance(e.moment_matched(df=4), StudentTPosterior)
    with pytest.raises(ValueError):
        EmpiricalPosterior(draws[0])


def test_laplace_posterior_is_exact_for_a_linear_gaussian_model():
    df = lg.data()
    fit = nlmefit.fit(lg.model(), df, method="laplace", maxiter=0, covariance=None)
    post = laplace_posterior(fit.model, fit.population_parameters(), fit.data)
    mean, cov = lg.posterior(df)
    np.testing.assert_allclose(post.loc.numpy(), np.asarray(mean).reshape(post.loc.shape), atol=1e-8)
    np.testing.assert_allclose(post.covariance_matrix.numpy(), np.asarray(cov).reshape(post.covariance_matrix.shape),
                               atol=1e-10)
    assert post.kind == "laplace" and fit.posterior is not None
