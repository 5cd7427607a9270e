"""Flow posterior families (``FlowFamily``: Gaussian, MAF, NSF on zuko): shapes and mini-batches, exact
initialisation from a Gaussian, float64 from a float32 network, log|det ∂T/∂ξ| against autograd, draws against
log_prob (KS on a 1-d spline flow, grid moments in 2-d), the Gaussian entropy and KL, gradients to per-subject and
shared parameters, and the families as importance-sampling proposals and ELBO posteriors on the linear-Gaussian
model (exact log-likelihood)."""
import math

import linear_gaussian as lg
import numpy as np
import pytest
import torch
from scipy import stats
from torch.distributions import MultivariateNormal

import nlmefit
from nlmefit.marginal import elbo, importance_loglik
from nlmefit.posteriors import FlowFamily, FlowPosterior, GaussianPosterior, kl_to_prior, seeded

F64 = torch.float64
KINDS = ["gaussian", "maf", "nsf"]
SMALL = {"hidden": (16,), "transforms": 2, "context_dim": 4}


def _gaussian(n: int = 4, q: int = 3, seed: int = 0) -> MultivariateNormal:
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(n, q, generator=g, dtype=F64)
    A = torch.randn(n, q, q, generator=g, dtype=F64)
    return MultivariateNormal(loc, scale_tril=torch.linalg.cholesky(A @ A.mT + 0.5 * torch.eye(q, dtype=F64)))


def _randomise(fam: FlowFamily, scale: float = 0.4, seed: int = 0) -> FlowFamily:
    """Move every flow weight (the zero-initialised last layers included) away from the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in fam.flow.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return fam


def _log_normal(xi: torch.Tensor) -> torch.Tensor:
    return -0.5 * xi.pow(2).sum(-1) - 0.5 * xi.shape[-1] * math.log(2 * math.pi)


@pytest.fixture(autouse=True)
def _seeded():
    """Network weights and contexts are initialised from torch's random state: the same in every run."""
    with seeded(0):
        yield


@pytest.mark.parametrize("kind", KINDS)
def test_shapes_mini_batches_and_seeding(kind):
    fam = FlowFamily(kind, 5, 3, **SMALL)
    if kind != "gaussian":
        _randomise(fam)
    d = fam()
    assert d.kind == kind and d.has_rsample
    assert isinstance(d, GaussianPosterior if kind == "gaussian" else FlowPosterior)
    assert tuple(d.batch_shape) == (5,) and tuple(d.event_shape) == (3,)
    x = d.rsample((7,))
    assert x.shape == (7, 5, 3) and x.dtype == F64 and d.log_prob(x).shape == (7, 5)
    assert d.rsample((2, 3)).shape == (2, 3, 5, 3)
    for idx in ([0, 3], torch.tensor([4, 1]), slice(1, 3)):
        sub = fam(idx)
        rows = torch.arange(5)[idx]
        assert tuple(sub.batch_shape) == (len(rows),)
        torch.testing.assert_close(sub.log_prob(x[:, rows]), d.log_prob(x)[:, rows], rtol=1e-12, atol=1e-12)
    with seeded(3):
        a = d.sample((4,))
    with seeded(3):
        b = d.sample((4,))
    assert torch.equal(a, b) and not a.requires_grad


@pytest.mark.parametrize("kind", KINDS)
def test_initialisation_reproduces_the_given_gaussian(kind):
    """q_i starts as exactly N(m_i, L_i L_iᵀ) (the flows' hyper-networks start with a zero last layer)."""
    g = _gaussian()
    fam = FlowFamily.from_gaussian(g, kind, **SMALL)
    d = fam()
    x = g.sample((50,))
    np.testing.assert_allclose(d.log_prob(x).detach().numpy(), g.log_prob(x).numpy(), rtol=0, atol=1e-10)
    torch.testing.assert_close(fam.scale_tril, g.scale_tril, rtol=1e-14, atol=1e-14)
    # SDs instead of a Cholesky factor, and a covariance by mistake
    sd = FlowFamily(kind, 4, 3, init_loc=g.loc, init_scale=torch.full((4, 3), 2.0), **SMALL)()
    ref = MultivariateNormal(g.loc, scale_tril=2 * torch.eye(3, dtype=F64))
    np.testing.assert_allclose(sd.log_prob(x).detach().numpy(), ref.log_prob(x).numpy(), atol=1e-10)
    with pytest.raises(ValueError, match="lower-triangular"):
        FlowFamily(kind, 4, 3, init_scale=g.covariance_matrix, **SMALL)


@pytest.mark.parametrize("kind", KINDS)
def test_a_float32_network_serves_float64(kind):
    g = _gaussian()
    fam = FlowFamily.from_gaussian(g, kind, dtype=torch.float32, **SMALL)
    assert fam.loc.dtype == torch.float32
    d = fam(dtype=F64)
    x = d.rsample((20,)).detach()
    assert x.dtype == F64 and d.log_prob(x).dtype == F64
    np.testing.assert_allclose(d.log_prob(x).detach().numpy(), g.log_prob(x).numpy(), rtol=1e-5, atol=1e-5)
    if kind != "gaussian":  # without dtype=: float32 draws, but a float64 value still gets a float64 density
        assert fam().rsample().dtype == torch.float32 and fam().log_prob(x).dtype == F64
    d64 = fam.to(F64)()
    assert d64.rsample().dtype == F64


@pytest.mark.parametrize("kind,passes", [("maf", None), ("maf", 2), ("nsf", None), ("nsf", 2)])
def test_log_det_jacobian_matches_autograd(kind, passes):
    """log q_i(T(ξ)) = log N(ξ; 0, I) − log|det ∂T_i/∂ξ_i| with the Jacobian from autograd; T⁻¹(T(ξ)) = ξ."""
    g = _gaussian(n=3)
    fam = _randomise(FlowFamily.from_gaussian(g, kind, passes=passes, **SMALL), seed=1)
    d = fam()
    xi = torch.randn(3, 3, generator=torch.Generator().manual_seed(2), dtype=F64) * 1.5
    J = torch.autograd.functional.jacobian(d.from_base, xi)  # [N, q, N, q], block-diagonal in the subject
    logdet = torch.stack([torch.linalg.slogdet(J[i, :, i, :])[1] for i in range(3)])
    eta = d.from_base(xi)
    torch.testing.assert_close(d.log_prob(eta), _log_normal(xi) - logdet, rtol=1e-9, atol=1e-9)
    back, _ = d.to_base(eta)
    torch.testing.assert_close(back, xi, rtol=1e-8, atol=1e-8)
    assert not torch.allclose(d.log_prob(eta), g.log_prob(eta))  # really not the Gaussian any more


def test_draws_follow_log_prob_1d_spline_flow():
    """The CDF of exp(log_prob) (trapezoid rule) is Φ(T⁻¹(η)), and a KS test of 4000 draws accepts it."""
    fam = _randomise(FlowFamily("nsf", 2, 1, init_loc=torch.tensor([[1.0], [-2.0]]), init_scale=0.7, **SMALL),
                     scale=0.4, seed=3)
    d = fam()
    with seeded(4):
        x = d.sample((4000,))
    # nodes: T(ξ) on a fine ξ grid (dense where the density is high) and a fine uniform η grid (resolves low-density
    # stretches where T is steep), so that the trapezoid rule resolves the spline
    xi = torch.linspace(-8, 8, 20001, dtype=F64)
    with torch.no_grad():
        mapped = d.from_base(xi[:, None, None].expand(-1, 2, 1))[..., 0]
        uniform = torch.stack([torch.linspace(float(mapped[0, i]), float(mapped[-1, i]), 20001, dtype=F64)
                               for i in range(2)], -1)
        nodes = torch.sort(torch.cat([mapped, uniform]), 0).values[..., None]
        dens = d.log_prob(nodes).exp().numpy()
        cdf_ref = stats.norm.cdf(d.to_base(nodes)[0][..., 0].numpy())
    for i in range(2):
        g = nodes[:, i, 0].numpy()
        cdf = np.concatenate([[0.0], np.cumsum(0.5 * (dens[1:, i] + dens[:-1, i]) * np.diff(g))])
        np.testing.assert_allclose(cdf, cdf_ref[:, i] - cdf_ref[0, i], atol=1e-4)
        assert stats.kstest(x[:, i, 0].numpy(), lambda v, c=cdf, g=g: np.interp(v, g, c)).pvalue > 1e-3
    assert stats.kstest(x[:, 0, 0].numpy(), stats.norm(1.0, 0.7).cdf).pvalue < 1e-3  # and it is not Gaussian


@pytest.mark.parametrize("kind", ["maf", "nsf"])
def test_draws_follow_log_prob_2d(kind):
    """exp(log_prob) on a 2-d grid integrates to 1, and its mean and covariance match 10000 draws."""
    g = _gaussian(n=2, q=2, seed=5)
    fam = _randomise(FlowFamily.from_gaussian(g, kind, **SMALL), scale=0.25, seed=6)
    with seeded(7):
        x = fam().sample((10000,))
    for i in range(2):
        lo, hi = x[:, i].min(0).values, x[:, i].max(0).values
        axes = [torch.linspace(float(lo[k] - (hi[k] - lo[k]) / 4), float(hi[k] + (hi[k] - lo[k]) / 4), 501,
                               dtype=F64) for k in range(2)]
        pts = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 1, 2)
        with torch.no_grad():
            w = fam([i]).log_prob(pts)[:, 0].exp() * (axes[0][1] - axes[0][0]) * (axes[1][1] - axes[1][0])
        pts = pts[:, 0]
        assert abs(float(w.sum()) - 1) < 1e-3
        mean = (w[:, None] * pts).sum(0)
        c = pts - mean
        cov = (w[:, None, None] * c[:, :, None] * c[:, None, :]).sum(0)
        assert bool(((x[:, i].mean(0) - mean).abs() < 5 * x[:, i].std(0) / math.sqrt(x.shape[0])).all())
        sd = cov.diagonal().sqrt()
        assert bool(((torch.cov(x[:, i].T) - cov).abs() < 0.05 * sd.outer(sd)).all())


def test_gaussian_family_entropy_and_kl_to_prior():
    g = _gaussian(seed=8)
    d = FlowFamily.from_gaussian(g)()
    q = 3
    logdet = torch.log(torch.diagonal(g.scale_tril, dim1=-2, dim2=-1)).sum(-1)
    closed = 0.5 * q * (1 + math.log(2 * math.pi)) + logdet
    torch.testing.assert_close(d.entropy(), closed, rtol=1e-12, atol=1e-12)
    with seeded(0):
        x = d.rsample((20000,))
    lp = d.log_prob(x)
    assert bool(((-lp.mean(0) - closed).abs() < 5 * lp.std(0) / math.sqrt(20000)).all())
    prior = MultivariateNormal(torch.zeros(q, dtype=F64), scale_tril=torch.diag(torch.tensor([1.0, 0.5, 2.0]).double()))
    kl = kl_to_prior(d, prior)
    torch.testing.assert_close(kl, torch.distributions.kl_divergence(g, prior))
    with seeded(1):  # the same q as an identity flow: Monte-Carlo KL, within its error of the closed form
        mc = kl_to_prior(FlowFamily.from_gaussian(g, "maf", **SMALL)(), prior, n_samples=4000)
    assert bool(((mc - kl).abs() < 0.15 * kl.abs().clamp_min(1.0)).all())


@pytest.mark.parametrize("kind", ["maf", "nsf"])
def test_gradients_reach_per_subject_and_shared_parameters(kind):
    fam = FlowFamily.from_gaussian(_gaussian(), kind, **SMALL)
    prior = MultivariateNormal(torch.zeros(3, dtype=F64), torch.eye(3, dtype=F64))

    def loss(index=None) -> torch.Tensor:
        d = fam(index)
        x = d.rsample((8,))
        return (d.log_prob(x) - prior.log_prob(x)).mean(0).sum()

    loss().backward()  # at the identity: the zero last layers get a gradient, so training leaves the identity
    last = [m.hyper[-1].weight for m in fam.flow.modules() if isinstance(getattr(m, "hyper", None), torch.nn.Module)]
    assert last and all(w.grad is not None and w.grad.abs().sum() > 0 for w in last)
    fam.zero_grad()
    _randomise(fam)
    loss([1, 3]).backward()  # a mini-batch: per-subject gradients only for its subjects, shared ones for all
    for per_subject in (fam.offset, fam.scale_raw, fam.context):
        norms = per_subject.grad.flatten(1).abs().sum(1)
        assert bool((norms[[1, 3]] > 0).all()) and bool((norms[[0, 2]] == 0).all())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fam.flow.parameters())


@pytest.fixture(scope="module")
def line_fit():
    df = lg.data()
    fit = nlmefit.fit(lg.model(), df, method="laplace", maxiter=0, covariance=None)
    p = fit.model.parameters.params_from_dict(fit.estimates.to_dict())
    mean, cov = lg.posterior(df)
    assert list(fit.data.ids) == sorted(df["ID"].unique())
    exact = MultivariateNormal(torch.as_tensor(mean), torch.as_tensor(cov))
    return df, fit.model, fit.data, p, exact


@pytest.mark.parametrize("kind", KINDS)
def test_exact_posterior_as_importance_proposal_gives_the_exact_loglik(line_fit, kind):
    df, model, data, p, exact = line_fit
    fam = FlowFamily.from_gaussian(exact, kind, **SMALL)
    ll = importance_loglik(model, p, data, fam(), n_samples=200, seed=1)
    np.testing.assert_allclose(ll.loglik_i, lg.exact_loglik(df), atol=1e-8)
    assert ll.se < 1e-6 and ll.proposal == kind


@pytest.mark.parametrize("kind", ["maf", "nsf"])
def test_a_trained_looking_flow_is_an_unbiased_proposal(line_fit, kind):
    """A flow moved away from the exact posterior: IS is still within 4 SE of the exact log-likelihood."""
    df, model, data, p, exact = line_fit
    inflated = MultivariateNormal(exact.loc, scale_tril=1.5 * exact.scale_tril)
    fam = _randomise(FlowFamily.from_gaussian(inflated, kind, **SMALL), scale=0.1, seed=9)
    ll = importance_loglik(model, p, data, fam(), n_samples=2000, seed=2)
    assert abs(ll.loglik - lg.exact_loglik(df).sum()) < 4 * ll.se / 2 + 1e-6


def test_elbo_is_exact_at_the_posterior_and_differentiable(line_fit):
    df, model, data, p, exact = line_fit
    gauss = FlowFamily.from_gaussian(exact)
    np.testing.assert_allclose(elbo(model, p, data, gauss(), n_samples=4).detach().numpy(), lg.exact_loglik(df),
                               atol=1e-8)
    fam = _randomise(FlowFamily.from_gaussian(exact, "nsf", **SMALL), scale=0.2, seed=10)
    with seeded(3):
        bound = elbo(model, p, data, fam(), n_samples=64)
    assert float(bound.detach().sum()) < lg.exact_loglik(df).sum()
    (-bound.sum()).backward()
    assert fam.offset.grad.abs().sum() > 0 and fam.context.grad.abs().sum() > 0
    assert all(w.grad is not None for w in fam.flow.parameters())


def test_importing_zuko_through_nlmefit_keeps_torchs_argument_validation():
    """zuko switches ``Distribution`` argument validation off process-wide on import; nlmefit restores torch's
    default (on unless Python runs with -O)."""
    assert torch.distributions.Distribution._validate_args is __debug__
    with pytest.raises(ValueError):
        torch.distributions.Normal(0.0, -1.0)
