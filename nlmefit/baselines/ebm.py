r"""EBM baseline: an energy-based model on the standardised subject vectors, fitted by score matching.

Notation: y_i ∈ R^d is subject i's vector on the common design, z_i = (y_i − m) / s its standardised version. The
model is p_θ(z) = exp(−E_θ(z)) / Z_θ with

    E_θ(z) = f_θ(z) + ½ (z − b)ᵀ B⁻¹ (z − b),

f_θ an MLP with a scalar output (SiLU, smooth enough for the second derivatives of SSM; last layer started at
zero) and a Gaussian term N(b, B) that makes exp(−E) integrable whatever f_θ does (an MLP grows at most linearly,
so exp(−E) ≤ C exp(a‖z‖ − ½ (z − b)ᵀB⁻¹(z − b))). ``base="gaussian"`` (default): b, B = m̂, Ŝ, the mean and
covariance of the training z — the untrained model is the Gaussian fit and f_θ learns the non-Gaussian residual
(much less prone to spurious low-energy regions than a bare MLP at n ≈ 500); ``base="tail"``: b = 0, B = τ² I
with τ = ``tau`` (default 3 on the standardised scale), a weak tail only. The score is s_θ(z) = −∇_z E_θ(z)
(autograd, ``create_graph=True`` in training so the loss can be differentiated in θ). Unconditional only.

**Objectives** (Z_θ never enters; the score does not depend on it):

* ``"dsm"`` — denoising score matching (Vincent 2011) at one noise level σ (``noise_std``):
  L = E_{z, ε} ½ ‖σ s_θ(z + σε) + ε‖² (= σ² · ½ ‖s_θ(z̃) − ∇ log q_σ(z̃ | z)‖²), computed without its θ-free part
  ½ ‖ε‖² and with antithetic pairs ±ε (both only lower the variance of the loss that early stopping watches).
  Its minimiser is the score of the σ-smoothed data p ∗ N(0, σ² I), so the model is that density: a variance
  inflation of σ² per standardised coordinate (default σ = 0.05: 0.25 % of the marginal variance).
* ``"ssm"`` — sliced score matching (Song et al. 2019), variance-reduced form for Gaussian projections
  v ~ N(0, I): L = E_z E_v [vᵀ ∇_z(vᵀ s_θ(z)) + ½ ‖s_θ(z)‖²] with ``n_slices`` projections per subject (the
  ½ (vᵀ s)² of plain SSM replaced by its expectation ½ ‖s‖²). It targets the data score itself.

**Sampling**: unadjusted Langevin dynamics z ← z + η M s_θ(z) + √(2η) L ξ, ξ ~ N(0, I), ``n_steps`` steps of
size η (``step_size``), started from N(0, I) on the standardised scale, all chains in one batch, no clipping.
M = L Lᵀ is a fixed preconditioner, the covariance of the training z (``precondition=True``; M = I otherwise):
it leaves the stationary law of the continuous dynamics unchanged and makes η act in whitened units, so strongly
correlated time points (PK curves) neither diverge nor mix slowly. Without a Metropolis correction the chain's
law is biased: about a factor 1 / (1 − η/2) on the variance in whitened units (0.5 % at η = 0.01). The default
η · n_steps = 20 whitened time units: on d = 10 PK-like data 500 steps were not enough to reach the law that
importance sampling sees (up to 30 % too much variance), 2000 were.

**Likelihood** (``kind = "estimate"``): log p(z) = −E_θ(z) − log Ẑ, with log Z estimated once after the fit by
importance sampling, K = ``n_is`` draws x_k from the proposal

    r = (1 − ω) N(m̂, κ² Ŝ) + ω N(b, B),

κ² = ``proposal_scale`` (default 1.5²) widening the Gaussian fitted to the training z, and a defensive component
(Hesterberg 1995) of weight ω = ``defensive`` (default 0.1) equal to the base Gaussian, which keeps the weights'
variance finite: w = exp(−E)/r ≤ exp(−f_θ) (2π)^{d/2} |B|^{1/2} / ω. log Ẑ = logsumexp_k(−E(x_k) − log r(x_k))
− log K; its Monte-Carlo standard error by the delta method, SE(log Ẑ) = sd(w) / (√K · mean(w)), is kept as
``log_z_se`` (the effective sample size as ``is_ess``). The same log Ẑ is subtracted for every subject, so a test
set's NLL carries that common error; E[log Ẑ] ≤ log Z, so log p is biased upwards by about SE²/2.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from nlmefit.baselines.base import Baseline
from nlmefit.baselines.nets import mlp
from nlmefit.baselines.trainer import Phase
from nlmefit.errors import EstimationError, ModelSpecError

__all__ = ["EBM"]

DEFAULT_TRAINER = {"max_epochs": 300, "batch_size": 128, "lr": 1e-3, "patience": 30}
OBJECTIVES = ("dsm", "ssm")
BASES = ("gaussian", "tail")


class _EBMObjective(nn.Module):
    """E_θ(z) = f_θ(z) + ½ (z − b)ᵀ B⁻¹ (z − b) (b, B⁻¹ buffers set by the fit) and the score-matching loss."""

    def __init__(self, d: int, hidden: int, depth: int, tau: float, objective: str, noise_std: float,
                 n_slices: int):
        super().__init__()
        self.f = mlp(d, 1, hidden, depth, zero_last=True)
        self.tau, self.objective, self.noise_std, self.n_slices = float(tau), objective, float(noise_std), n_slices
        self.register_buffer("base_mean", torch.zeros(d))
        self.register_buffer("base_prec", torch.eye(d) / self.tau ** 2)

    def phases(self) -> list[Phase]:
        return [Phase("model", list(self.f.parameters()))]

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        """E_θ(x) [...]."""
        u = x - self.base_mean
        return self.f(x).squeeze(-1) + 0.5 * ((u @ self.base_prec) * u).sum(-1)

    def score(self, x: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
        """s_θ(x) = −∇_x E_θ(x); x must require grad."""
        return -torch.autograd.grad(self.energy(x).sum(), x, create_graph=create_graph)[0]

    def loss(self, batch: tuple, phase: str, generator: torch.Generator) -> torch.Tensor:
        z = batch[0]
        if self.objective == "dsm":
            eps = torch.randn(z.shape, device=z.device, dtype=z.dtype, generator=generator)
            eps = torch.cat([eps, -eps])  # antithetic pair: cancels the O(σ) zero-mean term s(z)·ε
            x = (z.repeat(2, 1) + self.noise_std * eps).requires_grad_(True)
            s = self.noise_std * self.score(x, create_graph=True)
            return (0.5 * (s * s).sum(-1) + (s * eps).sum(-1)).mean()  # ½‖σs + ε‖² − ½‖ε‖² (θ-free term dropped)
        m = self.n_slices
        x = z.repeat(m, 1).requires_grad_(True)  # [m·B, d]: one projection per copy
        v = torch.randn(x.shape, device=z.device, dtype=z.dtype, generator=generator)
        s = self.score(x, create_graph=True)
        vjv = (torch.autograd.grad((s * v).sum(), x, create_graph=True)[0] * v).sum(-1)  # vᵀ ∇(vᵀ s)
        return (vjv + 0.5 * (s * s).sum(-1)).mean()

    def validation_loss(self, batch: tuple, generator: torch.Generator) -> torch.Tensor:
        return self.loss(batch, "model", generator)


class EBM(Baseline):
    """Energy-based model fitted by denoising or sliced score matching (see the module docstring).

    Parameters: ``objective`` "dsm" | "ssm"; ``noise_std`` (DSM σ), ``n_slices`` (SSM projections); ``hidden``,
    ``depth`` of f_θ; ``base`` "gaussian" | "tail" and ``tau`` of the Gaussian term; Langevin ``step_size``,
    ``n_steps``, ``precondition``; log Z by importance sampling with ``n_is`` draws, ``proposal_scale`` (variance
    factor κ²) and ``defensive`` weight ω; ``max_rows`` rows per energy evaluation; ``trainer_options`` merged
    over :data:`DEFAULT_TRAINER`. After ``fit``: ``log_z``, ``log_z_se``, ``is_ess``.
    """

    name = "ebm"
    kind = "estimate"
    conditional = False

    def __init__(self, *, objective: str = "dsm", noise_std: float = 0.05, n_slices: int = 1, hidden: int = 64,
                 depth: int = 2, tau: float = 3.0, step_size: float = 0.01, n_steps: int = 2000,
                 precondition: bool = True, base: str = "gaussian", n_is: int = 20000,
                 proposal_scale: float = 1.5 ** 2, defensive: float = 0.1, max_rows: int = 1 << 15, device=None,
                 seed: int = 0, dtype: torch.dtype = torch.float32, trainer_options: dict | None = None):
        super().__init__(device=device, seed=seed, dtype=dtype,
                         trainer_options={**DEFAULT_TRAINER, **(trainer_options or {})})
        if objective not in OBJECTIVES:
            raise ModelSpecError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if noise_std <= 0 or tau <= 0 or step_size <= 0 or proposal_scale <= 0:
            raise ModelSpecError("noise_std, tau, step_size and proposal_scale must be positive")
        if min(int(n_slices), int(n_steps), int(n_is), int(max_rows)) < 1:
            raise ModelSpecError("n_slices, n_steps, n_is and max_rows must be positive integers")
        if base not in BASES:
            raise ModelSpecError(f"base must be one of {BASES}, got {base!r}")
        if not 0.0 <= defensive < 1.0:
            raise ModelSpecError(f"defensive must be in [0, 1), got {defensive}")
        self.objective_name, self.noise_std, self.n_slices = objective, float(noise_std), int(n_slices)
        self.hidden, self.depth, self.tau = int(hidden), int(depth), float(tau)
        self.step_size, self.n_steps, self.precondition = float(step_size), int(n_steps), bool(precondition)
        self.n_is, self.proposal_scale, self.defensive = int(n_is), float(proposal_scale), float(defensive)
        self.max_rows, self.base = int(max_rows), base
        self.conditional = False
        self.objective: _EBMObjective | None = None
        self.log_z: float | None = None
        self.log_z_se: float | None = None
        self.is_ess: float | None = None

    # ------------------------------------------------------------------ hooks
    def _fit(self, z: torch.Tensor, mask: torch.Tensor, ctx: torch.Tensor, valid) -> None:
        d = z.shape[1]
        self.objective = _EBMObjective(d, self.hidden, self.depth, self.tau, self.objective_name, self.noise_std,
                                       self.n_slices).to(device=self.device, dtype=self.dtype)
        z64 = z.to(torch.float64)
        self._mean = z64.mean(0)
        cov = torch.cov(z64.T).reshape(d, d) if z.shape[0] > 1 else torch.eye(d, dtype=torch.float64,
                                                                                 device=z.device)
        cov = cov + 1e-6 * torch.eye(d, dtype=torch.float64, device=z.device) * cov.diagonal().mean().clamp_min(1.0)
        self._cov_chol = torch.linalg.cholesky(cov)
        if self.base == "gaussian":  # base N(m̂, Ŝ): E = f + ½ (z − m̂)ᵀ Ŝ⁻¹ (z − m̂)
            self._base_mean, self._base_chol = self._mean, self._cov_chol
        else:  # base N(0, τ² I): E = f + ½ ‖z‖² / τ²
            self._base_mean = torch.zeros(d, dtype=torch.float64, device=z.device)
            self._base_chol = self.tau * torch.eye(d, dtype=torch.float64, device=z.device)
        self.objective.base_mean.copy_(self._base_mean)
        self.objective.base_prec.copy_(torch.cholesky_inverse(self._base_chol))
        self._train(self.objective, (z,), None if valid is None else (valid[0],))
        self.objective.eval()
        self.estimate_log_z()

    def _sample(self, n: int, ctx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        d = len(self.design_times)
        x = torch.randn((n, d), device=self.device, dtype=self.dtype, generator=generator)
        L = self._cov_chol.to(self.dtype) if self.precondition else torch.eye(d, device=self.device, dtype=self.dtype)
        M = L @ L.T
        eta = self.step_size
        with torch.enable_grad():
            for _ in range(self.n_steps):
                s = self._score_chunked(x)
                xi = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
                x = x + eta * s @ M + math.sqrt(2.0 * eta) * xi @ L.T
        if not bool(torch.isfinite(x).all()):
            raise EstimationError(f"{self.name}: Langevin chains diverged; lower step_size (now {eta:g})")
        return x

    def _log_prob(self, z: torch.Tensor, mask: torch.Tensor, ctx: torch.Tensor,
                  generator: torch.Generator) -> torch.Tensor:
        return -self._energy_chunked(z).to(torch.float64) - self.log_z

    # ------------------------------------------------------------------ helpers
    def energy(self, z: torch.Tensor) -> torch.Tensor:
        """E_θ(z) on the standardised scale (no gradient)."""
        return self._energy_chunked(torch.as_tensor(z, device=self.device, dtype=self.dtype))

    def _energy_chunked(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([self.objective.energy(c) for c in x.split(self.max_rows)])

    def _score_chunked(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.objective.score(c.detach().requires_grad_(True)) for c in x.split(self.max_rows)])

    def _proposal_log_density(self, x: torch.Tensor) -> torch.Tensor:
        """log r(x) of the importance proposal (float64)."""
        d = x.shape[1]
        Lk = math.sqrt(self.proposal_scale) * self._cov_chol
        u = torch.linalg.solve_triangular(Lk, (x - self._mean).T, upper=False)  # [d, K]
        lg = -0.5 * (u * u).sum(0) - torch.log(Lk.diagonal()).sum() - 0.5 * d * math.log(2 * math.pi)
        if self.defensive == 0.0:
            return lg
        ub = torch.linalg.solve_triangular(self._base_chol, (x - self._base_mean).T, upper=False)
        lt = -0.5 * (ub * ub).sum(0) - torch.log(self._base_chol.diagonal()).sum() - 0.5 * d * math.log(2 * math.pi)
        return torch.logaddexp(math.log1p(-self.defensive) + lg, math.log(self.defensive) + lt)

    def estimate_log_z(self, n_is: int | None = None, seed: int | None = None) -> float:
        """Importance-sampling estimate of log Z (sets ``log_z``, ``log_z_se``, ``is_ess``; returns log_z)."""
        if self.objective is None:
            raise ModelSpecError(f"{self.name}: call fit(train) first")
        K = self.n_is if n_is is None else int(n_is)
        gen = self._generator(self.seed + 7919 if seed is None else seed)
        d = self._mean.numel()
        dev, f64 = self.device, torch.float64
        xi = torch.randn((K, d), device=dev, dtype=f64, generator=gen)
        x = self._mean + math.sqrt(self.proposal_scale) * xi @ self._cov_chol.T
        if self.defensive > 0.0:
            pick = torch.rand(K, device=dev, dtype=f64, generator=gen) < self.defensive
            xt = self._base_mean + torch.randn((K, d), device=dev, dtype=f64, generator=gen) @ self._base_chol.T
            x = torch.where(pick.unsqueeze(1), xt, x)
        logw = -self._energy_chunked(x.to(self.dtype)).to(f64) - self._proposal_log_density(x)
        if not bool(torch.isfinite(logw).all()):
            raise EstimationError(f"{self.name}: non-finite importance weights in the log Z estimate")
        lse = torch.logsumexp(logw, 0)
        w = torch.exp(logw - logw.max())
        self.log_z = float(lse - math.log(K))
        self.log_z_se = float(w.std() / (math.sqrt(K) * w.mean()))
        self.is_ess = float(w.sum() ** 2 / (w * w).sum())
        return self.log_z
