"""A batched, L-stable Rosenbrock solver for stiff segments of the ODE path (the fallback of :mod:`nlmefit.pk.ode`).

:func:`rosenbrock23` is the modified Rosenbrock 2(3) pair of Shampine & Reichelt (1997, SIAM J Sci Comput 18:1;
MATLAB's ``ode23s``): two stages of an L-stable, order-2 method plus a third (FSAL) stage that gives an order-3
error estimate. Each step solves three linear systems with W = I − h·d·J (d = 1/(2 + √2)); J is the exact Jacobian
of the right-hand side with respect to the state (forward-mode AD, batched over subjects). L-stability is what a
Michaelis–Menten model with a huge vm/km (or any fast elimination next to a slow absorption) needs: an explicit
method's step is bounded by 2–3/|λ_max| whatever the accuracy asked for, and collapses (torchdiffeq's "underflow in
dt") once the stiffness grows without bound; the Rosenbrock step is limited by accuracy only.

Batched with **per-subject** step sizes (at most ``max_steps`` per segment): every subject integrates its own
rescaled time s ∈ [0, 1] with its own h; the loop runs until all have reached s = 1. A subject whose step collapses
(h < 1e-12 of the segment) or whose state is not finite is marked failed (``ok`` False) and stops; the others go on.
The state may carry columns [N, S, K] (the forward sensitivities of :mod:`nlmefit.pk.ode_sens`): then ``jac`` gives
the full Jacobian of the flattened state (:func:`full_jacobian_fd`), because the sensitivity equations' coupling to
the state is as stiff as the state itself (treating it explicitly made the steps collapse).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.autograd.forward_ad as fwAD

__all__ = ["rosenbrock23", "state_jacobian", "full_jacobian_fd"]

_D = 1.0 / (2.0 + math.sqrt(2.0))
_E32 = 6.0 + math.sqrt(2.0)
_H_MIN = 1e-12


def state_jacobian(rhs: Callable[..., torch.Tensor], x: torch.Tensor,
                   consts: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Per-subject Jacobians [N, S, S] of a row-separable ``rhs(x [R, S]) -> [R, S]`` at ``x`` [N, S].

    One forward-mode pass on a batch of S·N rows (row block k carries the tangent e_k): no Python loop over states
    or subjects and no torch.func transform (whose per-call overhead is ~10× that of the plain forward-AD API).
    With ``consts`` (tensors the right-hand side reads: parameters, time) the call is ``rhs(x, consts)`` with each
    constant a dual of zero tangent: an op between a dual and a plain tensor takes torch's Python reference path
    for the undefined tangent (~40× slower per op), which made it most of a stiff solve.
    """
    n, s = x.shape
    xr = x.detach().repeat(s, 1)
    tangent = torch.eye(s, dtype=x.dtype, device=x.device).repeat_interleave(n, 0)
    with fwAD.dual_level():
        if consts is None:
            out = rhs(fwAD.make_dual(xr, tangent))
        else:
            out = rhs(fwAD.make_dual(xr, tangent),
                      {k: fwAD.make_dual(v, torch.zeros_like(v)) for k, v in consts.items()})
        jt = fwAD.unpack_dual(out).tangent
    if jt is None:
        return torch.zeros(n, s, s, dtype=x.dtype, device=x.device)
    return jt.reshape(s, n, s).permute(1, 2, 0)  # [N, out, in]


def full_jacobian_fd(f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], s: torch.Tensor,
                     y: torch.Tensor) -> torch.Tensor:
    """Per-subject Jacobians [N, W, W] of ``f(s, y [N, S, K])`` in the flattened state (central differences, one
    call per component): the exact coupling of an augmented (sensitivity) system, whose off-diagonal blocks are
    as stiff as its diagonal ones."""
    n = y.shape[0]
    yf = y.reshape(n, -1)
    w = yf.shape[1]
    h = 1e-7 * yf.abs().clamp_min(1e-8)
    cols = []
    for k in range(w):
        e = torch.zeros_like(yf)
        e[:, k] = h[:, k]
        cols.append(((f(s, (yf + e).reshape(y.shape)) - f(s, (yf - e).reshape(y.shape))).reshape(n, w))
                    / (2 * h[:, k:k + 1]))
    return torch.stack(cols, -1)


def rosenbrock23(
    f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    jac: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    y0: torch.Tensor,
    rtol: float,
    atol: float | torch.Tensor,
    max_steps: int = 2000,
    h0: float = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integrate dy/ds = f(s, y) from s = 0 to 1 per subject; returns (y(1) [N, S, K], ok [N]).

    ``f(s [N], y [N, S, K]) -> [N, S, K]``; ``jac(s [N], y)``: the state Jacobian [N, S, S] (shared by the K
    columns) or the full one [N, S·K, S·K] of the flattened state; ``atol`` a float or a tensor broadcastable to
    y. The error of a step is the max-norm of err / (atol + rtol·max(|y|, |y_new|)) over the subject's components.
    Failed subjects keep their last state and get ``ok`` False (the caller sets them to NaN).
    """
    y = y0
    n = y.shape[0]
    dt, dev = y.dtype, y.device
    s = torch.zeros(n, dtype=dt, device=dev)
    h = torch.full((n,), h0, dtype=dt, device=dev)
    ok = torch.isfinite(y).flatten(1).all(1)
    y = torch.where(ok[:, None, None], y, torch.zeros_like(y))
    eye = torch.eye(y.shape[1], dtype=dt, device=dev)
    eye_full = torch.eye(y[0].numel(), dtype=dt, device=dev)
    for _ in range(max_steps):
        active = ok & (s < 1.0)
        if not bool(active.any()):
            break
        hk = torch.where(active, torch.minimum(h, 1.0 - s), torch.zeros_like(h))
        hb = hk[:, None, None]
        f0 = f(s, y)
        J = jac(s, y).detach()
        eps = 1e-7
        tdot = (f(s + eps, y) - f0) / eps  # ∂f/∂s (0 for an autonomous system)
        full = J.shape[-1] != y.shape[1]
        W = (eye_full if full else eye) - (hb * _D) * J
        # a singular W (one subject's h·J with an eigenvalue 1/(h·d)) must not raise: lu_factor_ex reports it in
        # ``info`` and that subject's stages come out non-finite, so its step is rejected and h shrinks
        lu, piv, _ = torch.linalg.lu_factor_ex(W, check_errors=False)

        def solve(b: torch.Tensor, lu=lu, piv=piv, full=full) -> torch.Tensor:
            if full:
                return torch.linalg.lu_solve(lu, piv, b.reshape(n, -1, 1)).reshape(b.shape)
            return torch.linalg.lu_solve(lu, piv, b)

        k1 = solve(f0 + hb * _D * tdot)
        f1 = f(s + 0.5 * hk, y + 0.5 * hb * k1)
        k2 = solve(f1 - k1) + k1
        y_new = y + hb * k2
        f2 = f(s + hk, y_new)
        k3 = solve(f2 - _E32 * (k2 - f1) - 2.0 * (k1 - f0) + hb * _D * tdot)
        err = hb / 6.0 * (k1 - 2.0 * k2 + k3)
        tol = atol + rtol * torch.maximum(y.abs(), y_new.abs())
        ratio = (err.abs() / tol).flatten(1).amax(1)
        finite = torch.isfinite(ratio) & torch.isfinite(y_new).flatten(1).all(1)
        accept = active & finite & (ratio <= 1.0)
        y = torch.where(accept[:, None, None], y_new, y)
        s = torch.where(accept, torch.where(hk >= 1.0 - s, torch.ones_like(s), s + hk), s)
        fac = torch.where(finite, 0.8 * ratio.clamp_min(1e-12) ** (-1.0 / 3.0), torch.full_like(ratio, 0.1))
        h = torch.where(active, hk * fac.clamp(0.1, 5.0), h)
        ok = ok & ~(active & (h < _H_MIN))
    ok = ok & (s >= 1.0)
    return y, ok
