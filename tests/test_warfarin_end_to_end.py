"""Issue 11 acceptance: warfarin end to end from the CLI — fit the PK endpoint, diagnose, simulate two
regimens with a PTA on AUC24, and simulate replicates of the data — with the PCA rows untouched in every
simulated output."""
import json

import numpy as np
import pandas as pd

import nlmefit
from nlmefit.cli import main


def test_warfarin_pk_fit_diagnose_and_regimens_from_the_cli(tmp_path, capsys):
    fit_dir = tmp_path / "fit"
    assert main(["fit", "warfarin", "--error", "prop", "--no-cov", "--quiet", "--out", str(fit_dir)]) == 0
    d = json.loads((fit_dir / "result.json").read_text())
    raw = nlmefit.datasets.load("warfarin")
    pk_obs = int(((raw["DVID"] == "cp") & (raw["EVID"] == 0) & (raw["MDV"] == 0)).sum())
    assert d["source"]["dvid"] == "cp" and d["n_obs"] == pk_obs  # the PK rows only
    # diagnostics from the saved result (small replicate count to stay fast)
    assert main(["diagnose", str(fit_dir), "--n-rep", "20", "--quiet"] if _has_quiet("diagnose") else
                ["diagnose", str(fit_dir), "--n-rep", "20"]) == 0
    assert (fit_dir / "diagnostics").is_dir() and any((fit_dir / "diagnostics").glob("*.png"))
    # two regimens with the same daily dose, PTA on AUC24
    reg_dir = tmp_path / "regimens"
    assert main(["simulate", "--fit", str(fit_dir), "--regimen", "5 mg po q12h x14", "--regimen",
                 "10 mg po q24h x7", "--population", "300", "--seed", "1", "--steady-state",
                 "--target", "AUC24>=20", "--out", str(reg_dir)]) == 0
    pta = pd.read_csv(reg_dir / "pta.csv")
    assert pta["TARGET"].str.contains("AUC24").all() and len(pta) == 2
    assert abs(pta["PTA"].iloc[0] - pta["PTA"].iloc[1]) < 1e-9  # same daily dose at steady state, same draws
    for f in reg_dir.glob("*.csv"):
        frame = pd.read_csv(f)
        if "DVID" in frame.columns:
            assert set(frame["DVID"].astype(str)) <= {"cp"}
    # replicates of the data set: the PCA rows keep their observed DV
    sim_csv = tmp_path / "sim.csv"
    est = d["estimates"]
    params = [f"--param={k}={v}" for k, v in est.items()]
    assert main(["simulate", "warfarin", "--model", "1cmt_oral", "--error", "prop", "--dvid", "cp", *params,
                 "-n", "2", "--seed", "3", "--out", str(sim_csv)]) == 0
    sim = pd.read_csv(sim_csv)
    pca_obs = raw[(raw["DVID"] == "pca") & (raw["MDV"] == 0)]
    for _, rep in sim.groupby("REP" if "REP" in sim.columns else sim.columns[0]):
        rows = rep[rep["DVID"] == "pca"]
        np.testing.assert_allclose(np.sort(rows["DV"].dropna().to_numpy()), np.sort(pca_obs["DV"].dropna().to_numpy()))
    assert "Traceback" not in capsys.readouterr().err


def _has_quiet(cmd: str) -> bool:
    from nlmefit.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices[cmd]
    return any("--quiet" in a.option_strings for a in sub._actions)
