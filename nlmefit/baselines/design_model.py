"""Latent-variable models on a common design, written against the one interface (:class:`LatentModel`).

PPCA and the VAE are NLME models in the same sense as a PK model: η_i ~ N(0, Ω) (Ω = I, fixed) and

    y_ij = f_j(η_i, c_i; θ) + ε_ij,   ε_ij ~ N(0, σ_j²),

with f the design-wide mean (f = μ + Wη for PPCA, an MLP decoder for the VAE) and c_i the subject's dose
context. :class:`DesignModel` holds everything but f: binding data (each observation's design-time index
``col``, so subjects with missing design times stay in, and the dose context), the Gaussian likelihood, the
prior and the draws. Every estimator (Laplace, SAEM, VEM, IS) fits them through the same code as the PK
models; no estimator knows the difference.
"""
from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.distributions import MultivariateNormal

from nlmefit.errors import DataError
from nlmefit.models.data import ObservationData
from nlmefit.models.parameters import ParameterSet, Params
from nlmefit.panel import Panel

__all__ = ["DesignData", "DesignModel"]

_LOG_2PI = float(np.log(2 * np.pi))


@dataclass(frozen=True)
class DesignData(ObservationData):
    """ObservationData plus ``col`` [N, J] (design-time index of each observation) and ``ctx`` [N, d]."""

    col: torch.Tensor = None  # type: ignore[assignment]
    ctx: torch.Tensor = None  # type: ignore[assignment]

    def index(self, idx) -> DesignData:
        base = super().index(idx)
        return replace(base, col=self.col[idx], ctx=self.ctx[idx])

    @classmethod
    def from_arrays(cls, ids, y: torch.Tensor, mask: torch.Tensor, ctx: torch.Tensor, times: np.ndarray,
                    q: int) -> DesignData:
        """Bind a design grid [N, d] (values where ``mask``) directly: observation j of subject i is design time j."""
        m = mask.detach().cpu().numpy()
        yy = y.detach().to("cpu", torch.float64).numpy()
        i, j = np.nonzero(m)
        import pandas as pd

        frame = pd.DataFrame({"ID": np.asarray(ids)[i], "TIME": np.asarray(times)[j], "DV": yy[i, j]})
        panel = Panel.from_dataframe(frame)
        # the panel lists each subject's observations in time order = design order, so its [N, J] arrays agree with
        # the grid after dropping the missing entries: bind in the panel's layout
        base = ObservationData.from_panel(panel, q, device=y.device, dtype=torch.float64)
        col = np.searchsorted(np.round(np.asarray(times, dtype=float), 9), np.round(panel.obs_time, 9))
        col = np.where(panel.obs_mask, np.clip(col, 0, len(times) - 1), 0)
        return cls(**{f: getattr(base, f) for f in ("panel", "y", "mask", "cens", "limit", "q", "n_occ")},
                   col=torch.as_tensor(col, device=y.device), ctx=ctx.to(torch.float64))


class DesignModel(ABC):
    """Base of the design-aligned latent models (see the module docstring).

    Subclasses set ``parameters`` (their θ and weights, Ω = I fixed over ``q`` effects, σ per time point or
    shared) and implement ``design_mean(p, eta, ctx) -> f`` [..., N, d] and ``design_sd(p) -> σ`` [d].
    """

    name = "design"

    def __init__(self, times, q: int, ctx_scale: float = 1.0):
        self.times = np.asarray(times, dtype=float)
        self.q, self.ctx_scale = int(q), float(ctx_scale)
        self.parameters: ParameterSet

    eta_names = property(lambda self: self.parameters.eta_names)

    # ------------------------------------------------------------------ subclass hooks
    @abstractmethod
    def design_mean(self, p: Params, eta: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """f [..., N, d]: the mean at every design time."""

    @abstractmethod
    def design_sd(self, p: Params) -> torch.Tensor:
        """σ [d]: the residual SD at every design time."""

    # ------------------------------------------------------------------ LatentModel
    def prepare(self, data, device=None, dtype=torch.float64) -> DesignData:
        """Bind a NONMEM-style DataFrame / Panel whose observation times are design times; the dose context
        c_ij = Σ_k AMT_k 1[t_k ≤ t_j] comes from its dose records (scaled by ``ctx_scale``)."""
        panel = data if isinstance(data, Panel) else Panel.from_dataframe(data)
        base = ObservationData.from_panel(panel, self.q, device=device, dtype=dtype)
        t = np.round(panel.obs_time, 9)
        grid = np.round(self.times, 9)
        col = np.clip(np.searchsorted(grid, t), 0, len(grid) - 1)
        off = panel.obs_mask & (grid[col] != t)
        if off.any():
            i, j = np.argwhere(off)[0]
            raise DataError(f"ID {panel.ids[i]}: observation at TIME {panel.obs_time[i, j]:g} is not one of the "
                            f"model's design times {self.times.tolist()}")
        dm = panel.dose_mask
        amt = np.where(dm, panel.dose_amt, 0.0)
        ctx = (amt[:, None, :] * (dm[:, None, :] & (panel.dose_time[:, None, :] <= self.times[None, :, None]))).sum(-1)
        return DesignData(**{f: getattr(base, f) for f in ("panel", "y", "mask", "cens", "limit", "q", "n_occ")},
                          col=torch.as_tensor(np.where(panel.obs_mask, col, 0), device=device),
                          ctx=torch.as_tensor(ctx / self.ctx_scale, device=device, dtype=dtype))

    def predict(self, p: Params, eta: torch.Tensor, data: DesignData) -> tuple[torch.Tensor, torch.Tensor]:
        """(f, Var(y | η)) at each observation, [..., N, J]."""
        f_full = self.design_mean(p, eta, data.ctx.to(eta.dtype))
        col = data.col.expand(*f_full.shape[:-1], data.col.shape[-1])
        f = f_full.gather(-1, col)
        var = (self.design_sd(p) ** 2).to(f.dtype)[data.col].expand_as(f)
        return f, var

    def log_lik(self, p: Params, eta: torch.Tensor, data: DesignData, mask=None) -> torch.Tensor:
        f, var = self.predict(p, eta, data)
        m = data.mask if mask is None else data.mask & mask
        ll = -0.5 * ((data.y - f) ** 2 / var + var.log() + _LOG_2PI)
        return torch.where(m, ll, torch.zeros_like(ll)).sum(-1)

    def prior_covariance(self, p: Params, n_occ: int = 0) -> torch.Tensor:
        return p.omega

    def log_prior(self, p: Params, eta: torch.Tensor, n_occ: int = 0) -> torch.Tensor:
        return MultivariateNormal(torch.zeros(self.q, dtype=eta.dtype, device=eta.device),
                                  p.omega.to(eta.dtype)).log_prob(eta)

    def sample_eta(self, p: Params, n: int, n_occ: int = 0, generator=None, size: tuple = ()) -> torch.Tensor:
        z = torch.randn(*size, n, self.q, generator=generator, dtype=p.omega.dtype, device=p.omega.device)
        return z @ torch.linalg.cholesky(p.omega).transpose(-1, -2)

    def sample_y(self, p: Params, eta: torch.Tensor, data: DesignData, generator=None, residual=True) -> torch.Tensor:
        f, var = self.predict(p, eta, data)
        if not residual:
            return f
        return f + var.sqrt() * torch.randn(f.shape, generator=generator, dtype=f.dtype, device=f.device)

    def with_initial(self, params: Params):
        new = copy.copy(self)
        new.parameters = self.parameters.with_values(params)
        return new
