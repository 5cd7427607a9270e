"""Plausibility warnings (nlmefit.results.checks): each rule fires on its symptom, names the parameter and stays
quiet on a good fit; the OFV gradient is ~0 at a FOCE-I optimum and large away from it."""
import math

import pandas as pd
import pytest
import torch

import nlmefit
from nlmefit.estimators import get_estimator
from nlmefit.models.parameters import Param
from nlmefit.results.checks import ofv_gradient, plausibility_warnings

THEO_START = {"cl": 2.8, "v": 32.0, "ka": 1.6, "omega_cl": 0.07, "omega_v": 0.02, "omega_ka": 0.4, "sigma_add": 0.7}


def _model():
    return nlmefit.library.get("1cmt_oral", error="additive", theta={"ka": Param(1.0, lower=0.1, upper=10.0)})


def test_each_rule_fires_and_names_the_parameter():
    pset = _model().parameters
    est = pd.Series({"cl": 2.0, "v": 30.0, "ka": 10.0, "omega_cl": 2.65, "omega_v": 0.1, "omega_ka": 0.2,
                     "sigma_add": 0.5})
    msgs = plausibility_warnings(pset, est, eta_shrinkage=pd.Series({"ETA_cl": 10.0, "ETA_ka": 73.0}),
                                 gradient={"cl": 1e-6, "v": 2.5, "ka": -0.2}, covariance_requested=True,
                                 covariance_ok=False, covariance_message="R matrix singular")
    text = "\n".join(msgs)
    assert len(msgs) == 5, msgs
    assert "ka = 10 is on its upper bound (10)" in text
    assert "omega_cl = 2.65" in text and "%" in text  # with its CV
    assert "eta-shrinkage of ETA_ka is 73 %" in text and "ETA_cl" not in text
    assert "|dOFV/du| = 2.5 for v" in text and "1 more (ka)" in text
    assert "covariance step failed: R matrix singular" in text


def test_quiet_on_plausible_estimates_and_thresholds_are_options():
    pset = _model().parameters
    est = pd.Series({"cl": 2.0, "v": 30.0, "ka": 1.5, "omega_cl": 0.9, "omega_v": 0.1, "omega_ka": 0.2,
                     "sigma_add": 0.5})
    assert plausibility_warnings(pset, est, eta_shrinkage=pd.Series({"ETA_cl": 49.0}),
                                 gradient={"cl": 0.01}, covariance_requested=True) == []
    assert len(plausibility_warnings(pset, est, thresholds={"max_omega": 0.5})) == 1
    assert plausibility_warnings(pset, est, covariance_requested=False, covariance_ok=False) == []


def test_gradient_threshold_grows_with_the_square_root_of_the_observations():
    """0.05 per e-fold up to 1000 observations, 0.05·√(n/1000) above: a million subjects' fit (10 million
    observations) stopping at |g| = 0.15 on σ (an OFV change of 1e-8 relative) is not flagged, a small fit is."""
    pset = _model().parameters
    est = pd.Series({"cl": 2.0, "v": 30.0, "ka": 1.5, "omega_cl": 0.1, "omega_v": 0.1, "omega_ka": 0.2,
                     "sigma_add": 0.5})
    g = {"sigma_add": 0.15}
    assert len(plausibility_warnings(pset, est, gradient=g, n_obs=132)) == 1
    assert len(plausibility_warnings(pset, est, gradient=g, n_obs=1000)) == 1
    assert plausibility_warnings(pset, est, gradient=g, n_obs=10_000_000) == []
    msg = plausibility_warnings(pset, est, gradient={"sigma_add": 6.0}, n_obs=10_000_000)[0]
    assert "(> 5;" in msg  # the threshold it used


def test_ofv_gradient_vanishes_at_the_focei_optimum_only():
    model = nlmefit.library.get("1cmt_oral", error="additive")
    df = nlmefit.datasets.load("theophylline")
    fit = nlmefit.fit(model, df, method="focei", init=THEO_START, covariance=None)
    lin = get_estimator("focei").linearisation
    md = model.prepare(df)
    zero = torch.zeros(md.n_subjects, md.q, dtype=torch.float64)
    p_hat = fit.population_parameters()
    g = ofv_gradient(lin, model, md, p_hat, lin.modes(model, p_hat, md, zero))
    assert set(g) == set(model.parameters.natural_names)
    assert max(abs(v) for v in g.values()) < 1e-3, g  # measured 1e-5
    p0 = model.parameters.params_from_dict(THEO_START)
    g0 = ofv_gradient(lin, model, md, p0, lin.modes(model, p0, md, zero))
    assert max(abs(v) for v in g0.values()) > 1.0  # measured 6.1 (v)
    # per e-fold: the log-scale derivative equals x * dOFV/dx (checked by a central difference in log cl)
    h = 1e-5

    def ofv_at(cl):
        p = model.parameters.params_from_dict({**THEO_START, "cl": cl})
        return float(lin.subject_m2ll(model, p, md, lin.modes(model, p, md, zero)).sum().detach())
    fd = (ofv_at(2.8 * math.exp(h)) - ofv_at(2.8 * math.exp(-h))) / (2 * h)
    assert g0["cl"] == pytest.approx(fd, rel=1e-5)


def test_fit_result_carries_the_warnings_through_summary_and_json(tmp_path):
    """A FOCE-I fit told to stop early (gtol 3, in OFV units per unit of log parameter) reports success; its
    gradient is flagged in fit.warnings, the summary and result.json. The converged fit has no such warning."""
    model = nlmefit.library.get("1cmt_oral", error="additive")
    df = nlmefit.datasets.load("theophylline")
    good = nlmefit.fit(model, df, method="focei", init=THEO_START, covariance=None)
    assert not any("gradient" in w for w in good.warnings), good.warnings
    early = nlmefit.fit(model, df, method="focei", init=THEO_START, covariance=None, gtol=3.0)
    assert early.converged and early.ofv > good.ofv + 1e-3, (early.ofv, good.ofv)
    assert any("gradient at the estimates is not small" in w for w in early.warnings), early.warnings
    text = early.summary_text()
    assert "WARNING: the OFV gradient at the estimates is not small" in text
    path = tmp_path / "r.json"
    early.to_json(path)
    assert nlmefit.FitResult.from_json(path).warnings == early.warnings
