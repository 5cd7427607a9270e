"""Issue 11: the CLI's output checks, result validation, interrupts, file modes, saved model specs, data and
model options, error-model aliases, case-insensitive covariates, --threads, regimen residual error, traces."""
import json
import os
import stat

import pandas as pd
import pytest
import torch

import nlmefit
from nlmefit.cli import main
from nlmefit.models import spec as model_spec
from nlmefit.results import FitResult

FAST = ["--method", "fo", "--no-cov", "--quiet"]


@pytest.fixture(scope="module")
def theo_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("theo")
    assert main(["fit", "theophylline", *FAST, "--out", str(d)]) == 0
    return d


def _no_fit(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the fit started")

    monkeypatch.setattr(nlmefit, "fit", boom)


# ---------------------------------------------------------------- 8: output location checked first
@pytest.mark.parametrize("sub", ["", "deeper/out"])
def test_fit_refuses_a_file_as_out_before_fitting(tmp_path, monkeypatch, capsys, sub):
    f = tmp_path / "taken"
    f.write_text("x")
    _no_fit(monkeypatch)
    out = f / sub if sub else f
    assert main(["fit", "theophylline", "--out", str(out), "--quiet"]) == 2
    assert str(f) in capsys.readouterr().err


def test_diagnose_and_simulate_check_out_before_work(theo_dir, tmp_path, monkeypatch, capsys):
    f = tmp_path / "taken"
    f.write_text("x")
    monkeypatch.setattr("nlmefit.cli._load_fit", lambda *a: (_ for _ in ()).throw(AssertionError("loaded")))
    assert main(["diagnose", str(theo_dir), "--out", str(f)]) == 2
    assert main(["simulate", "--fit", str(theo_dir), "--regimen", "100 mg po q12h x2", "--population", "3",
                 "--out", str(f / "x")]) == 2
    monkeypatch.setattr("nlmefit.simulation.simulate", lambda *a, **k: (_ for _ in ()).throw(AssertionError()))
    assert main(["simulate", "theophylline", "--model", "1cmt_oral", "--out", str(tmp_path)]) == 2
    assert "Traceback" not in capsys.readouterr().err


# ---------------------------------------------------------------- 9: argument types
@pytest.mark.parametrize("argv", [["--param", "cl=abc"], ["--n-nodes", "0"], ["--maxiter", "x"],
                                  ["--threads", "-2"], ["--col", "XX=DV"], ["--sep", ""]])
def test_bad_arguments_exit_2_with_one_line(argv, capsys):
    assert main(["fit", "theophylline", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nlmefit fit: error: argument")


# ---------------------------------------------------------------- 10: result validation (API)
def test_from_json_names_what_is_wrong(theo_dir, tmp_path):
    good = json.loads((theo_dir / "result.json").read_text())
    cases = {"": "empty", "{\"ofv\": 1": "not valid JSON",
             json.dumps({k: v for k, v in good.items() if k != "n_subjects"}): "'n_subjects'",
             json.dumps({**good, "ofv": "low"}): "'ofv' should be a number",
             json.dumps({**good, "fixed": [1]}): "'fixed' should be a list of strings"}
    for text, needle in cases.items():
        p = tmp_path / "r.json"
        p.write_text(text)
        with pytest.raises(ValueError, match=needle):
            FitResult.from_json(p)
    with pytest.raises(ValueError, match="'method'"):
        FitResult.from_dict({k: v for k, v in good.items() if k != "method"})


# ---------------------------------------------------------------- 12: file modes, stale outputs
def test_result_json_mode_follows_the_umask_like_the_csvs(tmp_path):
    old = os.umask(0o022)
    try:
        assert main(["fit", "theophylline", *FAST, "--out", str(tmp_path)]) == 0
    finally:
        os.umask(old)
    mode = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert mode["result.json"] == mode["summary.csv"] == mode["predictions.csv"] == 0o644


def test_refit_moves_old_diagnostics_aside(theo_dir, tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(theo_dir, out)
    (out / "diagnostics").mkdir(exist_ok=True)
    (out / "diagnostics" / "gof.png").write_bytes(b"old")
    (out / "result.pt").write_bytes(b"stale weights")
    capsys.readouterr()
    assert main(["fit", "theophylline", *FAST, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert not (out / "diagnostics").exists() and not (out / "result.pt").exists()
    old = [p for p in out.iterdir() if p.name.startswith("diagnostics.old-")]
    assert len(old) == 1 and (old[0] / "gof.png").read_bytes() == b"old"
    assert "diagnostics.old-" in text and "result.pt" in text


# ---------------------------------------------------------------- 13: the model is saved with the result
def test_library_model_with_options_is_restored(tmp_path):
    out = tmp_path / "w"
    assert main(["fit", "warfarin", *FAST, "--error", "prop", "--cov", "cl ~ log(WT/70)", "--omega-block",
                 "cl,v", "--out", str(out)]) == 0
    d = json.loads((out / "result.json").read_text())
    assert d["model_spec"]["kind"] == "library" and d["model_spec"]["dvid"] == "cp"
    r = FitResult.from_json(out / "result.json")
    assert r.model is not None and r.model.error.name == "proportional" and r.model.dvid == "cp"
    assert "beta_cl_log(WT/70)" in r.model.parameters.theta and "omega_cl_v" in r.estimates
    p = r.population_parameters()  # usable without model=
    assert float(p.theta["cl"]) == pytest.approx(r.estimates["cl"])


def test_custom_model_reference_and_hash(tmp_path):
    src = tmp_path / "mymodel.py"
    src.write_text("import nlmefit\n\ndef model():\n    return nlmefit.library.get('1cmt_oral', error='add')\n")
    out = tmp_path / "c"
    assert main(["fit", "theophylline", *FAST, "--model", f"{src}:model", "--out", str(out)]) == 0
    d = json.loads((out / "result.json").read_text())
    assert d["model_spec"]["ref"] == f"{src}:model"
    assert FitResult.from_json(out / "result.json").model is not None
    d["model_spec"]["hash"] = "0" * 16  # the parameter model changed since the fit
    (out / "result.json").write_text(json.dumps(d))
    with pytest.warns(UserWarning, match="changed since the fit"):
        assert FitResult.from_json(out / "result.json").model is None


def test_python_model_without_reference_says_why(tmp_path):
    model = nlmefit.library.get("1cmt_oral")
    model.__dict__.pop("_nlmefit_spec")
    spec = model_spec.spec_of(model)
    assert spec["kind"] == "python"
    restored, why = model_spec.restore(spec)
    assert restored is None and "model=" in why
    ex = model_spec.attach_reference(nlmefit.models.examples.pheno_real(), "nlmefit.models.examples:pheno_real")
    back, why = model_spec.restore(json.loads(json.dumps(model_spec.spec_of(ex))))
    assert why is None and back.name == "pheno_real"


def test_diagnose_works_from_the_saved_spec_and_writes_traces(theo_dir, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(theo_dir, run)
    d = json.loads((run / "result.json").read_text())
    d["traces"] = {"columns": ["iteration", "cl", "v"], "index": [0, 1, 2],
                   "data": [[1, 2.0, 30.0], [2, 2.5, 31.0], [3, 2.7, 32.0]]}
    d["source"]["model"] = "3cmt_iv"  # ignored: the saved model spec wins
    (run / "result.json").write_text(json.dumps(d))
    assert main(["diagnose", str(run), "--n-rep", "10", "--threads", "1"]) == 0
    assert (run / "diagnostics" / "traces.png").stat().st_size > 0
    assert "traces.png" in capsys.readouterr().out


# ---------------------------------------------------------------- 14: data/model options, CLI hints
def test_column_map_sep_where_sort_maxiter(tmp_path):
    df = nlmefit.datasets.load("theophylline").rename(columns={"DV": "CONC", "ID": "Subject"})
    df = df.iloc[::-1]  # reversed: needs --sort
    f = tmp_path / "theo.csv"
    df.to_csv(f, sep=";", index=False)
    out = tmp_path / "o"
    assert main(["fit", str(f), "--model", "1cmt_oral", *FAST, "--col", "DV=CONC", "--col", "ID=Subject",
                 "--sep", ";", "--where", "Subject != 12", "--sort", "--maxiter", "200", "--out", str(out)]) == 0
    d = json.loads((out / "result.json").read_text())
    assert d["n_subjects"] == 11 and d["options"]["maxiter"] == 200
    assert d["source"]["columns"] == {"DV": "CONC", "ID": "Subject"} and d["source"]["sort"] is True
    r = FitResult.from_json(out / "result.json")
    assert r.model is not None
    assert main(["simulate", "--fit", str(out), "--regimen", "100 mg po q24h x1", "--population", "5",
                 "--out", str(tmp_path / "reg")]) == 0  # the data are read back with the same options


def test_error_hints_name_cli_flags(tmp_path, capsys):
    df = nlmefit.datasets.load("theophylline")
    df.iloc[::-1].to_csv(tmp_path / "rev.csv", index=False)
    df.rename(columns={"DV": "CONC"}).to_csv(tmp_path / "conc.csv", index=False)
    assert main(["validate", str(tmp_path / "rev.csv")]) == 2
    assert "--sort" in capsys.readouterr().err
    assert main(["validate", str(tmp_path / "conc.csv")]) == 2
    assert "--col DV=" in capsys.readouterr().err
    assert main(["validate", str(tmp_path / "conc.csv"), "--col", "dv=CONC"]) == 0


def test_maxiter_reaches_the_estimator(tmp_path, monkeypatch):
    seen = {}

    def fake_fit(model, data, **kw):
        seen.update(kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(nlmefit, "fit", fake_fit)
    assert main(["fit", "theophylline", "--maxiter", "0", "--out", str(tmp_path), "--quiet"]) == 130
    assert seen["maxiter"] == 0 and seen["method"] == "focei"


# ---------------------------------------------------------------- 15: aliases and covariate case
@pytest.mark.parametrize("alias, name", [("prop", "proportional"), ("add", "additive"), ("combined", "combined2"),
                                         ("EXP", "exponential")])
def test_error_aliases(alias, name, tmp_path, monkeypatch):
    seen = {}

    def fake_fit(model, data, **kw):
        seen["error"] = model.error.name
        raise KeyboardInterrupt

    monkeypatch.setattr(nlmefit, "fit", fake_fit)
    assert main(["fit", "theophylline", "--error", alias, "--out", str(tmp_path), "--quiet"]) == 130
    assert seen["error"] == name


@pytest.mark.parametrize("column, formula", [("wt", "log(WT/70)"), ("WT", "log(wt/70)"), ("Wt", "log(wT/70)")])
def test_covariate_names_are_case_insensitive(column, formula):
    df = nlmefit.datasets.load("warfarin").rename(columns={"WT": column})
    model = nlmefit.library.get("1cmt_oral", dvid="cp", covariates={"cl": formula})
    data = model.prepare(df)
    x = model.terms[0].evaluate(data.cov)
    assert torch.isfinite(x).all() and float(x.abs().sum()) > 0


def test_ambiguous_covariate_case_is_refused():
    df = nlmefit.datasets.load("warfarin")
    df["wt"] = df["WT"]
    model = nlmefit.library.get("1cmt_oral", dvid="cp", covariates={"cl": "log(Wt/70)"})
    with pytest.raises(nlmefit.errors.ModelSpecError, match="several data columns"):
        model.prepare(df)


def test_cli_covariate_formula_on_lower_case_column(tmp_path):
    df = nlmefit.datasets.load("warfarin").rename(columns={"WT": "wt"})
    df.to_csv(tmp_path / "warf.csv", index=False)
    assert main(["fit", str(tmp_path / "warf.csv"), "--model", "1cmt_oral", "--dvid", "cp", *FAST,
                 "--cov", "cl ~ log(WT/70)", "--out", str(tmp_path / "o")]) == 0


# ---------------------------------------------------------------- other requests
def test_threads_are_set(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.setattr(nlmefit, "fit", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert main(["fit", "theophylline", "--threads", "3", "--out", str(tmp_path), "--quiet"]) == 130
    assert calls == [3]


@pytest.mark.parametrize("flag, expected", [([], False), (["--residual"], True), (["--no-residual"], False)])
def test_regimen_simulation_residual_default_off(flag, expected, theo_dir, tmp_path, monkeypatch):
    seen = {}

    def fake(fit, regimens, **kw):
        seen.update(kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(nlmefit, "simulate_regimens", fake)
    assert main(["simulate", "--fit", str(theo_dir), "--regimen", "100 mg po q12h x2", "--population", "3",
                 "--out", str(tmp_path / "r"), *flag]) == 130
    assert seen["residual"] is expected


def test_replicate_simulation_keeps_residual_by_default(tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    assert main(["simulate", "theophylline", "--model", "1cmt_oral", "--seed", "1", "--out", str(a)]) == 0
    assert main(["simulate", "theophylline", "--model", "1cmt_oral", "--seed", "1", "--no-residual",
                 "--out", str(b)]) == 0
    assert not pd.read_csv(a)["DV"].equals(pd.read_csv(b)["DV"])


def test_warnings_are_formatted_as_one_line():
    from nlmefit.cli import _one_line_warning

    text = _one_line_warning(UserWarning("something odd\nover two lines"), UserWarning, "f.py", 3)
    assert text == "nlmefit: warning: something odd over two lines\n"
