"""NONMEM-style output tables of a fit: ``sdtab``, ``patab``, ``cotab``, ``catab`` and the ``.ext`` file.

The files copy the layout NONMEM writes with ``$TABLE ... ONEHEADER NOPRINT NOAPPEND FILE=sdtab1`` and its
``run1.ext``, so that xpose, Pirana and existing R scripts read them unchanged (``read.table(f, header=TRUE,
skip=1)``; the reference files are in ``tests/results/nonmem_table_layout/``):

* tables: line 1 ``TABLE NO.  1``; line 2 the column names, each left-aligned after one blank in a field of 12
  characters; then one line per record, every value as `` 1.0000E+00`` in 12 characters (NaN as ``NaN``).
* ``.ext``: line 1 ``TABLE NO.     1: <method>: Goal Function=...: Problem=1 Subproblem=0 ...``; line 2
  ``ITERATION``, ``THETA1..``, ``SIGMA(i,j)..``, ``OMEGA(i,j)..`` (lower triangles, row by row), ``OBJ`` in fields
  of 13; the iteration number in 13 characters, values as ``  4.69555E-03`` in 13, OBJ with 17 significant digits
  in 22.

Files (``prefix`` before each name, ``run`` after it, e.g. ``sdtab1``, ``run1.ext``):

* ``sdtab``: ID TIME DV MDV EVID [AMT] PRED IPRED RES IRES WRES CWRES IWRES [CENS], one row per record of the
  fitted subjects in the user's data order. Records that are not fitted observations (doses, other events) have
  MDV=1, DV as given (missing → 0) and PRED … IWRES 0 (NONMEM writes 0 residuals there; nlmefit predicts only at
  observations, so PRED/IPRED are 0 too). Censored observations keep NaN residuals.
* ``patab``: ID TIME, the individual parameters upper-cased (``cl`` → CL), ETA1..ETAn in the order of the ETA_
  columns of ``individual_estimates`` (IIV η in the model's order, then IOV η by occasion); repeated on every record
  (NONMEM's default) or one row per subject with ``firstonly=True``.
* ``cotab`` / ``catab``: ID and the continuous / categorical covariates of the data, per record (text covariates
  as their level codes, missing values carried forward within the subject). A covariate is categorical when it has
  text levels (``panel.covariate_levels``) or all its values are integers with at most 10 distinct values
  (pheno: APGR, FA1, FA2 categorical; WGT continuous). ``firstonly`` applies to these two tables as well. A table
  with no covariate is not written.
* ``run.ext``: iteration 0 (the initial values; OBJ NaN: nlmefit does not evaluate it), the iterations of
  ``fit.traces`` (OBJ NaN) or, without traces, iteration ``n_iter`` (the estimates and OFV); then −1000000000 the
  estimates and OFV, −1000000001 standard errors (only when the covariance step succeeded), −1000000004 SDs and
  correlations, −1000000005 their standard errors (covariance step succeeded), −1000000006 fixed flags.
  −1000000007/−1000000008 (run status, gradients) are not written.
* ``run_names.csv``: ``kind, nlmefit, nonmem, table, note`` for every mapped name.

Parameter mapping: θ → THETA1.. in the model's θ order; σ (an SD) → SIGMA(k,k) = σ² in the order of the
``sigma_*`` estimates, off-diagonal SIGMA elements 0 and fixed; Ω (variances/covariances, nlmefit's natural scale)
→ OMEGA(i,j) over the ETA order above, elements nlmefit does not estimate (outside a block) 0 and fixed; for IOV
the block of occasion 1 holds ``omega_iov_*`` and later occasions repeat it (NONMEM's ``BLOCK SAME``, flagged
fixed). SE of σ² = 2σ·se(σ), SE of an SD = se(ω²)/(2ω), SE of a correlation by the delta method from the
covariance of the natural parameters; 1.0E+10 for a fixed element, as NONMEM writes. Tensor-valued weights have no
NONMEM counterpart and are left out. Non-numeric IDs are written as 1..N (mapping in the names file).
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from nlmefit._io import atomic_write as _atomic_write

__all__ = ["write_tables", "ext_columns", "MAX_CATEGORICAL_LEVELS"]

MAX_CATEGORICAL_LEVELS = 10  # integer-valued covariates with at most this many distinct values go to catab
_FIXED_SE = 1.0e10  # what NONMEM writes as the SE of a fixed element
_METHODS = {
    "fo": "First Order",
    "foce": "First Order Conditional Estimation",
    "focei": "First Order Conditional Estimation with Interaction",
    "laplace": "Laplacian Conditional Estimation",
    "saem": "Stochastic Approximation Expectation-Maximization",
    "nuts": "NUTS Bayesian Analysis",
}
_PRED_COLS = ("PRED", "IPRED", "RES", "IRES", "WRES", "CWRES", "IWRES")


# ---------------------------------------------------------------------- number formats
def _tab_value(v: float) -> str:
    """A table value in 12 characters: `` 1.0000E+00``, ``-6.7071E-01``."""
    v = float(v)
    if not math.isfinite(v):
        return " " + ("NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")).rjust(11)
    return " " + f"{v + 0.0:.4E}".rjust(11)  # + 0.0: no "-0.0000E+00"


def _ext_value(v: float) -> str:
    """An .ext value in 13 characters: ``  4.69555E-03``."""
    v = float(v)
    if not math.isfinite(v):
        return " " + ("NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")).rjust(12)
    return " " + f"{v + 0.0:.5E}".rjust(12)


def _obj_value(v: float) -> str:
    """OBJ in 22 characters with 17 significant digits: ``    586.27605628188053``."""
    v = float(v)
    if not math.isfinite(v):
        return " " + ("NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")).rjust(21)
    if v == 0:
        return " " + "0.0000000000000000".rjust(21)
    digits = math.floor(math.log10(abs(v))) + 1
    s = f"{v:.16E}" if digits > 17 else f"{v:.{17 - max(digits, 1)}f}"
    return " " + s.rjust(21)


def _table_text(number: int, frame: pd.DataFrame) -> str:
    head = "".join(" " + str(c).ljust(11) for c in frame.columns).rstrip()
    values = frame.to_numpy(dtype=float)
    body = ["".join(_tab_value(v) for v in row) for row in values]
    return "\n".join([f"TABLE NO.{number:3d}", head, *body]) + "\n"


# ---------------------------------------------------------------------- names
def _label(name: str) -> str:
    """A NONMEM-ish column label: upper case, letters, digits and _ only."""
    return re.sub(r"[^A-Za-z0-9_]", "_", str(name)).upper() or "X"


def _unique(labels: list[str], taken: set[str]) -> list[str]:
    out = []
    for lab in labels:
        new, k = lab, 1
        while new in taken:
            new, k = f"{lab}_{k}", k + 1
        taken.add(new)
        out.append(new)
    return out


def _eta_labels(fit) -> list[str]:
    ie = fit.individual_estimates
    if ie is not None and any(str(c).startswith("ETA_") for c in ie.columns):
        return [str(c)[4:] for c in ie.columns if str(c).startswith("ETA_")]
    return list(fit.eta_names)


def _theta_names(fit) -> list[str]:
    if fit.model is not None and hasattr(getattr(fit.model, "parameters", None), "theta"):
        return [n for n in fit.model.parameters.theta if n in fit.estimates.index]
    weights = set(fit.weights or {})
    return [n for n in fit.estimates.index
            if not str(n).startswith(("omega_", "sigma_")) and "[" not in str(n) and n not in weights]


def ext_columns(fit) -> pd.DataFrame:
    """The .ext parameter columns: one row per column with ``nonmem`` (THETA1, SIGMA(1,1), OMEGA(2,1) …),
    ``kind`` (THETA/SIGMA/OMEGA), ``nlmefit`` (the estimate's name, "" for an element nlmefit does not estimate),
    ``i``, ``j``, ``same`` (an IOV block of a later occasion) and ``fixed`` (1 fixed or not estimated, else 0)."""
    est, fixed = fit.estimates, set(fit.fixed)
    rows = []
    for k, n in enumerate(_theta_names(fit), 1):
        rows.append(dict(nonmem=f"THETA{k}", kind="THETA", nlmefit=n, i=k, j=k, same=False, fixed=int(n in fixed)))
    sig = [n for n in est.index if str(n).startswith("sigma_")]
    for a in range(1, len(sig) + 1):
        for b in range(1, a + 1):
            n = sig[a - 1] if a == b else ""
            rows.append(dict(nonmem=f"SIGMA({a},{b})", kind="SIGMA", nlmefit=n, i=a, j=b, same=False,
                             fixed=int(a != b or n in fixed)))
    labels = _eta_labels(fit)
    iov = {}
    for lab in labels:
        m = re.fullmatch(r"(.+)_occ(\d+)", lab)
        if m and lab not in fit.eta_names:
            iov[lab] = (m.group(1), int(m.group(2)))

    def source(a: str, b: str) -> tuple[str, bool]:
        """(estimate name or "", SAME block) of the Ω element of η labels a (row) and b (column)."""
        if a not in iov and b not in iov:
            cands = [f"omega_{a}"] if a == b else [f"omega_{b}_{a}", f"omega_{a}_{b}"]
            return next((c for c in cands if c in est.index), ""), False
        if a in iov and b in iov and iov[a][1] == iov[b][1]:
            na, nb = iov[a][0], iov[b][0]
            cands = [f"omega_iov_{na}"] if a == b else [f"omega_iov_{nb}_{na}", f"omega_iov_{na}_{nb}"]
            return next((c for c in cands if c in est.index), ""), iov[a][1] > 1
        return "", False

    for a in range(1, len(labels) + 1):
        for b in range(1, a + 1):
            n, same = source(labels[a - 1], labels[b - 1])
            rows.append(dict(nonmem=f"OMEGA({a},{b})", kind="OMEGA", nlmefit=n, i=a, j=b, same=same,
                             fixed=int(not n or same or n in fixed)))
    return pd.DataFrame(rows, columns=["nonmem", "kind", "nlmefit", "i", "j", "same", "fixed"])


# ---------------------------------------------------------------------- .ext
def _ext_values(cols: pd.DataFrame, values) -> list[float]:
    """The .ext row of natural-scale ``values`` (a mapping name → value; σ squared)."""
    out = []
    for c in cols.itertuples():
        v = float(values.get(c.nlmefit, np.nan)) if c.nlmefit else 0.0
        out.append(v * v if c.kind == "SIGMA" and c.nlmefit else v)
    return out


def _sd_corr(cols: pd.DataFrame, est: pd.Series) -> list[float]:
    """−1000000004: θ 0, SDs on the diagonals, correlations off them."""
    diag = {(c.kind, c.i): float(est.get(c.nlmefit, np.nan)) for c in cols.itertuples() if c.i == c.j and c.nlmefit}
    out = []
    for c in cols.itertuples():
        v = float(est.get(c.nlmefit, np.nan)) if c.nlmefit else 0.0
        if c.kind == "THETA":
            out.append(0.0)
        elif c.kind == "SIGMA":
            out.append(v if c.i == c.j else 0.0)
        elif c.i == c.j:
            out.append(math.sqrt(v) if v >= 0 else np.nan)
        else:
            den = diag.get(("OMEGA", c.i), np.nan) * diag.get(("OMEGA", c.j), np.nan)
            out.append(v / math.sqrt(den) if den > 0 else 0.0)
    return out


def _se_rows(fit, cols: pd.DataFrame) -> tuple[list[float], list[float]]:
    """−1000000001 (SEs of the .ext values) and −1000000005 (SEs of the SDs and correlations)."""
    est, se = fit.estimates, fit.se
    cov = fit.covariance
    diag_name = {(c.kind, c.i): c.nlmefit for c in cols.itertuples() if c.i == c.j}
    se1, se5 = [], []
    for c in cols.itertuples():
        if c.fixed:
            se1.append(_FIXED_SE)
            se5.append(0.0 if c.kind == "THETA" else _FIXED_SE)
            continue
        v, s = float(est[c.nlmefit]), float(se.get(c.nlmefit, np.nan))
        if c.kind == "THETA":
            se1.append(s)
            se5.append(0.0)
        elif c.kind == "SIGMA":
            se1.append(2 * abs(v) * s)
            se5.append(s)
        elif c.i == c.j:
            se1.append(s)
            se5.append(s / (2 * math.sqrt(v)) if v > 0 else np.nan)
        else:
            se1.append(s)
            names = [diag_name.get(("OMEGA", c.i), ""), diag_name.get(("OMEGA", c.j), ""), c.nlmefit]
            a, b = (float(est.get(n, np.nan)) for n in names[:2])
            r = v / math.sqrt(a * b) if a > 0 and b > 0 else np.nan
            g = np.array([-r / (2 * a), -r / (2 * b), 1 / math.sqrt(a * b)]) if np.isfinite(r) else None
            if g is None or cov is None:
                se5.append(np.nan)
                continue
            idx = [k for k, n in enumerate(names) if n in cov.index]
            sub = cov.loc[[names[k] for k in idx], [names[k] for k in idx]].to_numpy(float)
            var = float(g[idx] @ sub @ g[idx])
            se5.append(math.sqrt(var) if var >= 0 else np.nan)
    return se1, se5


def _ext_text(fit, cols: pd.DataFrame) -> str:
    method = _METHODS.get(fit.method, f"nlmefit {fit.method.upper()}")
    goal = ("FINAL VALUE OF LIKELIHOOD FUNCTION" if fit.method == "saem" else "MINIMUM VALUE OF OBJECTIVE FUNCTION")
    lines = [f"TABLE NO.{1:6d}: {method}: Goal Function={goal}: Problem=1 Subproblem=0 Superproblem1=0 "
             f"Iteration1=0 Superproblem2=0 Iteration2=0",
             (" ITERATION".ljust(13) + "".join((" " + n).ljust(13) for n in cols["nonmem"]) + " OBJ").rstrip()]
    est = fit.estimates

    def row(it: int, vals: list[float], obj: float) -> str:
        return f"{it:13d}" + "".join(_ext_value(v) for v in vals) + _obj_value(obj)

    init = dict((fit.initial or {}).get("values") or {})
    iters: list[tuple[int, dict, float]] = []
    if init:
        iters.append((0, {**est.to_dict(), **init}, np.nan))
    tr = fit.traces
    if tr is not None and len(tr):
        for it, r in tr.iterrows():
            it = int(it)
            iters = [x for x in iters if x[0] != it]
            obj = float(r["ofv"]) if "ofv" in tr.columns else np.nan
            iters.append((it, {**est.to_dict(), **r.to_dict()}, obj))
    else:
        iters = [x for x in iters if x[0] != int(fit.n_iter)]
        iters.append((int(fit.n_iter), est.to_dict(), fit.ofv))
    for it, vals, obj in iters:
        lines.append(row(it, _ext_values(cols, vals), obj))
    lines.append(row(-1000000000, _ext_values(cols, est), fit.ofv))
    ok = fit.covariance_ok and fit.covariance is not None
    se1, se5 = _se_rows(fit, cols) if ok else ([], [])
    if ok:
        lines.append(row(-1000000001, se1, 0.0))
    lines.append(row(-1000000004, _sd_corr(cols, est), 0.0))
    if ok:
        lines.append(row(-1000000005, se5, 0.0))
    lines.append(row(-1000000006, [float(f) for f in cols["fixed"]], 0.0))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- record tables
def _id_codes(ids) -> tuple[dict, bool]:
    """{original ID: numeric ID} (1..N when the IDs are not numbers) and whether they were recoded."""
    ids = list(pd.unique(pd.Series(list(ids), dtype=object)))
    num = pd.to_numeric(pd.Series(ids, dtype=object), errors="coerce")
    if num.notna().all():
        return dict(zip(ids, num.astype(float))), False
    return {v: float(k) for k, v in enumerate(ids, 1)}, True


def _records(fit) -> tuple[pd.DataFrame, np.ndarray]:
    """The fitted subjects' records in the user's order with the row's index into ``predictions`` (−1 for records
    that are not fitted observations); without bound data, the observations alone."""
    pred = fit.predictions.reset_index(drop=True)
    panel = getattr(getattr(fit, "data", None), "panel", None)
    if panel is None:
        return pred[["ID", "TIME", "DV"]].assign(EVID=0), np.arange(len(pred))
    rec = panel.to_dataframe()
    rows = pred["ROW"].to_numpy(dtype=np.int64)
    for key in (np.arange(len(rec)), rec.index.to_numpy()):  # positional (ROW) or, for a subset panel, the labels
        if len(set(key)) != len(key) or not set(rows) <= set(key):
            continue
        pos = pd.Series(np.arange(len(rec)), index=key)
        at = pos.loc[rows].to_numpy()
        t = pd.to_numeric(rec["TIME"].iloc[at], errors="coerce").to_numpy(float)
        if np.allclose(t, pred["TIME"].to_numpy(float), equal_nan=True):
            break
    else:  # the records do not line up with the predictions: the observations alone
        return pred[["ID", "TIME", "DV"]].assign(EVID=0), np.arange(len(pred))
    link = np.full(len(rec), -1, dtype=np.int64)
    link[at] = np.arange(len(pred))
    keep = pd.Series(rec["ID"].to_numpy(), dtype=object).isin(list(panel.ids)).to_numpy()
    return rec.iloc[np.flatnonzero(keep)].reset_index(drop=True), link[keep]


def _sdtab(fit, rec: pd.DataFrame, link: np.ndarray, idmap: dict) -> pd.DataFrame:
    pred = fit.predictions.reset_index(drop=True)
    obs = link >= 0
    out = pd.DataFrame({"ID": [idmap[v] for v in rec["ID"]]})
    out["TIME"] = pd.to_numeric(rec["TIME"], errors="coerce").to_numpy(float)
    dv = (pd.to_numeric(rec["DV"], errors="coerce").fillna(0.0).to_numpy(float, copy=True) if "DV" in rec
          else np.zeros(len(rec)))
    dv[obs] = pred["DV"].to_numpy(float)[link[obs]]
    out["DV"] = dv
    out["MDV"] = (~obs).astype(float)
    out["EVID"] = pd.to_numeric(rec["EVID"], errors="coerce").fillna(0.0).to_numpy(float)
    if "AMT" in rec:
        out["AMT"] = pd.to_numeric(rec["AMT"], errors="coerce").fillna(0.0).to_numpy(float)
    for c in _PRED_COLS:
        col = np.zeros(len(rec))
        if c in pred:
            col[obs] = pred[c].to_numpy(float)[link[obs]]
        out[c] = col
    if "CENS" in pred and (pred["CENS"].fillna(0) != 0).any():
        cens = np.zeros(len(rec))
        cens[obs] = pred["CENS"].to_numpy(float)[link[obs]]
        out["CENS"] = cens
    return out


def _firstonly(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop_duplicates("ID", keep="first").reset_index(drop=True)


def _patab(fit, ids: pd.Series, time: np.ndarray, idmap: dict) -> tuple[pd.DataFrame, list[tuple]] | None:
    ie = fit.individual_estimates
    if ie is None or "ID" not in ie:
        return None
    eta = [c for c in ie.columns if str(c).startswith("ETA_")]
    params = [c for c in ie.columns if c != "ID" and not str(c).startswith(("ETA_", "POSTMEAN_", "POSTSD_"))]
    labels = _unique([_label(p) for p in params], {"ID", "TIME"} | {f"ETA{k}" for k in range(1, len(eta) + 1)})
    by_id = {idmap.get(v, v): k for k, v in enumerate(ie["ID"])}
    where = np.array([by_id.get(v, -1) for v in ids])
    out = pd.DataFrame({"ID": ids.to_numpy(float), "TIME": time})
    names = []
    for col, lab in [*zip(params, labels), *((c, f"ETA{k}") for k, c in enumerate(eta, 1))]:
        vals = ie[col].to_numpy(float)
        out[lab] = np.where(where >= 0, vals[np.clip(where, 0, None)], np.nan)
        names.append(("ETA" if lab.startswith("ETA") and col in eta else "PARAM", str(col), lab, "patab"))
    return out, names


def _covariate_tables(panel, rec: pd.DataFrame, ids: pd.Series) -> tuple[pd.DataFrame, pd.DataFrame, list[tuple]]:
    cont, cat = pd.DataFrame({"ID": ids.to_numpy(float)}), pd.DataFrame({"ID": ids.to_numpy(float)})
    names: list[tuple] = []
    levels = dict(panel.covariate_levels or {})
    taken = {"ID"}
    for name in panel.covariate_names:
        if name not in rec:
            continue
        raw = rec[name]
        if name in levels:
            vals = raw.map(lambda v, lv=levels[name]: lv.get(str(v).strip(), np.nan) if pd.notna(v) else np.nan)
        else:
            vals = pd.to_numeric(raw, errors="coerce")
        vals = pd.Series(vals.to_numpy(float)).groupby(ids.to_numpy()).transform(lambda s: s.ffill().bfill())
        present = vals.dropna().to_numpy(float)
        categorical = name in levels or (len(present) > 0 and np.all(present == np.round(present))
                                         and len(np.unique(present)) <= MAX_CATEGORICAL_LEVELS)
        lab = _unique([re.sub(r"[^A-Za-z0-9_]", "_", str(name)) or "X"], taken)[0]
        (cat if categorical else cont)[lab] = vals.to_numpy(float)
        table = "catab" if categorical else "cotab"
        names.append(("COVARIATE", str(name), lab, table))
        for level, code in levels.get(name, {}).items():
            names.append(("LEVEL", f"{name}={level}", f"{lab}={code}", table))
    return cont, cat, names


# ---------------------------------------------------------------------- entry point
def write_tables(fit, out_dir: str | os.PathLike, *, run: int | str = 1, prefix: str = "",
                 firstonly: bool = False) -> list[Path]:
    """Write ``sdtab``, ``patab``, ``cotab``, ``catab`` (when the data has such covariates), ``run.ext`` and
    ``run_names.csv`` for ``fit`` into ``out_dir`` (created), each atomically; returns the paths written.
    ``run`` is appended to each name (``sdtab1``, ``run1.ext``; ``run="001"`` gives ``sdtab001``), ``prefix``
    prepended; ``firstonly`` writes one row per subject in patab/cotab/catab (NONMEM's FIRSTONLY)."""
    if fit.predictions is None:
        raise ValueError("this fit has no predictions table: nothing to write in sdtab")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def put(name: str, text: str) -> None:
        path = out / f"{prefix}{name}"
        _atomic_write(str(path), lambda fh: fh.write(text))
        written.append(path)

    rec, link = _records(fit)
    idmap, recoded = _id_codes(rec["ID"])
    names: list[tuple] = [("ID", str(k), f"{v:g}", f"{prefix}sdtab{run}", "non-numeric ID written as a number")
                          for k, v in idmap.items()] if recoded else []
    sd = _sdtab(fit, rec, link, idmap)
    put(f"sdtab{run}", _table_text(1, sd))
    pa = _patab(fit, sd["ID"], sd["TIME"].to_numpy(float), idmap)
    if pa is not None:
        frame, pnames = pa
        put(f"patab{run}", _table_text(2, _firstonly(frame) if firstonly else frame))
        names += [(*n[:3], f"{prefix}patab{run}", "") for n in pnames]
    panel = getattr(getattr(fit, "data", None), "panel", None)
    if panel is not None and panel.covariate_names:
        cont, cat, cnames = _covariate_tables(panel, rec, sd["ID"])
        for number, name, frame in ((3, "cotab", cont), (4, "catab", cat)):
            if frame.shape[1] > 1:
                put(f"{name}{run}", _table_text(number, _firstonly(frame) if firstonly else frame))
        names += [(*n[:3], f"{prefix}{n[3]}{run}", "categorical: text, or integers with at most "
                   f"{MAX_CATEGORICAL_LEVELS} levels" if n[3] == "catab" and n[0] == "COVARIATE" else "")
                  for n in cnames]
    cols = ext_columns(fit)
    put(f"run{run}.ext", _ext_text(fit, cols))
    for c in cols.itertuples():
        note = ("IOV of a later occasion: the same as occasion 1 (BLOCK SAME)" if c.same
                else "not estimated: 0, fixed" if not c.nlmefit
                else "; ".join(x for x in ("variance: the square of the SD estimate" if c.kind == "SIGMA" else "",
                                           "fixed" if c.fixed else "") if x))
        names.append((c.kind, c.nlmefit, c.nonmem, f"{prefix}run{run}.ext", note))
    frame = pd.DataFrame(names, columns=["kind", "nlmefit", "nonmem", "table", "note"])
    path = out / f"{prefix}run{run}_names.csv"
    _atomic_write(str(path), lambda fh: frame.to_csv(fh, index=False))
    written.append(path)
    return written
