"""SAEM (Kuhn & Lavielle 2004/2005; Monolix): stochastic-approximation EM with a batched MCMC E-step.

Iteration k, with step size γ_k = 1 for k ≤ ``n_explore`` and γ_k = (k − n_explore)^−α afterwards:

1. **E-step** — a few Metropolis–Hastings transitions of every chain of every subject at once
   (:mod:`nlmefit.estimators.mcmc`: prior-independence, block and component-wise random walks, optional MALA).
   The chains live in the individual log-parameter scale ψ_i = μ_i(θ) + η_i (:meth:`Model.mu_reference`),
   so a change of θ moves the typical value, not the subject.
2. **Stochastic approximation** of the sufficient statistics, averaged over chains:
   S₂ ← S₂ + γ(mean_i ψ_iψ_iᵀ − S₂), Ψ̄_i ← Ψ̄_i + γ(ψ_i − Ψ̄_i), and, for single-σ error models without
   censoring, s_σ ← s_σ + γ(mean_ij r_ij²/v(f_ij) − s_σ).
3. **M-step** — Ω in closed form, Ω = mean_i E[(ψ_i − μ_i)(ψ_i − μ_i)ᵀ] = S₂ − mean(Ψ̄μᵀ + μΨ̄ᵀ) + mean(μμᵀ)
   restricted to the Ω structure (diagonal, blocks, FIX; IOV blocks pooled over occasions); σ² = s_σ in closed
   form where the error model allows it. The other fixed effects (θ, covariate coefficients, and σ of combined
   or censored models) take a stochastic-approximation Newton step on the complete-data log-likelihood
   ℓ_k(θ) = Σ_i log p(y_i, ψ_i | θ): θ ← θ + γ_k M_k⁻¹∇ℓ_k; by Fisher's identity its fixed point is the
   maximum-likelihood estimate. During exploration M is the complete-data information −∇²ℓ_k (a full Newton
   step: for mu-referenced parameters ℓ is quadratic in θ and the step is the closed-form regression); in the
   smoothing phase M is Louis' observed information, the stochastic approximation of
   E[−∇²ℓ] − Σ_i Cov(∇ℓ_i), which is the gain that makes the decreasing steps converge at the 1/√k rate
   (with the complete-data gain they would crawl at k^(−I_obs/I_comp) when the random effects are well
   determined). M3-censored records enter ℓ and the E-step through log Φ — the censored
   value is never treated as observed.
4. **Simulated annealing** during exploration: a variance (Ω diagonal, σ²) may shrink by at most the factor
   ``anneal`` per iteration, which keeps the chains exploring before Ω settles.

The SAEM objective is not an OFV: the reported ``ofv`` is an importance-sampling (default) or AGQ −2LL at the
final estimates, with its Monte-Carlo SE in ``fit.likelihoods``. Standard errors come from the FOCE-I sandwich
at the SAEM estimates (linearisation; say so when reporting them). Posterior draws of η from the smoothing
phase are kept (``fit.posterior_draws``; means and SDs in ``fit.individual_estimates``).
"""
from __future__ import annotations

import math
import time
import warnings

import numpy as np
import pandas as pd
import torch

from nlmefit import memory, parallel
from nlmefit.errors import EstimationError, ModelSpecError
from nlmefit.estimators.base import Estimator, check_covariance, register
from nlmefit.estimators.mcmc import KERNELS, init_chains, mcmc_sweep
from nlmefit.marginal.evaluate import marginal_loglik
from nlmefit.marginal.linearisation import Conditional, Linearisation
from nlmefit.models.parameters import Omega, Params
from nlmefit.models.protocol import LatentModel, Linearisable, MuReferenced
from nlmefit.posteriors import EmpiricalPosterior
from nlmefit.progress import IterationProgress, ProgressArg, is_progress_arg
from nlmefit.results.build import build_result
from nlmefit.results.summary import lognormal_components
from nlmefit.threads import check_threads, limit_threads, resolve_threads

__all__ = ["SAEM"]

def _project_omega(spec: Omega, stat: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """The Ω of ``spec``'s structure closest to the statistic: free blocks from ``stat``, FIX blocks kept."""
    out = torch.zeros_like(current)
    for b, blk in enumerate(spec.block_list):
        idx = torch.tensor([spec.names.index(n) for n in blk], device=current.device)
        src = current if spec.fixed_blocks[b] else stat
        out[idx.unsqueeze(-1), idx] = src[idx.unsqueeze(-1), idx]
    return 0.5 * (out + out.T)


def _anneal(new: torch.Tensor, old: torch.Tensor, factor: float) -> torch.Tensor:
    """Let each variance shrink by at most ``factor``; correlations are kept. A variance whose statistic is not
    positive (all chains of every subject stuck, round-off) is set to ``factor`` times the old one, with its
    correlations dropped — rescaling a non-positive variance would flip its sign."""
    d_new = torch.diagonal(new)
    d_ok = torch.maximum(d_new, factor * torch.diagonal(old))
    pos = d_new > 0
    r = torch.where(pos, torch.sqrt(d_ok / torch.where(pos, d_new, torch.ones_like(d_new))), torch.zeros_like(d_new))
    out = new * r.unsqueeze(-1) * r.unsqueeze(-2)
    return out + torch.diag(d_ok - torch.diagonal(out))


def _positive_definite(spec: Omega, new: torch.Tensor, previous: torch.Tensor, prefix: str = "omega"
                       ) -> tuple[torch.Tensor, list[str]]:
    """(Ω with every free block positive definite, what was repaired). A block with a non-finite entry keeps
    its previous value; a block that is not positive definite is projected to the nearest positive-definite
    matrix (eigenvalues raised to 1e-8 of the largest, at least 1e-10). FIX blocks are left as they are."""
    out = new.clone()
    notes = []
    for b, blk in enumerate(spec.block_list):
        if spec.fixed_blocks[b]:
            continue
        idx = torch.tensor([spec.names.index(n) for n in blk], device=new.device)
        sub = new[idx.unsqueeze(-1), idx]
        label = f"{prefix}_{blk[0]}" if len(blk) == 1 else f"{prefix} block ({', '.join(blk)})"
        if not bool(torch.isfinite(sub).all()):
            out[idx.unsqueeze(-1), idx] = previous[idx.unsqueeze(-1), idx]
            notes.append(f"{label} was not finite: kept the previous value")
            continue
        _, info = torch.linalg.cholesky_ex(sub)
        if int(info) == 0:
            continue
        w, V = torch.linalg.eigh(0.5 * (sub + sub.T))
        floor = max(1e-10, 1e-8 * float(w.abs().max()))
        out[idx.unsqueeze(-1), idx] = (V * w.clamp_min(floor)) @ V.T
        notes.append(f"{label} was not positive definite (smallest eigenvalue {float(w.min()):.3g}): projected "
                     f"to the nearest positive-definite matrix")
    return 0.5 * (out + out.T), notes


#: a run is reported as failed when a scale-free variance (Ω, IOV, proportional or log-scale σ²) exceeds this …
MAX_VARIANCE = 10.0
#: … when a positive typical value (θ) moved by more than this factor from its start …
MAX_FOLD_CHANGE = 100.0
#: … or when its final −2LL is worse than at the start by more than this (plus 4 Monte-Carlo SEs)
MAX_M2LL_INCREASE = 10.0


@register("saem")
class SAEM(Estimator):
    """Stochastic-approximation EM (see the module docstring for the algorithm and its options).

    Parameters: ``n_explore`` / ``n_smooth`` iterations with γ = 1 / decreasing; ``step_exponent`` α;
    ``n_chains`` per subject (default: enough for 200 chains in all — Monolix's 50 leaves Ω visibly noisy on
    the 59 subjects of pheno); ``kernels`` transitions per
    iteration by kind; ``anneal`` (factor ≤ 1, 1 disables); ``keep_draws`` posterior draws per chain from the
    smoothing phase; ``ofv_method`` ``"is"`` or ``"agq"`` for the reported OFV with ``n_samples`` /
    ``proposal`` / ``n_nodes``; ``covariance`` as for FOCE-I (linearisation at the SAEM estimates) or None;
    ``threads`` (None: :func:`nlmefit.threads.thread_policy`); ``check_start`` also evaluates the −2LL at the
    initial values, so that a run that ends far worse than it started is reported as failed; ``max_memory`` the
    budget for one chunk of subjects in the M-step's derivatives (:mod:`nlmefit.memory`).
    """

    def __init__(
        self,
        n_explore: int = 150,
        n_smooth: int = 150,
        step_exponent: float = 1.0,
        n_chains: int | None = None,
        kernels: dict[str, int] | None = None,
        anneal: float = 0.95,
        target_accept: float = 0.3,
        keep_draws: int = 100,
        max_step: float = 1.0,
        ofv_method: str = "is",
        n_samples: int = 2000,
        proposal: str = "t",
        n_nodes: int = 7,
        covariance: str | None = "sandwich",
        device: str | torch.device | None = None,
        progress: ProgressArg = None,
        threads: int | str | None = None,
        check_start: bool = True,
        max_memory: int | float | str | None = None,
    ) -> None:
        kernels = dict({"prior": 2, "block": 2, "component": 2, "mala": 0} if kernels is None else kernels)
        unknown = set(kernels) - set(KERNELS)
        if unknown:
            raise ModelSpecError(f"unknown MCMC kernels {sorted(unknown)}; choose from {KERNELS}")
        if n_explore < 1 or n_smooth < 1:
            raise ModelSpecError("n_explore and n_smooth must both be at least 1")
        if not 0.5 < step_exponent <= 1.0:
            raise ModelSpecError(f"step_exponent must be in (0.5, 1] for the stochastic approximation to "
                                 f"converge, got {step_exponent}")
        if not 0 < anneal <= 1:
            raise ModelSpecError(f"anneal must be in (0, 1], got {anneal}")
        if not is_progress_arg(progress):
            raise ModelSpecError(f"saem: progress must be True, False, None or a callable (n, ofv), got {progress!r}")
        if ofv_method not in ("is", "agq"):
            raise ModelSpecError(f"ofv_method must be 'is' or 'agq' (the SAEM objective is not an OFV), "
                                 f"got {ofv_method!r}")
        self.n_explore = int(n_explore)
        self.n_smooth = int(n_smooth)
        self.step_exponent = float(step_exponent)
        self.n_chains = n_chains
        self.kernels = kernels
        self.anneal = float(anneal)
        self.target_accept = float(target_accept)
        self.keep_draws = int(keep_draws)
        self.max_step = float(max_step)
        self.ofv_method = ofv_method
        self.n_samples = int(n_samples)
        self.proposal = proposal
        self.n_nodes = int(n_nodes)
        self.covariance = check_covariance(covariance)
        self.device = device
        self.threads = check_threads(threads)
        self.check_start = bool(check_start)
        try:
            memory.parse_memory(max_memory)
        except ValueError as err:
            raise ModelSpecError(str(err)) from None
        self.max_memory = max_memory
        self._progress = progress

    requires = (Linearisable,)

    @property
    def linearisation(self) -> Linearisation:
        """The covariance step, the residual table and the modes use FOCE-I at the SAEM estimates."""
        return Conditional("focei")

    @staticmethod
    def _mu(model: LatentModel, p: Params, data) -> torch.Tensor:
        """μ_i(θ) of a mu-referenced model; 0 (plain η sampling) for any other model."""
        if isinstance(model, MuReferenced):
            return model.mu_reference(p, data)
        return torch.zeros(data.n_subjects, data.q, dtype=data.y.dtype, device=data.y.device)

    # ------------------------------------------------------------------ fit
    def fit(self, model: LatentModel, data, init: Params | dict | None = None, seed: int | None = None):
        t0 = time.perf_counter()
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % (2 ** 31))
        model, mdata = self.bind(model, data, init)
        with limit_threads(resolve_threads(self.threads, mdata.n_subjects, mdata.n_obs)):
            return self._fit(model, mdata, seed, t0)

    def _fit(self, model: LatentModel, mdata, seed: int, t0: float):
        shard = parallel.current()  # several ranks: this one samples its own subjects, statistics are all-reduced
        if shard is not None and shard.world > mdata.n_subjects:
            raise ModelSpecError(f"saem: {shard.world} ranks for {mdata.n_subjects} subjects; use at most as many "
                                 f"ranks as subjects")
        rows = None if shard is None else shard.rows(mdata)
        ldata = mdata if rows is None else mdata.index(rows)
        run = _Run(self, model, ldata, seed, full=mdata, shard=shard)
        p = run.pset.initial(torch.float64, mdata.y.device)
        self._check_initial(model, p, mdata)
        start = self._start_loglik(model, p, mdata, seed)
        state = init_chains(run.n_chains, torch.zeros(ldata.n_subjects, mdata.q, dtype=torch.float64,
                                                      device=mdata.y.device))
        names = list(run.pset.natural_dict(p))
        free = set(run.pset.natural_names)
        draws: list[torch.Tensor] = []
        trace_rows: list[list[float]] = []
        keep_every = max(1, self.n_smooth // max(1, self.keep_draws))
        n_iter = self.n_explore + self.n_smooth
        report = IterationProgress(self._progress, f"saem {getattr(model, 'name', '')}".strip(), unit="iter",
                                   total=n_iter)
        with report:  # the bar closes with the loop, also on an error
            for k in range(1, n_iter + 1):
                run.k = k
                explore = k <= self.n_explore
                gamma = 1.0 if explore else (k - self.n_explore) ** (-self.step_exponent)
                try:
                    state = mcmc_sweep(model, p, ldata, state, self.kernels, run.gen, adapt=explore,
                                       target=self.target_accept, rows=rows,
                                       n_total=mdata.n_subjects)  # E-step
                except torch.linalg.LinAlgError as err:  # Ω is kept positive definite: this is a model problem
                    raise EstimationError(f"saem: iteration {k}: the E-step failed ({err}) at "
                                          f"{_fmt(run.pset.natural_dict(p))}") from None
                with torch.no_grad():
                    psi = state.eta + self._mu(model, p, ldata)  # [C, N, q]
                p = run.theta_step(p, psi, gamma, explore)
                with torch.no_grad():
                    p = p.detach()
                    state.eta = psi - self._mu(model, p, ldata)  # re-centre the chains on the new typical values
                    p = run.m_step(p, psi, state.eta, gamma, explore)
                    if not explore and (k - self.n_explore) % keep_every == 0:
                        draws.append(state.eta.clone())
                    nat = run.pset.natural_dict(p)
                    bad = [nm for nm in names if nm in free and not math.isfinite(nat[nm])]
                    if bad:
                        raise EstimationError(f"saem: iteration {k}: {', '.join(bad)} became non-finite "
                                              f"({_fmt(nat)}); the model cannot be fitted from these initial "
                                              f"values — try better initial estimates or method='focei'")
                    trace_rows.append([k] + [nat[c] for c in names])
                report(k, float("nan"), phase="explore" if explore else "smooth")  # no OFV while SAEM runs
        kept = torch.cat(draws[-self.keep_draws:], 0) if draws else state.eta.clone()
        acceptance = state.acceptance()
        if shard is not None:  # every rank: all subjects' draws and the acceptance over all chains
            kept = shard.gather_rows(kept, rows, mdata.n_subjects, dim=1)
            acceptance = _reduced_acceptance(shard, state)
        post = EmpiricalPosterior(kept, "saem")
        traces = pd.DataFrame(trace_rows, columns=["iteration"] + names).set_index("iteration")
        res = self._result(model, mdata, p, post, traces, acceptance, seed, t0, run, start)
        return res.replace(elapsed_s=time.perf_counter() - t0)

    @staticmethod
    def _check_initial(model: LatentModel, p: Params, mdata) -> None:
        """The MCMC target must be finite at the initial values (η = 0) for every subject: a chain whose every
        state has likelihood 0 never moves, and the statistics built on it are meaningless."""
        with torch.no_grad():
            ll = model.log_lik(p, torch.zeros(mdata.n_subjects, mdata.q, dtype=torch.float64,
                                              device=mdata.y.device), mdata)
        bad = ~torch.isfinite(ll)
        if bool(bad.any()):
            ids = [mdata.ids[i] for i in torch.nonzero(bad)[:, 0].tolist()]
            shown = ", ".join(map(str, ids[:10])) + (f" … ({len(ids)} in all)" if len(ids) > 10 else "")
            raise EstimationError(f"saem: the log-likelihood is not finite at the initial values (eta = 0) for "
                                  f"ID {shown}; check the initial estimates and the data (an observation where "
                                  f"the prediction is 0 with a proportional error, e.g. a TIME 0 sample after "
                                  f"an oral dose?)")

    def _start_loglik(self, model: LatentModel, p: Params, mdata, seed: int):
        """The −2LL at the initial values by the OFV method (None when not requested or not computable)."""
        if not self.check_start:
            return None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return marginal_loglik(model, p, mdata, method=self.ofv_method, n_samples=min(self.n_samples, 1000),
                                       proposal="t" if self.proposal == "posterior" else self.proposal,
                                       n_nodes=self.n_nodes, seed=seed, progress=False)
        except (EstimationError, ValueError, RuntimeError):  # LinAlgError is a RuntimeError
            return None

    def _result(self, model, mdata, p_hat: Params, post: EmpiricalPosterior, traces: pd.DataFrame,
                acceptance: dict, seed: int, t0: float, run: _Run | None = None, start=None):
        """Modes, stability and failure verdicts, the OFV by IS/AGQ and the FitResult at the final estimates."""
        lin = self.linearisation
        eta_hat = lin.modes(model, p_hat, mdata, post.mean)
        converged, conv_msg = self._stability(traces.to_numpy(), list(traces.columns), model.parameters)
        lik = marginal_loglik(model, p_hat, mdata, method=self.ofv_method, n_samples=self.n_samples,
                              proposal=self.proposal, posterior=post, n_nodes=self.n_nodes, seed=seed,
                              eta0=eta_hat, progress=False if callable(self._progress) else self._progress)
        messages = []
        repairs = [] if run is None else run.repairs
        if repairs:
            first_k, first = repairs[0]
            messages.append(f"saem: Omega was repaired in {len(repairs)} iteration(s), first at iteration "
                            f"{first_k}: {first}")
        failures = self._failures(model, p_hat, start, lik, repairs, self.n_explore + self.n_smooth, mdata)
        if failures:
            converged = False
            msg = ("saem: estimation FAILED — " + "; ".join(failures)
                   + ". The estimates are not a maximum of the likelihood: try better initial estimates (e.g. "
                     "from method='focei'), more n_explore iterations, or another error model")
            warnings.warn(msg, stacklevel=4)
            messages.insert(0, msg)
        else:
            if not converged:
                warnings.warn(conv_msg, stacklevel=4)
            messages.insert(0, conv_msg)
        return build_result(self, model, mdata, p_hat, eta_hat, linearisation=lin,
                            n_iter=self.n_explore + self.n_smooth, converged=converged, messages=messages,
                            elapsed=time.perf_counter() - t0, seed=seed, likelihood=lik, traces=traces,
                            phases={"explore": self.n_explore}, acceptance=acceptance, posterior=post,
                            covariance_prefix="FOCE-I linearisation at the SAEM estimates: ")

    def _stability(self, tr: np.ndarray, names: list[str], pset) -> tuple[bool, str]:
        """Did the free parameters settle? Compare the last value with the value 20 % of the smoothing
        phase earlier: change below 2 % of the value + 0.002."""
        free = set(pset.natural_names)
        lag = max(1, self.n_smooth // 5)
        if tr.shape[0] <= lag:
            return True, "saem: estimation completed; too few iterations to judge stability"
        last, before = tr[-1], tr[-1 - lag]
        moved = [nm for j, nm in enumerate(names)
                 if nm in free and abs(last[j] - before[j]) > 0.02 * abs(last[j]) + 0.002]
        if moved:
            return False, (f"saem: parameters still moving at the end of the smoothing phase: {moved}; increase "
                           f"n_explore / n_smooth (estimation completed, stochastic approximation NOT stable)")
        return True, (f"saem: estimation completed, {len(tr)} iterations; stochastic approximation stable over "
                      f"the last {lag}")

    @staticmethod
    def _failures(model, p_hat: Params, start, lik, repairs: list, last_k: int, data=None) -> list[str]:
        """What makes a finished run a failure: exploding estimates, Ω not positive definite at the end, or a
        final −2LL far worse than at the start. The variance limit applies to scale-free variances only: Ω of
        log-normal parameters (checked on the model with ``data``; assumed without), IOV, proportional or
        log-scale σ."""
        pset = model.parameters
        p0 = pset.natural_dict(pset.initial(torch.float64))
        p1 = pset.natural_dict(p_hat)
        lognormal = lognormal_components(model, p_hat, data) if data is not None else None
        out = []
        for nm in pset.natural_names:
            v = p1[nm]
            if nm.startswith("omega_"):  # variances by name; covariances (omega_<a>_<b>) are not checked
                spec = pset.omega_iov if nm.startswith("omega_iov_") else pset.omega
                base = nm[len("omega_iov_"):] if nm.startswith("omega_iov_") else nm[len("omega_"):]
                is_var = base in spec.names
                scale_free = lognormal is None or spec is pset.omega_iov or lognormal.get(base, False)
                if is_var and scale_free and v > MAX_VARIANCE:
                    out.append(f"{nm} = {v:.4g} (a variance above {MAX_VARIANCE:g})")
                continue
            if nm.startswith("sigma_"):
                key = nm[len("sigma_"):]
                err = getattr(model, "error", None)
                scale_free = key == "prop" or bool(getattr(err, "log_scale", False))
                if scale_free and v * v > MAX_VARIANCE:
                    out.append(f"{nm} = {v:.4g} (variance {v * v:.4g} above {MAX_VARIANCE:g})")
                    continue
            par = pset.theta.get(nm)  # a typical value: fold change from the start
            a = p0.get(nm)
            if par is not None and par.lower >= 0 and a and a > 0 and v > 0:
                fold = v / a
                if fold > MAX_FOLD_CHANGE or fold < 1 / MAX_FOLD_CHANGE:
                    out.append(f"{nm} moved from {a:.4g} to {v:.4g} ({fold:.3g}x)")
        for spec, mat, prefix in ((pset.omega, p_hat.omega, "omega"), (pset.omega_iov, p_hat.omega_iov, "omega_iov")):
            if spec is None or mat is None or not spec.names:
                continue
            if _positive_definite(spec, mat.detach(), mat.detach())[1] or any(k == last_k for k, _ in repairs):
                out.append(f"{prefix} is not positive definite at the end of the run")
        if start is not None and lik is not None and math.isfinite(start.m2ll) and math.isfinite(lik.m2ll):
            se = math.sqrt((start.se or 0.0) ** 2 + (lik.se or 0.0) ** 2)
            if lik.m2ll - start.m2ll > MAX_M2LL_INCREASE + 4 * se:
                out.append(f"the final -2LL ({lik.m2ll:.2f}) is worse than at the initial values "
                           f"({start.m2ll:.2f})")
        return out


def _reduced_acceptance(shard: parallel.Shard, state) -> dict[str, float]:
    """Acceptance rates over every rank's chains."""
    keys = sorted(state.proposed)
    counts = torch.tensor([[float(state.accepted[k]), float(state.proposed[k])] for k in keys], dtype=torch.float64)
    tot = shard.allreduce_sum(counts.reshape(-1)).reshape(-1, 2) if keys else counts
    return {k: float(a) / max(1.0, float(b)) for k, (a, b) in zip(keys, tot.tolist())}


def _fmt(nat: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in nat.items())


class _Run:
    """One SAEM run's fixed setup and stochastic-approximation statistics (see the module docstring)."""

    def __init__(self, saem: SAEM, model: LatentModel, mdata, seed: int, full=None,
                 shard: parallel.Shard | None = None) -> None:
        """``mdata``: the subjects this process samples; ``full``: all subjects (the same without ranks);
        ``shard``: the process group whose ranks hold the other subjects (sums are all-reduced)."""
        full = mdata if full is None else full
        self.saem, self.model, self.mdata, self.shard = saem, model, mdata, shard
        self.n_total, self.n_obs_total = full.n_subjects, max(1, full.n_uncensored)
        self.pset = pset = model.parameters
        self.k = 0  # the current iteration (for messages)
        self.repairs: list[tuple[int, str]] = []  # (iteration, what) for every Ω that had to be repaired
        dev = mdata.y.device
        self.gen = torch.Generator(device=dev)
        self.gen.manual_seed(seed)
        n, q = mdata.n_subjects, mdata.q
        self.n_chains = saem.n_chains or max(1, math.ceil(200 / self.n_total))
        # subjects per chunk of the M-step's derivatives (C chains each): within the memory budget
        budget = memory.parse_memory(saem.max_memory) or memory.default_budget()
        self.chunk = int(max(1, min(mdata.n_subjects, budget // (memory.bytes_per_subject(mdata) * self.n_chains))))
        cens = bool((full.cens[full.mask] != 0).any())
        self.sig_free = [k for k, s in pset.sigma.items() if not s.fixed]
        # σ² in closed form when Var(y) = σ²·g(f) with one σ (additive, proportional, exponential)
        error = getattr(model, "error", None)
        self.closed_sigma = (error is not None and len(error.sigma_names) == 1 and not cens
                             and len(self.sig_free) == 1)
        # θ, the weights, and σ unless it has a closed form take the Newton step (indices by name: the
        # unconstrained and natural vectors share their order)
        newton = {k for k, s in pset.theta.items() if not s.fixed} | set(pset.weight_names)
        if not self.closed_sigma:
            newton |= {f"sigma_{k}" for k in self.sig_free}
        idx = [i for i, nm in enumerate(pset.natural_names) if nm in newton]
        self.newton_idx = torch.tensor(idx, dtype=torch.long, device=dev)
        P = len(idx)
        kw = dict(dtype=torch.float64, device=dev)
        self.S2, self.Psi, self.s_sig = torch.zeros(q, q, **kw), torch.zeros(n, q, **kw), torch.zeros((), **kw)
        self.A: torch.Tensor | None = None  # SA of the complete-data information
        self.G_i = torch.zeros(n, P, **kw)  # SA of E[∇ℓ_i]
        self.S_gg = torch.zeros(P, P, **kw)  # SA of Σ_i E[∇ℓ_i ∇ℓ_iᵀ]

    def reduce(self, *parts: torch.Tensor) -> list[torch.Tensor]:
        """Each tensor summed over the ranks (one all-reduce for all of them); as they are without ranks."""
        if self.shard is None:
            return list(parts)
        flat = self.shard.allreduce_sum(torch.cat([x.reshape(-1) for x in parts]))
        out, at = [], 0
        for x in parts:
            out.append(flat[at:at + x.numel()].reshape(x.shape))
            at += x.numel()
        return out

    def complete_loglik(self, v: torch.Tensor, psi: torch.Tensor, p_base: Params, data=None) -> torch.Tensor:
        """log p(y_i, ψ_ci | θ(v)) per chain and subject, [C, N] (of ``data``, default this process's subjects)."""
        data = self.mdata if data is None else data
        u = self.pset.to_unconstrained(p_base).detach().clone()
        pv = self.pset.from_unconstrained(u.index_put((self.newton_idx,), v))
        eta = psi - self.saem._mu(self.model, pv, data)
        return self.model.log_lik(pv, eta, data) + self.model.log_prior(pv, eta, data.n_occ)

    def _derivatives(self, v0: torch.Tensor, psi: torch.Tensor, p: Params):
        """(gradient [P], complete-data information [P, P], per-chain-and-subject gradients [C, N, P]), summed
        over memory-sized chunks of subjects (``max_memory``: :mod:`nlmefit.memory`)."""
        P = v0.numel()
        g_sum = torch.zeros_like(v0)
        H_sum = torch.zeros(P, P, dtype=v0.dtype, device=v0.device)
        parts = []
        slices = memory.subject_slices(self.mdata.n_subjects, self.chunk)
        for sl in slices:  # chunks of subjects (one in all unless the budget asks for more), not subjects
            data = self.mdata if len(slices) == 1 else self.mdata.index(sl)
            vv = v0.clone().requires_grad_(True)
            with torch.enable_grad():
                lmat = self.complete_loglik(vv, psi[:, sl], p, data)  # [C, n]
                (g,) = torch.autograd.grad(lmat.sum() / self.n_chains, vv, create_graph=True)
                Hm = torch.stack([torch.autograd.grad(g[j], vv, retain_graph=True)[0] for j in range(P)])
                dummy = torch.zeros_like(lmat, requires_grad=True)
                (vjp,) = torch.autograd.grad(lmat, vv, dummy, create_graph=True)
                parts.append(torch.stack([torch.autograd.grad(vjp[j], dummy, retain_graph=True)[0]
                                          for j in range(P)], -1).detach())
            g_sum, H_sum = g_sum + g.detach(), H_sum + Hm.detach()
        g_ci = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
        return g_sum, -0.5 * (H_sum + H_sum.T), g_ci

    def theta_step(self, p: Params, psi: torch.Tensor, gamma: float, explore: bool) -> Params:
        """θ (and σ of combined / censored models): one stochastic-approximation Newton step."""
        if not self.newton_idx.numel():
            return p
        v0 = self.pset.to_unconstrained(p).detach()[self.newton_idx]
        g, B, g_ci = self._derivatives(v0, psi, p)
        bad = not (torch.isfinite(B).all() and torch.isfinite(g).all() and torch.isfinite(g_ci).all())
        G_new = self.G_i + gamma * (g_ci.mean(0) - self.G_i)
        gg = torch.einsum("cnp,cnr->pr", g_ci, g_ci) / self.n_chains
        # sums over subjects: over the ranks too (with a count of ranks that saw a non-finite term)
        g, B, gg, GtG, n_bad = self.reduce(g, B, gg, G_new.T @ G_new, torch.tensor(float(bad), dtype=g.dtype,
                                                                                    device=g.device))
        if float(n_bad) > 0:
            return p
        self.A = B if (self.A is None or explore) else self.A + gamma * (B - self.A)
        self.G_i = G_new
        self.S_gg = self.S_gg + gamma * (gg - self.S_gg)
        gain = self.A
        if not explore:
            # Louis: observed information = complete − missing; the right gain for the Robbins–Monro step
            # (the complete-data one would converge at rate k^(−I_obs/I_comp))
            louis = self.A - (self.S_gg - GtG)
            louis = 0.5 * (louis + louis.T)
            wl = torch.linalg.eigvalsh(louis)
            if bool(wl.min() > 1e-3 * wl.max()):
                gain = louis
        w, V = torch.linalg.eigh(gain)
        w = torch.maximum(w.abs(), 1e-8 * w.abs().max().clamp_min(1e-12))
        step = gamma * (V @ ((V.T @ g) / w))
        big = step.abs().max()
        if big > self.saem.max_step:
            step = step * (self.saem.max_step / big)
        u = self.pset.to_unconstrained(p).detach().clone()
        u[self.newton_idx] = v0 + step
        return self.pset.from_unconstrained(u)

    def m_step(self, p: Params, psi: torch.Tensor, eta: torch.Tensor, gamma: float, explore: bool) -> Params:
        """Stochastic approximation of the statistics, then Ω (and σ where closed) in closed form."""
        n, d = self.n_total, len(self.model.eta_names)
        anneal = self.saem.anneal if explore and self.saem.anneal < 1 else None
        mu = self.saem._mu(self.model, p, self.mdata)
        self.Psi = self.Psi + gamma * (psi.mean(0) - self.Psi)
        r2 = self._residual_sum(p, eta) if self.closed_sigma else torch.zeros((), dtype=mu.dtype, device=mu.device)
        # sums over subjects (over the ranks too): Σψψᵀ, ΣΨ̄μᵀ, Σμμᵀ, Σ r²/g(f)
        spp, spm, smm, r2 = self.reduce(torch.einsum("cnq,cnr->qr", psi, psi), self.Psi.T @ mu, mu.T @ mu, r2)
        self.S2 = self.S2 + gamma * (spp / (self.n_chains * n) - self.S2)
        om_full = self.S2 - (spm + spm.T) / n + smm / n
        om_full = 0.5 * (om_full + om_full.T)
        new_omega = _project_omega(self.pset.omega, om_full[:d, :d], p.omega)
        if anneal:
            new_omega = _anneal(new_omega, p.omega, anneal)
        new_omega = self._repair(self.pset.omega, new_omega, p.omega, "omega")
        new_iov = p.omega_iov
        r = len(getattr(self.pset, "iov_names", []))
        if r and self.mdata.n_occ:
            blocks = [om_full[d + j * r:d + (j + 1) * r, d + j * r:d + (j + 1) * r] for j in range(self.mdata.n_occ)]
            new_iov = _project_omega(self.pset.omega_iov, torch.stack(blocks).mean(0), p.omega_iov)
            if anneal:
                new_iov = _anneal(new_iov, p.omega_iov, anneal)
            new_iov = self._repair(self.pset.omega_iov, new_iov, p.omega_iov, "omega_iov")
        sigma = dict(p.sigma)
        if self.closed_sigma:
            sigma[self.sig_free[0]] = self._closed_sigma(p, r2, gamma, anneal)
        return Params(dict(p.theta), new_omega, sigma, new_iov, dict(p.weights))

    def _repair(self, spec: Omega, new: torch.Tensor, previous: torch.Tensor, prefix: str) -> torch.Tensor:
        """Ω kept positive definite (the E-step factorises it); a repair is warned about once per run and
        recorded with its iteration."""
        fixed, notes = _positive_definite(spec, new, previous, prefix)
        for note in notes:
            if not self.repairs:
                warnings.warn(f"saem: iteration {self.k}: {note} (later repairs are only counted in the result's "
                              f"messages)", stacklevel=5)
            self.repairs.append((self.k, note))
        return fixed

    def _residual_sum(self, p: Params, eta: torch.Tensor) -> torch.Tensor:
        """Σ over chains and this process's observations of r²/g(f), for Var(y) = σ²·g(f)."""
        sname, mdata = self.sig_free[0], self.mdata
        unit = {sname: torch.ones((), dtype=torch.float64, device=mdata.y.device)}
        f, _ = self.model.predict(p, eta, mdata)
        v = self.model.error.variance(f, unit)
        m = mdata.mask
        r2 = torch.where(m, (mdata.y - f) ** 2 / torch.where(m, v, torch.ones_like(v)), torch.zeros_like(f))
        return r2.sum()

    def _closed_sigma(self, p: Params, r2: torch.Tensor, gamma: float, anneal: float | None) -> torch.Tensor:
        """σ = √(SA of mean r²/g(f)) for Var(y) = σ²·g(f); ``r2`` the sum over all chains and observations."""
        sname = self.sig_free[0]
        self.s_sig = self.s_sig + gamma * (r2 / (self.n_chains * self.n_obs_total) - self.s_sig)
        s2 = self.s_sig
        if anneal:
            s2 = torch.maximum(s2, anneal * p.sigma[sname] ** 2)
        return torch.sqrt(s2)
