"""theo_sd with 1cmt_oral, additive error, FOCE-I vs nlmixr2 (OBJF 116.80-116.83)."""
import math

import pytest

import nlmefit


@pytest.fixture(scope="module")
def theo_fit():
    model = nlmefit.library.get("1cmt_oral", error="additive")
    return nlmefit.fit(model, nlmefit.datasets.load("theophylline"), method="focei")


def test_theo_ofv_and_estimates(reference, theo_fit):
    ref = reference("theo_sd_nlmixr2.json")
    lo, hi = ref["ofv_range"]
    tol = ref["ofv_tolerance"]
    assert theo_fit.converged
    assert lo - tol <= theo_fit.ofv <= hi + tol
    est = theo_fit.estimates
    # rounded source values: log-scale typical values within 0.02, SD within 2 %
    assert math.log(est["ka"]) == pytest.approx(ref["estimates_log_scale"]["tka"], abs=0.02)
    assert math.log(est["cl"]) == pytest.approx(ref["estimates_log_scale"]["tcl"], abs=0.02)
    assert math.log(est["v"]) == pytest.approx(ref["estimates_log_scale"]["tv"], abs=0.02)
    assert est["sigma_add"] == pytest.approx(ref["sigma_add"], rel=0.02)
