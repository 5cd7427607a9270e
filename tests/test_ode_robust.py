"""Issue 10, items 3–4: the ODE path never raises from the solver, solves stiff systems, carries forward
sensitivities, and its default (rxode2-like) tolerances give the OFV of a tight solve."""
from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.linalg
import torch
from pk_events import make_events

import nlmefit
from nlmefit.errors import ModelSpecError
from nlmefit.marginal.linearisation import Conditional
from nlmefit.pk import ode_models
from nlmefit.pk.ode import OdeSystem, solve

DT = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-12)
REF = dict(rtol=1e-9, atol=1e-11)


def _mm_oral_params(requires_grad: bool = False) -> dict:
    p = dict(vm=[20.0, 40.0, 10.0], km=[2.0, 5.0, 1.0], v=[30.0, 35.0, 25.0], ka=[1.5, 0.8, 2.0])
    return {k: torch.tensor(v, dtype=DT, requires_grad=requires_grad) for k, v in p.items()}


def _derivatives(sens: str, **tol):
    ev = make_events([dict(doses=[dict(time=0.0, amt=320.0, route=1)], obs=[1.0, 6.0])] * 2)
    p = {k: v[:2].detach().requires_grad_() for k, v in _mm_oral_params().items()}
    # plain depot coordinates (absorption=None): the autograd walk integrates those, so both differentiate the same
    # discretisation (the integrating-factor coordinate is checked against them in tests/test_ode_speed.py)
    system = dataclasses.replace(ode_models.michaelis_menten(1, True), absorption=None)
    c = solve(system, p, ev, sensitivities=sens, **tol)
    y = (c * torch.linspace(0.5, 1.5, 2, dtype=DT)).sum()
    g = torch.autograd.grad(y, list(p.values()), create_graph=True)
    h = torch.stack([torch.stack(torch.autograd.grad(gi.sum(), list(p.values()), retain_graph=True)) for gi in g])
    return c.detach(), torch.stack([gi.detach() for gi in g]), h


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_forward_sensitivities_match_autograd_to_second_order():
    """The Taylor surrogate's value, gradient and per-subject Hessian equal autograd through the steps."""
    c1, g1, h1 = _derivatives("forward", **REF)
    c2, g2, h2 = _derivatives("autograd", **REF)
    assert _rel(c1, c2) < 1e-9 and _rel(g1, g2) < 1e-8 and _rel(h1, h2) < 1e-7


def test_rosenbrock_on_a_stiff_linear_system_matches_expm():
    """2-cmt IV with intercompartmental clearance 1e4× the elimination one: eigenvalues −1e4·… and −0.05."""
    system = ode_models.linear(2, False)
    prm = dict(cl=1.0, v=10.0, q=2e4, vp=20.0)
    t_obs = [0.001, 0.01, 0.5, 2.0, 8.0]
    ev = make_events([dict(doses=[dict(time=0.0, amt=100.0)], obs=t_obs)])
    p = {k: torch.tensor([v], dtype=DT) for k, v in prm.items()}
    c = solve(system, p, ev, stiff=True, rtol=1e-8, atol=1e-10)
    a = np.array([[-(prm["cl"] + prm["q"]) / prm["v"], prm["q"] / prm["vp"]],
                  [prm["q"] / prm["v"], -prm["q"] / prm["vp"]]])
    ref = np.array([(scipy.linalg.expm(a * t) @ np.array([100.0, 0.0]))[0] / prm["v"] for t in t_obs])
    assert np.max(np.abs(c[0].numpy() - ref) / ref) < 1e-5


def test_stiff_michaelis_menten_falls_back_and_matches_lambert_w():
    """vm/km = 1e9: the explicit method's step collapses; the automatic Rosenbrock fallback solves it."""
    import scipy.special

    system = ode_models.michaelis_menten(1, False)
    vm, km, v, dose = 1e6, 1e-3, 10.0, 100.0
    t = np.array([1e-5, 5e-5, 9e-5])
    ev = make_events([dict(doses=[dict(time=0.0, amt=dose)], obs=list(t))])
    p = dict(vm=torch.tensor([vm], dtype=DT), km=torch.tensor([km], dtype=DT), v=torch.tensor([v], dtype=DT))
    c = solve(system, p, ev)[0].numpy()
    c0 = dose / v
    arg = np.log(c0 / km) + (c0 - vm / v * t) / km
    w = np.array([np.real(scipy.special.lambertw(np.exp(a))) if a < 700 else a - np.log(a) for a in arg])
    for _ in range(3):
        w = w - (np.log(w) + w - arg) / (1 / w + 1)
    assert np.max(np.abs(c - km * w) / (km * w)) < 1e-4


def test_a_failing_subject_is_nan_and_never_raises():
    """A pole in the right-hand side (km < 0) or a non-finite parameter: NaN for that subject, the rest solved."""
    system = ode_models.michaelis_menten(1, False)
    ev = make_events([dict(doses=[dict(time=0.0, amt=100.0)], obs=[0.5, 2.0])] * 3)
    p = dict(vm=torch.tensor([20.0, 20.0, float("inf")], dtype=DT), km=torch.tensor([2.0, -2.0, 2.0], dtype=DT),
             v=torch.tensor([10.0, 10.0, 10.0], dtype=DT))
    c = solve(system, p, ev)
    alone = solve(system, {k: v[:1] for k, v in p.items()}, make_events([dict(doses=[dict(time=0.0, amt=100.0)],
                                                                            obs=[0.5, 2.0])]))
    assert torch.isfinite(c[0]).all() and torch.isnan(c[2]).all()
    torch.testing.assert_close(c[0], alone[0], rtol=1e-4, atol=0)  # another solver, same tolerance
    assert not torch.isfinite(c[1]).all() or (c[1] > 0).all()  # the pole subject is NaN (or, if solved, positive)


def test_nan_subject_keeps_other_gradients_finite():
    system = ode_models.michaelis_menten(1, False)
    ev = make_events([dict(doses=[dict(time=0.0, amt=100.0)], obs=[0.5, 2.0])] * 2)
    p = dict(vm=torch.tensor([20.0, float("nan")], dtype=DT, requires_grad=True),
             km=torch.tensor([2.0, 2.0], dtype=DT, requires_grad=True), v=torch.tensor([10.0, 10.0], dtype=DT))
    c = solve(system, p, ev)
    (g,) = torch.autograd.grad(c[0].sum(), p["vm"])
    assert torch.isfinite(g[0]) and torch.isnan(c[1]).all()


def test_structure_options_and_validation():
    st = nlmefit.library.structure("1cmt_iv_mm")
    assert (st.rtol, st.atol, st.sensitivities, st.stiff) == (5e-6, 5e-8, "forward", "auto")  # nlmixr2 FOCE-I
    tight = st.with_tolerance(1e-10)
    assert (tight.rtol, tight.atol) == (1e-10, 1e-12)
    with pytest.raises(ModelSpecError):
        tight.with_tolerance(2.0)
    with pytest.raises(ModelSpecError):
        solve(ode_models.linear(1, False), dict(cl=torch.ones(1), v=torch.ones(1)),
              make_events([dict(doses=[dict(time=0.0, amt=1.0)], obs=[1.0])]), sensitivities="reverse")


def _mm_subset(n_subjects: int) -> pd.DataFrame:
    df = nlmefit.datasets.load("bolus_1cptmm")
    df = df[df.SD == 1]
    return df[df.ID.isin(df.ID.unique()[:n_subjects])]


@pytest.mark.slow
def test_default_tolerance_focei_ofv_agrees_with_tight_solve():
    """FOCE-I −2LL on Bolus_1CPTMM (4 subjects, near the truth) at rtol 1e-6 vs 1e-10: within 0.01."""
    model = nlmefit.library.get("1cmt_iv_mm", error="proportional", theta={"vm": 800.0, "km": 200.0, "v": 50.0},
                                omega={"vm": 0.09, "km": 0.09, "v": 0.09}, sigma={"prop": 0.2})
    est = nlmefit.estimators.base.get_estimator("focei")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m, data = est.bind(model, _mm_subset(4), init="model")
    p = m.parameters.initial(DT, data.y.device)
    lin = Conditional("focei")
    eta0 = torch.zeros(data.n_subjects, data.q, dtype=DT)

    def ofv(mm):
        eta = lin.modes(mm, p, data, eta0)
        return float(lin.subject_m2ll(mm, p, data, eta).sum().detach())

    tight = type(m).__new__(type(m))
    tight.__dict__.update(m.__dict__)
    tight.structure = m.structure.with_tolerance(1e-10, 1e-12)
    assert abs(ofv(m) - ofv(tight)) < 0.01


@pytest.mark.slow
def test_theophylline_fits_with_the_mm_ode_model():
    fit = nlmefit.fit(nlmefit.library.get("1cmt_oral_mm"), nlmefit.datasets.load("theophylline"), method="focei",
                      covariance=None)
    assert np.isfinite(fit.ofv)


def test_ode_system_without_sensitivity_support_still_differentiates():
    """An event parameter (tlag) with grad sends the solve down the autograd path: gradients still finite."""
    system = OdeSystem(1, lambda t, x, p: -p["k"][:, None] * x, None, 0, volume="v")
    ev = make_events([dict(doses=[dict(time=0.0, amt=10.0)], obs=[1.0, 2.0])])
    p = dict(k=torch.tensor([0.3], dtype=DT, requires_grad=True), v=torch.ones(1, dtype=DT),
             tlag=torch.tensor([0.2], dtype=DT, requires_grad=True))
    c = solve(system, p, ev, **TIGHT)
    gk, gl = torch.autograd.grad(c.sum(), [p["k"], p["tlag"]])
    t = torch.tensor([0.8, 1.8], dtype=DT)
    torch.testing.assert_close(gk, (-t * 10 * torch.exp(-0.3 * t)).sum().reshape(1), rtol=1e-7, atol=0)
    torch.testing.assert_close(gl, (3.0 * torch.exp(-0.3 * t)).sum().reshape(1), rtol=1e-7, atol=0)


def test_fit_that_cannot_start_names_subjects_and_initial_values(monkeypatch):
    """Issue 10 item 3: a non-finite objective at the initial values raises EstimationError naming the
    subject(s) whose −2LL is not finite and the initial parameter values (here: one subject's ODE solve fails)."""
    import nlmefit.models.structure as structure
    from nlmefit.errors import EstimationError

    df = _mm_subset(3)
    bad_id = df.ID.unique()[1]
    real = structure.solve

    def failing(system, params, events, **kw):
        c = real(system, params, events, **kw)
        row = torch.zeros(c.shape[0], 1, dtype=torch.bool)
        row[1] = True
        return torch.where(row & events.obs_mask, torch.full_like(c, float("nan")), c)

    monkeypatch.setattr(structure, "solve", failing)
    model = nlmefit.library.get("1cmt_iv_mm", error="proportional", theta={"vm": 800.0, "km": 200.0, "v": 50.0})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(EstimationError) as info:
            nlmefit.fit(model, df, method="focei", covariance=None)
    msg = str(info.value)
    assert f"ID {bad_id}" in msg and "initial values" in msg and "vm=800" in msg
    assert f"{df.ID.unique()[0]}," not in msg.split("ID ", 1)[1].split(";")[0]


def test_per_subject_steps_and_the_solve_cache_give_the_fresh_batched_solution():
    """Steps are per subject, so a subject's solution does not depend on its batch; the cache of the last solve
    re-solves only the subjects whose parameters changed, and gives what a fresh solve gives."""
    from nlmefit.pk.ode import clear_cache

    system = ode_models.michaelis_menten(1, True)
    ev = make_events([dict(doses=[dict(time=0.0, amt=320.0, route=1), dict(time=12.0, amt=160.0, route=1)],
                           obs=[0.5, 1.0, 6.0, 12.0, 13.0, 24.0])] * 3)
    p = _mm_oral_params()
    clear_cache()
    full = solve(system, p, ev)
    for i in range(3):
        one = solve(system, {k: v[i:i + 1] for k, v in p.items()}, ev.index(slice(i, i + 1)))
        torch.testing.assert_close(one[0], full[i], rtol=1e-13, atol=0)
    q = {k: v.clone() for k, v in p.items()}
    q["vm"][1] = 30.0
    cached = solve(system, q, ev)  # subjects 0 and 2 come from the cache
    clear_cache()
    torch.testing.assert_close(cached, solve(system, q, ev), rtol=1e-13, atol=0)
    torch.testing.assert_close(cached[[0, 2]], full[[0, 2]], rtol=0, atol=0)
    # forward sensitivities: a cached expansion serves a nearby point through its Taylor surrogate
    r = {k: v.detach().clone().requires_grad_() for k, v in p.items()}
    c0 = solve(system, r, ev)
    r2 = {k: (v.detach() * (1 + 1e-7)).requires_grad_() for k, v in p.items()}
    c1 = solve(system, r2, ev)
    g1 = torch.autograd.grad(c1.sum(), list(r2.values()))
    clear_cache()
    c2 = solve(system, r2, ev)
    g2 = torch.autograd.grad(c2.sum(), list(r2.values()))
    assert _rel(c1.detach(), c2.detach()) < 1e-6 and _rel(c1.detach(), c0.detach()) < 1e-5
    for a, b in zip(g1, g2):
        assert _rel(a, b) < 1e-5


def test_value_request_near_a_sensitivity_solve_uses_its_taylor_surrogate():
    """The line search's value-only solves near the last sensitivity solve's point get its surrogate's value:
    consistent with the Newton step's derivatives, and within the solver tolerance of a fresh solve."""
    from nlmefit.pk.ode import clear_cache

    system = ode_models.michaelis_menten(1, True)
    ev = make_events([dict(doses=[dict(time=0.0, amt=320.0, route=1)], obs=[0.5, 2.0, 8.0, 24.0])] * 3)
    p = {k: v.detach().requires_grad_() for k, v in _mm_oral_params().items()}
    clear_cache()
    c0 = solve(system, p, ev)
    dc = torch.autograd.grad(c0.sum(), p["vm"])[0]
    with torch.no_grad():
        near = {k: v.detach() * (1 + 1e-5 if k == "vm" else 1.0) for k, v in p.items()}
        c1 = solve(system, near, ev)
        clear_cache()
        fresh = solve(system, near, ev)
    step = (c1 - c0.detach()).sum(1)
    torch.testing.assert_close(step, dc * 1e-5 * p["vm"].detach(), rtol=1e-4, atol=0)  # the local model
    assert _rel(c1, fresh) < 1e-5
