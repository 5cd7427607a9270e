"""Record-level checks and conversions. Every problem raises :class:`nlmefit.errors.DataError` naming the column,
the subject ID, the TIME and the (0-based, positional) row, and what was expected.

:func:`read_records` turns a user DataFrame into :class:`Records` (one numpy array per canonical field, in the
user's row order), checking everything that can be checked record by record.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from nlmefit.errors import DataError
from nlmefit.panel.columns import REQUIRED, is_reserved_label, resolve_columns

__all__ = ["Records", "RowContext", "read_records", "to_numeric", "encode_column", "MAX_EXPANDED_DOSES"]

#: Text values read as "missing" in numeric columns (besides NaN/None): NONMEM/Monolix write ``.``.
MISSING_TEXT = frozenset({"", ".", "nan", "na", "none", "null"})
#: Largest number of ADDL-implied doses a data set may expand to (guards against ADDL=1e9 typos).
MAX_EXPANDED_DOSES = 20_000_000
#: EVID values accepted (101: rxode2 bolus into compartment 1).
EVIDS = (0, 1, 2, 3, 4, 101)


def _scalar(v: object) -> object:
    return v.item() if isinstance(v, np.generic) else v


class RowContext:
    """Formats ``ID .. TIME .. (row ..)`` for messages from the raw ID and TIME values."""

    def __init__(self, ids: np.ndarray, times: np.ndarray):
        self.ids, self.times = ids, times

    def where(self, i: int) -> str:
        return f"ID {_scalar(self.ids[i])} TIME {_scalar(self.times[i])} (row {int(i)})"

    def fail(self, column: str, bad: np.ndarray, expected: str, got: np.ndarray | None = None) -> None:
        """Raise DataError for the first row where ``bad`` is True (no-op when none is)."""
        idx = np.flatnonzero(bad)
        if idx.size == 0:
            return
        i = int(idx[0])
        msg = f"column {column}, {self.where(i)}: expected {expected}"
        if got is not None:
            msg += f", got {_scalar(got[i])!r}"
        if idx.size > 1:
            msg += f" ({idx.size - 1} more row{'s' if idx.size > 2 else ''} like this)"
        raise DataError(msg)


def _missing_text(values: np.ndarray) -> np.ndarray:
    out = np.zeros(values.shape, dtype=bool)
    for k, v in enumerate(values):
        if isinstance(v, str) and v.strip().lower() in MISSING_TEXT:
            out[k] = True
    return out


def _coerce(s: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(float values with NaN for missing, bad mask = present but not a number). Infinite values pass."""
    if pd.api.types.is_bool_dtype(s.dtype):
        vals = s.astype("float64").to_numpy(dtype=np.float64, na_value=np.nan)
        return vals, np.zeros(len(s), dtype=bool)
    if pd.api.types.is_numeric_dtype(s.dtype) and not pd.api.types.is_complex_dtype(s.dtype):
        return s.to_numpy(dtype=np.float64, na_value=np.nan), np.zeros(len(s), dtype=bool)
    if not (pd.api.types.is_object_dtype(s.dtype) or pd.api.types.is_string_dtype(s.dtype)
            or isinstance(s.dtype, pd.CategoricalDtype)):
        return np.full(len(s), np.nan), np.ones(len(s), dtype=bool)
    raw = s.astype(object).to_numpy()
    miss = pd.isna(raw) | _missing_text(raw)
    vals = np.full(len(s), np.nan)
    sub = pd.Series(np.where(miss, None, raw), dtype=object)
    try:
        num = pd.to_numeric(sub, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    except (TypeError, ValueError):
        num = np.full(len(s), np.nan)
        for k, v in enumerate(raw):
            if not miss[k]:
                try:
                    num[k] = float(v)
                except (TypeError, ValueError, OverflowError):
                    pass
    # bools and complex values are not numbers here
    for k, v in enumerate(raw):
        if isinstance(v, (complex, np.complexfloating)):
            num[k] = np.nan
    vals[~miss] = num[~miss]
    bad = ~miss & np.isnan(vals)
    return vals, bad


def to_numeric(s: pd.Series, column: str, ctx: RowContext, check: np.ndarray | None = None) -> np.ndarray:
    """Float values of a canonical column; non-numeric entries (where ``check``, default everywhere) and
    infinite values raise DataError. Missing values (NaN, None, '', '.') become NaN."""
    vals, bad = _coerce(s)
    if check is not None:
        bad &= check
    ctx.fail(column, bad, "a number", s.to_numpy())
    ctx.fail(column, np.isinf(vals), "a finite number", vals)
    return vals


def encode_column(s: pd.Series, column: str, ctx: RowContext) -> tuple[np.ndarray, dict | None]:
    """Numeric values (NaN = missing) of a covariate-like column, and the level map for text columns.

    A column whose present values are all numbers (or numeric text) is numeric (levels None). A column of text
    is encoded by its sorted distinct labels: ``{label: code}`` with codes 0..L-1. Mixed numbers and text, or
    values that are neither, raise DataError.
    """
    if (pd.api.types.is_numeric_dtype(s.dtype) or pd.api.types.is_bool_dtype(s.dtype)) and \
            not pd.api.types.is_complex_dtype(s.dtype):
        vals, _ = _coerce(s)
        ctx.fail(column, np.isinf(vals), "a finite number", vals)
        return vals, None
    if not (pd.api.types.is_object_dtype(s.dtype) or pd.api.types.is_string_dtype(s.dtype)
            or isinstance(s.dtype, pd.CategoricalDtype)):
        raise DataError(f"column {column}: cannot use a column of type {s.dtype} as a covariate; expected numbers "
                        f"or text labels")
    raw = s.astype(object).to_numpy()
    vals, bad = _coerce(s)
    miss = pd.isna(raw) | _missing_text(raw)
    present = ~miss
    if not bad.any():
        ctx.fail(column, np.isinf(vals), "a finite number", vals)
        return vals, None
    if (present & ~bad).any():
        i_num = int(np.flatnonzero(present & ~bad)[0])
        ctx.fail(column, bad, f"only numbers or only text labels in one column (row {i_num} holds the number "
                              f"{_scalar(raw[i_num])!r})", raw)
    for k in np.flatnonzero(present):
        if not isinstance(raw[k], (str, np.str_)):
            ctx.fail(column, np.arange(len(raw)) == k, "a number or a text label", raw)
    labels = np.array([str(v).strip() if present[k] else "" for k, v in enumerate(raw)], dtype=object)
    levels = sorted(set(labels[present].tolist()))
    mapping = {lab: code for code, lab in enumerate(levels)}
    codes = np.full(len(raw), np.nan)
    codes[present] = [mapping[v] for v in labels[present]]
    return codes, mapping


@dataclass
class Records:
    """Validated per-row fields in the user's row order (n rows)."""

    n: int
    subj: np.ndarray  # int64 subject code (order of first appearance, or sorted IDs when sort=True)
    ids: np.ndarray  # unique original IDs, indexed by subj code
    raw_ids: np.ndarray  # ID per row (object)
    time: np.ndarray
    dv: np.ndarray
    amt: np.ndarray
    evid: np.ndarray  # int64, resolved 0..4 (101 -> 1, EVID 0 with MDV=1 -> 2)
    cmt: np.ndarray  # int64, 0 when absent
    rate: np.ndarray  # dose rate: >0, 0 bolus, -1, -2
    dur: np.ndarray  # infusion duration (0 bolus / modelled)
    ii: np.ndarray
    addl: np.ndarray  # int64
    ss: np.ndarray  # int64
    cens: np.ndarray  # int8
    limit: np.ndarray  # censoring threshold (nan if none)
    limit_other: np.ndarray  # LIMIT column (nan if none)
    occ: np.ndarray  # float codes (NaN missing -> filled later)
    dvid: np.ndarray  # int64 codes
    cov: np.ndarray  # [n, K] float (NaN missing)
    covariate_names: tuple[str, ...]
    covariate_levels: dict[str, dict]
    dvid_levels: dict | None
    occ_levels: np.ndarray | None
    columns: dict[str, object]
    ctx: RowContext
    raw: dict[str, np.ndarray] = field(default_factory=dict)  # canonical columns as given (for to_dataframe)


def _first_record_time(subj: np.ndarray, ns: int) -> np.ndarray:
    first = np.full(ns, -1, dtype=np.int64)
    pos = np.arange(len(subj))[::-1]
    first[subj[::-1]] = pos
    return first


@dataclass(frozen=True)
class _Columns:
    """The canonical columns of a frame (positional index), its number of rows and the message context."""

    col: dict[str, pd.Series]
    n: int
    ctx: RowContext

    def __contains__(self, c: str) -> bool:
        """Whether the frame has canonical column ``c``."""
        return c in self.col

    def num(self, c: str, default: float = 0.0, check: np.ndarray | None = None) -> np.ndarray:
        """Float values of column ``c`` (see :func:`to_numeric`); ``default`` everywhere when it is absent."""
        if c not in self.col:
            return np.full(self.n, default)
        return to_numeric(self.col[c], c, self.ctx, check)


def _resolve_required(df: pd.DataFrame, require_dv: bool, column_map: Mapping[str, str] | None) -> dict[str, object]:
    """Canonical → user column names; DataError for a non-frame, an empty frame or a missing required column."""
    if not isinstance(df, pd.DataFrame):
        raise DataError(f"expected a pandas DataFrame, got {type(df).__name__}")
    if len(df) == 0 or df.shape[1] == 0:
        raise DataError("the DataFrame is empty: expected at least one record with ID and TIME")
    cols = resolve_columns(df, column_map)
    required = REQUIRED + (("DV",) if require_dv else ())
    for c in required:
        if c not in cols:
            hint = "; pass require_dv=False for a simulation template" if c == "DV" else ""
            raise DataError(f"column {c}: required column is missing (columns present: {list(df.columns)}; "
                            f"rename or map it, e.g. {c.lower()}='...'{hint})")
    return cols


def _read_ids(s: pd.Series, ctx: RowContext, sort: bool) -> tuple[np.ndarray, np.ndarray]:
    """Subject codes per row (int64) and the unique IDs they index."""
    raw_ids = ctx.ids
    id_miss = pd.isna(raw_ids) | _missing_text(raw_ids)
    ctx.fail("ID", id_miss, "a subject ID", raw_ids)
    try:
        if pd.api.types.is_numeric_dtype(s.dtype):
            codes, uniques = pd.factorize(s, sort=sort)
        elif all(isinstance(v, (str, int, float, np.generic, bool)) for v in raw_ids):
            codes, uniques = pd.factorize(pd.Series(raw_ids, dtype=object), sort=sort)
        else:
            raise TypeError
    except TypeError:
        if sort:
            raise DataError("column ID: cannot sort the IDs (mixed types?); expected IDs of one type") from None
        raise DataError("column ID: expected numbers or text as subject IDs") from None
    return codes.astype(np.int64), np.asarray(pd.Series(list(uniques)).to_numpy())


def _read_time(tab: _Columns) -> np.ndarray:
    """Non-negative, non-missing record times."""
    time = to_numeric(tab.col["TIME"], "TIME", tab.ctx)
    tab.ctx.fail("TIME", np.isnan(time), "a number (TIME may not be missing)", tab.ctx.times)
    tab.ctx.fail("TIME", time < 0, "a non-negative time", time)
    return time


def _read_evid_cmt(tab: _Columns, amt_raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Resolved EVID (0..4; 101 → 1 into CMT 1, EVID 0 with MDV=1 → 2) and CMT (0 when absent), both int64."""
    ctx = tab.ctx
    mdv = tab.num("MDV")
    mdv0 = np.nan_to_num(mdv, nan=0.0)
    ctx.fail("MDV", ~np.isin(mdv0, (0.0, 1.0)), "MDV 0 or 1", mdv)
    if "EVID" in tab:
        evid_raw = tab.num("EVID", np.nan)
        ctx.fail("EVID", np.isnan(evid_raw), "an EVID (0, 1, 2, 3, 4 or 101)", evid_raw)
        ctx.fail("EVID", ~np.isin(evid_raw, EVIDS), "an EVID in {0 obs, 1 dose, 2 other, 3 reset, 4 reset+dose, "
                                                    "101 rxode2 bolus into CMT 1}", evid_raw)
        evid = evid_raw.astype(np.int64)
    else:
        evid = np.where(np.nan_to_num(amt_raw) > 0, 1, np.where(mdv0 == 1, 2, 0)).astype(np.int64)
    cmt_raw = tab.num("CMT", np.nan)
    ctx.fail("CMT", ~np.isnan(cmt_raw) & ((cmt_raw < 0) | (cmt_raw != np.round(cmt_raw))),
             "a non-negative integer compartment number", cmt_raw)
    cmt = np.nan_to_num(cmt_raw, nan=0.0).astype(np.int64)
    is101 = evid == 101
    cmt[is101] = 1
    evid[is101] = 1
    evid[(evid == 0) & (mdv0 == 1)] = 2
    return evid, cmt


def _read_amt(tab: _Columns, amt_raw: np.ndarray, is_dose: np.ndarray) -> np.ndarray:
    """Dose amounts (0 where missing); positive on every dose record."""
    ctx = tab.ctx
    if is_dose.any() and "AMT" not in tab:
        ctx.fail("AMT", is_dose, "an AMT column for dose records (EVID 1/4); the AMT column is missing")
    ctx.fail("AMT", amt_raw < 0, "a non-negative amount", amt_raw)
    ctx.fail("AMT", is_dose & ~(amt_raw > 0), "AMT > 0 on a dose record (EVID 1/4)", amt_raw)
    return np.nan_to_num(amt_raw, nan=0.0)


def _read_dv(tab: _Columns, is_obs: np.ndarray, require_dv: bool) -> np.ndarray:
    """Observations (NaN where missing); numeric on every observation record when ``require_dv``."""
    dv = tab.num("DV", np.nan, check=is_obs) if "DV" in tab else np.full(tab.n, np.nan)
    if require_dv:
        tab.ctx.fail("DV", is_obs & np.isnan(dv), "a numeric DV on an observation record (EVID 0, MDV 0); mark "
                                                  "records without an observation with MDV=1 or EVID=2", dv)
    return dv


def _read_rate_dur(tab: _Columns, amt: np.ndarray, is_dose: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dose rate (>0, 0 bolus, −1/−2 modelled) and infusion duration per record, consistent with each other."""
    ctx = tab.ctx
    rate_raw = np.nan_to_num(tab.num("RATE"), nan=0.0)
    dur_raw = np.nan_to_num(tab.num("DUR"), nan=0.0)
    ctx.fail("RATE", ~((rate_raw > 0) | np.isin(rate_raw, (0.0, -1.0, -2.0))),
             "RATE > 0 (infusion), 0 (bolus), -1 (modelled rate) or -2 (modelled duration)", rate_raw)
    ctx.fail("RATE", (rate_raw > 0) & ~(amt > 0), "RATE > 0 only together with AMT > 0", rate_raw)
    ctx.fail("DUR", dur_raw < 0, "a non-negative duration", dur_raw)
    both = is_dose & (rate_raw > 0) & (dur_raw > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ctx.fail("DUR", both & ~np.isclose(amt / np.where(rate_raw > 0, rate_raw, 1.0), dur_raw),
                 "DUR = AMT/RATE when both RATE and DUR are given", dur_raw)
    ctx.fail("DUR", is_dose & (rate_raw < 0) & (dur_raw > 0), "DUR = 0 when RATE is -1/-2 (modelled)", dur_raw)
    with np.errstate(divide="ignore", invalid="ignore"):
        rate = np.where(rate_raw > 0, rate_raw, np.where(dur_raw > 0, amt / np.where(dur_raw > 0, dur_raw, 1.0),
                                                         rate_raw))
        dur = np.where(rate_raw > 0, amt / np.where(rate_raw > 0, rate_raw, 1.0), np.where(rate_raw < 0, 0.0,
                                                                                           dur_raw))
    return np.where(is_dose, rate, 0.0), np.where(is_dose, dur, 0.0)


def _read_ii_addl_ss(tab: _Columns, is_dose: np.ndarray,
                     dur: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dosing interval II, ADDL (int64) and SS (int64) per record, 0 off dose records."""
    ctx = tab.ctx
    ii = np.nan_to_num(tab.num("II"), nan=0.0)
    ctx.fail("II", ii < 0, "a non-negative dosing interval", ii)
    addl_f = np.nan_to_num(tab.num("ADDL"), nan=0.0)
    ctx.fail("ADDL", (addl_f < 0) | (addl_f != np.round(addl_f)), "a non-negative integer ADDL", addl_f)
    ss_f = np.nan_to_num(tab.num("SS"), nan=0.0)
    ctx.fail("SS", ~np.isin(ss_f, (0.0, 1.0, 2.0)), "SS 0 (none), 1 (steady state, reset) or 2 (steady state, "
                                                     "added)", ss_f)
    ctx.fail("II", is_dose & (ss_f > 0) & ~(ii > 0), "II > 0 on a steady-state dose (SS 1/2)", ii)
    ctx.fail("II", is_dose & (addl_f > 0) & ~(ii > 0), "II > 0 on a dose with ADDL > 0", ii)
    ctx.fail("RATE", is_dose & (ss_f > 0) & (dur > ii), "an infusion duration (AMT/RATE or DUR) no longer than "
                                                        "II for a steady-state dose", dur)
    addl = np.where(is_dose, addl_f, 0.0).astype(np.int64)
    if int(addl.sum()) > MAX_EXPANDED_DOSES:
        ctx.fail("ADDL", addl == addl.max(), f"at most {MAX_EXPANDED_DOSES} ADDL-implied doses in all", addl)
    ss = np.where(is_dose, ss_f, 0.0).astype(np.int64)
    return np.where(is_dose, ii, 0.0), addl, ss


def _read_censoring(tab: _Columns, is_obs: np.ndarray,
                    dv: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CENS (int8, from CENS or DV < LLOQ), the censoring limit and the LIMIT column (NaN where none)."""
    limit_other = tab.num("LIMIT", np.nan)
    lloq = tab.num("LLOQ", np.nan)
    if "CENS" in tab:
        cens_f = np.nan_to_num(tab.num("CENS"), nan=0.0)
        tab.ctx.fail("CENS", ~np.isin(cens_f, (-1.0, 0.0, 1.0)), "CENS -1 (above limit), 0 or 1 (below limit)",
                     cens_f)
        cens = np.where(is_obs, cens_f, 0).astype(np.int8)
        limit = np.where(cens != 0, dv, np.nan)
    elif "LLOQ" in tab:
        cens = (is_obs & (dv < lloq)).astype(np.int8)
        limit = np.where(cens != 0, lloq, np.nan)
    else:
        cens = np.zeros(tab.n, dtype=np.int8)
        limit = np.full(tab.n, np.nan)
    return cens, limit, limit_other


def _read_occ(tab: _Columns) -> tuple[np.ndarray, np.ndarray | None]:
    """Occasion codes 0..K-1 (NaN where missing; 0 without an OCC column) and the sorted occasion values."""
    if "OCC" not in tab:
        return np.zeros(tab.n), None
    occ_vals, _ = encode_column(tab.col["OCC"], "OCC", tab.ctx)
    present = occ_vals[~np.isnan(occ_vals)]
    occ_levels = np.unique(present)
    occ = np.full(tab.n, np.nan)
    ok = ~np.isnan(occ_vals)
    occ[ok] = np.searchsorted(occ_levels, occ_vals[ok])
    return occ, occ_levels


def _read_dvid(tab: _Columns, is_obs: np.ndarray) -> tuple[np.ndarray, dict | None]:
    """Integer DVID codes (int64; 0 without a DVID column) and the level map of a text DVID."""
    if "DVID" not in tab:
        return np.zeros(tab.n, dtype=np.int64), None
    ctx = tab.ctx
    dvid_vals, dvid_levels = encode_column(tab.col["DVID"], "DVID", ctx)
    ctx.fail("DVID", is_obs & np.isnan(dvid_vals), "a DVID on an observation record", dvid_vals)
    ctx.fail("DVID", ~np.isnan(dvid_vals) & (dvid_vals != np.round(dvid_vals)), "an integer DVID", dvid_vals)
    return np.nan_to_num(dvid_vals, nan=0.0).astype(np.int64), dvid_levels


def _covariate_names(df: pd.DataFrame, cols: dict[str, object], covariates: Sequence[str] | None) -> list:
    """The covariate columns: those listed (checked), or every usable non-canonical column."""
    used = set(map(repr, cols.values()))
    if covariates is None:
        names = []
        for c in df.columns:
            if repr(c) in used or is_reserved_label(c):
                continue
            dt = df[c].dtype
            if pd.api.types.is_complex_dtype(dt):
                continue
            if (pd.api.types.is_numeric_dtype(dt) or pd.api.types.is_bool_dtype(dt)
                    or pd.api.types.is_object_dtype(dt) or pd.api.types.is_string_dtype(dt)
                    or isinstance(dt, pd.CategoricalDtype)):
                names.append(c)
        return names
    if isinstance(covariates, str):
        covariates = [covariates]
    names = list(covariates)
    for c in names:
        if c not in df.columns:
            raise DataError(f"column {c}: listed in covariates but not in the DataFrame "
                            f"(columns: {list(df.columns)})")
        if repr(c) in used:
            raise DataError(f"column {c}: it is the {[k for k, v in cols.items() if v == c][0]} column and "
                            f"cannot also be a covariate")
    if len(set(map(repr, names))) != len(names):
        raise DataError(f"covariates: duplicate names in {names}")
    return names


def _encode_covariates(df: pd.DataFrame, names: list, ctx: RowContext) -> tuple[np.ndarray, dict[str, dict]]:
    """Covariate values [n, K] (NaN missing) and the level maps of the text covariates."""
    cov = np.full((len(df), len(names)), np.nan)
    levels: dict[str, dict] = {}
    for k, c in enumerate(names):
        vals, lev = encode_column(df[c].reset_index(drop=True), str(c), ctx)
        cov[:, k] = vals
        if lev is not None:
            levels[str(c)] = lev
    return cov, levels


def _check_covariates_present(names: list, cov: np.ndarray, subj: np.ndarray, ids: np.ndarray,
                              first: np.ndarray, ctx: RowContext) -> None:
    """DataError when a covariate is missing on every record of a subject."""
    if not len(names):
        return
    has_any = np.zeros((len(ids), len(names)), dtype=bool)
    np.logical_or.at(has_any, subj, ~np.isnan(cov))
    bad_s, bad_k = np.nonzero(~has_any)
    if bad_s.size:
        s, k = int(bad_s[0]), int(bad_k[0])
        raise DataError(f"column {names[k]}, {ctx.where(int(first[s]))}: the covariate is missing on every "
                        f"record of ID {_scalar(ids[s])}; expected at least one value per subject")


def _check_occ_present(occ: np.ndarray, subj: np.ndarray, ids: np.ndarray, first: np.ndarray,
                       ctx: RowContext) -> None:
    """DataError when OCC is missing on every record of a subject."""
    has_occ = np.zeros(len(ids), dtype=bool)
    np.logical_or.at(has_occ, subj, ~np.isnan(occ))
    if not has_occ.all():
        s = int(np.flatnonzero(~has_occ)[0])
        raise DataError(f"column OCC, {ctx.where(int(first[s]))}: OCC is missing on every record of ID "
                        f"{_scalar(ids[s])}; expected an occasion")


def _check_order(subj: np.ndarray, ids: np.ndarray, time: np.ndarray, first: np.ndarray, ctx: RowContext) -> None:
    """DataError unless each subject's records are contiguous and in non-decreasing time."""
    back = np.flatnonzero(np.diff(subj) < 0)
    if back.size:
        i = int(back[0]) + 1
        s = int(subj[i])
        raise DataError(f"column ID, {ctx.where(i)}: the records of ID {_scalar(ids[s])} are not contiguous "
                        f"(also at row {int(first[s])}); expected each subject's records in one block, or "
                        f"pass sort=True")
    same = np.diff(subj) == 0
    dec = np.zeros(len(subj), dtype=bool)
    dec[1:] = same & (np.diff(time) < 0)
    ctx.fail("TIME", dec, "TIME not decreasing within a subject (previous record has a later time; pass "
                          "sort=True to sort by ID then TIME)", time)


def _check_duplicates(key: dict[str, np.ndarray], cov: np.ndarray, evid: np.ndarray, ctx: RowContext,
                      subj: np.ndarray) -> None:
    """DataError for a record that exactly repeats an earlier one (key fields and covariates; resets excepted).
    Only records sharing subject and TIME with another can repeat one, so the full comparison runs on those
    few (found by one sort of integer codes): O(n) memory instead of a frame of every record's key."""
    n = len(evid)
    t = np.asarray(key["TIME"], dtype=float)
    order = np.lexsort((t, subj))
    ts, ss = t[order], subj[order]
    same = (ss[1:] == ss[:-1]) & ((ts[1:] == ts[:-1]) | (np.isnan(ts[1:]) & np.isnan(ts[:-1])))
    if not same.any():
        return
    cand = np.zeros(n, dtype=bool)
    cand[order[1:][same]] = True
    cand[order[:-1][same]] = True
    idx = np.flatnonzero(cand)  # in row order, so keep="first" keeps the earliest row
    kdf = pd.DataFrame({k: np.asarray(v)[idx] for k, v in key.items()})
    for k in range(cov.shape[1]):
        kdf[f"__cov{k}"] = cov[idx, k]
    dup = np.zeros(n, dtype=bool)
    dup[idx] = kdf.duplicated(keep="first").to_numpy()
    dup &= evid != 3  # repeated resets are harmless
    ctx.fail("ID/TIME/EVID/AMT/DV", dup, "no duplicate records (this row repeats an earlier one exactly)")


def read_records(df: pd.DataFrame, *, sort: bool = False, require_dv: bool = True,
                 covariates: Sequence[str] | None = None, column_map: Mapping[str, str] | None = None) -> Records:
    """Check a NONMEM-style DataFrame and convert it to :class:`Records` (the frame itself is never modified)."""
    cols = _resolve_required(df, require_dv, column_map)
    n = len(df)
    col = {c: df[u].reset_index(drop=True) for c, u in cols.items()}
    raw_ids = col["ID"].astype(object).to_numpy()
    ctx = RowContext(raw_ids, col["TIME"].astype(object).to_numpy())
    tab = _Columns(col, n, ctx)
    subj, ids = _read_ids(col["ID"], ctx, sort)
    time = _read_time(tab)
    amt_raw = tab.num("AMT", np.nan)
    evid, cmt = _read_evid_cmt(tab, amt_raw)
    is_dose = (evid == 1) | (evid == 4)
    is_obs = evid == 0
    amt = _read_amt(tab, amt_raw, is_dose)
    dv = _read_dv(tab, is_obs, require_dv)
    rate, dur = _read_rate_dur(tab, amt, is_dose)
    ii, addl, ss = _read_ii_addl_ss(tab, is_dose, dur)
    cens, limit, limit_other = _read_censoring(tab, is_obs, dv)
    occ, occ_levels = _read_occ(tab)
    dvid, dvid_levels = _read_dvid(tab, is_obs)
    names = _covariate_names(df, cols, covariates)
    cov, levels = _encode_covariates(df, names, ctx)
    first = _first_record_time(subj, len(ids))
    _check_covariates_present(names, cov, subj, ids, first, ctx)
    if "OCC" in col:
        _check_occ_present(occ, subj, ids, first, ctx)
    if not sort:
        _check_order(subj, ids, time, first, ctx)
    key = {"ID": raw_ids, "TIME": time, "EVID": evid, "AMT": amt, "DV": dv, "CMT": cmt, "DVID": dvid,
           "RATE": rate, "II": ii, "ADDL": addl, "SS": ss, "CENS": cens, "OCC": occ}
    _check_duplicates(key, cov, evid, ctx, subj)
    raw = {c: col[c].to_numpy() for c in cols}
    return Records(n=n, subj=subj, ids=ids, raw_ids=raw_ids, time=time, dv=dv, amt=amt, evid=evid, cmt=cmt,
                   rate=rate, dur=dur, ii=ii, addl=addl, ss=ss, cens=cens, limit=limit, limit_other=limit_other,
                   occ=occ, dvid=dvid, cov=cov, covariate_names=tuple(str(c) for c in names),
                   covariate_levels=levels, dvid_levels=dvid_levels, occ_levels=occ_levels, columns=cols,
                   ctx=ctx, raw=raw)
