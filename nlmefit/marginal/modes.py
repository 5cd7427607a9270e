"""The inner problem: every subject's conditional mode η̂_i = argmin_η −log p(y_i, η | θ), all at once.

Batched modified Newton: exact per-subject Hessians (q backward passes), eigenvalues clamped to keep the step a
descent direction, and a per-subject backtracking (Armijo) line search. Subjects that have converged stop moving;
the loop ends when all have. The stopping test of an iterate uses the previous iterate's Hessian (the Newton
decrement gᵀH⁻¹g with the new gradient): when every subject passes it, the search ends without computing the new
Hessian — one in four Hessians saved on theophylline (FOCE-I fit 0.80 → 0.70 s), results unchanged. Warm starts
come from the previous outer iteration.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from nlmefit.marginal.autodiff import grad_sep, hessian_sep

__all__ = ["ModeResult", "find_modes"]


@dataclass
class ModeResult:
    eta: torch.Tensor  # [N, q]
    value: torch.Tensor  # [N]
    converged: torch.Tensor  # [N] bool
    n_iter: int


def find_modes(
    objective: Callable[[torch.Tensor], torch.Tensor],
    eta0: torch.Tensor,
    max_iter: int = 100,
    tol: float = 1e-8,
    decrement_tol: float = 1e-11,
    max_halvings: int = 30,
) -> ModeResult:
    """Minimise ``objective(eta) -> [N]`` (subject-separable) from ``eta0`` [N, q].

    A subject stops when its gradient is below ``tol`` or its Newton decrement gᵀH⁻¹g (twice the predicted
    decrease) is below ``decrement_tol`` (5e-12 in −log p per subject: 1e-6 in the OFV of 100k subjects), or when
    a step no longer lowers the objective (rounding level).
    """
    eta = eta0.detach().clone()
    n, q = eta.shape
    active = torch.ones(n, dtype=torch.bool, device=eta.device)
    value = None
    prev = None  # (eigenvalues, eigenvectors) of the last Hessian: the stopping test of the next iterate
    it = 0
    for it in range(1, max_iter + 1):
        e = eta.detach().requires_grad_(True)
        with torch.enable_grad():
            val = objective(e)
            g = grad_sep(val, e, create_graph=True)
            if prev is not None:  # converged by the previous Hessian's decrement: no new Hessian (~1 in 4 saved)
                gd = g.detach()
                w0, V0 = prev
                s0 = (V0 @ ((V0.transpose(-1, -2) @ gd.unsqueeze(-1)) / w0.unsqueeze(-1))).squeeze(-1)
                fin = torch.isfinite(val.detach())
                stop = (gd.abs().amax(-1) < tol) | ((gd * s0).sum(-1) < decrement_tol)
                if bool((~active | (stop & fin)).all()):
                    value = val.detach()
                    active = active & ~stop
                    break
            H = hessian_sep(g, e).detach()
        g = g.detach()
        val = val.detach()
        value = val
        bad = ~(torch.isfinite(H).flatten(-2).all(-1) & torch.isfinite(g).all(-1) & torch.isfinite(val))
        if bool(bad.any()):  # a subject whose objective is not finite here stops; the others go on
            eye = torch.eye(q, dtype=H.dtype, device=H.device).expand_as(H)
            H = torch.where(bad[:, None, None], eye, H)
            g = torch.where(bad[:, None], torch.zeros_like(g), g)
            active = active & ~bad
        w, V = torch.linalg.eigh(H)
        floor = 1e-8 * w.abs().amax(-1, keepdim=True).clamp_min(1.0)
        w = torch.maximum(w.abs(), floor)  # modified Newton: |λ| keeps the direction a descent one
        prev = (w, V)
        step = (V @ ((V.transpose(-1, -2) @ g.unsqueeze(-1)) / w.unsqueeze(-1))).squeeze(-1)
        slope = (g * step).sum(-1)  # Newton decrement²: twice the predicted decrease of the objective
        done = (g.abs().amax(-1) < tol) | (slope < decrement_tol)
        active = active & ~done & torch.isfinite(val)
        if not bool(active.any()):
            break
        step = torch.where(active.unsqueeze(-1), step, torch.zeros_like(step))
        alpha = torch.ones(n, dtype=eta.dtype, device=eta.device)
        todo = active.clone()
        new_eta = eta.clone()
        new_val = val.clone()
        with torch.no_grad():
            for _ in range(max_halvings):
                cand = eta - alpha.unsqueeze(-1) * step
                cv = objective(cand)
                ok = todo & torch.isfinite(cv) & (cv <= val - 1e-4 * alpha * slope) & (cv < val)
                new_eta = torch.where(ok.unsqueeze(-1), cand, new_eta)
                new_val = torch.where(ok, cv, new_val)
                todo = todo & ~ok
                if not bool(todo.any()):
                    break
                alpha = torch.where(todo, alpha * 0.5, alpha)
        # subjects whose line search failed are at the optimum to rounding: stop them
        active = active & ~todo
        eta = new_eta
        value = new_val
    converged = ~active
    return ModeResult(eta.detach(), value, converged, it)
