"""Importance-sampling marginal likelihood with its Monte-Carlo standard error and effective sample sizes.

For each subject, with a proposal q_i(η) and K draws η_k ~ q_i,

    p̂(y_i | θ) = (1/K) Σ_k w_ik,    w_ik = p(y_i | η_k, θ) p(η_k | θ) / q_i(η_k)

is unbiased; log p̂ has delta-method standard error sd(w)/(√K·mean(w)) = √((K·Σw²/(Σw)² − 1)/K), and the
effective sample size is (Σw)²/Σw². Subjects are independent, so the −2LL standard error is
2·√(Σ_i se_i²). Draws are taken in chunks (running log-sum-exps of w and w²), so memory is O(N·chunk), not
O(N·K).

Proposals (all centred per subject):

* ``laplace`` — N(η̂_i, H_i⁻¹) from the mode and the exact Hessian of −log p(y_i, η);
* ``t`` — multivariate t with ``df`` degrees of freedom and the same location and scale (heavier tails: the
  safe default when the posterior may be skewed);
* ``posterior`` — Gaussian (or t with ``df``) with the mean and covariance of posterior draws an estimator
  produced (SAEM's chains, NUTS), or any posterior family with ``rsample``/``log_prob`` (VEM's flows).

A proposal is any ``torch.distributions.Distribution`` with batch shape [N] and event shape [q]
(:mod:`nlmefit.posteriors`); the Laplace ones are built by :func:`nlmefit.marginal.laplace_posterior`.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch.distributions import Distribution

from nlmefit.errors import EstimationError
from nlmefit.marginal.approximations import LOG_2PI
from nlmefit.models.data import ObservationData
from nlmefit.models.parameters import Params
from nlmefit.models.protocol import LatentModel
from nlmefit.posteriors.rng import seeded
from nlmefit.progress import progress_bar

__all__ = ["LoglikEstimate", "importance_loglik", "log_weight_sums", "weights_estimate", "default_chunk"]


@dataclass
class LoglikEstimate:
    """A marginal −2LL, per subject and in total: by importance sampling (with Monte-Carlo error and ESS) or by
    a deterministic rule (AGQ, Laplace, FOCE-I …; ``se`` 0, ``ess`` NaN)."""

    ids: np.ndarray
    loglik_i: np.ndarray  # full log p̂(y_i | θ)
    se_i: np.ndarray  # MC SE of log p̂_i
    ess_i: np.ndarray
    n_samples: int
    proposal: str
    n_uncensored: int
    method: str = "is"
    n_nodes: int | None = None

    @property
    def m2ll(self) -> float:
        """−2 log L with every constant (as ``-2 * loglik``)."""
        return float(-2 * self.loglik_i.sum())

    @property
    def ofv(self) -> float:
        """NONMEM convention: without n·log 2π."""
        return self.m2ll - self.n_uncensored * LOG_2PI

    @property
    def loglik(self) -> float:
        return float(self.loglik_i.sum())

    @property
    def se(self) -> float:
        """Monte-Carlo standard error of the −2LL (and of the OFV)."""
        return float(2 * math.sqrt(np.sum(self.se_i ** 2)))

    @property
    def per_subject(self) -> pd.DataFrame:
        return pd.DataFrame({"ID": self.ids, "loglik": self.loglik_i, "se": self.se_i, "ess": self.ess_i})

    def summary(self) -> dict:
        out = {"method": self.method, "ofv": self.ofv, "m2ll": self.m2ll, "loglik": self.loglik, "se": self.se}
        if self.method == "is":
            out.update(proposal=self.proposal, n_samples=self.n_samples, ess_min=float(self.ess_i.min()),
                       ess_median=float(np.median(self.ess_i)))
        if self.n_nodes is not None:
            out["n_nodes"] = self.n_nodes
        return out


def importance_loglik(model: LatentModel, p: Params, data: ObservationData, proposal: Distribution,
                      n_samples: int = 2000, seed: int | None = 0, chunk: int | None = None,
                      min_ess: float = 50.0, progress: bool | None = None) -> LoglikEstimate:
    """log p(y_i | θ) for every subject by importance sampling from ``proposal`` (a Distribution with batch
    shape [N] and event shape [q]; see the module docstring). ``seed`` makes the draws reproducible without
    touching the caller's random state. ``progress``: a bar over the draws (:mod:`nlmefit.progress`)."""
    lse_w, lse_w2 = log_weight_sums(model, p, data, proposal, n_samples, seed, chunk, progress)
    return weights_estimate(data.ids, lse_w, lse_w2, n_samples, getattr(proposal, "kind", type(proposal).__name__),
                            data.n_uncensored, min_ess)


def default_chunk(data: ObservationData, n_samples: int) -> int:
    """Draws per chunk: one chunk's dose-by-observation superposition near 4M numbers."""
    return max(1, min(n_samples, 4_000_000 // max(1, data.cost_per_draw())))


def log_weight_sums(model: LatentModel, p: Params, data: ObservationData, proposal: Distribution,
                    n_samples: int = 2000, seed: int | None = 0, chunk: int | None = None,
                    progress: bool | None = None, sampler: Callable[[int], torch.Tensor] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log Σ_k w_ik, log Σ_k w_ik²) per subject, [N] each. ``sampler(k)`` draws k proposals for ``data``'s
    subjects (default ``proposal.sample((k,))``); it is called inside the seeded block, so a sharded run can
    draw for all subjects and keep its own rows (:mod:`nlmefit.parallel`)."""
    if n_samples < 2:
        raise ValueError(f"n_samples must be at least 2, got {n_samples}")
    n = data.n_subjects
    if tuple(proposal.batch_shape) != (n,) or tuple(proposal.event_shape) != (data.q,):
        raise ValueError(f"the proposal must have batch shape [{n}] and event shape [{data.q}], got "
                         f"{list(proposal.batch_shape)} and {list(proposal.event_shape)}")
    p = p.detach()
    dev = data.y.device
    if chunk is None:
        chunk = default_chunk(data, n_samples)
    draw = sampler if sampler is not None else (lambda k: proposal.sample((k,)))
    lse_w = torch.full((n,), -math.inf, dtype=data.y.dtype, device=dev)
    lse_w2 = lse_w.clone()
    done = 0
    bar = progress_bar(n_samples, "importance sampling", "draw", enabled=progress, leave=False)
    with torch.no_grad(), seeded(seed if seed is not None else int(torch.seed() % 2 ** 63), dev), bar:
        while done < n_samples:
            k = min(chunk, n_samples - done)
            eta = draw(k).to(data.y.dtype)
            lw = model.log_lik(p, eta, data) + model.log_prior(p, eta, data.n_occ) - proposal.log_prob(eta)
            lw = torch.where(torch.isnan(lw), torch.full_like(lw, -math.inf), lw)
            lse_w = torch.logaddexp(lse_w, torch.logsumexp(lw, 0))
            lse_w2 = torch.logaddexp(lse_w2, torch.logsumexp(2 * lw, 0))
            done += k
            bar.update(k)  # host-side count only: the chunks stay asynchronous on a GPU
    return lse_w, lse_w2


def weights_estimate(ids: np.ndarray, lse_w: torch.Tensor, lse_w2: torch.Tensor, n_samples: int, kind: str,
                     n_uncensored: int, min_ess: float = 50.0) -> LoglikEstimate:
    """The estimate (log p̂_i, its SE and ESS) from the per-subject log-sums of w and w²; raises when a subject
    has no draw with a finite likelihood, warns when ESS is low."""
    n = len(ids)
    K = float(n_samples)
    loglik_i = lse_w - math.log(K)
    ratio = torch.exp(lse_w2 - 2 * lse_w)  # Σw²/(Σw)² = 1/ESS
    ess = 1.0 / ratio
    se = torch.sqrt(torch.clamp(K * ratio - 1.0, min=0.0) / K)
    out = LoglikEstimate(ids, loglik_i.cpu().numpy(), se.cpu().numpy(), ess.cpu().numpy(), n_samples, kind,
                         n_uncensored)
    if not np.all(np.isfinite(out.loglik_i)):
        i = int(np.flatnonzero(~np.isfinite(out.loglik_i))[0])
        raise EstimationError(f"importance sampling: no draw with a finite likelihood for ID {out.ids[i]}")
    low = out.ess_i < min(min_ess, 0.5 * n_samples)
    if low.any():
        warnings.warn(f"importance sampling: effective sample size below {min(min_ess, 0.5 * n_samples):g} for "
                      f"{int(low.sum())} of {n} subjects (lowest {out.ess_i.min():.1f}, ID "
                      f"{out.ids[int(np.argmin(out.ess_i))]}); the −2LL and its SE may be unreliable — use "
                      f"more samples or another proposal", stacklevel=3)
    return out
