"""FitResult: what a fit produced, as data (estimates, uncertainty, individual estimates, predictions, provenance).

It never re-runs a fit and is immutable in use: operations that add information (``with_likelihood``,
``replace``) return a new FitResult. Typed fields hold what iterative and sampling estimators produce:
``traces`` (per-iteration parameter values, with ``phases``), ``likelihoods`` (marginal −2LL evaluations by
method), ``posterior`` (q(η_i) as a Distribution: Laplace for the classical methods, MCMC draws for SAEM/NUTS),
``mcmc`` (a sampler's diagnostics table), ``initial`` (the starting values and where each came from, ``auto
(NCA)``, ``user`` or ``model``: see :mod:`nlmefit.models.initial`), ``weights`` (tensor-valued parameters, saved
beside the JSON as a ``.pt`` file read back with ``weights_only=True``) and a ``diagnostics`` cache.

Field names follow what pharmacometricians expect (pharmpy's ``ModelfitResults``:
``ofv``, ``parameter_estimates``, ``standard_errors``, ``individual_estimates``, ``predictions``,
``minimization_successful``) and statsmodels' (``params``, ``bse``, ``conf_int()``, ``cov_params()``).

Conventions: ``ofv`` is NONMEM's −2 log L without n·log 2π (n = uncensored observations); ``loglik`` is the full
log-likelihood; AIC = −2·loglik + 2k, BIC = −2·loglik + k·log(n_obs), k = number of estimated parameters.
θ on the natural scale, Ω as variances/covariances (``omega_<eta>``, ``omega_<a>_<b>``), σ as SDs
(``sigma_add``, ``sigma_prop``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.stats import norm

from nlmefit import diagnostics as dg
from nlmefit._io import atomic_write as _atomic_write
from nlmefit.models.spec import restore as restore_model_spec
from nlmefit.models.spec import spec_of as model_spec_of
from nlmefit.panel import Panel
from nlmefit.results.html import fit_result_html
from nlmefit.results.schema import load_result_json, validate_result
from nlmefit.results.summary import parameter_table, summary_text

__all__ = ["FitResult", "SCHEMA_VERSION"]

SCHEMA_VERSION = 2  # of result.json; 1 kept traces and likelihoods in an untyped "extra" dict
#: predictions / individual estimates with more rows than this are written beside the JSON (``.npz``), not in it
EMBED_ROWS = 200_000
#: the tables that may go beside the JSON
_EXTERNAL = ("predictions", "individual_estimates")


class _CleanRows(list):
    """Rows already JSON-safe (built column by column in :func:`_frame_to_json`): :func:`_clean` keeps them."""


def _clean(x):
    """JSON-safe: NaN/inf → None, numpy → Python."""
    if isinstance(x, _CleanRows):
        return x
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, np.ndarray):
        return _clean(x.tolist())
    return x


def _column_to_json(col: pd.Series) -> list:
    """One column as JSON-safe Python values: numeric columns vectorised (NaN/inf → None), others by _clean."""
    if pd.api.types.is_float_dtype(col.dtype):
        v = col.to_numpy(dtype=float)
        out = v.tolist()
        for i in np.flatnonzero(~np.isfinite(v)).tolist():
            out[i] = None
        return out
    if pd.api.types.is_integer_dtype(col.dtype) or pd.api.types.is_bool_dtype(col.dtype):
        return col.to_numpy().tolist()
    return _clean(col.to_numpy(dtype=object).tolist())


def _frame_to_json(df: pd.DataFrame | None):
    if df is None:
        return None
    cols = [_column_to_json(df.iloc[:, j]) for j in range(df.shape[1])]
    rows = _CleanRows(map(list, zip(*cols))) if cols else _CleanRows([] for _ in range(len(df)))
    return {"columns": list(map(str, df.columns)), "index": _clean(list(df.index)), "data": rows}


def _frame_from_json(obj) -> pd.DataFrame | None:
    if obj is None:
        return None
    df = pd.DataFrame(obj["data"], columns=obj["columns"], index=obj["index"])
    return _numeric(df)


def _numeric(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy()
    for c in out.columns:
        conv = pd.to_numeric(out[c], errors="coerce")
        if conv.notna().sum() == out[c].notna().sum():
            out[c] = conv.astype(float) if conv.isna().any() else conv
    return out


@dataclass(frozen=True)
class FitResult:
    """The immutable result of :func:`nlmefit.fit`: estimates, objective value, uncertainty, individual estimates,
    predictions and residuals, provenance.

    ``ofv`` is −2 log L − n·log 2π (NONMEM's convention; ``loglik`` is the full log-likelihood, n the uncensored
    observations); ``estimates`` holds every parameter by reporting name (θ by name, ``omega_*`` variances,
    ``sigma_*`` SDs). Views: ``summary()``, ``theta``, ``omega``, ``sigma``, ``se``, ``conf_int()``,
    ``cov_params()``, ``individual_estimates``, ``predictions``; diagnostics ``plot_gof()``, ``vpc()``, ``npde()``
    …; ``tables()`` writes NONMEM-style tables; ``to_json``/``from_json`` save and load it. ``replace(...)`` and
    ``with_likelihood(...)`` return new results.
    """

    method: str
    options: dict
    estimates: pd.Series  # every parameter by reporting name, natural scale
    fixed: list[str]
    ofv: float
    loglik: float
    n_subjects: int
    n_obs: int
    n_estimated: int
    converged: bool
    n_iter: int
    elapsed_s: float
    messages: list[str] = field(default_factory=list)
    seed: int | None = None
    versions: dict = field(default_factory=dict)
    model_name: str = ""
    eta_names: list[str] = field(default_factory=list)
    covariance: pd.DataFrame | None = None  # of the free parameters
    covariance_ok: bool = False
    covariance_kind: str | None = None
    covariance_message: str = ""
    condition_number: float | None = None
    individual_estimates: pd.DataFrame | None = None
    predictions: pd.DataFrame | None = None
    eta_shrinkage: pd.Series | None = None
    epsilon_shrinkage: float | None = None
    likelihoods: Mapping[str, dict] = field(default_factory=dict)  # method -> ofv, m2ll, loglik, se, …
    traces: pd.DataFrame | None = field(default=None, compare=False)  # by iteration, one column per parameter
    phases: Mapping[str, int] = field(default_factory=dict)  # e.g. {"explore": 150}: last iteration of a phase
    acceptance: Mapping[str, float] = field(default_factory=dict)  # MCMC acceptance rates by kernel (SAEM)
    mcmc: pd.DataFrame | None = field(default=None, compare=False)  # sampler diagnostics (R-hat, ESS …)
    weights: Mapping[str, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)
    source: Mapping[str, Any] = field(default_factory=dict)  # how the data and model were given (CLI)
    initial: Mapping[str, Any] = field(default_factory=dict)  # starting values: values, source, method, notes
    warnings: list[str] = field(default_factory=list)  # plausibility warnings (nlmefit.results.checks)
    model_spec: Mapping[str, Any] = field(default_factory=dict, compare=False)  # saved spec (nlmefit.models.spec)
    model: Any = field(default=None, repr=False, compare=False)
    data: Any = field(default=None, repr=False, compare=False)  # the ModelData fitted (not serialised)
    posterior: Any = field(default=None, repr=False, compare=False)  # q(η_i): a Distribution, batch [N] (not saved)
    diagnostics: dict = field(default_factory=dict, repr=False, compare=False)  # cache of computed diagnostics

    # ------------------------------------------------------------------ views
    @property
    def aic(self) -> float:
        return -2 * self.loglik + 2 * self.n_estimated

    @property
    def bic(self) -> float:
        return -2 * self.loglik + self.n_estimated * math.log(self.n_obs)

    @property
    def params(self) -> pd.Series:
        return self.estimates

    @property
    def starts(self) -> pd.DataFrame | None:
        """One row per start of a multi-start fit (``n_starts`` > 1): its initial values, final OFV, whether its
        optimiser converged, its iterations; ``best`` marks the start the result comes from. None otherwise."""
        ms = (self.initial or {}).get("multistart")
        if not ms:
            return None
        frame = pd.DataFrame(ms["starts"])
        frame.insert(0, "start", range(len(frame)))
        frame["ofv"] = [np.nan if v is None else v for v in ms["ofv"]]
        frame["converged"], frame["n_iter"] = ms["converged"], ms["n_iter"]
        frame["best"] = frame["start"] == ms["best"]
        return frame

    parameter_estimates = params

    @property
    def minimization_successful(self) -> bool:
        return self.converged

    @property
    def posterior_draws(self) -> torch.Tensor | None:
        """η draws [S, N, q] when the posterior is a set of MCMC draws (SAEM, NUTS), else None."""
        return getattr(self.posterior, "draws", None)

    def replace(self, **changes) -> FitResult:
        """A new FitResult with ``changes`` applied (this one is left as it is)."""
        return dataclasses.replace(self, **changes)

    def with_likelihood(self, estimate) -> FitResult:
        """A new FitResult that also records ``estimate`` (a :class:`~nlmefit.marginal.LoglikEstimate`)."""
        return self.replace(likelihoods={**self.likelihoods, estimate.method: estimate.summary()})

    def population_parameters(self, dtype=torch.float64, device=None):
        """The estimates as :class:`~nlmefit.models.parameters.Params` for the attached model (tensor-valued
        weights from ``weights`` at full precision)."""
        if self.model is None:
            raise ValueError("this FitResult has no model attached (read from JSON?): use "
                             "FitResult.from_json(path, model=...)")
        p = self.model.parameters.params_from_dict(self.estimates.to_dict(), dtype=dtype, device=device)
        if self.weights:
            p.weights.update({k: v.to(dtype=dtype, device=device) for k, v in self.weights.items()})
        return p

    def plot_traces(self, params: list[str] | None = None, ncols: int = 3):
        """Convergence traces, one panel per population parameter; the end of the exploration phase is marked.
        Returns the matplotlib Figure (never shown)."""
        # matplotlib is imported only when plotting
        import matplotlib.pyplot as plt

        tr = self.traces
        if tr is None:
            raise ValueError(f"a {self.method} fit has no iteration traces (SAEM records them)")
        names = list(params or tr.columns)
        nrows = max(1, math.ceil(len(names) / ncols))
        fig, axes = plt.subplots(nrows, min(ncols, len(names)), figsize=(3.2 * min(ncols, len(names)), 2.4 * nrows),
                                 squeeze=False)
        k1 = self.phases.get("explore", self.phases.get("optimise"))  # SAEM / VEM: the end of the first phase
        for ax, n in zip(axes.ravel(), names):
            ax.plot(tr.index, tr[n], lw=1)
            if k1:
                ax.axvline(k1, color="grey", ls=":", lw=1)
            ax.set_title(n, fontsize=9)
            ax.set_xlabel("iteration", fontsize=8)
        for ax in axes.ravel()[len(names):]:
            ax.set_visible(False)
        fig.tight_layout()
        return fig

    @property
    def se(self) -> pd.Series:
        """Standard errors (NaN for fixed parameters or when the covariance step failed)."""
        out = pd.Series(np.nan, index=self.estimates.index, dtype=float)
        if self.covariance is not None and self.covariance_ok:
            d = np.sqrt(np.clip(np.diag(self.covariance.to_numpy()), 0, None))
            out.loc[list(self.covariance.index)] = d
        return out

    bse = se
    standard_errors = se

    def cov_params(self) -> pd.DataFrame | None:
        return self.covariance

    @property
    def correlation(self) -> pd.DataFrame | None:
        if self.covariance is None:
            return None
        s = np.sqrt(np.diag(self.covariance.to_numpy()))
        return self.covariance / np.outer(s, s)

    def conf_int(self, alpha: float = 0.05) -> pd.DataFrame:
        """Wald (1 − ``alpha``) intervals, estimate ± z·SE (statsmodels' convention)."""
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        z = norm.ppf(1 - alpha / 2)
        se = self.se
        return pd.DataFrame({"ci_low": self.estimates - z * se, "ci_high": self.estimates + z * se})

    def summary(self, alpha: float = 0.05) -> pd.DataFrame:
        """One row per parameter: estimate, se, rse_pct, ci_low, ci_high, fixed, then kind, label, variance
        (ω², σ²), %CV, shrinkage (:func:`nlmefit.results.summary.parameter_table`). Intervals of variances and
        SDs are on the log scale, the others Wald."""
        return parameter_table(self, alpha)

    @property
    def theta(self) -> pd.Series:
        return self.estimates[[n for n in self.estimates.index
                               if not n.startswith(("omega_", "sigma_"))]]

    @property
    def sigma(self) -> pd.Series:
        return self.estimates[[n for n in self.estimates.index if n.startswith("sigma_")]]

    @property
    def omega(self) -> pd.DataFrame:
        """Ω (IIV) as a DataFrame labelled by η names."""
        names = self.eta_names
        m = pd.DataFrame(0.0, index=names, columns=names)
        for a in names:
            m.loc[a, a] = self.estimates.get(f"omega_{a}", 0.0)
            for b in names:
                v = self.estimates.get(f"omega_{a}_{b}")
                if v is not None and not np.isnan(v):
                    m.loc[a, b] = m.loc[b, a] = v
        return m

    def __repr__(self) -> str:
        status = "converged" if self.converged else "NOT converged"
        return (f"<FitResult {self.method} {self.model_name}: OFV {self.ofv:.4f} ({status}), "
                f"{self.n_subjects} subjects, {self.n_obs} observations, {self.n_estimated} estimated>")

    def _repr_html_(self) -> str:
        return fit_result_html(self)

    def print_summary(self, decimals: int = 4) -> None:
        print(self.summary_text(decimals))

    def summary_text(self, decimals: int = 4) -> str:
        """The printed summary (:func:`nlmefit.results.summary.summary_text`)."""
        return summary_text(self, decimals)

    # ------------------------------------------------------------------ diagnostics (nlmefit.diagnostics)
    def plot_gof(self, **kwargs):
        """DV vs PRED/IPRED, CWRES vs TIME/PRED (see :func:`nlmefit.diagnostics.plot_gof`)."""
        return dg.plot_gof(self, **kwargs)

    def plot_individuals(self, **kwargs):
        """Paged individual fits (see :func:`nlmefit.diagnostics.plot_individuals`)."""
        return dg.plot_individuals(self, **kwargs)

    def plot_eta(self, covariates: bool = False, **kwargs):
        """η̂ distributions, or η̂ against covariates with ``covariates=True``."""
        return dg.plot_eta_covariates(self, **kwargs) if covariates else dg.plot_eta_distributions(self, **kwargs)

    def npde(self, **kwargs):
        """NPDE by simulation from this fit (see :func:`nlmefit.diagnostics.npde`)."""
        return dg.npde(self, **kwargs)

    def vpc(self, **kwargs):
        """(pc)VPC by simulation from this fit (see :func:`nlmefit.diagnostics.vpc`)."""
        return dg.vpc(self, **kwargs)

    def decomposition(self, posterior=None, **kwargs):
        """Per-subject Q_i, KL_i, ELBO_i, log p(y_i), gap_i and the aggregate-posterior check, with this fit's
        posterior unless ``posterior`` is given (see :func:`nlmefit.diagnostics.decomposition`)."""
        return dg.decomposition(self, posterior=posterior, **kwargs)

    def one_step_ahead(self, **kwargs):
        """log p(y_j | y_<j, doses) per observation, per subject and in total (see
        :func:`nlmefit.diagnostics.one_step_ahead`)."""
        return dg.one_step_ahead(self, **kwargs)

    # ------------------------------------------------------------------ prediction
    def predict(self, new_data, individual: bool = False) -> pd.DataFrame:
        """Population predictions (PRED) for a DataFrame/Panel in the model's record layout; with
        ``individual=True`` subjects whose ID was fitted also get IPRED from their η̂."""
        if self.model is None:
            raise ValueError("this FitResult has no model attached (it was read from JSON): pass "
                             "FitResult.from_json(path, model=...) to predict")
        panel = new_data if isinstance(new_data, Panel) else Panel.from_dataframe(new_data, require_dv=False)
        data = self.model.prepare(panel)
        p = self.population_parameters()
        eta0 = torch.zeros(data.n_subjects, data.q, dtype=torch.float64)
        with torch.no_grad():
            f0, _ = self.model.predict(p, eta0, data)
            out = {"PRED": self.model.error.untransform(f0)}
            if individual and self.individual_estimates is not None:
                ie = self.individual_estimates.set_index("ID")
                cols = [c for c in ie.columns if c.startswith("ETA_")]
                eta = torch.tensor(np.stack([ie.loc[i, cols].to_numpy(float) if i in ie.index
                                             else np.zeros(len(cols)) for i in panel.ids]), dtype=torch.float64)
                fi, _ = self.model.predict(p, eta[:, : data.q], data)
                out["IPRED"] = self.model.error.untransform(fi)
        mk = panel.obs_mask
        ids = np.broadcast_to(np.asarray(panel.ids)[:, None], mk.shape)
        frame = pd.DataFrame({"ROW": panel.obs_row[mk], "ID": ids[mk], "TIME": panel.obs_time[mk]})
        for k, v in out.items():
            frame[k] = v.cpu().numpy()[mk]
        return frame.sort_values("ROW", kind="stable").reset_index(drop=True)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        se = self.se
        return _clean({
            "schema_version": SCHEMA_VERSION,
            "method": self.method, "model": self.model_name, "options": {k: repr(v) if not isinstance(
                v, (int, float, str, bool, type(None))) else v for k, v in self.options.items()},
            "seed": self.seed, "versions": self.versions,
            "ofv": self.ofv, "loglik": self.loglik, "aic": self.aic, "bic": self.bic,
            "n_subjects": self.n_subjects, "n_obs": self.n_obs, "n_estimated": self.n_estimated,
            "converged": self.converged, "n_iter": self.n_iter, "elapsed_s": self.elapsed_s,
            "messages": self.messages,
            "estimates": self.estimates.to_dict(),
            "se": {k: (None if np.isnan(v) else float(v)) for k, v in se.items()},
            "fixed": self.fixed, "eta_names": self.eta_names,
            "covariance_ok": self.covariance_ok, "covariance_kind": self.covariance_kind,
            "covariance_message": self.covariance_message, "condition_number": self.condition_number,
            "covariance": _frame_to_json(self.covariance),
            "individual_estimates": _frame_to_json(self.individual_estimates),
            "predictions": _frame_to_json(self.predictions),
            "eta_shrinkage": None if self.eta_shrinkage is None else self.eta_shrinkage.to_dict(),
            "epsilon_shrinkage": self.epsilon_shrinkage,
            "likelihoods": dict(self.likelihoods),
            "traces": _frame_to_json(None if self.traces is None else self.traces.reset_index()),
            "phases": dict(self.phases), "acceptance": dict(self.acceptance),
            "mcmc": _frame_to_json(self.mcmc),
            "weights": {k: list(v.shape) for k, v in self.weights.items()},
            "source": dict(self.source),
            "initial": dict(self.initial),
            "warnings": list(self.warnings),
            "model_spec": model_spec_of(self.model) if self.model is not None else (dict(self.model_spec) or None),
        })

    def to_json(self, path: str | os.PathLike) -> None:
        """Write atomically (temporary file in the same folder, then rename). Tensor-valued weights go to a
        ``.pt`` file beside it (same stem), and predictions / individual estimates of more than
        :data:`EMBED_ROWS` rows to ``<stem>.<table>.npz`` (one array per column, read back without unpickling),
        all written first, so a JSON file never names a file that is not there. (A million subjects' predictions
        as JSON would be a 2 GB file needing ~10 GB of Python objects to write or read.)"""
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        if self.weights:
            state = {k: v.detach().cpu().clone() for k, v in self.weights.items()}
            _atomic_write(_weights_path(path), lambda fh: torch.save(state, fh), binary=True)
        big = {k: getattr(self, k) for k in _EXTERNAL
               if getattr(self, k) is not None and len(getattr(self, k)) > EMBED_ROWS}
        for name, df in big.items():
            _write_frame_file(df, _frame_path(path, name))
        d = (self.replace(**{k: None for k in big}) if big else self).to_dict()
        for name, df in big.items():
            d[name] = {"file": os.path.basename(_frame_path(path, name)), "columns": list(map(str, df.columns)),
                       "rows": len(df)}
        # indented for reading; compact above 20 000 predictions (the C encoder: ~10x faster on 10^6 numbers)
        indent = 1 if self.predictions is None or len(self.predictions) <= 20_000 else None
        _atomic_write(path, lambda fh: fh.write(json.dumps(d, indent=indent, allow_nan=False)))

    def tables(self, out_dir: str | os.PathLike, **kw) -> list:
        """NONMEM-style ``sdtab``, ``patab``, ``cotab``/``catab``, ``run.ext`` and a name map in ``out_dir``
        (see :func:`nlmefit.results.tables.write_tables` for ``run``, ``prefix``, ``firstonly``); returns the
        paths written."""
        # local import: nlmefit.results.tables imports this module (a cycle at module level)
        from nlmefit.results.tables import write_tables

        return write_tables(self, out_dir, **kw)

    @classmethod
    def from_dict(cls, d: dict, model=None, weights: Mapping[str, torch.Tensor] | None = None,
                  restore_model: bool = False, where: str = "result") -> FitResult:
        """A FitResult from :meth:`to_dict`'s output, validated first (:mod:`nlmefit.results.schema`: a
        ValueError names the key and what is wrong). With ``restore_model`` (the default of :meth:`from_json`)
        and no ``model``, the model is rebuilt from the saved specification when it can be; when it cannot, a
        warning says why and ``model`` stays None."""
        version = validate_result(d, where=where)
        if version == 1:
            d = _upgrade_v1(d)
        spec = dict(d.get("model_spec") or {})
        if model is None and restore_model and spec:
            model, why = restore_model_spec(spec)
            if why is not None:
                warnings.warn(f"{where}: model not restored: {why}", stacklevel=2)
        nan = float("nan")

        def num(x) -> float:
            return nan if x is None else float(x)

        est = pd.Series({k: (nan if v is None else float(v)) for k, v in d["estimates"].items()}, dtype=float)
        cov = _frame_from_json(d.get("covariance"))
        return cls(
            method=d["method"], options=d.get("options", {}), estimates=est, fixed=list(d.get("fixed", [])),
            ofv=num(d["ofv"]), loglik=num(d["loglik"]), n_subjects=int(d["n_subjects"]),
            n_obs=int(d["n_obs"]), n_estimated=int(d["n_estimated"]), converged=bool(d["converged"]),
            n_iter=int(d["n_iter"]), elapsed_s=num(d["elapsed_s"]), messages=list(d.get("messages", [])),
            seed=d.get("seed"), versions=d.get("versions", {}), model_name=d.get("model", ""),
            eta_names=list(d.get("eta_names", [])), covariance=None if cov is None else cov.astype(float),
            covariance_ok=bool(d.get("covariance_ok")), covariance_kind=d.get("covariance_kind"),
            covariance_message=d.get("covariance_message", ""), condition_number=d.get("condition_number"),
            individual_estimates=_frame_from_json(d.get("individual_estimates")),
            predictions=_frame_from_json(d.get("predictions")),
            eta_shrinkage=None if d.get("eta_shrinkage") is None else pd.Series(d["eta_shrinkage"], dtype=float),
            epsilon_shrinkage=d.get("epsilon_shrinkage"), likelihoods=dict(d.get("likelihoods") or {}),
            traces=_traces_from_json(d.get("traces")), phases=dict(d.get("phases") or {}),
            acceptance=dict(d.get("acceptance") or {}), mcmc=_frame_from_json(d.get("mcmc")),
            weights=dict(weights or {}), source=dict(d.get("source") or {}), model=model,
            initial=dict(d.get("initial") or {}), warnings=list(d.get("warnings") or []),
            model_spec=spec,
        )

    @classmethod
    def from_json(cls, path: str | os.PathLike, model=None, restore_model: bool = True) -> FitResult:
        """Read a result written by :meth:`to_json` (weights from the ``.pt`` beside it, loaded with
        ``torch.load(weights_only=True)``: no code is unpickled). An empty, truncated or edited file raises
        ValueError naming what is wrong. Without ``model``, the model is rebuilt from the saved specification
        (:mod:`nlmefit.models.spec`) when it can be, else a warning says why; ``restore_model=False`` skips that
        (a custom model's specification imports its module: use it for results you do not trust)."""
        path = os.fspath(path)
        d = load_result_json(path)
        frames = {}
        for name in _EXTERNAL:  # tables written beside the JSON (np.load without pickle)
            obj = d.get(name)
            if isinstance(obj, dict) and "file" in obj:
                frames[name] = _read_frame_file(os.path.join(os.path.dirname(os.path.abspath(path)), obj["file"]),
                                                obj, path)
                d = {**d, name: None}
        weights = None
        if d.get("weights"):
            wpath = _weights_path(path)
            if not os.path.exists(wpath):
                raise ValueError(f"{path} names tensor-valued weights {sorted(d['weights'])} but {wpath} is missing")
            weights = torch.load(wpath, map_location="cpu", weights_only=True)
        res = cls.from_dict(d, model=model, weights=weights, restore_model=restore_model, where=path)
        return res.replace(**frames) if frames else res


def _frame_path(path: str, name: str) -> str:
    stem = path[:-5] if path.endswith(".json") else path
    return f"{stem}.{name}.npz"


def _write_frame_file(df: pd.DataFrame, fpath: str) -> None:
    """``df`` as an ``.npz``: one array per column (text columns as fixed-width unicode), and the index."""
    arrays = {"index": np.asarray(df.index)}
    for j in range(df.shape[1]):
        v = df.iloc[:, j].to_numpy()
        arrays[f"c{j}"] = v.astype(str) if v.dtype == object else v
    _atomic_write(fpath, lambda fh: np.savez(fh, **arrays), binary=True)


def _read_frame_file(fpath: str, meta: dict, where: str) -> pd.DataFrame:
    """The table :func:`_write_frame_file` wrote (``allow_pickle=False``: data only), checked against ``meta``."""
    if not os.path.exists(fpath):
        raise ValueError(f"{where} keeps a table in {fpath}, which is missing")
    cols = list(meta["columns"])
    try:
        with np.load(fpath, allow_pickle=False) as z:
            df = pd.DataFrame({c: z[f"c{j}"] for j, c in enumerate(cols)}, index=z["index"])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:  # truncated, edited or not an .npz
        raise ValueError(f"{fpath} (a table of {where}) cannot be read: {err}") from None
    if len(df) != int(meta["rows"]):
        raise ValueError(f"{fpath} holds {len(df)} rows but {where} says {meta['rows']}")
    return df


def _weights_path(path: str) -> str:
    stem = path[:-5] if path.endswith(".json") else path
    return stem + ".pt"


def _traces_from_json(obj) -> pd.DataFrame | None:
    df = _frame_from_json(obj)
    return None if df is None else df.set_index("iteration")


def _upgrade_v1(d: dict) -> dict:
    """Schema 1 kept likelihoods, traces and the CLI provenance in ``extra``."""
    d = dict(d)
    extra = d.pop("extra", None) or {}
    d["likelihoods"] = extra.get("likelihoods", {})
    t = extra.get("traces")
    if t is not None:
        d["traces"] = {"columns": t["columns"], "index": list(range(len(t["data"]))), "data": t["data"]}
    if extra.get("n_explore") is not None:
        d["phases"] = {"explore": extra["n_explore"]}
    d["acceptance"] = extra.get("acceptance", {})
    d["source"] = extra.get("cli", {})
    return d
