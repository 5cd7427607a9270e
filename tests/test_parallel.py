"""Data-parallel estimation on torch.distributed (issue 15): 2 gloo ranks on loopback vs one process.

Outside truth: the single-process fit of the same model and data. The sharded objective is the same sum in
another order (per-rank partial sums, then the all-reduce), so OFVs agree to rounding (1e-8 relative is the
acceptance line) and the optimiser's path, hence the estimates, to the optimiser's tolerance (1e-6).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

import nlmefit
from nlmefit.models.examples import pheno_real
from nlmefit.parallel import balanced_assignment, current, launch_local


def test_balanced_assignment_balances_observations_not_subjects():
    n_obs = np.array([50, 1, 1, 1, 1, 1, 1, 1, 1, 1, 40, 2])
    parts = balanced_assignment(n_obs, 2)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(n_obs)))  # every subject once
    loads = [int(n_obs[p].sum()) for p in parts]
    assert abs(loads[0] - loads[1]) <= 2 and max(len(p) for p in parts) > 6  # balanced by count of observations
    assert all((a == b).all() for a, b in zip(parts, balanced_assignment(n_obs, 2)))  # deterministic
    assert [len(p) for p in balanced_assignment(np.ones(1), 3)] == [1, 0, 0]


def test_single_process_has_no_shard():
    assert current() is None


def _two_ranks(tmp_path, *extra: str) -> nlmefit.FitResult:
    """``nlmefit fit pheno --model pheno_real *extra --workers 2``: the result rank 0 wrote."""
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "nlmefit", "fit", "pheno", "--model", "pheno_real", "--out", str(out), "--quiet",
           *extra, "--workers", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode in (0, 1), proc.stderr  # 1: written, but not converged (a short SAEM run)
    assert proc.stdout.count("wrote ") == 1  # rank 0 alone prints and writes
    return nlmefit.FitResult.from_json(out / "result.json")


def test_two_ranks_give_the_single_process_fit(tmp_path):
    # FOCE-I with its covariance step, and the seeded IS -2LL at the estimates (draws by subject index)
    two = _two_ranks(tmp_path, "--loglik", "is", "--n-samples", "300", "--seed", "3")
    assert two.converged
    one = nlmefit.fit(pheno_real(), nlmefit.datasets.load("pheno"), seed=3, compute_loglik="is",
                      loglik_options={"n_samples": 300})
    assert two.ofv == pytest.approx(one.ofv, rel=1e-8)
    for k in one.estimates.index:
        assert two.estimates[k] == pytest.approx(one.estimates[k], rel=1e-6), k
    assert two.se["tvcl"] == pytest.approx(one.se["tvcl"], rel=1e-6)
    # predictions.csv: formatted by both ranks, published by rank 0; no share left behind
    csv = pd.read_csv(tmp_path / "two" / "predictions.csv")
    assert list(csv.columns) == list(one.predictions.columns) and len(csv) == len(one.predictions)
    assert np.allclose(csv["CWRES"], one.predictions["CWRES"], rtol=1e-6, atol=1e-9)
    assert not [p for p in (tmp_path / "two").iterdir() if p.name.startswith(".")]
    is2, is1 = two.likelihoods["is"], one.likelihoods["is"]
    assert is2["ofv"] == pytest.approx(is1["ofv"], rel=1e-8) and is2["se"] == pytest.approx(is1["se"], rel=1e-6)


def test_seeded_saem_on_two_ranks_equals_one_process(tmp_path):
    # the E-step draws by subject index and the statistics are all-reduced: the same chains, the same estimates
    two = _two_ranks(tmp_path, "--method", "saem", "--seed", "11", "--n-explore", "40", "--n-smooth", "40",
                     "--n-samples", "200", "--no-cov")
    one = nlmefit.fit(pheno_real(), nlmefit.datasets.load("pheno"), method="saem", seed=11, n_explore=40,
                      n_smooth=40, n_samples=200, covariance=None)
    assert two.ofv == pytest.approx(one.ofv, rel=1e-8)
    for k in one.estimates.index:
        assert two.estimates[k] == pytest.approx(one.estimates[k], rel=1e-6), k
    a, b = two.individual_estimates, one.individual_estimates  # incl. the posterior means and SDs of the draws
    num = b.select_dtypes("number").columns
    assert np.allclose(a[num].to_numpy(float), b[num].to_numpy(float), rtol=1e-6, atol=1e-12)


def test_a_failed_rank_stops_the_others_with_a_message(tmp_path, capfd):
    # every rank fails at once (a usage error): launch_local returns its code and names the rank, no hang
    argv = ["fit", "pheno", "--model", "pheno_real", "--out", str(tmp_path / "x"), "--quiet"]
    t0 = time.monotonic()
    code = launch_local(argv + ["--maxiter", "-1"], 2)  # a usage error on every rank: exit 2, no hang
    assert code == 2 and time.monotonic() - t0 < 60
    assert "rank" in capfd.readouterr().err
    assert not (tmp_path / "x" / "result.json").exists()


@pytest.mark.slow
def test_killing_a_rank_mid_fit_ends_the_run_without_a_result(tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "nlmefit", "fit", "oral_2cpt", "--model", "2cmt_oral", "--error", "proportional",
           "--no-cov", "--quiet", "--out", str(out), "--workers", "2"]
    parent = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    time.sleep(8)  # past start-up: the ranks are inside the fit
    kids = subprocess.run(["pgrep", "-P", str(parent.pid)], capture_output=True, text=True).stdout.split()
    assert len(kids) == 2
    t0 = time.monotonic()
    os.kill(int(kids[-1]), signal.SIGKILL)
    _, err = parent.communicate(timeout=60)
    assert time.monotonic() - t0 < 60 and parent.returncode != 0
    assert "rank 1 of 2 was killed by signal 9" in err
    assert not (out / "result.json").exists()


@pytest.mark.slow
def test_bootstrap_on_two_ranks_equals_one_process(tmp_path):
    from nlmefit.cli import main

    fit_dir = tmp_path / "fit"
    assert main(["fit", "pheno", "--model", "pheno_real", "--out", str(fit_dir), "--quiet", "--no-cov"]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k, name in ((2, "two"), (1, "one")):
        cmd = [sys.executable, "-m", "nlmefit", "bootstrap", str(fit_dir), "--n", "8", "--no-bca", "--quiet",
               "--out", str(tmp_path / name)] + (["--workers", str(k)] if k > 1 else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr
    a = pd.read_csv(tmp_path / "two" / "bootstrap_estimates.csv")
    b = pd.read_csv(tmp_path / "one" / "bootstrap_estimates.csv")
    cols = [c for c in a.columns if c not in ("n_iter", "success")]
    assert np.allclose(a[cols].to_numpy(), b[cols].to_numpy(), rtol=1e-10, atol=0)
    assert (a["success"] == b["success"]).all()
