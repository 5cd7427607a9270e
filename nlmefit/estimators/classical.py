"""The outer problem shared by FO, FOCE, FOCE-I and Laplace: minimise the OFV over (θ, Ω, σ).

Quasi-Newton (L-BFGS-B) in float64 on the unconstrained vector of :class:`~nlmefit.models.ParameterSet`, with
exact gradients by autograd through the approximate −2 log L (η̂ enters by the implicit-function step of
:mod:`nlmefit.marginal.approximations`). The modes are warm-started across evaluations. The objective is a sum over
chunks of subjects (``shard_size`` subjects, or as many as the ``max_memory`` budget allows:
:mod:`nlmefit.memory`) with gradients accumulated chunk by chunk, so memory per evaluation is bounded by the
chunk, not by N.
"""
from __future__ import annotations

import math
import time
import warnings

import numpy as np
import scipy.optimize
import torch

from nlmefit import memory, parallel
from nlmefit.errors import EstimationError, ModelSpecError
from nlmefit.estimators.base import Estimator, check_covariance
from nlmefit.estimators.multistart import perturbed_starts, replica_minimize
from nlmefit.marginal.approximations import LOG_2PI
from nlmefit.marginal.linearisation import Conditional, Linearisation
from nlmefit.models.data import ObservationData
from nlmefit.models.parameters import Params
from nlmefit.models.protocol import LatentModel
from nlmefit.progress import IterationProgress, ProgressArg, is_progress_arg
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
        max_memory: int | float | str | None = None,
        device: str | torch.device | None = None,
        progress: ProgressArg = None,
        threads: int | str | None = None,
        n_starts: int = 1,
        start_spread: float = 0.5,
    ) -> None:
        if int(n_starts) < 1:
            raise ModelSpecError(f"n_starts must be a positive integer, got {n_starts}")
        if not 0.0 < float(start_spread) < 1.0:
            raise ModelSpecError(f"start_spread must be in (0, 1), got {start_spread}")
        if not is_progress_arg(progress):
            raise ModelSpecError(f"progress must be True, False, None or a callable (n, ofv), got {progress!r}")
        self.n_starts = int(n_starts)
        self.start_spread = float(start_spread)
        self.maxiter = maxiter
        self.gtol = gtol
        self.inner_tol = inner_tol
        self.covariance = check_covariance(covariance)
        if shard_size is not None and int(shard_size) < 1:
            raise ModelSpecError(f"shard_size must be a positive number of subjects, got {shard_size}")
        try:
            memory.parse_memory(max_memory)
        except ValueError as err:
            raise ModelSpecError(str(err)) from None
        self.shard_size = shard_size
        self.max_memory = max_memory
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

    def chunk_size(self, data: ObservationData) -> int:
        """Subjects per chunk: ``shard_size``, else as many as ``max_memory`` allows (:mod:`nlmefit.memory`)."""
        return int(self.shard_size) if self.shard_size else memory.subjects_per_chunk(data, self.max_memory)

    def _shards(self, data: ObservationData):
        return memory.subject_slices(data.n_subjects, self.chunk_size(data))

    def modes(self, model: LatentModel, p: Params, data: ObservationData, eta: torch.Tensor,
              lin: Linearisation | None = None, shard: parallel.Shard | None = None) -> torch.Tensor:
        """The conditional modes of all subjects, chunk by chunk (and rank by rank under ``shard``)."""
        lin = lin or self.linearisation
        return memory.map_subjects(lambda d, e: (lin.modes(model, p, d, e),), data, eta, self.chunk_size(data),
                                   shard)[0]

    def evaluate(self, model: LatentModel, p: Params, data: ObservationData, eta: torch.Tensor, backward_to=None,
                 lin: Linearisation | None = None):
        """(sum of −2 log L_i, new modes); accumulates gradients into ``backward_to`` shard by shard."""
        lin = lin or self.linearisation
        total = 0.0
        new_eta = torch.empty_like(eta)
        shards = self._shards(data)
        for sl in shards:
            # one chunk: the data object itself, so that the ODE path's solve cache (keyed on the events object)
            # serves the next evaluation's warm-start prediction (:func:`_predicted_modes`)
            d = data if len(shards) == 1 else data.index(sl)
            e = lin.modes(model, p, d, eta[sl])
            new_eta[sl] = e
            m2 = lin.subject_m2ll(model, p, d, e).sum()
            if backward_to is not None and m2.requires_grad and torch.isfinite(m2):
                # the small graph from the unconstrained vector to p is shared by the shards: keep it; each
                # shard's own graph is freed with its m2
                m2.backward(retain_graph=len(shards) > 1)
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
        with limit_threads(resolve_threads(self.threads, mdata.n_subjects, mdata.n_obs)), \
                self._reporter(model) as report:
            return self._fit(model, mdata, lin, seed, t0, report)

    def _reporter(self, model: LatentModel) -> IterationProgress:
        """``progress`` as a bar (count of objective evaluations, current OFV) or the caller's callback."""
        return IterationProgress(self._progress, f"{self.name} {getattr(model, 'name', '')}".strip(), unit="eval")

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

    def _fit(self, model: LatentModel, mdata: ObservationData, lin: Linearisation, seed: int | None, t0: float,
             report: IterationProgress | None = None):
        report = report if report is not None else IterationProgress(self._progress, self.name)
        if self.n_starts > 1 and self.maxiter > 0 and len(model.parameters.natural_names):
            if parallel.current() is not None:
                raise ModelSpecError("n_starts > 1 runs in one process (its starts are already batched); run it "
                                     "without --workers/torchrun")
            return self._fit_multistart(model, mdata, lin, seed, t0, report)
        pset = model.parameters
        dev = mdata.y.device
        p0 = pset.initial(torch.float64, dev)
        u0 = pset.to_unconstrained(p0).detach().cpu().numpy()
        shard = parallel.current()  # several ranks: this one evaluates its own subjects, totals are all-reduced
        mine = None if shard is None else shard.rows(mdata)
        ldata = mdata if mine is None else mdata.index(mine)
        eta = torch.zeros(ldata.n_subjects, mdata.q, dtype=torch.float64, device=dev)
        state = {"eta": eta, "n_eval": 0, "best": math.inf}
        messages: list[str] = []
        note = self._interaction_note(model, mdata)
        if note:
            warnings.warn(note, stacklevel=3)
            messages.append(note)

        # warm starts predicted to first order where a prediction costs more than the autograd work (ODE models;
        # on the closed forms it costs about the Newton iteration it saves: theophylline 0.45 -> 0.52 s)
        predict = (shard is None and len(self._shards(ldata)) == 1 and hasattr(lin, "mode_shift")
                   and bool(getattr(model, "costly_predictions", False)))

        def fun(u: np.ndarray):
            ut = torch.tensor(u, dtype=torch.float64, device=dev, requires_grad=True)
            try:
                p = pset.from_unconstrained(ut)
                eta_start = state["eta"]
                if predict and state.get("u") is not None and ldata.n_subjects:
                    eta_start = _predicted_modes(pset, lin, model, ldata, state["u"], ut.detach(), eta_start)
                if ldata.n_subjects:
                    val, e = self.evaluate(model, p, ldata, eta_start, backward_to=ut, lin=lin)
                else:  # a rank without subjects (more ranks than subjects) still takes part in the reduction
                    val, e = 0.0, state["eta"]
            except (torch.linalg.LinAlgError, RuntimeError) as err:
                if "singular" not in str(err).lower() and "cholesky" not in str(err).lower() \
                        and not isinstance(err, torch.linalg.LinAlgError):
                    raise
                val, e = math.inf, None
            state["n_eval"] += 1
            g = ut.grad if len(u) else torch.zeros(0, dtype=torch.float64)
            if shard is not None:
                local = g if g is not None else torch.zeros_like(ut)
                if not math.isfinite(val) or not bool(torch.isfinite(local).all()):
                    val, local = math.inf, torch.zeros_like(ut)
                tot = shard.allreduce_sum(torch.cat([torch.tensor([val], dtype=torch.float64, device=dev),
                                                     local.detach()]))
                val, g = float(tot[0]), tot[1:]
            if not math.isfinite(val) or g is None or not bool(torch.isfinite(g).all()):
                return 1e20, np.zeros_like(u)
            state["eta"] = e
            state["u"] = ut.detach()
            state["best"] = min(state["best"], val)
            report(state["n_eval"], val - mdata.n_uncensored * LOG_2PI)  # a float already: no device sync
            return val, g.detach().cpu().numpy()

        f0, _ = fun(u0)
        if f0 >= 1e20:
            raise EstimationError(f"{self.name}: the objective is not finite at the initial values; check the "
                                  f"initial estimates and the data (zero predictions with proportional error?)"
                                  f"{_nonfinite_note(model, p0, ldata, lin, state['eta'])}")
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
        report.close()  # the bar ends with the minimisation; the covariance step's warnings print below it
        with torch.no_grad():
            p_hat = pset.from_unconstrained(torch.tensor(u_hat, dtype=torch.float64, device=dev))
        # each rank its own subjects' modes, chunk by chunk, then every rank all of them (the same everywhere)
        eta0 = state["eta"] if shard is None else shard.gather_rows(state["eta"], mine, mdata.n_subjects)
        eta_hat = self.modes(model, p_hat, mdata, eta0, lin, shard)
        return build_result(self, model, mdata, p_hat, eta_hat, linearisation=lin, n_iter=n_iter,
                            converged=converged, messages=messages, elapsed=time.perf_counter() - t0, seed=seed,
                            check_moved=self.maxiter > 0)

    def _fit_multistart(self, model: LatentModel, mdata: ObservationData, lin: Linearisation, seed: int | None,
                        t0: float, report: IterationProgress | None = None):
        return _multistart_fit(self, model, mdata, lin, seed, t0, report)


#: the predicted warm start moves no mode by more than this (a safeguard for long outer steps)
_MAX_SHIFT = 1.0


def _predicted_modes(pset, lin: Linearisation, model: LatentModel, data: ObservationData, u_prev: torch.Tensor,
                     u_new: torch.Tensor, eta_prev: torch.Tensor) -> torch.Tensor:
    """Warm start of the next mode search: the modes at ``u_prev`` moved to first order along u_prev → u_new
    (:meth:`~nlmefit.marginal.linearisation.Conditional.mode_shift`, the implicit function theorem).

    The modes' error at the start is then second order in the outer step instead of first, which saves about one
    Newton iteration — one ODE sensitivity solve of every subject — a search (Bolus_1CPTMM SD FOCE-I: 6.2 → 4.9 s).
    The shift is computed at the previous modes and parameters, where the ODE path serves everything from its
    cached sensitivity solve. A non-finite shift is dropped, a long one clipped to ``_MAX_SHIFT``."""
    du = u_new - u_prev
    try:
        shift = lin.mode_shift(model, lambda t: pset.from_unconstrained(u_prev + t * du), data, eta_prev)
    except (torch.linalg.LinAlgError, RuntimeError):
        return eta_prev
    if shift is None:
        return eta_prev
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift)).clamp(-_MAX_SHIFT, _MAX_SHIFT)
    return eta_prev + shift


def _multistart_fit(est: ClassicalEstimator, model: LatentModel, mdata: ObservationData, lin: Linearisation,
                    seed: int | None, t0: float, report: IterationProgress | None = None):
    """``n_starts`` perturbed starts in lockstep (nlmefit.estimators.multistart); the best one is the result."""
    pset = model.parameters
    if pset.n_weights:
        raise ModelSpecError("n_starts > 1 needs a model without tensor-valued weights")
    dev = mdata.y.device
    n, q, k = mdata.n_subjects, mdata.q, est.n_starts
    p0 = pset.initial(torch.float64, dev)
    U0 = perturbed_starts(pset, p0, k, est.start_spread, seed=0 if seed is None else int(seed))
    zero = torch.zeros(n, q, dtype=torch.float64, device=dev)
    with torch.enable_grad():
        f0 = float(lin.subject_m2ll(model, p0, mdata, lin.modes(model, p0, mdata, zero)).sum().detach())
    if not math.isfinite(f0):
        raise EstimationError(f"{est.name}: the objective is not finite at the initial values (start 0 of "
                              f"{k}); check the initial estimates and the data"
                              f"{_nonfinite_note(model, p0, mdata, lin, zero)}")
    n_eval = [0]
    report = report if report is not None else IterationProgress(est._progress, est.name)

    def tick(replicas: list[int]) -> None:
        n_eval[0] += 1
        report(n_eval[0], float("nan"), starts=len(replicas))  # batched evaluations; starts still running

    opts = dict(maxiter=est.maxiter, maxcor=30, ftol=1e-13, gtol=est.gtol, maxls=50)
    # K replicas of all subjects, each with its own start: one batched objective per lockstep step
    res = replica_minimize(model, lin, mdata, [np.arange(n)] * k, U0.cpu().numpy(), opts, on_batch=tick)
    report.close()
    ofv_const = mdata.n_uncensored * LOG_2PI
    finals = np.array([r.fun if r.fun < 1e20 else np.inf for r in res]) - ofv_const
    best = int(np.nanargmin(finals))
    r = res[best]
    messages = [str(r.message)]
    if not r.success:
        warnings.warn(f"{est.name}: minimisation of the best start did not report success: {r.message}", stacklevel=4)
    with torch.no_grad():
        p_hat = pset.from_unconstrained(torch.tensor(r.x, dtype=torch.float64, device=dev))
    eta_hat = lin.modes(model, p_hat, mdata, zero)
    within = int(np.sum(finals - finals[best] < 0.01))
    starts_rec = {"n_starts": k, "spread": est.start_spread, "best": best,
                  "ofv": [float(v) if np.isfinite(v) else None for v in finals],
                  "converged": [bool(x.success) for x in res], "n_iter": [int(x.nit) for x in res],
                  "within_0.01": within, "batched_evaluations": n_eval[0],
                  "starts": [pset.natural_dict(pset.from_unconstrained(u)) for u in U0]}
    result = build_result(est, model, mdata, p_hat, eta_hat, linearisation=lin, n_iter=int(r.nit),
                          converged=bool(r.success), messages=messages, elapsed=time.perf_counter() - t0, seed=seed,
                          check_moved=True)
    return result.replace(initial={**dict(result.initial or {}), "multistart": starts_rec})


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
