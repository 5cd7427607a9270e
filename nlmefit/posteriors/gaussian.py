"""Gaussian posterior family: q_i = N(m_i, L_i L_iᵀ), batch [N], event [q]."""
from __future__ import annotations

import torch
from torch.distributions import MultivariateNormal

__all__ = ["GaussianPosterior"]


class GaussianPosterior(MultivariateNormal):
    """N(``loc`` [N, q], ``scale_tril`` [N, q, q] L Lᵀ). ``kind`` names where it came from (``laplace`` for the
    mode and inverse-Hessian of −log p(y_i, η), ``moments`` for moment-matched draws, ``gaussian`` otherwise).
    The KL divergence to a ``MultivariateNormal`` prior is torch's closed form (``torch.distributions.kl``)."""

    def __init__(self, loc: torch.Tensor, scale_tril: torch.Tensor, kind: str = "gaussian",
                 validate_args: bool | None = False) -> None:
        super().__init__(loc, scale_tril=scale_tril, validate_args=validate_args)
        self.kind = kind

    @classmethod
    def from_draws(cls, draws: torch.Tensor, inflate: float = 1.0) -> GaussianPosterior:
        """Moment-matched to draws [S, N, q] (a small relative jitter keeps the covariance positive definite)."""
        loc, chol = moments(draws, inflate)
        return cls(loc, chol, kind="moments")

    def expand(self, batch_shape, _instance=None):
        new = super().expand(batch_shape, _instance or self._get_checked_instance(GaussianPosterior, _instance))
        new.kind = self.kind
        return new


def moments(draws: torch.Tensor, inflate: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [N, q], Cholesky factor of the covariance [N, q, q]) of draws [S, N, q]."""
    if draws.dim() != 3 or draws.shape[0] < 2:
        raise ValueError("moment matching needs draws of shape [S, N, q] with at least two draws per subject")
    mean = draws.mean(0)
    c = draws - mean
    cov = torch.einsum("snq,snr->nqr", c, c) / (draws.shape[0] - 1)
    eye = torch.eye(mean.shape[-1], dtype=cov.dtype, device=cov.device)
    jitter = 1e-10 * torch.diagonal(cov, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)[:, None, None] * eye
    return mean, torch.linalg.cholesky(cov * inflate ** 2 + jitter)
