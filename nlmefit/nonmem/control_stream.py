"""``nlmefit.from_nonmem("run1.mod")``: a NONMEM control stream as a model, its data and its estimation settings.

pharmpy-core (the optional extra ``pip install "nlmefit[nonmem]"``) parses the control stream and reads ``$DATA``
with ``$INPUT`` (renames, ``DROP``) and ``IGNORE``/``ACCEPT`` applied; :mod:`nlmefit.nonmem.translate` turns the
statements into a :class:`~nlmefit.models.Model`. ``$ESTIMATION`` becomes a method and options:

=====================================  ====================================================
NONMEM                                 nlmefit
=====================================  ====================================================
``METHOD=0`` (FO)                      ``method="fo"``
``METHOD=1`` / ``METHOD=COND``         ``"foce"``; with ``INTERACTION``: ``"focei"``
``METHOD=1 LAPLACE [INTER]``           ``"laplace"``
``METHOD=SAEM NBURN= NITER=``          ``"saem"`` with ``n_explore=NBURN``, ``n_smooth=NITER``
``METHOD=IMP EONLY=1 ISAMPLE=``        ``compute_loglik="is"``, ``n_samples=ISAMPLE`` (after another step)
``$COVARIANCE`` (``MATRIX=R``/``S``)   ``covariance="sandwich"`` (``"r"``/``"s"``); none without ``$COV``
``MAXEVAL=0``                          ``maxiter=0``: the objective at the initial estimates
=====================================  ====================================================

``METHOD=IMP``/``ITS``/``BAYES`` as estimation steps are refused (use SAEM, then IMP EONLY=1, or ``method="nuts"``).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import pandas as pd

from nlmefit.api import fit as _fit
from nlmefit.errors import ModelSpecError
from nlmefit.models import Model
from nlmefit.nonmem.translate import translate

__all__ = ["NonmemRun", "from_nonmem", "estimation_settings"]


@dataclass
class NonmemRun:
    """A translated control stream: ``model``, ``data`` (the records NONMEM would read), ``method`` and
    ``options`` for :func:`nlmefit.fit`, and ``names`` (``THETA(1)`` → ``pop_cl``, ``OMEGA(2,1)`` → ...).

    ``run.fit()`` fits it as the control stream says; keywords override (``run.fit(method="saem")``)."""

    path: str
    problem: str
    model: Model
    data: pd.DataFrame
    method: str
    options: dict = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)
    scale: dict[str, tuple[float, int]] = field(default_factory=dict)

    def fit(self, **overrides):
        """:func:`nlmefit.fit` with the control stream's method and options (``overrides`` win)."""
        opts = dict(self.options)
        opts.update(overrides)
        method = opts.pop("method", self.method)
        return _fit(self.model, self.data, method=method, **opts)

    def nonmem_estimates(self, result) -> pd.Series:
        """``result``'s estimates under NONMEM's names and scales (SIGMA as a variance), ordered THETA, OMEGA,
        SIGMA; fixed parameters at their fixed values."""
        est = result.estimates if hasattr(result, "estimates") else result
        values = dict(est)
        out = {}
        for nm, ours in self.names.items():
            if ours not in values:
                value = self._fixed_value(ours)
                if value is None:
                    continue
            else:
                value = float(values[ours])
            if nm in self.scale:
                c, power = self.scale[nm]
                value = c * value ** power
            out[nm] = value
        order = {"THETA": 0, "OMEGA": 1, "SIGMA": 2}
        keys = sorted(out, key=lambda k: (order.get(k.split("(")[0], 3),
                                          tuple(int(x) for x in k[k.index("(") + 1:-1].split(",")) if "(" in k else ()))
        return pd.Series({k: out[k] for k in keys}, dtype=float)

    def _fixed_value(self, ours: str) -> float | None:
        ps = self.model.parameters
        if ours in ps.theta and ps.theta[ours].fixed:
            return float(ps.theta[ours].init)
        if ours.startswith("sigma_") and ours[6:] in ps.sigma and ps.sigma[ours[6:]].fixed:
            return float(ps.sigma[ours[6:]].init)
        return None

    def __repr__(self) -> str:
        return (f"NonmemRun({os.path.basename(self.path)!r}, {self.problem!r}, model={self.model!r}, "
                f"{len(self.data)} records, method={self.method!r}, options={self.options})")


def _pharmpy():
    # pharmpy's unit registry (pint) logs "Redefining 'l'" warnings on import: not the user's concern
    logging.getLogger("pint").setLevel(logging.ERROR)
    try:
        from pharmpy.modeling import read_model  # local: optional dependency (nlmefit[nonmem])
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("reading NONMEM control streams needs pharmpy-core: pip install \"nlmefit[nonmem]\"") from exc
    return read_model


def estimation_settings(steps) -> tuple[str, dict]:
    """(method, options) for :func:`nlmefit.fit` from pharmpy's execution steps (``$ESTIMATION``/``$COVARIANCE``)."""
    steps = list(steps)
    if not steps:
        return "focei", {"covariance": None}
    est = [s for s in steps if not s.evaluation]
    evals = [s for s in steps if s.evaluation]
    options: dict = {}
    if not est:  # only an evaluation step: the objective at the initial estimates
        est = [evals.pop(0)]
        if est[0].method == "IMP":
            raise ModelSpecError("$ESTIMATION METHOD=IMP EONLY=1 alone: evaluate a fit with nlmefit.loglik(fit, 'is')")
        options["maxiter"] = 0
    if len(est) > 1:
        raise ModelSpecError(f"$ESTIMATION: {len(est)} estimation steps ({', '.join(s.method for s in est)}); "
                             "nlmefit translates one (plus an IMP EONLY=1 evaluation)")
    s = est[0]
    m = s.method
    if m == "FO":
        method = "fo"
    elif m == "FOCE":
        method = "laplace" if s.laplace else ("focei" if s.interaction else "foce")
    elif m == "SAEM":
        method = "saem"
        tool = {k.upper(): v for k, v in (s.tool_options or {}).items()}
        if "NBURN" in tool:
            options["n_explore"] = int(tool["NBURN"])
        if s.niter is not None:
            options["n_smooth"] = int(s.niter)
    else:
        raise ModelSpecError(f"$ESTIMATION METHOD={m} as an estimation step is not translated (FO, FOCE, FOCE-I, "
                             "LAPLACE, SAEM; IMP only as EONLY=1 after another step)")
    if s.maximum_evaluations == 0 and method != "saem":
        options["maxiter"] = 0
    for e in evals:
        if e.method != "IMP":
            raise ModelSpecError(f"$ESTIMATION METHOD={e.method} EONLY=1 is not translated (IMP is)")
        options["compute_loglik"] = "is"
        if e.isample:
            options["loglik_options"] = {"n_samples": int(e.isample)}
    unc = s.parameter_uncertainty_method
    covariance = {None: None, "SANDWICH": "sandwich", "RMAT": "r", "SMAT": "s"}
    if unc not in covariance:
        raise ModelSpecError(f"$COVARIANCE MATRIX={unc} is not translated (R, S or the default sandwich)")
    if method != "saem" or unc is not None:
        options["covariance"] = covariance[unc]
    return method, options


def from_nonmem(path: str | os.PathLike, name: str | None = None) -> NonmemRun:
    """Read the NONMEM control stream ``path`` (``.mod``/``.ctl``) with its ``$DATA`` into a :class:`NonmemRun`.

    Statements nlmefit cannot translate raise :class:`~nlmefit.errors.ModelSpecError` naming them."""
    read_model = _pharmpy()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no control stream at {path}")
    try:
        pm = read_model(path)
    except Exception as exc:  # pharmpy's parse errors come in many types; name the file
        raise ModelSpecError(f"{path}: pharmpy could not parse the control stream: {exc}") from exc
    records = [r.name for r in pm.internals.control_stream.records] if hasattr(pm, "internals") else []
    for bad in ("MIX", "PRIOR", "LEVEL", "MODEL"):
        if bad in records and not (bad == "MODEL" and pm.statements.ode_system is not None):
            raise ModelSpecError(f"{path}: ${bad} is not translated")
    translation = translate(pm, name=name or pm.name)
    data = _dataset(pm, path)
    if translation.dose_parameters:
        _check_one_dosed_compartment(data, translation.dose_parameters)
    if translation.occasion_column is not None:
        data = _occasions(data, translation.occasion_column, translation.occasion_values)
    method, options = estimation_settings(pm.execution_steps)
    matrix = _covariance_matrix(pm)
    if matrix is not None and options.get("covariance"):
        options["covariance"] = matrix
    return NonmemRun(path=path, problem=str(pm.description or ""), model=translation.model, data=data,
                     method=method, options=options, names=translation.names, scale=translation.scale)


def _check_one_dosed_compartment(df: pd.DataFrame, params: list[str]) -> None:
    """NONMEM's ALAGn/Fn/Dn/Rn act on compartment n; nlmefit's tlag/f/dur/rate on every dose: the translation
    is exact only when the doses go into one compartment."""
    if "CMT" not in df.columns or "AMT" not in df.columns:
        return
    dosed = df.loc[pd.to_numeric(df["AMT"], errors="coerce").fillna(0) > 0, "CMT"].dropna().unique()
    if len(dosed) > 1:
        raise ModelSpecError(f"$PK defines {', '.join(params)} (ALAGn/Fn/Dn/Rn of one compartment) but the data dose "
                             f"into compartments {', '.join(str(int(c)) for c in sorted(dosed))}; nlmefit applies "
                             "them to every dose, so this stream is not translated")


def _occasions(df: pd.DataFrame, column: str, values: list[float]) -> pd.DataFrame:
    """The occasion column as nlmefit's ``OCC``; every occasion in the data must have its eta in the stream
    (NONMEM would give an unlisted occasion no IOV; nlmefit gives every occasion one)."""
    if column not in df.columns:
        raise ModelSpecError(f"$PK tests occasions on {column}, which is not a data column")
    present = sorted(float(v) for v in pd.unique(df[column].dropna()))
    missing = [v for v in present if v not in set(values)]
    if missing:
        raise ModelSpecError(f"$PK: the data have {column} = {', '.join(f'{v:g}' for v in missing)} but no "
                             f"IF ({column}.EQ.k) assigns an inter-occasion eta for them")
    if column != "OCC":
        if "OCC" in df.columns:
            raise ModelSpecError(f"$PK tests occasions on {column} while the data also have an OCC column; nlmefit "
                                 "reads occasions from OCC")
        df = df.rename(columns={column: "OCC"})
    return df


def _covariance_matrix(pm) -> str | None:
    """``$COVARIANCE MATRIX=R|S`` read from the record (pharmpy reports every $COV as the sandwich)."""
    try:
        records = pm.internals.control_stream.get_records("COVARIANCE")
    except AttributeError:  # pragma: no cover - another pharmpy model type
        return None
    for r in records:
        opt = r.get_option("MATRIX")
        if opt is not None:
            kind = str(opt).strip().upper()[:1]
            if kind not in ("R", "S"):
                raise ModelSpecError(f"$COVARIANCE MATRIX={opt}: R or S (or no MATRIX for the sandwich)")
            return kind.lower()
    return None


def _dataset(pm, path: str) -> pd.DataFrame:
    try:
        df = pm.dataset
    except Exception as exc:
        raise ModelSpecError(f"{path}: $DATA could not be read: {exc}") from exc
    if df is None:
        raise ModelSpecError(f"{path}: $DATA names no readable file")
    drop = [c.name for c in pm.datainfo if c.drop and c.name in df.columns]
    df = df.drop(columns=drop).reset_index(drop=True)
    # pharmpy reads every column as float; NONMEM's integer columns are integers
    for c in ("ID", "EVID", "MDV", "CMT", "SS", "ADDL", "DVID", "OCC", "BLQ", "CENS"):
        if c in df.columns and pd.api.types.is_float_dtype(df[c]) and (df[c].dropna() % 1 == 0).all():
            df[c] = df[c].astype("int64")
    return df
