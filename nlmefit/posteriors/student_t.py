"""Multivariate Student-t posterior family (pyro's ``MultivariateStudentT``), batch [N], event [q]."""
from __future__ import annotations

import torch
from pyro.distributions import MultivariateStudentT

__all__ = ["StudentTPosterior"]


class StudentTPosterior(MultivariateStudentT):
    """t with ``df`` degrees of freedom around ``loc`` [N, q] with scale ``scale_tril`` [N, q, q]: the safe
    importance-sampling proposal when a posterior may be skewed or heavy-tailed (its tails dominate any Gaussian
    with the same scale)."""

    def __init__(self, df: float, loc: torch.Tensor, scale_tril: torch.Tensor, kind: str = "t",
                 validate_args: bool | None = False) -> None:
        if not df > 0:
            raise ValueError(f"degrees of freedom must be positive, got {df}")
        super().__init__(torch.as_tensor(float(df), dtype=loc.dtype, device=loc.device), loc, scale_tril,
                         validate_args=validate_args)
        self.kind = kind
