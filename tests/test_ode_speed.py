"""Speed work on the MM ODE fits (issue 10): the augmented right-hand side's layout, the library rhs's transposed
output, and the η-mode search's stop on steps that a fresh objective evaluation does not confirm."""
from __future__ import annotations

import torch
from torch.func import jacfwd

from nlmefit.marginal.modes import find_modes
from nlmefit.pk import ode_models
from nlmefit.pk.ode_sens import SensLayout, augmented_rhs


def _reference_augmented(system, names, p, y, delta, u):
    """dy/ds of the augmented system by exact nested forward AD, one subject at a time (the slow reference)."""
    n, s_, k = y.shape
    lay = SensLayout(names)
    out = torch.empty_like(y)
    for i in range(n):
        def f(x, q, i=i):
            pi = {kk: v[i:i + 1] for kk, v in p.items()}
            pi.update({nm: q[j:j + 1] for j, nm in enumerate(names)})
            return system.rhs(torch.zeros(1, dtype=x.dtype), x[None], pi)[0]

        x = y[i, :, 0]
        q = torch.stack([p[nm][i] for nm in names])
        jx, jq = jacfwd(f, argnums=(0, 1))(x, q)  # [S, S], [S, P]
        hxx, hxq, hqq = (jacfwd(jacfwd(f, argnums=a), argnums=b)(x, q) for a, b in ((0, 0), (0, 1), (1, 1)))
        sx = y[i, :, 1:1 + lay.p]  # [S, P]
        col = [f(x, q) + u[i]]
        col += [jx @ sx[:, a] + jq[:, a] for a in range(lay.p)]
        for m, (a, b) in enumerate(zip(lay.ia, lay.ib)):
            w_a, w_b = sx[:, a], sx[:, b]
            d2 = (torch.einsum("sij,i,j->s", hxx, w_a, w_b) + torch.einsum("sij,i->sj", hxq, w_a)[:, b]
                  + torch.einsum("sij,i->sj", hxq, w_b)[:, a] + hqq[:, a, b])
            col.append(jx @ y[i, :, 1 + lay.p + m] + d2)
        out[i] = delta[i] * torch.stack(col, -1)
    return out


def test_augmented_rhs_matches_nested_forward_ad():
    torch.manual_seed(0)
    system = ode_models.get("2cmt_oral_mm")
    names = ("vm", "km", "v", "ka", "q", "vp")
    n = 3
    p = {k: (torch.rand(n, dtype=torch.float64) * 50 + 5) for k in system.params}
    lay = SensLayout(names)
    y = torch.rand(n, system.n_states, lay.k, dtype=torch.float64) * 10
    delta = torch.rand(n, dtype=torch.float64) + 0.5
    u = torch.rand(n, system.n_states, dtype=torch.float64)
    f = augmented_rhs(system.rhs, lay, p, torch.zeros(n, dtype=torch.float64), delta, u)
    got = f(torch.zeros(n, dtype=torch.float64), y)
    with f.session():  # the held dual level gives the same numbers
        got2 = f(torch.zeros(n, dtype=torch.float64), y)
    ref = _reference_augmented(system, names, p, y, delta, u)
    assert got.shape == ref.shape
    torch.testing.assert_close(got2, got, rtol=0, atol=0)
    torch.testing.assert_close(got[..., :1 + lay.p], ref[..., :1 + lay.p], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, ref, rtol=1e-7, atol=1e-7)  # second order: central differences (~1e-10)


def test_library_rhs_returns_the_state_shape():
    system = ode_models.get("1cmt_oral_mm")
    x = torch.rand(5, 2, dtype=torch.float64)
    p = {k: torch.ones(5, dtype=torch.float64) for k in system.params}
    dx = system.rhs(torch.zeros(5, dtype=torch.float64), x, p)
    assert dx.shape == (5, 2)
    torch.testing.assert_close(dx[:, 0], -x[:, 0])


class _SurrogateObjective:
    """l(η) = ½(η − m(η))² with a shift m that jumps at η = 0 (+a below, −a above) — the discretisation noise of an
    adaptive solve, exaggerated — while a value-only call (the line search, under no_grad) gets the smooth local
    model at the last differentiated point, as the ODE path's Taylor surrogate serves it."""

    def __init__(self, a: float):
        self.a = a
        self.centre = None

    def __call__(self, eta: torch.Tensor) -> torch.Tensor:
        m = torch.where(eta[:, 0] < 0, self.a, -self.a)
        if torch.is_grad_enabled():
            self.centre = m.detach()
            return 0.5 * (eta[:, 0] - m) ** 2
        return 0.5 * (eta[:, 0] - self.centre) ** 2


def test_mode_search_stops_when_a_fresh_value_does_not_confirm_the_step():
    obj = _SurrogateObjective(1e-3)
    res = find_modes(obj, torch.tensor([[0.5], [2.0]], dtype=torch.float64), max_iter=100)
    # without the test the search cycles between ±a until max_iter
    assert res.n_iter < 10
    assert bool(res.converged.all())
    assert torch.all(res.eta.abs() <= 1.001e-3)
    # both iterates of the cycle have the fresh value 2a²: the search keeps the one it stepped from, and the value
    # it reports is the fresh objective there
    with torch.enable_grad():
        fresh = obj(res.eta.clone().requires_grad_(True)).detach()
    torch.testing.assert_close(res.value, fresh)


def test_mode_search_unchanged_on_a_smooth_objective():
    torch.manual_seed(1)
    n, q = 50, 3
    a = torch.randn(n, q, q, dtype=torch.float64)
    h = a @ a.transpose(-1, -2) + q * torch.eye(q, dtype=torch.float64)
    c = torch.randn(n, q, dtype=torch.float64)

    def obj(eta):
        d = eta - c
        return 0.5 * (d[:, None, :] @ h @ d[:, :, None])[:, 0, 0] + 0.1 * (d ** 4).sum(-1)

    res = find_modes(obj, torch.zeros(n, q, dtype=torch.float64))
    assert bool(res.converged.all())
    torch.testing.assert_close(res.eta, c, rtol=0, atol=1e-5)  # the decrement stop (1e-11) leaves ~1e-6
    # an exact objective decreases on every accepted step: the new stop never cuts the quadratic convergence short
    tight = find_modes(obj, torch.zeros(n, q, dtype=torch.float64), tol=1e-13, decrement_tol=1e-26)
    torch.testing.assert_close(tight.eta, c, rtol=0, atol=1e-10)
