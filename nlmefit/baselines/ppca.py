"""Probabilistic PCA: the linear-Gaussian latent model, by its closed form and through the NLME estimators.

    z_i = μ + W η_i + ε_i,   η_i ~ N(0, I_q),   ε_i ~ N(0, σ² I_d)   ⇒   z_i ~ N(μ, C),  C = W Wᵀ + σ² I

on the standardised design vectors z_i (Tipping & Bishop 1999). Maximum likelihood in closed form: μ = z̄,
S = (1/n) Σ (z_i − z̄)(z_i − z̄)ᵀ with eigenvalues λ_1 ≥ … ≥ λ_d and eigenvectors U, σ² = mean(λ_{q+1..d}),
W = U_q (Λ_q − σ² I)^½ (up to a rotation of η). The log-likelihood is exact, also with missing design times
(the marginal of the observed coordinates, N(z_o; μ_o, C_oo)).

``method="closed"`` uses the formulas (complete data only); ``"laplace"``, ``"saem"``, ``"vem"`` (and every other
``nlmefit.fit`` method) fit :class:`PPCAModel` — a :class:`~nlmefit.baselines.design_model.DesignModel` — with
the NLME estimators. Laplace is exact for a linear-Gaussian model, SAEM is a stochastic EM and VEM with a
Gaussian q contains the exact posterior, so all three must reproduce the closed form (tests/test_baselines_ppca_vae.py).
"""
from __future__ import annotations

import numpy as np
import torch

import nlmefit
from nlmefit.baselines.base import Baseline
from nlmefit.baselines.design_model import DesignData, DesignModel
from nlmefit.errors import DataError, ModelSpecError
from nlmefit.models.parameters import Omega, Param, ParameterSet, Params

__all__ = ["PPCA", "PPCAModel", "ppca_closed_form", "gaussian_log_prob"]


class PPCAModel(DesignModel):
    """PPCA as a LatentModel: weights ``mu`` [d] and ``W`` [d, q], σ shared (``sigma_eps``), Ω = I fixed."""

    name = "ppca"

    def __init__(self, times, q: int = 1, ctx_scale: float = 1.0, seed: int = 0):
        super().__init__(times, q, ctx_scale)
        d = len(self.times)
        w0 = 0.5 * torch.randn(d, q, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        self.parameters = ParameterSet({}, Omega({f"z{k}": 1.0 for k in range(q)}, fixed=True),
                                       {"eps": Param(1.0, lower=0.0)}, weights={"mu": torch.zeros(d), "W": w0})

    def design_mean(self, p: Params, eta: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        return p.weights["mu"] + (p.weights["W"] @ eta.unsqueeze(-1)).squeeze(-1)

    def design_sd(self, p: Params) -> torch.Tensor:
        return p.sigma["eps"].reshape(1).expand(len(self.times))


def ppca_closed_form(z: torch.Tensor, q: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(μ [d], W [d, q], σ²) maximising Σ_i log N(z_i; μ, WWᵀ + σ²I) for complete data z [n, d]."""
    n, d = z.shape
    if not 1 <= q < d:
        raise ModelSpecError(f"q must be in 1..{d - 1} for d = {d}, got {q}")
    mu = z.mean(0)
    r = z - mu
    lam, U = torch.linalg.eigh(r.T @ r / n)
    lam, U = lam.flip(0), U.flip(1)
    s2 = lam[q:].mean().clamp_min(torch.finfo(z.dtype).tiny)
    W = U[:, :q] * (lam[:q] - s2).clamp_min(0).sqrt()
    return mu, W, s2


def gaussian_log_prob(z: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """log N(z_o; μ_o, C_oo) per row, batched over rows with different observed sets (``mask`` [n, d]).

    Missing coordinates are swapped for an independent unit-variance coordinate at its mean (contributing
    exactly −½ log 2π each), which is then removed."""
    m = mask.to(C.dtype)
    Cm = m.unsqueeze(-1) * C * m.unsqueeze(-2) + torch.diag_embed(1.0 - m)
    r = torch.where(mask, z - mu, torch.zeros_like(z))
    lp = MultivariateNormalRows(Cm).log_prob(r)
    return lp + 0.5 * (1.0 - m).sum(-1) * float(np.log(2 * np.pi))


class MultivariateNormalRows:
    """log N(r; 0, C_i) for rows r_i with their own covariance C_i, by batched Cholesky."""

    def __init__(self, C: torch.Tensor):
        self.L = torch.linalg.cholesky(C)

    def log_prob(self, r: torch.Tensor) -> torch.Tensor:
        sol = torch.linalg.solve_triangular(self.L, r.unsqueeze(-1), upper=False).squeeze(-1)
        logdet = torch.log(torch.diagonal(self.L, dim1=-2, dim2=-1)).sum(-1)
        return -0.5 * (sol ** 2).sum(-1) - logdet - 0.5 * r.shape[-1] * float(np.log(2 * np.pi))


class PPCA(Baseline):
    """PPCA with ``q`` latent dimensions (see the module docstring); ``method`` "closed" or an ``nlmefit.fit``
    method ("laplace", "saem", "vem", …) with ``fit_options`` passed to the estimator. Runs in float64."""

    name = "ppca"
    kind = "exact"
    supports_missing = True

    def __init__(self, q: int = 2, *, method: str = "closed", fit_options: dict | None = None, device=None,
                 seed: int = 0):
        super().__init__(device=device, seed=seed, dtype=torch.float64)
        self.q, self.method, self.fit_options = int(q), str(method), dict(fit_options or {})
        self.fit_result = None

    def _fit(self, z, mask, ctx, valid) -> None:
        d = z.shape[1]
        if not 1 <= self.q < d:
            raise ModelSpecError(f"PPCA: q must be in 1..{d - 1} for {d} design times, got {self.q}")
        if self.method == "closed":
            if not bool(mask.all()):
                raise DataError("PPCA(method='closed') needs complete data; use method='laplace' (exact with "
                                "missing design times) or view.complete()")
            self.mu_, self.W_, s2 = ppca_closed_form(z, self.q)
            self.sigma2_ = s2
            return
        model = PPCAModel(self.design_times, self.q, seed=self.seed)
        data = DesignData.from_arrays(np.arange(1, z.shape[0] + 1), z, mask, ctx, self.design_times, self.q)
        opts = {"covariance": None, **self.fit_options}
        self.fit_result = nlmefit.fit(model, data, method=self.method, seed=self.seed, **opts)
        p = self.fit_result.population_parameters(device=self.device)
        self.mu_, self.W_, self.sigma2_ = p.weights["mu"], p.weights["W"], p.sigma["eps"] ** 2

    @property
    def covariance_(self) -> torch.Tensor:
        """C = W Wᵀ + σ² I on the standardised scale."""
        return self.W_ @ self.W_.T + self.sigma2_ * torch.eye(self.W_.shape[0], dtype=self.W_.dtype,
                                                              device=self.W_.device)

    def _sample(self, n, ctx, generator) -> torch.Tensor:
        kw = dict(generator=generator, device=self.device, dtype=torch.float64)
        eta = torch.randn(n, self.q, **kw)
        return self.mu_ + eta @ self.W_.T + self.sigma2_.sqrt() * torch.randn(n, self.W_.shape[0], **kw)

    def _log_prob(self, z, mask, ctx, generator) -> torch.Tensor:
        return gaussian_log_prob(z, mask, self.mu_, self.covariance_)
