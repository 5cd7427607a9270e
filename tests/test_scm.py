"""Stepwise covariate modelling (nlmefit.scm, `nlmefit scm`) on warfarin PK: the log's ΔOFV are the OFV
differences of directly fitted models, the p-values are the χ² tail, WT on CL is included at the first forward
step, backward elimination follows p_backward, bad candidates are refused by name, the CLI writes its files."""
import time
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy.stats import chi2

import nlmefit
from nlmefit.cli import main

WT_MEDIAN = "71.65"  # median baseline weight of the 32 subjects


def _data():
    return nlmefit.datasets.load("warfarin")


def _base():
    return nlmefit.library.get("1cmt_oral", error="prop", dvid="cp")


@pytest.fixture(scope="module")
def run():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nlmefit.scm(_base(), _data(), {"cl": ["WT", "SEX"]})


def test_forward_step_includes_wt_on_cl_with_the_direct_fits_delta_ofv(run):
    log = run.log
    assert list(log["direction"]) == ["base", "forward", "forward", "forward", "backward"]
    step1 = log[log["step"] == 1].set_index("covariate")
    assert bool(step1.loc["WT", "included"]) and not bool(step1.loc["SEX", "included"])
    assert step1.loc["WT", "relationship"] == "power" and step1.loc["SEX", "relationship"] == "categorical"
    assert step1.loc["WT", "terms"] == f"log(WT / {WT_MEDIAN})"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        direct = nlmefit.fit(nlmefit.library.get("1cmt_oral", error="prop", dvid="cp",
                                                 covariates={"cl": f"log(WT/{WT_MEDIAN})"}), _data(), covariance=None)
    base_ofv = float(log.loc[log["direction"] == "base", "ofv"].iloc[0])
    assert abs(base_ofv - run.base_fit.ofv) < 1e-9
    assert abs(step1.loc["WT", "delta_ofv"] - (base_ofv - direct.ofv)) < 1e-3
    assert step1.loc["WT", "delta_ofv"] > chi2.isf(0.05, 1)  # 3.84
    # every test's p-value is the χ² tail of its ΔOFV with df = added coefficients
    tests = log[log["direction"] != "base"]
    np.testing.assert_allclose(tests["p_value"], chi2.sf(tests["delta_ofv"].clip(lower=0), tests["df"]), rtol=1e-12)
    assert (tests["df"] == 1).all() and tests["converged"].all()


def test_backward_elimination_at_p_0_01_removes_the_weak_wt_effect(run):
    """WT on CL improves OFV by 4.3 (p 0.038): included at p < 0.05, but not significant at p < 0.01, so the
    backward step removes it (its removal costs the same ΔOFV it gained) and the final model is the base model."""
    log = run.log
    fwd = log[(log["direction"] == "forward") & log["included"]].iloc[0]
    back = log[log["direction"] == "backward"].iloc[0]
    assert back["covariate"] == "WT" and bool(back["removed"])
    assert abs(back["delta_ofv"] - fwd["delta_ofv"]) < 1e-3 and back["p_value"] > 0.01
    assert run.selected == [] and run.final_fit.ofv == pytest.approx(run.base_fit.ofv, abs=1e-6)
    assert "Selected: none" in run.summary_text() and "4.323" in run.summary_text()


def test_scm_to_csv_is_the_log(run, tmp_path):
    paths = run.to_csv(tmp_path)
    assert [p.name for p in paths] == ["scm_log.csv", "scm_selected.csv"]
    back = pd.read_csv(tmp_path / "scm_log.csv")
    np.testing.assert_allclose(back["delta_ofv"].iloc[1:], run.log["delta_ofv"].iloc[1:])
    assert not list(tmp_path.glob("*.tmp"))


def test_relationship_terms():
    from nlmefit.covariate_search import _terms

    panel = nlmefit.Panel.from_dataframe(_data())
    assert _terms(panel, "AGE", "exponential", "cl") == ("exponential", ("(AGE - 27.5)",))
    assert _terms(panel, "SEX", None, "cl") == ("categorical", ("(1 - SEX)",))  # female vs the male reference
    with pytest.raises(nlmefit.ModelSpecError, match="linear"):
        _terms(panel, "WT", "linear", "cl")
    with pytest.raises(nlmefit.ModelSpecError, match="text column"):
        _terms(panel, "SEX", "power", "cl")


def test_candidates_on_a_declared_lag_time():
    """tlag/f/... that the model declares (library.get(theta={"tlag": ...})) take formula terms like cl or v."""
    from nlmefit.covariate_search import _build, _candidates

    model = nlmefit.library.get("1cmt_oral", error="combined2", dvid="cp", theta={"tlag": 0.5})
    panel = nlmefit.Panel.from_dataframe(_data())
    (rel,) = _candidates(model, panel, {"tlag": ["AGE"]}, None)
    assert (rel.parameter, rel.terms) == ("tlag", ("log(AGE / 27.5)",))
    built = _build(model, [rel])
    assert [(t.param, t.coef) for t in built.terms] == [("tlag", "beta_tlag_log(AGE/27.5)")]
    assert "tlag" in built.parameters.theta and not model.terms  # the base model is untouched
    with pytest.raises(nlmefit.ModelSpecError, match=r"'f' is not a parameter .*'tlag'"):
        _candidates(model, panel, {"f": ["AGE"]}, None)  # not declared by this model


@pytest.mark.parametrize("cands, err, match", [
    ({"clearance": ["WT"]}, nlmefit.ModelSpecError, "'clearance' is not a parameter"),
    ({"cl": ["WEIGHT"]}, nlmefit.DataError, "'WEIGHT' is not a data column"),
    ({"cl": [("WT", "sigmoid")]}, nlmefit.ModelSpecError, "unknown relationship 'sigmoid'"),
    ({}, nlmefit.ModelSpecError, "non-empty"),
])
def test_bad_candidates_are_refused_by_name(cands, err, match):
    with pytest.raises(err, match=match):
        nlmefit.scm(_base(), _data(), cands)


def test_custom_params_model_is_refused():
    from nlmefit.models.examples import EXAMPLES

    model = EXAMPLES["pheno_real"]()
    with pytest.raises(nlmefit.ModelSpecError, match="params= function"):
        nlmefit.scm(model, nlmefit.datasets.load("pheno"), {"cl": ["WT"]})


def test_cli_scm_writes_log_and_final_fit(tmp_path, capsys):
    out = tmp_path / "scm"
    assert main(["scm", "warfarin", "--error", "prop", "--cov-candidates", "cl:WT", "--p-backward", "0.05",
                 "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "cl-WT (power)" in printed and "4.323" in printed
    log = pd.read_csv(out / "scm_log.csv")
    assert list(log["direction"]) == ["base", "forward", "backward"] and not log["removed"].any()
    fit = nlmefit.FitResult.from_json(out / "result.json")
    assert f"beta_cl_log(WT/{WT_MEDIAN})" in fit.estimates.index
    assert fit.source["covariates"] == {"cl": [f"log(WT / {WT_MEDIAN})"]}
    assert fit.model is not None  # rebuilt from the saved library specification
    assert main(["scm", "warfarin", "--cov-candidates", "cl:WT=linear", "--out", str(tmp_path / "x")]) == 2
    assert "linear" in capsys.readouterr().err
    assert main(["scm", "warfarin", "--cov-candidates", "clWT", "--out", str(tmp_path / "x")]) == 2


@pytest.mark.slow
def test_acceptance_wt_age_sex_on_cl_and_v():
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = nlmefit.scm(_base(), _data(), {"cl": ["WT", "AGE", "SEX"], "v": ["WT", "AGE", "SEX"]})
    print(res.summary_text(), f"\nwall {time.perf_counter() - t0:.1f} s")
    log = res.log
    inc = log[(log["direction"] == "forward") & log["included"]]
    assert ("cl", "WT") in set(zip(inc["parameter"], inc["covariate"]))  # WT on CL is included going forward
    assert ("v", "WT", "power") in res.selected
    assert log.loc[log["direction"] != "base", "delta_ofv"].notna().all()


@pytest.mark.slow
def test_lag_time_combined_error_base_gives_the_same_wt_on_cl_decision():
    """docs/scm.md, "warfarin: what the data say": with the better base model (absorption lag, combined error;
    OFV 285.1 vs 474.5) WT on V enters (ΔOFV 24.8), WT on CL follows (ΔOFV 5.2, p 0.022) and is removed again at
    p < 0.01 (it would need 6.63)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = nlmefit.library.get("1cmt_oral", error="combined2", dvid="cp", theta={"tlag": 0.5})
        res = nlmefit.scm(base, _data(), {"cl": ["WT"], "v": ["WT"]})
    log = res.log
    inc = log[(log["direction"] == "forward") & log["included"]]
    assert list(zip(inc["parameter"], inc["covariate"])) == [("v", "WT"), ("cl", "WT")]
    assert res.base_fit.ofv == pytest.approx(285.14, abs=0.05)
    cl_fwd = inc.iloc[1]
    assert chi2.isf(0.05, 1) < cl_fwd["delta_ofv"] < chi2.isf(0.01, 1)
    removed = log[log["removed"]]
    assert list(removed["covariate"] + "-" + removed["parameter"]) == ["WT-cl"]
    assert res.selected == [("v", "WT", "power")]
