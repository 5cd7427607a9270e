"""Batched Metropolis–Hastings kernels for η | y_i, θ — every chain of every subject moves in one tensor program.

Target per subject: log π_i(η) = log p(y_i | η, θ) + log p(η | θ). State η has shape [C, N, q] (C chains per
subject). The kernels follow Monolix's SAEM E-step:

* ``prior`` — independence sampler from N(0, Ω): accept with the likelihood ratio only; good global moves;
* ``block`` — random walk η' = η + s_i·L_Ω z on all components at once, per-subject scale s_i;
* ``component`` — random walk on one component at a time, per-subject-and-component scales;
* ``mala`` — Metropolis-adjusted Langevin with preconditioner s_i²·Ω (gradients by one backward pass, the
  target being subject-separable).

During adaptation each accept multiplies a scale by e^{0.5(1−a*)}, each reject by e^{−0.5a*}; the acceptance
rate then settles at a* (default 0.3). Scales are frozen once adaptation stops, so the chain is a proper
Markov chain in the smoothing phase.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from nlmefit.models.model import Model, ModelData
from nlmefit.models.parameters import Params

__all__ = ["ChainState", "init_chains", "mcmc_sweep", "KERNELS"]

KERNELS = ("prior", "block", "component", "mala")


@dataclass
class ChainState:
    eta: torch.Tensor  # [C, N, q]
    scale_block: torch.Tensor  # [C, N]
    scale_comp: torch.Tensor  # [C, N, q]
    scale_mala: torch.Tensor  # [C, N]
    accepted: dict = field(default_factory=dict)  # kernel -> running acceptance count
    proposed: dict = field(default_factory=dict)

    def acceptance(self) -> dict[str, float]:
        return {k: float(self.accepted[k]) / max(1, self.proposed[k]) for k in self.proposed}


def init_chains(n_chains: int, eta0: torch.Tensor) -> ChainState:
    """Chains started at ``eta0`` [N, q] (e.g. zeros or the modes)."""
    eta = eta0.detach().unsqueeze(0).repeat(n_chains, 1, 1)
    c, n, q = eta.shape
    ones = torch.ones(c, n, dtype=eta.dtype, device=eta.device)
    return ChainState(eta, ones.clone(), torch.ones(c, n, q, dtype=eta.dtype, device=eta.device), 0.5 * ones)


def _loglik(model: Model, p: Params, data: ModelData, eta: torch.Tensor) -> torch.Tensor:
    ll = model.log_lik(p, eta, data)
    return torch.where(torch.isnan(ll), torch.full_like(ll, -math.inf), ll)


class _Draws:
    """Random numbers by subject: blocks are drawn for all ``n_total`` subjects and this process's ``rows`` kept
    (a sharded run, :mod:`nlmefit.parallel`), so a subject's draws do not depend on the number of ranks."""

    def __init__(self, gen: torch.Generator, rows: torch.Tensor | None, n_total: int | None, n: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.gen, self.rows, self.dtype, self.device = gen, rows, dtype, device
        self.n_total = n if rows is None else int(n_total if n_total is not None else n)

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """This process's subjects of a block whose second axis is the subject."""
        return x if self.rows is None else x.index_select(1, self.rows)

    def randn(self, c: int, *rest: int) -> torch.Tensor:
        """Standard normals [c, n, *rest]."""
        return self.take(torch.randn(c, self.n_total, *rest, generator=self.gen, dtype=self.dtype,
                                     device=self.device))

    def accept(self, log_alpha: torch.Tensor) -> torch.Tensor:
        """Metropolis decisions for ``log_alpha`` [c, n]."""
        u = self.take(torch.rand(log_alpha.shape[0], self.n_total, generator=self.gen, dtype=log_alpha.dtype,
                                 device=log_alpha.device))
        return torch.log(u) < log_alpha


def _adapt(scale: torch.Tensor, acc: torch.Tensor, target: float) -> torch.Tensor:
    f = torch.where(acc, torch.full_like(scale, 0.5 * (1 - target)), torch.full_like(scale, -0.5 * target))
    return (scale * torch.exp(f)).clamp(1e-3, 10.0)


def mcmc_sweep(model: Model, p: Params, data: ModelData, state: ChainState, kernels: dict[str, int],
               gen: torch.Generator, adapt: bool = True, target: float = 0.3, rows: torch.Tensor | None = None,
               n_total: int | None = None) -> ChainState:
    """Run ``kernels[name]`` transitions of each kernel, in the order of :data:`KERNELS`; returns the state.
    ``rows``/``n_total``: in a sharded run, the positions of ``data``'s subjects among all ``n_total`` (random
    numbers are then drawn for all and these rows kept)."""
    p = p.detach()
    eta = state.eta
    c, n, q = eta.shape
    rng = _Draws(gen, rows, n_total, n, eta.dtype, eta.device)
    cov = model.prior_covariance(p, data.n_occ)
    L = torch.linalg.cholesky(cov)
    sd = torch.sqrt(torch.diagonal(cov))
    ll = _loglik(model, p, data, eta)
    lp = model.log_prior(p, eta, data.n_occ)

    def count(name: str, acc: torch.Tensor) -> None:  # kept on the device: no host sync per transition
        state.accepted[name] = state.accepted.get(name, 0) + acc.sum()
        state.proposed[name] = state.proposed.get(name, 0) + acc.numel()

    with torch.no_grad():
        for _ in range(kernels.get("prior", 0)):
            prop = rng.take(model.sample_eta(p, rng.n_total, data.n_occ, generator=gen, size=(c,)))
            ll_p = _loglik(model, p, data, prop)
            acc = rng.accept(ll_p - ll)
            eta = torch.where(acc.unsqueeze(-1), prop, eta)
            ll = torch.where(acc, ll_p, ll)
            count("prior", acc)
        lp = model.log_prior(p, eta, data.n_occ)
        def metropolis(eta, prop, ll, lp):
            """One random-walk accept/reject of ``prop`` against the full posterior."""
            ll_p = _loglik(model, p, data, prop)
            lp_p = model.log_prior(p, prop, data.n_occ)
            acc = rng.accept(ll_p + lp_p - ll - lp)
            return (torch.where(acc.unsqueeze(-1), prop, eta), torch.where(acc, ll_p, ll),
                    torch.where(acc, lp_p, lp), acc)

        for _ in range(kernels.get("block", 0)):
            prop = eta + state.scale_block.unsqueeze(-1) * (rng.randn(c, q) @ L.T)
            eta, ll, lp, acc = metropolis(eta, prop, ll, lp)
            if adapt:
                state.scale_block = _adapt(state.scale_block, acc, target)
            count("block", acc)
        for _ in range(kernels.get("component", 0)):
            for j in range(q):
                step = torch.zeros_like(eta)
                step[..., j] = state.scale_comp[..., j] * sd[j] * rng.randn(c)
                eta, ll, lp, acc = metropolis(eta, eta + step, ll, lp)
                if adapt:
                    state.scale_comp[..., j] = _adapt(state.scale_comp[..., j], acc, target)
                count("component", acc)
    for _ in range(kernels.get("mala", 0)):
        eta, ll, lp = _mala(model, p, data, state, eta, L, rng, adapt, count)
    state.eta = eta.detach()
    return state


def _grad_logpost(model, p, data, eta):
    e = eta.detach().requires_grad_(True)
    with torch.enable_grad():
        lpost = _loglik(model, p, data, e) + model.log_prior(p, e, data.n_occ)
        (g,) = torch.autograd.grad(lpost.sum(), e)
    return lpost.detach(), torch.nan_to_num(g.detach(), nan=0.0, posinf=0.0, neginf=0.0)


def _mala(model, p, data, state, eta, L, rng: _Draws, adapt, count):
    """One MALA transition with preconditioner M_i = s_i² Ω (so the proposal is N(η + ½M∇, M))."""
    c, n, q = eta.shape
    M = L @ L.T
    s = state.scale_mala.unsqueeze(-1)
    lpost, g = _grad_logpost(model, p, data, eta)
    mean_fwd = eta + 0.5 * s * s * (g @ M.T)
    prop = mean_fwd + s * (rng.randn(c, q) @ L.T)
    lpost_p, g_p = _grad_logpost(model, p, data, prop)
    mean_bwd = prop + 0.5 * s * s * (g_p @ M.T)

    def logq(x, m):  # log N(x; m, s²M) up to the constant shared by both directions
        z = torch.linalg.solve_triangular(L, (x - m).unsqueeze(-1) / s.unsqueeze(-1), upper=False).squeeze(-1)
        return -0.5 * (z * z).sum(-1)

    log_alpha = lpost_p - lpost + logq(eta, mean_bwd) - logq(prop, mean_fwd)
    log_alpha = torch.where(torch.isfinite(lpost_p), log_alpha, torch.full_like(log_alpha, -math.inf))
    acc = rng.accept(log_alpha)
    eta = torch.where(acc.unsqueeze(-1), prop, eta)
    if adapt:
        state.scale_mala = _adapt(state.scale_mala, acc, 0.57)
    count("mala", acc)
    with torch.no_grad():
        ll = _loglik(model, p, data, eta)
        lp = model.log_prior(p, eta, data.n_occ)
    return eta, ll, lp
