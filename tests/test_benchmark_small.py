"""The small-fit benchmark runs and reports the reference OFV (pheno only: one warm-up and one timed fit)."""
from __future__ import annotations

import pytest

from nlmefit.benchmark import small


def test_small_fit_benchmark_reports_time_and_reference_ofv(capsys):
    rows = small.run(repeats=1, problems=("pheno_real",))
    assert len(rows) == 1 and rows[0]["covariance_ok"]
    assert rows[0]["ofv"] == pytest.approx(586.27606, abs=1e-3)  # NONMEM 7 FOCE-I (tests/results/)
    assert 0 < rows[0]["min_s"] <= rows[0]["median_s"] and rows[0]["evals"] > 0
    assert "pheno_real" in capsys.readouterr().out


def test_repeats_must_be_positive():
    with pytest.raises(SystemExit):
        small.main(["--repeats", "0"])
