"""NONMEM control streams in (issue 16 item 1): pharmpy parses, nlmefit.nonmem translates.

Outside truth: pharmpy's own ``pheno.mod`` (the pheno_real control stream) and its NONMEM 7 output ``pheno.lst``
(OFV 586.27605628520962), and the hand-written models the streams describe (same OFV at the same parameters to
rounding, 1e-9 relative: the same arithmetic in another order). The pheno fits follow the same optimiser path
(measured: estimates equal to 1.4e-15); the test checks the acceptance line, 1e-6.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import nlmefit
from nlmefit import ModelSpecError
from nlmefit.models.examples import pheno_real

pytest.importorskip("pharmpy")

HERE = Path(__file__).parent / "data" / "nonmem"
NONMEM_PHENO_OFV = 586.27605628520962  # pharmpy's example_models/pheno.lst, "OBJECTIVE FUNCTION VALUE WITHOUT CONSTANT"


def _pharmpy_example(name: str) -> Path:
    import pharmpy

    return Path(pharmpy.__file__).parent / "internals" / "example_models" / name


@pytest.fixture(scope="module")
def pheno_run():
    return nlmefit.from_nonmem(_pharmpy_example("pheno.mod"))


def test_pheno_real_control_stream_matches_nonmem_and_the_hand_written_model(pheno_run):
    run = pheno_run
    assert run.method == "focei" and run.options == {"covariance": "sandwich"}
    assert run.names == {"THETA(1)": "pop_cl", "THETA(2)": "pop_vc", "THETA(3)": "covapgr", "OMEGA(1,1)": "omega_cl",
                         "OMEGA(2,2)": "omega_vc", "SIGMA(1,1)": "sigma_prop"}
    assert run.model.parameters.theta["covapgr"].lower == -0.99  # $THETA (-.99, .1)
    assert math.isclose(run.model.parameters.sigma["prop"].init, math.sqrt(0.0130865))  # SIGMA variance -> SD
    res = run.fit()
    assert res.ofv == pytest.approx(NONMEM_PHENO_OFV, abs=1e-3)
    hand = nlmefit.fit(pheno_real(), nlmefit.datasets.load("pheno"))
    assert res.ofv == pytest.approx(hand.ofv, rel=1e-9)
    nm = run.nonmem_estimates(res)
    ref = {"THETA(1)": hand.estimates["tvcl"], "THETA(2)": hand.estimates["tvv"],
           "THETA(3)": hand.estimates["apgr_v"], "OMEGA(1,1)": hand.estimates["omega_cl"],
           "OMEGA(2,2)": hand.estimates["omega_v"], "SIGMA(1,1)": hand.estimates["sigma_prop"] ** 2}
    assert list(nm.index) == list(ref)
    for k, v in ref.items():
        assert nm[k] == pytest.approx(v, rel=1e-6), k
    # the standard errors too (the same sandwich covariance step)
    se = res.summary()["se"]
    hand_se = hand.summary()["se"]
    assert se["pop_cl"] == pytest.approx(hand_se["tvcl"], rel=1e-4)


def test_advan4_trans4_block_omega_ignore_filters(tmp_path):
    run = nlmefit.from_nonmem(HERE / "oral_2cpt_advan4.mod")
    full = nlmefit.datasets.load("oral_2cpt")
    assert len(run.data) == int((full.SD == 1).sum())  # IGNORE=(SD.EQ.0) applied; IGNORE=@ skipped the header
    assert not {"LNDV", "SS", "II", "V1T"} & set(run.data.columns)  # DROP
    assert isinstance(run.model.structure, nlmefit.models.ClosedForm) and run.model.structure.name == "2cmt_oral"
    assert run.names["OMEGA(2,1)"] == "omega_eta1_eta2"
    # the hand-written model the stream describes: TRANS4 CL, V2, Q, V3, KA with a (CL, V2) block
    hand = nlmefit.Model(nlmefit.models.ClosedForm(2, True), theta={"cl": 4, "v": 70, "q": 4, "vp": 50, "ka": 1},
                         omega=nlmefit.Omega({"cl": 0.1, "v": 0.1, "ka": 0.1}, blocks=[("cl", "v")],
                                             cov={("cl", "v"): 0.01}),
                         sigma={"prop": 0.2}, error="proportional")
    df = full[full.SD == 1].drop(columns=["LNDV", "SS", "II", "V1", "CL", "Q", "V2", "KA"])
    a = run.fit(maxiter=0, covariance=None)
    b = nlmefit.fit(hand, df, maxiter=0, covariance=None)
    assert a.ofv == pytest.approx(b.ofv, rel=1e-9)


@pytest.mark.slow
def test_advan4_stream_fit_equals_the_hand_written_fit():
    run = nlmefit.from_nonmem(HERE / "oral_2cpt_advan4.mod")
    res = run.fit()
    full = nlmefit.datasets.load("oral_2cpt")
    hand = nlmefit.Model(nlmefit.models.ClosedForm(2, True), theta={"cl": 4, "v": 70, "q": 4, "vp": 50, "ka": 1},
                         omega=nlmefit.Omega({"cl": 0.1, "v": 0.1, "ka": 0.1}, blocks=[("cl", "v")],
                                             cov={("cl", "v"): 0.01}),
                         sigma={"prop": 0.2}, error="proportional")
    ref = nlmefit.fit(hand, full[full.SD == 1].drop(columns=["LNDV", "SS", "II"]))
    assert res.ofv == pytest.approx(ref.ofv, abs=1e-4)
    nm = run.nonmem_estimates(res)
    assert nm["THETA(1)"] == pytest.approx(ref.estimates["cl"], rel=1e-5)
    assert nm["SIGMA(1,1)"] == pytest.approx(ref.estimates["sigma_prop"] ** 2, rel=1e-5)


def test_w_idiom_combined_error_and_theta_as_sd():
    run = nlmefit.from_nonmem(HERE / "theo_w_combined.mod")
    assert run.model.error.name == "combined2"
    assert run.names["THETA(4)"] == "sigma_add" and run.names["THETA(5)"] == "sigma_prop"
    assert "theta4" not in run.model.parameters.theta  # an SD in nlmefit, not a typical value
    assert run.options == {"covariance": None}  # no $COVARIANCE
    def allometric(th, et, cov):
        return {"cl": th["cl"] * (cov["WT"] / 70) ** 0.75 * torch.exp(et["cl"]), "v": th["v"] * torch.exp(et["v"]),
                "ka": th["ka"] * torch.exp(et["ka"])}

    hand = nlmefit.Model(nlmefit.models.ClosedForm(1, True),
                         theta={k: nlmefit.Param(v, lower=0) for k, v in {"cl": 2.8, "v": 32, "ka": 1.5}.items()},
                         omega={"cl": 0.1, "v": 0.1, "ka": 0.4}, sigma={"add": 0.5, "prop": 0.1}, error="combined2",
                         params=allometric)
    a = run.fit(maxiter=0)
    b = nlmefit.fit(hand, nlmefit.datasets.load("theophylline"), maxiter=0, covariance=None)
    assert a.ofv == pytest.approx(b.ofv, rel=1e-9)
    res = run.fit()
    nm = run.nonmem_estimates(res)
    assert nm["THETA(4)"] == pytest.approx(res.estimates["sigma_add"]) and nm["THETA(4)"] > 0


def test_pred_model_equals_the_closed_form(tmp_path):
    df = nlmefit.datasets.load("theophylline")
    df["DOSE"] = df.groupby("ID").AMT.transform("max")
    df.to_csv(tmp_path / "theo.csv", index=False)
    (tmp_path / "pred.mod").write_text("""$PROBLEM theophylline as $PRED
$INPUT ID TIME DV AMT EVID MDV CMT WT DOSE_MGKG DOSE
$DATA theo.csv IGNORE=@
$PRED
CL = THETA(1)*EXP(ETA(1))
V  = THETA(2)*EXP(ETA(2))
KA = THETA(3)*EXP(ETA(3))
K = CL/V
IPRED = DOSE*KA/(V*(KA-K))*(EXP(-K*TIME)-EXP(-KA*TIME))
Y = IPRED + EPS(1)
$THETA (0, 2.8) (0, 32) (0, 1.5)
$OMEGA 0.1 0.1 0.4
$SIGMA 0.5
$ESTIMATION METHOD=1 INTER
""")
    run = nlmefit.from_nonmem(tmp_path / "pred.mod")
    assert run.model.structure.name == "pred"
    res = run.fit(covariance=None)
    ref = nlmefit.fit(nlmefit.library.get("1cmt_oral", error="additive"), nlmefit.datasets.load("theophylline"),
                      covariance=None)
    assert res.ofv == pytest.approx(ref.ofv, abs=1e-3)  # README: 116.8034


def test_des_runs_on_the_ode_path_like_the_library_mm_model():
    run = nlmefit.from_nonmem(HERE / "oral_1cptmm_des.mod")
    assert isinstance(run.model.structure, nlmefit.models.OdeStructure)
    full = nlmefit.datasets.load("oral_1cptmm")
    df = full[(full.SD == 1) & (full.ID <= 6)].drop(columns=["LNDV", "V", "VM", "KM", "KA"])
    lib = nlmefit.library.get("1cmt_oral_mm", error="proportional", theta={"vm": 1000, "km": 250, "v": 70, "ka": 1},
                              omega={"vm": 0.1, "v": 0.1, "ka": 0.1}, sigma={"prop": 0.2})
    a = run.fit(maxiter=0, covariance=None)
    b = nlmefit.fit(lib, df, maxiter=0, covariance=None)
    # the library model integrates its depot in the integrating-factor coordinate (nlmefit.pk.ode), the translated
    # $DES in plain amounts: the same OFV to the solver's tolerance (rtol 1e-6; measured 7e-9 relative)
    assert a.ofv == pytest.approx(b.ofv, rel=1e-7)
    lib_plain = copy.copy(lib)
    lib_plain.structure = dataclasses.replace(lib.structure,
                                              system=dataclasses.replace(lib.structure.system, absorption=None))
    c = nlmefit.fit(lib_plain, df, maxiter=0, covariance=None)
    assert a.ofv == pytest.approx(c.ofv, rel=1e-9)  # the same discretisation: equal to rounding


# ---------------------------------------------------------------------------------------------- refusals
def _stream(tmp_path, pk: str, error: str = "Y = F + F*EPS(1)", est: str = "$ESTIMATION METHOD=1 INTER",
            omega: str = "$OMEGA 0.1 0.1", extra: str = "") -> Path:
    shutil.copy(_pharmpy_example("pheno.dta"), tmp_path / "pheno.dta")
    text = f"""$PROBLEM refusal
$INPUT ID TIME AMT WGT APGR DV FA1 FA2
$DATA pheno.dta IGNORE=@
$SUBROUTINE ADVAN1 TRANS2
$PK
{pk}
$ERROR
{error}
$THETA (0, 0.005) (0, 1)
{omega}
$SIGMA 0.013
{extra}
{est}
"""
    p = tmp_path / "run.mod"
    p.write_text(text)
    return p


PK = "CL = THETA(1)*WGT*EXP(ETA(1))\nV = THETA(2)*WGT*EXP(ETA(2))\nS1 = V"


def test_translated_if_else_runs_batched(tmp_path):
    pk = "TVCL = THETA(1)*WGT\nIF (APGR.LT.5) THEN\n  TVCL = TVCL*1.1\nELSE\n  TVCL = TVCL*0.9\nENDIF\n" \
         "CL = TVCL*EXP(ETA(1))\nV = THETA(2)*WGT*EXP(ETA(2))\nS1 = V"
    run = nlmefit.from_nonmem(_stream(tmp_path, pk))
    model = run.model
    data = model.prepare(nlmefit.Panel.from_dataframe(run.data))
    p = model.initial_params()
    eta = torch.zeros(data.n_subjects, model.n_iiv, dtype=torch.float64)
    ind = model.individual_parameters(p, eta, data)
    first = run.data.groupby("ID").first()
    expected = 0.005 * first.WGT.to_numpy() * np.where(first.APGR.to_numpy() < 5, 1.1, 0.9)
    assert ind["cl"][:, 0].numpy() == pytest.approx(expected, rel=1e-12)
    assert ind["v"][:, 0].numpy() == pytest.approx(first.WGT.to_numpy(), rel=1e-12)  # v = S1 = V


@pytest.mark.parametrize("pk, error, est, omega, match", [
    (PK.replace("EXP(ETA(1))", "GAMLN(ETA(1))"), "Y = F + F*EPS(1)", "$EST METHOD=1 INTER", "$OMEGA 0.1 0.1",
     "CL"),
    (PK, "Y = F*EXP(F*EPS(1)**2)", "$EST METHOD=1 INTER", "$OMEGA 0.1 0.1", r"\$ERROR"),
    (PK, "Y = F + F*EPS(1)", "$EST METHOD=IMP", "$OMEGA 0.1 0.1", "METHOD=IMP"),
    (PK, "Y = F + F*EPS(1)", "$EST METHOD=BAYES", "$OMEGA 0.1 0.1", "METHOD=BAYES"),
    (PK.replace("WGT*EXP(ETA(1))", "WGT*EXP(ETA(1))*UNDEFINED"), "Y = F + F*EPS(1)", "$EST METHOD=1 INTER",
     "$OMEGA 0.1 0.1", "UNDEFINED"),
    (PK, "Y = F + F*EPS(1)*ETA(1)", "$EST METHOD=1 INTER", "$OMEGA 0.1 0.1", "ETA_1"),
])
def test_untranslatable_statements_are_refused_by_name(tmp_path, pk, error, est, omega, match):
    with pytest.raises(ModelSpecError, match=match):
        nlmefit.from_nonmem(_stream(tmp_path, pk, error, est, omega))


def test_estimation_records_map_to_methods(tmp_path):
    cases = {
        "$EST METHOD=0": ("fo", {"covariance": None}),
        "$EST METHOD=1": ("foce", {"covariance": None}),
        "$EST METHOD=1 LAPLACE INTER": ("laplace", {"covariance": None}),
        "$EST METHOD=1 INTER MAXEVAL=0": ("focei", {"covariance": None, "maxiter": 0}),
        "$EST METHOD=SAEM NBURN=100 NITER=50\n$EST METHOD=IMP EONLY=1 ISAMPLE=500":
            ("saem", {"n_explore": 100, "n_smooth": 50, "compute_loglik": "is",
                      "loglik_options": {"n_samples": 500}}),
        "$EST METHOD=1 INTER\n$COV MATRIX=R": ("focei", {"covariance": "r"}),
    }
    for est, (method, options) in cases.items():
        run = nlmefit.from_nonmem(_stream(tmp_path, PK, est=est))
        assert (run.method, run.options) == (method, options), est


def test_fixed_parameters_and_omega_block_fix(tmp_path):
    pk = PK
    run = nlmefit.from_nonmem(_stream(tmp_path, pk, omega="$OMEGA BLOCK(2) 0.1 0.01 0.1 FIX"))
    ps = run.model.parameters
    assert "omega_eta1" not in ps.natural_names and "omega_eta1_eta2" not in ps.natural_names
    res = run.fit(covariance=None)
    nm = run.nonmem_estimates(res)
    assert "OMEGA(2,1)" not in nm.index or nm["OMEGA(2,1)"] == pytest.approx(0.01)


def test_cli_fits_a_control_stream(tmp_path, capsys):
    from nlmefit.cli import main

    out = tmp_path / "out"
    assert main(["fit", str(_pharmpy_example("pheno.mod")), "--out", str(out), "--quiet", "--no-cov"]) == 0
    res = nlmefit.FitResult.from_json(out / "result.json")
    assert res.ofv == pytest.approx(NONMEM_PHENO_OFV, abs=1e-3)
    assert "FOCEI" in capsys.readouterr().out
    assert main(["fit", str(_pharmpy_example("pheno.mod")), "--model", "1cmt_iv", "--out", str(out)]) == 2
    assert "control stream defines its model" in capsys.readouterr().err


def test_nonmem_run_repr_and_data_are_the_users(pheno_run):
    assert "pheno.mod" in repr(pheno_run) and "744 records" in repr(pheno_run)
    assert isinstance(pheno_run.data, pd.DataFrame) and pheno_run.data["ID"].dtype.kind == "i"


IOV_STREAM = """$PROBLEM theophylline with IOV on CL (two occasions: before and after 6 h)
$INPUT ID TIME DV AMT EVID MDV CMT WT DOSE_MGKG=DROP VISIT
$DATA theo.csv IGNORE=@
$SUBROUTINE ADVAN2 TRANS2
$PK
IOV = 0
IF (VISIT.EQ.1) IOV = ETA(4)
IF (VISIT.EQ.2) IOV = ETA(5)
CL = THETA(1)*EXP(ETA(1) + IOV)
V  = THETA(2)*EXP(ETA(2))
KA = THETA(3)*EXP(ETA(3))
S2 = V
$ERROR
Y = F + EPS(1)
$THETA (0, 2.8) (0, 32) (0, 1.5)
$OMEGA 0.1 0.1 0.4
$OMEGA BLOCK(1) 0.02
$OMEGA BLOCK(1) SAME
$SIGMA 0.5
$ESTIMATION METHOD=1 INTER
"""


def test_iov_same_blocks_become_nlmefit_iov(tmp_path):
    df = nlmefit.datasets.load("theophylline")
    df["VISIT"] = (df.TIME >= 6).astype(int) + 1
    df.to_csv(tmp_path / "theo.csv", index=False)
    (tmp_path / "iov.mod").write_text(IOV_STREAM)
    run = nlmefit.from_nonmem(tmp_path / "iov.mod")
    assert run.model.parameters.iov_names == ["iov1"] and run.names["OMEGA(4,4)"] == "omega_iov_iov1"
    assert "OCC" in run.data.columns and "VISIT" not in run.data.columns  # the tested column is nlmefit's OCC
    hand = nlmefit.Model(nlmefit.models.ClosedForm(1, True), theta={"cl": 2.8, "v": 32, "ka": 1.5},
                         omega={"cl": 0.1, "v": 0.1, "ka": 0.4}, iov={"cl": 0.02}, sigma={"add": math.sqrt(0.5)},
                         error="additive")
    a = run.fit(maxiter=0)
    b = nlmefit.fit(hand, df.rename(columns={"VISIT": "OCC"}), maxiter=0, covariance=None)
    assert a.ofv == pytest.approx(b.ofv, rel=1e-9)
    # an occasion in the data without its eta in the stream, and an IOV eta outside the idiom, are refused
    df.loc[df.TIME > 20, "VISIT"] = 3
    df.to_csv(tmp_path / "theo.csv", index=False)
    with pytest.raises(ModelSpecError, match="VISIT = 3"):
        nlmefit.from_nonmem(tmp_path / "iov.mod")
    bad = IOV_STREAM.replace("KA = THETA(3)*EXP(ETA(3))", "KA = THETA(3)*EXP(ETA(3)+ETA(5))")
    (tmp_path / "iov.mod").write_text(bad)
    with pytest.raises(ModelSpecError, match="outside the idiom"):
        nlmefit.from_nonmem(tmp_path / "iov.mod")


def test_alag1_becomes_tlag_and_several_dosed_compartments_are_refused(tmp_path):
    text = (HERE / "theo_w_combined.mod").read_text()
    data = (HERE / "../../../data/theophylline.csv").resolve()
    text = text.replace("../../../data/theophylline.csv", str(data)).replace("S2 = V\n", "S2 = V\nALAG1 = THETA(6)\n")
    text = text.replace("(0, 0.5) (0, 0.1)", "(0, 0.5) (0, 0.1) (0, 0.2)")
    (tmp_path / "lag.mod").write_text(text)
    run = nlmefit.from_nonmem(tmp_path / "lag.mod")
    assert run.names["THETA(6)"] == "theta6"
    ind = run.model.params_fn({k: torch.tensor(v.init, dtype=torch.float64) for k, v in
                               run.model.parameters.theta.items()},
                              {k: torch.zeros(2, 1, dtype=torch.float64) for k in run.model.eta_names},
                              {"WT": torch.full((2, 1), 70.0, dtype=torch.float64)})
    assert float(ind["tlag"]) == pytest.approx(0.2)
    df = nlmefit.datasets.load("theophylline")
    df.loc[df.index[0], "CMT"] = 2  # one dose into the central compartment: ALAG1 would not apply to it in NONMEM
    df.to_csv(tmp_path / "theo2.csv", index=False)
    (tmp_path / "lag2.mod").write_text(text.replace(str(data), "theo2.csv"))
    with pytest.raises(ModelSpecError, match="dose into compartments 1, 2"):
        nlmefit.from_nonmem(tmp_path / "lag2.mod")


def test_compiled_expressions_match_sympy_on_a_batch():
    import sympy

    from nlmefit.nonmem.expressions import compile_block

    a, b, c = sympy.symbols("a b c")
    exprs = {"max": sympy.Max(a, b, c), "pw": sympy.Piecewise((a, sympy.And(a > 0, b < 1)), (c, True)),
             "log10": sympy.log(c, 10), "pow": a ** 2 * sympy.sqrt(c) / b - 3, "neg": -2 * a + 1}
    f = compile_block(["a", "b", "c"], [("d", a + b, "$PK: D = A + B")], {**exprs, "d": sympy.Symbol("d")})
    vals = {"a": torch.tensor([1.0, -1.5, 2.0], dtype=torch.float64),
            "b": torch.tensor([0.5, 2.0, 3.0], dtype=torch.float64),
            "c": torch.tensor([3.0, 4.0, 0.1], dtype=torch.float64)}
    out = f(vals)
    for k, e in {**exprs, "d": a + b}.items():
        ref = [float(e.subs({a: float(vals["a"][i]), b: float(vals["b"][i]), c: float(vals["c"][i])}))
               for i in range(3)]
        assert out[k].numpy() == pytest.approx(ref, rel=1e-12), k
    with pytest.raises(ModelSpecError, match="Z is neither"):
        compile_block(["a"], [], {"x": a + sympy.Symbol("Z")})
