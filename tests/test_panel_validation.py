"""Every validation rule raises DataError naming the column, the subject ID, TIME and the row."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from nlmefit.errors import DataError
from nlmefit.panel import Panel


def good() -> list[dict]:
    return [dict(ID=1, TIME=0.0, DV=0.0, AMT=100.0, EVID=1),
            dict(ID=1, TIME=1.0, DV=5.0, AMT=0.0, EVID=0),
            dict(ID=9, TIME=0.0, DV=0.0, AMT=100.0, EVID=1),
            dict(ID=9, TIME=2.5, DV=4.0, AMT=0.0, EVID=0),
            dict(ID=9, TIME=4.0, DV=3.0, AMT=0.0, EVID=0)]


def edit(row: int = 3, **values) -> pd.DataFrame:
    rows = good()
    rows[row].update(values)
    return pd.DataFrame(rows)


def with_col(name: str, values: list, **edits) -> pd.DataFrame:
    df = edit(**edits) if edits else pd.DataFrame(good())
    df[name] = pd.Series(values, dtype=object) if any(isinstance(v, str) for v in values) else values
    return df


def test_good_frame_builds():
    p = Panel.from_dataframe(pd.DataFrame(good()))
    assert p.n_obs == 3 and p.n_doses == 2


# (case id, frame, column named in the message, TIME text in the message)
CASES = [
    ("time-text", edit(TIME="2.5h"), "TIME", "2.5h"),
    ("time-nan", edit(TIME=np.nan), "TIME", "nan"),
    ("time-negative", edit(TIME=-2.5), "TIME", "-2.5"),
    ("time-decreasing", edit(row=4, TIME=2.0), "TIME", "2.0"),
    ("time-inf", edit(TIME=np.inf), "TIME", "inf"),
    ("dv-text", edit(DV="abc"), "DV", "2.5"),
    ("dv-nan", edit(DV=np.nan), "DV", "2.5"),
    ("dv-inf", edit(DV=-np.inf), "DV", "2.5"),
    ("amt-negative", edit(AMT=-1.0), "AMT", "2.5"),
    ("amt-zero-dose", edit(row=2, AMT=0.0), "AMT", "0.0"),
    ("amt-nan-dose", edit(row=2, AMT=np.nan), "AMT", "0.0"),
    ("amt-text", edit(row=2, AMT="ten"), "AMT", "0.0"),
    ("evid-unknown", edit(EVID=5), "EVID", "2.5"),
    ("evid-fraction", edit(EVID=0.5), "EVID", "2.5"),
    ("evid-nan", edit(EVID=np.nan), "EVID", "2.5"),
    ("mdv-bad", with_col("MDV", [1, 0, 1, 2, 0]), "MDV", "2.5"),
    ("ss-without-ii", with_col("SS", [0, 0, 1, 0, 0]).assign(II=0.0), "II", "0.0"),
    ("ss-99", with_col("SS", [0, 0, 99, 0, 0]).assign(II=24.0), "SS", "0.0"),
    ("addl-without-ii", with_col("ADDL", [0, 0, 3, 0, 0]), "II", "0.0"),
    ("addl-fraction", with_col("ADDL", [0, 0, 1.5, 0, 0]).assign(II=12.0), "ADDL", "0.0"),
    ("addl-negative", with_col("ADDL", [0, 0, -1, 0, 0]).assign(II=12.0), "ADDL", "0.0"),
    ("ii-negative", with_col("II", [0, 0, -12.0, 0, 0]), "II", "0.0"),
    ("rate-without-amt", with_col("RATE", [0, 0, 0, 10.0, 0]), "RATE", "2.5"),
    ("rate-bad-code", with_col("RATE", [0, 0, -3, 0, 0]), "RATE", "0.0"),
    ("dur-negative", with_col("DUR", [0, 0, -1, 0, 0]), "DUR", "0.0"),
    ("dur-vs-rate", with_col("DUR", [0, 0, 3, 0, 0]).assign(RATE=[0, 0, 50, 0, 0]), "DUR", "0.0"),
    ("ss-infusion-too-long", with_col("SS", [0, 0, 1, 0, 0]).assign(II=[0, 0, 1.0, 0, 0], RATE=[0, 0, 10, 0, 0]),
     "RATE", "0.0"),
    ("cens-bad", with_col("CENS", [0, 0, 0, 2, 0]), "CENS", "2.5"),
    ("covariate-inf", with_col("WT", [70, 70, 80, np.inf, 80]), "WT", "2.5"),
    ("covariate-mixed", with_col("SEX", ["F", "F", 1, "M", "M"]), "SEX", "0.0"),
    ("covariate-all-missing", with_col("WT", [70, 70, np.nan, np.nan, np.nan]), "WT", "0.0"),
    ("duplicate", pd.DataFrame(good() + [good()[3]]).sort_values(["ID", "TIME"], kind="stable"), "DV", "2.5"),
    ("cmt-negative", with_col("CMT", [1, 2, 1, -2, 2]), "CMT", "2.5"),
    ("occ-all-missing", with_col("OCC", [1, 1, np.nan, np.nan, np.nan]), "OCC", "0.0"),
    ("dvid-missing-on-obs", with_col("DVID", ["cp", "cp", "cp", None, "cp"]), "DVID", "2.5"),
    ("non-contiguous-id", pd.DataFrame(good()).iloc[[0, 2, 1, 3, 4]], "ID", "1.0"),
]


@pytest.mark.parametrize("df,column,time", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_validation_case(df, column, time):
    copy = df.copy(deep=True)
    with pytest.raises(DataError) as info:
        Panel.from_dataframe(df)
    msg = str(info.value)
    assert f"column {column}" in msg or (column == "DV" and "column ID/TIME/EVID/AMT/DV" in msg), msg
    assert f"TIME {time}" in msg, msg
    ids = {1, 9}
    assert any(f"ID {i}" in msg for i in ids), msg
    assert "row " in msg and "expected" in msg, msg
    pd.testing.assert_frame_equal(df, copy)


def test_row_index_named():
    with pytest.raises(DataError, match=r"ID 9 TIME -2.5 \(row 3\)"):
        Panel.from_dataframe(edit(TIME=-2.5))


def test_empty_frame():
    with pytest.raises(DataError, match="empty"):
        Panel.from_dataframe(pd.DataFrame(columns=["ID", "TIME", "DV"]))
    with pytest.raises(DataError, match="empty"):
        Panel.from_dataframe(pd.DataFrame())
    with pytest.raises(DataError, match="DataFrame"):
        Panel.from_dataframe([1, 2, 3])


@pytest.mark.parametrize("column", ["ID", "TIME", "DV"])
def test_missing_required_column(column):
    with pytest.raises(DataError, match=f"column {column}: required column is missing"):
        Panel.from_dataframe(pd.DataFrame(good()).drop(columns=column))


def test_missing_amt_with_dose_records():
    df = pd.DataFrame(good()).drop(columns="AMT")
    with pytest.raises(DataError, match=r"column AMT, ID 1 TIME 0.0 \(row 0\)"):
        Panel.from_dataframe(df)


def test_missing_id():
    with pytest.raises(DataError, match="column ID, ID nan TIME 2.5"):
        Panel.from_dataframe(edit(ID=np.nan))


def test_non_numeric_dv_allowed_off_observation_rows():
    df = pd.DataFrame(good())
    df["DV"] = pd.Series([".", 5.0, ".", 4.0, 3.0], dtype=object)
    assert Panel.from_dataframe(df).n_obs == 3


def test_no_observation_subject_warns_not_raises():
    df = edit(row=3, EVID=2).pipe(lambda d: d[d.ID == 9].assign(EVID=[1, 2, 2]))
    with pytest.warns(UserWarning, match="ID 9"):
        p = Panel.from_dataframe(pd.concat([pd.DataFrame(good()[:2]), df]))
    assert p.excluded_ids == (9,)


def test_sort_true_fixes_decreasing_time():
    df = edit(row=4, TIME=2.0)
    p = Panel.from_dataframe(df, sort=True)
    np.testing.assert_allclose(p.obs_time[1], [2.0, 2.5])


def test_explicit_covariate_errors():
    df = pd.DataFrame(good())
    with pytest.raises(DataError, match="column WT"):
        Panel.from_dataframe(df, covariates=["WT"])
    with pytest.raises(DataError, match="column DV"):
        Panel.from_dataframe(df, covariates=["DV"])
    df["WHEN"] = pd.Timestamp("2020-01-01")
    with pytest.raises(DataError, match="column WHEN"):
        Panel.from_dataframe(df, covariates=["WHEN"])
    assert Panel.from_dataframe(df).covariate_names == ()  # datetimes are skipped automatically
