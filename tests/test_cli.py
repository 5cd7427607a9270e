"""The nlmefit command: validate, simulate, fit (exit codes, files, one-line errors)."""
import json
import subprocess
import sys

import pandas as pd
import pytest

import nlmefit
from nlmefit.cli import main
from nlmefit.results import FitResult


@pytest.mark.parametrize("name", ["theophylline", "pheno", "warfarin", "wang2007", "oral_1cpt", "bolus_2cpt",
                                  "infusion_1cpt"])
def test_validate_prints_summary_of_shipped_datasets(name, capsys):
    rc = main(["validate", name])
    out = capsys.readouterr().out
    assert rc == 0 and "subjects=" in out


def test_validate_csv_path(capsys):
    assert main(["validate", str(nlmefit.datasets.path("pheno"))]) == 0
    assert "subjects=59" in capsys.readouterr().out


def test_validate_broken_csv_one_line_exit_2(tmp_path, capsys):
    df = nlmefit.datasets.load("theophylline")
    df.loc[5, "TIME"] = -3
    f = tmp_path / "bad.csv"
    df.to_csv(f, index=False)
    rc = main(["validate", str(f)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "TIME" in err and "ID" in err


def test_validate_missing_file_exit_2(capsys):
    assert main(["validate", "/nonexistent/file.csv"]) == 2


def test_simulate_library_model(tmp_path):
    out = tmp_path / "sim.csv"
    rc = main(["simulate", "theophylline", "--model", "1cmt_oral", "--param", "cl=2.8", "--param", "v=32",
               "-n", "2", "--seed", "3", "--out", str(out)])
    assert rc == 0
    sim = pd.read_csv(out)
    assert sim["REP"].nunique() == 2 and len(sim) == 2 * 144


def test_simulate_model_from_file(tmp_path):
    f = tmp_path / "mymodel.py"
    f.write_text("import nlmefit\nmodel = nlmefit.library.get('1cmt_oral', error='proportional')\n")
    out = tmp_path / "sim.csv"
    assert main(["simulate", "theophylline", "--model", f"{f}:model", "--out", str(out), "--seed", "1"]) == 0
    assert main(["simulate", "theophylline", "--model", f"{f}:nothing", "--out", str(out)]) == 2


def test_fit_theophylline_writes_result_and_round_trips(tmp_path):
    rc = main(["fit", "theophylline", "--out", str(tmp_path), "--quiet"])
    assert rc == 0
    d = json.loads((tmp_path / "result.json").read_text())
    for key in ["method", "ofv", "loglik", "aic", "bic", "n_subjects", "n_obs", "converged", "elapsed_s",
                "estimates", "se"]:
        assert key in d
    assert {"sigma_add", "omega_cl", "omega_v", "omega_ka", "cl", "v", "ka"} <= set(d["estimates"])
    assert abs(d["ofv"] - 116.8) < 0.1
    r = FitResult.from_json(tmp_path / "result.json")
    assert r.ofv == d["ofv"] and r.estimates.to_dict() == d["estimates"]
    assert (tmp_path / "summary.csv").exists() and (tmp_path / "predictions.csv").exists()


def test_fit_agq_with_an_is_evaluation(tmp_path, capsys):
    rc = main(["fit", "theophylline", "--method", "agq", "--n-nodes", "2", "--no-cov", "--loglik", "is",
               "--n-samples", "500", "--seed", "3", "--out", str(tmp_path), "--quiet"])
    assert rc == 0
    d = json.loads((tmp_path / "result.json").read_text())
    assert d["method"] == "agq" and d["options"]["n_nodes"] == 2
    lik = d["likelihoods"]["is"]
    assert lik["n_samples"] == 500 and lik["se"] > 0 and abs(lik["ofv"] - 118.12) < 0.5
    assert "-2LL by is" in capsys.readouterr().out


def test_fit_saem_reports_the_is_ofv(tmp_path):
    rc = main(["fit", "theophylline", "--method", "saem", "--no-cov", "--seed", "1", "--n-samples", "300",
               "--out", str(tmp_path), "--quiet"])
    assert rc == 0
    d = json.loads((tmp_path / "result.json").read_text())
    assert d["method"] == "saem" and d["seed"] == 1
    assert d["ofv"] == d["likelihoods"]["is"]["ofv"] and abs(d["ofv"] - 118.1) < 1.0
    assert len(d["traces"]["data"]) == 300


def test_n_nodes_without_agq_is_refused(tmp_path, capsys):
    assert main(["fit", "theophylline", "--n-nodes", "3", "--out", str(tmp_path), "--quiet"]) == 2
    assert "--n-nodes" in capsys.readouterr().err


def test_console_script_installed():
    out = subprocess.run([sys.executable, "-m", "nlmefit.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "validate" in out.stdout


def test_diagnose_and_regimen_simulation_from_a_result_dir(tmp_path, capsys):
    import matplotlib

    matplotlib.use("Agg")
    fit_dir = tmp_path / "fit"
    assert main(["fit", "theophylline", "--no-cov", "--out", str(fit_dir), "--quiet"]) == 0
    assert main(["diagnose", str(fit_dir), "--n-rep", "50"]) == 0
    diag = fit_dir / "diagnostics"
    for name in ["gof.png", "individuals_01.png", "eta.png", "npde.png", "vpc.png", "pcvpc.png", "npde.csv",
                 "npde_tests.csv", "vpc.csv"]:
        assert (diag / name).stat().st_size > 0, name
    sim_dir = tmp_path / "sim"
    assert main(["simulate", "--fit", str(fit_dir), "--regimen", "320 mg po q12h x4", "--regimen",
                 "640 mg po q24h x2", "--population", "200", "--seed", "1", "--threshold", "5",
                 "--target", "AUC>=100", "--mic", "0.5,1,2", "--out", str(sim_dir)]) == 0
    pta = pd.read_csv(sim_dir / "pta.csv")
    assert set(pta["REGIMEN"]) == {"320 mg oral q12h x4", "640 mg oral q24h x2"} and len(pta) == 6
    ex = pd.read_csv(sim_dir / "exposures.csv")
    assert len(ex) == 400 and {"AUC", "CMAX", "FT_ABOVE_PCT"} <= set(ex.columns)
    assert (sim_dir / "profiles.png").stat().st_size > 0
    own = tmp_path / "own"
    assert main(["simulate", "--fit", str(fit_dir), "--regimen", "320 mg po q8h x3", "--subjects", "1,7",
                 "--n-draws", "20", "--out", str(own)]) == 0
    assert set(pd.read_csv(own / "exposures.csv")["ID"]) == {1, 7}
    capsys.readouterr()
    assert main(["simulate", "--fit", str(fit_dir), "--regimen", "320 mg po q8h x3", "--out", str(own)]) == 2
    assert "--population" in capsys.readouterr().err
    assert main(["simulate", "--fit", str(fit_dir), "--regimen", "320 mg sometimes", "--population", "5",
                 "--out", str(own)]) == 2
