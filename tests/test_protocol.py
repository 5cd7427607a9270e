"""The one interface: a PPCA model written against the LatentModel protocol alone (tests/ppca_model.py, < 40
lines) is fitted by Laplace and SAEM, and checked against the closed-form PPCA maximum likelihood (Tipping &
Bishop 1999): Laplace is exact for a linear-Gaussian latent model, so its per-subject log-likelihood must equal
log N(y_i; μ, WWᵀ + σ²I) to rounding; SAEM must land within 3 SE of the closed-form MLE."""
import math

import numpy as np
import pandas as pd
import pytest
import torch
from ppca_model import PPCA

import nlmefit
from nlmefit.marginal import marginal_loglik
from nlmefit.models.protocol import LatentModel, Linearisable, MuReferenced

D, N = 4, 200
W_TRUE = np.array([[1.5], [-1.0], [0.8], [0.3]])
MU_TRUE = np.array([2.0, -1.0, 0.5, 0.0])
SIGMA_TRUE = 0.4


def ppca_frame(seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = MU_TRUE + rng.standard_normal((N, 1)) @ W_TRUE.T + SIGMA_TRUE * rng.standard_normal((N, D))
    df = pd.DataFrame({"ID": np.repeat(np.arange(1, N + 1), D), "TIME": np.tile(np.arange(D, dtype=float), N),
                       "DV": y.ravel()})
    return df, y


def closed_form_mle(y: np.ndarray, q: int = 1):
    """μ = ȳ, σ² = mean of the d − q smallest eigenvalues of S, W = U_q (Λ_q − σ²I)^½ (derived here, not
    taken from the package)."""
    mu = y.mean(0)
    S = np.cov(y.T, bias=True)
    lam, U = np.linalg.eigh(S)
    lam, U = lam[::-1], U[:, ::-1]
    s2 = lam[q:].mean()
    W = U[:, :q] * np.sqrt(lam[:q] - s2)
    return mu, W, s2


def log_normal_rows(y, mu, C):
    """log N(y_i; μ, C) for every row, by the Cholesky factor."""
    L = np.linalg.cholesky(C)
    z = np.linalg.solve(L, (y - mu).T)
    return -0.5 * (y.shape[1] * math.log(2 * math.pi) + (z * z).sum(0)) - np.log(np.diag(L)).sum()


def _weights(fit):
    est = fit.estimates
    mu = np.array([est[f"mu[{j}]"] for j in range(D)])
    W = np.array([[est[f"W[{j},0]"]] for j in range(D)])
    return mu, W, est["sigma_eps"] ** 2


@pytest.fixture(scope="module")
def data():
    return ppca_frame()


@pytest.fixture(scope="module")
def laplace_fit(data):
    df, _ = data
    return nlmefit.fit(PPCA(D), df, method="laplace")


def test_ppca_implements_the_protocol_and_is_small():
    m = PPCA(D)
    assert isinstance(m, LatentModel) and isinstance(m, Linearisable) and not isinstance(m, MuReferenced)
    import ast
    import pathlib

    src = (pathlib.Path(__file__).parent / "ppca_model.py").read_text()
    cls = next(n for n in ast.parse(src).body if isinstance(n, ast.ClassDef))
    assert cls.end_lineno - cls.lineno + 1 < 40


def test_laplace_is_the_closed_form_ppca_likelihood(data, laplace_fit):
    df, y = data
    fit = laplace_fit
    mu, W, s2 = _weights(fit)
    # per subject, at the fitted values: Laplace == exact (tolerance 1e-6: float64 rounding of a q=1 Hessian)
    ll = marginal_loglik(fit.model, fit.population_parameters(), fit.data, method="laplace")
    np.testing.assert_allclose(ll.loglik_i, log_normal_rows(y, mu, W @ W.T + s2 * np.eye(D)), atol=1e-6)
    # and the optimum is the closed-form MLE (W up to its sign)
    mu0, W0, s20 = closed_form_mle(y)
    W0 = W0 * np.sign(W0[0, 0] * W[0, 0])
    best = log_normal_rows(y, mu0, W0 @ W0.T + s20 * np.eye(D)).sum()
    assert fit.loglik == pytest.approx(best, abs=1e-6)
    np.testing.assert_allclose(mu, mu0, atol=1e-4)
    np.testing.assert_allclose(W, W0, atol=1e-4)
    assert s2 == pytest.approx(s20, rel=1e-4)
    assert fit.covariance_ok and fit.se.drop(fit.fixed).notna().all() and fit.se[fit.fixed].isna().all()


def test_saem_lands_within_three_se_of_the_closed_form_mle(data, laplace_fit):
    df, y = data
    fit = nlmefit.fit(PPCA(D), df, method="saem", seed=2, n_explore=100, n_smooth=100, n_samples=500)
    mu0, W0, s20 = closed_form_mle(y)
    mle = {f"mu[{j}]": mu0[j] for j in range(D)}
    sign = np.sign(W0[0, 0] * fit.estimates["W[0,0]"])
    mle.update({f"W[{j},0]": sign * W0[j, 0] for j in range(D)})
    mle["sigma_eps"] = math.sqrt(s20)
    se = laplace_fit.se  # the SE of the exact likelihood at its optimum
    z = {k: (fit.estimates[k] - v) / se[k] for k, v in mle.items()}
    assert max(abs(v) for v in z.values()) < 3, z
    assert fit.posterior_draws is not None and fit.posterior_draws.shape[1:] == (N, 1)


def test_tensor_weights_round_trip_through_json_and_pt(laplace_fit, tmp_path):
    path = tmp_path / "result.json"
    laplace_fit.to_json(path)
    assert (tmp_path / "result.pt").exists()
    back = nlmefit.FitResult.from_json(path, model=laplace_fit.model)
    assert set(back.weights) == {"mu", "W"}
    for k, v in laplace_fit.weights.items():
        assert torch.equal(back.weights[k], v)
    p = back.population_parameters()
    assert torch.equal(p.weights["W"], laplace_fit.weights["W"].to(torch.float64))
    (tmp_path / "result.pt").unlink()
    with pytest.raises(ValueError, match="missing"):
        nlmefit.FitResult.from_json(path, model=laplace_fit.model)


def test_fo_refuses_a_model_without_the_capability():
    class NoPredict(PPCA):
        predict = None  # not Linearisable any more
        prior_covariance = None

    df, _ = ppca_frame()
    with pytest.raises(nlmefit.ModelSpecError, match="Linearisable"):
        nlmefit.fit(NoPredict(D), df, method="fo")
