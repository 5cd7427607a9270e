"""Random small frames: only DataError (or the no-observation warning) may escape Panel.from_dataframe."""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nlmefit.errors import DataError
from nlmefit.panel import Panel

CELLS = st.one_of(
    st.sampled_from([0, 0, 0, 1, 1, 2, 3, 4, 101, -1, -2, 99, 24, 0.5, 1.5, 12.0]),
    st.floats(min_value=-5, max_value=50, allow_nan=False, allow_infinity=False),
    st.sampled_from([np.nan, np.inf, -np.inf, None, ".", "", "a", "cp", "pca", "1", "male"]),
)
COLUMNS = ["ID", "TIME", "DV", "AMT", "EVID", "MDV", "CMT", "RATE", "DUR", "II", "ADDL", "SS", "CENS", "LIMIT",
           "LLOQ", "OCC", "DVID", "WT", "SEX", "time", "Dv"]


@st.composite
def frames(draw):
    n = draw(st.integers(1, 8))
    cols = draw(st.lists(st.sampled_from(COLUMNS), min_size=1, max_size=8, unique=True))
    if draw(st.booleans()):  # usually give the required columns
        cols = list(dict.fromkeys(["ID", "TIME", "DV"] + cols))
    data = {}
    for c in cols:
        kind = draw(st.sampled_from(["clean", "messy"]))
        if c == "ID" and kind == "clean":
            data[c] = draw(st.lists(st.sampled_from([1, 2, 3]), min_size=n, max_size=n))
        elif c in ("TIME", "time") and kind == "clean":
            data[c] = draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0, 12.0, 24.0]), min_size=n, max_size=n))
        elif c == "EVID" and kind == "clean":
            data[c] = draw(st.lists(st.sampled_from([0, 0, 1, 2, 3, 4, 101]), min_size=n, max_size=n))
        else:
            data[c] = draw(st.lists(CELLS, min_size=n, max_size=n))
    df = pd.DataFrame({c: pd.Series(v, dtype=object) if any(isinstance(x, str) or x is None for x in v)
                       else pd.Series(v) for c, v in data.items()})
    return df


VALID = {
    "AMT": [0.0, 0.0, 10.0, 100.0], "EVID": [0, 0, 0, 1, 2, 3, 4, 101], "MDV": [0, 0, 1], "CMT": [1, 2],
    "RATE": [0, 0, -1, -2, 5.0], "DUR": [0, 0, 2.0], "II": [0, 12.0, 24.0], "ADDL": [0, 0, 1, 3],
    "SS": [0, 0, 1, 2], "CENS": [0, 0, 1, -1], "LIMIT": [np.nan, 0.0], "LLOQ": [np.nan, 0.5, 1.0],
    "OCC": [1, 2, np.nan], "DVID": ["cp", "pca"], "WT": [60.0, 70.0, np.nan], "SEX": ["F", "M", None],
}


@st.composite
def near_valid_frames(draw):
    """Sorted subjects, non-decreasing times, plausible values; then zero to two cells replaced by junk."""
    n = draw(st.integers(1, 10))
    ids = sorted(draw(st.lists(st.sampled_from([1, 2, 3, 4]), min_size=n, max_size=n)))
    times = draw(st.lists(st.sampled_from([0.0, 0.25, 1.0, 2.0, 12.0, 24.0, 48.0]), min_size=n, max_size=n))
    df = pd.DataFrame({"ID": ids, "TIME": times, "DV": draw(st.lists(
        st.floats(0.01, 100, allow_nan=False), min_size=n, max_size=n))})
    df = df.sort_values(["ID", "TIME"], kind="stable").reset_index(drop=True)
    extra = draw(st.lists(st.sampled_from(sorted(VALID)), max_size=7, unique=True))
    for c in extra:
        vals = draw(st.lists(st.sampled_from(VALID[c]), min_size=n, max_size=n))
        df[c] = pd.Series(vals, dtype=object) if any(isinstance(x, str) or x is None for x in vals) else vals
    for _ in range(draw(st.integers(0, 2))):
        c = draw(st.sampled_from(list(df.columns)))
        i = draw(st.integers(0, n - 1))
        df[c] = df[c].astype(object)
        df.loc[i, c] = draw(CELLS)
    return df


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(df=st.one_of(frames(), near_valid_frames(), near_valid_frames()), sort=st.booleans(), require_dv=st.booleans())
def test_only_data_errors_escape(df, sort, require_dv):
    copy = df.copy(deep=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            p = Panel.from_dataframe(df, sort=sort, require_dv=require_dv)
        except DataError as e:
            assert str(e)
            p = None
    pd.testing.assert_frame_equal(df, copy)
    for w in caught:
        assert issubclass(w.category, UserWarning) and "no observation" in str(w.message), str(w.message)
    if p is None:
        return
    n, j, d = p.n_subjects, p.max_obs, p.max_doses
    assert p.dv.shape == p.obs_time.shape == p.obs_row.shape == p.cens.shape == (n, j)
    assert p.dose_time.shape == p.dose_mask.shape == (n, d)
    assert p.obs_covariates.shape == (n, j, len(p.covariate_names))
    assert np.isfinite(p.obs_time).all() and np.isfinite(p.dose_time).all()
    assert ((p.obs_row >= 0) == p.obs_mask).all() and (p.obs_row < len(df)).all()
    assert ((p.dose_row >= 0) == p.dose_mask).all()
    assert (p.dose_amt[p.dose_mask] > 0).all()
    assert np.isfinite(p.covariates).all() and np.isfinite(p.obs_covariates).all()
    assert len(p.to_dataframe()) == len(df)
    assert len(p.observations_frame()) == p.n_obs
    ev = p.to_events(np.zeros_like(p.dose_cmt))
    assert ev.contributes().shape == (n, j, d)
    repr(p)
    p.subset(slice(0, 1))
