"""Forward sensitivities of the ODE path: first and second derivatives of the states with respect to the parameters.

With parameters p (the P per-subject parameters that require grad) the state x(t; p) [N, S] carries

    S_a = ∂x/∂p_a      dS_a/dt = J S_a + ∂f/∂p_a
    T_ab = ∂²x/∂p_a∂p_b  dT_ab/dt = J T_ab + D²f[(S_a, e_a), (S_b, e_b)]      (a ≤ b: M = P(P+1)/2 of them)

integrated with the state as one system [N, S, K], K = 1 + P + M, on the steps that the states' error test
chooses (:mod:`nlmefit.pk.ode`: the sensitivity columns are not error-controlled, as CVODES without
``errconS``). The first-order terms are exact (forward-mode AD, one pass on a batch of P·N rows). The second
directional derivative D²f is a forward difference of forward-mode
directional derivatives, [J(z + h w_b)(w_a + h τ) − J(z)(w_a)]/h with w = (S, e), τ = (T_ab, 0) and h = 2e-8·|p_b|
(error ~3e-8 relative: truncation ~h, rounding ~1e-16/h) — J(z)(w_a) is the first-order block a itself, so the pass
needs M + P row blocks. Nested forward AD (``torch.func.jvp`` twice) is exact but costs ~3.5 ms a call against
~0.3 ms for a single-level pass (measured, 12 subjects, 1-cmt oral MM). The central difference used before (2M + P
blocks, error ~1e-10) cost 20–40 % more a call on the 2-compartment models (P = 5–6) for accuracy that the
integration, whose sensitivity columns are good to about the tolerance (1e-6), does not deliver anyway.
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

_FD_REL = 2e-8


class SensLayout:
    """Column layout of the augmented state [N, S, K]: value, P first-order and M second-order columns."""

    def __init__(self, names: tuple[str, ...]):
        self.names = names
        self.p = len(names)
        ia, ib = torch.triu_indices(self.p, self.p)
        self.ia, self.ib = ia.tolist(), ib.tolist()
        self.m = len(self.ia)
        self.k = 1 + self.p + self.m


def _dual_ops() -> tuple[Callable, Callable]:
    """(make_dual(t, tangent, level), unpack_dual(t, level) -> (primal, tangent)) without the Python wrappers of
    :mod:`torch.autograd.forward_ad` (their checks and export hooks cost ~16 µs a call against ~1 µs: an eighth of
    an augmented right-hand side); the public functions where this torch lacks the bindings."""
    mk, up = getattr(torch, "_make_dual", None), getattr(torch, "_unpack_dual", None)
    if mk is not None and up is not None:
        return (lambda t, tan, level: mk(t, tan, level=level)), (lambda t, level: tuple(up(t, level=level)))
    return (lambda t, tan, level: fwAD.make_dual(t, tan, level=level)), (
        lambda t, level: tuple(fwAD.unpack_dual(t, level=level)))


_MAKE_DUAL, _UNPACK_DUAL = _dual_ops()


def augmented_rhs(rhs: Callable, lay: SensLayout, p: Mapping[str, torch.Tensor], t0: torch.Tensor,
                  delta: torch.Tensor, u: torch.Tensor, dual_time: bool = False, prepare: Callable | None = None
                  ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """dy/ds [N, S, K] of the augmented system on a segment in rescaled time (``t0 + s·delta``, input ``u``).

    One forward-AD pass of ``rhs`` on nb = P + M row blocks: block a < P gives J·S_a + ∂f/∂p_a at (x, p), block
    P + m gives J(z + h_b w_b)(w_a + h_b τ) for the pair m = (a, b). The blocks are built column-major
    (y as [S, K, N]) so that every gather and concatenation moves contiguous [N, S] blocks: the call is
    dispatcher-bound, and concatenating permuted views cost half of it. ``dual_time``: hand ``rhs`` the time as a
    dual with a zero tangent (for a right-hand side whose parameters meet the time in an op: a dual op with a plain
    tensor takes torch's ~50x slower Python reference path). ``prepare``: the system's derived parameters
    (:attr:`nlmefit.pk.ode.OdeSystem.prepare`), computed once from the parameter duals of a held dual level.

    The returned function also has ``.last(s, y [S·K, N]) -> [S·K, N]``: the same right-hand side in the
    subjects-last layout *without* the factor ``delta`` (the batched dopri5 of :mod:`nlmefit.pk.ode` keeps its state
    that way and folds ``delta`` into the step), which saves the two layout copies and the scaling of every call.
    """
    P, M = lay.p, lay.m
    pv = torch.stack([p[k] for k in lay.names], -1)  # [N, P]
    n = pv.shape[0]
    fixed = {k: v for k, v in p.items() if k not in lay.names}
    nb = P + M  # row blocks
    fixed_r = {k: v.repeat(nb) for k, v in fixed.items()}
    eye = torch.eye(P, dtype=pv.dtype, device=pv.device)
    ia, ib = lay.ia, lay.ib
    h = _FD_REL * pv.abs().clamp_min(1e-300)  # [N, P]
    hb = h[:, ib].T  # [M, N]
    e_dir = torch.cat([eye, eye[ia]]).repeat_interleave(n, 0)  # tangent in p [nb·N, P]
    pshift = torch.cat([torch.zeros(P, n, P, dtype=pv.dtype, device=pv.device),
                        hb[:, :, None] * eye[ib][:, None, :]])
    p_rows = (pv.unsqueeze(0) + pshift).reshape(nb * n, P)
    p_dict = dict(fixed_r)
    p_dict.update({k: p_rows[:, i] for i, k in enumerate(lay.names)})
    hbs = hb[None]  # [1, M, N]
    inv_h = 1 / hbs
    ia_blk = torch.tensor(ia, dtype=torch.long, device=pv.device)  # the first-order block a of each pair
    ia_k = torch.tensor([1 + a for a in ia], dtype=torch.long, device=pv.device)  # columns S_a of the pairs
    ib_k = torch.tensor([1 + b for b in ib], dtype=torch.long, device=pv.device)
    dl = delta[None, None, :]
    u_t = None if not bool((u != 0).any()) else u.T[:, None]  # [S, 1, N]; None: no input on this segment

    held: dict = {}  # the parameter duals and the level while a session() holds the dual level open

    zero_r = {k: torch.zeros_like(v) for k, v in fixed_r.items()}

    def dual_params(level: int) -> dict:
        # the parameters without sensitivities get a zero tangent too: a dual op with a plain tensor (or a number)
        # takes torch's Python reference path for the undefined tangent, ~50x slower (a quarter of an MM fit)
        pd = {k: _MAKE_DUAL(v, zero_r[k], level) for k, v in fixed_r.items()}
        for i, k in enumerate(lay.names):
            pd[k] = _MAKE_DUAL(p_dict[k], e_dir[:, i], level)
        return pd if prepare is None else prepare(pd)

    @contextlib.contextmanager
    def session():
        """Hold one dual level open over many calls: the parameter duals are made once."""
        with fwAD.dual_level() as level:
            held["level"] = level
            held["pd"] = dual_params(level)
            try:
                yield
            finally:
                held.clear()

    def core(s: torch.Tensor, yk: torch.Tensor, level: int, pd: dict) -> torch.Tensor:
        """[S, K, N] -> dy/dt [S, K, N] (not yet times delta)."""
        s_ = yk.shape[0]
        x = yk[:, :1]
        dx = hbs * yk.index_select(1, ib_k)  # h_b S_b [S, M, N]
        sa = yk.index_select(1, ia_k)
        dtan = hbs * yk[:, 1 + P:]  # h_b T_ab
        # rows r = block·N + subject, handed to rhs as the transposed view [nb·N, S] (contiguous columns)
        x_rows = torch.cat([x.expand(s_, P, n), x + dx], 1).reshape(s_, nb * n).T
        t_rows = torch.cat([yk[:, 1:1 + P], sa + dtan], 1).reshape(s_, nb * n).T
        t = torch.addcmul(t0, torch.as_tensor(s, dtype=t0.dtype, device=t0.device), delta)
        t = t.expand(nb, n).contiguous().view(-1)  # a copy (a dual needs its own memory); repeat() is 5x slower
        td = _MAKE_DUAL(t, torch.zeros_like(t), level) if dual_time else t
        prim, tan = _UNPACK_DUAL(rhs(td, _MAKE_DUAL(x_rows, t_rows, level), pd), level)
        if tan is None:
            tan = torch.zeros_like(prim)
        tan = tan.T.reshape(s_, nb, n)  # a view when rhs returns the transposed layout (the library models do)
        d2 = (tan[:, P:] - tan.index_select(1, ia_blk)) * inv_h
        first = prim[:n].T[:, None] if u_t is None else prim[:n].T[:, None] + u_t
        return torch.cat([first, tan[:, :P], d2], 1)

    def call(s: torch.Tensor, yk: torch.Tensor) -> torch.Tensor:
        if "pd" in held:
            return core(s, yk, held["level"], held["pd"])
        with fwAD.dual_level() as level:
            return core(s, yk, level, dual_params(level))

    def f(s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = call(s, y.permute(1, 2, 0).contiguous()) * dl  # [S, K, N]: subjects last, every block a contiguous run
        return out.permute(2, 0, 1)

    def last(s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return call(s, y.view(-1, lay.k, n)).view(-1, n)

    f.session = session
    f.last = last
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
