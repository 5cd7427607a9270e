"""CUDA versus CPU (issue 15, GPU readiness): ``pytest -m gpu`` on a machine with a CUDA device; skipped elsewhere.

Outside truth: the same computation on the CPU in float64. Deterministic work (the classical objectives and their
gradients, the fits, the covariance step, predictions, AGQ) must agree to 1e-8 relative — the acceptance line;
float64 kernels differ between devices only in summation order (~1e-14). Random streams differ between the CPU
and CUDA generators, so seeded stochastic work (SAEM, IS, VEM, simulation) is compared within its Monte-Carlo
error instead: the −2LL by IS within 4 standard errors, SAEM and VEM estimates within 10 % (the between-seed
spread on pheno is ~2 %), simulated summaries within 4 standard errors.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import nlmefit
from nlmefit.marginal import marginal_loglik
from nlmefit.models.examples import pheno_real

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def pheno():
    return nlmefit.datasets.load("pheno")


@pytest.mark.parametrize("method", ["fo", "foce", "focei", "laplace"])
def test_objective_and_gradient_match_the_cpu(pheno, method):
    model = pheno_real()
    out = {}
    for dev in ("cpu", "cuda"):
        est = nlmefit.get_estimator(method, device=dev)
        data = model.prepare(nlmefit.Panel.from_dataframe(pheno), device=dev)
        pset = model.parameters
        u = pset.to_unconstrained(pset.initial(torch.float64, data.y.device)).detach().requires_grad_(True)
        eta = torch.zeros(data.n_subjects, data.q, dtype=torch.float64, device=data.y.device)
        val, _ = est.evaluate(model, pset.from_unconstrained(u), data, eta, backward_to=u)
        out[dev] = (val, u.grad.detach().cpu().numpy())
    assert out["cuda"][0] == pytest.approx(out["cpu"][0], rel=1e-8)
    assert np.allclose(out["cuda"][1], out["cpu"][1], rtol=1e-8, atol=1e-8 * np.abs(out["cpu"][1]).max())


@pytest.mark.parametrize("method", ["fo", "focei", "laplace", "agq"])
def test_fits_match_the_cpu(pheno, method):
    cpu = nlmefit.fit(pheno_real(), pheno, method=method, device="cpu")
    gpu = nlmefit.fit(pheno_real(), pheno, method=method, device="cuda")
    assert gpu.ofv == pytest.approx(cpu.ofv, rel=1e-8)
    assert np.allclose(gpu.estimates, cpu.estimates, rtol=1e-6)
    assert np.allclose(gpu.se, cpu.se, rtol=1e-5)
    a, b = gpu.predictions.select_dtypes("number"), cpu.predictions.select_dtypes("number")
    assert np.allclose(a.to_numpy(float), b.to_numpy(float), rtol=1e-6, atol=1e-9, equal_nan=True)


def test_importance_sampling_agrees_within_its_error(pheno):
    fit = nlmefit.fit(pheno_real(), pheno, method="focei", covariance=None)
    res = {}
    for dev in ("cpu", "cuda"):
        model = pheno_real()
        data = model.prepare(nlmefit.Panel.from_dataframe(pheno), device=dev)
        p = fit.population_parameters(device=data.y.device)
        res[dev] = marginal_loglik(model, p, data, "is", n_samples=2000, seed=1)
    se = math.hypot(res["cpu"].se, res["cuda"].se)
    assert abs(res["cuda"].ofv - res["cpu"].ofv) < 4 * se + 1e-6


@pytest.mark.parametrize("method", ["saem", "vem"])
def test_stochastic_estimators_run_on_cuda(pheno, method):
    opts = {"saem": dict(n_explore=100, n_smooth=100, n_samples=500, covariance=None),
            "vem": dict(max_steps=600, covariance=None)}[method]
    cpu = nlmefit.fit(pheno_real(), pheno, method=method, seed=3, device="cpu", **opts)
    gpu = nlmefit.fit(pheno_real(), pheno, method=method, seed=3, device="cuda", **opts)
    assert np.isfinite(gpu.ofv)
    for k in ("tvcl", "tvv"):
        assert gpu.estimates[k] == pytest.approx(cpu.estimates[k], rel=0.10), k


def test_simulation_runs_on_cuda_and_matches_in_distribution():
    model = nlmefit.library.get("1cmt_oral", error="additive", theta={"cl": 2.0, "v": 30.0, "ka": 1.2},
                                omega={"cl": 0.09, "v": 0.04, "ka": 0.16}, sigma={"add": 0.2})
    design = dict(times=[1.0, 4.0, 12.0], doses=[{"TIME": 0.0, "AMT": 100.0, "CMT": 1}], n_subjects=4000)
    sims = {dev: nlmefit.simulate(model, None, seed=5, device=dev, **design) for dev in ("cpu", "cuda")}
    a = sims["cpu"].loc[sims["cpu"]["EVID"] == 0].groupby("TIME")["DV"]
    b = sims["cuda"].loc[sims["cuda"]["EVID"] == 0].groupby("TIME")["DV"]
    se = np.sqrt(a.var() / a.count() + b.var() / b.count())
    assert (np.abs(a.mean() - b.mean()) < 4 * se).all()
