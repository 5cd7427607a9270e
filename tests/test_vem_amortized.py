"""Amortized VEM (``method="vem", amortized=True``): the encoder's posteriors on theophylline, posteriors of new
subjects without re-optimisation (and with a few refinement steps), a permutation-invariant masked encoder,
checkpoint → resume with the encoder in the state, ``fix_population``, a visibly non-Gaussian posterior on which
a flow family closes the ELBO gap of the Gaussian one, and simulate-and-recover with held-out subjects."""
import time
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from test_vem import interrupted_then_resumed

import nlmefit
import nlmefit.estimators.vem as vem_mod
from nlmefit.estimators import get_estimator
from nlmefit.marginal.evaluate import marginal_loglik
from nlmefit.posteriors.encoder import N_TOKEN_FEATURES, AmortizedFamily, PanelEncoder
from nlmefit.simulation import design_frame

AGQ_OFV = 118.10  # the AGQ optimum on theophylline (tests/test_vem.py computes it)


def _theo():
    return nlmefit.library.get("1cmt_oral", error="additive"), nlmefit.datasets.load("theophylline")


def test_amortized_gaussian_vem_on_theophylline_and_new_subjects():
    model, df = _theo()
    # the per-subject plateau rule (the amortized default is stricter: 3000 steps at least) keeps this test short
    fit = nlmefit.fit(model, df, method="vem", seed=1, amortized=True, covariance=None, n_elbo=300, n_is=1000,
                      min_steps=500, tol=3e-4, max_steps=2000)
    assert fit.converged and abs(fit.ofv - AGQ_OFV) < 1.0, fit.ofv  # measured 118.14
    elbo = fit.likelihoods["elbo"]
    assert elbo["m2elbo"] >= fit.likelihoods["is"]["m2ll"] - 3 * np.hypot(elbo["se"], fit.likelihoods["is"]["se"])
    q = fit.posterior
    assert isinstance(q.family, AmortizedFamily) and isinstance(q.encoder, PanelEncoder)
    assert any("warm-started" in m for m in fit.messages)
    # the encoder applied to the same subjects as new data reproduces fit.posterior (no optimisation) …
    q_new = vem_mod.amortized_posterior(fit, df)
    torch.testing.assert_close(q_new.loc, q.loc)
    torch.testing.assert_close(q_new.scale_tril, q.scale_tril)
    # … and to a subset of them, the same subjects' posteriors
    sub = q.for_data(df[df["ID"].isin([2, 5])])
    order = [i for i, s in enumerate(sorted(df["ID"].unique())) if s in (2, 5)]
    torch.testing.assert_close(sub.loc, q.loc[order])
    # a few refinement steps at fixed θ: still a valid posterior near the encoder's
    ref = q.for_data(df, refine_steps=30, seed=0)
    assert tuple(ref.batch_shape) == (12,) and torch.isfinite(ref.loc).all()
    assert float((ref.loc - q.loc).abs().max()) < 0.5
    p = fit.population_parameters()
    md = model.prepare(df)
    lik = marginal_loglik(model, p, md, method="is", n_samples=1000, proposal="posterior", posterior=ref, seed=0)
    assert abs(lik.m2ll - fit.likelihoods["is"]["m2ll"]) < 1.0


def test_encoder_is_permutation_invariant_and_masks_padding():
    torch.manual_seed(0)
    enc = PanelEncoder(n_cov=1, n_out=5)
    nf = N_TOKEN_FEATURES
    tok = torch.randn(3, 7, nf, dtype=torch.float64)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 5:] = False
    cov = torch.randn(3, 1, dtype=torch.float64)
    out = enc(tok, mask, cov)
    perm = torch.randperm(7)
    torch.testing.assert_close(enc(tok[:, perm], mask[:, perm], cov), out)
    tok2 = tok.clone()
    tok2[1, 5:] = 100.0  # padding values do not matter
    torch.testing.assert_close(enc(tok2, mask, cov), out)


FAST = dict(posterior="maf", amortized=True, warm_steps=20, max_steps=40, min_steps=40, n_samples=2, batch_size=6,
            n_elbo=50, n_is=100, covariance=None, flow_options={"hidden": (8,), "context_dim": 2, "transforms": 1},
            encoder_options={"hidden": 16, "heads": 2})


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_amortized_resume_gives_the_uninterrupted_trajectory(tmp_path, monkeypatch):
    model, df = _theo()
    full, resumed, state = interrupted_then_resumed(model, df, FAST, tmp_path, monkeypatch)
    assert state["k"] == 20 and any(k.startswith("encoder.") for k in state["family"])
    np.testing.assert_array_equal(resumed.traces.to_numpy(), full.traces.to_numpy())
    assert resumed.estimates.equals(full.estimates) and resumed.ofv == full.ofv
    torch.testing.assert_close(resumed.posterior.loc, full.posterior.loc, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fix_population_keeps_theta():
    model, df = _theo()
    init = {"cl": 2.8, "v": 33.0, "ka": 1.5, "omega_cl": 0.07, "omega_v": 0.02, "omega_ka": 0.4, "sigma_add": 0.7}
    fit = nlmefit.fit(model, df, method="vem", seed=1, init=init, fix_population=True, max_steps=60, min_steps=60,
                      n_elbo=50, n_is=100, covariance=None)
    assert fit.estimates.to_dict() == pytest.approx(init, rel=1e-12)


@pytest.mark.parametrize("bad", [dict(encoder_options={"layers": 2}), dict(warm_steps=-1), dict(lr_encoder=0.0)])
def test_bad_amortized_options(bad):
    with pytest.raises(nlmefit.ModelSpecError):
        get_estimator("vem", **bad)


# ---------------------------------------------------------------- a visibly non-Gaussian posterior
# 1-cmt oral, flip-flop-prone (ka = 0.12 close to k = CL/V = 0.1), two observations per subject, large Ω on V and
# ka, small residual error: (η_V, η_ka) are nearly exchangeable along a curved ridge, so each posterior is a
# skewed banana (partly two-lobed). θ is held at the truth (fix_population=True) so that the gaps compare.
FLIP = dict(cl=1.0, v=10.0, ka=0.12, omega_cl=0.05, omega_v=0.5, omega_ka=0.5, sigma_prop=0.03)


def _flip_data(n):
    model = nlmefit.library.get("1cmt_oral", error="proportional")
    design = design_frame([2.0, 12.0], [{"TIME": 0.0, "AMT": 100.0}], n_subjects=n)
    return model, nlmefit.simulate(model, FLIP, design, seed=3).drop(columns="REP")


def _fixed_theta_fit(model, df, kind, steps):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nlmefit.fit(model, df, method="vem", init=FLIP, seed=1, posterior=kind, fix_population=True,
                           covariance=None, max_steps=steps, min_steps=steps, n_elbo=1000, n_is=4000, stl=True,
                           lr_posterior=0.02, flow_options={"transforms": 3})


def _weighted_skewness(model, fit, df, n=4000):
    """|skewness| per subject and coordinate of the exact posterior, by self-normalised importance weighting of
    draws from the fitted flow (a consistent estimate of the posterior's moments)."""
    md = model.prepare(df)
    p = model.parameters.params_from_dict(FLIP)
    torch.manual_seed(0)
    with torch.no_grad():
        q = fit.posterior
        eta = q.sample((n,))
        w = torch.softmax(model.log_lik(p, eta, md) + model.log_prior(p, eta, md.n_occ) - q.log_prob(eta), 0)
        c = eta - (w[..., None] * eta).sum(0)
        v = (w[..., None] * c ** 2).sum(0)
        return ((w[..., None] * c ** 3).sum(0) / v ** 1.5).abs(), 1 / (w ** 2).sum(0)


def _gaps(fits):
    """−2·ELBO − IS −2LL at the same θ, each family against its own IS estimate and against the lowest (the
    least-biased: −2 log of an unbiased L estimate is biased upwards by a poor proposal)."""
    ref = min(f.likelihoods["is"]["m2ll"] for f in fits.values())
    own = {k: f.likelihoods["elbo"]["m2elbo"] - f.likelihoods["is"]["m2ll"] for k, f in fits.items()}
    common = {k: f.likelihoods["elbo"]["m2elbo"] - ref for k, f in fits.items()}
    return own, common


def test_flow_halves_the_elbo_gap_on_a_non_gaussian_posterior():
    """10 subjects, 600 steps each (≈ 15 s). Measured (whitened, re-based per-subject parameters): gap Gaussian 7.2
    (own IS) / 9.6 (common), NSF 1.4 / 1.4; worst-subject ESS 1971 of 4000; median max |skewness| 0.56. (MAF at
    600 steps: 3.4–5.4 across seeds — not converged yet at this budget; the slow test below runs NSF longer.)"""
    model, df = _flip_data(10)
    fits = {k: _fixed_theta_fit(model, df, k, 600) for k in ("gaussian", "nsf")}
    for f in fits.values():
        assert f.estimates.to_dict() == pytest.approx(FLIP, rel=1e-12)
    skew, ess = _weighted_skewness(model, fits["nsf"], df)
    assert float(ess.min()) > 100
    # visibly non-Gaussian: the posteriors are skewed (a Gaussian's |skewness| is 0, noise here ≈ 0.15) …
    assert float(skew.max(-1).values.median()) > 0.35, skew
    own, common = _gaps(fits)
    # … and the Gaussian family cannot close the gap (KL ≈ 0.5 nats per subject), the flow closes most of it
    assert own["gaussian"] > 5.0 and common["gaussian"] > 5.0
    assert own["nsf"] <= 0.5 * own["gaussian"], own
    assert common["nsf"] <= 0.5 * common["gaussian"], common


@pytest.mark.slow
def test_nsf_halves_the_elbo_gap_on_a_non_gaussian_posterior():
    """20 subjects, 1500 steps (≈ 2 min on 2 shared cores). Measured: gap Gaussian 25.3 (own IS) / 28.8 (common),
    NSF 4.6 / 4.6."""
    model, df = _flip_data(20)
    fits = {k: _fixed_theta_fit(model, df, k, 1500) for k in ("gaussian", "nsf")}
    own, common = _gaps(fits)
    assert own["nsf"] <= 0.5 * own["gaussian"], own
    assert common["nsf"] <= 0.5 * common["gaussian"], common


# ---------------------------------------------------------------- simulate and recover, held-out subjects
RTRUTH = dict(cl=2.0, v=20.0, ka=1.5, omega_cl=0.09, omega_v=0.04, omega_ka=0.16, sigma_prop=0.1)
RINIT = dict(cl=1.5, v=25.0, ka=1.0, omega_cl=0.2, omega_v=0.2, omega_ka=0.2, sigma_prop=0.2)


def _recover(n_fit, n_heldout, covariance, **options):
    model = nlmefit.library.get("1cmt_oral", error="proportional")
    design = design_frame([0.5, 1, 2, 4, 8, 12, 24], [{"TIME": 0.0, "AMT": 100.0}], n_subjects=n_fit + n_heldout)
    sim = nlmefit.simulate(model, RTRUTH, design, seed=11).drop(columns="REP")
    train, heldout = sim[sim["ID"] <= n_fit], sim[sim["ID"] > n_fit]
    t0 = time.perf_counter()
    fit = nlmefit.fit(model, train, method="vem", seed=1, init=RINIT, amortized=True, batch_size=min(n_fit, 200),
                      max_steps=6000, n_is=1000, n_elbo=300, covariance=covariance, **options)
    t_fit = time.perf_counter() - t0
    assert fit.converged
    # held-out subjects: the encoder's posteriors (no optimisation) as IS proposals at the fitted θ …
    t0 = time.perf_counter()
    q = fit.posterior.for_data(heldout)
    lik_a = marginal_loglik(model, fit.population_parameters(), model.prepare(heldout), method="is", n_samples=2000,
                            proposal="posterior", posterior=q, seed=0)
    t_amortized = time.perf_counter() - t0
    # … against per-subject VEM posteriors on the same subjects at the same θ
    t0 = time.perf_counter()
    per = nlmefit.fit(model, heldout, method="vem", seed=2, init=fit.estimates.to_dict(), fix_population=True,
                      covariance=None, n_is=2000, n_elbo=300)
    t_per = time.perf_counter() - t0
    lik_p = per.likelihoods["is"]
    truth = pd.Series(RTRUTH)[fit.estimates.index]
    return fit, truth, lik_a, lik_p, (t_fit, t_amortized, t_per)


def test_amortized_vem_recovers_a_small_simulation():
    """60 fitted / 20 held-out subjects (≈ 15 s). Tolerances are loose for 60 subjects: θ and σ within 15 %, Ω
    within 50 % (measured: worst θ 6 %, Ω_ka 0.093 vs 0.16 — the FOCE-I SE of Ω_ka, 0.018, understates its
    sampling SD ≈ 0.03 at N = 60); held-out IS −2LL within 2 % (measured 0.24 %)."""
    fit, truth, lik_a, lik_p, _ = _recover(60, 20, covariance=None)
    rel = (fit.estimates - truth).abs() / truth
    om = [c for c in rel.index if c.startswith("omega")]
    assert (rel.drop(om) < 0.15).all(), rel
    assert (rel[om] < 0.5).all(), rel
    assert abs(lik_a.m2ll - lik_p["m2ll"]) <= 0.02 * abs(lik_p["m2ll"]), (lik_a.m2ll, lik_p["m2ll"])


@pytest.mark.slow
def test_amortized_vem_recovers_2000_subjects():
    """2000 fitted / 200 held-out subjects (≈ 100 s): θ, Ω, σ within 3 SE (FOCE-I sandwich at the VEM
    estimates) of the truth (measured max |z| 1.85, σ 1.45); held-out IS −2LL of the amortized posteriors (no
    optimisation) within 2 % of per-subject VEM's. Tight convergence (min_steps 3000, tol 3e-5):
    with the default tol the run stopped at 1010 steps with σ at z = 7.1 and Ω_ka at z = −4.0 (the amortization
    gap inflates σ and shrinks Ω until the encoder is trained further)."""
    fit, truth, lik_a, lik_p, times = _recover(2000, 200, covariance="sandwich", min_steps=3000, tol=3e-5)
    z = (fit.estimates - truth) / fit.se
    print("z:", z.round(2).to_dict(), "held-out -2LL amortized", lik_a.m2ll, "per-subject", lik_p["m2ll"],
          "times", times)
    assert (z.abs() < 3).all(), z
    # two-sided (the acceptance line). Before the per-subject parameters were whitened (FlowFamily's
    # reference frame) one held-out subject's q was thrown into a secondary flip-flop mode: 1557 vs 1357.
    assert abs(lik_a.m2ll - lik_p["m2ll"]) <= 0.02 * abs(lik_p["m2ll"]), (lik_a.m2ll, lik_p["m2ll"])
