"""Forward sensitivities of the ODE path: first and second derivatives of the states with respect to the parameters.

With parameters p (the P per-subject parameters that require grad) the state x(t; p) [N, S] carries

    S_a = ∂x/∂p_a      dS_a/dt = J S_a + ∂f/∂p_a
    T_ab = ∂²x/∂p_a∂p_b  dT_ab/dt = J T_ab + D²f[(S_a, e_a), (S_b, e_b)]      (a ≤ b: M = P(P+1)/2 of them)

integrated with the state as one system [N, S, K], K = 1 + P + M, on the steps that the states' error test
chooses (:mod:`nlmefit.pk.ode`: the sensitivity columns are not error-controlled, as CVODES without
``errconS``). The first-order terms are exact (forward-mode AD, one pass on a batch of P·N rows). The second
directional derivative D²f is a central difference of forward-mode
directional derivatives, [J(z + h w_b)(w_a + h τ) − J(z − h w_b)(w_a − h τ)]/(2h) with w = (S, e), τ = (T_ab, 0) and
h = 6e-6·|p_b| (error ~1e-10 relative): nested forward AD (``torch.func.jvp`` twice) is exact but costs ~3.5 ms a
call against ~0.3 ms for this single-level pass on 2M + P row blocks (measured, 12 subjects, 1-cmt oral MM).
Second derivatives enter only Hessians (the η-mode search and the FOCE-I Hessian and its θ-derivative), which NONMEM
and nlmixr2 take by finite differences altogether.

:func:`taylor_surrogate` turns (value, S, T) at p₀ into value + S·(p − p₀) + ½ (p − p₀)ᵀ T (p − p₀) evaluated at
p = p₀ with p carrying the caller's autograd graph: its value is the solution, its first and second derivatives are
the sensitivities, so every estimator's autograd (gradients, per-subject Hessians, Jacobians by double-vjp, the
implicit-function step of FOCE-I) works unchanged, and no backward pass ever runs through the solver's steps. Third
derivatives are zero: only the exact-Hessian Laplace objective's outer gradient needs them (it differentiates
log det ∂²l/∂η²); use ``sensitivities="autograd"`` there when the exact gradient matters.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping

import torch
import torch.autograd.forward_ad as fwAD

__all__ = ["SensLayout", "augmented_rhs", "taylor_surrogate"]

_FD_REL = 6e-6


class SensLayout:
    """Column layout of the augmented state [N, S, K]: value, P first-order and M second-order columns."""

    def __init__(self, names: tuple[str, ...]):
        self.names = names
        self.p = len(names)
        ia, ib = torch.triu_indices(self.p, self.p)
        self.ia, self.ib = ia.tolist(), ib.tolist()
        self.m = len(self.ia)
        self.k = 1 + self.p + self.m


def augmented_rhs(rhs: Callable, lay: SensLayout, p: Mapping[str, torch.Tensor], t0: torch.Tensor,
                  delta: torch.Tensor, u: torch.Tensor, dual_time: bool = False
                  ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """dy/ds [N, S, K] of the augmented system on a segment in rescaled time (``t0 + s·delta``, input ``u``).

    One forward-AD pass of ``rhs`` on nb = P + 2M row blocks: block a < P gives J·S_a + ∂f/∂p_a at (x, p), blocks
    P + m and P + M + m give J(z ± h_b w_b)(w_a ± h_b τ) for the pair m = (a, b). The blocks are built column-major
    (y as [K, N, S], one copy) so that every gather and concatenation moves contiguous [N, S] blocks: the call is
    dispatcher-bound, and concatenating permuted views cost half of it. ``dual_time``: hand ``rhs`` the time as a
    dual with a zero tangent (for a right-hand side whose parameters meet the time in an op: a dual op with a plain
    tensor takes torch's ~50x slower Python reference path).
    """
    P, M = lay.p, lay.m
    pv = torch.stack([p[k] for k in lay.names], -1)  # [N, P]
    n = pv.shape[0]
    fixed = {k: v for k, v in p.items() if k not in lay.names}
    nb = P + 2 * M  # row blocks
    fixed_r = {k: v.repeat(nb) for k, v in fixed.items()}
    eye = torch.eye(P, dtype=pv.dtype, device=pv.device)
    ia, ib = lay.ia, lay.ib
    h = _FD_REL * pv.abs().clamp_min(1e-300)  # [N, P]
    hb = h[:, ib].T  # [M, N]
    e_dir = torch.cat([eye, eye[ia], eye[ia]]).repeat_interleave(n, 0)  # tangent in p [nb·N, P]
    pshift = torch.cat([torch.zeros(P, n, P, dtype=pv.dtype, device=pv.device),
                        hb[:, :, None] * eye[ib][:, None, :], -hb[:, :, None] * eye[ib][:, None, :]])
    p_rows = (pv.unsqueeze(0) + pshift).reshape(nb * n, P)
    p_dict = dict(fixed_r)
    p_dict.update({k: p_rows[:, i] for i, k in enumerate(lay.names)})
    hbs = hb[None]  # [1, M, N]
    inv2h = 1 / (2 * hbs)
    ia_k = torch.tensor([1 + a for a in ia], dtype=torch.long, device=pv.device)  # columns S_a of the pairs
    ib_k = torch.tensor([1 + b for b in ib], dtype=torch.long, device=pv.device)
    dl = delta[None, None, :]

    held: dict = {}  # the parameter duals while a session() holds the dual level open

    zero_r = {k: torch.zeros_like(v) for k, v in fixed_r.items()}

    def dual_params() -> dict:
        # the parameters without sensitivities get a zero tangent too: a dual op with a plain tensor (or a number)
        # takes torch's Python reference path for the undefined tangent, ~50x slower (a quarter of an MM fit)
        pd = {k: fwAD.make_dual(v, zero_r[k]) for k, v in fixed_r.items()}
        for i, k in enumerate(lay.names):
            pd[k] = fwAD.make_dual(p_dict[k], e_dir[:, i])
        return pd

    @contextlib.contextmanager
    def session():
        """Hold one dual level open over many calls: the parameter duals are made once (make_dual ~35 µs each)."""
        with fwAD.dual_level():
            held["pd"] = dual_params()
            try:
                yield
            finally:
                held.clear()

    def f(s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        yk = y.permute(1, 2, 0).contiguous()  # [S, K, N]: subjects last, every block a contiguous run
        s_ = yk.shape[0]
        x = yk[:, :1]
        dx = hbs * yk[:, ib_k]  # h_b S_b [S, M, N]
        sa = yk[:, ia_k]
        dtan = hbs * yk[:, 1 + P:]  # h_b T_ab
        # rows r = block·N + subject, handed to rhs as the transposed view [nb·N, S] (contiguous columns)
        x_rows = torch.cat([x.expand(s_, P, n), x + dx, x - dx], 1).reshape(s_, nb * n).T
        t_rows = torch.cat([yk[:, 1:1 + P], sa + dtan, sa - dtan], 1).reshape(s_, nb * n).T
        t = (t0 + s * delta).expand(nb, n).reshape(nb * n)
        if "pd" in held:
            td = fwAD.make_dual(t.clone(), torch.zeros_like(t)) if dual_time else t
            up = fwAD.unpack_dual(rhs(td, fwAD.make_dual(x_rows, t_rows), held["pd"]))
            prim, tan = up.primal, up.tangent
        else:
            with fwAD.dual_level():
                td = fwAD.make_dual(t.clone(), torch.zeros_like(t)) if dual_time else t
                up = fwAD.unpack_dual(rhs(td, fwAD.make_dual(x_rows, t_rows), dual_params()))
                prim, tan = up.primal, up.tangent
        if tan is None:
            tan = torch.zeros_like(prim)
        tan = tan.T.reshape(s_, nb, n)  # a view when rhs returns the transposed layout (the library models do)
        d2 = (tan[:, P:P + M] - tan[:, P + M:]) * inv2h
        out = torch.cat([(prim[:n] + u).T[:, None], tan[:, :P], d2], 1) * dl  # [S, K, N]
        return out.permute(2, 0, 1)

    f.session = session
    return f


def taylor_surrogate(value: torch.Tensor, sens: torch.Tensor, hess: torch.Tensor, lay: SensLayout,
                     p: Mapping[str, torch.Tensor], p0: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """value [N, J] + S·dp + ½ dpᵀ T dp with dp = p − p0 (``p0`` the expansion point, default p.detach(): 0 in
    value, identity in derivative)."""
    dp = torch.stack([p[k] - (p[k].detach() if p0 is None else p0[k]) for k in lay.names], -1)[:, None, :]
    out = value + (sens * dp).sum(-1)
    w = torch.tensor([0.5 if a == b else 1.0 for a, b in zip(lay.ia, lay.ib)], dtype=value.dtype,
                     device=value.device)
    quad = dp[..., lay.ia] * dp[..., lay.ib] * w
    return out + (hess * quad).sum(-1)
