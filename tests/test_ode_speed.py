"""Speed work on the MM ODE fits (issue 10): the augmented right-hand side's layout, the library rhs's transposed
output, and the η-mode search's stop on steps that a fresh objective evaluation does not confirm."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.func import jacfwd

import nlmefit.pk.ode as ode
from nlmefit.errors import ModelSpecError
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
    torch.testing.assert_close(got, ref, rtol=1e-7, atol=1e-7)  # second order: forward differences (~3e-8)


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


# ------------------------------------------------------------------ the depot's integrating-factor coordinate
def _mm_case():
    from pk_events import make_events

    obs = [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 12.5, 24.0, 30.0, 48.0, 72.0]
    subjects = [dict(doses=[dict(time=0.0, amt=100.0, route=1)], obs=obs),
                dict(doses=[dict(time=0.0, amt=100.0, route=1), dict(time=12.0, amt=60.0, route=1),
                            dict(time=24.0, amt=50.0)], obs=obs),
                dict(doses=[dict(time=0.0, amt=80.0, route=1), dict(time=6.0, amt=80.0, route=1)], obs=obs,
                     resets=[20.0])]
    p = {"vm": torch.tensor([8.0, 5.0, 12.0], dtype=torch.float64),
         "km": torch.tensor([2.0, 0.5, 4.0], dtype=torch.float64),
         "v": torch.tensor([20.0, 15.0, 30.0], dtype=torch.float64),
         "ka": torch.tensor([1.2, 3.0, 0.4], dtype=torch.float64),
         "q": torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64),
         "vp": torch.tensor([40.0, 25.0, 60.0], dtype=torch.float64)}
    return make_events(subjects), p


def test_depot_factor_coordinate_gives_the_same_solution_and_derivatives():
    """The library's oral models integrate the depot as z = depot·e^{ka·τ} (constant between doses): an exact change
    of variables, so the solution, its first and its second derivatives (forward sensitivities, ka included) equal
    those of the plain coordinates — to the tolerance of a tight solve (rtol 1e-10: 1e-7 relative here)."""
    ev, p0 = _mm_case()
    for ncmt in (1, 2):
        system = ode_models.michaelis_menten(ncmt, True)
        assert system.absorption == "ka"
        plain = dataclasses.replace(system, absorption=None)
        names = ("vm", "km", "v", "ka") + (("q", "vp") if ncmt == 2 else ())
        outs = []
        for sy in (system, plain):
            ode.clear_cache()
            p = {k: p0[k].clone().requires_grad_(True) for k in names}
            c = ode.solve(sy, p, ev, rtol=1e-10, atol=1e-12)
            w = torch.linspace(0.5, 1.5, c.numel(), dtype=c.dtype).reshape(c.shape)
            g = torch.autograd.grad((c * w).sum(), list(p.values()), create_graph=True)
            h = torch.autograd.grad(g[3].sum(), list(p.values()))  # d/dp of the ka-gradient: the ka second order
            outs.append((c.detach(), torch.stack([x.detach() for x in g]), torch.stack(h)))
        (c1, g1, h1), (c2, g2, h2) = outs
        assert (c2 > 0).any()
        torch.testing.assert_close(c1, c2, rtol=1e-7, atol=1e-10)
        torch.testing.assert_close(g1, g2, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(h1, h2, rtol=1e-5, atol=1e-8)


def test_depot_factor_takes_fewer_steps_and_absorption_needs_a_depot():
    ev, p = _mm_case()
    system = ode_models.michaelis_menten(1, True)
    counts = []
    orig = ode._dopri5_stops
    for sy in (system, dataclasses.replace(system, absorption=None)):
        calls = {"n": 0}

        def spy(f, *a, calls=calls, **k):
            def g(s, y):
                calls["n"] += 1
                return f(s, y)
            return orig(g, *a, **k)

        ode._dopri5_stops = spy
        try:
            ode.clear_cache()
            ode.solve(sy, {k: p[k] for k in ("vm", "km", "v", "ka")}, ev)
        finally:
            ode._dopri5_stops = orig
        counts.append(calls["n"])
    assert counts[0] < 0.8 * counts[1], counts  # measured 38 vs 87 steps on an Oral_1CPTMM subject
    with pytest.raises(ModelSpecError, match="needs a depot"):
        ode.OdeSystem(n_states=1, rhs=system.rhs, depot=None, central=0, absorption="ka")


def test_mode_search_trial_points_stay_within_the_step_cap():
    """Far from the mode of a convex objective with flat tails the Newton step is huge (here ~1e3 at η = 0); the
    search caps every trial point at max_step (2.0) from its iterate and still reaches the mode (η = 10)."""
    seen = []

    def obj(e):
        seen.append(e.detach().clone())
        return torch.log(torch.cosh(e - 10.0)).sum(-1) + 1e-3 * ((e - 10.0) ** 2).sum(-1)

    res = find_modes(obj, torch.zeros(3, 2, dtype=torch.float64))
    assert torch.allclose(res.eta, torch.full_like(res.eta, 10.0), atol=1e-6) and bool(res.converged.all())
    pts = torch.stack(seen)  # every evaluation: iterates and trial points
    jumps = (pts[1:] - pts[:-1]).abs().amax(-1)  # between consecutive evaluations, per subject
    assert float(jumps.max()) <= 2.0 + 1e-12


@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("dual_time", [False, True])
def test_augmented_rhs_subjects_last_layout(dual_time, n):
    """``f.last`` — the layout the batched dopri5 keeps, [S·K, N], without the factor delta — is the same right-hand
    side as ``f``, inside and outside a held dual level, with the time as a dual or not (the dual time of the oral
    models' depot coordinate once raised inside the solver for a one-subject batch — a stride-0 time — and silently
    sent those solves to Rosenbrock)."""
    torch.manual_seed(1)
    system = ode_models.get("2cmt_oral_mm")
    names = ("vm", "km", "v", "ka")
    p = {k: (torch.rand(n, dtype=torch.float64) * 50 + 5) for k in system.params}
    lay = SensLayout(names)
    y = torch.rand(n, system.n_states, lay.k, dtype=torch.float64) * 10
    delta = torch.rand(n, dtype=torch.float64) + 0.5
    t0 = torch.rand(n, dtype=torch.float64)
    u = torch.zeros(n, system.n_states, dtype=torch.float64)
    s = torch.rand(n, dtype=torch.float64)
    f = augmented_rhs(system.rhs, lay, p, t0, delta, u, dual_time=dual_time)
    ref = f(s, y)  # [N, S, K], times delta
    y_last = y.permute(1, 2, 0).reshape(-1, n).contiguous()
    got = f.last(s, y_last).reshape(system.n_states, lay.k, n).permute(2, 0, 1) * delta[:, None, None]
    with f.session():
        got2 = f.last(s, y_last).reshape(system.n_states, lay.k, n).permute(2, 0, 1) * delta[:, None, None]
    torch.testing.assert_close(got, ref, rtol=1e-14, atol=1e-12)
    torch.testing.assert_close(got2, ref, rtol=1e-14, atol=1e-12)


def test_non_stiff_solves_never_reach_the_stiff_fallback(monkeypatch):
    """The explicit path must solve the library's MM systems (oral ones in the depot coordinate, with second-order
    sensitivities) by itself: an exception inside it is caught and sent to Rosenbrock, which gives the right answer
    ~10x slower — a silent performance failure that only this test sees."""
    def boom(*a, **k):
        raise AssertionError("the Rosenbrock fallback was used")

    monkeypatch.setattr(ode, "rosenbrock23", boom)
    ev, p0 = _mm_case()
    for name in ("1cmt_oral_mm", "2cmt_oral_mm"):
        system = ode_models.get(name)
        for grad in (False, True):
            for rows in (slice(None), slice(1, 2)):  # the batch and one subject alone (the mode search re-solves those)
                ode.clear_cache()
                p = {k: p0[k][rows].clone().requires_grad_(grad) for k in system.params}
                e = ev if rows == slice(None) else ev.index(torch.tensor([1]))
                with torch.set_grad_enabled(grad):
                    c = ode.solve(system, p, e)
                assert torch.isfinite(c).all() and (c > 0).any(), name


def test_dense_output_matches_the_exact_solution_between_steps():
    """Outputs inside a step come from dopri5's continuous extension (order 4): on y' = −k·y with many outputs the
    solve takes fewer steps than there are outputs, and every output is within the tolerance's reach of exp(−k·t);
    the end state is the last step's own."""
    k = torch.tensor([0.5, 2.0, 7.0], dtype=torch.float64)
    n = k.shape[0]
    stops = torch.linspace(0.01, 1.0, 100, dtype=torch.float64).expand(n, 100).contiguous()
    calls = {"n": 0}

    def f(s, y):  # subjects last: y [1, N]
        calls["n"] += 1
        return -k * y

    y0 = torch.ones(n, 1, dtype=torch.float64)
    counts = []
    for rtol, bound in ((1e-6, 2e-6), (1e-9, 2e-9)):
        calls["n"] = 0
        out, ok = ode._dopri5_stops(f, y0, stops, rtol, 1e-12, 1, 1000, torch.ones(n, dtype=torch.float64))
        assert ok.all()
        exact = torch.exp(-k[:, None] * stops)
        rel = ((out[..., 0] - exact) / exact).abs().max()
        assert rel < bound, (rtol, rel)
        counts.append(calls["n"])
    assert counts[0] < 6 * 100 / 2, counts  # at rtol 1e-6 under half as many steps as outputs


@pytest.mark.parametrize("name", ["1cmt_oral", "2cmt_oral", "3cmt_oral", "1cmt_oral_mm", "2cmt_oral_mm",
                                  "3cmt_oral_mm"])
def test_library_factor_rhs_equals_the_generic_depot_transform(name):
    """The library's oral models write their right-hand side in the depot's integrating-factor coordinate
    themselves (``OdeSystem.factor_rhs``, a third fewer operations); it must equal the generic transform of
    :func:`nlmefit.pk.ode._depot_factor_rhs` in value and in every forward derivative (states, parameters, time)."""
    torch.manual_seed(2)
    system = ode_models.get(name)
    assert system.factor_rhs is not None
    n = 6
    p = {k: torch.rand(n, dtype=torch.float64) * 3 + 0.2 for k in system.params}
    p["__t0"] = torch.rand(n, dtype=torch.float64)
    x = torch.rand(n, system.n_states, dtype=torch.float64) * 10
    t = p["__t0"] + torch.rand(n, dtype=torch.float64) * 4
    generic = ode._depot_factor_rhs(system)
    args = (t, x, *[p[k] for k in system.params])

    def call(rhs):
        def g(t_, x_, *vals):
            return rhs(t_, x_, {**dict(zip(system.params, vals)), "__t0": p["__t0"]})
        return g

    torch.testing.assert_close(call(system.factor_rhs)(*args), call(generic)(*args), rtol=1e-13, atol=1e-13)
    for i, a in enumerate(args):
        tangent = torch.rand_like(a)
        _, d1 = torch.func.jvp(lambda v, i=i: call(system.factor_rhs)(*args[:i], v, *args[i + 1:]), (a,), (tangent,))
        _, d2 = torch.func.jvp(lambda v, i=i: call(generic)(*args[:i], v, *args[i + 1:]), (a,), (tangent,))
        torch.testing.assert_close(d1, d2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["1cmt_iv", "2cmt_iv", "3cmt_oral", "1cmt_iv_mm", "2cmt_iv_mm", "2cmt_oral_mm",
                                  "3cmt_iv_mm"])
def test_prepared_parameters_give_the_same_rhs(name):
    """``OdeSystem.prepare`` adds derived parameters (q/v, q/vp, cl/v, km·v) once a solve; the right-hand side
    reading them equals the one computing them itself, in value and forward derivative."""
    torch.manual_seed(3)
    system = ode_models.get(name)
    assert system.prepare is not None
    n = 5
    p = {k: torch.rand(n, dtype=torch.float64) * 3 + 0.2 for k in system.params}
    x = torch.rand(n, system.n_states, dtype=torch.float64) * 10
    t = torch.zeros(n, dtype=torch.float64)
    vals = [p[k] for k in system.params]

    def plain(*v):
        return system.rhs(t, x, dict(zip(system.params, v)))

    def prepared(*v):
        return system.rhs(t, x, system.prepare(dict(zip(system.params, v))))

    tangents = tuple(torch.rand_like(v) for v in vals)
    a, da = torch.func.jvp(plain, tuple(vals), tangents)
    b, db = torch.func.jvp(prepared, tuple(vals), tangents)
    torch.testing.assert_close(b, a, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(db, da, rtol=1e-12, atol=1e-12)
