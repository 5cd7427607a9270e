"""Per-subject derivatives of subject-separable functions, batched over subjects with plain autograd.

Every population objective is a sum over subjects whose i-th term depends only on η_i, so the derivative of the
*sum* with respect to η [N, q] holds every subject's gradient at once, and q more backward passes give every
subject's Hessian (and Jacobians of [N, J] outputs). No Python loop over subjects.
"""
from __future__ import annotations

import torch

__all__ = ["grad_sep", "hessian_sep", "jacobian_sep"]


def grad_sep(values: torch.Tensor, eta: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """∂ values_i / ∂ η_i, [N, q], for ``values`` [N]."""
    (g,) = torch.autograd.grad(values.sum(), eta, create_graph=create_graph)
    return g


def hessian_sep(grad: torch.Tensor, eta: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """Per-subject Hessians [N, q, q] from per-subject gradients ``grad`` [N, q] (built with create_graph)."""
    q = grad.shape[-1]
    rows = []
    for k in range(q):
        (r,) = torch.autograd.grad(grad[..., k].sum(), eta, retain_graph=True, create_graph=create_graph,
                                   allow_unused=True)
        rows.append(torch.zeros_like(eta) if r is None else r)
    return torch.stack(rows, dim=-2)


def jacobian_sep(out: torch.Tensor, eta: torch.Tensor, create_graph: bool = True) -> torch.Tensor:
    """Per-subject Jacobians ∂ out_ij / ∂ η_ik, [N, J, q], for ``out`` [N, J] (forward mode by double vjp)."""
    if not out.requires_grad:
        return torch.zeros(*out.shape, eta.shape[-1], dtype=out.dtype, device=out.device)
    u = torch.zeros_like(out, requires_grad=True)
    (vjp,) = torch.autograd.grad(out, eta, u, create_graph=True, allow_unused=True)
    if vjp is None:
        return torch.zeros(*out.shape, eta.shape[-1], dtype=out.dtype, device=out.device)
    cols = []
    for k in range(eta.shape[-1]):
        (c,) = torch.autograd.grad(vjp[..., k].sum(), u, retain_graph=True, create_graph=create_graph,
                                   allow_unused=True)
        cols.append(torch.zeros_like(out) if c is None else c)
    return torch.stack(cols, dim=-1)
