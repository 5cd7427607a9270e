"""WGAN-GP baseline: a generator network trained against a Lipschitz critic (no likelihood).

The generator G maps a latent draw w ~ N(0, I_k) (and, when ``conditional``, the scaled dose context c) to a
standardised subject vector z = G(w, c) ∈ R^d, z = (y − m) / s per design time. The critic D(z, c) ∈ R estimates
the Wasserstein-1 distance between the data and the generator's law through the Kantorovich–Rubinstein dual,
with the 1-Lipschitz constraint enforced softly by the gradient penalty of Gulrajani et al. (2017):

    critic:    min_D  E[D(G(w), c)] − E[D(z, c)] + λ E[(‖∇_x D(x̂, c)‖₂ − 1)²],
               x̂ = u·z + (1 − u)·G(w, c), u ~ U(0, 1) per pair (the gradient is taken w.r.t. the data input only);
    generator: min_G  −E[D(G(w, c), c)].

Each mini-batch takes ``n_critic`` critic steps, then one generator step (the shared trainer's two phases
"critic" and "generator"), each with its own Adam optimiser with betas (0.5, 0.9) by default — Gulrajani et al.'s
CIFAR setting; (0.0, 0.9), their toy-data setting, is the ``betas`` option. λ = 10 and n_critic = 5 as in the paper.
Neither network uses batch normalisation (the penalty is per sample).

Defaults deviate from the paper in two places, both for a fixed CPU budget of ~1200 generator steps (n = 500,
300 epochs of 4 batches): lr 3e-4 (at 1e-4 the generator's spread was still 0.1–0.9 of the data's after that many
steps), and the samples come from an exponential moving average of the generator weights (``ema_decay`` 0.995,
with the warm-up min(decay, (1 + k)/(10 + k)) after k steps; Yazıcı et al. 2019), which removes most of the
oscillation of the last iterate. ``ema_decay=None`` samples from the last iterate.

There is no density: ``kind = "none"`` and ``log_prob`` raises :class:`~nlmefit.errors.ModelSpecError`.

Stopping: WGAN losses are not comparable across epochs (the critic that measures them changes), so early stopping
or keeping a "best" epoch on them is meaningless. The default trainer options are ``patience=None``,
``restore_best=False`` and a fixed ``max_epochs``: the final networks are kept. A ``valid`` view passed to
``fit`` is not used.

Timing (one CPU thread on a shared 2-core machine, n = 500 one-compartment PK profiles, d = 10, defaults): fit
≈ 33 s (7200 optimiser steps, ~4.6 ms each: per-step overhead, the critic pass over [real; fake; x̂] is fused).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from nlmefit.baselines.base import Baseline
from nlmefit.baselines.nets import mlp
from nlmefit.baselines.trainer import Phase
from nlmefit.errors import ModelSpecError

__all__ = ["WGANGP"]

_DEFAULT_TRAINER = {"max_epochs": 300, "batch_size": 128, "patience": None, "restore_best": False}


class _WGANObjective(nn.Module):
    """Generator, critic and the WGAN-GP losses; phases "critic" (× n_critic) then "generator"."""

    def __init__(self, generator: nn.Module, critic: nn.Module, *, latent_dim: int, conditional: bool,
                 n_critic: int, gp_weight: float, lr: float | None, betas: tuple[float, float],
                 ema_decay: float | None):
        super().__init__()
        self.generator, self.critic = generator, critic
        self.ema_decay = ema_decay
        self.average = copy.deepcopy(generator).requires_grad_(False) if ema_decay is not None else None
        self.latent_dim, self.conditional = int(latent_dim), bool(conditional)
        self.n_critic, self.gp_weight, self.lr, self.betas = int(n_critic), float(gp_weight), lr, tuple(betas)
        self.register_buffer("generator_steps", torch.zeros(()))

    def generate(self, c: torch.Tensor, generator: torch.Generator, average: bool = False) -> torch.Tensor:
        """G(w, c) for w ~ N(0, I); ``average``: with the averaged generator weights (when kept)."""
        w = torch.randn(c.shape[0], self.latent_dim, generator=generator, device=c.device, dtype=c.dtype)
        net = self.average if average and self.average is not None else self.generator
        return net(torch.cat([w, c], -1) if self.conditional else w)

    @torch.no_grad()
    def _update_average(self) -> None:
        k = float(self.generator_steps)
        decay = min(self.ema_decay, (1.0 + k) / (10.0 + k))  # short memory at the start
        for avg, p in zip(self.average.parameters(), self.generator.parameters()):
            avg.lerp_(p, 1.0 - decay)

    def score(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.critic(torch.cat([x, c], -1) if self.conditional else x).squeeze(-1)

    def phases(self) -> list[Phase]:
        return [Phase("critic", list(self.critic.parameters()), self.n_critic, self.lr, self.betas),
                Phase("generator", list(self.generator.parameters()), 1, self.lr, self.betas)]

    def loss(self, batch: tuple, phase: str, generator: torch.Generator) -> torch.Tensor:
        real, c = batch
        if phase == "generator":
            if self.average is not None:  # the average of the weights before each generator step
                self._update_average()
            self.generator_steps += 1
            return -self.score(self.generate(c, generator), c).mean()
        with torch.no_grad():  # the critic step updates the critic only
            fake = self.generate(c, generator)
        n = real.shape[0]
        u = torch.rand(n, 1, generator=generator, device=real.device, dtype=real.dtype)
        x_hat = (u * real + (1.0 - u) * fake).requires_grad_(True)
        # one critic pass over [real; fake; x̂] (small networks are overhead-bound)
        scores = self.score(torch.cat([real, fake, x_hat]), c.repeat(3, 1))
        grad, = torch.autograd.grad(scores[2 * n:].sum(), x_hat, create_graph=True)
        penalty = (grad.norm(dim=-1) - 1.0).pow(2).mean()
        return scores[n:2 * n].mean() - scores[:n].mean() + self.gp_weight * penalty


class WGANGP(Baseline):
    """Wasserstein GAN with gradient penalty (see the module docstring).

    Parameters: ``latent_dim`` (default d, the data dimension, when None); ``hidden``, ``depth`` (both MLPs);
    ``n_critic`` (critic steps per generator step, 5); ``gp_weight`` λ (10); ``lr`` (3e-4, both networks);
    ``betas`` ((0.5, 0.9)); ``ema_decay`` (sample from averaged generator weights; None: the last iterate);
    ``conditional`` (generator and critic both get the dose context); ``device``, ``seed``,
    ``dtype``, ``trainer_options`` as in :class:`~nlmefit.baselines.base.Baseline` — defaults ``max_epochs=300,
    batch_size=128, patience=None, restore_best=False`` merged with the user's (a ``lr`` there is overridden by
    ``lr`` here).
    """

    name = "gan"
    kind = "none"

    def __init__(self, *, latent_dim: int | None = None, hidden: int = 128, depth: int = 3, n_critic: int = 5,
                 gp_weight: float = 10.0, lr: float = 3e-4, betas: tuple[float, float] = (0.5, 0.9),
                 ema_decay: float | None = 0.995, conditional: bool = False, device=None, seed: int = 0,
                 dtype: torch.dtype = torch.float32, trainer_options: dict | None = None):
        if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
            raise ModelSpecError(f"ema_decay must be in [0, 1) or None, got {ema_decay}")
        if latent_dim is not None and int(latent_dim) < 1:
            raise ModelSpecError(f"latent_dim must be positive, got {latent_dim}")
        if min(int(hidden), int(depth), int(n_critic)) < 1 or gp_weight < 0 or lr <= 0:
            raise ModelSpecError("need hidden, depth, n_critic >= 1, gp_weight >= 0 and lr > 0")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ModelSpecError(f"betas must be two numbers in [0, 1), got {betas}")
        super().__init__(device=device, seed=seed, dtype=dtype,
                         trainer_options={**_DEFAULT_TRAINER, **(trainer_options or {})})
        self.latent_dim = None if latent_dim is None else int(latent_dim)
        self.hidden, self.depth, self.n_critic, self.gp_weight = int(hidden), int(depth), int(n_critic), gp_weight
        self.lr, self.betas, self.conditional = float(lr), (float(betas[0]), float(betas[1])), bool(conditional)
        self.ema_decay = None if ema_decay is None else float(ema_decay)
        self.objective: _WGANObjective | None = None

    def _fit(self, z, mask, ctx, valid) -> None:
        d = z.shape[1]
        k = d if self.latent_dim is None else self.latent_dim
        c_dim = d if self.conditional else 0
        self.objective = _WGANObjective(mlp(k + c_dim, d, self.hidden, self.depth),
                                        mlp(d + c_dim, 1, self.hidden, self.depth), latent_dim=k,
                                        conditional=self.conditional, n_critic=self.n_critic,
                                        gp_weight=self.gp_weight, lr=self.lr, betas=self.betas,
                                        ema_decay=self.ema_decay).to(self.device, self.dtype)
        self._train(self.objective, (z, ctx), None)

    def _sample(self, n: int, ctx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.objective.generate(ctx, generator, average=True)
