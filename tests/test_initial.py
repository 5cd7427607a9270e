"""Automatic initial estimates (issue 10, item 1): NCA (nlmefit.nca) against closed forms, auto_initial on
simulated and benchmark data, who wins (explicit values always do), the custom-model message, and the record of
the starting values in FitResult.initial (summary line, JSON round trip)."""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest

import nlmefit
from nlmefit.models.initial import SOURCE_AUTO, auto_initial, initial_record
from nlmefit.models.structure import ClosedForm
from nlmefit.nca import COLUMNS, nca

BOLUS_2CPT_TRUTH = {"cl": 4.0, "v": 70.0, "q": 4.0, "vp": 50.0}


def _profile_frame(subjects: list[tuple[float, float, float]], times, conc, dose_extra=None) -> pd.DataFrame:
    """One subject per (dose, cl, v); conc(t, dose, cl, v) gives the concentrations."""
    rows = []
    for i, (dose, cl, v) in enumerate(subjects, start=1):
        rows.append({"ID": i, "TIME": 0.0, "AMT": dose, "EVID": 1, "MDV": 1, "DV": np.nan, **(dose_extra or {})})
        rows += [{"ID": i, "TIME": float(t), "AMT": 0.0, "EVID": 0, "MDV": 0, "DV": float(conc(t, dose, cl, v))}
                 for t in times]
    return pd.DataFrame(rows).fillna({k: 0.0 for k in (dose_extra or {})})


# ---------------------------------------------------------------------------------------------- NCA
def test_nca_recovers_an_iv_bolus_profile_exactly_for_every_subject_at_once():
    subjects = [(100.0, 2.0, 20.0), (250.0, 5.0, 80.0), (10.0, 0.5, 3.0)]
    df = _profile_frame(subjects, np.linspace(0.1, 60, 200), lambda t, d, cl, v: d / v * math.exp(-cl / v * t))
    tab = nca(df, route="iv")
    assert list(tab.columns) == list(COLUMNS) and list(tab["ID"]) == [1, 2, 3]
    for (dose, cl, v), (_, row) in zip(subjects, tab.iterrows()):
        k = cl / v
        assert row["route"] == "iv" and np.isnan(row["tau"]) and row["n_obs"] == 200
        for name, want in (("cl", cl), ("vz", v), ("lambda_z", k), ("c0", dose / v), ("auc_inf", dose / cl),
                           ("aumc_inf", dose / (v * k * k)), ("mrt", 1 / k), ("vss", v),
                           ("half_life", math.log(2) / k)):
            assert row[name] == pytest.approx(want, rel=1e-6), name
        assert row["lambda_z_r2_adj"] == pytest.approx(1.0, abs=1e-9) and row["lambda_z_n"] >= 3


def test_nca_of_an_oral_profile():
    dose, cl, v, ka = 100.0, 2.0, 20.0, 1.5
    k = cl / v

    def conc(t, d, cl_, v_):
        return d * ka / (v_ * (ka - k)) * (math.exp(-k * t) - math.exp(-ka * t))

    tab = nca(_profile_frame([(dose, cl, v)], np.linspace(0.05, 150, 600), conc))
    row = tab.iloc[0]
    assert row["route"] == "extravascular" and row["c0"] == 0.0
    assert row["cl"] == pytest.approx(cl, rel=2e-3) and row["lambda_z"] == pytest.approx(k, rel=1e-3)
    assert row["vz"] == pytest.approx(v, rel=2e-3) and np.isnan(row["vss"])
    assert row["tmax"] == pytest.approx(math.log(ka / k) / (ka - k), abs=0.26)  # the sampling grid's step


def test_nca_of_multiple_doses_uses_the_dosing_interval():
    dose, cl, v, tau = 100.0, 2.0, 20.0, 12.0
    k = cl / v

    def ss(t, d, cl_, v_):
        return d / v * math.exp(-k * t) / (1 - math.exp(-k * tau))

    times = np.linspace(0.5, 12.0, 24)
    at_ss = nca(_profile_frame([(dose, cl, v)], times, ss, {"SS": 1, "II": tau}), route="iv").iloc[0]
    assert at_ss["tau"] == tau and np.isnan(at_ss["auc_inf"]) and np.isnan(at_ss["mrt"])
    assert at_ss["auc_tau"] == pytest.approx(dose / cl, rel=1e-6) and at_ss["cl"] == pytest.approx(cl, rel=1e-6)
    assert at_ss["vz"] == pytest.approx(v, rel=1e-6) and at_ss["c0"] == pytest.approx(ss(0, dose, cl, v), rel=1e-6)
    # 21 doses by ADDL, sampled in the last interval only (and one sample before the first dose is ignored)
    n = 21
    rows = [{"ID": 1, "TIME": 0.0, "AMT": dose, "EVID": 1, "MDV": 1, "DV": np.nan, "ADDL": n - 1, "II": tau}]
    last = (n - 1) * tau
    for t in times:
        c = sum(dose / v * math.exp(-k * (last + t - j * tau)) for j in range(n))
        rows.append({"ID": 1, "TIME": last + t, "AMT": 0.0, "EVID": 0, "MDV": 0, "DV": c, "ADDL": 0, "II": 0.0})
    md = nca(pd.DataFrame(rows), route="iv").iloc[0]
    assert md["dose_time"] == last and md["tau"] == tau and md["n_obs"] == len(times)
    assert md["cl"] == pytest.approx(cl, rel=1e-3)  # 21 doses: within 1e-3 of steady state
    # an interval shorter than the sampling: AUCtau stops at tau
    short = nca(_profile_frame([(dose, cl, v)], times, ss, {"SS": 1, "II": 6.0}), route="iv").iloc[0]
    assert short["tau"] == 6.0 and short["n_obs"] == int((times <= 6.0).sum())


def test_nca_infusion_route_from_rate_and_dvid_selection():
    dose, cl, v, dur = 100.0, 2.0, 20.0, 1.0
    k, rate = cl / v, dose / dur

    def conc(t, d, cl_, v_):
        if t <= dur:
            return rate / cl * (1 - math.exp(-k * t))
        return rate / cl * (1 - math.exp(-k * dur)) * math.exp(-k * (t - dur))

    df = _profile_frame([(dose, cl, v)], np.linspace(0.02, 80, 800), conc, {"RATE": rate})
    row = nca(df).iloc[0]
    assert row["route"] == "infusion" and row["c0"] == 0.0
    assert row["cl"] == pytest.approx(cl, rel=1e-3) and row["vss"] == pytest.approx(v, rel=2e-3)
    two = pd.concat([df.assign(DVID=1), df[df["EVID"] == 0].assign(DVID=2, DV=df["DV"] * 2)]).sort_values(
        ["ID", "TIME", "EVID"], ascending=[True, True, False], kind="stable")
    with pytest.raises(nlmefit.DataError, match="several DVID"):
        nca(two)
    assert nca(two, dvid=2).iloc[0]["cl"] == pytest.approx(cl / 2, rel=1e-3)


# ---------------------------------------------------------------------------------------------- auto_initial
def _simulated(name: str, theta: dict, n: int, times, dose: dict, seed: int) -> pd.DataFrame:
    truth_model = nlmefit.library.get(name, error="proportional", theta=theta, omega={k: 0.09 for k in theta},
                                      sigma={"prop": 0.15})
    truth = {**theta, **{f"omega_{k}": 0.09 for k in theta}, "sigma_prop": 0.15}
    return nlmefit.simulate(truth_model, truth, times=times, doses=[dose], n_subjects=n, seed=seed).drop(
        columns="REP")


@pytest.mark.parametrize("name, theta, dose", [
    ("1cmt_oral", {"cl": 2.0, "v": 30.0, "ka": 1.2}, {"TIME": 0.0, "AMT": 100.0, "CMT": 1}),
    ("2cmt_iv", {"cl": 4.0, "v": 70.0, "q": 4.0, "vp": 50.0}, {"TIME": 0.0, "AMT": 1000.0}),
])
def test_auto_initial_lands_near_the_truth_on_simulated_data(name, theta, dose):
    df = _simulated(name, theta, 60, [0.25, 0.5, 1, 2, 3, 4, 6, 8, 12, 24, 36, 48, 72], dose, 3)
    values, notes = auto_initial(nlmefit.library.get(name, error="proportional"), df)
    for k, want in theta.items():
        assert want / 1.5 < values[k] < want * 1.5, (k, values[k])
    assert 0.05 <= values["omega_cl"] <= 0.3 and 0.05 < values["sigma_prop"] < 0.4
    assert notes[0].startswith("NCA on 60 of 60 subjects")


def _bolus_2cpt_sd() -> pd.DataFrame:
    df = nlmefit.datasets.load("bolus_2cpt")  # shipped (data/Bolus_2CPT.csv)
    return df[df["SD"] == 1].drop(columns=["SS", "II"])  # SS=99 marks "not steady state" (refused by design)


def test_auto_initial_on_the_bolus_2cpt_benchmark_is_near_the_truth():
    model = nlmefit.library.get("2cmt_iv", error="proportional")
    values, notes = auto_initial(model, _bolus_2cpt_sd())
    for k, want in BOLUS_2CPT_TRUTH.items():  # generic starts (v 10, vp 20) led FOCE-I to OFV 20691, v 38
        assert want / 2 < values[k] < want * 2, (k, values[k])
    assert "naive-pooled fit of 2cmt_iv" in notes[0]


@pytest.mark.slow
def test_focei_from_auto_starts_reaches_the_optimum_of_the_true_starts_on_bolus_2cpt():
    df = _bolus_2cpt_sd()
    truth = nlmefit.library.get("2cmt_iv", error="proportional", theta=BOLUS_2CPT_TRUTH,
                                omega={k: 0.09 for k in BOLUS_2CPT_TRUTH}, sigma={"prop": 0.2})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = nlmefit.fit(truth, df, method="focei", covariance=None)
        auto = nlmefit.fit(nlmefit.library.get("2cmt_iv", error="proportional"), df, method="focei", covariance=None)
    assert auto.converged and abs(auto.ofv - ref.ofv) < 0.01, (auto.ofv, ref.ofv)
    assert set(auto.initial["source"].values()) == {SOURCE_AUTO}


def test_sparse_multiple_dose_data_fall_back_on_the_pooled_profile_and_fit():
    pheno = nlmefit.datasets.load("pheno")
    assert nca(pheno, route="iv")["cl"].isna().all()  # one or two samples per dosing interval
    values, notes = auto_initial(nlmefit.library.get("1cmt_iv", error="proportional"), pheno)
    wt = pheno.groupby("ID")["WGT"].first().mean()
    assert 0.5 < values["cl"] / (4.7e-3 * wt) < 2 and 0.5 < values["v"] / (1.0 * wt) < 2  # NONMEM: θ·WT
    assert 0.05 < values["sigma_prop"] < 0.3 and notes[0].startswith("NCA on 0 of 59 subjects")


# ---------------------------------------------------------------------------------------------- who wins
@pytest.fixture(scope="module")
def theo():
    return nlmefit.datasets.load("theophylline")


def _bound(model, data, init=None):
    return nlmefit.FOCEI().bind(model, data, init)[0]


def test_library_defaults_start_from_auto_values_and_explicit_values_win(theo):
    generic = nlmefit.library.get("1cmt_oral", theta={"cl": 3.0}, sigma={"add": 0.5})
    rec = initial_record(_bound(generic, theo))
    assert rec["values"]["cl"] == 3.0 and rec["source"]["cl"] == "user"
    assert rec["source"]["sigma_add"] == "user" and rec["values"]["sigma_add"] == 0.5
    assert rec["source"]["v"] == SOURCE_AUTO and 20 < rec["values"]["v"] < 45  # generic start: 10
    assert rec["source"]["omega_ka"] == SOURCE_AUTO and rec["method"].startswith("auto (NCA on 12 of 12")
    # a dict init wins for its names; the rest stays automatic
    rec = initial_record(_bound(generic, theo, {"v": 50.0, "omega_cl": 0.3}))
    assert rec["values"]["v"] == 50.0 and rec["source"]["v"] == "user" and rec["values"]["omega_cl"] == 0.3
    assert rec["values"]["cl"] == 3.0 and rec["source"]["ka"] == SOURCE_AUTO
    every = {"cl": 2.8, "v": 33.0, "ka": 1.5, "omega_cl": 0.07, "omega_v": 0.02, "omega_ka": 0.4, "sigma_add": 0.7}
    assert initial_record(_bound(generic, theo, every))["values"] == pytest.approx(every, rel=1e-12)
    # init="model": the model's own values, as before
    rec = initial_record(_bound(generic, theo, "model"))
    assert rec["values"]["v"] == 10.0 and rec["source"]["v"] == "model" and rec["source"]["cl"] == "user"
    # Params: exactly those
    p = generic.parameters.params_from_dict({"v": 12.0})
    rec = initial_record(_bound(generic, theo, p))
    assert rec["values"]["v"] == 12.0 and set(rec["source"].values()) == {"user"}
    # fixed parameters keep their values
    fixed = nlmefit.library.get("1cmt_oral", theta={"ka": nlmefit.fix(1.5)})
    assert initial_record(_bound(fixed, theo))["values"]["ka"] == 1.5
    # the user's model is never modified
    assert generic.parameters.theta["v"].init == 10.0 and not hasattr(generic, "_nlmefit_initial")
    with pytest.raises(nlmefit.ModelSpecError, match="init must be"):
        _bound(generic, theo, "nca")


def test_custom_models_get_auto_values_for_the_names_it_knows_and_a_message_for_the_rest(theo):
    def params(theta, eta, cov):
        return {"cl": theta["cl"] * (cov["WT"] / 70) ** theta["wt_exp"], "v": theta["v"],
                "ka": theta["ka"]}

    model = nlmefit.Model(ClosedForm(1, True), {"cl": 1.0, "v": 10.0, "ka": 1.0, "wt_exp": 0.75}, {}, params=params,
                          error="additive")
    assert initial_record(_bound(model, theo))["source"]["v"] == "model"  # custom models: their own values
    with pytest.warns(UserWarning, match=r"no automatic rule for wt_exp .*keep the model's values"):
        bound = _bound(model, theo, "auto")
    rec = initial_record(bound)
    assert rec["source"]["wt_exp"] == "model" and rec["values"]["wt_exp"] == 0.75
    assert rec["source"]["cl"] == SOURCE_AUTO and 20 < rec["values"]["v"] < 45
    assert any("wt_exp" in n for n in rec["notes"])
    wang = nlmefit.models.examples.wang2007("proportional")  # the dose is inside its formula: no NCA
    with pytest.warns(UserWarning, match="need a PK model with dose records"):
        rec = initial_record(_bound(wang, nlmefit.datasets.load("wang2007"), "auto"))
    assert set(rec["source"].values()) == {"model"}


def test_fit_initial_is_in_the_summary_and_round_trips_through_json(theo, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = nlmefit.fit(nlmefit.library.get("1cmt_oral", theta={"ka": 1.5}), theo, method="focei", maxiter=0,
                          covariance=None)
    assert fit.initial["values"]["ka"] == 1.5 and fit.initial["source"]["ka"] == "user"
    assert fit.initial["values"]["cl"] == fit.estimates["cl"]  # maxiter=0: evaluated at the starts
    line = [s for s in fit.summary_text().splitlines() if "initial values:" in s][0]
    assert line.strip().startswith("initial values: auto (NCA on 12 of 12 subjects") and "user: ka 1.5" in line
    path = tmp_path / "result.json"
    fit.to_json(path)
    back = nlmefit.FitResult.from_json(path)
    assert back.initial == fit.initial
    d = json.loads(path.read_text())
    del d["initial"]  # a file written before FitResult.initial existed
    path.write_text(json.dumps(d))
    assert nlmefit.FitResult.from_json(path).initial == {}
