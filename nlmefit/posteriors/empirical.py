"""Empirical posterior: MCMC draws of η per subject (SAEM's chains, NUTS), as a Distribution."""
from __future__ import annotations

import torch
from torch.distributions import Distribution, constraints

from nlmefit.posteriors.gaussian import GaussianPosterior, moments
from nlmefit.posteriors.student_t import StudentTPosterior

__all__ = ["EmpiricalPosterior"]


class EmpiricalPosterior(Distribution):
    """Draws ``[S, N, q]`` as a distribution with batch shape [N] and event shape [q].

    ``sample`` resamples the stored draws independently per subject; ``mean``, ``variance`` and
    ``covariance_matrix`` are the draws' moments. A set of draws has no density: ``log_prob`` raises, and
    :meth:`moment_matched` gives the Gaussian (or t) with the same moments, which is what importance sampling
    uses as a proposal."""

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = False

    def __init__(self, draws: torch.Tensor, kind: str = "mcmc") -> None:
        if draws.dim() != 3 or draws.shape[0] < 1:
            raise ValueError(f"draws must have shape [S, N, q] with S >= 1, got {tuple(draws.shape)}")
        self.draws = draws.detach()
        self.kind = kind
        super().__init__(batch_shape=draws.shape[1:2], event_shape=draws.shape[2:], validate_args=False)

    @property
    def n_draws(self) -> int:
        return int(self.draws.shape[0])

    @property
    def mean(self) -> torch.Tensor:
        return self.draws.mean(0)

    @property
    def variance(self) -> torch.Tensor:
        return self.draws.var(0) if self.n_draws > 1 else torch.zeros_like(self.mean)

    @property
    def covariance_matrix(self) -> torch.Tensor:
        c = self.draws - self.mean
        return torch.einsum("snq,snr->nqr", c, c) / max(1, self.n_draws - 1)

    def sample(self, sample_shape: torch.Size | tuple = torch.Size()) -> torch.Tensor:
        shape = torch.Size(sample_shape)
        n = self.draws.shape[1]
        k = int(torch.Size(shape).numel())
        idx = torch.randint(self.n_draws, (k, n), device=self.draws.device)
        picked = torch.gather(self.draws, 0, idx.unsqueeze(-1).expand(k, n, self.draws.shape[-1]))
        return picked.reshape(*shape, *self.draws.shape[1:])

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("a set of MCMC draws has no density; use .moment_matched() for a Gaussian or t "
                                  "with the same moments")

    def moment_matched(self, df: float | None = None, inflate: float = 1.0):
        """Gaussian (``df=None``) or multivariate t with each subject's posterior mean and covariance."""
        loc, chol = moments(self.draws, inflate)
        if df is None:
            return GaussianPosterior(loc, chol, kind="posterior")
        return StudentTPosterior(df, loc, chol, kind="posterior")

    def index(self, idx) -> EmpiricalPosterior:
        """The posterior of a subset of subjects."""
        return EmpiricalPosterior(self.draws[:, idx], self.kind)
