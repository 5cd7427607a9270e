"""Bounded memory (issue 15): the memory budget's parsing and the chunked evaluation.

Outside truth: the same fit in one chunk. Chunking changes only the order of a sum (objective, gradient) and
evaluates per-subject quantities on subsets, so OFV, estimates, standard errors and every prediction agree to
rounding (1e-10 relative; measured 3e-16 on the OFV, 1e-13 on the SEs)."""
from __future__ import annotations

import numpy as np
import pytest

import nlmefit
from nlmefit.errors import ModelSpecError
from nlmefit.memory import bytes_per_subject, default_budget, parse_memory, subject_slices, subjects_per_chunk
from nlmefit.models.examples import pheno_real


def test_parse_memory_reads_sizes_and_refuses_nonsense():
    assert parse_memory("2GB") == 2_000_000_000 and parse_memory("512 MiB") == 512 * 2 ** 20
    assert parse_memory(1e6) == 1_000_000 and parse_memory(None) is None
    for bad in ("2XB", "-1GB", "0", "lots", 0):
        with pytest.raises(ValueError, match="max_memory"):
            parse_memory(bad)
    with pytest.raises(ModelSpecError, match="max_memory"):
        nlmefit.fit(pheno_real(), nlmefit.datasets.load("pheno"), max_memory="plenty")


def test_chunks_follow_the_budget():
    model = pheno_real()
    data = model.prepare(nlmefit.Panel.from_dataframe(nlmefit.datasets.load("pheno")))
    per = bytes_per_subject(data)
    assert subjects_per_chunk(data, 10 * per) == 10 and subjects_per_chunk(data, 1) == 1
    assert subjects_per_chunk(data, 10 ** 15) == data.n_subjects
    assert 256 * 2 ** 20 <= default_budget() <= 2 * 2 ** 30
    sl = subject_slices(59, 10)
    assert len(sl) == 6 and sl[-1] == slice(50, 59) and subject_slices(5, None) == [slice(0, 5)]


def test_a_chunked_fit_is_the_fit_in_one_chunk():
    data = nlmefit.datasets.load("pheno")
    one = nlmefit.fit(pheno_real(), data)
    chunked = nlmefit.fit(pheno_real(), data, shard_size=7)  # 9 chunks: objective, modes, table, posterior
    assert chunked.ofv == pytest.approx(one.ofv, rel=1e-10)
    assert np.allclose(chunked.estimates, one.estimates, rtol=1e-8) and np.allclose(chunked.se, one.se, rtol=1e-8)
    a, b = chunked.predictions.select_dtypes("number"), one.predictions.select_dtypes("number")
    assert np.allclose(a.to_numpy(float), b.to_numpy(float), rtol=1e-10, atol=1e-12, equal_nan=True)
    assert np.allclose(chunked.posterior.loc, one.posterior.loc, rtol=1e-10, atol=1e-14)
    assert chunked.warnings == one.warnings


def test_large_tables_go_beside_the_json_and_come_back(tmp_path, monkeypatch):
    import json

    from nlmefit.results import fit_result

    res = nlmefit.fit(pheno_real(), nlmefit.datasets.load("pheno"), covariance=None)
    monkeypatch.setattr(fit_result, "EMBED_ROWS", 50)  # pheno: 155 predictions, 59 subjects: both go beside
    path = tmp_path / "result.json"
    res.to_json(path)
    d = json.loads(path.read_text())
    assert d["predictions"] == {"file": "result.predictions.npz", "columns": list(res.predictions.columns),
                                "rows": len(res.predictions)}
    back = nlmefit.FitResult.from_json(path, model=pheno_real())
    assert back.predictions.equals(res.predictions) and back.individual_estimates.equals(res.individual_estimates)
    d["predictions"]["file"] = "../elsewhere.npz"  # only a file beside the JSON is ever read
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="predictions.file"):
        nlmefit.FitResult.from_json(path, model=pheno_real())
    d["predictions"]["file"] = "result.predictions.npz"
    path.write_text(json.dumps(d))
    (tmp_path / "result.predictions.npz").write_bytes(b"not a zip file")  # damaged: a message, not a traceback
    with pytest.raises(ValueError, match="cannot be read"):
        nlmefit.FitResult.from_json(path, model=pheno_real())
    (tmp_path / "result.predictions.npz").unlink()
    with pytest.raises(ValueError, match="missing"):
        nlmefit.FitResult.from_json(path, model=pheno_real())


def test_saem_in_chunks_is_saem_in_one_chunk():
    # the M-step's derivatives are sums over subjects: chunking changes the order of the sums only
    data = nlmefit.datasets.load("pheno")
    opts = dict(method="saem", seed=4, n_explore=20, n_smooth=20, n_samples=200, covariance=None)
    one = nlmefit.fit(pheno_real(), data, **opts)
    tiny = nlmefit.fit(pheno_real(), data, max_memory=bytes_per_subject(
        pheno_real().prepare(nlmefit.Panel.from_dataframe(data))) * 4 * 12, **opts)  # 12 subjects, 4 chains
    assert tiny.ofv == pytest.approx(one.ofv, rel=1e-9)
    assert np.allclose(tiny.estimates, one.estimates, rtol=1e-8)
