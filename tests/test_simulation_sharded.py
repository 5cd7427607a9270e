"""Sharded and streamed simulation (issue 15, deliverable 4): ``simulate(..., out=)`` and
``simulate_regimens(..., out=, chunk_size=)`` in chunks, part files, manifest, and ranks.

Outside truths: the in-memory (unchunked) simulation of the same seed — a run of one chunk reproduces it exactly,
and a regimen simulation without residual error does not depend on the chunking at all — and the single-process
command for the two-rank one (identical part files; exposure summaries equal to rounding).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import nlmefit
from nlmefit.cli import main
from nlmefit.errors import ModelSpecError
from nlmefit.simulation.stream import chunk_seed

ROOT = Path(__file__).resolve().parents[1]
REGIMENS = ["100 mg po q12h x4", "200 mg po q24h x2"]


@pytest.fixture(scope="module")
def theo():
    return nlmefit.datasets.load("theophylline")


def _model():
    return nlmefit.library.get("1cmt_oral", error="combined2", theta={"cl": 2.8, "v": 32.0, "ka": 1.5},
                               omega={"cl": 0.07, "v": 0.02, "ka": 0.4}, sigma={"add": 0.3, "prop": 0.1})


def _bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_one_chunk_reproduces_the_in_memory_simulation(theo, tmp_path):
    before = theo.copy()
    mem = nlmefit.simulate(_model(), None, theo, n=3, seed=11)
    res = nlmefit.simulate(_model(), None, theo, n=3, seed=11, out=tmp_path / "one")
    pd.testing.assert_frame_equal(theo, before)  # input untouched
    assert res.n_chunks == 1 and res.n_rows == len(mem) and [p.name for p in res.parts] == ["part-00000.csv"]
    pd.testing.assert_frame_equal(res.read(), mem, check_dtype=False)  # same rows, order, columns and draws


def test_chunks_keep_the_record_layout_and_are_reproducible(theo, tmp_path):
    mem = nlmefit.simulate(_model(), None, theo, n=2, seed=5)
    a = nlmefit.simulate(_model(), None, theo, n=2, seed=5, out=tmp_path / "a", chunk_size=5)
    assert a.n_chunks == 3 and [p.name for p in a.parts] == [f"part-{c:05d}.csv" for c in range(3)]
    parts = a.read()
    assert list(parts.columns) == list(mem.columns) and len(parts) == len(mem) == a.n_rows
    # chunk-major (subjects 1-5, 6-10, 11-12), replicates inside a chunk: the same records as in memory
    key = ["REP", "ID"]
    srt = parts.sort_values(key, kind="stable").reset_index(drop=True)
    ref = mem.sort_values(key, kind="stable").reset_index(drop=True)
    pd.testing.assert_frame_equal(srt.drop(columns="DV"), ref.drop(columns="DV"), check_dtype=False)
    obs = srt["EVID"] == 0
    assert np.isfinite(srt.loc[obs, "DV"]).all()
    pd.testing.assert_series_equal(srt.loc[~obs, "DV"], ref.loc[~obs, "DV"].astype(float), check_dtype=False)
    # per-chunk draws: the same seed and chunk size give the same files byte for byte; the manifest lists them
    b = nlmefit.simulate(_model(), None, theo, n=2, seed=5, out=tmp_path / "b", chunk_size=5)
    assert _bytes(tmp_path / "a") == _bytes(tmp_path / "b")
    man = json.loads(a.manifest.read_text())
    assert man["seed"] == 5 and man["chunk_size"] == 5 and [p["file"] for p in man["parts"]] == [
        p.name for p in a.parts] and sum(p["rows"] for p in man["parts"]) == len(parts)
    assert b.seed == 5 and chunk_seed(5, 0) == 5 and chunk_seed(5, 1) != chunk_seed(5, 2)
    # a later run with fewer chunks leaves no stale part behind
    c = nlmefit.simulate(_model(), None, theo, n=2, seed=5, out=tmp_path / "a", chunk_size=12)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["manifest.json", "part-00000.csv"]
    assert c.n_chunks == 1


def test_bad_streaming_requests_are_refused(theo, tmp_path):
    with pytest.raises(ModelSpecError, match="chunk_size"):
        nlmefit.simulate(_model(), None, theo, chunk_size=3)
    with pytest.raises(ModelSpecError, match="chunk_size must be a positive"):
        nlmefit.simulate(_model(), None, theo, out=tmp_path / "z", chunk_size=0)
    with pytest.raises(ModelSpecError, match="format must be"):
        nlmefit.simulate(_model(), None, theo, out=tmp_path / "z", format="xlsx")
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ModelSpecError, match="not a folder"):
        nlmefit.simulate(_model(), None, theo, out=f)
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        with pytest.raises(ModelSpecError, match="pyarrow"):
            nlmefit.simulate(_model(), None, theo, out=tmp_path / "pq", format="parquet")
    else:
        r = nlmefit.simulate(_model(), None, theo, n=2, seed=1, out=tmp_path / "pq", format="parquet")
        pd.testing.assert_frame_equal(r.read(), nlmefit.simulate(_model(), None, theo, n=2, seed=1),
                                      check_dtype=False)


def test_regimen_chunks_and_profile_parts(tmp_path):
    model = _model()
    kw = dict(model=model, population=150, seed=3)
    mem = nlmefit.simulate_regimens(None, REGIMENS, **kw)
    sim = nlmefit.simulate_regimens(None, REGIMENS, **kw, chunk_size=40, out=tmp_path / "r")
    # without residual error the chunking changes nothing but the order of a few floating-point sums
    num = mem.exposures.select_dtypes("number").columns
    np.testing.assert_allclose(sim.exposures[num].to_numpy(float), mem.exposures[num].to_numpy(float), rtol=1e-12)
    pd.testing.assert_frame_equal(sim.exposures.drop(columns=num), mem.exposures.drop(columns=num))
    np.testing.assert_allclose(sim.profiles, mem.profiles, rtol=1e-12)
    pd.testing.assert_frame_equal(sim.summary(), mem.summary(), rtol=1e-12)
    names = sorted(p.name for p in (tmp_path / "r").iterdir())
    assert names == ["manifest.json"] + [f"profiles-part-{c:05d}.csv" for c in range(4)]
    parts = pd.concat([pd.read_csv(tmp_path / "r" / n) for n in names[1:]], ignore_index=True)
    tidy = mem.profile_frame()
    key = ["REGIMEN", "ID", "TIME"]
    parts = parts.sort_values(key, kind="stable").reset_index(drop=True)
    tidy = tidy.sort_values(key, kind="stable").reset_index(drop=True)
    pd.testing.assert_frame_equal(parts, tidy, check_dtype=False, rtol=1e-12)
    # with residual error: one chunk is the in-memory stream exactly; per-chunk draws are reproducible
    res = dict(kw, residual=True)
    one = nlmefit.simulate_regimens(None, REGIMENS, **res, chunk_size=1000)
    np.testing.assert_array_equal(one.profiles, nlmefit.simulate_regimens(None, REGIMENS, **res).profiles)
    a = nlmefit.simulate_regimens(None, REGIMENS, **res, chunk_size=40)
    b = nlmefit.simulate_regimens(None, REGIMENS, **res, chunk_size=40)
    np.testing.assert_array_equal(a.profiles, b.profiles)
    assert not np.array_equal(a.profiles, one.profiles)


def test_observed_subjects_in_chunks():
    fit = nlmefit.fit(nlmefit.library.get("1cmt_oral"), nlmefit.datasets.load("theophylline"), covariance=None,
                      progress=False)
    kw = dict(subjects="observed", n_draws=20, seed=2)
    mem = nlmefit.simulate_regimens(fit, "320 mg po q12h x4", **kw)
    sim = nlmefit.simulate_regimens(fit, "320 mg po q12h x4", **kw, chunk_size=50)  # 240 rows in 5 chunks
    np.testing.assert_array_equal(sim.exposures["ID"], mem.exposures["ID"])
    np.testing.assert_array_equal(sim.exposures["DRAW"], mem.exposures["DRAW"])
    np.testing.assert_allclose(sim.exposures["AUC24"], mem.exposures["AUC24"], rtol=1e-12)
    np.testing.assert_allclose(sim.profiles, mem.profiles, rtol=1e-12)


def _cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    proc = subprocess.run([sys.executable, "-m", "nlmefit", *argv], capture_output=True, text=True, timeout=300,
                          env=env, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_two_ranks_write_the_single_process_files(tmp_path):
    # replicates of a dataset: identical part files (and manifest) on 1 and 2 ranks
    common = ["simulate", "theophylline", "--model", "1cmt_oral", "-n", "3", "--seed", "4", "--chunk-size", "5",
              "--quiet"]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    two = _cli(*common, "--out", str(tmp_path / "two"), "--workers", "2", cwd=tmp_path)
    assert two.stdout.count("wrote ") == 1  # rank 0 alone prints
    assert len(list((tmp_path / "one").glob("part-*.csv"))) == 3
    assert _bytes(tmp_path / "one") == _bytes(tmp_path / "two")
    # regimens from a fit: the exposures of 200 virtual subjects, sharded in chunks of 50 over 2 ranks, equal the
    # single-process, unchunked result
    fit = tmp_path / "fit"
    assert main(["fit", "theophylline", "--model", "1cmt_oral", "--out", str(fit), "--quiet", "--no-cov"]) == 0
    reg = ["simulate", "--fit", str(fit), "--regimen", "320 mg po q12h x4", "--regimen", "640 mg po q24h x2",
           "--population", "200", "--seed", "3", "--target", "AUC>=100", "--quiet"]
    assert main([*reg, "--out", str(tmp_path / "r1")]) == 0
    r2 = _cli(*reg, "--out", str(tmp_path / "r2"), "--chunk-size", "50", "--workers", "2", cwd=tmp_path)
    assert r2.stdout.count("wrote ") == 1
    for name in ("exposure_summary.csv", "exposures.csv", "profile_quantiles.csv", "pta.csv"):
        a, b = pd.read_csv(tmp_path / "r1" / name), pd.read_csv(tmp_path / "r2" / name)
        num = a.select_dtypes("number").columns
        pd.testing.assert_frame_equal(a.drop(columns=num), b.drop(columns=num))
        np.testing.assert_allclose(b[num].to_numpy(float), a[num].to_numpy(float), rtol=1e-10, err_msg=name)
    assert len(list((tmp_path / "r2").glob("profiles-part-*.csv"))) == 4
    assert json.loads((tmp_path / "r2" / "manifest.json").read_text())["n_subjects"] == 200


def test_cli_out_rule(tmp_path, capsys):
    # a .csv name with part files asked for is refused; without them --out stays one CSV file
    base = ["simulate", "theophylline", "--model", "1cmt_oral", "--seed", "1", "--quiet"]
    assert main([*base, "--out", str(tmp_path / "s.csv"), "--chunk-size", "4"]) == 2
    assert "folder" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "s.csv")]) == 0 and (tmp_path / "s.csv").is_file()
    assert main([*base, "--out", str(tmp_path / "parts"), "--format", "csv"]) == 0
    assert (tmp_path / "parts" / "manifest.json").is_file()
