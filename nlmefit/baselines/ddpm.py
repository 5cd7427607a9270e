r"""DDPM baseline: a denoising diffusion model on the standardised subject vectors, likelihood by its bound.

Notation: y_i ∈ R^d is subject i's vector on the common design, z_i = (y_i − m) / s its standardised version
(:class:`~nlmefit.baselines.design.Standardizer`); the diffusion runs on x_0 = z_i. With c_i the (scaled) dose
context when ``conditional=True``.

**Forward process** (Ho et al. 2020), t = 1..T: q(x_t | x_{t−1}) = N(√α_t x_{t−1}, β_t I), α_t = 1 − β_t,
ᾱ_t = Π_{s≤t} α_s, so q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I), i.e. x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε.
Schedule: linear β_t from ``beta_start`` to ``beta_end``; by default the (1e-4, 0.02) endpoints of Ho et al. at
T = 1000 rescaled by 1000 / T (Nichol & Dhariwal 2021), so that Σ β_t — hence ᾱ_T ≈ exp(−Σ β_t) ≈ 4.5e-5 — does
not depend on T. Default T = 200: β from 5e-4 to 0.1.

**Reverse model**: p_θ(x_T) = N(0, I), p_θ(x_{t−1} | x_t) = N(μ_θ(x_t, t), σ_t² I) with the ε-parametrisation
μ_θ(x_t, t) = (x_t − β_t / √(1 − ᾱ_t) · ε_θ(x_t, t, c)) / √α_t, and ε_θ(x_t, t, c) = √(1 − ᾱ_t) x_t + g_θ(x_t, t, c)
with g_θ a :class:`~nlmefit.baselines.nets.ConditionedMLP` whose last layer starts at zero: the skip term is
E[ε | x_t] when x_0 ~ N(0, I), the standardised data's first-order description, so the network only learns the
correction (halved the bound's gap on correlated Gaussian test data).
Variances (``variance=``): ``"beta"`` (default) σ_t² = β_t, or ``"posterior"`` σ_t² = β̃_t = β_t (1 − ᾱ_{t−1}) /
(1 − ᾱ_t), the variance of q(x_{t−1} | x_t, x_0). Both give well-defined Gaussian KLs for t ≥ 2 (β̃_t > 0 there),
but on continuous data they are not equally good *bounds*: β̃_t is the right reverse variance only when x_0 is a
point mass, β_t when x_0 is spread like N(0, I) (Ho et al. 2020, §3.2). With the exact optimal ε_θ for a 3-D
Gaussian with correlations 0.4–0.7, T = 200, the best achievable bound is 0.007 nats above the true NLL with β_t
and 2.64 nats above it with β̃_t (8.26 vs 0.15 nats for a 10-D AR(0.9) Gaussian): the small-t KL terms, whose
weights β_t² / (α_t (1 − ᾱ_t) σ_t²) are O(1), penalise the too-small β̃_t heavily. Since β̃_1 = 0, the last step
(the **L0 decoder** of the continuous data, p_θ(x_0 | x_1) = N(μ_θ(x_1, 1), σ_1² I)) uses σ_1² = β_1 under both
choices, so its density is proper.

**Training**: the simplified loss L_simple = E_{t ~ U{1..T}, x_0, ε} ‖ε − ε_θ(√ᾱ_t x_0 + √(1 − ᾱ_t) ε, t, c)‖²
(mean over the d coordinates), through the shared :class:`~nlmefit.baselines.trainer.Trainer`; the t of a
mini-batch are stratified (one uniform offset, B evenly spaced points on [0, 1)), which lowers the variance of the
loss that early stopping watches without changing its expectation.

**Sampling**: ancestral, x_T ~ N(0, I), x_{t−1} = μ_θ(x_t, t) + σ_t ξ down to x_0 — including the σ_1 noise of the
L0 decoder, so the samples are draws of exactly the model whose bound is reported. Samples are not clipped.

**Likelihood** (``kind = "bound"``): ``_log_prob`` returns the ELBO, log p_θ(x_0) ≥ −L with

    L = L_T + Σ_{t=2}^T L_{t−1} + L_0,
    L_T     = KL(q(x_T | x_0) ‖ N(0, I)) = ½ Σ_j [(1 − ᾱ_T) + ᾱ_T x_{0j}² − 1 − log(1 − ᾱ_T)],
    L_{t−1} = E_q KL(q(x_{t−1} | x_t, x_0) ‖ p_θ(x_{t−1} | x_t))
            = ½ d [r_t − 1 − log r_t] + ½ β_t² / (α_t (1 − ᾱ_t) σ_t²) · E‖ε − ε_θ(x_t, t)‖²,   r_t = β̃_t / σ_t²,
    L_0     = −E_q log p_θ(x_0 | x_1) = ½ d log(2π σ_1²) + ½ β_1 / (α_1 σ_1²) · E‖ε − ε_θ(x_1, 1)‖²

(the mean difference μ̃_t − μ_θ = β_t / (√α_t √(1 − ᾱ_t)) (ε_θ − ε) when x_t is written with the same ε). Every
t = 1..T is evaluated for every subject — one forward-noise draw ε per (subject, t) from the generator handed to
``log_prob``, averaged over ``n_bound_samples`` repeats — vectorised over subjects × t-chunks. With
``control_variate=True`` (default) each ‖ε − ε_θ‖² is replaced by ‖ε − ε_θ‖² − ᾱ_t² (‖ε‖² − d): unbiased since
E‖ε‖² = d, and ᾱ_t² is the regression coefficient of ‖ε − ε_θ‖² on ‖ε‖² when ε_θ ≈ the skip term; it removes the
χ²_d noise of the heavily weighted small-t terms (per-subject MC sd 1.9 → 0.4 nats on 3-D test data). The value
is an unbiased Monte-Carlo estimate of the ELBO (the expectation over ε is what makes it a bound), so its mean over
a test set is below the true mean log-likelihood up to that MC error; exp of it is, by Jensen, biased low too.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from nlmefit.baselines.base import Baseline
from nlmefit.baselines.nets import ConditionedMLP
from nlmefit.baselines.trainer import Phase
from nlmefit.errors import ModelSpecError

__all__ = ["DDPM", "linear_beta_schedule"]

DEFAULT_TRAINER = {"max_epochs": 1500, "batch_size": 256, "lr": 2e-3, "patience": 150}


def linear_beta_schedule(T: int, beta_start: float | None = None, beta_end: float | None = None) -> torch.Tensor:
    """β_1..β_T linear; defaults are Ho et al.'s (1e-4, 0.02) at T = 1000 rescaled by 1000 / T (float64)."""
    scale = 1000.0 / T
    b0 = 1e-4 * scale if beta_start is None else float(beta_start)
    b1 = 0.02 * scale if beta_end is None else float(beta_end)
    return torch.linspace(b0, b1, T, dtype=torch.float64)


class _Schedule(nn.Module):
    """The diffusion constants as buffers (float64 for the bound's coefficients, cast on use)."""

    def __init__(self, betas: torch.Tensor, variance: str):
        super().__init__()
        betas = betas.to(torch.float64)
        alphas = 1.0 - betas
        abar = torch.cumprod(alphas, 0)
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        post = betas * (1.0 - abar_prev) / (1.0 - abar)  # β̃_t; β̃_1 = 0
        sigma2 = post.clone() if variance == "posterior" else betas.clone()
        sigma2[0] = betas[0]  # L0 decoder variance σ_1² = β_1 (β̃_1 = 0 is not a density)
        coef = betas ** 2 / (alphas * (1.0 - abar) * sigma2)  # weight of ‖ε − ε_θ‖² in L_{t−1}
        ratio = torch.where(post > 0, post / sigma2, torch.ones_like(post))
        const = 0.5 * (ratio - 1.0 - torch.log(ratio))  # per-coordinate Gaussian KL constant, t ≥ 2
        const[0] = 0.5 * math.log(2.0 * math.pi) + 0.5 * torch.log(sigma2[0])  # per-coordinate L0 constant
        for k, v in dict(betas=betas, alphas=alphas, abar=abar, sigma2=sigma2, coef=coef, const=const).items():
            self.register_buffer(k, v)


class _DDPMObjective(nn.Module):
    """ε_θ and the simplified ε-prediction loss."""

    def __init__(self, d: int, T: int, sched: _Schedule, conditional: bool, hidden: int, depth: int, t_dim: int):
        super().__init__()
        self.T, self.conditional, self.sched = T, conditional, sched
        self.eps = ConditionedMLP(d, d, t_dim=t_dim, c_dim=d if conditional else 0, hidden=hidden, depth=depth,
                                  zero_last=True)

    def phases(self) -> list[Phase]:
        return [Phase("model", list(self.eps.parameters()))]

    def eps_hat(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        """ε_θ(x_t, t, c); t is an integer step 1..T (tensor broadcastable to x.shape[:-1])."""
        skip = (1.0 - self.sched.abar[t - 1]).sqrt().to(x.dtype).unsqueeze(-1) * x  # E[ε | x_t] for N(0, I) data
        return skip + self.eps(x, t.to(x.dtype) / self.T, c if self.conditional else None)

    def loss(self, batch: tuple, phase: str, generator: torch.Generator) -> torch.Tensor:
        x0 = batch[0]
        c = batch[1] if self.conditional else None
        b = x0.shape[0]  # stratified t: one uniform offset, B evenly spaced points (lower-variance L_simple)
        u = torch.rand((), device=x0.device, dtype=torch.float64, generator=generator)
        grid = (u + torch.arange(b, device=x0.device, dtype=torch.float64) / b) % 1.0
        t = (grid * self.T).long().clamp_(0, self.T - 1) + 1
        eps = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        ab = self.sched.abar[t - 1].to(x0.dtype).unsqueeze(-1)
        xt = ab.sqrt() * x0 + (1.0 - ab).sqrt() * eps
        return ((eps - self.eps_hat(xt, t, c)) ** 2).mean()


class DDPM(Baseline):
    """Denoising diffusion probabilistic model (see the module docstring); NLL is the variational bound.

    Parameters: ``T`` steps; ``betas`` (a length-T sequence, overrides ``beta_start``/``beta_end``, whose
    defaults are Ho et al.'s schedule rescaled to T); ``variance`` "beta" (σ_t² = β_t) or "posterior" (β̃_t);
    ``hidden``/``depth``/``t_dim`` of the ε-network; ``conditional`` — ε_θ also sees the dose context;
    ``n_bound_samples`` forward-noise repeats averaged in the bound, ``control_variate`` (its variance reduction)
    and ``max_rows`` rows per network call in it (memory); ``trainer_options`` merged over
    :data:`DEFAULT_TRAINER`.
    """

    name = "ddpm"
    kind = "bound"

    def __init__(self, *, T: int = 200, betas=None, beta_start: float | None = None, beta_end: float | None = None,
                 variance: str = "beta", hidden: int = 128, depth: int = 3, t_dim: int = 16,
                 conditional: bool = False, n_bound_samples: int = 1, control_variate: bool = True,
                 max_rows: int = 1 << 16, device=None, seed: int = 0, dtype: torch.dtype = torch.float32,
                 trainer_options: dict | None = None):
        super().__init__(device=device, seed=seed, dtype=dtype,
                         trainer_options={**DEFAULT_TRAINER, **(trainer_options or {})})
        if variance not in ("posterior", "beta"):
            raise ModelSpecError(f"variance must be 'posterior' or 'beta', got {variance!r}")
        if betas is not None:
            betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
            T = int(betas.numel())
        if int(T) < 2:
            raise ModelSpecError(f"T must be at least 2, got {T}")
        self.T = int(T)
        self.betas = linear_beta_schedule(self.T, beta_start, beta_end) if betas is None else betas
        if not bool(((self.betas > 0) & (self.betas < 1)).all()):
            raise ModelSpecError("betas must lie in (0, 1)")
        if int(n_bound_samples) < 1 or int(max_rows) < 1:
            raise ModelSpecError("n_bound_samples and max_rows must be positive")
        self.variance, self.hidden, self.depth, self.t_dim = variance, int(hidden), int(depth), int(t_dim)
        self.conditional = bool(conditional)
        self.n_bound_samples, self.max_rows = int(n_bound_samples), int(max_rows)
        self.control_variate = bool(control_variate)
        self.objective: _DDPMObjective | None = None

    # ------------------------------------------------------------------ hooks
    def _fit(self, z: torch.Tensor, mask: torch.Tensor, ctx: torch.Tensor, valid) -> None:
        sched = _Schedule(self.betas, self.variance).to(self.device)  # the constants stay float64
        self.objective = _DDPMObjective(z.shape[1], self.T, sched, self.conditional, self.hidden, self.depth,
                                        self.t_dim)
        self.objective.eps.to(device=self.device, dtype=self.dtype)
        train = (z, ctx) if self.conditional else (z,)
        val = None if valid is None else ((valid[0], valid[2]) if self.conditional else (valid[0],))
        self._train(self.objective, train, val)
        self.objective.eval()

    def _sample(self, n: int, ctx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        obj, s = self.objective, self.objective.sched
        d = len(self.design_times)
        x = torch.randn((n, d), device=self.device, dtype=self.dtype, generator=generator)
        for t in range(self.T, 0, -1):
            tt = torch.full((n,), t, device=self.device)
            eh = obj.eps_hat(x, tt, ctx)
            b, a, ab = (float(v[t - 1]) for v in (s.betas, s.alphas, s.abar))
            x = (x - b / math.sqrt(1.0 - ab) * eh) / math.sqrt(a)
            x = x + math.sqrt(float(s.sigma2[t - 1])) * torch.randn(x.shape, device=x.device, dtype=x.dtype,
                                                                     generator=generator)
        return x

    def _log_prob(self, z: torch.Tensor, mask: torch.Tensor, ctx: torch.Tensor,
                  generator: torch.Generator) -> torch.Tensor:
        obj, s = self.objective, self.objective.sched
        n, d = z.shape
        tc = max(1, self.max_rows // max(n, 1))  # steps per network call
        sq = torch.zeros(n, dtype=torch.float64, device=z.device)  # Σ_t coef_t ‖ε − ε_θ‖², summed over repeats
        with torch.no_grad():
            for _ in range(self.n_bound_samples):
                for t0 in range(1, self.T + 1, tc):
                    ts = torch.arange(t0, min(t0 + tc, self.T + 1), device=z.device)  # [k]
                    k = ts.numel()
                    eps = torch.stack([torch.randn((n, d), device=z.device, dtype=z.dtype, generator=generator)
                                       for _ in range(k)])  # one draw per t: the stream does not depend on max_rows
                    ab = s.abar[ts - 1].to(z.dtype).view(k, 1, 1)
                    xt = ab.sqrt() * z.unsqueeze(0) + (1.0 - ab).sqrt() * eps
                    eh = obj.eps_hat(xt, ts.view(k, 1).expand(k, n), None if ctx is None else ctx.unsqueeze(0))
                    err = ((eps - eh) ** 2).sum(-1).to(torch.float64)  # [k, n]
                    if self.control_variate:  # − ᾱ_t² (‖ε‖² − d): zero mean, removes the χ² noise at small t
                        err -= s.abar[ts - 1].view(k, 1) ** 2 * ((eps ** 2).sum(-1).to(torch.float64) - d)
                    sq += (s.coef[ts - 1].view(k, 1) * err).sum(0)
        z64 = z.to(torch.float64)
        abT = s.abar[-1]
        prior = 0.5 * ((1.0 - abT) + abT * z64 ** 2 - 1.0 - torch.log1p(-abT)).sum(-1)
        nll = prior + d * s.const.sum() + 0.5 * sq / self.n_bound_samples
        return -nll
