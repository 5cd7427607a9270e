"""Panel construction on the reference data sets and on small hand-written event tables."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from nlmefit.errors import DataError
from nlmefit.panel import Panel
from nlmefit.panel.expand import ADDL_SEQ_OFFSET, locf
from nlmefit.pk.events import Events

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if not DATA.exists():  # the repo may live elsewhere; the shared data path is fixed
    DATA = Path("/work/shared/data")
needs_data = pytest.mark.skipif(not DATA.exists(), reason="reference data not available")


def read(rel: str) -> pd.DataFrame:
    return pd.read_csv(DATA / rel)


def frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------- reference data
@needs_data
def test_pheno_counts_and_roundtrip():
    df = read("pheno/pheno_pharmpy.csv")
    copy = df.copy(deep=True)
    p = Panel.from_dataframe(df)
    pd.testing.assert_frame_equal(df, copy)
    assert (p.n_subjects, p.n_obs, p.n_doses, p.n_dose_records) == (59, 155, 589, 589)
    assert p.covariate_names == ("WGT", "APGR", "FA1", "FA2")
    assert p.dv.dtype == np.float64 and p.obs_mask.dtype == bool and p.obs_row.dtype == np.int64
    assert p.cens.dtype == np.int8
    assert p.dose_rate.max() == 0 and not p.has_cmt
    # obs rows point back into the user's frame
    m = p.obs_mask
    np.testing.assert_array_equal(df["DV"].to_numpy()[p.obs_row[m]], p.dv[m])
    np.testing.assert_array_equal(df["TIME"].to_numpy()[p.dose_row[p.dose_mask]], p.dose_time[p.dose_mask])
    assert (p.obs_row[~m] == -1).all() and (p.dose_row[~p.dose_mask] == -1).all()
    # baseline covariates = first record of each subject
    first = df.groupby("ID", sort=False).first()
    np.testing.assert_allclose(p.covariates[:, 0], first["WGT"].to_numpy())
    out = p.to_dataframe()
    pd.testing.assert_frame_equal(out[list(df.columns[:6])].drop(columns=["WGT", "APGR"]),
                                  df[["ID", "TIME", "AMT", "DV"]])
    assert (out["EVID"].to_numpy() == np.where(df["AMT"] > 0, 1, 0)).all()


@needs_data
def test_theo_nonmem_and_rxode2_evid101_agree():
    a = Panel.from_dataframe(read("theoph/theo_sd_nonmem.csv"))
    b = Panel.from_dataframe(read("nlmixr2data/theo_sd.csv"))
    for p in (a, b):
        assert (p.n_subjects, p.n_obs, p.n_doses) == (12, 132, 12)
        assert p.has_cmt and (p.dose_cmt[p.dose_mask] == 1).all()
        assert (p.obs_cmt[p.obs_mask] == 2).all()
    np.testing.assert_allclose(a.dv, b.dv)
    np.testing.assert_allclose(a.obs_time, b.obs_time)
    np.testing.assert_allclose(a.dose_amt, b.dose_amt, rtol=1e-9)
    # the time-0 observation comes after the time-0 dose: the dose counts
    ev = b.to_events(np.ones_like(b.dose_cmt))
    assert ev.contributes()[:, 0, 0].all()
    # round trip keeps EVID 101 as given
    out = b.to_dataframe()
    raw = read("nlmixr2data/theo_sd.csv")
    pd.testing.assert_frame_equal(out[["ID", "TIME", "DV", "AMT", "EVID", "CMT"]],
                                  raw[["ID", "TIME", "DV", "AMT", "EVID", "CMT"]])


@needs_data
def test_theoph_r_column_map_case_insensitive():
    df = read("theoph/Theoph_R_datasets.csv")  # Subject, Wt, Dose, Time, conc
    p = Panel.from_dataframe(df, id="Subject", dv="conc")  # Time matched case-insensitively
    assert p.columns == {"ID": "Subject", "TIME": "Time", "DV": "conc"}
    assert (p.n_subjects, p.n_obs, p.n_doses) == (12, 132, 0)
    assert p.covariate_names == ("Wt", "Dose")
    out = p.to_dataframe()
    pd.testing.assert_frame_equal(out[["ID", "TIME", "DV"]],
                                  df[["Subject", "Time", "conc"]].set_axis(["ID", "TIME", "DV"], axis=1))


@needs_data
def test_oral_1cpt_steady_state():
    df = read("nlmixr2data/Oral_1CPT.csv")
    with pytest.raises(DataError, match="column SS"):
        Panel.from_dataframe(df)  # SS=99 marks non-SS rows
    df = df.assign(SS=df["SS"].replace(99, 0))
    p = Panel.from_dataframe(df)
    assert p.n_subjects == 120 and p.n_doses == 960
    ssd = p.dose_ss == 1
    assert ssd.sum() == 120 and (p.dose_ii[ssd] == 24).all() and (p.dose_time[ssd] == 216).all()
    # the SS=1 dose opens epoch 1; earlier doses stay in epoch 0; observations after it are in epoch 1
    assert (p.dose_epoch[ssd] == 1).all() and (p.dose_epoch[p.dose_mask & ~ssd] == 0).all()
    m = p.obs_mask
    np.testing.assert_array_equal(p.obs_epoch[m], (p.obs_time[m] >= 216).astype(np.int64))


@needs_data
def test_warfarin_dvid_and_string_covariate():
    df = read("nlmixr2data/warfarin.csv")
    copy = df.copy(deep=True)
    p = Panel.from_dataframe(df)
    pd.testing.assert_frame_equal(df, copy)
    assert p.dvid_levels == {"cp": 0, "pca": 1}
    assert p.covariate_levels == {"sex": {"female": 0, "male": 1}}
    assert p.n_subjects == 32 and p.n_obs == 251 + 232 and p.n_doses == 32
    m = p.obs_mask
    assert (p.obs_dvid[m] == 0).sum() == 251
    k = p.covariate_names.index("sex")
    sex = df.groupby("id", sort=False)["sex"].first().map({"female": 0, "male": 1}).to_numpy()
    np.testing.assert_array_equal(p.covariates[:, k], sex)
    out = p.to_dataframe()
    assert list(out.columns[:6]) == ["ID", "TIME", "DV", "AMT", "EVID", "DVID"]
    pd.testing.assert_frame_equal(out[["ID", "TIME", "DV", "AMT", "EVID", "DVID"]],
                                  df[["id", "time", "dv", "amt", "evid", "dvid"]].set_axis(
                                      ["ID", "TIME", "DV", "AMT", "EVID", "DVID"], axis=1))


# ---------------------------------------------------------------------------------------------- event rules
def addl_frame() -> pd.DataFrame:
    return frame([
        dict(ID=1, TIME=0.0, DV=0, AMT=100, EVID=1, ADDL=2, II=12),
        dict(ID=1, TIME=1.0, DV=5.0, AMT=0, EVID=0, ADDL=0, II=0),
        dict(ID=1, TIME=12.0, DV=2.0, AMT=0, EVID=0, ADDL=0, II=0),
        dict(ID=1, TIME=24.0, DV=3.0, AMT=0, EVID=0, ADDL=0, II=0),
        dict(ID=1, TIME=24.0, DV=0, AMT=50, EVID=1, ADDL=0, II=0),
        dict(ID=1, TIME=25.0, DV=4.0, AMT=0, EVID=0, ADDL=0, II=0),
    ])


def test_addl_expansion_times_and_order():
    df = addl_frame()
    p = Panel.from_dataframe(df)
    assert p.n_dose_records == 2 and p.n_doses == 4
    np.testing.assert_allclose(p.dose_time[0], [0, 12, 24, 24])
    np.testing.assert_allclose(p.dose_amt[0], [100, 100, 50, 100])
    np.testing.assert_array_equal(p.dose_row[0], [0, 0, 4, 0])
    np.testing.assert_array_equal(p.dose_is_record[0], [True, False, True, False])
    np.testing.assert_array_equal(p.obs_seq[0], [1, 2, 3, 5])
    assert p.dose_seq[0, 0] == 0 and p.dose_seq[0, 2] == 4
    assert (p.dose_seq[0, [1, 3]] >= ADDL_SEQ_OFFSET).all()
    ev = p.to_events(np.zeros_like(p.dose_cmt))
    c = ev.contributes()[0].numpy()
    # obs at 12: only the t=0 dose (the implied dose at 12 comes after the record at 12)
    np.testing.assert_array_equal(c[1], [True, False, False, False])
    # obs at 24 (row 3) precedes the dose record at 24 (row 4) and the implied one
    np.testing.assert_array_equal(c[2], [True, True, False, False])
    np.testing.assert_array_equal(c[3], [True, True, True, True])
    # to_dataframe has the records only, in the user's order
    pd.testing.assert_frame_equal(p.to_dataframe()[list(df.columns)], df)


def test_sort_option_and_seq():
    df = addl_frame().iloc[[3, 0, 5, 1, 2, 4]]
    with pytest.raises(DataError, match="TIME"):
        Panel.from_dataframe(df)
    copy = df.copy()
    p = Panel.from_dataframe(df, sort=True)
    pd.testing.assert_frame_equal(df, copy)
    q = Panel.from_dataframe(addl_frame())
    np.testing.assert_array_equal(p.obs_time, q.obs_time)
    np.testing.assert_array_equal(p.obs_seq, q.obs_seq)  # positions after sorting
    np.testing.assert_array_equal(p.obs_row[0], [3, 4, 0, 2])  # positional rows of the user's frame
    pd.testing.assert_frame_equal(p.to_dataframe(), df.assign(MDV=(df.EVID != 0).astype(np.int64))
                                  [["ID", "TIME", "DV", "AMT", "EVID", "II", "ADDL", "MDV"]])


def test_sort_orders_subjects_by_id_stably():
    df = frame([dict(ID=2, TIME=0, DV=1.0), dict(ID=1, TIME=1, DV=2.0), dict(ID=1, TIME=0, DV=3.0),
                dict(ID=2, TIME=0, DV=4.0)])
    p = Panel.from_dataframe(df, sort=True)
    assert list(p.ids) == [1, 2]
    np.testing.assert_array_equal(p.dv, [[3.0, 2.0], [1.0, 4.0]])
    with pytest.raises(DataError, match="contiguous"):
        Panel.from_dataframe(df)


def test_epochs_reset_records():
    df = frame([
        dict(ID=1, TIME=0, DV=0, AMT=10, EVID=1, SS=0, II=0),
        dict(ID=1, TIME=1, DV=1.0, AMT=0, EVID=0, SS=0, II=0),
        dict(ID=1, TIME=2, DV=0, AMT=0, EVID=3, SS=0, II=0),
        dict(ID=1, TIME=2, DV=2.0, AMT=0, EVID=0, SS=0, II=0),
        dict(ID=1, TIME=3, DV=0, AMT=10, EVID=4, SS=0, II=0),
        dict(ID=1, TIME=4, DV=3.0, AMT=0, EVID=0, SS=0, II=0),
        dict(ID=1, TIME=5, DV=0, AMT=10, EVID=1, SS=1, II=12),
        dict(ID=1, TIME=6, DV=4.0, AMT=0, EVID=0, SS=0, II=0),
        dict(ID=1, TIME=7, DV=0, AMT=10, EVID=1, SS=2, II=12),
        dict(ID=1, TIME=8, DV=5.0, AMT=0, EVID=0, SS=0, II=0),
    ])
    p = Panel.from_dataframe(df)
    np.testing.assert_array_equal(p.obs_epoch[0], [0, 1, 2, 3, 3])
    np.testing.assert_array_equal(p.dose_epoch[0], [0, 2, 3, 3])
    np.testing.assert_array_equal(p.dose_ss[0], [0, 0, 1, 2])
    np.testing.assert_allclose(p.dose_ii[0], [0, 0, 12, 12])
    c = p.to_events(np.zeros_like(p.dose_cmt)).contributes()[0].numpy()
    assert c[1].sum() == 0  # after the EVID 3 reset nothing counts
    np.testing.assert_array_equal(c[4], [False, False, True, True])


def test_addl_cancelled_by_later_reset():
    df = frame([
        dict(ID=1, TIME=0, DV=0, AMT=10, EVID=1, ADDL=5, II=10),
        dict(ID=1, TIME=1, DV=1.0, AMT=0, EVID=0, ADDL=0, II=0),
        dict(ID=1, TIME=25, DV=0, AMT=0, EVID=3, ADDL=0, II=0),
        dict(ID=1, TIME=60, DV=2.0, AMT=0, EVID=0, ADDL=0, II=0),
    ])
    p = Panel.from_dataframe(df)
    np.testing.assert_allclose(p.dose_time[0], [0, 10, 20])


def test_without_evid_column_mdv_and_amt():
    df = frame([dict(ID=1, TIME=0, DV=0, AMT=5, MDV=1), dict(ID=1, TIME=1, DV=2.0, AMT=0, MDV=0),
                dict(ID=1, TIME=2, DV=np.nan, AMT=0, MDV=1), dict(ID=1, TIME=3, DV=1.0, AMT=0, MDV=0)])
    p = Panel.from_dataframe(df)
    assert p.n_obs == 2 and p.n_doses == 1
    np.testing.assert_array_equal(p.obs_seq[0], [1, 3])
    assert list(p.to_dataframe()["EVID"]) == [1, 0, 2, 0]
    # EVID 0 with MDV 1 is not an observation
    q = Panel.from_dataframe(df.assign(EVID=[1, 0, 0, 0]))
    assert q.n_obs == 2
    # no AMT and no EVID: all observations
    r = Panel.from_dataframe(frame([dict(ID=1, TIME=0, DV=1.0), dict(ID=1, TIME=1, DV=2.0)]))
    assert r.n_obs == 2 and r.max_doses == 0 and r.dose_time.shape == (1, 0)


def test_infusions_rate_dur_and_modelled():
    df = frame([
        dict(ID=1, TIME=0, DV=0, AMT=100, EVID=1, RATE=50),
        dict(ID=1, TIME=1, DV=1.0, AMT=0, EVID=0, RATE=0),
        dict(ID=2, TIME=0, DV=0, AMT=100, EVID=1, RATE=-2),
        dict(ID=2, TIME=1, DV=1.0, AMT=0, EVID=0, RATE=0),
        dict(ID=3, TIME=0, DV=0, AMT=100, EVID=1, RATE=-1),
        dict(ID=3, TIME=1, DV=1.0, AMT=0, EVID=0, RATE=0),
        dict(ID=4, TIME=0, DV=0, AMT=100, EVID=1, RATE=0),
        dict(ID=4, TIME=1, DV=1.0, AMT=0, EVID=0, RATE=0),
    ])
    p = Panel.from_dataframe(df)
    np.testing.assert_allclose(p.dose_rate[:, 0], [50, -2, -1, 0])
    np.testing.assert_allclose(p.dose_dur[:, 0], [2, 0, 0, 0])
    d = Panel.from_dataframe(frame([dict(ID=1, TIME=0, DV=0, AMT=100, EVID=1, DUR=4),
                                    dict(ID=1, TIME=1, DV=1.0, AMT=0, EVID=0, DUR=0)]))
    assert d.dose_rate[0, 0] == 25 and d.dose_dur[0, 0] == 4
    ev = p.to_events(np.zeros_like(p.dose_cmt), dtype=torch.float32)
    assert isinstance(ev, Events) and ev.dose_rate.dtype == torch.float32 and ev.dose_ss.dtype == torch.int64
    torch.testing.assert_close(ev.dose_dur, torch.tensor([[2.0], [0.0], [0.0], [0.0]]))


@needs_data
def test_infusion_reference_data():
    df = read("nlmixr2data/Infusion_1CPT.csv")
    df = df.assign(SS=df["SS"].replace(99, 0))
    p = Panel.from_dataframe(df)
    m = p.dose_mask
    np.testing.assert_allclose(p.dose_dur[m], 1.0)  # 1 h infusions (RATE = AMT per h)


def test_time_varying_covariates_locf():
    df = frame([
        dict(ID=1, TIME=0, DV=0, AMT=10, EVID=1, WT=np.nan, SEX="F"),
        dict(ID=1, TIME=1, DV=1.0, AMT=0, EVID=0, WT=70.0, SEX="F"),
        dict(ID=1, TIME=2, DV=0, AMT=0, EVID=2, WT=80.0, SEX=None),
        dict(ID=1, TIME=3, DV=2.0, AMT=0, EVID=0, WT=np.nan, SEX="F"),
        dict(ID=2, TIME=0, DV=3.0, AMT=0, EVID=0, WT=50.0, SEX="M"),
        dict(ID=2, TIME=1, DV=3.0, AMT=0, EVID=0, WT=np.nan, SEX="M"),
    ])
    p = Panel.from_dataframe(df)
    assert p.covariate_names == ("WT", "SEX")
    assert p.covariate_levels == {"SEX": {"F": 0, "M": 1}}
    np.testing.assert_allclose(p.covariates, [[70, 0], [50, 1]])  # first value carried backward
    np.testing.assert_allclose(p.obs_covariates[0, :, 0], [70, 80])
    np.testing.assert_allclose(p.obs_covariates[1, :, 0], [50, 50])
    np.testing.assert_allclose(p.dose_covariates[0, 0], [70, 0])
    # explicit selection
    q = Panel.from_dataframe(df, covariates=["WT"])
    assert q.covariate_names == ("WT",) and q.obs_covariates.shape == (2, 2, 1)
    none = Panel.from_dataframe(df, covariates=[])
    assert none.covariates.shape == (2, 0)


def test_addl_doses_take_covariates_at_their_time():
    df = frame([dict(ID=1, TIME=0, DV=0, AMT=10, EVID=1, ADDL=2, II=10, WT=70.0, OCC=1),
                dict(ID=1, TIME=15, DV=1.0, AMT=0, EVID=0, ADDL=0, II=0, WT=90.0, OCC=2),
                dict(ID=1, TIME=30, DV=1.0, AMT=0, EVID=0, ADDL=0, II=0, WT=90.0, OCC=2)])
    p = Panel.from_dataframe(df)
    np.testing.assert_allclose(p.dose_covariates[0, :, 0], [70, 70, 90])
    np.testing.assert_array_equal(p.dose_occ[0], [0, 0, 1])


def test_locf_helper():
    v = np.array([np.nan, 1, np.nan, 2, np.nan, np.nan, 5])
    s = np.array([0, 0, 0, 0, 1, 1, 1])
    np.testing.assert_allclose(locf(v, s), [1, 1, 1, 2, 5, 5, 5])


def test_censoring_cens_and_lloq():
    base = [dict(ID=1, TIME=0, DV=0, AMT=10, EVID=1), dict(ID=1, TIME=1, DV=8.0, AMT=0, EVID=0),
            dict(ID=1, TIME=2, DV=0.5, AMT=0, EVID=0), dict(ID=1, TIME=3, DV=20.0, AMT=0, EVID=0)]
    df = frame(base).assign(CENS=[0, 0, 1, -1], LIMIT=[np.nan, np.nan, 0.0, np.inf * 0])
    p = Panel.from_dataframe(df)
    np.testing.assert_array_equal(p.cens[0], [0, 1, -1])
    np.testing.assert_allclose(p.limit[0], [np.nan, 0.5, 20.0])
    np.testing.assert_allclose(p.limit_other[0], [np.nan, 0.0, np.nan])
    assert p.n_censored == 2
    q = Panel.from_dataframe(frame(base).assign(LLOQ=1.0))
    np.testing.assert_array_equal(q.cens[0], [0, 1, 0])
    np.testing.assert_allclose(q.limit[0], [np.nan, 1.0, np.nan])
    assert q.observations_frame()["CENS"].tolist() == [0, 1, 0]


def test_occasions_mapped_over_dataset():
    df = frame([dict(ID=1, TIME=0, DV=1.0, OCC=3), dict(ID=1, TIME=1, DV=1.0, OCC=np.nan),
                dict(ID=1, TIME=2, DV=1.0, OCC=7), dict(ID=2, TIME=0, DV=1.0, OCC=5)])
    p = Panel.from_dataframe(df)
    assert p.n_occasions == 3
    np.testing.assert_array_equal(p.obs_occ, [[0, 0, 2], [1, 0, 0]])


def test_no_observation_subjects_are_excluded_with_warning():
    df = frame([dict(ID=1, TIME=0, DV=0, AMT=10, EVID=1), dict(ID=1, TIME=1, DV=2.0, AMT=0, EVID=0),
                dict(ID=7, TIME=0, DV=0, AMT=10, EVID=1), dict(ID=7, TIME=3, DV=0, AMT=0, EVID=2)])
    with pytest.warns(UserWarning, match="ID 7"):
        p = Panel.from_dataframe(df)
    assert p.excluded_ids == (7,) and list(p.ids) == [1] and p.n_doses == 1
    assert "excluded" in repr(p)
    assert len(p.to_dataframe()) == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = Panel.from_dataframe(df, require_dv=False)
    assert t.n_subjects == 2 and t.excluded_ids == ()


def test_simulation_template_without_dv():
    df = frame([dict(ID=1, TIME=0, AMT=10, EVID=1), dict(ID=1, TIME=1, AMT=0, EVID=0),
                dict(ID=1, TIME=2, AMT=0, EVID=0)])
    with pytest.raises(DataError, match="column DV"):
        Panel.from_dataframe(df)
    p = Panel.from_dataframe(df, require_dv=False)
    assert p.n_obs == 2 and np.isnan(p.dv[0]).all()
    q = Panel.from_dataframe(df.assign(DV=[0, np.nan, 3.0]), require_dv=False)
    assert np.isnan(q.dv[0, 0]) and q.dv[0, 1] == 3.0


def test_subset_tensor_summary_and_frames():
    df = frame([dict(ID="a", TIME=0, DV=0, AMT=10, EVID=1, ADDL=1, II=5, WT=60.0),
                dict(ID="a", TIME=1, DV=2.0, AMT=0, EVID=0, ADDL=0, II=0, WT=60.0),
                dict(ID="b", TIME=0, DV=1.0, AMT=0, EVID=0, ADDL=0, II=0, WT=70.0),
                dict(ID="b", TIME=1, DV=2.0, AMT=0, EVID=0, ADDL=0, II=0, WT=70.0),
                dict(ID="b", TIME=2, DV=3.0, AMT=0, EVID=0, ADDL=0, II=0, WT=70.0)])
    p = Panel.from_dataframe(df)
    assert list(p.ids) == ["a", "b"] and (p.max_obs, p.max_doses) == (3, 2)
    s = p.summary()
    assert s == {"subjects": 2, "observations": 4, "dose_records": 1, "doses": 2, "covariates": ["WT"],
                 "censored": 0, "occasions": 0, "excluded_ids": []}
    r = repr(p)
    for word in ("subjects=2", "observations=4", "1 records/2 after ADDL", "WT", "censored=0"):
        assert word in r
    sub = p.subset([1])
    assert list(sub.ids) == ["b"] and sub.max_doses == 0 and sub.max_obs == 3
    assert sub.to_dataframe()["ID"].tolist() == ["b"] * 3
    sub0 = p.subset(np.array([True, False]))
    assert sub0.max_obs == 1 and sub0.n_doses == 2
    t = p.tensor("dv", dtype=torch.float32)
    assert t.dtype == torch.float32 and t.shape == (2, 3)
    assert p.tensor("obs_mask").dtype == torch.bool and p.tensor("dose_seq").dtype == torch.int64
    with pytest.raises(ValueError):
        p.tensor("nope")
    of = p.observations_frame()
    assert of.columns.tolist()[:5] == ["ROW", "ID", "TIME", "DV", "CENS"]
    assert of["ROW"].tolist() == [1, 2, 3, 4] and of["ID"].tolist() == ["a", "b", "b", "b"]
    with pytest.raises(DataError, match="dose_route"):
        p.to_events(np.zeros((2, 1), dtype=int))


def test_column_map_errors():
    df = frame([dict(Subject=1, Time=0, conc=1.0)])
    with pytest.raises(DataError, match="column DV"):
        Panel.from_dataframe(df, id="Subject")
    with pytest.raises(DataError, match="no column"):
        Panel.from_dataframe(df, id="Subj", dv="conc")
    with pytest.raises(DataError, match="unknown canonical"):
        Panel.from_dataframe(df, idx="Subject", dv="conc")
    p = Panel.from_dataframe(df, id="Subject", dv="conc")
    assert p.n_obs == 1
    both = frame([dict(ID=1, TIME=0, DV=1.0, dv=2.0)])
    with pytest.raises(DataError, match="several columns"):
        Panel.from_dataframe(both)


def test_index_is_preserved_and_rows_are_positional():
    df = addl_frame()
    df.index = [10, 20, 30, 40, 50, 60]
    p = Panel.from_dataframe(df)
    np.testing.assert_array_equal(p.obs_row[0], [1, 2, 3, 5])
    assert p.to_dataframe().index.tolist() == [10, 20, 30, 40, 50, 60]
