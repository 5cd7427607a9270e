"""Normalizing flow, flow matching and WGAN-GP baselines on a correlated 3-D Gaussian with known law.

Data: y ~ N(μ, Σ) on a raw scale (means 45–55, SDs 8–12, correlations 0.4–0.7), n = 400 training subjects and
2000 held-out ones. Tolerances (per subject, nats):

* held-out NLL: Δ = mean_i[log p_true(y_i) − log q(y_i)] over the SAME held-out points estimates KL(p‖q) ≥ 0 with
  Monte-Carlo SE = sd_i(·)/√m (3 SE either side). A Gaussian fitted by maximum likelihood to n points has
  E KL ≈ d(d+3)/(4n) (half its parameter count over n): 0.014 for d = 3 and the 320 subjects a flow trains on
  after its 20 % early-stopping hold-out. A flow fitted by Adam with early stopping is a looser estimator: we allow
  10× that for the NF (0.14) and 15× for flow matching (0.21, a short fit of a regression objective, not of the
  likelihood). Both fail clearly for a model that misses the correlations (KL = −½ log det R = 0.56) or a wrong
  Jacobian (Σ log s_j ≈ 7 nats).
* Jacobian: a fit on raw data and one on data standardised by hand see the same float32 tensors, so their NLLs
  differ by Σ_j log s_j to float32 round-off (1e-5 relative).
* sample/log_prob consistency: for a normalised density r, E_{x~q}[r(x)/q(x)] = 1 exactly when log_prob is the
  density of sample; r = N(mean, 1.5 · cov) of the model's own draws keeps the weights' variance finite. 3 SE,
  plus 0.01 for flow matching (its sampler and its likelihood are separate ODE solves, each to rtol = atol = 1e-5;
  1 % in the weights is ~100× that).
* GAN: a short WGAN-GP fit (``gan_fit``: 300 generator steps at lr 1e-3) — sample means within 0.25 SD of the
  data's, SD ratios in [0.7, 1.4], correlations within 0.3. Loose, because a GAN converges in distribution slowly
  and correlations last (over seeds 1–3 this fit gave mean errors ≤ 0.14 SD, SD ratios 0.83–1.08, correlation
  errors 0.16–0.22); a generator that ignored the correlations (0.4–0.7) or collapsed its spread would fail.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from nlmefit.baselines.design import PanelView
from nlmefit.baselines.flow_matching import FlowMatching
from nlmefit.baselines.gan import WGANGP
from nlmefit.baselines.nf import NormalizingFlow
from nlmefit.errors import ModelSpecError

MU = np.array([50.0, 45.0, 55.0])
SD = np.array([10.0, 8.0, 12.0])
R = np.array([[1.0, 0.7, 0.4], [0.7, 1.0, 0.6], [0.4, 0.6, 1.0]])
COV = R * np.outer(SD, SD)
D = 3
N_TRAIN, N_TEST = 400, 2000
TRUE = multivariate_normal(MU, COV)

FAST_NF = {"max_epochs": 150}
FAST_FM = {"max_epochs": 300}


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(20240601)
    y = rng.multivariate_normal(MU, COV, size=N_TRAIN)
    yt = rng.multivariate_normal(MU, COV, size=N_TEST)
    return PanelView.from_arrays(y), PanelView.from_arrays(yt)


def _excess(model, test: PanelView) -> tuple[float, float]:
    """(mean over test subjects of log p_true − log q, its Monte-Carlo SE)."""
    diff = TRUE.logpdf(test.y) - model.log_prob(test)
    return float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(len(diff)))


def _kl_budget(n: int, factor: float) -> float:
    return factor * D * (D + 3) / (4.0 * n)


def _importance_ratio(model, m: int = 3000) -> tuple[float, float]:
    """mean and SE over x ~ model of r(x)/q(x), r = N(mean(x), 1.5 cov(x))."""
    x = model.sample(m, seed=11)
    r = multivariate_normal(x.mean(0), 1.5 * np.cov(x.T))
    w = np.exp(r.logpdf(x) - model.log_prob(PanelView.from_arrays(x)))
    return float(w.mean()), float(w.std(ddof=1) / np.sqrt(m))


@pytest.fixture(scope="module")
def maf(data):
    return NormalizingFlow(flow="maf", seed=3, trainer_options=FAST_NF).fit(data[0])


@pytest.fixture(scope="module")
def fm(data):
    return FlowMatching(seed=3, trainer_options=FAST_FM).fit(data[0])


# ---------------------------------------------------------------------------------------------------------------- NF
@pytest.mark.parametrize("flow", ["maf", "nsf"])
def test_nf_heldout_nll_near_truth(data, maf, flow):
    train, test = data
    model = maf if flow == "maf" else NormalizingFlow(flow="nsf", seed=3, trainer_options=FAST_NF).fit(train)
    assert model.kind == "exact" and model.name == "nf"
    excess, se = _excess(model, test)
    n_fit = int(round(0.8 * N_TRAIN))
    assert -3 * se < excess < _kl_budget(n_fit, 10.0) + 3 * se, (flow, excess, se)
    # the truth itself on these points is near the analytic entropy (sanity of the test data)
    nll_true = -TRUE.logpdf(test.y)
    assert abs(nll_true.mean() - TRUE.entropy()) < 3 * nll_true.std() / np.sqrt(N_TEST)


def test_nf_jacobian_raw_vs_standardised(data, maf):
    train, test = data
    m, s = train.y.mean(0), train.y.std(0)
    std = NormalizingFlow(flow="maf", seed=3, trainer_options=FAST_NF).fit(train.with_values((train.y - m) / s))
    nll_std = std.nll(test.with_values((test.y - m) / s)) + np.log(s).sum()
    nll_raw = maf.nll(test)
    assert abs(nll_raw - nll_std) < 1e-5 * abs(nll_raw), (nll_raw, nll_std)
    assert np.log(s).sum() > 6.0  # the Jacobian is not negligible here


def test_nf_sample_log_prob_consistent(maf):
    mean, se = _importance_ratio(maf)
    assert abs(mean - 1.0) < 3 * se, (mean, se)


# ---------------------------------------------------------------------------------------------------------------- FM
def test_fm_likelihood_of_the_exact_velocity_field(data):
    """With the closed-form marginal velocity of a Gaussian, the ODE likelihood and sampler are those of the
    Gaussian: this checks the sign of the trace term, the base density and the Jacobian without any training."""
    train, test = data
    model = FlowMatching(seed=0, trainer_options={"max_epochs": 1}).fit(train)
    st = model.standardizer
    mu_z = torch.as_tensor((MU - st.mean) / st.scale)
    cov_z = torch.as_tensor(COV / np.outer(st.scale, st.scale))
    eye = torch.eye(D, dtype=torch.float64)

    def velocity(x, t, c):  # E[ε − y | x_t = x] for y ~ N(mu_z, cov_z), x_t = (1 − t) y + t ε
        t = torch.as_tensor(t, dtype=torch.float64)
        cov_t = (1 - t) ** 2 * cov_z + t ** 2 * eye
        gain = torch.linalg.solve(cov_t, t * eye - (1 - t) * cov_z)  # symmetric matrices: (A Σ_t⁻¹)ᵀ = Σ_t⁻¹ Aᵀ
        out = -mu_z + (x.to(torch.float64) - (1 - t) * mu_z) @ gain
        return out.to(x.dtype)

    model.objective.velocity = velocity
    model._lik_objective = None
    lp = model.log_prob(test.subset(slice(0, 300)))
    np.testing.assert_allclose(lp, TRUE.logpdf(test.y[:300]), rtol=1e-4, atol=1e-4)
    x = model.sample(4000, seed=5)
    assert np.all(np.abs(x.mean(0) - MU) < 4 * SD / np.sqrt(4000))
    np.testing.assert_allclose(np.corrcoef(x.T), R, atol=0.05)


def test_fm_heldout_nll_near_truth(data, fm):
    excess, se = _excess(fm, data[1].subset(slice(0, 1000)))
    assert fm.kind == "exact" and fm.name == "flow_matching"
    assert -3 * se < excess < _kl_budget(N_TRAIN, 15.0) + 3 * se, (excess, se)


def test_fm_exact_trace_matches_hutchinson(data, fm):
    test = data[1].subset(slice(0, 500))
    exact = fm.log_prob(test)
    fm.trace, fm.n_probes = "hutchinson", 2
    try:
        hutch = fm.log_prob(test, seed=4)
        fm.probe = "gaussian"
        gauss = fm.log_prob(test, seed=4)
    finally:
        fm.trace, fm.n_probes, fm.probe = "exact", 1, "rademacher"
    for est in (hutch, gauss):
        diff = est - exact
        se = diff.std(ddof=1) / np.sqrt(len(diff))
        assert se > 0  # the estimator is random …
        assert abs(diff.mean()) < 3 * se + 1e-3, (diff.mean(), se)  # … and unbiased (+ ODE tolerance)


def test_fm_sample_log_prob_consistent(fm):
    mean, se = _importance_ratio(fm, m=2000)
    assert abs(mean - 1.0) < 3 * se + 0.01, (mean, se)


# ---------------------------------------------------------------------------------------------------------------- GAN
@pytest.fixture(scope="module")
def gan_fit(data):
    # 150 epochs × 2 batches × (5 critic + 1 generator) steps: 300 generator steps at lr 1e-3 — a short fit
    return WGANGP(seed=1, lr=1e-3, hidden=64, trainer_options={"max_epochs": 150, "batch_size": 200}).fit(data[0])


def test_gan_moments(data, gan_fit):
    train = data[0]
    x = gan_fit.sample(4000, seed=2)
    m, s = train.y.mean(0), train.y.std(0)
    assert np.all(np.abs(x.mean(0) - m) < 0.25 * s), (x.mean(0), m)
    ratio = x.std(0) / s
    assert np.all((ratio > 0.7) & (ratio < 1.4)), ratio
    np.testing.assert_allclose(np.corrcoef(x.T), np.corrcoef(train.y.T), atol=0.3)


def test_gan_has_no_likelihood(data, gan_fit):
    assert gan_fit.kind == "none" and gan_fit.name == "gan"
    with pytest.raises(ModelSpecError):
        gan_fit.log_prob(data[1])
    assert gan_fit.history.stopped.startswith("max_epochs")  # no early stopping on WGAN losses
    assert len(gan_fit.history.epochs) == 150


# ---------------------------------------------------------------------------------------------------------------- all
def _tiny(cls, **kw):
    return cls(seed=7, trainer_options={"max_epochs": 3}, **kw)


@pytest.mark.parametrize("make", [lambda: _tiny(NormalizingFlow, flow="maf"),
                                  lambda: _tiny(NormalizingFlow, flow="nsf"),
                                  lambda: _tiny(FlowMatching), lambda: _tiny(WGANGP)],
                         ids=["maf", "nsf", "fm", "gan"])
def test_same_seed_same_samples(data, make):
    a, b = make().fit(data[0]), make().fit(data[0])
    xa, xb = a.sample(50, seed=1), b.sample(50, seed=1)
    np.testing.assert_array_equal(xa, xb)
    assert not np.allclose(xa, a.sample(50, seed=2))
    np.testing.assert_array_equal(a.sample(20), a.sample(20))
    if a.kind != "none":
        np.testing.assert_array_equal(a.log_prob(data[1].subset(slice(0, 20))),
                                      b.log_prob(data[1].subset(slice(0, 20))))


@pytest.fixture(scope="module")
def dosed():
    """Two dose levels, y = (dose / 100) · u with u ~ N(μ, Σ): the mean doubles with the dose."""
    rng = np.random.default_rng(7)
    dose = np.repeat([100.0, 200.0], 200)
    y = dose[:, None] / 100.0 * rng.multivariate_normal(MU, COV, size=dose.size)
    return PanelView.from_arrays(y, context=np.repeat(dose[:, None], D, 1))


@pytest.mark.parametrize("make", [
    lambda: NormalizingFlow(conditional=True, seed=0, trainer_options={"max_epochs": 100}),
    lambda: FlowMatching(conditional=True, seed=0, trainer_options={"max_epochs": 150}),
    lambda: WGANGP(conditional=True, seed=0, lr=1e-3, hidden=64, trainer_options={"max_epochs": 50, "batch_size": 100}),
], ids=["nf", "fm", "gan"])
def test_conditional_follows_the_dose(dosed, make):
    model = make().fit(dosed)
    assert model.conditional
    lo = model.sample(1000, context=np.full(D, 100.0), seed=3)
    hi = model.sample(1000, context=np.full(D, 200.0), seed=3)
    # true conditional means MU and 2 MU: the difference is MU (45–55); a model ignoring the context gives 0
    shift = hi.mean(0) - lo.mean(0)
    assert np.all(np.abs(shift - MU) < 0.3 * MU), shift
    if model.kind != "none":  # (the short GAN fit's spreads are too rough for these)
        assert np.all(hi.std(0) > 1.5 * lo.std(0)), (hi.std(0), lo.std(0))  # the SD doubles too
        # a subject at dose 200 is likelier under the dose-200 context
        y_hi = dosed.subset(slice(200, 260))
        lp_right = model.log_prob(y_hi)
        lp_wrong = model.log_prob(_with_context(y_hi, 100.0))
        assert np.mean(lp_right > lp_wrong) > 0.8


def _with_context(view: PanelView, dose: float) -> PanelView:
    return PanelView.from_arrays(view.y, context=np.full((view.n, D), dose))


def test_unconditional_ignores_context(data, maf):
    np.testing.assert_array_equal(maf.sample(10, context=np.full(D, 5.0), seed=0), maf.sample(10, seed=0))


def test_bad_options():
    with pytest.raises(ModelSpecError):
        NormalizingFlow(flow="realnvp")
    with pytest.raises(ModelSpecError):
        FlowMatching(trace="skilling")
    with pytest.raises(ModelSpecError):
        WGANGP(n_critic=0)


# ---------------------------------------------------------------------------------------------------------------- slow
@pytest.mark.slow
@pytest.mark.parametrize("make", [lambda: NormalizingFlow(flow="maf"), lambda: NormalizingFlow(flow="nsf"),
                                  lambda: FlowMatching()], ids=["maf", "nsf", "fm"])
def test_default_fit_nll_near_truth(data, make):
    model = make().fit(data[0])
    excess, se = _excess(model, data[1])
    assert -3 * se < excess < _kl_budget(N_TRAIN, 8.0) + 3 * se, (excess, se)
    mean, se_w = _importance_ratio(model)
    assert abs(mean - 1.0) < 3 * se_w + 0.01


@pytest.mark.slow
def test_gan_default_fit_moments(data):
    train = data[0]
    x = WGANGP().fit(train).sample(4000, seed=2)
    m, s = train.y.mean(0), train.y.std(0)
    assert np.all(np.abs(x.mean(0) - m) < 0.15 * s)
    ratio = x.std(0) / s
    assert np.all((ratio > 0.8) & (ratio < 1.25)), ratio
    np.testing.assert_allclose(np.corrcoef(x.T), np.corrcoef(train.y.T), atol=0.12)


def test_hutchinson_likelihood_is_an_estimate():
    from nlmefit.baselines.flow_matching import FlowMatching

    assert FlowMatching().kind == "exact" and FlowMatching(trace="hutchinson").kind == "estimate"
