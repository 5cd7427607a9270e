"""Issue 10, items 6 and 7: columns the model does not use never block a fit; dose-record columns; SS in summaries.

Only the covariates a model reads decide the per-observation path, so theophylline (``DOSE_MGKG`` on dose rows
only) and the nlmixr2 sets as shipped (``LNDV``, ``DOSE``, true-parameter columns) bind to ODE models and stay on
the per-subject closed-form path. A used column that is non-zero only on dose records is the subject's
time-constant value (one warning) or, when it differs between a subject's doses, dose information (DataError).
A fit on data with SS records says in its messages (kept by result.json, printed by the summary) how they were
applied. The SS=1 closed form is checked against 200 preceding explicit doses.
"""
from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import nlmefit
from nlmefit.errors import DataError, ModelSpecError
from nlmefit.marginal.linearisation import Conditional
from nlmefit.models.examples import pheno_real
from nlmefit.panel import Panel
from nlmefit.results import FitResult


@pytest.fixture(scope="module")
def theo() -> pd.DataFrame:
    return nlmefit.datasets.load("theophylline")


@pytest.fixture(scope="module")
def theo_fit(theo):
    return nlmefit.fit(nlmefit.library.get("1cmt_oral", error="additive"), theo, method="focei", covariance=None)


def _dose_frame(dose_col: list[float]) -> pd.DataFrame:
    """Two subjects, two oral doses each (dose rows carry ``XD``, observation rows 0); ``dose_col`` gives the four
    dose-row values (subject 1 then 2)."""
    rows, k = [], 0
    for i in (1, 2):
        for t0 in (0.0, 24.0):
            rows.append(dict(ID=i, TIME=t0, DV=0.0, AMT=100.0, EVID=1, MDV=1, CMT=1, WT=60.0 + 10 * i, XD=dose_col[k]))
            k += 1
            for dt in (1.0, 4.0, 12.0):
                rows.append(dict(ID=i, TIME=t0 + dt, DV=5.0, AMT=0.0, EVID=0, MDV=0, CMT=2, WT=60.0 + 10 * i, XD=0.0))
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------------- item 6


def test_theophylline_ode_model_binds_and_evaluates(theo):
    """DOSE_MGKG (dose rows only) and WT are not used by 1cmt_oral_mm: the ODE model takes the data as shipped."""
    model = nlmefit.library.get("1cmt_oral_mm", theta={"vm": 50.0, "km": 5.0, "v": 30.0, "ka": 1.5})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unused dose-record column is not even mentioned
        data = model.prepare(theo)
    assert not data.per_obs and model.used_covariates(data.panel) == set()
    p = model.initial_params()
    ll = model.log_lik(p, torch.zeros(data.n_subjects, data.q, dtype=torch.float64), data)
    assert ll.shape == (12,) and bool(torch.isfinite(ll).all())


def test_theophylline_closed_form_is_per_subject_with_the_reference_ofv(reference, theo, theo_fit):
    """Before, the unused DOSE_MGKG put theophylline on the per-observation path; the OFV is nlmixr2's."""
    assert not theo_fit.data.per_obs
    ref = reference("theo_sd_nlmixr2.json")
    lo, hi = ref["ofv_range"]
    assert theo_fit.converged and lo - ref["ofv_tolerance"] <= theo_fit.ofv <= hi + ref["ofv_tolerance"]
    assert not any("steady state" in m for m in theo_fit.messages)
    assert "steady state" not in theo_fit.summary_text()


def test_per_subject_and_per_observation_paths_agree(theo):
    """A used time-constant covariate: the per-subject path equals the per-observation one to rounding."""
    model = nlmefit.library.get("1cmt_oral", covariates={"cl": "log(WT/70)"})
    data = model.prepare(theo)
    assert not data.per_obs
    panel = data.panel
    per_obs = dataclasses.replace(data, per_obs=True, cov={n: torch.as_tensor(panel.obs_covariates[:, :, k])
                                                           for k, n in enumerate(panel.covariate_names)})
    p = model.initial_params()
    p.theta = {k: (torch.tensor(0.75, dtype=torch.float64) if k.startswith("beta_") else v) for k, v in p.theta.items()}
    eta = 0.1 * torch.ones(data.n_subjects, data.q, dtype=torch.float64)
    a = Conditional("focei").subject_m2ll(model, p, data, eta).detach()
    b = Conditional("focei").subject_m2ll(model, p, per_obs, eta).detach()
    torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def test_nlmixr2_mm_set_as_shipped_binds_to_an_ode_model():
    df = nlmefit.datasets.load("bolus_1cptmm")  # as shipped: LNDV, DOSE, V, VM, KM, SD: none used by the model
    df = df[df["SD"] == 1]
    df = df[df["ID"].isin(df["ID"].unique()[:10])]
    model = nlmefit.library.get("1cmt_iv_mm", theta={"vm": 800.0, "km": 200.0, "v": 50.0})
    data = model.prepare(df)
    assert data.n_subjects == 10 and not data.per_obs
    assert {"LNDV", "DOSE", "VM"} <= set(data.panel.covariate_names)
    ll = model.log_lik(model.initial_params(), torch.zeros(10, data.q, dtype=torch.float64), data)
    assert bool(torch.isfinite(ll).all())


def test_used_time_varying_covariate_still_refused_by_ode_models_and_named():
    df = _dose_frame([1.0, 1.0, 1.0, 1.0])
    df.loc[df["TIME"] > 20, "WT"] += 5.0  # a genuine weight change
    closed = nlmefit.library.get("1cmt_oral", covariates={"cl": "log(WT/70)"})
    assert closed.prepare(df).per_obs
    assert not nlmefit.library.get("1cmt_oral").prepare(df).per_obs  # unused: per-subject path
    nlmefit.library.get("1cmt_oral_mm").prepare(df)  # unused: the ODE model takes it
    with pytest.raises(ModelSpecError, match="WT"):
        nlmefit.library.get("1cmt_oral_mm", covariates={"vm": "log(WT/70)"}).prepare(df)


def test_used_dose_record_column_constant_per_subject_is_time_constant(theo):
    model = nlmefit.library.get("1cmt_oral", covariates={"cl": "DOSE_MGKG"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = model.prepare(theo)
    msgs = [str(w.message) for w in caught if "DOSE_MGKG" in str(w.message)]
    assert len(msgs) == 1 and "time-constant" in msgs[0]
    assert not data.per_obs
    per_subject = theo[theo["EVID"] == 1].groupby("ID", sort=False)["DOSE_MGKG"].first().to_numpy()
    np.testing.assert_array_equal(data.cov["DOSE_MGKG"][:, 0].numpy(), per_subject)
    k = data.panel.covariate_names.index("DOSE_MGKG")
    assert (data.panel.obs_covariates[:, :, k] == per_subject[:, None]).all()
    with pytest.warns(UserWarning, match="DOSE_MGKG"):  # and the ODE model takes it too
        assert not nlmefit.library.get("1cmt_oral_mm", covariates={"vm": "DOSE_MGKG"}).prepare(theo).per_obs


def test_dose_record_column_baseline_when_the_first_record_is_an_observation():
    df = _dose_frame([2.0, 2.0, 3.0, 3.0])
    pre = pd.DataFrame([dict(ID=1, TIME=0.0, DV=0.0, AMT=0.0, EVID=0, MDV=0, CMT=2, WT=70.0, XD=0.0)])
    df = pd.concat([pre, df], ignore_index=True)
    p = Panel.from_dataframe(df)
    k = p.covariate_names.index("XD")
    assert p.dose_record_covariates == {"XD": None}
    np.testing.assert_array_equal(p.covariates[:, k], [2.0, 3.0])
    assert (p.obs_covariates[0, p.obs_mask[0], k] == 2.0).all()
    assert Panel.from_dataframe(df).to_dataframe()["XD"].tolist() == df["XD"].tolist()  # records as given


def test_dose_record_column_varying_between_doses_is_dose_information():
    df = _dose_frame([2.0, 2.0, 3.0, 4.0])  # ID 2's doses differ
    assert Panel.from_dataframe(df).dose_record_covariates == {"XD": 2}
    nlmefit.library.get("1cmt_oral").prepare(df)  # unused: no complaint
    nlmefit.library.get("1cmt_oral_mm").prepare(df)
    with pytest.raises(DataError, match=r"column XD, ID 2: .*dose information"):
        nlmefit.library.get("1cmt_oral", covariates={"cl": "XD"}).prepare(df)


def test_params_function_is_traced_for_the_columns_it_reads():
    pheno = nlmefit.datasets.load("pheno")  # FA1/FA2 are dose-row flags; WGT and APGR are read by the function
    model = pheno_real()
    data = model.prepare(pheno)
    assert model.used_covariates(data.panel) == {"WGT", "APGR"} and not data.per_obs

    def greedy(theta, eta, cov):  # enumerates the covariates: every column counts (the conservative rule)
        assert len(cov) > 0
        return {"cl": theta["tcl"] * torch.exp(eta["cl"]), "v": theta["tv"] * torch.exp(eta["v"])}

    st = nlmefit.library.structure("1cmt_iv")
    m = nlmefit.Model(st, {"tcl": 0.005, "tv": 1.0}, {"cl": 0.1, "v": 0.1}, params=greedy)
    assert m.used_covariates(data.panel) == set(data.panel.covariate_names)


# ---------------------------------------------------------------------------------------------------- item 7


def test_steady_state_closed_form_equals_200_preceding_doses():
    """An SS=1 dose (II 24) against the same dose preceded by 200 explicit doses every 24 h (Oral_1CPT's truth)."""
    tau, t0, amt = 24.0, 200 * 24.0, 60000.0
    obs_t = t0 + np.array([0.25, 1.0, 3.0, 8.0, 23.99, 30.0, 47.0])
    obs = [dict(ID=1, TIME=t, DV=1.0, AMT=0.0, EVID=0, CMT=2, SS=0, II=0.0) for t in obs_t]
    explicit = [dict(ID=1, TIME=m * tau, DV=0.0, AMT=amt, EVID=1, CMT=1, SS=0, II=0.0) for m in range(201)]
    ss = [dict(ID=1, TIME=t0, DV=0.0, AMT=amt, EVID=1, CMT=1, SS=1, II=tau)]
    model = nlmefit.library.get("1cmt_oral", theta={"cl": 4.88, "v": 86.51, "ka": 1.089})
    p = model.initial_params()
    f = []
    for doses in (explicit, ss):
        data = model.prepare(pd.DataFrame(doses + obs))
        f.append(model.predict(p, torch.zeros(1, data.q, dtype=torch.float64), data)[0][0].detach().numpy())
    assert np.all(f[0] > 0)
    np.testing.assert_allclose(f[1], f[0], rtol=1e-12, atol=0)


def test_summary_says_how_steady_state_records_were_applied(tmp_path):
    df = nlmefit.datasets.load("oral_1cpt")  # SS=99 of the file mapped to 0; 120 SS=1 records at 216 h
    df = df[(df["SD"] == 0) & df["ID"].isin([1, 2, 3])]
    model = nlmefit.library.get("1cmt_oral", theta={"cl": 4.0, "v": 80.0, "ka": 1.0})
    fit = nlmefit.fit(model, df, method="focei", maxiter=0, covariance=None)
    note = [m for m in fit.messages if m.startswith("steady state:")]
    assert len(note) == 1 and "3 SS=1 dose records" in note[0] and "(24)" in note[0] and "drop the SS" in note[0]
    assert "note: steady state: 3 SS=1 dose records" in fit.summary_text()
    fit.to_json(tmp_path / "result.json")
    back = FitResult.from_json(tmp_path / "result.json", restore_model=False)
    assert note[0] in back.messages
    raw = nlmefit.datasets.load("oral_1cpt", raw=True)  # SS=99 stays refused
    with pytest.raises(DataError, match="column SS"):
        model.prepare(raw[raw["ID"] == 1])
    assert math.isfinite(fit.ofv)
