"""Per-subject variational EM: the IS −2LL at the VEM estimates against the AGQ optimum on theophylline, the
ELBO as a bound, the Gaussian family exact on the linear-Gaussian model, seeded reproducibility, checkpoint →
resume giving the same trajectory, and option validation."""
import linear_gaussian as lg
import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal
from torch.distributions import Distribution

import nlmefit
import nlmefit.estimators.vem as vem_mod  # noqa: F401  (registers method="vem")
from nlmefit.estimators import get_estimator


def _theo():
    return nlmefit.library.get("1cmt_oral", error="additive"), nlmefit.datasets.load("theophylline")


@pytest.fixture(scope="module")
def agq_ofv():
    """The AGQ −2LL (OFV scale, 9 nodes) at the AGQ optimum (≈ 118.10)."""
    model, df = _theo()
    fit = nlmefit.fit(model, df, method="agq", n_nodes=5, covariance=None)
    return nlmefit.loglik(fit, "agq", n_nodes=9).ofv


@pytest.fixture(scope="module")
def theo_gaussian():
    model, df = _theo()
    return nlmefit.fit(model, df, method="vem", seed=1, posterior="gaussian")


def _check_against_agq(fit, agq_ofv):
    assert abs(agq_ofv - 118.10) < 0.05
    lik = fit.likelihoods["is"]
    assert lik["proposal"] == fit.options["posterior"] and lik["se"] < 0.5
    assert abs(fit.ofv - agq_ofv) < 1.0, (fit.ofv, agq_ofv)
    elbo = fit.likelihoods["elbo"]
    assert set(elbo) >= {"elbo", "m2elbo", "se"} and "ofv" not in elbo
    assert elbo["m2elbo"] == pytest.approx(-2 * elbo["elbo"])
    # the ELBO is a lower bound on log L (−2·ELBO ≥ −2LL, up to Monte-Carlo error)
    assert elbo["m2elbo"] >= lik["m2ll"] - 3 * np.hypot(elbo["se"], lik["se"])


def test_gaussian_vem_reaches_the_agq_optimum_on_theophylline(theo_gaussian, agq_ofv):
    fit = theo_gaussian
    _check_against_agq(fit, agq_ofv)
    assert fit.method == "vem" and fit.converged
    assert isinstance(fit.posterior, Distribution) and tuple(fit.posterior.batch_shape) == (12,)
    assert "FOCE-I linearisation at the VEM estimates" in (fit.covariance_message or "")
    assert fit.se.notna().all()
    tr = fit.traces
    assert tr.index.name == "iteration" and len(tr) == fit.n_iter
    assert {"elbo", "elbo_smoothed", "cl", "omega_cl", "sigma_add"} <= set(tr.columns)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["maf", "nsf"])
def test_flow_vem_reaches_the_agq_optimum_on_theophylline(kind, agq_ofv, theo_gaussian):
    model, df = _theo()
    fit = nlmefit.fit(model, df, method="vem", seed=1, posterior=kind, covariance=None)
    _check_against_agq(fit, agq_ofv)
    # a richer family cannot be a worse bound at the optimum (beyond Monte-Carlo/optimisation noise)
    assert fit.likelihoods["elbo"]["elbo"] > theo_gaussian.likelihoods["elbo"]["elbo"] - 0.5


def _exact_loglik(df, est) -> float:
    """The exact linear-Gaussian log-likelihood at estimates ``est`` (θa, θb, Ω block, σ)."""
    om = np.array([[est["omega_a"], est["omega_a_b"]], [est["omega_a_b"], est["omega_b"]]])
    out = 0.0
    for _, g in df.groupby("ID", sort=True):
        X = np.column_stack([np.ones(len(g)), g["TIME"].to_numpy()])
        cov = X @ om @ X.T + est["sigma_add"] ** 2 * np.eye(len(g))
        out += multivariate_normal(X @ np.array([est["ta"], est["tb"]]), cov).logpdf(g["DV"].to_numpy())
    return float(out)


@pytest.mark.parametrize("batch_size", [None, 10])
def test_gaussian_family_is_exact_on_the_linear_gaussian_model(batch_size):
    df = lg.data(n=30, seed=4)
    # STL: the path-derivative gradient of φ vanishes at the exact posterior, so q_i settles on it
    fit = nlmefit.fit(lg.model(), df, method="vem", seed=2, covariance=None, stl=True, batch_size=batch_size,
                      n_elbo=2000)
    assert fit.converged
    exact_at_vem = _exact_loglik(df, fit.estimates)
    ml = nlmefit.fit(lg.model(), df, method="laplace", covariance=None)  # Laplace is exact here: the MLE
    exact_max = _exact_loglik(df, ml.estimates)
    elbo = fit.likelihoods["elbo"]
    se_elbo = elbo["se"] / 2  # "se" is the SE of −2·ELBO
    # the Gaussian family contains the exact posterior: ELBO = log L at the VEM optimum (measured gap 0.003) …
    assert elbo["elbo"] == pytest.approx(exact_at_vem, abs=0.02 + 3 * se_elbo)
    assert elbo["elbo"] <= exact_at_vem + 3 * se_elbo
    # … and that optimum is the maximum-likelihood one (within the optimiser's tolerance)
    assert exact_at_vem == pytest.approx(exact_max, abs=0.1)
    assert fit.loglik == pytest.approx(exact_at_vem, abs=0.02)


FAST = dict(posterior="maf", max_steps=40, min_steps=40, n_samples=2, batch_size=6, stl=True, n_elbo=50, n_is=100,
            covariance=None, flow_options={"hidden": (8,), "context_dim": 2, "transforms": 1})


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_seeded_runs_are_reproducible():
    model, df = _theo()
    a = nlmefit.fit(model, df, method="vem", seed=5, **FAST)
    b = nlmefit.fit(model, df, method="vem", seed=5, **FAST)
    c = nlmefit.fit(model, df, method="vem", seed=6, **FAST)
    assert a.traces.equals(b.traces) and a.ofv == b.ofv
    assert not a.traces.equals(c.traces)


def interrupted_then_resumed(model, df, options: dict, tmp_path, monkeypatch):
    """(uninterrupted fit, fit interrupted after 25 steps and resumed from its step-20 checkpoint, checkpoint)."""
    full = nlmefit.fit(model, df, method="vem", seed=3, **options)
    ck = tmp_path / "vem.pt"
    calls = {"n": 0}
    original = vem_mod.VEM._step

    def crashing(self, run):
        calls["n"] += 1
        if calls["n"] > 25:
            raise KeyboardInterrupt("simulated interruption")
        return original(self, run)

    monkeypatch.setattr(vem_mod.VEM, "_step", crashing)
    with pytest.raises(KeyboardInterrupt):
        nlmefit.fit(model, df, method="vem", seed=3, checkpoint=ck, checkpoint_every=10, **options)
    monkeypatch.setattr(vem_mod.VEM, "_step", original)
    state = torch.load(ck, weights_only=True)
    resumed = nlmefit.fit(model, df, method="vem", checkpoint=ck, checkpoint_every=10, resume=True, **options)
    return full, resumed, state


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_resume_from_a_checkpoint_gives_the_uninterrupted_trajectory(tmp_path, monkeypatch):
    model, df = _theo()
    full, resumed, state = interrupted_then_resumed(model, df, FAST, tmp_path, monkeypatch)
    assert state["k"] == 20
    assert resumed.seed == 3 and any("resumed" in m for m in resumed.messages)
    np.testing.assert_array_equal(resumed.traces.to_numpy(), full.traces.to_numpy())
    pd_equal = resumed.estimates.equals(full.estimates)
    assert pd_equal and resumed.ofv == full.ofv
    # a checkpoint of another run is refused
    with pytest.raises(nlmefit.ModelSpecError, match="different run"):
        nlmefit.fit(model, df, method="vem", seed=4, checkpoint=tmp_path / "vem.pt", resume=True, **FAST)


@pytest.mark.parametrize("bad", [dict(posterior="realnvp"), dict(schedule="linear"), dict(lr=-1.0),
                                 dict(n_samples=0), dict(batch_size=0), dict(omega_update="newton"),
                                 dict(resume=True), dict(flow_options={"layers": 3}), dict(lr_final=2.0),
                                 dict(no_such_option=1), dict(covariance="hessian")])
def test_a_bad_option_is_a_model_spec_error(bad):
    with pytest.raises(nlmefit.ModelSpecError):
        get_estimator("vem", **bad)


def test_vem_from_the_cli(tmp_path, capsys):
    """`nlmefit fit ... --method vem` fits, reports the IS OFV and the ELBO separately, and re-reads."""
    import json

    from nlmefit.cli import main

    out = tmp_path / "vem"
    assert main(["fit", "theophylline", "--method", "vem", "--seed", "1", "--no-cov", "--quiet", "--out",
                 str(out)]) == 0
    text = capsys.readouterr().out
    assert "-2*ELBO" in text and "not an OFV" in text
    d = json.loads((out / "result.json").read_text())
    assert d["method"] == "vem" and "elbo" in d["likelihoods"] and "is" in d["likelihoods"]
    assert abs(d["ofv"] - 118.1) < 1.0
    assert main(["fit", "theophylline", "--method", "focei", "--stl", "--out", str(tmp_path / "x"),
                 "--quiet"]) == 2


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_resume_from_an_incompatible_checkpoint_is_a_clear_error(tmp_path):
    """A checkpoint whose posterior state does not fit this version's family (e.g. written before the per-subject
    reference frame: no ``offset``) is refused with the file named, not a torch state-dict traceback."""
    model, df = _theo()
    ck = tmp_path / "vem.pt"
    opts = {**FAST, "max_steps": 10, "min_steps": 10}
    nlmefit.fit(model, df, method="vem", seed=3, checkpoint=ck, **opts)
    state = torch.load(ck, weights_only=True)
    state["family"] = {k: v for k, v in state["family"].items() if k != "offset"}
    torch.save(state, ck)
    with pytest.raises(nlmefit.ModelSpecError, match="does not match this version's posterior family"):
        nlmefit.fit(model, df, method="vem", seed=3, checkpoint=ck, resume=True, **opts)
