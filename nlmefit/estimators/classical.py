"""The outer problem shared by FO, FOCE, FOCE-I and Laplace: minimise the OFV over (θ, Ω, σ).

Quasi-Newton (L-BFGS-B) in float64 on the unconstrained vector of :class:`~nlmefit.models.ParameterSet`, with
exact gradients by autograd through the approximate −2 log L (η̂ enters by the implicit-function step of
:mod:`nlmefit.marginal.approximations`). The modes are warm-started across evaluations. The objective is a sum over
subject shards (``shard_size``), so memory per evaluation is bounded by the shard, not by N.
"""
from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable

import numpy as np
import scipy.optimize
import torch

from nlmefit.errors import EstimationError
from nlmefit.estimators.base import Estimator, check_covariance
from nlmefit.marginal.approximations import LOG_2PI
from nlmefit.marginal.linearisation import Conditional, Linearisation
from nlmefit.models.data import ObservationData
from nlmefit.models.parameters import Params
from nlmefit.models.protocol import LatentModel
from nlmefit.results.build import build_result
from nlmefit.threads import check_threads, limit_threads, resolve_threads

__all__ = ["ClassicalEstimator"]


class ClassicalEstimator(Estimator):
    """Shared machinery; subclasses set ``approximation`` (``fo``, ``foce``, ``focei``, ``laplace``)."""

    approximation = "focei"

    def __init__(
        self,
        maxiter: int = 500,
        gtol: float = 1e-5,
        inner_tol: float = 1e-9,
        covariance: str | None = "sandwich",
        shard_size: int | None = None,
        device: str | torch.device | None = None,
        progress: Callable[[int, float], None] | None = None,
        threads: int | str | None = None,
    ) -> None:
        self.maxiter = maxiter
        self.gtol = gtol
        self.inner_tol = inner_tol
        self.covariance = check_covariance(covariance)
        self.shard_size = shard_size
        self.device = device
        self.threads = check_threads(threads)
        self._progress = progress

    # ------------------------------------------------------------------ objective
    @property
    def method_key(self) -> str:
        """The approximation's name (``fo``, ``foce``, ``focei``, ``laplace``, ``laplace_gn``)."""
        return self.approximation

    @property
    def linearisation(self) -> Linearisation:
        """This estimator's own objective as a strategy: its modes and per-subject −2 log L."""
        return Conditional(self.method_key, self.inner_tol)

    def _shards(self, n: int):
        size = self.shard_size or n
        return [slice(s, min(s + size, n)) for s in range(0, n, size)]

    def evaluate(self, model: LatentModel, p: Params, data: ObservationData, eta: torch.Tensor, backward_to=None,
                 lin: Linearisation | None = None):
        """(sum of −2 log L_i, new modes); accumulates gradients into ``backward_to`` shard by shard."""
        lin = lin or self.linearisation
        total = 0.0
        new_eta = torch.empty_like(eta)
        for sl in self._shards(data.n_subjects):
            d = data.index(sl)
            e = lin.modes(model, p, d, eta[sl])
            new_eta[sl] = e
            m2 = lin.subject_m2ll(model, p, d, e).sum()
            if backward_to is not None and m2.requires_grad and torch.isfinite(m2):
                m2.backward(retain_graph=False)
            total += float(m2.detach())
        return total, new_eta

    # ------------------------------------------------------------------ fit
    def fit(self, model: LatentModel, data, init: Params | dict | None = None, seed: int | None = None):
        t0 = time.perf_counter()
        if seed is not None:
            torch.manual_seed(seed)
        model, mdata = self.bind(model, data, init)
        lin = self.linearisation
        lin.check(model)
        with limit_threads(resolve_threads(self.threads, mdata.n_subjects, mdata.n_obs)):
            return self._fit(model, mdata, lin, seed, t0)

    def _interaction_note(self, model: LatentModel, mdata: ObservationData) -> str | None:
        """FOCE (no interaction) freezes the residual variance at η = 0: say so when it depends on η."""
        if self.method_key != "foce" or not mdata.q:
            return None
        with torch.no_grad():
            p0 = model.parameters.initial(torch.float64, mdata.y.device)
            sd = torch.sqrt(torch.diagonal(model.prior_covariance(p0, mdata.n_occ)).clamp_min(1e-12))
            zero = torch.zeros(mdata.n_subjects, mdata.q, dtype=torch.float64, device=mdata.y.device)
            v0 = model.predict(p0, zero, mdata)[1]
            v1 = model.predict(p0, zero + 0.5 * sd, mdata)[1]
        m = mdata.mask
        if not bool(m.any()):
            return None
        rel = ((v1 - v0).abs() / v0.abs().clamp_min(1e-300))[m]
        if not bool((rel > 1e-8).any()):
            return None
        err = getattr(getattr(model, "error", None), "name", "this")
        return (f"foce: the residual variance of the {err} error model depends on eta, and FOCE without "
                f"interaction evaluates it at eta = 0 (NONMEM METHOD=1): the OFV and estimates can be far from "
                f"the exact likelihood's (see docs/estimation.md); use method='focei'")

    def _fit(self, model: LatentModel, mdata: ObservationData, lin: Linearisation, seed: int | None, t0: float):
        pset = model.parameters
        dev = mdata.y.device
        p0 = pset.initial(torch.float64, dev)
        u0 = pset.to_unconstrained(p0).detach().cpu().numpy()
        eta = torch.zeros(mdata.n_subjects, mdata.q, dtype=torch.float64, device=dev)
        state = {"eta": eta, "n_eval": 0, "best": math.inf}
        messages: list[str] = []
        note = self._interaction_note(model, mdata)
        if note:
            warnings.warn(note, stacklevel=3)
            messages.append(note)

        def fun(u: np.ndarray):
            ut = torch.tensor(u, dtype=torch.float64, device=dev, requires_grad=True)
            try:
                p = pset.from_unconstrained(ut)
                val, e = self.evaluate(model, p, mdata, state["eta"], backward_to=ut, lin=lin)
            except (torch.linalg.LinAlgError, RuntimeError) as err:
                if "singular" not in str(err).lower() and "cholesky" not in str(err).lower() \
                        and not isinstance(err, torch.linalg.LinAlgError):
                    raise
                val, e = math.inf, None
            state["n_eval"] += 1
            g = ut.grad if len(u) else torch.zeros(0, dtype=torch.float64)
            if not math.isfinite(val) or g is None or not bool(torch.isfinite(g).all()):
                return 1e20, np.zeros_like(u)
            state["eta"] = e
            state["best"] = min(state["best"], val)
            if self._progress is not None:
                self._progress(state["n_eval"], val - mdata.n_uncensored * LOG_2PI)
            return val, g.detach().cpu().numpy()

        f0, _ = fun(u0)
        if f0 >= 1e20:
            raise EstimationError(f"{self.name}: the objective is not finite at the initial values; check the "
                                  f"initial estimates and the data (zero predictions with proportional error?)"
                                  f"{_nonfinite_note(model, p0, mdata, lin, state['eta'])}")
        n_iter = 0
        converged = True
        if len(u0) and self.maxiter > 0:
            res = scipy.optimize.minimize(fun, u0, jac=True, method="L-BFGS-B",
                                          options=dict(maxiter=self.maxiter, maxcor=30, ftol=1e-13,
                                                       gtol=self.gtol, maxls=50))
            u_hat, n_iter, converged = res.x, int(res.nit), bool(res.success)
            messages.append(str(res.message))
            if not converged:
                warnings.warn(f"{self.name}: minimisation did not report success: {res.message}", stacklevel=3)
        else:
            u_hat = u0
        with torch.no_grad():
            p_hat = pset.from_unconstrained(torch.tensor(u_hat, dtype=torch.float64, device=dev))
        eta_hat = lin.modes(model, p_hat, mdata, state["eta"])
        return build_result(self, model, mdata, p_hat, eta_hat, linearisation=lin, n_iter=n_iter,
                            converged=converged, messages=messages, elapsed=time.perf_counter() - t0, seed=seed,
                            check_moved=self.maxiter > 0)


def _nonfinite_note(model: LatentModel, p0: Params, mdata: ObservationData, lin: Linearisation,
                    eta: torch.Tensor) -> str:
    """'; subject(s) ... at theta ...': the (first five) subjects whose −2 log L is not finite at ``p0``."""
    try:
        with torch.enable_grad():
            e = lin.modes(model, p0, mdata, eta)
            m2 = lin.subject_m2ll(model, p0, mdata, e).detach()
        bad = np.flatnonzero(~torch.isfinite(m2).cpu().numpy())
    except Exception:  # noqa: BLE001 - only a diagnostic for the message; the error itself is raised anyway
        bad = np.arange(0)
    try:
        ids = np.asarray(mdata.ids)
    except Exception:  # noqa: BLE001 - data without a panel: positions instead of IDs
        ids = np.arange(mdata.n_subjects)
    parts = []
    if len(bad):
        shown = ", ".join(str(ids[i]) for i in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        parts.append(f"non-finite -2LL for subject(s) ID {shown}")
    vals = {k: float(v.detach().reshape(-1)[0]) for k, v in p0.theta.items() if v.numel() == 1}
    diag = torch.diagonal(p0.omega, dim1=-2, dim2=-1).detach().reshape(-1).tolist()
    names = list(getattr(model.parameters, "eta_names", None) or range(len(diag)))
    vals.update({f"omega_{n}": float(x) for n, x in zip(names, diag)})
    vals.update({f"sigma_{k}": float(v.detach().reshape(-1)[0]) for k, v in p0.sigma.items() if v.numel() == 1})
    parts.append("initial values " + ", ".join(f"{k}={v:.6g}" for k, v in vals.items()))
    return "; " + "; ".join(parts)
