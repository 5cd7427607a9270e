"""The VEM and robustness benchmarks run end to end on small settings and report sane figures (never a wall-time
threshold); the robustness benchmark's set → model mapping and true values are checked against the data."""
import json
import math

import nlmefit
from nlmefit.benchmark import robust, vem


def test_vem_benchmark_rows_and_json(tmp_path, capsys):
    out = tmp_path / "vem.json"
    rows = vem.main(["--sizes", "40", "--max-steps", "60", "--device", "cpu", "--out", str(out)])
    printed = capsys.readouterr().out
    assert [r["method"] for r in rows] == ["FOCE-I", "SAEM", "VEM per-subject gaussian", "VEM amortized gaussian"]
    for r in rows:
        assert r["n_subjects"] == 40 and math.isfinite(r["total_s"]) and r["total_s"] > 0
        assert math.isfinite(r["m2ll"]) and r["method"] in printed
    for r in rows[2:]:
        assert r["steps"] == 60 and 0 < r["s_per_step"] < r["total_s"]
        assert r["m2elbo"] >= r["m2ll"] - 5.0  # a bound, up to Monte-Carlo error of two 40-subject estimates
    saved = json.loads(out.read_text())
    assert len(saved["rows"]) == 4 and [p.name for p in tmp_path.iterdir()] == ["vem.json"]


def test_robust_benchmark_mapping_and_truth():
    assert [robust.library_model_name(s) for s in ("bolus_2cpt", "infusion_1cptmm", "oral_2cptmm")] == [
        "2cmt_iv", "1cmt_iv_mm", "2cmt_oral_mm"]
    assert set(robust.SETS) <= set(nlmefit.datasets.names())
    df = nlmefit.datasets.load("bolus_2cpt")
    model = nlmefit.library.get("2cmt_iv", error="proportional")
    truth = robust.true_values(df[df["SD"] == 1], model)
    # the documented geometric means (data/PROVENANCE.md): CL ≈ 4, V1 ≈ 70, Q ≈ 4, V2 ≈ 50; ω² ≈ 0.09
    assert abs(truth["cl"] - 4) < 0.3 and abs(truth["v"] - 70) < 5 and abs(truth["q"] - 4) < 0.3
    assert abs(truth["vp"] - 50) < 4 and all(0.04 < truth[f"omega_{p}"] < 0.16 for p in ("cl", "v", "q", "vp"))


def test_robust_benchmark_one_set_reaches_the_truth_fit(tmp_path):
    rows = robust.main(["--sets", "bolus_1cpt", "--no-full", "--out", str(tmp_path / "r.json")])
    (row,) = rows
    assert row["auto"]["error"] is None and row["truth"]["error"] is None
    assert abs(row["diff"]) <= 0.01, row["diff"]  # the acceptance line of issue 10 for this set
    assert math.isnan(row["ratio_to_reference"])  # a linear SD set has no reference
