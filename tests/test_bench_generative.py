"""`nlmefit bench`: the NLME-vs-generative harness end to end with tiny settings (the full 500/200 run is in
the closing note and behind the slow marker), its table, the unseen-regimen rows and the files it writes."""
import numpy as np
import pandas as pd
import pytest

from nlmefit.benchmark.generative import MODELS, run_benchmark
from nlmefit.benchmark.generative_data import simulate_benchmark
from nlmefit.cli import main
from nlmefit.errors import ModelSpecError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    return out, main(["bench", "--n-train", "30", "--n-test", "12", "--quick", "--samples", "120", "--out", str(out)])


def test_cli_runs_every_model_and_writes_the_table(tiny, capsys):
    out, rc = tiny
    assert rc == 0
    table = pd.read_csv(out / "table.csv")
    assert set(table["MODEL"]) == set(MODELS)
    assert set(table["REGIMEN"]) == {"held-out (training regimen)", "300 mg once", "100 mg q12h"}
    for f in ("table.txt", "metrics.png", "profiles.png"):
        assert (out / f).stat().st_size > 0
    kinds = table.drop_duplicates("MODEL").set_index("MODEL")["KIND"]
    assert kinds["gan"] == "none" and kinds["ppca"] == "exact" and kinds["ddpm"] == "bound"
    assert kinds["nf"] == "exact" and kinds["vae"] == "estimate" and kinds["nlme_focei"] == "estimate"


def test_unseen_regimen_rows(tiny):
    table = pd.read_csv(tiny[0] / "table.csv")
    unseen = table[table["REGIMEN"] != "held-out (training regimen)"].set_index(["MODEL", "REGIMEN"])
    for m in ("ppca", "ebm", "gan"):  # no dose input
        row = unseen.loc[(m, "300 mg once")]
        assert "not applicable" in row["NOTE"] and np.isnan(row["NLL"]) and np.isnan(row["ENERGY"])
    for m in ("nlme_focei", "nlme_vem", "vae", "ddpm", "nf", "flow_matching"):
        row = unseen.loc[(m, "100 mg q12h")]
        assert np.isfinite(row["NLL"]) and np.isfinite(row["COVERAGE_MAE"])
    held = table[table["REGIMEN"] == "held-out (training regimen)"].set_index("MODEL")
    assert np.isnan(held.loc["gan", "NLL"]) and np.isfinite(held.loc["gan", "ENERGY"])
    # NLME's mechanism carries over to 300 mg: its VPC coverage stays near nominal, unlike a model that
    # has never seen the dose vary
    assert unseen.loc[("nlme_focei", "300 mg once"), "COVERAGE_MAE"] < 0.15
    assert unseen.loc[("nf", "300 mg once"), "COVERAGE_MAE"] > 0.3


def test_run_benchmark_api_and_bad_model():
    bench = simulate_benchmark(n_train=20, n_test=8, unseen={})
    res = run_benchmark(bench, models=("ppca",), n_samples=60, quick=True)
    assert list(res.table["MODEL"]) == ["ppca"]
    assert res.samples[("ppca", "held-out (training regimen)")].shape == (60, 9)
    with pytest.raises(ModelSpecError, match="unknown model"):
        run_benchmark(bench, models=("ppca", "transformer"))
    with pytest.raises(ModelSpecError, match="unknown simulator"):
        simulate_benchmark("3cmt_iv")


def test_cli_bad_arguments(capsys):
    assert main(["bench", "--n-train", "1"]) == 2
    assert "at least 2" in capsys.readouterr().err
    assert main(["bench", "--models", "ppca,foo", "--n-train", "4", "--n-test", "3", "--no-unseen"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_bench_on_a_data_set_with_a_dose_level_held_out(tmp_path, capsys):
    """The nlmixr2 Oral_1CPT single-dose subjects (four dose levels on one sampling design): 120 mg is held out of
    training; NLME predicts it through its mechanism, the flow (dose as input) has never seen that context."""
    rc = main(["bench", "--data", "oral_1cpt", "--where", "SD == 1", "--model", "1cmt_oral", "--unseen-dose",
               "120000", "--quick", "--samples", "150", "--models", "nlme_focei,ppca,nf", "--out", str(tmp_path)])
    assert rc == 0
    table = pd.read_csv(tmp_path / "table.csv").set_index(["MODEL", "REGIMEN"])
    unseen = "dose 120000 (held out of training)"
    assert "not applicable" in table.loc[("ppca", unseen), "NOTE"]
    assert table.loc[("nlme_focei", unseen), "COVERAGE_MAE"] < 0.1
    assert table.loc[("nf", unseen), "COVERAGE_MAE"] > table.loc[("nlme_focei", unseen), "COVERAGE_MAE"]
    assert "incomplete subjects dropped" in capsys.readouterr().out
    assert main(["bench", "--data", "oral_1cpt", "--no-unseen"]) == 2
    assert "--data needs --model" in capsys.readouterr().err
    assert main(["bench", "--model", "1cmt_oral"]) == 2
    assert "apply to --data" in capsys.readouterr().err
    assert main(["bench", "--data", "oral_1cpt", "--where", "SD == 1", "--model", "1cmt_oral",
                 "--unseen-dose", "5"]) == 2
    assert "no subject's first dose" in capsys.readouterr().err


@pytest.mark.slow
def test_full_benchmark_acceptance_run(tmp_path):
    """The issue's acceptance command: 500 training / 200 held-out subjects, every model (≤ 10 min on 2 cores)."""
    assert main(["bench", "--simulate", "1cmt_oral", "--n-train", "500", "--n-test", "200",
                 "--out", str(tmp_path)]) == 0
    table = pd.read_csv(tmp_path / "table.csv")
    held = table[table["REGIMEN"] == "held-out (training regimen)"].set_index("MODEL")
    assert held.loc["nlme_focei", "COVERAGE_MAE"] < 0.05
