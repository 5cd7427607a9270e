"""pheno_real vs NONMEM 7.4.2 FOCE-I (pharmpy test data): OFV at the initial values, estimates, sandwich SEs."""

import numpy as np
import pytest

import nlmefit
from nlmefit.models.examples import pheno_real


@pytest.fixture(scope="module")
def pheno_fit():
    return nlmefit.fit(pheno_real(), nlmefit.datasets.load("pheno"), method="focei")


def test_ofv_at_initial_values(reference):
    ref = reference("pheno_real_nonmem742.json")
    res = nlmefit.fit(pheno_real(), nlmefit.datasets.load("pheno"), method="focei", maxiter=0, covariance=None)
    assert res.n_obs == 155
    assert res.ofv == pytest.approx(ref["ofv_initial"], abs=ref["tolerances"]["ofv_initial"])


def test_estimates_and_ofv(reference, pheno_fit):
    ref = reference("pheno_real_nonmem742.json")
    tol = ref["tolerances"]
    r = pheno_fit
    assert r.converged
    assert r.ofv == pytest.approx(ref["ofv_final"], abs=tol["ofv_final"])
    est = r.estimates
    got = [est["tvcl"], est["tvv"], est["apgr_v"], est["omega_cl"], est["omega_v"], est["sigma_prop"] ** 2]
    want = ref["final"]["theta"] + ref["final"]["omega"] + [ref["final"]["sigma2"]]
    np.testing.assert_allclose(got, want, rtol=tol["estimates_rel"])


def test_sandwich_standard_errors(reference, pheno_fit):
    ref = reference("pheno_real_nonmem742.json")
    se = pheno_fit.se
    sd = pheno_fit.estimates["sigma_prop"]
    got = [se["tvcl"], se["tvv"], se["apgr_v"], se["omega_cl"], se["omega_v"], 2 * sd * se["sigma_prop"]]
    want = ref["se_sandwich"]["theta"] + ref["se_sandwich"]["omega"] + [ref["se_sandwich"]["sigma2"]]
    assert pheno_fit.covariance_ok
    np.testing.assert_allclose(got, want, rtol=ref["tolerances"]["se_rel"])
