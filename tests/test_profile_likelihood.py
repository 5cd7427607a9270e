"""Likelihood-profile intervals (issue 16 item 3): checked against an independent refit with the parameter FIXED.

Outside truth: at each reported end, fitting the model with that parameter fixed there (a separate nlmefit.fit
of a model built with Param(..., fixed=True)) must raise the OFV by χ²₁(0.95) = 3.841; the search's tolerance is
0.01 and the refits' optimiser tolerance adds ~1e-4, so the test allows 0.03. For the near-quadratic typical value
of CL on pheno the profile interval must also agree with the Wald interval to 5 % of its width.
"""
from __future__ import annotations

import math

import pytest

import nlmefit
from nlmefit import ModelSpecError, Param
from nlmefit.models.examples import pheno_real

CHI2_95 = 3.841458820694124


@pytest.fixture(scope="module")
def pheno_fit():
    return nlmefit.fit(pheno_real(), nlmefit.datasets.load("pheno"))


def _fixed_refit(value: float) -> float:
    base = pheno_real()
    theta = dict(base.parameters.theta)
    theta["tvcl"] = Param(value, fixed=True)
    model = nlmefit.Model(base.structure, theta=theta, omega=base.parameters.omega, sigma=dict(base.parameters.sigma),
                          error="proportional", params=base.params_fn, name="pheno_fixed")
    return nlmefit.fit(model, nlmefit.datasets.load("pheno"), covariance=None).ofv


def test_profile_ends_raise_the_ofv_by_chi2(pheno_fit):
    prof = nlmefit.profile(pheno_fit, ["tvcl", "omega_cl"])
    row = prof.intervals.set_index("parameter").loc["tvcl"]
    assert row.lower_ok and row.upper_ok
    for end in (row.lower, row.upper):
        assert _fixed_refit(end) - pheno_fit.ofv == pytest.approx(CHI2_95, abs=0.03)
    wald = row.wald_high - row.wald_low
    assert abs(row.lower - row.wald_low) < 0.05 * wald and abs(row.upper - row.wald_high) < 0.05 * wald
    om = prof.intervals.set_index("parameter").loc["omega_cl"]
    # a variance: the profile interval is skewed right of the symmetric Wald interval
    assert om.lower > om.wald_low and om.upper > om.wald_high and om.lower_ok and om.upper_ok
    assert set(prof.points.columns) >= {"parameter", "side", "value", "delta_ofv"}
    assert "likelihood-profile" in prof._repr_html_()


def test_profile_refuses_what_it_cannot_profile(pheno_fit):
    with pytest.raises(ModelSpecError, match="not an estimated parameter"):
        nlmefit.profile(pheno_fit, ["nope"])
    model = nlmefit.Model(nlmefit.models.ClosedForm(1, True), theta={"cl": 2.8, "v": 32, "ka": 1.5},
                          omega=nlmefit.Omega({"cl": 0.1, "v": 0.1, "ka": 0.4}, blocks=[("cl", "v")],
                                              cov={("cl", "v"): 0.01}), sigma={"add": 0.7})
    blocked = nlmefit.fit(model, nlmefit.datasets.load("theophylline"), covariance=None)
    with pytest.raises(ModelSpecError, match="block"):
        nlmefit.profile(blocked, ["omega_cl_v"])
    saem = pheno_fit.replace(method="saem")
    with pytest.raises(ModelSpecError, match="profile supports"):
        nlmefit.profile(saem, ["tvcl"])


def test_cli_profile(tmp_path, capsys):
    from nlmefit.cli import main

    out = tmp_path / "fit"
    assert main(["fit", "pheno", "--model", "pheno_real", "--out", str(out), "--quiet", "--no-cov"]) == 0
    assert main(["profile", str(out), "--param", "tvv", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "tvv" in text and (out / "profile" / "profile.png").exists()
    import pandas as pd

    iv = pd.read_csv(out / "profile" / "profile_intervals.csv")
    assert iv.loc[0, "lower"] < iv.loc[0, "estimate"] < iv.loc[0, "upper"]
    assert math.isnan(iv.loc[0, "wald_low"])  # --no-cov: no SE, the search started from a default step
