"""Adaptive Gauss–Hermite quadrature: nlmixr2's AGQ numbers on Wang (2007), node convergence, exactness on a
linear-Gaussian model, AGQ as an estimator."""
import math

import linear_gaussian as lg
import numpy as np
import pytest
import torch

import nlmefit
from nlmefit.marginal.quadrature import gauss_hermite_grid
from nlmefit.models.examples import wang2007

ERRORS = ["proportional", "additive", "combined2", "combined1"]


def _digits_tol(value: float) -> float:
    """Half a unit in the last digit the reference gives (39.297 -> 5e-4, 43.4 -> 5e-2)."""
    s = repr(value)
    dec = len(s.split(".")[1]) if "." in s else 0
    return 0.5 * 10 ** (-dec) + 1e-9


@pytest.mark.parametrize("error", ERRORS)
def test_wang2007_agq_matches_nlmixr2_with_its_two_nodes(reference, error):
    """nlmixr2's agqControl() defaults to nAGQ = 2 with the FOCE-I (Gauss–Newton) Hessian as the scale
    (nlmixr2est R/agq.R; helper-wang2007.R calls agqControl() without nAGQ)."""
    ref = reference("wang2007_nlmixr2.json")["agq"][error]
    res = nlmefit.fit(wang2007(error), nlmefit.datasets.load("wang2007"), method="agq", n_nodes=2,
                      hessian="gauss-newton", covariance=None)
    assert res.ofv == pytest.approx(ref, abs=_digits_tol(ref))


@pytest.mark.parametrize("error", ["proportional", "additive"])
def test_wang2007_node_convergence_and_one_node_is_laplace(error):
    d = nlmefit.datasets.load("wang2007")
    ofv = {n: nlmefit.fit(wang2007(error), d, method="agq", n_nodes=n, covariance=None).ofv for n in (1, 10, 20, 40)}
    lap = nlmefit.fit(wang2007(error), d, method="laplace", covariance=None).ofv
    assert ofv[1] == pytest.approx(lap, abs=1e-9)
    assert abs(ofv[10] - ofv[20]) < 1e-4 and abs(ofv[20] - ofv[40]) < 1e-6
    # the scale only changes the rule, not the limit
    gn = nlmefit.fit(wang2007(error), d, method="agq", n_nodes=20, hessian="gauss-newton", covariance=None).ofv
    assert gn == pytest.approx(ofv[20], abs=1e-4)


def test_grid_integrates_gaussian_moments_exactly():
    z, logw = gauss_hermite_grid(3, 2)
    w = torch.exp(logw)
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-14)
    assert float((w * z[:, 0] ** 4).sum()) == pytest.approx(3.0, abs=1e-12)  # E z⁴ = 3 (degree < 2·3)
    assert float((w * z[:, 0] ** 2 * z[:, 1] ** 2).sum()) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(nlmefit.ModelSpecError, match="points per subject"):
        gauss_hermite_grid(100, 4)


def test_agq_and_laplace_are_exact_for_the_linear_gaussian_model():
    df = lg.data()
    exact = lg.exact_loglik(df).sum()
    for n in (1, 3):
        ll = nlmefit.loglik(nlmefit.fit(lg.model(), df, method="agq", n_nodes=n, maxiter=0, covariance=None),
                            method="agq", n_nodes=n)
        assert ll.loglik == pytest.approx(exact, abs=1e-8)


def test_agq_estimator_converges_and_has_standard_errors():
    df = nlmefit.datasets.load("theophylline")
    m = nlmefit.library.get("1cmt_oral", error="additive")
    focei = nlmefit.fit(m, df, method="focei", covariance=None)
    agq = nlmefit.fit(m, df, method="agq", n_nodes=3, init=focei.estimates.to_dict())
    assert agq.converged and agq.covariance_ok
    # AGQ maximises (an accurate approximation of) the exact likelihood: at its optimum the exact −2LL is
    # no larger than at the FOCE-I optimum
    exact_at_agq = nlmefit.loglik(agq, "agq", n_nodes=9).ofv
    exact_at_focei = nlmefit.loglik(focei, "agq", n_nodes=9).ofv
    assert exact_at_agq <= exact_at_focei + 0.01
    assert np.all(np.isfinite(agq.se.to_numpy()))
    assert math.isfinite(agq.ofv)
