"""Variational bounds on log p(y_i | θ) given a posterior family q_i (per subject, full constants).

    ELBO_i = E_q[log p(y_i | η, θ) + log p(η | θ) − log q_i(η)]  ≤  log p(y_i | θ)
    IWAE_i^K = E[log (1/K) Σ_k p(y_i, η_k | θ) / q_i(η_k)]       (ELBO_i ≤ IWAE_i^K ↑ log p(y_i | θ) as K → ∞)

Both are Monte-Carlo estimates with ``n_samples`` draws; they are differentiable in θ and in q's parameters
when q has ``rsample`` (reparameterisation), which is what variational EM maximises. The gap
log p(y_i) − ELBO_i is KL(q_i ‖ p(η | y_i, θ)).
"""
from __future__ import annotations

import math

import torch
from torch.distributions import Distribution

from nlmefit.models.data import ObservationData
from nlmefit.models.parameters import Params
from nlmefit.models.protocol import LatentModel

__all__ = ["elbo", "iwae", "log_weights"]


def log_weights(model: LatentModel, p: Params, data: ObservationData, posterior: Distribution, n_samples: int,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """log p(y_i, η_k | θ) − log q_i(η_k) for K draws η_k ~ q_i, shape [K, N] (reparameterised when q can)."""
    if n_samples < 1:
        raise ValueError(f"n_samples must be at least 1, got {n_samples}")
    draw = posterior.rsample if posterior.has_rsample else posterior.sample
    eta = draw((n_samples,))
    lw = model.log_lik(p, eta, data, mask) + model.log_prior(p, eta, data.n_occ) - posterior.log_prob(eta)
    return torch.where(torch.isnan(lw), torch.full_like(lw, -math.inf), lw)


def elbo(model: LatentModel, p: Params, data: ObservationData, posterior: Distribution, n_samples: int = 1,
         mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-subject ELBO estimate [N] (average of ``n_samples`` single-sample bounds)."""
    return log_weights(model, p, data, posterior, n_samples, mask).mean(0)


def iwae(model: LatentModel, p: Params, data: ObservationData, posterior: Distribution, n_samples: int = 16,
         mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-subject importance-weighted bound [N] with K = ``n_samples``."""
    lw = log_weights(model, p, data, posterior, n_samples, mask)
    return torch.logsumexp(lw, 0) - math.log(n_samples)
