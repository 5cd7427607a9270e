"""The SAEM / IS benchmark runs end to end in quick mode and reports sane figures (never a wall-time threshold)."""
import json
import math

from nlmefit.benchmark.em import main


def test_em_benchmark_quick_rows_and_json(tmp_path, capsys):
    out = tmp_path / "em.json"
    rows = main(["--quick", "--sizes", "200", "--n-explore", "10", "--n-smooth", "10", "--device", "cpu",
                 "--out", str(out)])
    printed = capsys.readouterr().out
    assert [r["problem"] for r in rows] == ["theophylline 1cmt_oral", "pheno_real", "sim 1cmt_oral x10 obs"]
    assert [r["n_subjects"] for r in rows] == [12, 59, 200]
    assert rows[-1]["n_obs"] == 2000
    for r in rows:
        for key in ("saem_s", "saem_s_per_iter", "is_s", "peak_rss_mb"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["problem"], key, r[key])
        assert r["saem_iterations"] == 20
        assert r["saem_s_per_iter"] < r["saem_s"]
        assert math.isfinite(r["is_ofv"]) and math.isfinite(r["is_se"]) and r["is_se"] >= 0
        assert r["device"] == "cpu" and r["cpu_count"] >= 1 and r["torch"]
        assert r["problem"] in printed
    saved = json.loads(out.read_text())
    assert saved["n_explore"] == 10 and saved["n_smooth"] == 10
    assert [r["n_subjects"] for r in saved["rows"]] == [12, 59, 200]
    assert [p.name for p in tmp_path.iterdir()] == ["em.json"]  # atomic write leaves no temporary file
