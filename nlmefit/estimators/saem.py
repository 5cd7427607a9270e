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
from collections.abc import Callable

import numpy as np
import pandas as pd
import torch

from nlmefit.errors import ModelSpecError
from nlmefit.estimators.base import Estimator, check_covariance, register
from nlmefit.estimators.mcmc import KERNELS, init_chains, mcmc_sweep
from nlmefit.marginal.evaluate import marginal_loglik
from nlmefit.marginal.linearisation import Conditional, Linearisation
from nlmefit.models.parameters import Omega, Params
from nlmefit.models.protocol import LatentModel, Linearisable, MuReferenced
from nlmefit.posteriors import EmpiricalPosterior
from nlmefit.results.build import build_result

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
    """Let each variance shrink by at most ``factor``; correlations are kept."""
    d_new = torch.diagonal(new).clamp_min(1e-300)
    d_ok = torch.maximum(d_new, factor * torch.diagonal(old))
    r = torch.sqrt(d_ok / d_new)
    return new * r.unsqueeze(-1) * r.unsqueeze(-2)


@register("saem")
class SAEM(Estimator):
    """Stochastic-approximation EM (see the module docstring for the algorithm and its options).

    Parameters: ``n_explore`` / ``n_smooth`` iterations with γ = 1 / decreasing; ``step_exponent`` α;
    ``n_chains`` per subject (default: enough for 200 chains in all — Monolix's 50 leaves Ω visibly noisy on
    the 59 subjects of pheno); ``kernels`` transitions per
    iteration by kind; ``anneal`` (factor ≤ 1, 1 disables); ``keep_draws`` posterior draws per chain from the
    smoothing phase; ``ofv_method`` ``"is"`` or ``"agq"`` for the reported OFV with ``n_samples`` /
    ``proposal`` / ``n_nodes``; ``covariance`` as for FOCE-I (linearisation at the SAEM estimates) or None.
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
        progress: Callable[[int, float], None] | None = None,
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
        run = _Run(self, model, mdata, seed)
        p = run.pset.initial(torch.float64, mdata.y.device)
        state = init_chains(run.n_chains, torch.zeros(mdata.n_subjects, mdata.q, dtype=torch.float64,
                                                      device=mdata.y.device))
        names = list(run.pset.natural_dict(p))
        draws: list[torch.Tensor] = []
        trace_rows: list[list[float]] = []
        keep_every = max(1, self.n_smooth // max(1, self.keep_draws))
        n_iter = self.n_explore + self.n_smooth
        for k in range(1, n_iter + 1):
            explore = k <= self.n_explore
            gamma = 1.0 if explore else (k - self.n_explore) ** (-self.step_exponent)
            state = mcmc_sweep(model, p, mdata, state, self.kernels, run.gen, adapt=explore,
                               target=self.target_accept)  # E-step
            with torch.no_grad():
                psi = state.eta + self._mu(model, p, mdata)  # [C, N, q]
            p = run.theta_step(p, psi, gamma, explore)
            with torch.no_grad():
                p = p.detach()
                state.eta = psi - self._mu(model, p, mdata)  # re-centre the chains on the new typical values
                p = run.m_step(p, psi, state.eta, gamma, explore)
                if not explore and (k - self.n_explore) % keep_every == 0:
                    draws.append(state.eta.clone())
                nat = run.pset.natural_dict(p)
                trace_rows.append([k] + [nat[c] for c in names])
            if self._progress is not None:
                self._progress(k, float("nan"))
        post = EmpiricalPosterior(torch.cat(draws[-self.keep_draws:], 0) if draws else state.eta.clone(), "saem")
        traces = pd.DataFrame(trace_rows, columns=["iteration"] + names).set_index("iteration")
        res = self._result(model, mdata, p, post, traces, state.acceptance(), seed, t0)
        return res.replace(elapsed_s=time.perf_counter() - t0)

    def _result(self, model, mdata, p_hat: Params, post: EmpiricalPosterior, traces: pd.DataFrame,
                acceptance: dict, seed: int, t0: float):
        """Modes, stability verdict, the OFV by IS/AGQ and the FitResult at the final estimates."""
        lin = self.linearisation
        eta_hat = lin.modes(model, p_hat, mdata, post.mean)
        converged, conv_msg = self._stability(traces.to_numpy(), list(traces.columns), model.parameters)
        if not converged:
            warnings.warn(f"saem: {conv_msg}", stacklevel=3)
        lik = marginal_loglik(model, p_hat, mdata, method=self.ofv_method, n_samples=self.n_samples,
                              proposal=self.proposal, posterior=post, n_nodes=self.n_nodes, seed=seed,
                              eta0=eta_hat)
        return build_result(self, model, mdata, p_hat, eta_hat, linearisation=lin,
                            n_iter=self.n_explore + self.n_smooth, converged=converged, messages=[conv_msg],
                            elapsed=time.perf_counter() - t0, seed=seed, likelihood=lik, traces=traces,
                            phases={"explore": self.n_explore}, acceptance=acceptance, posterior=post,
                            covariance_prefix="FOCE-I linearisation at the SAEM estimates: ")

    def _stability(self, tr: np.ndarray, names: list[str], pset) -> tuple[bool, str]:
        """Did the free parameters settle? Compare the last value with the value 20 % of the smoothing
        phase earlier: change below 2 % of the value + 0.002."""
        free = set(pset.natural_names)
        lag = max(1, self.n_smooth // 5)
        if tr.shape[0] <= lag:
            return True, "saem: too few iterations to judge stability"
        last, before = tr[-1], tr[-1 - lag]
        moved = [nm for j, nm in enumerate(names)
                 if nm in free and abs(last[j] - before[j]) > 0.02 * abs(last[j]) + 0.002]
        if moved:
            return False, (f"parameters still moving at the end of the smoothing phase: {moved}; increase "
                           f"n_explore / n_smooth")
        return True, f"saem: {len(tr)} iterations; parameters stable over the last {lag}"


class _Run:
    """One SAEM run's fixed setup and stochastic-approximation statistics (see the module docstring)."""

    def __init__(self, saem: SAEM, model: LatentModel, mdata, seed: int) -> None:
        self.saem, self.model, self.mdata = saem, model, mdata
        self.pset = pset = model.parameters
        dev = mdata.y.device
        self.gen = torch.Generator(device=dev)
        self.gen.manual_seed(seed)
        n, q = mdata.n_subjects, mdata.q
        self.n_chains = saem.n_chains or max(1, math.ceil(200 / n))
        cens = bool((mdata.cens[mdata.mask] != 0).any())
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

    def complete_loglik(self, v: torch.Tensor, psi: torch.Tensor, p_base: Params) -> torch.Tensor:
        """log p(y_i, ψ_ci | θ(v)) per chain and subject, [C, N]."""
        u = self.pset.to_unconstrained(p_base).detach().clone()
        pv = self.pset.from_unconstrained(u.index_put((self.newton_idx,), v))
        eta = psi - self.saem._mu(self.model, pv, self.mdata)
        return self.model.log_lik(pv, eta, self.mdata) + self.model.log_prior(pv, eta, self.mdata.n_occ)

    def _derivatives(self, v0: torch.Tensor, psi: torch.Tensor, p: Params):
        """(gradient [P], complete-data information [P, P], per-chain-and-subject gradients [C, N, P])."""
        P = v0.numel()
        vv = v0.clone().requires_grad_(True)
        with torch.enable_grad():
            lmat = self.complete_loglik(vv, psi, p)  # [C, N]
            (g,) = torch.autograd.grad(lmat.sum() / self.n_chains, vv, create_graph=True)
            Hm = torch.stack([torch.autograd.grad(g[j], vv, retain_graph=True)[0] for j in range(P)])
            dummy = torch.zeros_like(lmat, requires_grad=True)
            (vjp,) = torch.autograd.grad(lmat, vv, dummy, create_graph=True)
            g_ci = torch.stack([torch.autograd.grad(vjp[j], dummy, retain_graph=True)[0]
                                for j in range(P)], -1).detach()
        return g.detach(), -0.5 * (Hm + Hm.T).detach(), g_ci

    def theta_step(self, p: Params, psi: torch.Tensor, gamma: float, explore: bool) -> Params:
        """θ (and σ of combined / censored models): one stochastic-approximation Newton step."""
        if not self.newton_idx.numel():
            return p
        v0 = self.pset.to_unconstrained(p).detach()[self.newton_idx]
        g, B, g_ci = self._derivatives(v0, psi, p)
        if not (torch.isfinite(B).all() and torch.isfinite(g).all() and torch.isfinite(g_ci).all()):
            return p
        self.A = B if (self.A is None or explore) else self.A + gamma * (B - self.A)
        self.G_i = self.G_i + gamma * (g_ci.mean(0) - self.G_i)
        self.S_gg = self.S_gg + gamma * (torch.einsum("cnp,cnr->pr", g_ci, g_ci) / self.n_chains - self.S_gg)
        gain = self.A
        if not explore:
            # Louis: observed information = complete − missing; the right gain for the Robbins–Monro step
            # (the complete-data one would converge at rate k^(−I_obs/I_comp))
            louis = self.A - (self.S_gg - self.G_i.T @ self.G_i)
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
        n, d = self.mdata.n_subjects, len(self.model.eta_names)
        anneal = self.saem.anneal if explore and self.saem.anneal < 1 else None
        mu = self.saem._mu(self.model, p, self.mdata)
        self.S2 = self.S2 + gamma * (torch.einsum("cnq,cnr->qr", psi, psi) / (self.n_chains * n) - self.S2)
        self.Psi = self.Psi + gamma * (psi.mean(0) - self.Psi)
        om_full = self.S2 - (self.Psi.T @ mu + mu.T @ self.Psi) / n + (mu.T @ mu) / n
        om_full = 0.5 * (om_full + om_full.T)
        new_omega = _project_omega(self.pset.omega, om_full[:d, :d], p.omega)
        if anneal:
            new_omega = _anneal(new_omega, p.omega, anneal)
        new_iov = p.omega_iov
        r = len(getattr(self.pset, "iov_names", []))
        if r and self.mdata.n_occ:
            blocks = [om_full[d + j * r:d + (j + 1) * r, d + j * r:d + (j + 1) * r] for j in range(self.mdata.n_occ)]
            new_iov = _project_omega(self.pset.omega_iov, torch.stack(blocks).mean(0), p.omega_iov)
            if anneal:
                new_iov = _anneal(new_iov, p.omega_iov, anneal)
        sigma = dict(p.sigma)
        if self.closed_sigma:
            sigma[self.sig_free[0]] = self._closed_sigma(p, eta, gamma, anneal)
        return Params(dict(p.theta), new_omega, sigma, new_iov, dict(p.weights))

    def _closed_sigma(self, p: Params, eta: torch.Tensor, gamma: float, anneal: float | None) -> torch.Tensor:
        """σ = √(SA of mean r²/g(f)) for Var(y) = σ²·g(f)."""
        sname, mdata = self.sig_free[0], self.mdata
        unit = {sname: torch.ones((), dtype=torch.float64, device=mdata.y.device)}
        f, _ = self.model.predict(p, eta, mdata)
        v = self.model.error.variance(f, unit)
        m = mdata.mask
        r2 = torch.where(m, (mdata.y - f) ** 2 / torch.where(m, v, torch.ones_like(v)), torch.zeros_like(f))
        n_obs = max(1, mdata.n_uncensored)
        self.s_sig = self.s_sig + gamma * (r2.sum() / (self.n_chains * n_obs) - self.s_sig)
        s2 = self.s_sig
        if anneal:
            s2 = torch.maximum(s2, anneal * p.sigma[sname] ** 2)
        return torch.sqrt(s2)
