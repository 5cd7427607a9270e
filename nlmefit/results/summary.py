"""The parameter table and the printed summary of a fit, as a pharmacometrician reads them.

One row per parameter (:func:`parameter_table`):

=================  ===========================================================================================
column             meaning
=================  ===========================================================================================
estimate           θ on the natural scale; Ω (IIV/IOV) as a variance ω² or covariance; σ as an SD
se, rse_pct        standard error (of the value in ``estimate``) and 100·se/|estimate|
ci_low, ci_high    (1 − α) interval: Wald (estimate ± z·se) for θ and covariances; for variances and SDs on the
                   log scale, exp(log x ± z·se/x) (delta method), so it never goes below zero
fixed              FIXED in the model
kind               ``theta``, ``omega`` (IIV variance), ``omega_cov``, ``iov``, ``iov_cov``, ``sigma``, ``weight``
label              what the row is: ``ω² cl (IIV variance)``, ``σ prop (SD)`` …
variance           ω² for Ω rows, σ² (NONMEM's SIGMA) for σ rows
variance_ci_low/   the interval of that variance (σ²: the square of the σ interval)
variance_ci_high
cv_pct             IIV/IOV as %CV: √(exp(ω²) − 1) for log-normal parameters (p = θ·exp(η), found numerically
                   from the model), √ω² otherwise (first-order, labelled in ``cv_formula``); proportional σ: 100·σ;
                   exponential (log-scale) σ: √(exp(σ²) − 1)
cv_formula         the formula used for ``cv_pct``
shrinkage_pct      η-shrinkage for IIV rows, ε-shrinkage for σ rows (in %)
=================  ===========================================================================================

The table works on any FitResult-like object (also one read back from JSON, without a model: then log-normal
IIV is assumed and said so in ``cv_formula``).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from scipy.stats import norm

from nlmefit.results.units import parameter_units

__all__ = ["parameter_table", "summary_text", "status_line", "initial_lines", "lognormal_components", "BASE_COLUMNS",
           "CV_LOGNORMAL", "CV_FIRST_ORDER"]

BASE_COLUMNS = ["estimate", "se", "rse_pct", "ci_low", "ci_high", "fixed"]
CV_LOGNORMAL = "sqrt(exp(omega2)-1)"
CV_FIRST_ORDER = "sqrt(omega2) (first order; parameter not log-normal)"
CV_ASSUMED = "sqrt(exp(omega2)-1) (log-normal assumed: no model attached)"
CV_PROP = "100*sigma (proportional SD)"
CV_LOGSCALE = "sqrt(exp(sigma2)-1) (log-scale SD)"
CLASSICAL = ("fo", "foce", "focei", "laplace", "agq")


def _classify(name: str, eta_names: list[str], iov_names: list[str]) -> tuple[str, str]:
    """(kind, what) of a reporting name: ``omega_cl`` → (omega, cl), ``omega_v_cl`` → (omega_cov, v, cl) …"""
    for prefix, kind, names in (("omega_iov_", "iov", iov_names), ("omega_", "omega", eta_names)):
        if name.startswith(prefix):
            rest = name[len(prefix):]
            if rest in names or not names:
                return kind, rest
            return kind + "_cov", rest
    if name.startswith("sigma_"):
        return "sigma", name[len("sigma_"):]
    if "[" in name and name.endswith("]"):
        return "weight", name
    return "theta", name


def _pair(rest: str, names: list[str]) -> tuple[str, str] | None:
    for k in range(1, len(rest)):
        if rest[k] == "_" and rest[:k] in names and rest[k + 1:] in names:
            return rest[:k], rest[k + 1:]
    return None


def lognormal_components(model, p, data) -> dict[str, bool] | None:
    """For each IIV η of ``model``, whether its parameter is log-normal in it at parameters ``p``: log p changes
    by exactly δ when η changes by δ, for every subject (``p = θ·exp(η + …)``). None when the model cannot be
    evaluated that way (no ``individual_parameters``)."""
    if model is None or data is None or not hasattr(model, "individual_parameters"):
        return None
    try:
        eta0 = torch.zeros(data.n_subjects, data.q, dtype=torch.float64, device=data.y.device)
        with torch.no_grad():
            base = model.individual_parameters(p, eta0, data)
            out = {}
            for k, n in enumerate(model.eta_names):
                if n not in base:
                    out[n] = False
                    continue
                e = eta0.clone()
                e[:, k] = 0.1
                moved = model.individual_parameters(p, e, data)[n]
                b = base[n].expand_as(moved)
                ok = bool((b > 0).all() and (moved > 0).all())
                out[n] = ok and bool(torch.allclose(torch.log(moved / b), torch.full_like(b, 0.1), atol=1e-6))
        return out
    except Exception:  # a user model that cannot be evaluated this way: the caller falls back to its assumption
        return None


def lognormal_etas(fit) -> dict[str, bool] | None:
    """:func:`lognormal_components` at a fit's estimates; None without an attached model and data."""
    model, data = getattr(fit, "model", None), getattr(fit, "data", None)
    if model is None or data is None:
        return None
    try:
        p = fit.population_parameters()
    except Exception:  # estimates that do not fit the attached model: no detection
        return None
    return lognormal_components(model, p, data)


def parameter_table(fit, alpha: float = 0.05) -> pd.DataFrame:
    """The parameter table of ``fit`` (see the module docstring for the columns)."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    z = float(norm.ppf(1 - alpha / 2))
    est = fit.estimates.astype(float)
    se = fit.se.reindex(est.index).astype(float)
    eta_names = list(fit.eta_names)
    model = getattr(fit, "model", None)
    iov_names = list(getattr(getattr(model, "parameters", None), "iov_names", []) or [])
    error = getattr(model, "error", None)
    lognormal = lognormal_etas(fit)
    shr = fit.eta_shrinkage if fit.eta_shrinkage is not None else pd.Series(dtype=float)
    rows = []
    for name, x in est.items():
        s = float(se[name])
        kind, what = _classify(str(name), eta_names, iov_names)
        row = {"kind": kind, "variance": np.nan, "variance_ci_low": np.nan, "variance_ci_high": np.nan,
               "cv_pct": np.nan, "cv_formula": "", "shrinkage_pct": np.nan}
        positive = kind in ("omega", "iov", "sigma")
        if positive and x > 0 and np.isfinite(s):
            lo, hi = x * math.exp(-z * s / x), x * math.exp(z * s / x)
        else:
            lo, hi = x - z * s, x + z * s
        row.update(ci_low=lo, ci_high=hi)
        if kind in ("omega", "iov"):
            row["label"] = f"ω² {what} ({'IIV' if kind == 'omega' else 'IOV'} variance)"
            row.update(variance=x, variance_ci_low=lo, variance_ci_high=hi)
            is_ln = True if lognormal is None else lognormal.get(what, kind == "iov")
            if x >= 0:
                row["cv_pct"] = 100 * math.sqrt(math.expm1(x)) if is_ln else 100 * math.sqrt(x)
            row["cv_formula"] = (CV_ASSUMED if lognormal is None else CV_LOGNORMAL) if is_ln else CV_FIRST_ORDER
            if kind == "omega" and what in shr.index:
                row["shrinkage_pct"] = 100 * float(shr[what])
        elif kind in ("omega_cov", "iov_cov"):
            pair = _pair(what, iov_names if kind == "iov_cov" else eta_names)
            row["label"] = (f"cov({pair[0]}, {pair[1]})" if pair else f"cov {what}") + " (covariance)"
            row["variance"] = x
        elif kind == "sigma":
            row["label"] = f"σ {what} (SD; σ² = variance)"
            row.update(variance=x * x, variance_ci_low=max(lo, 0.0) ** 2, variance_ci_high=hi * hi)
            if what == "prop":
                row.update(cv_pct=100 * x, cv_formula=CV_PROP)
            elif error is not None and getattr(error, "log_scale", False):
                row.update(cv_pct=100 * math.sqrt(math.expm1(x * x)), cv_formula=CV_LOGSCALE)
            if fit.epsilon_shrinkage is not None:
                row["shrinkage_pct"] = 100 * float(fit.epsilon_shrinkage)
        else:
            row["label"] = f"θ {what}" if kind == "theta" else what
        rows.append(row)
    with np.errstate(divide="ignore", invalid="ignore"):
        rse = 100 * se / est.abs()
    base = pd.DataFrame({"estimate": est, "se": se, "rse_pct": rse,
                         "ci_low": [r["ci_low"] for r in rows], "ci_high": [r["ci_high"] for r in rows],
                         "fixed": [n in fit.fixed for n in est.index]}, index=est.index)
    extra = pd.DataFrame([{k: v for k, v in r.items() if k not in ("ci_low", "ci_high")} for r in rows],
                         index=est.index)
    cols = ["kind", "label", "variance", "variance_ci_low", "variance_ci_high", "cv_pct", "cv_formula",
            "shrinkage_pct"]
    table = pd.concat([base, extra[cols]], axis=1)
    units = parameter_units(est.index, (getattr(fit, "source", None) or {}).get("units") or {})
    table["unit"] = [units.get(n, "") for n in est.index]
    return table


def status_line(fit) -> str:
    """How the estimation ended, in the words of its method (SAEM does not minimise, NUTS samples)."""
    m = str(fit.method).lower()
    it = f"after {fit.n_iter} iterations ({fit.elapsed_s:.2f} s)"
    first = fit.messages[0] if fit.messages else ""
    if m == "saem":
        if fit.converged:
            return f"estimation completed, stochastic approximation stable, {it}"
        if "FAILED" in first:
            return f"estimation FAILED {it} (see the messages below)"
        return f"estimation completed but NOT stable {it} (see the messages below)"
    if m == "nuts":
        return (f"sampling completed, diagnostics satisfactory ({fit.elapsed_s:.2f} s)" if fit.converged
                else f"sampling completed, diagnostics NOT satisfactory ({fit.elapsed_s:.2f} s; see the messages)")
    if m in CLASSICAL:
        return f"minimisation {'successful' if fit.converged else 'NOT successful'} {it}"
    return f"estimation {'successful' if fit.converged else 'NOT successful'} {it}"


def initial_lines(fit) -> list[str]:
    """The summary's line on the starting values, grouped by where they came from (``auto …``, ``user``,
    ``model``), and the notes of the automatic starts; nothing for a result without that record."""
    rec = getattr(fit, "initial", None) or {}
    values, source = rec.get("values") or {}, rec.get("source") or {}
    if not values:
        return []
    groups: dict[str, list[str]] = {}
    for k, v in values.items():
        src = str(source.get(k, "model"))
        label = str(rec.get("method") or src) if src.startswith("auto") else src
        groups.setdefault(label, []).append(f"{k} {_fmt(v, 3)}")
    order = sorted(groups, key=lambda g: (not g.startswith("auto"), g != "user", g))
    out = ["  initial values: " + "; ".join(f"{g}: {', '.join(groups[g])}" for g in order)]
    out += [f"  initial values note: {n}" for n in (rec.get("notes") or [])[1:]]
    ms = rec.get("multistart")
    if ms:
        ofv = np.asarray([np.inf if v is None else v for v in ms["ofv"]], dtype=float)
        fin = ofv[np.isfinite(ofv)]
        spread = (f"final OFVs min {fin.min():.4f}, median {np.median(fin):.4f}, max {fin.max():.4f}"
                  if fin.size else "no finite final OFV")
        out.append(f"  multi-start: {ms['n_starts']} starts (±{100 * ms['spread']:.0f} %), best start {ms['best']}; "
                   f"{spread}; {ms['within_0.01']} of {ms['n_starts']} within 0.01 of the best")
    return out


def _fmt(v, decimals: int) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "."
    return f"{v:.{decimals}g}"


def _block(title: str, tab: pd.DataFrame, columns: dict[str, str], decimals: int) -> list[str]:
    if not len(tab):
        return []
    out = pd.DataFrame({head: [(_fmt(v, decimals) if not isinstance(v, (bool, np.bool_, str)) else
                                ("FIX" if v is True else "" if v is False else v)) for v in tab[col]]
                        for col, head in columns.items()}, index=tab.index)
    return ["", title, out.to_string()]


def summary_text(fit, decimals: int = 4) -> str:
    """The printed summary: header, status, then θ, Ω (variance, %CV, shrinkage) and σ (SD and σ²) blocks."""
    tab = parameter_table(fit)
    model_name = fit.model_name or "?"
    src = (getattr(fit, "source", None) or {}).get("model")
    if src and str(src) != model_name:
        model_name = f"{model_name} ({src})"
    lines = [
        f"nlmefit {fit.method.upper()} fit of {model_name}",
        f"  subjects {fit.n_subjects}   observations {fit.n_obs}   estimated parameters {fit.n_estimated}",
        f"  OFV {fit.ofv:.{decimals}f}   -2LL {-2 * fit.loglik:.{decimals}f}   AIC {fit.aic:.{decimals}f}"
        f"   BIC {fit.bic:.{decimals}f}",
        f"  {status_line(fit)}",
        f"  covariance step: {fit.covariance_message or 'not run'}",
        *initial_lines(fit),
    ]
    for msg in getattr(fit, "warnings", None) or []:
        lines.append(f"  WARNING: {msg}")
    for msg in fit.messages:
        lines.append(f"  note: {msg}")
    ci = {"ci_low": "CI low", "ci_high": "CI high"}
    declared = (getattr(fit, "source", None) or {}).get("units") or {}
    if declared:
        lines.append("  units (declared by the data): " + ", ".join(f"{k} {v}" for k, v in declared.items()))
    theta_cols = {"estimate": "estimate", "se": "SE", "rse_pct": "RSE%", **ci, "fixed": "fixed"}
    if tab["unit"].astype(bool).any():
        theta_cols = {"estimate": "estimate", "unit": "unit", "se": "SE", "rse_pct": "RSE%", **ci, "fixed": "fixed"}
    lines += _block("Fixed effects (theta); 95% CI estimate ± 1.96·SE",
                    tab[tab["kind"].isin(["theta", "weight"])], theta_cols, decimals)
    om = tab[tab["kind"].isin(["omega", "iov", "omega_cov", "iov_cov"])]
    lines += _block("Random effects (omega: variances and covariances); CI of variances on the log scale",
                    om, {"estimate": "omega2", "se": "SE", "rse_pct": "RSE%", **ci, "cv_pct": "CV%",
                         "shrinkage_pct": "shrink%", "fixed": "fixed"}, decimals)
    sg = tab[tab["kind"] == "sigma"]
    lines += _block("Residual error (sigma as SD; sigma2 = NONMEM's SIGMA variance); CI on the log scale",
                    sg, {"estimate": "SD", "se": "SE(SD)", **ci, "variance": "sigma2",
                         "variance_ci_low": "sigma2 low", "variance_ci_high": "sigma2 high", "cv_pct": "CV%",
                         "fixed": "fixed"}, decimals)
    formulas = sorted({f for f in tab["cv_formula"] if f})
    if formulas:
        lines += ["", "  CV%: " + "; ".join(formulas)]
    if len(sg) and fit.epsilon_shrinkage is not None:
        lines += [f"  epsilon shrinkage: {100 * fit.epsilon_shrinkage:.1f}%"]
    return "\n".join(lines)
