"""NONMEM-style tables (sdtab, patab, cotab/catab, .ext): layout against real NONMEM files, values against the fit.

The reference files in tests/results/nonmem_table_layout/ were written by NONMEM (see the README there): the test
reads their layout (first line, header field positions, number formats) and requires the same of nlmefit's files,
then checks that what R's ``read.table(header=TRUE, skip=1)`` reads back (here pandas' equivalent) is the fit.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import nlmefit
from nlmefit.cli import main
from nlmefit.models.examples import EXAMPLES
from nlmefit.results.tables import write_tables

REF = Path(__file__).parent / "results" / "nonmem_table_layout"
TAB_VALUE = re.compile(r" [ -]\d\.\d{4}E[+-]\d{2}")   # 12 characters: "  1.0000E+00", " -6.7071E-01"
EXT_VALUE = re.compile(r" [ -]\d\.\d{5}E[+-]\d{2}")   # 13 characters: "  4.69555E-03"
EXT_ITER = re.compile(r" *-?\d+")
EXT_OBJ = re.compile(r" +-?\d+\.\d+")
PRINTED = 5e-5 * (1 + 1e-9)  # half a unit in the 4th decimal of the mantissa, relative to |x| >= 10**exponent


def read_table(path) -> pd.DataFrame:
    """R's read.table(path, header=TRUE, skip=1)."""
    return pd.read_csv(path, sep=r"\s+", skiprows=1)


def starts(header: str) -> list[int]:
    return [m.start() for m in re.finditer(r"\S+", header)]


def ref_table_layout(name: str) -> tuple[str, int, int]:
    """(first line, first name position, field width) of a real NONMEM table, checked to be regular."""
    lines = (REF / name).read_text().splitlines()
    pos = starts(lines[1])
    width = pos[1] - pos[0]
    assert pos == [pos[0] + width * k for k in range(len(pos))]
    for line in lines[2:]:
        assert len(line) == width * len(pos) and all(TAB_VALUE.fullmatch(line[k:k + width])
                                                     for k in range(0, len(line), width))
    return lines[0], pos[0], width


@pytest.fixture(scope="module")
def theo(tmp_path_factory):
    fit = nlmefit.fit(nlmefit.library.get("1cmt_oral", error="additive"), nlmefit.datasets.load("theophylline"))
    out = tmp_path_factory.mktemp("theo")
    return fit, out, fit.tables(out)


@pytest.fixture(scope="module")
def pheno(tmp_path_factory):
    fit = nlmefit.fit(EXAMPLES["pheno_real"](), nlmefit.datasets.load("pheno"))
    out = tmp_path_factory.mktemp("pheno")
    return fit, out, write_tables(fit, out)


def test_files_written(theo, pheno):
    _, out, paths = theo
    assert [p.name for p in paths] == ["sdtab1", "patab1", "cotab1", "run1.ext", "run1_names.csv"]
    _, out, paths = pheno
    assert [p.name for p in paths] == ["sdtab1", "patab1", "cotab1", "catab1", "run1.ext", "run1_names.csv"]
    assert not list(out.glob(".tmp-*"))


@pytest.mark.parametrize("case", ["theo", "pheno"])
def test_table_layout_is_nonmems(case, request):
    fit, out, _ = request.getfixturevalue(case)
    first, pos0, width = ref_table_layout("sdtab1_head")
    assert ref_table_layout("patab001_head")[1:] == (pos0, width)
    assert read_table(REF / "sdtab1_head").shape == (2, 12)  # the reference reads as R reads it
    for k, name in enumerate(["sdtab1", "patab1", "cotab1", "catab1"], 1):
        if not (out / name).exists():
            continue
        lines = (out / name).read_text().splitlines()
        assert lines[0] == first.replace(" 1", f"{k:2d}") and re.fullmatch(r"TABLE NO\.[ \d]{3}", lines[0])
        header = lines[1]
        cols = header.split()
        assert starts(header) == [pos0 + width * j for j in range(len(cols))] and header == header.rstrip()
        for line in lines[2:]:
            assert len(line) == width * len(cols)
            chunks = [line[j:j + width] for j in range(0, len(line), width)]
            assert all(TAB_VALUE.fullmatch(c) or c.strip() == "NaN" for c in chunks), line
        assert list(read_table(out / name).columns) == cols


def test_sdtab_is_the_predictions_in_data_order(theo):
    fit, out, _ = theo
    sd = read_table(out / "sdtab1")
    data = nlmefit.datasets.load("theophylline")
    assert list(sd.columns) == ["ID", "TIME", "DV", "MDV", "EVID", "AMT", "PRED", "IPRED", "RES", "IRES", "WRES",
                                "CWRES", "IWRES"]
    assert len(sd) == len(data) == 144
    np.testing.assert_allclose(sd[["ID", "TIME", "AMT", "EVID"]], data[["ID", "TIME", "AMT", "EVID"]], rtol=PRINTED)
    obs = sd[sd["MDV"] == 0].reset_index(drop=True)
    pred = fit.predictions
    assert len(obs) == len(pred) == fit.n_obs
    for c in ["ID", "TIME", "DV", "PRED", "IPRED", "RES", "IRES", "WRES", "CWRES", "IWRES"]:
        np.testing.assert_allclose(obs[c], pred[c], rtol=PRINTED, atol=0, err_msg=c)
    dose = sd[sd["MDV"] == 1]
    assert len(dose) == 12 and (dose["EVID"] == 1).all()
    assert (dose[["PRED", "IPRED", "RES", "IRES", "WRES", "CWRES", "IWRES"]] == 0).all().all()


def test_patab_individual_parameters_and_etas(theo, tmp_path):
    fit, out, _ = theo
    pa = read_table(out / "patab1")
    assert list(pa.columns) == ["ID", "TIME", "CL", "V", "KA", "ETA1", "ETA2", "ETA3"]
    assert len(pa) == 144  # repeated on every record, NONMEM's default
    ie = fit.individual_estimates.set_index("ID")
    want = ie.loc[pa["ID"], ["cl", "v", "ka", "ETA_cl", "ETA_v", "ETA_ka"]].to_numpy()
    np.testing.assert_allclose(pa[["CL", "V", "KA", "ETA1", "ETA2", "ETA3"]], want, rtol=PRINTED, atol=0)
    first = read_table(fit.tables(tmp_path, run="001", prefix="theo_", firstonly=True)[1])
    assert (tmp_path / "theo_patab001").exists() and (tmp_path / "theo_run001.ext").exists()
    assert len(first) == 12 and list(first["ID"]) == list(ie.index)
    names = pd.read_csv(out / "run1_names.csv")
    eta = names[names["kind"] == "ETA"]
    assert list(eta["nlmefit"]) == ["ETA_cl", "ETA_v", "ETA_ka"] and list(eta["nonmem"]) == ["ETA1", "ETA2", "ETA3"]


def test_covariates_split_continuous_and_categorical(pheno):
    fit, out, _ = pheno
    data = nlmefit.datasets.load("pheno")
    co, ca = read_table(out / "cotab1"), read_table(out / "catab1")
    assert list(co.columns) == ["ID", "WGT"]  # continuous
    assert list(ca.columns) == ["ID", "APGR", "FA1", "FA2"]  # integer-valued, at most 10 levels
    assert len(co) == len(ca) == len(data) == 744
    np.testing.assert_allclose(co["WGT"], data["WGT"], rtol=PRINTED)
    np.testing.assert_array_equal(ca[["APGR", "FA1", "FA2"]], data[["APGR", "FA1", "FA2"]])
    names = pd.read_csv(out / "run1_names.csv").set_index("nlmefit")
    assert names.loc["APGR", "table"] == "catab1" and names.loc["WGT", "table"] == "cotab1"


def ext_rows(path) -> tuple[list[str], dict[int, dict[str, float]]]:
    lines = Path(path).read_text().splitlines()
    cols = lines[1].split()
    tab = read_table(path)
    assert list(tab.columns) == cols
    return lines, {int(r["ITERATION"]): r.to_dict() for _, r in tab.iterrows()}


def check_ext_line(line: str, n_par: int) -> None:
    assert len(line) == 13 + 13 * n_par + 22
    assert EXT_ITER.fullmatch(line[:13])
    assert all(EXT_VALUE.fullmatch(line[13 + 13 * k:26 + 13 * k]) for k in range(n_par)), line
    obj = line[13 + 13 * n_par:]
    assert (EXT_OBJ.fullmatch(obj) and len(re.sub(r"\D", "", obj)) == 17) or \
        (obj.strip() == "NaN" and int(line[:13]) >= 0), obj


@pytest.mark.parametrize("case", ["theo", "pheno"])
def test_ext_layout_and_final_estimates(case, request):
    fit, out, _ = request.getfixturevalue(case)
    ref = (REF / "pheno_real.ext").read_text().splitlines()
    for line in ref[2:]:  # the reference passes the checks applied to nlmefit's file
        check_ext_line(line, len(ref[1].split()) - 2)
    lines, rows = ext_rows(out / "run1.ext")
    assert lines[0] == ref[0]  # FOCE-I, as NONMEM labels it
    header = lines[1]
    cols = header.split()
    assert starts(header) == starts(ref[1])[:1] + [1 + 13 * k for k in range(1, len(cols))]
    assert cols[0] == "ITERATION" and cols[-1] == "OBJ"
    kinds = [re.match(r"[A-Z]+", c).group() for c in cols[1:-1]]
    assert kinds == sorted(kinds, key=["THETA", "SIGMA", "OMEGA"].index)  # NONMEM's order
    for line in lines[2:]:
        check_ext_line(line, len(cols) - 2)
    names = pd.read_csv(out / "run1_names.csv", keep_default_na=False)
    ext = names[names["table"] == "run1.ext"].set_index("nonmem")
    assert list(ext.index) == cols[1:-1]
    est, se = fit.estimates, fit.se
    final, ses, fixed = rows[-1000000000], rows[-1000000001], rows[-1000000006]
    for col, r in ext.iterrows():
        n = r["nlmefit"]
        want = 0.0 if not n else est[n] ** 2 if col.startswith("SIGMA") else est[n]
        np.testing.assert_allclose(final[col], want, rtol=5e-6 * (1 + 1e-9), atol=0, err_msg=col)
        want_se = 1e10 if not n or n in fit.fixed else 2 * est[n] * se[n] if col.startswith("SIGMA") else se[n]
        np.testing.assert_allclose(ses[col], want_se, rtol=5e-6 * (1 + 1e-9), err_msg=col)
        assert fixed[col] == (0.0 if n and n not in fit.fixed else 1.0)
    assert set(est.index) == set(ext["nlmefit"]) - {""}
    np.testing.assert_allclose(final["OBJ"], fit.ofv, rtol=1e-15)
    assert max(rows) == fit.n_iter and 0 in rows  # the initial values, then the last iteration


def test_pheno_matches_the_ext_and_sdtab_nonmem_wrote(pheno):
    """Same header as NONMEM's pheno_real.ext, and the same numbers to about 3 significant digits."""
    fit, out, _ = pheno
    ref_lines, ref = ext_rows(REF / "pheno_real.ext")
    lines, ours = ext_rows(out / "run1.ext")
    assert lines[:2] == ref_lines[:2]
    cols = ref_lines[1].split()[1:-1]
    for it, rtol in ((-1000000000, 1e-3), (-1000000001, 1e-2), (-1000000004, 1e-3), (-1000000005, 1e-2),
                     (-1000000006, 0), (0, 1e-5)):
        np.testing.assert_allclose([ours[it][c] for c in cols], [ref[it][c] for c in cols], rtol=rtol, err_msg=it)
    assert abs(ours[-1000000000]["OBJ"] - ref[-1000000000]["OBJ"]) < 1e-3
    sd, ref_sd = read_table(out / "sdtab1"), read_table(REF / "sdtab1_head")
    for c in ["ID", "TIME", "DV", "AMT"]:  # a dose record, then an observation
        np.testing.assert_allclose(sd[c][:2], ref_sd[c], rtol=1e-12, err_msg=c)
    for c in ["PRED", "IPRED", "RES", "CWRES"]:  # at the observation (nlmefit writes 0 at dose records)
        np.testing.assert_allclose(sd[c][1], ref_sd[c][1], rtol=1e-3, atol=1e-3, err_msg=c)


def test_without_bound_data_only_the_observations(theo, tmp_path):
    fit, _, _ = theo
    paths = fit.replace(data=None).tables(tmp_path)
    assert [p.name for p in paths] == ["sdtab1", "patab1", "run1.ext", "run1_names.csv"]
    sd = read_table(tmp_path / "sdtab1")
    assert len(sd) == fit.n_obs and (sd["MDV"] == 0).all()


def test_cli_fit_tables(tmp_path, capsys):
    rc = main(["fit", "pheno", "--out", str(tmp_path), "--quiet", "--tables"])
    assert rc == 0
    printed = capsys.readouterr().out
    for name in ["sdtab1", "patab1", "cotab1", "catab1", "run1.ext", "run1_names.csv"]:
        assert (tmp_path / name).exists() and name in printed, name
    assert read_table(tmp_path / "sdtab1").shape == (744, 13)
    assert main(["fit", "pheno", "--out", str(tmp_path / "plain"), "--quiet"]) == 0
    assert not (tmp_path / "plain" / "sdtab1").exists()


def test_omega_covariance_is_a_correlation_in_the_sd_rows(theo, tmp_path):
    """An Ω covariance: OMEGA(2,1) in the estimates row, its correlation in −1000000004 and that correlation's
    delta-method SE in −1000000005 (from the covariance of ω²_cl, ω²_v, ω_cl,v)."""
    fit, _, _ = theo
    est = fit.estimates.copy()
    est["omega_cl_v"] = 0.02
    names = list(fit.covariance.index) + ["omega_cl_v"]
    rng = np.random.default_rng(0)
    a = rng.normal(size=(len(names), len(names))) * 1e-3
    cov = pd.DataFrame(a @ a.T + np.diag(np.full(len(names), 1e-5)), index=names, columns=names)
    _, rows = ext_rows(fit.replace(estimates=est, covariance=cov, covariance_ok=True).tables(tmp_path)[-2])
    c, v, cv = est["omega_cl"], est["omega_v"], 0.02
    r = cv / np.sqrt(c * v)
    g = np.array([-r / (2 * c), -r / (2 * v), 1 / np.sqrt(c * v)])
    sub = cov.loc[["omega_cl", "omega_v", "omega_cl_v"], ["omega_cl", "omega_v", "omega_cl_v"]].to_numpy()
    assert rows[-1000000000]["OMEGA(2,1)"] == pytest.approx(cv, rel=1e-5)
    assert rows[-1000000004]["OMEGA(2,1)"] == pytest.approx(r, rel=1e-5)
    assert rows[-1000000005]["OMEGA(2,1)"] == pytest.approx(np.sqrt(g @ sub @ g), rel=1e-5)
    assert rows[-1000000001]["OMEGA(2,1)"] == pytest.approx(np.sqrt(cov.loc["omega_cl_v", "omega_cl_v"]), rel=1e-5)
    assert rows[-1000000006]["OMEGA(2,1)"] == 0 and rows[-1000000006]["OMEGA(3,1)"] == 1
    assert rows[-1000000005]["OMEGA(1,1)"] == pytest.approx(np.sqrt(cov.loc["omega_cl", "omega_cl"]) / (2 * np.sqrt(c)),
                                                            rel=1e-5)
