"""Model predictions on a fine time grid: smooth PRED/IPRED curves through each subject's own dosing history.

:func:`predict_on_grid` is the building block: dose (and other non-observation) records + grid times + η →
predictions on the DV scale, for every subject in one batched ``prepare`` + ``predict``. :func:`grid_predictions`
applies it to a fit: each subject's own records, a grid from 0 to its last observation, η = 0 (PRED) and η = η̂
(IPRED).

Records are turned into a NONMEM-style frame and go through :class:`~nlmefit.panel.Panel`, so ADDL/II, SS,
infusions, resets, occasions and time-varying covariates (last value carried forward) follow exactly the rules
used in estimation. Observation records of the input become EVID 2 records (they keep their covariates and
occasion, carry no observation); the grid points are new observation records placed after every record at the
same time (a bolus given at time t is included in the prediction at t; an ADDL-implied dose at t is not, as in
NONMEM).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from nlmefit.models.parameters import Params
from nlmefit.panel import Panel
from nlmefit.panel.columns import resolve_columns

__all__ = ["grid_predictions", "predict_on_grid", "time_grid"]

_NO_GRID = ("DV", "CENS", "LIMIT", "LLOQ")  # columns that mean nothing on a prediction record
_ZERO = ("AMT", "RATE", "DUR", "II", "ADDL", "SS")


def _canonical(df: pd.DataFrame) -> pd.DataFrame:
    """A copy with canonical (upper-case NONMEM) names for the columns that spell one."""
    cols = resolve_columns(df)
    return df.rename(columns={u: c for c, u in cols.items()}).reset_index(drop=True)


def _params(model, params):
    if isinstance(params, Params):
        return params
    return model.parameters.params_from_dict({k: float(v) for k, v in dict(params).items()})


def _covariate_frame(covariates: pd.DataFrame) -> pd.DataFrame:
    cov = covariates
    if "ID" not in map(str, cov.columns) and str(cov.index.name).upper() == "ID":
        cov = cov.reset_index()
    cov = _canonical(cov)
    if "ID" not in cov.columns:
        raise ValueError("covariates: expected an ID column (or an index named ID), one row per subject, or ID and "
                         "TIME columns for time-varying values")
    return cov


def _resolve_ids(ids, rec: pd.DataFrame, times, cov: pd.DataFrame | None, n_eta: int | None) -> list:
    if ids is not None:
        return list(ids)
    found: list = []
    if "ID" in rec.columns:
        found += list(pd.unique(rec["ID"]))
    if isinstance(times, Mapping):
        found += list(times)
    if cov is not None:
        found += list(pd.unique(cov["ID"]))
    found = list(pd.unique(pd.Series(found, dtype=object))) if found else []
    if found:
        return found
    return list(range(1, (n_eta or 1) + 1))


def _eta_sets(eta) -> tuple[list[str], list, bool]:
    """(column names, η per column [N, q] | None | DataFrame, long-format flag)."""
    if eta is None:
        return ["PRED"], [None], False
    if isinstance(eta, Mapping):
        return [str(k) for k in eta], list(eta.values()), False
    if isinstance(eta, pd.DataFrame):
        return ["IPRED"], [eta], False
    e = torch.as_tensor(eta, dtype=torch.float64)
    if e.dim() == 3:
        return ["IPRED"] * e.shape[0], list(e), True
    return ["IPRED"], [e], False


def _eta_tensor(e, n: int, q: int, ids: list, order: np.ndarray) -> torch.Tensor:
    """One η set as a [N, q] tensor in panel order (rows of ``e`` follow ``ids``; a DataFrame is matched by ID,
    its ETA_ columns in order; IDs it lacks get NaN)."""
    if e is None:
        return torch.zeros(n, q, dtype=torch.float64)
    if isinstance(e, pd.DataFrame):
        cols = [c for c in e.columns if str(c).startswith("ETA_")]
        if len(cols) != q:
            raise ValueError(f"eta: the table has {len(cols)} ETA_ columns, the model needs {q} random effects")
        vals = e.drop_duplicates("ID").set_index("ID")[cols].reindex(ids).to_numpy(float)
        return torch.as_tensor(vals[order], dtype=torch.float64)
    t = torch.as_tensor(e, dtype=torch.float64).detach().cpu()
    if t.dim() != 2 or t.shape != (n, q):
        raise ValueError(f"eta: expected shape [{n}, {q}] (subjects in the order of `ids` × random effects), "
                         f"got {list(t.shape)}")
    return t[torch.as_tensor(order)]


def predict_on_grid(
    model,
    params,
    dose_records: pd.DataFrame | None,
    times: np.ndarray | Sequence[float] | Mapping[object, np.ndarray],
    eta: torch.Tensor | np.ndarray | pd.DataFrame | Mapping[str, object] | None = None,
    covariates: pd.DataFrame | None = None,
    *,
    ids: Sequence | None = None,
    obs_cmt: int | None = None,
) -> pd.DataFrame:
    """Predictions (DV scale) at ``times`` for subjects given by their dose records, in one batched call.

    ``params``: :class:`~nlmefit.models.parameters.Params` or ``{reporting name: value}`` (``fit.estimates``).
    ``dose_records``: NONMEM-style records (AMT, EVID, CMT, RATE/DUR, II, ADDL, SS ...). Without an ID column
    they are every subject's regimen. EVID 0 rows become EVID 2 (covariates kept, no observation).
    ``times``: one array for every subject, or ``{ID: array}``; duplicates are dropped, times sorted.
    ``eta``: ``None`` (column PRED, η = 0), a ``[N, q]`` tensor/array (column IPRED; rows follow the subject order
    below), a ``[S, N, q]`` tensor (long format: SAMPLE and IPRED), a DataFrame with ID and ETA_ columns (matched
    by ID; missing IDs give NaN), or ``{column: any of those 2-D forms}`` for several columns at once.
    ``covariates``: by ID (an ID column or index); with a TIME column the values are time-varying (carried
    forward); its columns replace same-named columns of ``dose_records``.
    ``ids``: the subjects and their order; default: first appearance in ``dose_records``, then the keys of
    ``times``, then ``covariates`` (else 1..N from ``eta``). ``obs_cmt``: CMT of the prediction records when
    ``dose_records`` has a CMT column (default: the observations' most common CMT, else 2 for oral models, 1
    otherwise).
    Returns ID, TIME (and SAMPLE), then one column per η set.
    """
    p = _params(model, params)
    rec = _canonical(dose_records) if dose_records is not None else pd.DataFrame({"TIME": []})
    cov = _covariate_frame(covariates) if covariates is not None else None
    n_eta = None
    if eta is not None and not isinstance(eta, (Mapping, pd.DataFrame)):
        n_eta = int(torch.as_tensor(eta).shape[-2])
    id_list = _resolve_ids(ids, rec, times, cov, n_eta)
    code = {v: k for k, v in enumerate(id_list)}
    # ---- records: doses etc. (per subject, or shared by all when there is no ID column)
    if "ID" not in rec.columns:
        rec = pd.concat([rec.assign(ID=i) for i in id_list], ignore_index=True) if len(rec) else \
            pd.DataFrame({"ID": [], "TIME": []})
    rec = rec[rec["ID"].isin(id_list)].copy()
    if "EVID" not in rec.columns:
        amt = pd.to_numeric(rec.get("AMT", pd.Series(0.0, index=rec.index)), errors="coerce").fillna(0.0)
        rec["EVID"] = np.where(amt > 0, 1, 2)
    obs_rows = rec["EVID"].astype(float).to_numpy() == 0
    if obs_cmt is None and "CMT" in rec.columns:
        c = pd.to_numeric(rec.loc[obs_rows, "CMT"], errors="coerce").dropna()
        obs_cmt = int(c.mode().iloc[0]) if len(c) else (2 if model.structure.oral else 1)
    dvid = model.dvid
    if dvid is None and "DVID" in rec.columns and obs_rows.any():
        dvid = rec.loc[obs_rows, "DVID"].mode().iloc[0]
    rec.loc[obs_rows, "EVID"] = 2
    rec = rec.drop(columns=[c for c in _NO_GRID if c in rec.columns])
    rec["MDV"] = 1
    rec = rec.drop_duplicates()  # converted observation records may repeat each other
    parts = [rec.assign(_KIND=1)]
    base_cov = None
    # ---- covariates
    if cov is not None:
        names = [c for c in cov.columns if c not in ("ID", "TIME")]
        parts[0] = parts[0].drop(columns=[c for c in names if c in parts[0].columns])
        cov = cov[cov["ID"].isin(id_list)]
        if "TIME" in cov.columns:
            parts.append(cov.assign(EVID=2, MDV=1, _KIND=0))
        else:
            base_cov = cov.drop_duplicates("ID").set_index("ID")[names]
            parts[0] = parts[0].join(base_cov, on="ID")
    # ---- the grid
    rows = []
    for i in id_list:
        t = times.get(i, ()) if isinstance(times, Mapping) else times
        t = np.unique(np.asarray(t, dtype=float))
        rows.append(pd.DataFrame({"ID": [i] * len(t), "TIME": t}))
    grid = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame({"ID": [], "TIME": []})
    grid = grid.assign(EVID=0, MDV=0, AMT=0.0, _KIND=2)
    if "CMT" in rec.columns:  # (without one, the model routes every dose by itself)
        grid["CMT"] = obs_cmt
    if dvid is not None:
        grid["DVID"] = dvid
    if base_cov is not None:
        grid = grid.join(base_cov, on="ID")
    parts.append(grid)
    frame = pd.concat(parts, ignore_index=True)
    for c in _ZERO:
        if c in frame.columns:
            frame[c] = pd.to_numeric(frame[c], errors="coerce").fillna(0.0)
    frame["DV"] = np.nan
    frame["_ORD"] = np.arange(len(frame))
    frame["_SUBJ"] = frame["ID"].map(code)
    frame = frame.sort_values(["_SUBJ", "TIME", "_KIND", "_ORD"], kind="stable")
    frame = frame.drop(columns=["_SUBJ", "_KIND", "_ORD"]).reset_index(drop=True)
    # ---- one prepare + one predict for every subject and every η set
    panel = Panel.from_dataframe(frame, require_dv=False)
    data = model.prepare(panel, check_likelihood=False)
    n, q = data.n_subjects, data.q
    pos = {v: k for k, v in enumerate(id_list)}
    order = np.array([pos[v] for v in panel.ids.tolist()], dtype=np.int64)
    panel_ids = [id_list[k] for k in order]
    names, sets, long = _eta_sets(eta)
    stack = torch.stack([_eta_tensor(e, n, q, id_list, order) for e in sets])  # [S, N, q]
    unknown = torch.isnan(stack).any(-1)  # [S, N]: predicted at η = 0 (an ODE batch must stay finite), then NaN
    with torch.no_grad():
        f, _ = model.predict(p, torch.nan_to_num(stack), data)
        conc = model.error.untransform(f).cpu().numpy()  # [S, N, J]
    conc[unknown.numpy()] = np.nan
    m = panel.obs_mask
    id_arr = np.empty(m.shape, dtype=object)
    id_arr[:] = np.asarray(panel_ids, dtype=object)[:, None]
    base = pd.DataFrame({"ID": id_arr[m], "TIME": panel.obs_time[m]})
    try:
        base["ID"] = base["ID"].to_numpy().astype(np.asarray(panel.ids).dtype)
    except (TypeError, ValueError):
        pass
    if long:
        out = pd.concat([base.assign(SAMPLE=s, IPRED=conc[s][m]) for s in range(len(sets))], ignore_index=True)
        return out
    out = base
    for k, name in enumerate(names):
        out[name] = conc[k][m]
    return out


def time_grid(end: float, n_points: int = 200, dose_times: np.ndarray | None = None, start: float = 0.0) -> np.ndarray:
    """``n_points`` equally spaced times on [start, end], plus, for each dose time inside, the points just before
    and just after it (so jumps at a bolus and kinks at an infusion end are drawn sharply)."""
    end = max(float(end), start)
    t = np.linspace(start, end, max(int(n_points), 2))
    if dose_times is not None and len(dose_times):
        d = np.asarray(dose_times, float)
        d = d[(d >= start) & (d <= end)]
        eps = 1e-6 * max(end - start, 1.0)
        t = np.concatenate([t, d, d + eps, np.clip(d - eps, start, None)])
    return np.unique(t[t <= end])


def grid_predictions(
    fit,
    n_points: int = 200,
    ids: Sequence | None = None,
    data=None,
    *,
    times: np.ndarray | Mapping[object, np.ndarray] | None = None,
) -> pd.DataFrame:
    """PRED (η = 0) and IPRED (η = η̂) of a fit on a fine time grid, each subject with its own dosing history.

    ``ids``: subjects (default all). ``data``: a DataFrame or Panel of records to use instead of the fitted data
    (η̂ is matched by ID; subjects the fit does not know get IPRED NaN). ``times``: explicit times (one array,
    or ``{ID: array}``) instead of the default grid of ``n_points`` from 0 to each subject's last observation
    (plus points around each dose). Returns ID, TIME, PRED, IPRED (DV scale).
    """
    panel = fit.data.panel if data is None else data
    if not isinstance(panel, Panel):
        panel = Panel.from_dataframe(panel, sort=True, require_dv=False)
    all_ids = list(np.asarray(panel.ids).tolist())
    id_list = all_ids if ids is None else list(ids)
    known = set(all_ids)
    unknown = [i for i in id_list if i not in known]
    if unknown:
        raise ValueError(f"ids {unknown[:5]} are not subjects of the data (IDs: {all_ids[:10]}...)")
    rec = panel.to_dataframe()
    rec = rec[rec["ID"].isin(id_list)]
    if times is None:
        index = {v: k for k, v in enumerate(all_ids)}
        times = {}
        for i in id_list:
            k = index[i]
            om = panel.obs_mask[k]
            end = float(panel.obs_time[k][om].max()) if om.any() else float(panel.dose_time[k].max(initial=0.0))
            times[i] = time_grid(end, n_points, panel.dose_time[k][panel.dose_mask[k]])
    eta_hat = fit.individual_estimates[["ID"] + [c for c in fit.individual_estimates.columns
                                                 if str(c).startswith("ETA_")]]
    p = fit.population_parameters()
    return predict_on_grid(fit.model, p, rec, times, eta={"PRED": None, "IPRED": eta_hat}, ids=id_list)
