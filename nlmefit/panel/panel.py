"""The Panel: a validated NONMEM-style data set as padded per-subject numpy arrays (and torch tensors on demand)."""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
import torch

from nlmefit._html import object_html
from nlmefit.errors import DataError
from nlmefit.panel.columns import CANONICAL
from nlmefit.panel.expand import (
    ADDL_SEQ_OFFSET,
    epochs,
    expand_addl,
    locf,
    order_records,
    within_group_position,
)
from nlmefit.panel.validate import read_records
from nlmefit.pk.events import Events

__all__ = ["Panel"]

_OBS_FIELDS = ("obs_time", "dv", "obs_mask", "obs_row", "obs_seq", "obs_epoch", "obs_cmt", "obs_occ", "obs_dvid",
               "cens", "limit", "limit_other", "obs_covariates")
_DOSE_FIELDS = ("dose_time", "dose_amt", "dose_rate", "dose_dur", "dose_ii", "dose_ss", "dose_cmt", "dose_seq",
                "dose_epoch", "dose_occ", "dose_row", "dose_mask", "dose_covariates")
_PAD = {"obs_row": -1, "dose_row": -1, "limit": np.nan, "limit_other": np.nan}


def _scatter(n: int, width: int, rows: np.ndarray, cols: np.ndarray, values: np.ndarray, fill) -> np.ndarray:
    out = np.full((n, width) + values.shape[1:], fill, dtype=values.dtype)
    out[rows, cols] = values
    return out


def _py(v: object) -> object:
    return v.item() if isinstance(v, np.generic) else v


def _dose_record_columns(raw: np.ndarray, cov: np.ndarray, is_dose: np.ndarray, subj: np.ndarray,
                         names: Sequence[str], text: set[str], ids: np.ndarray) -> tuple[np.ndarray, dict]:
    """Make covariate columns that carry a value only on dose records time-constant where that is what they mean.

    A column that is 0 (or missing) on every other record, with at least one 0 there, and non-zero on some dose
    record (theophylline's ``DOSE_MGKG``, pheno's ``FA1``) would, carried forward, drop to 0 at every observation
    and look time-varying: a model using it would go to the per-observation path, an ODE model would refuse the
    data. Where each subject's dose records agree on one value, that value is the subject's covariate on every
    record (baseline included, even when the first record is a pre-dose observation). Where they differ the column
    is dose information, not a covariate: it is left as read and flagged. Text columns (level codes) are not
    touched. ``raw`` holds the values before LOCF (NaN missing), ``cov`` after; both in record order.

    Returns the covariates and ``{column: None | ID of the first subject whose dose records differ}``."""
    found: dict[str, object] = {}
    if raw.shape[1] == 0 or not is_dose.any() or is_dose.all():
        return cov, found
    off = ~is_dose
    for k, name in enumerate(names):
        col = raw[:, k]
        v_off = col[off]
        if name in text or not (np.all(np.isnan(v_off) | (v_off == 0)) and np.any(v_off == 0)):
            continue
        on = is_dose & ~np.isnan(col)
        if not np.any(on & (col != 0)):
            continue
        lo = np.full(len(ids), np.inf)
        hi = np.full(len(ids), -np.inf)
        np.minimum.at(lo, subj[on], col[on])
        np.maximum.at(hi, subj[on], col[on])
        differ = np.flatnonzero(hi > lo)
        if len(differ):
            found[name] = _py(ids[differ[0]])
            continue
        rows = np.isfinite(lo)[subj]
        cov[rows, k] = lo[subj[rows]]
        found[name] = None
    return cov, found


@dataclass(eq=False, repr=False)
class Panel:
    """A NONMEM-style event data set as padded arrays: N subjects × J observations / D doses.

    Build one with :meth:`Panel.from_dataframe`. Observation arrays are ``[N, J]``, dose arrays ``[N, D]`` (doses
    after ADDL expansion); padding has ``time 0``, ``mask False``, ``row -1``, ``limit nan`` and the subject's
    baseline covariates. ``obs_row``/``dose_row`` are positional indices into the user's DataFrame (implied ADDL
    doses carry their parent's row). See docs/data.md for the record conventions.
    """

    ids: np.ndarray
    obs_time: np.ndarray
    dv: np.ndarray
    obs_mask: np.ndarray
    obs_row: np.ndarray
    obs_seq: np.ndarray
    obs_epoch: np.ndarray
    obs_cmt: np.ndarray
    obs_occ: np.ndarray
    obs_dvid: np.ndarray
    cens: np.ndarray
    limit: np.ndarray
    limit_other: np.ndarray
    dose_time: np.ndarray
    dose_amt: np.ndarray
    dose_rate: np.ndarray
    dose_dur: np.ndarray
    dose_ii: np.ndarray
    dose_ss: np.ndarray
    dose_cmt: np.ndarray
    dose_seq: np.ndarray
    dose_epoch: np.ndarray
    dose_occ: np.ndarray
    dose_row: np.ndarray
    dose_mask: np.ndarray
    covariate_names: tuple[str, ...]
    covariates: np.ndarray
    obs_covariates: np.ndarray
    dose_covariates: np.ndarray
    covariate_levels: dict[str, dict]
    dvid_levels: dict
    occ_levels: np.ndarray
    n_occasions: int
    excluded_ids: tuple
    columns: dict[str, object]
    has_cmt: bool
    dose_is_record: np.ndarray  # [N, D] bool: True for dose records, False for ADDL-implied doses
    _records: pd.DataFrame = field(default=None)
    #: covariate columns that are non-zero only on dose records: name -> None where every subject's dose records
    #: agree (the column was made time-constant), else the ID of the first subject whose dose records differ (the
    #: column is dose information; a model that uses it refuses the data). See :func:`_dose_record_columns`.
    dose_record_covariates: dict[str, object] = field(default_factory=dict)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dataframe(cls, df: pd.DataFrame, *, sort: bool = False, require_dv: bool = True,
                       covariates: Sequence[str] | None = None, **column_map: str) -> Panel:
        """Validate a NONMEM-style DataFrame and build the padded panel.

        ``sort``: stable-sort records by ID then TIME (otherwise records must already be in that order).
        ``require_dv``: DV must be present on observation records (set False for simulation templates).
        ``covariates``: covariate columns (default: every non-reserved numeric or text column).
        ``**column_map``: canonical name (lower case) = user column, e.g. ``id="Subject", dv="conc"``.
        Raises :class:`nlmefit.errors.DataError`; warns about subjects without observations (and drops them).
        """
        rec = read_records(df, sort=sort, require_dv=require_dv, covariates=covariates, column_map=column_map)
        n_sub = len(rec.ids)
        od = order_records(rec.subj, rec.time, n_sub, sort)
        o, s = od.order, od.subj
        time, evid, ss = rec.time[o], rec.evid[o], rec.ss[o]
        is_dose = (evid == 1) | (evid == 4)
        is_obs = evid == 0
        reset = (evid == 3) | (evid == 4) | (is_dose & (ss == 1))
        epoch = epochs(reset, s, od.start)
        occ = locf(rec.occ[o], s)
        occ = np.nan_to_num(occ, nan=0.0).astype(np.int64)
        cov = locf(rec.cov[o], s) if rec.cov.shape[1] else rec.cov[o]
        cov, dose_cols = _dose_record_columns(rec.cov[o], cov, is_dose, s, rec.covariate_names,
                                              set(rec.covariate_levels), rec.ids)
        seq = od.seq
        # ---- doses: records plus ADDL-implied ones (cancelled by a later reset)
        ex = expand_addl(rec.addl[o], rec.ii[o], time, s)
        live = epoch[ex.last_record] == epoch[ex.parent]
        par, last = ex.parent[live], ex.last_record[live]
        di = np.flatnonzero(is_dose)
        d = {
            "subj": np.concatenate([s[di], s[par]]),
            "dose_time": np.concatenate([time[di], ex.time[live]]),
            "dose_amt": np.concatenate([rec.amt[o][di], rec.amt[o][par]]),
            "dose_rate": np.concatenate([rec.rate[o][di], rec.rate[o][par]]),
            "dose_dur": np.concatenate([rec.dur[o][di], rec.dur[o][par]]),
            "dose_ii": np.concatenate([rec.ii[o][di], rec.ii[o][par]]),
            "dose_ss": np.concatenate([ss[di], np.zeros(len(par), dtype=np.int64)]),
            "dose_cmt": np.concatenate([rec.cmt[o][di], rec.cmt[o][par]]),
            "dose_seq": np.concatenate([seq[di], ADDL_SEQ_OFFSET + ex.merged_pos[live]]),
            "dose_epoch": np.concatenate([epoch[di], epoch[last]]),
            "dose_occ": np.concatenate([occ[di], occ[last]]),
            "dose_row": np.concatenate([o[di], o[par]]).astype(np.int64),
            "dose_covariates": np.concatenate([cov[di], cov[last]]),
            "dose_is_record": np.concatenate([np.ones(len(di), bool), np.zeros(len(par), bool)]),
        }
        dorder = np.lexsort((d["dose_seq"], d["dose_time"], d["subj"]))
        d = {k: v[dorder] for k, v in d.items()}
        # ---- subjects kept
        n_obs_subj = np.bincount(s[is_obs], minlength=n_sub)
        keep = n_obs_subj > 0 if require_dv else np.ones(n_sub, dtype=bool)
        excluded = tuple(_py(v) for v in rec.ids[~keep])
        if excluded:
            warnings.warn(f"{len(excluded)} subject(s) have no observation records and are excluded from the "
                          f"panel: ID {', '.join(map(str, excluded[:20]))}{' ...' if len(excluded) > 20 else ''}",
                          UserWarning, stacklevel=2)
        new = np.cumsum(keep) - 1
        N = int(keep.sum())
        baseline = cov[od.start[keep]] if N else np.zeros((0, cov.shape[1]))
        # ---- observations
        oi = np.flatnonzero(is_obs & keep[s])
        orow = new[s[oi]]
        ocol = within_group_position(orow)
        J = int(ocol.max()) + 1 if len(ocol) else 0
        arrays: dict[str, np.ndarray] = {}
        obs_vals = {
            "obs_time": time[oi], "dv": rec.dv[o][oi], "obs_mask": np.ones(len(oi), bool),
            "obs_row": o[oi].astype(np.int64), "obs_seq": seq[oi], "obs_epoch": epoch[oi],
            "obs_cmt": rec.cmt[o][oi], "obs_occ": occ[oi], "obs_dvid": rec.dvid[o][oi],
            "cens": rec.cens[o][oi], "limit": rec.limit[o][oi], "limit_other": rec.limit_other[o][oi],
        }
        for k, v in obs_vals.items():
            arrays[k] = _scatter(N, J, orow, ocol, v, _PAD.get(k, 0))
        oc = np.repeat(baseline[:, None, :], J, axis=1)
        oc[orow, ocol] = cov[oi]
        arrays["obs_covariates"] = oc
        # ---- doses
        dk = keep[d["subj"]]
        drow = new[d["subj"][dk]]
        dcol = within_group_position(drow)
        D = int(dcol.max()) + 1 if len(dcol) else 0
        for k in _DOSE_FIELDS:
            if k in ("dose_mask", "dose_covariates"):
                continue
            arrays[k] = _scatter(N, D, drow, dcol, d[k][dk], _PAD.get(k, 0))
        arrays["dose_mask"] = _scatter(N, D, drow, dcol, np.ones(int(dk.sum()), bool), False)
        arrays["dose_is_record"] = _scatter(N, D, drow, dcol, d["dose_is_record"][dk], False)
        dc = np.repeat(baseline[:, None, :], D, axis=1)
        dc[drow, dcol] = d["dose_covariates"][dk]
        arrays["dose_covariates"] = dc
        # ---- the records as given (for to_dataframe)
        records = df[list(rec.columns.values())].copy()
        records.columns = list(rec.columns.keys())
        records = records[[c for c in CANONICAL if c in rec.columns]]
        for k, name in enumerate(rec.covariate_names):
            src = [c for c in df.columns if str(c) == name][0]
            records[name] = df[src].to_numpy(copy=True)
        if "EVID" not in rec.columns:
            records["EVID"] = rec.evid
        if "MDV" not in rec.columns:
            records["MDV"] = (rec.evid != 0).astype(np.int64)
        ids = rec.ids[keep]
        return cls(ids=ids, covariate_names=rec.covariate_names, covariates=np.asarray(baseline, np.float64),
                   covariate_levels=rec.covariate_levels, dvid_levels=dict(rec.dvid_levels or {}),
                   occ_levels=rec.occ_levels if rec.occ_levels is not None else np.zeros(0),
                   n_occasions=int(len(rec.occ_levels)) if rec.occ_levels is not None else 0,
                   excluded_ids=excluded, columns=dict(rec.columns), has_cmt="CMT" in rec.columns,
                   _records=records, dose_record_covariates=dose_cols, **arrays)

    # ------------------------------------------------------------------ sizes
    @property
    def n_subjects(self) -> int:
        return int(self.obs_time.shape[0])

    @property
    def max_obs(self) -> int:
        return int(self.obs_time.shape[1])

    @property
    def max_doses(self) -> int:
        return int(self.dose_time.shape[1])

    @property
    def n_obs(self) -> int:
        return int(self.obs_mask.sum())

    @property
    def n_doses(self) -> int:
        """Doses after ADDL expansion."""
        return int(self.dose_mask.sum())

    @property
    def n_dose_records(self) -> int:
        """Dose records in the data (before ADDL expansion)."""
        return int((self.dose_mask & self.dose_is_record).sum())

    @property
    def n_censored(self) -> int:
        return int(((self.cens != 0) & self.obs_mask).sum())

    # ------------------------------------------------------------------ tensors
    def _array_names(self) -> list[str]:
        return ["ids", "covariates", "dose_is_record", *_OBS_FIELDS, *_DOSE_FIELDS]

    def tensor(self, name: str, device=None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """An array attribute as a torch tensor (floating arrays cast to ``dtype``; bool and int64 kept)."""
        names = self._array_names()
        if name not in names or name == "ids":
            raise ValueError(f"Panel has no numeric array {name!r}; expected one of "
                             f"{[n for n in names if n != 'ids']}")
        a = getattr(self, name)
        t = torch.as_tensor(np.ascontiguousarray(a), device=device)
        return t.to(dtype) if t.is_floating_point() else t

    def to_events(self, dose_route, device=None, dtype: torch.dtype = torch.float64):
        """The :class:`nlmefit.pk.events.Events` of this panel. ``dose_route`` [N, D] int: 0 central, 1 depot
        (decided by the model, e.g. from ``dose_cmt``)."""
        route = torch.as_tensor(np.asarray(dose_route) if not torch.is_tensor(dose_route) else dose_route,
                                device=device).to(torch.int64)
        if tuple(route.shape) != tuple(self.dose_time.shape):
            raise DataError(f"dose_route has shape {tuple(route.shape)}; expected {tuple(self.dose_time.shape)} "
                            f"(subjects × doses)")
        t = lambda n: self.tensor(n, device=device, dtype=dtype)  # noqa: E731
        return Events(obs_time=t("obs_time"), obs_mask=t("obs_mask"), obs_seq=t("obs_seq"),
                      obs_epoch=t("obs_epoch"), dose_time=t("dose_time"), dose_amt=t("dose_amt"),
                      dose_rate=t("dose_rate"), dose_dur=t("dose_dur"), dose_ss=t("dose_ss"),
                      dose_ii=t("dose_ii"), dose_route=route, dose_mask=t("dose_mask"), dose_seq=t("dose_seq"),
                      dose_epoch=t("dose_epoch"))

    # ------------------------------------------------------------------ subsets and frames
    def subset(self, index) -> Panel:
        """The panel of a subset of subjects (by position: ints, a slice or a boolean mask), trimmed padding."""
        idx = np.arange(self.n_subjects)[index]
        idx = np.atleast_1d(idx).astype(np.int64)
        out = {}
        for name in self._array_names():
            out[name] = getattr(self, name)[idx]
        J = int(out["obs_mask"].sum(1).max()) if len(idx) else 0
        D = int(out["dose_mask"].sum(1).max()) if len(idx) else 0
        for name in _OBS_FIELDS:
            out[name] = out[name][:, :J]
        for name in _DOSE_FIELDS + ("dose_is_record",):
            out[name] = out[name][:, :D]
        keep_ids = pd.Series(self.ids[idx], dtype=object)
        id_col = self._records["ID"].astype(object)
        records = self._records[id_col.isin(keep_ids).to_numpy()]
        return replace(self, excluded_ids=(), _records=records, **out)

    def to_dataframe(self) -> pd.DataFrame:
        """One row per original record (ADDL doses not expanded), in the user's row order, with canonical
        column names, then the covariates; EVID and MDV are added (derived) when the data had none."""
        return self._records.copy()

    def observations_frame(self) -> pd.DataFrame:
        """Tidy observation records: ROW (positional index in the user's frame), ID, TIME, DV, CENS, DVID."""
        m = self.obs_mask
        ids = np.broadcast_to(np.asarray(self.ids, dtype=object)[:, None], m.shape)
        out = pd.DataFrame({"ROW": self.obs_row[m], "ID": ids[m], "TIME": self.obs_time[m], "DV": self.dv[m],
                            "CENS": self.cens[m].astype(np.int64), "DVID": self.obs_dvid[m]})
        try:
            out["ID"] = out["ID"].to_numpy().astype(np.asarray(self.ids).dtype)
        except (TypeError, ValueError):
            pass
        return out.sort_values("ROW", kind="stable").reset_index(drop=True)

    # ------------------------------------------------------------------ summaries
    def summary(self) -> dict:
        """Counts: subjects, observations, dose records and doses after ADDL, covariates, censored, occasions."""
        return {"subjects": self.n_subjects, "observations": self.n_obs, "dose_records": self.n_dose_records,
                "doses": self.n_doses, "covariates": list(self.covariate_names), "censored": self.n_censored,
                "occasions": int(self.n_occasions), "excluded_ids": list(self.excluded_ids)}

    def __repr__(self) -> str:
        s = self.summary()
        cov = ", ".join(s["covariates"]) if s["covariates"] else "none"
        ex = f", excluded {s['excluded_ids']}" if s["excluded_ids"] else ""
        return (f"Panel(subjects={s['subjects']}, observations={s['observations']}, doses={s['dose_records']} "
                f"records/{s['doses']} after ADDL, covariates=[{cov}], censored={s['censored']}, "
                f"occasions={s['occasions']}{ex})")

    def __len__(self) -> int:
        return self.n_subjects

    def _repr_html_(self) -> str:
        s = self.summary()
        lines = [f"{s['subjects']} subjects, {s['observations']} observations, {s['dose_records']} dose records "
                 f"({s['doses']} doses after ADDL), {s['censored']} censored, {s['occasions']} occasions",
                 "covariates: " + (", ".join(s["covariates"]) or "none")]
        if s["excluded_ids"]:
            lines.append(f"excluded IDs: {s['excluded_ids']}")
        return object_html("Panel", lines, [("records", self.to_dataframe())], max_rows=10)
