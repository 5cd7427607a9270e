"""The VAE: an NLME model whose structural model is an MLP decoder, fitted by the amortized VEM estimator.

    η_i ~ N(0, I_q),   z_ij = g_j(η_i, c_i; θ) + ε_ij,   ε_ij ~ N(0, σ_j²)

on the standardised design vectors, with g an MLP (``hidden`` × ``depth``, SiLU) whose weights are tensor-valued
population parameters (``ParameterSet`` weights) and c_i the dose context when ``conditional=True``. There is no
separate VAE code path: :class:`DecoderModel` is a :class:`~nlmefit.baselines.design_model.DesignModel`, and
``nlmefit.fit(..., method="vem", amortized=True)`` — the estimator the NLME models use — trains decoder and
encoder jointly on the ELBO (Σ_i E_q[log p(z_i|η) + log p(η) − log q_i(η)]; the encoder is the panel set encoder,
q Gaussian or a flow with ``posterior=``). The reported log-likelihood is the importance-sampling estimate
log p̂(z_i) = log (1/K) Σ_k p(z_i, η_k)/q_i(η_k) with the encoder's q_i as the proposal (IWAE's estimator;
kind ``estimate``), by :func:`nlmefit.marginal.marginal_loglik` — the same evaluator as for the PK models.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.func import functional_call

import nlmefit
from nlmefit.baselines.base import Baseline
from nlmefit.baselines.design_model import DesignData, DesignModel
from nlmefit.baselines.nets import ConditionedMLP
from nlmefit.estimators.vem import amortized_posterior
from nlmefit.marginal import marginal_loglik
from nlmefit.models.parameters import Omega, Param, ParameterSet, Params

__all__ = ["VAE", "DecoderModel"]


class DecoderModel(DesignModel):
    """η → MLP decoder → design-wide mean; σ_j per design time (``sigma_eps<j>``); Ω = I fixed."""

    name = "vae_decoder"

    def __init__(self, times, q: int = 2, *, hidden: int = 32, depth: int = 2, conditional: bool = False,
                 ctx_scale: float = 1.0, seed: int = 0):
        super().__init__(times, q, ctx_scale)
        d = len(self.times)
        self.conditional = bool(conditional)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.net = ConditionedMLP(q, d, t_dim=0, c_dim=d if conditional else 0, hidden=hidden,
                                      depth=depth).double()
        self.parameters = ParameterSet({}, Omega({f"z{k}": 1.0 for k in range(q)}, fixed=True),
                                       {f"eps{j}": Param(0.5, lower=0.0) for j in range(d)},
                                       weights={"dec": self.net})

    def design_mean(self, p: Params, eta: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        w = {k[4:]: v for k, v in p.weights.items() if k.startswith("dec.")}
        c = ctx.to(eta.dtype).expand(*eta.shape[:-1], ctx.shape[-1]) if self.conditional else None
        return functional_call(self.net, w, (eta, None, c))

    def design_sd(self, p: Params) -> torch.Tensor:
        return torch.stack([p.sigma[f"eps{j}"] for j in range(len(self.times))])


class VAE(Baseline):
    """VAE on the panel view: :class:`DecoderModel` fitted by amortized VEM (see the module docstring).

    ``posterior``: the amortized family ("gaussian", "maf", "nsf"); ``vem_options`` go to the VEM estimator
    (e.g. ``max_steps``, ``batch_size``, ``lr``); ``n_is``: importance draws per subject for ``log_prob``.
    Runs in float64 (the estimators' precision)."""

    name = "vae"
    kind = "estimate"
    supports_missing = True

    def __init__(self, q: int = 2, *, hidden: int = 32, depth: int = 2, posterior: str = "gaussian",
                 conditional: bool = False, vem_options: dict | None = None, n_is: int = 500, device=None,
                 seed: int = 0):
        super().__init__(device=device, seed=seed, dtype=torch.float64)
        self.q, self.hidden, self.depth, self.posterior = int(q), int(hidden), int(depth), posterior
        self.conditional, self.n_is = bool(conditional), int(n_is)
        self.vem_options = dict(vem_options or {})
        self.fit_result = None

    def _data(self, z, mask, ctx) -> DesignData:
        return DesignData.from_arrays(np.arange(1, z.shape[0] + 1), z, mask, ctx, self.design_times, self.q)

    def _fit(self, z, mask, ctx, valid) -> None:
        self.model = DecoderModel(self.design_times, self.q, hidden=self.hidden, depth=self.depth,
                                  conditional=self.conditional, seed=self.seed)
        opts = {"covariance": None, "posterior": self.posterior, "max_steps": 3000, "min_steps": 1000,
                "batch_size": min(256, z.shape[0]), "lr": 0.01, **self.vem_options}
        self.fit_result = nlmefit.fit(self.model, self._data(z, mask, ctx), method="vem", amortized=True,
                                      seed=self.seed, **opts)
        self.params_ = self.fit_result.population_parameters(device=self.device)

    def _sample(self, n, ctx, generator) -> torch.Tensor:
        kw = dict(generator=generator, device=self.device, dtype=torch.float64)
        eta = torch.randn(n, self.q, **kw)
        f = self.model.design_mean(self.params_, eta, ctx)
        return f + self.model.design_sd(self.params_) * torch.randn(f.shape, **kw)

    def _log_prob(self, z, mask, ctx, generator) -> torch.Tensor:
        data = self._data(z, mask, ctx)
        q = amortized_posterior(self.fit_result, data)
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=self.device))
        est = marginal_loglik(self.model, self.params_, data, "is", posterior=q, n_samples=self.n_is, seed=seed)
        self.last_log_prob_se_ = est.se_i
        return torch.as_tensor(est.loglik_i, dtype=torch.float64, device=self.device)
