"""Stepwise covariate modelling (SCM), as PsN's ``scm``: forward inclusion, then backward elimination.

``scm(model, data, candidates={"cl": ["WT", "SEX"], "v": ["WT"]})`` fits the base model, then at each forward step
every remaining parameter–covariate relationship added to the current model, keeps the most significant one when
its likelihood-ratio test passes (p < ``p_forward``: ΔOFV > 3.84 for one parameter), and repeats until none
passes; backward elimination then removes, one at a time, the included relationship whose removal is least
significant while that removal is not significant at ``p_backward`` (ΔOFV < 6.63 for one parameter).

Every relationship is a term of the model's covariate formulas (:mod:`nlmefit.models.formula`), whose effects are
log-linear, ``p = θ_p·exp(η_p + Σ β·term)``:

* ``power``: ``log(COV/median)`` → ``θ·(COV/median)^β`` (PsN's power);
* ``exponential``: ``(COV − median)`` → ``θ·exp(β·(COV − median))`` (PsN's exponential);
* ``categorical``: one indicator ``[COV == level]`` per non-reference level → ``θ·exp(β_level)`` for that level,
  the same model (and OFV) as PsN's ``θ·(1 + β_level)`` for a 0/1 indicator; the reference is the most
  common level.

PsN's centred ``linear`` relationship ``θ·(1 + β·(COV − median))`` is not log-linear, so a formula cannot
express it; asking for it is an error (``exponential`` is its log-linear counterpart, equal to first order near
the median). Continuous covariates are centred on the median of the subjects' baseline values. See docs/scm.md.
"""
from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import chi2

from nlmefit._io import atomic_csv
from nlmefit.api import fit
from nlmefit.errors import DataError, EstimationError, ModelSpecError
from nlmefit.models.formula import parse_formula
from nlmefit.models.model import Model
from nlmefit.models.spec import _ATTR as _SPEC_ATTR
from nlmefit.models.spec import restore
from nlmefit.models.structure import OPTIONAL_PK_PARAMS
from nlmefit.panel import Panel
from nlmefit.progress import logging_redirect, progress_bar

__all__ = ["scm", "ScmResult", "Relationship", "RELATIONSHIPS"]

logger = logging.getLogger(__name__)

RELATIONSHIPS = ("power", "exponential", "categorical")
LOG_COLUMNS = ["step", "direction", "parameter", "covariate", "relationship", "ofv", "delta_ofv", "df", "p_value",
               "included", "removed", "converged", "n_estimated", "elapsed_s", "terms", "note"]


@dataclass(frozen=True)
class Relationship:
    """One parameter–covariate relationship: its formula terms (one per coefficient)."""

    parameter: str
    covariate: str
    relationship: str
    terms: tuple[str, ...]

    @property
    def df(self) -> int:
        return len(self.terms)

    @property
    def key(self) -> tuple[str, str, str]:
        return self.parameter, self.covariate, self.relationship

    def __str__(self) -> str:
        return f"{self.parameter}-{self.covariate} ({self.relationship})"


@dataclass(frozen=True)
class ScmResult:
    """The outcome of :func:`scm`: ``log`` (one row per fit), the ``final_model`` and its ``final_fit``, the
    ``selected`` relationships ``[(parameter, covariate, relationship), ...]`` and the ``base_fit``."""

    log: pd.DataFrame
    final_model: Model
    final_fit: object
    selected: list[tuple[str, str, str]]
    base_fit: object
    relationships: list[Relationship] = field(default_factory=list)
    p_forward: float = 0.05
    p_backward: float = 0.01
    elapsed_s: float = 0.0

    @property
    def formulas(self) -> dict[str, list[str]]:
        """The selected relationships as covariate formulas per parameter (``Model(covariates=...)``)."""
        out: dict[str, list[str]] = {}
        for r in self.relationships:
            out.setdefault(r.parameter, []).extend(r.terms)
        return out

    def to_csv(self, directory: str | os.PathLike) -> list[Path]:
        """Write ``scm_log.csv`` and ``scm_selected.csv`` into ``directory`` (each atomically); returns the paths."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        sel = pd.DataFrame([{"parameter": r.parameter, "covariate": r.covariate, "relationship": r.relationship,
                             "terms": " + ".join(r.terms)} for r in self.relationships],
                           columns=["parameter", "covariate", "relationship", "terms"])
        written = []
        for name, frame in (("scm_log.csv", self.log), ("scm_selected.csv", sel)):
            path = d / name
            atomic_csv(frame, path)
            written.append(path)
        return written

    def log_text(self) -> str:
        cols = ["step", "direction", "parameter", "covariate", "relationship", "ofv", "delta_ofv", "df", "p_value",
                "included", "removed", "converged"]
        frame = self.log[cols].copy()
        frame["ofv"] = frame["ofv"].map(lambda v: f"{v:.3f}")
        frame["delta_ofv"] = frame["delta_ofv"].map(lambda v: "" if pd.isna(v) else f"{v:.3f}")
        frame["p_value"] = frame["p_value"].map(lambda v: "" if pd.isna(v) else f"{v:.3g}")
        frame["df"] = frame["df"].map(lambda v: "" if pd.isna(v) or v == 0 else str(int(v)))
        for c in ("parameter", "covariate", "relationship"):
            frame[c] = frame[c].fillna("")
        return frame.to_string(index=False)

    def summary_text(self) -> str:
        lines = [f"Stepwise covariate modelling: forward p < {self.p_forward:g}, backward p < {self.p_backward:g} "
                 f"(χ² thresholds for df=1: {chi2.isf(self.p_forward, 1):.2f} / {chi2.isf(self.p_backward, 1):.2f})",
                 f"{len(self.log)} fits in {self.elapsed_s:.1f} s; base OFV {self.base_fit.ofv:.3f}, final OFV "
                 f"{self.final_fit.ofv:.3f}", "", self.log_text(), ""]
        if self.relationships:
            lines.append("Selected:")
            lines += [f"  {r}: {' + '.join(r.terms)}" for r in self.relationships]
        else:
            lines.append("Selected: none (the base model is the final model)")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"ScmResult(selected={self.selected}, final OFV={self.final_fit.ofv:.3f}, {len(self.log)} fits)"


# ---------------------------------------------------------------------- relationships as formula terms
def _num(x: float) -> str:
    return f"{float(x):.6g}"


def _column(panel: Panel, name: str) -> str:
    names = [str(n) for n in panel.covariate_names]
    if name in names:
        return name
    found = [n for n in names if n.strip().lower() == str(name).strip().lower()]
    if len(found) == 1:
        return found[0]
    raise DataError(f"scm candidates: covariate {name!r} is not a data column (covariate columns: {names})")


def _terms(panel: Panel, col: str, rel: str | None, param: str) -> tuple[str, tuple[str, ...]]:
    """(relationship, formula terms) of covariate ``col`` on ``param``; ``rel`` None chooses the default."""
    k = [str(n) for n in panel.covariate_names].index(col)
    levels = (panel.covariate_levels or {}).get(col)
    values = np.asarray(panel.covariates[:, k], dtype=float)  # each subject's baseline value
    values = values[np.isfinite(values)]
    distinct = np.unique(values)
    if len(distinct) < 2:
        only = _num(distinct[0]) if len(distinct) else "none"
        raise DataError(f"scm candidates: covariate {col!r} has a single value ({only}) across subjects; it cannot "
                        f"be tested")
    if rel is None:
        rel = "categorical" if levels or len(distinct) == 2 else "power"
    rel = str(rel).lower()
    if rel == "linear":
        raise ModelSpecError(f"scm: relationship 'linear' for {param}-{col}: PsN's θ·(1 + β·(COV − median)) is not "
                             f"log-linear, which covariate formulas are; use 'exponential' (θ·exp(β·(COV − median)), "
                             f"equal to first order) or 'power'")
    if rel not in RELATIONSHIPS:
        raise ModelSpecError(f"scm: unknown relationship {rel!r} for {param}-{col}; choose from {list(RELATIONSHIPS)}")
    if rel != "categorical" and levels:
        raise ModelSpecError(f"scm: {col!r} is a text column (levels {sorted(levels)}); its relationship must be "
                             f"'categorical', not {rel!r}")
    if rel == "power":
        if not (values > 0).all():
            raise ModelSpecError(f"scm: relationship 'power' for {param}-{col} needs {col} > 0 (its smallest value "
                                 f"is {_num(values.min())}); give ({col!r}, 'exponential') instead")
        return rel, (f"log({col} / {_num(np.median(values))})",)
    if rel == "exponential":
        return rel, (f"({col} - {_num(np.median(values))})",)
    if len(distinct) > 10:
        raise ModelSpecError(f"scm: {col!r} has {len(distinct)} distinct values; 'categorical' takes at most 10 "
                             f"levels (use 'power' or 'exponential')")
    counts = [(int((values == c).sum()), -float(c)) for c in distinct]
    ref = -max(counts)[1]  # the most common level (ties: the smallest code)
    terms = []
    for lev in distinct:
        if lev == ref:
            continue
        parts = []
        for other in distinct:  # Lagrange indicator: 1 at this level, 0 at every other level of the column
            if other == lev:
                continue
            num = f"({col} - {_num(other)})" if lev > other else f"({_num(other)} - {col})"
            den = abs(lev - other)
            parts.append(num if den == 1 else f"{num} / {_num(den)}")
        terms.append(" * ".join(parts))
    return rel, tuple(terms)


def _candidates(model: Model, panel: Panel, candidates, relationships) -> list[Relationship]:
    if not isinstance(candidates, Mapping) or not candidates:
        raise ModelSpecError("scm: candidates must be a non-empty mapping {parameter: [covariate, ...]}")
    # structural parameters and the optional ones the model declares (tlag, f, ...): formulas take both
    params = list(model.structure.param_names) + [k for k in OPTIONAL_PK_PARAMS if k in model.parameters.theta]
    default = dict(relationships or {})
    out: list[Relationship] = []
    existing = {t.coef for t in model.terms}
    for p, covs in candidates.items():
        if p not in model.parameters.theta or p not in params:
            raise ModelSpecError(f"scm candidates: {p!r} is not a parameter of {model.name} ({params})")
        if isinstance(covs, (str, tuple)):
            covs = [covs]
        for item in covs:
            if isinstance(item, tuple):
                if len(item) != 2:
                    raise ModelSpecError(f"scm candidates for {p!r}: expected COLUMN or (COLUMN, RELATIONSHIP), "
                                         f"got {item!r}")
                name, rel = item
            else:
                name, rel = item, None
            col = _column(panel, str(name))
            if rel is None:
                rel = default.get(col, default.get(str(name)))
            rel, terms = _terms(panel, col, rel, p)
            r = Relationship(p, col, rel, terms)
            if any(q.key == r.key for q in out):
                raise ModelSpecError(f"scm candidates: {r} is given twice")
            clash = {t.coef for t in parse_formula(p, list(terms))} & existing
            if clash:
                raise ModelSpecError(f"scm candidates: {r} is already in the model ({sorted(clash)})")
            out.append(r)
    return out


# ---------------------------------------------------------------------- models with and without relationships
def _build(base: Model, rels: Sequence[Relationship]) -> Model:
    """``base`` with the formula terms of ``rels`` added (the base model itself is never modified)."""
    if not rels:
        return base
    spec = getattr(base, _SPEC_ATTR, None)
    if spec and spec.get("kind") == "library":
        cov: dict[str, list[str]] = {}
        for p, f in (spec.get("covariates") or {}).items():
            cov[p] = list(f) if isinstance(f, (list, tuple)) else [f]
        for r in rels:
            cov.setdefault(r.parameter, []).extend(r.terms)
        model, why = restore({**spec, "covariates": cov, "hash": None})
        if model is None:
            raise ModelSpecError(f"scm: cannot rebuild {base.name} with covariates: {why}")
        return model
    pset = base.parameters
    coefs = {t.coef for t in base.terms}
    cov = {}
    for t in base.terms:
        cov.setdefault(t.param, []).append(t.expr)
    for r in rels:
        cov.setdefault(r.parameter, []).extend(r.terms)
    model = Model(base.structure, {k: v for k, v in pset.theta.items() if k not in coefs}, pset.omega, pset.sigma,
                  error=base.error, covariates=cov, iov=pset.omega_iov, dvid=base.dvid, name=base.name)
    for c in coefs:  # the base model's own coefficients keep their bounds and FIX
        model.parameters.theta[c] = pset.theta[c]
    return model


def _start(model: Model, estimates: pd.Series):
    """The model's Params at the previous fit's estimates; a new coefficient starts at its initial value (0)."""
    pset = model.parameters
    known = set(pset.natural_dict(pset.initial(torch.float64)))
    return pset.params_from_dict({k: float(v) for k, v in estimates.items() if k in known and np.isfinite(v)})


def _is_constant(panel: Panel, col: str) -> bool:
    k = [str(n) for n in panel.covariate_names].index(col)
    diff = np.abs(panel.obs_covariates[:, :, k] - panel.covariates[:, None, k]) > 0
    return not bool(diff[panel.obs_mask].any())


# ---------------------------------------------------------------------- the search
def scm(model: Model, data, candidates: Mapping[str, Sequence], *, method: str = "focei", p_forward: float = 0.05,
        p_backward: float = 0.01, relationships: Mapping[str, str] | None = None, init=None,
        covariance: str | None = None, backward: bool = True, progress: bool | None = None,
        **fit_options) -> ScmResult:
    """Stepwise covariate modelling of ``model`` on ``data``.

    ``candidates``: ``{parameter: [column, (column, relationship), ...]}``; relationships are ``"power"``
    (default for continuous columns), ``"exponential"`` and ``"categorical"`` (default for text columns and
    columns with two values). ``relationships``: default relationship per column, e.g. ``{"AGE": "exponential"}``.
    ``p_forward`` / ``p_backward``: significance levels of the forward (likelihood-ratio, χ² with df = added
    coefficients) and backward tests. ``init``: starting values of the base fit (as :func:`nlmefit.fit`); every
    later fit starts from the estimates of the model it extends, new coefficients at 0. ``covariance``: the
    covariance step of every fit (None: skipped, as the search needs only OFVs). ``fit_options`` go to
    :func:`nlmefit.fit`. ``progress``: a bar over the fits (None: automatic, :mod:`nlmefit.progress`); every fit
    is also logged, one line (OFV, ΔOFV, p) at INFO on the logger ``nlmefit.covariate_search``.
    """
    t0 = time.perf_counter()
    if not isinstance(model, Model):
        raise ModelSpecError(f"scm needs a nlmefit Model with covariate formulas, got {type(model).__name__}")
    if model.params_fn is not None:
        raise ModelSpecError(f"scm: {model.name} has a params= function; scm adds covariate formulas, which only "
                             f"the default parameter model takes (library models, or Model without params=)")
    for name, v in (("p_forward", p_forward), ("p_backward", p_backward)):
        if not 0.0 < float(v) < 1.0:
            raise ModelSpecError(f"scm: {name} must be in (0, 1), got {v}")
    for k in ("compute_loglik", "n_starts"):
        if k in fit_options:
            raise ModelSpecError(f"scm: {k}= is not supported (every fit's own OFV is compared)")
    panel = data if isinstance(data, Panel) else Panel.from_dataframe(data)
    pool = _candidates(model, panel, candidates, relationships)
    options = dict(fit_options, covariance=covariance, progress=False)  # the search's own bar, not one per fit
    base_data = model.prepare(panel, device=options.get("device"))
    constant = {r.covariate: _is_constant(panel, r.covariate) for r in pool}
    rows: list[dict] = []

    def run(rels: list[Relationship], previous) -> tuple[Model, object, str]:
        m = _build(model, rels)
        start = init if previous is None else _start(m, previous.estimates)
        bound = base_data if all(constant[r.covariate] for r in rels) else panel  # time-varying: rebind
        try:
            res = fit(m, bound, method=method, init=start, **options)
        except EstimationError as e:
            return m, None, f"estimation failed: {e}"
        return m, res, ""

    def record(step, direction, rel, res, note, ref_ofv, df, sign, included=False, removed=False):
        ofv = math.nan if res is None else float(res.ofv)
        delta = sign * (ref_ofv - ofv) if rel is not None and res is not None else math.nan
        p = math.nan
        if df and np.isfinite(delta):
            p = float(chi2.sf(delta, df)) if delta > 0 else 1.0
        row = {"step": step, "direction": direction, "parameter": None if rel is None else rel.parameter,
               "covariate": None if rel is None else rel.covariate,
               "relationship": None if rel is None else rel.relationship, "ofv": ofv, "delta_ofv": delta,
               "df": df, "p_value": p, "included": included, "removed": removed,
               "converged": bool(res is not None and res.converged), "n_estimated": None if res is None else
               res.n_estimated, "elapsed_s": math.nan if res is None else float(res.elapsed_s),
               "terms": "" if rel is None else " + ".join(rel.terms), "note": note}
        rows.append(row)
        what = "base model" if rel is None else f"{direction} {'+' if sign > 0 else '-'}{rel}"
        with logging_redirect(bar):  # the line above the bar, not through it
            logger.info("scm step %d: %s: OFV %.3f%s%s", step, what, ofv,
                        "" if rel is None else f", ΔOFV {delta:.3f}, p {p:.3g}", f" ({note})" if note else "")
        bar.set_postfix(step=step, ofv=f"{ofv:.3f}", refresh=False)
        bar.update(1)
        return row

    bar = progress_bar(None, "scm", "fit", enabled=progress)
    m0, base_fit, note = run([], None)
    if base_fit is None:
        bar.close()
        raise EstimationError(f"scm: the base model's fit failed ({note})")
    record(0, "base", None, base_fit, "", base_fit.ofv, 0, 1)
    current: list[Relationship] = []
    cur_model, cur_fit = m0, base_fit
    step = 0
    while True:  # forward inclusion
        remaining = [r for r in pool if r not in current and
                     not any(q.parameter == r.parameter and q.covariate == r.covariate for q in current)]
        if not remaining:
            break
        step += 1
        tried = []
        for r in remaining:
            m, res, note = run(current + [r], cur_fit)
            tried.append((r, m, res, record(step, "forward", r, res, note, cur_fit.ofv, r.df, 1)))
        ok = [t for t in tried if t[2] is not None and np.isfinite(t[3]["p_value"]) and t[3]["delta_ofv"] > 0
              and t[3]["p_value"] < p_forward]
        if not ok:
            break
        best = min(ok, key=lambda t: (t[3]["p_value"], -t[3]["delta_ofv"]))
        best[3]["included"] = True
        current = current + [best[0]]
        cur_model, cur_fit = best[1], best[2]
    while backward and current:  # backward elimination
        step += 1
        tried = []
        for r in current:
            rest = [q for q in current if q is not r]
            m, res, note = run(rest, cur_fit)
            tried.append((r, m, res, record(step, "backward", r, res, note, cur_fit.ofv, r.df, -1)))
        ok = [t for t in tried if t[2] is not None and np.isfinite(t[3]["p_value"]) and t[3]["p_value"] >= p_backward]
        if not ok:
            break
        worst = max(ok, key=lambda t: (t[3]["p_value"], -t[3]["delta_ofv"]))
        worst[3]["removed"] = True
        current = [q for q in current if q is not worst[0]]
        cur_model, cur_fit = worst[1], worst[2]
    bar.close()
    log = pd.DataFrame(rows, columns=LOG_COLUMNS)
    return ScmResult(log=log, final_model=cur_model, final_fit=cur_fit, selected=[r.key for r in current],
                     base_fit=base_fit, relationships=list(current), p_forward=float(p_forward),
                     p_backward=float(p_backward), elapsed_s=time.perf_counter() - t0)
