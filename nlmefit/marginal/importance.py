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
  produced (SAEM's chains; later VEM's q_i).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from nlmefit.errors import EstimationError
from nlmefit.estimators.autodiff import grad_sep, hessian_sep
from nlmefit.estimators.modes import find_modes
from nlmefit.estimators.objectives import LOG_2PI, conditional_objective
from nlmefit.models.model import Model, ModelData
from nlmefit.models.parameters import Params

__all__ = ["Proposal", "LoglikEstimate", "laplace_proposal", "posterior_proposal", "importance_loglik"]


@dataclass
class Proposal:
    """Per-subject location [N, q], covariance Cholesky factor [N, q, q], and t degrees of freedom (None: normal)."""

    mean: torch.Tensor
    chol: torch.Tensor
    df: float | None = None
    kind: str = "laplace"

    def sample(self, k: int, generator: torch.Generator) -> torch.Tensor:
        z = torch.randn(k, *self.mean.shape, generator=generator, dtype=self.mean.dtype, device=self.mean.device)
        x = (self.chol @ z.unsqueeze(-1)).squeeze(-1)
        if self.df is not None:
            chi2 = torch._standard_gamma(torch.full((k, self.mean.shape[0], 1), self.df / 2, dtype=z.dtype,
                                                    device=z.device), generator=generator) * 2
            x = x * torch.sqrt(self.df / chi2)
        return self.mean + x

    def log_prob(self, eta: torch.Tensor) -> torch.Tensor:
        q = self.mean.shape[-1]
        diff = (eta - self.mean).unsqueeze(-1)
        z = torch.linalg.solve_triangular(self.chol.expand(*eta.shape[:-1], q, q), diff, upper=False).squeeze(-1)
        m = (z * z).sum(-1)
        logdet = torch.log(torch.diagonal(self.chol, dim1=-2, dim2=-1)).sum(-1)
        if self.df is None:
            return -0.5 * (q * LOG_2PI + m) - logdet
        v = self.df
        return (math.lgamma((v + q) / 2) - math.lgamma(v / 2) - 0.5 * q * math.log(v * math.pi) - logdet
                - 0.5 * (v + q) * torch.log1p(m / v))


def laplace_proposal(model: Model, p: Params, data: ModelData, eta0: torch.Tensor | None = None,
                     df: float | None = None, inflate: float = 1.0) -> Proposal:
    """N(η̂_i, H_i⁻¹) (or t with ``df``) at the modes of −log p(y_i, η | θ) with its exact Hessian; subjects
    whose exact Hessian is not positive definite fall back to the first-order (FOCE-I) one."""
    p = p.detach()
    if eta0 is None:
        eta0 = torch.zeros(data.n_subjects, data.q, dtype=data.y.dtype, device=data.y.device)
    lfun = conditional_objective(model, p, data, "laplace")
    eta_hat = find_modes(lfun, eta0, tol=1e-9).eta
    e = eta_hat.clone().requires_grad_(True)
    with torch.enable_grad():
        H = hessian_sep(grad_sep(lfun(e), e, create_graph=True), e).detach()
    H = 0.5 * (H + H.transpose(-1, -2))
    L, info = torch.linalg.cholesky_ex(H)
    if bool((info != 0).any()):
        from nlmefit.estimators.objectives import laplace_pieces

        with torch.enable_grad():
            _, _, H_gn = laplace_pieces(model, p, data, eta_hat, "laplace_gn")
        H = torch.where((info != 0)[:, None, None], H_gn.detach(), H)
        L, info = torch.linalg.cholesky_ex(H)
        if bool((info != 0).any()):
            i = int(torch.nonzero(info)[0])
            raise EstimationError(f"ID {data.panel.ids[i]}: the curvature at the conditional mode is not positive "
                                  f"definite; no Laplace proposal can be built")
    # covariance H⁻¹ = L⁻ᵀ L⁻¹: its Cholesky factor from the inverse of Lᵀ
    eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device).expand_as(L)
    cov = torch.cholesky_inverse(L)
    C = torch.linalg.cholesky(0.5 * (cov + cov.transpose(-1, -2)) * inflate ** 2 + 1e-300 * eye)
    return Proposal(eta_hat, C, df, "laplace" if df is None else "t")


def posterior_proposal(draws: torch.Tensor, df: float | None = None, inflate: float = 1.0) -> Proposal:
    """Gaussian (or t) with each subject's posterior mean and covariance from draws [S, N, q]."""
    if draws.dim() != 3 or draws.shape[0] < 2:
        raise EstimationError("a 'posterior' proposal needs at least two posterior draws per subject")
    mean = draws.mean(0)
    c = draws - mean
    cov = torch.einsum("snq,snr->nqr", c, c) / (draws.shape[0] - 1)
    q = mean.shape[-1]
    eye = torch.eye(q, dtype=cov.dtype, device=cov.device)
    jitter = 1e-10 * torch.diagonal(cov, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)[:, None, None] * eye
    L = torch.linalg.cholesky(cov * inflate ** 2 + jitter)
    return Proposal(mean, L, df, "posterior")


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


def importance_loglik(model: Model, p: Params, data: ModelData, proposal: Proposal, n_samples: int = 2000,
                      seed: int | None = 0, chunk: int | None = None, min_ess: float = 50.0) -> LoglikEstimate:
    """log p(y_i | θ) for every subject by importance sampling from ``proposal`` (see the module docstring)."""
    if n_samples < 2:
        raise ValueError(f"n_samples must be at least 2, got {n_samples}")
    p = p.detach()
    dev = data.y.device
    gen = torch.Generator(device=dev)
    gen.manual_seed(int(seed) if seed is not None else int(torch.seed() % 2 ** 63))
    if chunk is None:  # keep one chunk's dose-by-observation superposition near 4M numbers
        per_draw = data.y.numel() * max(1, int(data.events.dose_time.shape[-1]))
        chunk = max(1, min(n_samples, 4_000_000 // per_draw))
    n = data.n_subjects
    lse_w = torch.full((n,), -math.inf, dtype=data.y.dtype, device=dev)
    lse_w2 = lse_w.clone()
    done = 0
    with torch.no_grad():
        while done < n_samples:
            k = min(chunk, n_samples - done)
            eta = proposal.sample(k, gen)
            lw = model.log_lik(p, eta, data) + model.log_prior(p, eta, data.n_occ) - proposal.log_prob(eta)
            lw = torch.where(torch.isnan(lw), torch.full_like(lw, -math.inf), lw)
            lse_w = torch.logaddexp(lse_w, torch.logsumexp(lw, 0))
            lse_w2 = torch.logaddexp(lse_w2, torch.logsumexp(2 * lw, 0))
            done += k
    K = float(n_samples)
    loglik_i = lse_w - math.log(K)
    ratio = torch.exp(lse_w2 - 2 * lse_w)  # Σw²/(Σw)² = 1/ESS
    ess = 1.0 / ratio
    se = torch.sqrt(torch.clamp(K * ratio - 1.0, min=0.0) / K)
    out = LoglikEstimate(np.asarray(data.panel.ids), loglik_i.cpu().numpy(), se.cpu().numpy(), ess.cpu().numpy(),
                     n_samples, proposal.kind, data.n_uncensored)
    if not np.all(np.isfinite(out.loglik_i)):
        i = int(np.flatnonzero(~np.isfinite(out.loglik_i))[0])
        raise EstimationError(f"importance sampling: no draw with a finite likelihood for ID {out.ids[i]}")
    low = out.ess_i < min(min_ess, 0.5 * n_samples)
    if low.any():
        warnings.warn(f"importance sampling: effective sample size below {min(min_ess, 0.5 * n_samples):g} for "
                      f"{int(low.sum())} of {n} subjects (lowest {out.ess_i.min():.1f}, ID "
                      f"{out.ids[int(np.argmin(out.ess_i))]}); the −2LL and its SE may be unreliable — use "
                      f"more samples or another proposal", stacklevel=2)
    return out
