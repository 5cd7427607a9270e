"""NUTS (pyro) on the model interface: draws and result of a short run, seeded reproducibility, agreement with
FOCE-I, the joint density (non-centred = centred + Jacobian, natural-scale priors with their Jacobian), prior and
option validation, θ held fixed; and (slow) the acceptance check against a long independent reference run.

The default suite keeps each run to a few seconds on one thread (chains of 5-150 draws, tree depth capped)."""
import json
import math
import pathlib
import time
import warnings

import numpy as np
import pytest
import torch
from torch.distributions import Gamma, HalfNormal, LogNormal, Normal

import nlmefit
from nlmefit.errors import ModelSpecError
from nlmefit.estimators.nuts import (
    NUTS,
    JointDensity,
    chain_diagnostics,
    find_map,
    laplace_inverse_mass,
    omega_coordinates,
    posterior_summary,
    sample_nuts,
)
from nlmefit.models import Omega

REFERENCE = pathlib.Path(__file__).parent / "results" / "theo_nuts_reference.json"
THETA = ("cl", "v", "ka")


def _theo(**kw):
    return nlmefit.library.get("1cmt_oral", error="additive", **kw), nlmefit.datasets.load("theophylline")


@pytest.fixture(scope="module")
def short():
    """2 chains x 60 draws after 60 warm-up, tree depth <= 4 (about 10 s on one thread)."""
    model, df = _theo()
    est = NUTS(num_chains=2, num_samples=60, warmup_steps=60, max_tree_depth=4, ofv_samples=500)
    model, mdata = est.bind(model, df)
    post = est.sample(model, mdata, seed=11)
    return est, model, mdata, post


def test_short_run_gives_finite_draws_of_the_right_shapes_and_a_result(short):
    est, model, mdata, post = short
    n, q, p = mdata.n_subjects, mdata.q, model.parameters.n_free
    assert post.samples.draws["u"].shape == (2, 60, p)
    assert post.samples.draws["z"].shape == (2, 60, n, q)
    assert post.natural.shape == (2, 60, p) and post.eta.shape == (2, 60, n, q)
    assert bool(torch.isfinite(post.natural).all()) and bool(torch.isfinite(post.eta).all())
    assert len(post.samples.step_size) == 2 and all(s > 0 for s in post.samples.step_size)
    assert post.init["map_used"] and post.init["laplace_metric"]
    # non-centred: η = L(θ) z draw by draw
    k = 17
    u, z = post.samples.draws["u"][1, k], post.samples.draws["z"][1, k]
    L = torch.linalg.cholesky(model.prior_covariance(model.parameters.from_unconstrained(u), 0))
    torch.testing.assert_close(post.eta[1, k], z @ L.T)
    torch.testing.assert_close(post.natural[1, k], model.parameters.to_natural_vector(
        model.parameters.from_unconstrained(u)))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = est.result(model, mdata, post, seed=11)
    ok = post.max_r_hat < 1.01 and post.samples.n_divergent == 0  # 120 draws: usually not, by the 1.01 rule
    assert res.converged == ok
    assert any("nuts:" in str(w.message) for w in caught) == (not ok)
    assert res.method == "nuts" and np.isfinite(res.ofv) and "is" in res.likelihoods
    assert res.posterior_draws.shape == (120, n, q)
    np.testing.assert_allclose(res.individual_estimates[[f"ETA_{e}" for e in model.eta_names]].to_numpy(),
                               post.eta.mean((0, 1)).numpy(), rtol=1e-10)
    means = post.natural.reshape(-1, p).mean(0).numpy()
    np.testing.assert_allclose(res.estimates[post.names].to_numpy(), means, rtol=1e-10)
    assert res.covariance_kind == "posterior" and res.covariance_ok
    np.testing.assert_allclose(res.se[post.names].to_numpy(), post.natural.reshape(-1, p).std(0).numpy(), rtol=1e-8)
    tab = res.mcmc
    assert list(tab.index) == post.names
    assert {"mean", "sd", "q2.5", "q50", "q97.5", "r_hat", "ess_bulk", "ess", "mcse"} <= set(tab.columns)
    assert (tab["q2.5"] < tab["q50"]).all() and (tab["q50"] < tab["q97.5"]).all()
    np.testing.assert_allclose(tab["mcse"], tab["sd"] / np.sqrt(tab["ess"]))
    assert tab.attrs["divergences"] == post.samples.n_divergent


def test_posterior_means_agree_with_focei(short):
    """E[log θ] vs log θ̂(FOCE-I) within 3 FOCE-I SEs on the log scale (SE(θ)/θ). Justification: with 12
    information-rich subjects and a prior of SD 2 on log θ the posterior is close to normal around the ML estimate
    in log θ, so E[log θ] and log θ̂ differ by a small fraction of a posterior SD, which is about one SE here (the
    long runs: |E[log θ] − log θ̂| < 0.2 SE for cl, v and ka). The short depth-capped run has an ESS of
    only ~5-25 per parameter, a Monte Carlo error of up to ~0.5 posterior SD; 3 SE covers both with room (seed 11:
    |z| < 0.3), while a wrong density (a lost Jacobian, a mis-scaled η) moves log ka or log v by many SEs."""
    est, model, mdata, post = short
    focei = nlmefit.fit(*_theo(), method="focei")
    for name in THETA:
        k = post.names.index(name)
        m = float(torch.log(post.natural[..., k]).mean())
        se_log = focei.se[name] / focei.estimates[name]
        assert abs(m - math.log(focei.estimates[name])) < 3 * se_log, (name, m, focei.estimates[name], se_log)


def test_seeded_runs_are_identical_and_leave_the_global_rng_alone():
    model, df = _theo()
    est = NUTS(num_chains=2, num_samples=5, warmup_steps=5, max_tree_depth=4, map_steps=30)
    model, mdata = est.bind(model, df)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = est.sample(model, mdata, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    b = est.sample(model, mdata, seed=5)
    c = est.sample(model, mdata, seed=6)
    for site in ("u", "z"):
        assert torch.equal(a.samples.draws[site], b.samples.draws[site])
    assert torch.equal(a.eta, b.eta) and a.samples.seeds == b.samples.seeds
    assert not torch.equal(a.samples.draws["z"], c.samples.draws["z"])
    assert a.samples.seeds[0] != a.samples.seeds[1]  # chains have their own seeds


def test_sample_population_false_keeps_theta_fixed_and_samples_eta_given_theta():
    model, df = _theo(theta={"cl": 2.8, "v": 32.0, "ka": 1.5})
    est = NUTS(num_chains=1, num_samples=30, warmup_steps=30, max_tree_depth=4, sample_population=False,
               ofv_samples=200)
    model, mdata = est.bind(model, df)
    post = est.sample(model, mdata, seed=3)
    assert post.samples.draws["u"].shape == (1, 30, 0)
    assert torch.equal(post.natural, post.natural[:, :1].expand_as(post.natural))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # 30 draws: R-hat may exceed 1.01
        res = est.result(model, mdata, post, seed=3)
    init = model.parameters.natural_dict(model.initial_params())
    assert res.estimates.to_dict() == pytest.approx(init, rel=1e-12)
    assert res.posterior_draws.shape == (30, 12, 3) and float(res.posterior_draws.std(0).min()) > 0
    assert res.mcmc.empty and res.covariance is None


def test_joint_density_terms():
    """Non-centred = centred at η = Lz plus N·log|det L|; the default prior is N(u0, 2²) per coordinate; a
    natural-scale prior adds log|dx/du| (x = e^u for θ and σ, e^{2u} for a 1×1 Ω variance)."""
    model, df = _theo()
    mdata = model.prepare(df)
    nc = JointDensity(model, mdata)
    ce = JointDensity(model, mdata, centered=True)
    g = torch.Generator().manual_seed(0)
    u = nc.u0 + 0.3 * torch.randn(nc.u0.shape, generator=g, dtype=torch.float64)
    z = torch.randn(mdata.n_subjects, mdata.q, generator=g, dtype=torch.float64)
    p = model.parameters.from_unconstrained(u)
    L = torch.linalg.cholesky(model.prior_covariance(p, 0))
    eta = z @ L.T
    logdet = torch.log(torch.diagonal(L)).sum()
    torch.testing.assert_close(nc(u, z), ce(u, eta) + mdata.n_subjects * logdet)
    # the bracket is log N(z; 0, I)
    lz = Normal(0.0, 1.0).log_prob(z).sum()
    expect = model.log_lik(p, eta, mdata).sum() + lz + Normal(nc.u0, 2.0).log_prob(u).sum()
    torch.testing.assert_close(nc(u, z), expect)

    f64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731 - float64 priors: exact finite differences
    priors = {"cl": LogNormal(f64(1.0), f64(1.0)), "sigma_add": HalfNormal(f64(1.0)),
              "omega_ka": Gamma(f64(2.0), f64(4.0))}
    pr = JointDensity(model, mdata, priors=priors)
    names = model.parameters.natural_names
    ic, isg, io = names.index("cl"), names.index("sigma_add"), names.index("omega_ka")
    x = model.parameters.to_natural_vector(p)
    want = sum(Normal(nc.u0[k], 2.0).log_prob(u[k]) for k in range(len(u)) if k not in (ic, isg, io))
    want = want + LogNormal(1.0, 1.0).log_prob(x[ic]) + u[ic]
    want = want + HalfNormal(1.0).log_prob(x[isg]) + u[isg]
    want = want + Gamma(2.0, 4.0).log_prob(x[io]) + math.log(2.0) + 2 * u[io]
    torch.testing.assert_close(pr.log_prior_u(u), want.to(torch.float64))
    # and its gradient (the Jacobian term is differentiable, as NUTS needs)
    uu = u.clone().requires_grad_(True)
    (g1,) = torch.autograd.grad(pr.log_prior_u(uu), uu)
    eps = 1e-5
    num = torch.stack([(pr.log_prior_u(u + eps * e) - pr.log_prior_u(u - eps * e)) / (2 * eps)
                       for e in torch.eye(len(u), dtype=torch.float64)])
    torch.testing.assert_close(g1, num, rtol=1e-5, atol=1e-6)


def test_laplace_metric_is_the_inverse_hessian():
    model, df = _theo()
    mdata = model.prepare(df)
    dens = JointDensity(model, mdata)
    z0 = torch.zeros(mdata.n_subjects, mdata.q, dtype=torch.float64)
    u, z, _ = find_map(dens, dens.u0, z0, 100, hold=omega_coordinates(model.parameters))
    P = u.numel()
    x0 = torch.cat([u, z.reshape(-1)])
    H = torch.autograd.functional.hessian(lambda x: -dens(x[:P], x[P:].reshape(z.shape)), x0)
    assert bool(torch.linalg.eigvalsh(H).min() > 0)
    C = torch.linalg.inv(H)
    torch.testing.assert_close(laplace_inverse_mass(dens, u, z, full=True), C, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(laplace_inverse_mass(dens, u, z), torch.diagonal(C), rtol=1e-8, atol=1e-10)


def test_prior_validation():
    model, df = _theo()
    mdata = model.prepare(df)
    with pytest.raises(ModelSpecError, match="unknown parameter 'CL'.*'cl'"):
        JointDensity(model, mdata, priors={"CL": LogNormal(0.0, 1.0)})
    with pytest.raises(ModelSpecError, match="torch.distributions"):
        JointDensity(model, mdata, priors={"cl": 3.0})
    JointDensity(model, mdata, priors={"cl": Normal(2.0, 1.0)})  # θ_cl > 0: a prior on R is merely truncated
    free = nlmefit.library.get("1cmt_oral", error="additive", theta={"ka": nlmefit.Param(1.5)})  # ka on R
    with pytest.raises(ModelSpecError, match="support"):
        JointDensity(free, free.prepare(df), priors={"ka": HalfNormal(1.0)})
    with pytest.raises(ModelSpecError, match="scalar"):
        JointDensity(model, mdata, priors={"cl": LogNormal(torch.zeros(2), 1.0)})
    blk = nlmefit.library.get("1cmt_oral", error="additive",
                              omega=Omega({"cl": 0.1, "v": 0.1, "ka": 0.1}, blocks=[("cl", "v")],
                                          cov={("cl", "v"): 0.01}))
    bdata = blk.prepare(df)
    with pytest.raises(ModelSpecError, match="multi-element omega block"):
        JointDensity(blk, bdata, priors={"omega_cl_v": Normal(0.0, 1.0)})
    with pytest.raises(ModelSpecError, match="multi-element omega block"):
        JointDensity(blk, bdata, priors={"omega_v": Gamma(2.0, 2.0)})
    JointDensity(blk, bdata, priors={"omega_ka": Gamma(2.0, 2.0)})  # a 1x1 block is an elementwise map
    fixed = nlmefit.library.get("1cmt_oral", error="additive", theta={"cl": 2.8, "v": 32.0,
                                                                      "ka": nlmefit.fix(1.5)})
    with pytest.raises(ModelSpecError, match="FIX"):
        JointDensity(fixed, fixed.prepare(df), priors={"ka": LogNormal(0.0, 1.0)})
    with pytest.raises(ModelSpecError, match="unknown parameter 'nope'"):
        nlmefit.fit(model, df, method="nuts", priors={"nope": LogNormal(0.0, 1.0)}, num_chains=1,
                    num_samples=4, warmup_steps=0)


@pytest.mark.parametrize("bad", [dict(num_chains=0), dict(num_samples=2), dict(warmup_steps=-1),
                                 dict(num_chains=1.5), dict(target_accept_prob=1.0), dict(max_tree_depth=0),
                                 dict(full_mass="yes"), dict(centered=1), dict(covariance="sandwich"),
                                 dict(init_strategy="prior"), dict(init_mass="dense"), dict(init_jitter=-1.0),
                                 dict(priors=[("cl", LogNormal(0.0, 1.0))]), dict(priors={"cl": "lognormal"})])
def test_option_validation(bad):
    with pytest.raises(ModelSpecError):
        NUTS(**bad)


def test_core_sampler_on_a_known_gaussian():
    """The model-agnostic core on log N(u; 1, 0.5²) + log N(z; 0, I): the sample moments are right."""
    def logp(u, z):
        return Normal(1.0, 0.5).log_prob(u).sum() + Normal(0.0, 1.0).log_prob(z).sum()

    u0 = torch.zeros(2, dtype=torch.float64)
    z0 = torch.zeros(3, 2, dtype=torch.float64)
    s = sample_nuts(logp, u0, z0, num_chains=2, num_samples=150, warmup_steps=100, seed=0)
    u = s.draws["u"].reshape(-1, 2)
    assert abs(float(u.mean()) - 1.0) < 0.1 and abs(float(u.std()) - 0.5) < 0.1
    assert s.n_divergent == 0
    d = chain_diagnostics(s.draws["u"])
    assert float(d["r_hat"].max()) < 1.05 and float(d["ess"].min()) > 50
    tab = posterior_summary({"a": s.draws["u"][..., 0], "const": torch.ones(2, 150), "b": s.draws["z"][:, :, 0, 0]})
    assert tab.loc["a", "q2.5"] < 1.0 < tab.loc["a", "q97.5"]
    assert tab.loc["const", ["r_hat", "ess", "ess_bulk", "mcse"]].isna().all()  # and it does not spoil the others
    assert np.isfinite(tab.loc[["a", "b"], ["r_hat", "ess", "ess_bulk", "mcse"]].to_numpy()).all()


# --------------------------------------------------------------------------------------------- acceptance (slow)
@pytest.mark.slow
def test_acceptance_against_the_long_reference_run():
    """4 chains x 1000 draws (1000 warm-up), default settings: every split R-hat < 1.01, no divergences, and the
    posterior means of log θ_cl, log θ_v, log θ_ka within 2 Monte Carlo SEs of the long independent run stored in
    tests/results/theo_nuts_reference.json (4 x 4000 draws, another seed). The SE of the difference combines both
    runs' MC SEs (each sd/√ESS)."""
    ref = json.loads(REFERENCE.read_text())
    model, df = _theo()
    est = NUTS(num_chains=4, num_samples=1000, warmup_steps=1000)
    model, mdata = est.bind(model, df)
    t0, c0 = time.perf_counter(), time.process_time()
    post = est.sample(model, mdata, seed=7)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"theo NUTS 4x1000 (+1000 warm-up): wall {wall:.0f} s, CPU {cpu:.0f} s, "
          f"{sum(post.samples.n_evals)} gradient evaluations, step sizes {post.samples.step_size}")
    print(post.summary.to_string())
    assert float(post.summary["r_hat"].max()) < 1.01, post.summary
    assert post.max_r_hat < 1.01 and post.samples.n_divergent == 0
    logs = {f"log_{n}": torch.log(post.natural[..., post.names.index(n)]) for n in THETA}
    tab = posterior_summary(logs)
    for name in logs:
        r = ref["summary"][name]
        se = math.hypot(tab.loc[name, "mcse"], r["mcse"])
        assert abs(tab.loc[name, "mean"] - r["mean"]) < 2 * se, (name, tab.loc[name].to_dict(), r)


def test_nuts_from_the_cli_writes_a_result_that_reads_back(tmp_path, capsys):
    """`nlmefit fit ... --method nuts`: a short run (too short to converge: exit 1 and an R-hat warning) writes
    result.json with the sampler diagnostics, and FitResult.from_json restores it with its model."""
    import json

    from nlmefit.cli import main

    out = tmp_path / "nuts"
    rc = main(["fit", "theophylline", "--method", "nuts", "--chains", "2", "--draws", "30", "--warmup", "30",
               "--seed", "3", "--quiet", "--out", str(out)])
    assert rc in (0, 1)
    d = json.loads((out / "result.json").read_text())
    assert d["method"] == "nuts" and d["mcmc"] is not None and "is" in d["likelihoods"]
    back = nlmefit.FitResult.from_json(out / "result.json")
    assert back.model is not None and back.mcmc is not None and "r_hat" in back.mcmc.columns
    assert back.converged == (rc == 0)
    assert "Traceback" not in capsys.readouterr().err
