"""The latent-variable model every estimator talks to.

For subject i with random effects η_i (IIV, then one block of IOV effects κ per occasion):

    log p(y_i | η_i, θ)   — :meth:`Model.log_lik`, per subject, masks honoured, M3 for censored records
    log p(η_i | θ)        — :meth:`Model.log_prior`, N(0, blockdiag(Ω, I_K ⊗ Ω_IOV))
    f_ij, Var(y_ij | η_i) — :meth:`Model.predict` (the one extra method the FO/FOCE linearisation needs)

All three broadcast over leading sample dimensions of η (``[..., N, q]``) and over per-subject copies of the
population parameters (``theta[k]`` of shape ``[N]``, ``omega`` of shape ``[N, q, q]``), which is how the
covariance step gets per-subject gradients from one backward pass. No estimator sees a PK formula; no PK
formula sees an estimator.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping

import numpy as np
import torch

from nlmefit.errors import DataError, ModelSpecError
from nlmefit.models.data import ModelData
from nlmefit.models.error import LOG_2PI, ErrorModel, get_error_model, obs_loglik
from nlmefit.models.formula import Term, parse_formula
from nlmefit.models.parameters import Omega, Param, ParameterSet, Params
from nlmefit.models.structure import OPTIONAL_PK_PARAMS, FunctionStructure, Structure
from nlmefit.panel import Panel

__all__ = ["Model", "ModelData"]

ParamsFn = Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]],
                    Mapping[str, torch.Tensor]]


class Model:
    """A nonlinear mixed-effects model: structure + individual-parameter model + IIV/IOV + residual error.

    Parameters
    ----------
    structure : a :class:`~nlmefit.models.structure.Structure` (see :mod:`nlmefit.models.library`).
    theta : typical values / fixed effects, ``{name: value | Param}``; positive by default for structural
        parameters of the default (log-normal) parameter model.
    omega : IIV variances ``{param: variance}`` or an :class:`Omega` (blocks, FIX).
    sigma : residual SDs by the error model's names (``add``, ``prop``).
    error : ``additive``, ``proportional``, ``combined1``, ``combined2`` or ``exponential``.
    params : optional NONMEM ``$PK``-style function ``params(theta, eta, covariates) -> {param: tensor}``. Without
        it, every structural parameter is ``theta[p] * exp(eta[p] + Σ beta·term(covariates))``.
    covariates : formulas per parameter, ``{"cl": "log(WT/70)"}`` (default parameter model only).
    iov : inter-occasion variances ``{param: variance}`` or an :class:`Omega`; needs an OCC column.
    dvid : which DVID value holds this model's observations when the data has several.
    """

    def __init__(
        self,
        structure: Structure,
        theta: Mapping[str, float | Param],
        omega: Mapping[str, float] | Omega,
        sigma: Mapping[str, float | Param] | None = None,
        error: str | ErrorModel = "additive",
        params: ParamsFn | None = None,
        covariates: Mapping[str, str | list[str]] | None = None,
        iov: Mapping[str, float] | Omega | None = None,
        dvid: object = None,
        name: str | None = None,
    ) -> None:
        self.structure = structure
        self.error = get_error_model(error)
        self.params_fn = params
        self.dvid = dvid
        self.name = name or structure.name
        self.terms: list[Term] = []
        omega = omega if isinstance(omega, Omega) else Omega(dict(omega))
        iov_spec = None if iov is None else (iov if isinstance(iov, Omega) else Omega(dict(iov)))
        theta = dict(theta)
        if params is None:
            known = set(structure.param_names) | set(OPTIONAL_PK_PARAMS)
            for p in structure.param_names:
                if p not in theta:
                    raise ModelSpecError(f"model {self.name}: no typical value (theta) for parameter {p!r}")
            for k in theta:
                if k not in known:
                    raise ModelSpecError(f"model {self.name}: theta {k!r} is not a parameter of this structure "
                                         f"({sorted(known)}); use params=... for custom parameter models")
            for k, v in list(theta.items()):  # typical values of log-normal parameters are positive
                if not isinstance(v, Param):
                    theta[k] = Param(float(v), lower=0.0)
            for spec, what in ((omega, "omega"), (iov_spec, "iov")):
                for n in [] if spec is None else spec.names:
                    if n not in theta:
                        raise ModelSpecError(f"{what} names {n!r}, which has no theta (parameters: {sorted(theta)})")
            for p, formula in (covariates or {}).items():
                if p not in theta:
                    raise ModelSpecError(f"covariate formula for {p!r}, which is not a parameter ({sorted(theta)})")
                for t in parse_formula(p, formula):
                    self.terms.append(t)
                    theta.setdefault(t.coef, Param(0.0))
        elif covariates:
            raise ModelSpecError("give covariate effects either as formulas (covariates=) or inside params=, not both")
        if sigma is None:
            sigma = {k: 1.0 if k == "add" else 0.1 for k in self.error.sigma_names}
        if set(sigma) != set(self.error.sigma_names):
            raise ModelSpecError(f"error model {self.error.name!r} takes sigma {list(self.error.sigma_names)}, "
                                 f"got {sorted(sigma)}")
        self.parameters = ParameterSet(theta, omega, sigma, iov_spec)

    # ------------------------------------------------------------------ introspection
    @property
    def eta_names(self) -> list[str]:
        return self.parameters.eta_names

    @property
    def n_iiv(self) -> int:
        return len(self.parameters.eta_names)

    @property
    def n_iov(self) -> int:
        return len(self.parameters.iov_names)

    def initial_params(self, dtype=torch.float64, device=None) -> Params:
        return self.parameters.initial(dtype, device)

    def with_initial(self, params: Params) -> Model:
        """A copy of the model whose initial values are ``params``."""
        new = object.__new__(Model)
        new.__dict__.update(self.__dict__)
        new.parameters = self.parameters.with_values(params)
        return new

    def __repr__(self) -> str:
        p = self.parameters
        return (f"Model({self.name}, error={self.error.name}, theta={list(p.theta)}, eta={p.eta_names}"
                + (f", iov={p.iov_names}" if p.iov_names else "") + ")")

    # ------------------------------------------------------------------ data binding (the boundary)
    def prepare(self, panel, device=None, dtype=torch.float64, check_likelihood: bool = True) -> ModelData:
        """Bind a :class:`~nlmefit.panel.Panel` to this model, checking every model/data mismatch here.

        With ``check_likelihood`` a non-finite likelihood at the initial values is warned about (not for
        simulation templates, whose DV are missing)."""
        if not isinstance(panel, Panel):
            panel = Panel.from_dataframe(panel)
        if panel.n_subjects == 0:
            raise DataError("no subject has an observation to fit")
        kw = dict(device=device, dtype=dtype)
        oral = self.structure.oral
        if oral:
            route = (panel.dose_cmt == 1).astype(np.int64) if panel.has_cmt else np.ones_like(panel.dose_cmt)
        else:
            route = np.zeros_like(panel.dose_cmt)
        real = panel.dose_mask
        bad_inf = real & (route == 1) & (panel.dose_rate != 0)
        if bad_inf.any():
            i, d = np.argwhere(bad_inf)[0]
            raise ModelSpecError(f"ID {panel.ids[i]} TIME {panel.dose_time[i, d]}: infusion into the depot "
                                 f"(CMT 1) is not supported by {self.name}; give the dose to CMT 2 or as a bolus")
        events = panel.to_events(route, device=device, dtype=dtype)
        mask_np = panel.obs_mask.copy()
        dvids = np.unique(panel.obs_dvid[panel.obs_mask])
        if self.dvid is not None:
            code = self._dvid_code(panel)
            mask_np &= panel.obs_dvid == code
            if not mask_np.any():
                raise ModelSpecError(f"no observation has DVID {self.dvid!r}")
        elif len(dvids) > 1:
            raise ModelSpecError(f"the data has several DVID values ({self._dvid_labels(panel, dvids)}); "
                                 f"say which one this model describes with Model(..., dvid=...)")
        if check_likelihood:
            self._check_doses(panel, mask_np)
        dv = panel.dv
        if self.error.log_scale and check_likelihood:  # simulation templates may carry no DV at all
            bad = mask_np & (panel.cens == 0) & ~(dv > 0)
            if bad.any():
                i, j = np.argwhere(bad)[0]
                raise DataError(f"column DV, ID {panel.ids[i]} TIME {panel.obs_time[i, j]}: the exponential "
                                f"(log-transform-both-sides) error model needs DV > 0, got {dv[i, j]}")
        y = torch.as_tensor(np.where(mask_np, dv, 1.0 if self.error.log_scale else 0.0), **kw)
        y = self.error.transform(y)
        y = torch.where(torch.as_tensor(mask_np, device=device), y, torch.zeros_like(y))
        cens_np = np.where(mask_np, panel.cens, 0).astype(np.int64)
        lim_np = np.where(cens_np != 0, panel.limit, 1.0 if self.error.log_scale else 0.0)
        limit = self.error.transform(torch.as_tensor(lim_np, **kw))
        names = list(panel.covariate_names)
        used = self._check_dose_record_covariates(panel, self.used_covariates(panel))
        varying = [n for k, n in enumerate(names) if n in used and bool(
            (np.abs(panel.obs_covariates[:, :, k] - panel.covariates[:, None, k]) > 0)[mask_np].any())]
        per_obs = bool(varying) or self.n_iov > 0
        if per_obs and not self.structure.per_observation:
            what = (f"the covariate{'s' if len(varying) > 1 else ''} {', '.join(varying)} it uses change"
                    f"{'' if len(varying) > 1 else 's'} within a subject" if varying else "the model has IOV")
            raise ModelSpecError(f"{self.name} solves an ODE with per-subject parameters, but {what}; time-varying "
                                 f"covariates and IOV need a closed-form structure in this version")
        if per_obs:
            cov = {n: torch.as_tensor(panel.obs_covariates[:, :, k], **kw) for k, n in enumerate(names)}
        else:
            cov = {n: torch.as_tensor(panel.covariates[:, k:k + 1], **kw) for k, n in enumerate(names)}
        n_occ = int(panel.n_occasions) if self.n_iov else 0
        if self.n_iov and n_occ < 1:
            raise ModelSpecError("the model has inter-occasion variability but the data has no OCC column")
        q = self.n_iiv + n_occ * self.n_iov
        data = ModelData(panel=panel, y=y, mask=torch.as_tensor(mask_np, device=device),
                         cens=torch.as_tensor(cens_np, device=device), limit=limit, q=q, n_occ=n_occ,
                         events=events, cov=cov, occ=torch.as_tensor(panel.obs_occ, device=device,
                                                                     dtype=torch.int64), per_obs=per_obs)
        self._dry_run(data, check_likelihood)
        return data

    def used_covariates(self, panel: Panel) -> set[str]:
        """The covariate columns of ``panel`` this model reads: only these decide whether the data need the
        per-observation path (time-varying covariates), so an unused column (``LNDV``, true-parameter columns,
        ``DOSE_MGKG``) never makes an ODE model refuse the data nor slows a closed form down.

        Formula terms name their columns (matched as the formula does: exactly, else case-insensitively; an
        ambiguous name counts for every match). A ``params=`` function is traced once on the baseline covariates
        with a mapping that records the keys it reads. A function that cannot be traced that way (it iterates
        the mapping or takes its length, or raises on the baseline values) keeps the conservative rule: every
        column counts. The trace assumes what docs/models.md asks for, tensor code without Python branches on
        covariate values; a function that reads other columns on other values would be mis-classified."""
        names = list(panel.covariate_names)
        if self.params_fn is None:
            used: set[str] = set()
            for t in self.terms:
                for c in t.covariates:
                    exact = [n for n in names if n == c]
                    used.update(exact or [n for n in names if str(n).strip().lower() == c.lower()])
            return used
        dtype = torch.float64
        p = self.initial_params(dtype)
        theta = {k: (v if v.dim() == 0 else v.unsqueeze(-1)) for k, v in p.theta.items()}
        n = panel.n_subjects
        etas = {e: torch.zeros(n, 1, dtype=dtype) for e in [*self.eta_names, *self.parameters.iov_names]}
        rec = _RecordingCovariates({c: torch.as_tensor(panel.covariates[:, k:k + 1], dtype=dtype)
                                    for k, c in enumerate(names)})
        try:
            with torch.no_grad():
                self.params_fn(theta, etas, rec)
        except Exception:  # noqa: BLE001 - the dry run reports the error; here it only means "cannot tell"
            return set(names)
        return set(names) if rec.enumerated else rec.used

    def _check_dose_record_covariates(self, panel: Panel, used: set[str]) -> set[str]:
        """A used column that is non-zero only on dose records (Panel.dose_record_covariates) is either the
        subject's time-constant value (said once, by a warning) or dose information, which a covariate model
        cannot use: a DataError naming the column and the subject. Returns ``used``."""
        for name, bad_id in (getattr(panel, "dose_record_covariates", None) or {}).items():
            if name not in used:
                continue
            if bad_id is not None:
                raise DataError(f"column {name}, ID {bad_id}: the column is non-zero only on dose records and "
                                f"differs between this subject's doses, so it is dose information (like AMT), not "
                                f"a covariate; {self.name} uses it as a covariate. Use a per-subject column (e.g. "
                                f"the first dose's value on every record) or drop it from the model")
            warnings.warn(f"column {name} is non-zero only on dose records and constant within each subject: it is "
                          f"used as a time-constant covariate (each subject's dose-record value on every record), "
                          f"not as one that drops to 0 between doses", UserWarning, stacklevel=3)
        return used

    @property
    def costly_predictions(self) -> bool:
        """Whether a prediction costs far more than autograd through it (the structure's ``costly``: the ODE path),
        so that an estimator should spend autograd work to save predictions."""
        return bool(getattr(self.structure, "costly", False))

    @property
    def needs_doses(self) -> bool:
        """Whether the structure's predictions come from the dose records (every PK structure). A structure
        whose formula contains the dose (:class:`~nlmefit.models.structure.FunctionStructure`, e.g. Wang 2007's
        ``10·exp(−ke·t)``) does not; a custom Structure says so with a ``needs_doses`` attribute."""
        return bool(getattr(self.structure, "needs_doses", not isinstance(self.structure, FunctionStructure)))

    def _check_doses(self, panel: Panel, obs_mask: np.ndarray) -> None:
        """A PK structure predicts 0 for a subject without a dose: the fit would not move (the typical data-set
        mistake is a column map that missed AMT, or dose rows dropped), so it is a DataError here."""
        if not self.needs_doses:
            return
        dosed = (panel.dose_mask & ((panel.dose_amt != 0) | (panel.dose_rate != 0))).any(axis=1)
        bad = obs_mask.any(axis=1) & ~dosed
        if not bad.any():
            return
        ids = [_py_id(i) for i in np.asarray(panel.ids)[bad]]
        shown = ", ".join(map(str, ids[:10])) + (f" … ({len(ids)} in all)" if len(ids) > 10 else "")
        rule = "a dose record (EVID 1 or 4 with AMT or RATE ≠ 0)"
        if bad.sum() == np.sum(obs_mask.any(axis=1)):
            what = f"no subject has {rule} (IDs {shown})"
        else:
            what = f"ID {shown} {'has' if len(ids) == 1 else 'have'} no {rule[2:]}"
        raise DataError(f"{what}, but {self.name} is a PK model whose predictions come from the doses; check the "
                        f"AMT/EVID columns (a column map that missed the dose?), or drop subjects without doses")

    def _dvid_code(self, panel) -> int:
        levels = getattr(panel, "dvid_levels", None) or {}
        if isinstance(levels, dict) and self.dvid in levels:
            return int(levels[self.dvid])
        try:
            return int(self.dvid)
        except (TypeError, ValueError):
            raise ModelSpecError(f"DVID {self.dvid!r} is not in the data ({list(levels) or 'numeric codes'})")

    @staticmethod
    def _dvid_labels(panel, codes) -> list:
        levels = getattr(panel, "dvid_levels", None) or {}
        inv = {v: k for k, v in levels.items()} if isinstance(levels, dict) else {}
        return [inv.get(int(c), int(c)) for c in codes]

    def _dry_run(self, data: ModelData, check_likelihood: bool = True) -> None:
        p = self.initial_params(data.y.dtype, data.y.device)
        eta = torch.zeros(data.n_subjects, data.q, dtype=data.y.dtype, device=data.y.device)
        try:
            ind = self.individual_parameters(p, eta, data)
        except KeyError as e:
            raise ModelSpecError(f"the parameter model of {self.name} asks for {e.args[0]!r}, which is neither a "
                                 f"theta, an eta nor a data covariate ({sorted(data.cov)})") from None
        missing = [k for k in self.structure.param_names if k not in ind]
        if missing:
            raise ModelSpecError(f"the parameter model of {self.name} does not define {missing}")
        rates = data.events.dose_rate[data.events.dose_mask]
        if bool((rates == -2).any()) and "dur" not in ind:
            raise ModelSpecError("the data has RATE=-2 (modelled duration) but the model defines no 'dur'")
        if bool((rates == -1).any()) and "rate" not in ind:
            raise ModelSpecError("the data has RATE=-1 (modelled rate) but the model defines no 'rate'")
        if not check_likelihood:
            return
        with torch.no_grad():
            f, var = self.predict(p, eta, data)
        bad = data.mask & ~(torch.isfinite(f) & torch.isfinite(var) & (var > 0))
        if bool(bad.any()):
            i, j = [int(x) for x in torch.nonzero(bad)[0]]
            warnings.warn(f"at the initial values, ID {data.panel.ids[i]} TIME {data.panel.obs_time[i, j]} has "
                          f"prediction {float(f[i, j]):.4g} and residual variance {float(var[i, j]):.4g}; the "
                          f"likelihood is not finite there (a proportional error at a zero prediction?)",
                          stacklevel=3)

    # ------------------------------------------------------------------ the interface
    def individual_parameters(self, p: Params, eta: torch.Tensor, data: ModelData) -> dict[str, torch.Tensor]:
        """Structural parameters per subject ([..., N, 1]) or per observation ([..., N, J])."""
        theta = {k: (v if v.dim() == 0 else v.unsqueeze(-1)) for k, v in p.theta.items()}
        d = self.n_iiv
        etas = {n: eta[..., :, k:k + 1] for k, n in enumerate(self.eta_names)}
        if self.n_iov:
            r = self.n_iov
            kappa = eta[..., :, d:].reshape(*eta.shape[:-1], data.n_occ, r)  # [..., N, K, r]
            occ = data.occ.clamp(0, data.n_occ - 1)
            idx = occ.expand(*eta.shape[:-2], *occ.shape).unsqueeze(-1).expand(*eta.shape[:-2], *occ.shape, r)
            per_obs = torch.gather(kappa, -2, idx)  # [..., N, J, r]
            for k, n in enumerate(self.parameters.iov_names):
                etas[n] = etas.get(n, 0.0) + per_obs[..., k]
        if self.params_fn is not None:
            return dict(self.params_fn(theta, etas, data.cov))
        out = {}
        for name in self.parameters.theta:
            if name.startswith("beta_") and any(t.coef == name for t in self.terms):
                continue
            lin = etas.get(name, None)
            for t in self.terms:
                if t.param == name:
                    eff = theta[t.coef] * t.evaluate(data.cov)
                    lin = eff if lin is None else lin + eff
            out[name] = theta[name] if lin is None else theta[name] * torch.exp(lin)
        return out

    def mu_reference(self, p: Params, data: ModelData) -> torch.Tensor:
        """μ_i [N, q]: for each IIV component, the per-subject shift that enters the parameter as η does.

        In the default parameter model log p_i = log θ_p + Σ β·x_i + η_p, so the individual log-parameter is
        ψ_i = μ_i + η_i (Monolix's "mu-referencing"). EM-type estimators sample ψ instead of η, which makes the
        θ update a regression and speeds them up; any μ is *valid* (η = ψ − μ is just a change of variables),
        so components without such a structure (IOV, user ``params=`` functions, parameters that may be
        negative, time-varying covariate terms) get μ = 0."""
        n = data.n_subjects
        cols = []
        for name in self.eta_names:
            mu = torch.zeros(n, dtype=p.omega.dtype, device=p.omega.device)
            par = self.parameters.theta.get(name)
            if self.params_fn is None and par is not None and par.lower >= 0:
                mu = mu + torch.log(p.theta[name])
                for t in self.terms:
                    if t.param == name:
                        x = t.evaluate(data.cov)
                        if x.dim() == 2 and x.shape[-1] == 1:
                            mu = mu + p.theta[t.coef] * x[:, 0]
            cols.append(mu)
        cols += [torch.zeros(n, dtype=p.omega.dtype, device=p.omega.device)] * (data.q - self.n_iiv)
        return torch.stack(cols, -1)

    def predict(self, p: Params, eta: torch.Tensor, data: ModelData) -> tuple[torch.Tensor, torch.Tensor]:
        """Prediction f and residual variance on the likelihood scale, both [..., N, J]."""
        ind = self.individual_parameters(p, eta, data)
        lead = eta.shape[:-2]
        n, j = data.y.shape
        if lead:
            s = int(np.prod(lead))
            ind = {k: _fold(v, lead, n) for k, v in ind.items()}
            events = data.events.index(torch.arange(n, device=data.y.device).repeat(s))
        else:
            events = data.events
        conc = self.structure.predict(ind, events)
        if lead:
            conc = conc.reshape(*lead, n, j)
        if self.error.log_scale:
            safe = torch.where(data.mask, conc, torch.ones_like(conc))
            f = torch.log(safe)
            var = self.error.variance(f, p.sigma)
        else:
            f = conc
            var = self.error.variance(conc, p.sigma)
        return f, var.expand_as(f)

    def obs_log_lik(self, p: Params, eta: torch.Tensor, data: ModelData, mask: torch.Tensor | None = None):
        """Per-observation log p(y_ij | η_i, θ), [..., N, J]."""
        f, var = self.predict(p, eta, data)
        m = data.mask if mask is None else data.mask & mask
        return obs_loglik(data.y, f, var, m, data.cens, data.limit)

    def log_lik(self, p: Params, eta: torch.Tensor, data: ModelData, mask: torch.Tensor | None = None):
        """log p(y_i | η_i, θ) per subject, [..., N] (full constants included)."""
        return self.obs_log_lik(p, eta, data, mask).sum(-1)

    def prior_covariance(self, p: Params, n_occ: int) -> torch.Tensor:
        """blockdiag(Ω, I_K ⊗ Ω_IOV), [..., q, q]."""
        if not self.n_iov or n_occ == 0:
            return p.omega
        d, r = self.n_iiv, self.n_iov
        q = d + n_occ * r
        batch = torch.broadcast_shapes(p.omega.shape[:-2], p.omega_iov.shape[:-2])
        out = torch.zeros(*batch, q, q, dtype=p.omega.dtype, device=p.omega.device)
        out[..., :d, :d] = p.omega
        for k in range(n_occ):
            s = d + k * r
            out[..., s:s + r, s:s + r] = p.omega_iov
        return out

    def log_prior(self, p: Params, eta: torch.Tensor, n_occ: int = 0) -> torch.Tensor:
        """log N(η_i; 0, Ω_full) per subject, [..., N]."""
        cov = self.prior_covariance(p, n_occ)
        L = torch.linalg.cholesky(cov)
        if L.dim() == 3:  # per-subject copies [N, q, q] against eta [..., N, q]
            z = torch.linalg.solve_triangular(L, eta.unsqueeze(-1), upper=False).squeeze(-1)
        else:
            z = torch.linalg.solve_triangular(L, eta.transpose(-1, -2) if eta.dim() > 1 else eta[:, None],
                                              upper=False)
            z = z.transpose(-1, -2) if eta.dim() > 1 else z[:, 0]
        logdet = 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
        q = eta.shape[-1]
        return -0.5 * (q * LOG_2PI + logdet + (z * z).sum(-1))

    def sample_eta(self, p: Params, n: int, n_occ: int = 0, generator: torch.Generator | None = None,
                   size: tuple = ()) -> torch.Tensor:
        """Draws from N(0, Ω_full), shape [*size, n, q]; a zero variance gives exactly zero."""
        cov = self.prior_covariance(p, n_occ).detach()
        w, v = torch.linalg.eigh(cov)
        root = v * torch.sqrt(w.clamp_min(0.0)).unsqueeze(-2)
        z = torch.randn(*size, n, cov.shape[-1], generator=generator, dtype=cov.dtype, device=cov.device)
        return z @ root.transpose(-1, -2)

    def sample_y(self, p: Params, eta: torch.Tensor, data: ModelData, generator: torch.Generator | None = None,
                 residual: bool = True) -> torch.Tensor:
        """DV draws on the natural scale, [..., N, J] (padding positions hold junk: mask them)."""
        f, var = self.predict(p, eta, data)
        if residual:
            eps = torch.randn(f.shape, generator=generator, dtype=f.dtype, device=f.device)
            f = f + torch.sqrt(var) * eps
        return self.error.untransform(f)


class _RecordingCovariates(Mapping):
    """The covariates handed to a ``params=`` function while tracing which columns it reads
    (:meth:`Model.used_covariates`); enumerating the mapping means "it may read any of them"."""

    def __init__(self, cov: dict[str, torch.Tensor]) -> None:
        self._cov = cov
        self.used: set[str] = set()
        self.enumerated = False

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self._cov:
            self.used.add(key)
        return self._cov[key]

    def __contains__(self, key: object) -> bool:
        if key in self._cov:
            self.used.add(key)  # type: ignore[arg-type]
            return True
        return False

    def __iter__(self):
        self.enumerated = True
        return iter(self._cov)

    def __len__(self) -> int:
        self.enumerated = True
        return len(self._cov)


def _py_id(x):
    """A subject ID as the user wrote it (numpy scalars → Python)."""
    return x.item() if isinstance(x, np.generic) else x


def _fold(v: torch.Tensor, lead: tuple, n: int) -> torch.Tensor:
    """[*lead, N, c] (or broadcastable) -> [S*N, c]."""
    if v.dim() == 0:
        return v
    target = (*lead, n, v.shape[-1])
    return v.expand(target).reshape(-1, v.shape[-1])
