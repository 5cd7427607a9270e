"""Small network pieces shared by the neural baselines: an MLP and a sinusoidal embedding of a scalar time."""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["mlp", "time_embedding", "ConditionedMLP"]


def mlp(in_dim: int, out_dim: int, hidden: int = 128, depth: int = 3, activation: type[nn.Module] = nn.SiLU,
        zero_last: bool = False) -> nn.Sequential:
    """``depth`` hidden layers of width ``hidden``; the last layer starts at zero when ``zero_last``."""
    layers: list[nn.Module] = []
    d = in_dim
    for _ in range(depth):
        layers += [nn.Linear(d, hidden), activation()]
        d = hidden
    last = nn.Linear(d, out_dim)
    if zero_last:
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
    layers.append(last)
    return nn.Sequential(*layers)


def time_embedding(t: torch.Tensor, dim: int = 16, max_period: float = 1000.0) -> torch.Tensor:
    """[..., dim] sinusoidal features of t ∈ [0, 1] (or a step index / T): sin and cos at geometric frequencies."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=t.dtype) / half)
    args = 1000.0 * t.unsqueeze(-1) * freqs if t.dtype.is_floating_point else t.unsqueeze(-1) * freqs
    return torch.cat([torch.sin(args), torch.cos(args)], -1)


class ConditionedMLP(nn.Module):
    """f(x, t, c): an MLP on [x, time_embedding(t), c] — the denoiser / velocity / score network.

    ``t_dim`` = 0 drops the time input, ``c_dim`` = 0 the context input.
    """

    def __init__(self, x_dim: int, out_dim: int, *, t_dim: int = 16, c_dim: int = 0, hidden: int = 128,
                 depth: int = 3, zero_last: bool = False):
        super().__init__()
        self.t_dim, self.c_dim = t_dim, c_dim
        self.net = mlp(x_dim + t_dim + c_dim, out_dim, hidden, depth, zero_last=zero_last)

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None, c: torch.Tensor | None = None) -> torch.Tensor:
        parts = [x]
        if self.t_dim:
            t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[:-1])
            parts.append(time_embedding(t, self.t_dim))
        if self.c_dim:
            parts.append(c.expand(*x.shape[:-1], self.c_dim))
        return self.net(torch.cat(parts, -1))
