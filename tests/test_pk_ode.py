"""The ODE path (nlmefit.pk.ode / ode_models) against matrix-exponential, Lambert-W, Bateman and closed-form truths."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import scipy.special
import torch
from pk_events import make_events

from nlmefit.pk import ode_models
from nlmefit.pk.events import Events
from nlmefit.pk.ode import OdeSystem, solve

DT = torch.float64

# ---------------------------------------------------------------------------------------------------- helpers


def linear_matrix(ncmt: int, oral: bool, p: dict) -> tuple[np.ndarray, int, int | None]:
    """A of dx/dt = A x for the linear mammillary model (written out independently of ode_models)."""
    o = int(oral)
    s = ncmt + o
    a = np.zeros((s, s))
    c = o
    k10 = p["cl"] / p["v"]
    a[c, c] -= k10
    if oral:
        a[0, 0] = -p["ka"]
        a[c, 0] = p["ka"]
    for i, (qn, vn) in enumerate((("q", "vp"), ("q2", "vp2"))[: ncmt - 1]):
        kin, kout = p[qn] / p["v"], p[qn] / p[vn]
        per = c + 1 + i
        a[c, c] -= kin
        a[per, c] += kin
        a[c, per] += kout
        a[per, per] -= kout
    return a, c, (0 if oral else None)


def _int_expm(a: np.ndarray, b: np.ndarray, tau: float) -> np.ndarray:
    """∫_0^tau e^{A s} b ds by the augmented matrix exponential."""
    s = a.shape[0]
    m = np.zeros((s + 1, s + 1))
    m[:s, :s], m[:s, s] = a, b
    return scipy.linalg.expm(m * tau)[:s, s]


def _dose_response(a, b_unit, amt, rate, dur, tau, ss, ii):
    """State at time tau after the dose (0 before); SS doses include all earlier implied doses (tau >= 0)."""
    s = a.shape[0]
    if tau < 0:
        return np.zeros(s)
    if rate == 0:  # bolus
        if not ss:
            return scipy.linalg.expm(a * tau) @ (amt * b_unit)
        return scipy.linalg.expm(a * tau) @ np.linalg.solve(np.eye(s) - scipy.linalg.expm(a * ii), amt * b_unit)

    def one(t):
        if t <= dur:
            return _int_expm(a, rate * b_unit, t)
        return scipy.linalg.expm(a * (t - dur)) @ _int_expm(a, rate * b_unit, dur)

    if not ss:
        return one(tau)
    total, m = np.zeros(s), 0
    while tau + m * ii <= dur:  # implied doses still infusing
        total += one(tau + m * ii)
        m += 1
    rest = scipy.linalg.expm(a * (tau + m * ii - dur)) @ _int_expm(a, rate * b_unit, dur)
    return total + np.linalg.solve(np.eye(s) - scipy.linalg.expm(a * ii), rest)


def reference_linear(ncmt: int, oral: bool, params: list[dict], events: Events) -> np.ndarray:
    """Concentrations by superposition of matrix-exponential dose responses (the contributes() mask of Events)."""
    contrib = events.contributes().numpy()
    n, j = events.obs_time.shape
    out = np.zeros((n, j))
    for i in range(n):
        p = params[i]
        a, c, depot = linear_matrix(ncmt, oral, p)
        f, tlag = p.get("f", 1.0), p.get("tlag", 0.0)
        for jj in range(j):
            if not events.obs_mask[i, jj]:
                continue
            x = np.zeros(a.shape[0])
            for d in range(events.dose_time.shape[1]):
                if not contrib[i, jj, d]:
                    continue
                amt = f * float(events.dose_amt[i, d])
                r = float(events.dose_rate[i, d])
                if r > 0:
                    rate, dur = r, amt / r
                elif r == -1:
                    rate, dur = p["rate"], amt / p["rate"]
                elif r == -2:
                    rate, dur = amt / p["dur"], p["dur"]
                else:
                    rate, dur = 0.0, 0.0
                b = np.zeros(a.shape[0])
                b[depot if (int(events.dose_route[i, d]) == 1 and depot is not None) else c] = 1.0
                tau = float(events.obs_time[i, jj] - events.dose_time[i, d]) - tlag
                x += _dose_response(a, b, amt, rate, dur, tau, int(events.dose_ss[i, d]) > 0,
                                    float(events.dose_ii[i, d]))
            out[i, jj] = x[c] / p["v"]
    return out


def stack_params(params: list[dict]) -> dict[str, torch.Tensor]:
    return {k: torch.tensor([p[k] for p in params], dtype=DT) for k in params[0]}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))


PARAMS = [
    dict(cl=1.5, v=10.0, q=2.0, vp=20.0, q2=0.5, vp2=40.0, ka=1.2),
    dict(cl=0.7, v=25.0, q=1.0, vp=15.0, q2=0.3, vp2=60.0, ka=0.6),
]
OBS = [0.25, 1.0, 3.0, 12.0, 13.0, 18.0, 30.0]
FAST = dict(rtol=1e-8, atol=1e-10)  # for the tests whose point is not the last digit
TIGHT = dict(rtol=1e-10, atol=1e-12)  # the reference solves (the defaults are rxode2's 1e-6 / 1e-8)


def regimens(route: str) -> list[dict]:
    """Single dose, multiple doses, SS=1 — one subject each — for a route (bolus, infusion, oral)."""
    r = dict(bolus=dict(route=0), infusion=dict(route=0, rate=50.0), oral=dict(route=1))[route]
    single = dict(doses=[dict(time=0.0, amt=100.0, **r)], obs=OBS)
    multiple = dict(doses=[dict(time=t, amt=100.0, **r) for t in (0.0, 12.0, 24.0)], obs=OBS)
    ss = dict(doses=[dict(time=0.0, amt=100.0, ss=1, ii=12.0, **r)], obs=OBS)
    return [single, multiple, ss]


def _closed_form():
    try:
        from nlmefit.pk.closed_form import concentration
    except ImportError:
        return None
    return concentration


def _check_closed_form(c, plist, ev, ncmt, oral, tol=1e-6) -> None:
    concentration = _closed_form()
    if concentration is not None:
        cf = concentration({k: v[:, None] for k, v in stack_params(plist).items()}, ev, ncmt, oral)
        m = ev.obs_mask
        assert rel_err(c[m], cf[m].detach()) < tol


# ---------------------------------------------------------------------------------------------------- 1. linear


@pytest.mark.parametrize("ncmt", [1, 2, 3])
@pytest.mark.parametrize("oral", [False, True], ids=["iv", "oral"])
def test_linear_vs_expm_and_closed_form(ncmt, oral):
    """Bolus and infusion (IV system) or first-order absorption (oral system): single, multiple, SS=1 doses."""
    subjects = regimens("oral") if oral else regimens("bolus") + regimens("infusion")
    plist = [PARAMS[i % 2] for i in range(len(subjects))]
    ev = make_events(subjects)
    c = solve(ode_models.linear(ncmt, oral), stack_params(plist), ev, **TIGHT)
    ref = reference_linear(ncmt, oral, plist, ev)
    assert rel_err(c[ev.obs_mask], ref[ev.obs_mask.numpy()]) < 1e-6
    _check_closed_form(c, plist, ev, ncmt, oral)


def complex_subjects() -> list[dict]:
    return [
        # lag + F + oral multiple doses, observation recorded before a dose at the same time
        dict(doses=[dict(time=0.0, amt=100.0, route=1), dict(time=12.0, amt=50.0, route=1, obs_first=True)],
             obs=[0.1, 0.5, 1.0, 12.0, 12.5, 20.0]),
        # modelled duration and modelled rate, overlapping infusions
        dict(doses=[dict(time=0.0, amt=100.0, rate=-2.0), dict(time=1.0, amt=80.0, rate=-1.0)],
             obs=[0.5, 1.0, 2.0, 3.0, 5.0, 10.0]),
        # SS infusion longer than the interval (overlapping implied infusions), then SS=2 bolus added
        dict(doses=[dict(time=0.0, amt=120.0, rate=8.0, ss=1, ii=12.0), dict(time=30.0, amt=50.0, ss=2, ii=6.0)],
             obs=[0.5, 6.0, 14.0, 15.5, 29.0, 30.0, 33.0, 40.0]),
        # reset (EVID 3) between two dose epochs, and a bolus and observation at the same time
        dict(doses=[dict(time=0.0, amt=100.0), dict(time=20.0, amt=60.0), dict(time=26.0, amt=40.0, route=1)],
             obs=[2.0, 10.0, 20.0, 21.0, 26.0, 30.0], resets=[15.0]),
    ]


@pytest.mark.parametrize("ncmt", [1, 2])
def test_linear_events_lag_f_models_rates_ss_reset(ncmt):
    base = dict(PARAMS[0], f=0.8, tlag=0.3, dur=2.5, rate=40.0)
    plist = [base, dict(PARAMS[1], f=1.0, tlag=0.0, dur=1.5, rate=30.0),
             dict(PARAMS[0], f=0.9, tlag=0.0, dur=1.0, rate=1.0), dict(PARAMS[1], f=1.0, tlag=0.0, dur=1.0, rate=1.0)]
    ev = make_events(complex_subjects())
    c = solve(ode_models.linear(ncmt, True), stack_params(plist), ev, **TIGHT)
    ref = reference_linear(ncmt, True, plist, ev)
    m = ev.obs_mask
    assert (c[~m] == 0).all()
    assert rel_err(c[m], ref[m.numpy()]) < 1e-6
    _check_closed_form(c, plist, ev, ncmt, True)


def test_superposition_and_ss_auc():
    """Multiple doses equal the sum of single doses; at steady state AUC over an interval = F·dose/CL."""
    sysm = ode_models.linear(2, True)
    t = [0.5, 3.0, 13.0, 20.0]
    d1, d2 = dict(time=0.0, amt=100.0, route=1), dict(time=12.0, amt=100.0, route=1)
    c = solve(sysm, stack_params([PARAMS[0]] * 3),
              make_events([dict(doses=[d1, d2], obs=t), dict(doses=[d1], obs=t), dict(doses=[d2], obs=t)]), **TIGHT)
    assert rel_err(c[0], c[1] + c[2]) < 1e-8
    nodes, weights = np.polynomial.legendre.leggauss(24)  # the SS profile is smooth on (0, II]
    grid = 6.0 * (nodes + 1)
    c = solve(sysm, stack_params([PARAMS[0]]),
              make_events([dict(doses=[dict(time=0.0, amt=100.0, route=1, ss=1, ii=12.0)], obs=list(grid))]), **TIGHT)
    auc = float((c[0] * torch.tensor(6.0 * weights)).sum())
    assert abs(auc / (100.0 / PARAMS[0]["cl"]) - 1) < 1e-7


# ---------------------------------------------------------------------------------------------------- 2. MM


def test_michaelis_menten_tends_to_linear():
    ev = make_events([dict(doses=[dict(time=0.0, amt=100.0, route=1), dict(time=12.0, amt=100.0, route=1)],
                           obs=OBS)] * 3)
    lin = solve(ode_models.linear(2, True), stack_params([PARAMS[0]] * 3), ev, **FAST)
    cmax = float(lin.max())
    km = torch.tensor([10.0, 100.0, 1000.0], dtype=DT) * cmax
    p = {k: v for k, v in stack_params([PARAMS[0]] * 3).items() if k != "cl"}
    p.update(km=km, vm=PARAMS[0]["cl"] * km)
    mm = solve(ode_models.michaelis_menten(2, True), p, ev, **FAST)
    errs = [rel_err(mm[i], lin[i]) for i in range(3)]
    assert errs[0] < 0.1 and errs[2] < 1e-3
    assert errs[0] > 5 * errs[1] > 25 * errs[2]  # shrinks like C/km


def _with_eliminated(system: OdeSystem, read: int) -> OdeSystem:
    """system plus a state accumulating the eliminated amount; reads state ``read`` (volume 1)."""
    s = system.n_states

    def rhs(t, x, p):
        dx = system.rhs(t, x[:, :s], p)
        return torch.cat([dx, -dx.sum(1, keepdim=True)], 1)

    return OdeSystem(s + 1, rhs, system.depot, read, volume="one", names=system.names + ("eliminated",))


def test_michaelis_menten_mass_balance():
    system = ode_models.michaelis_menten(2, True)
    x = torch.rand(5, 3, dtype=DT) * 10
    p = dict(vm=torch.full((5,), 8.0, dtype=DT), km=torch.full((5,), 2.0, dtype=DT),
             v=torch.full((5,), 10.0, dtype=DT), q=torch.full((5,), 1.5, dtype=DT),
             vp=torch.full((5,), 20.0, dtype=DT), ka=torch.full((5,), 1.0, dtype=DT))
    dx = system.rhs(torch.zeros(5, dtype=DT), x, p)
    conc = x[:, 1] / 10.0
    torch.testing.assert_close(dx.sum(1), -8.0 * conc / (2.0 + conc), rtol=1e-12, atol=1e-12)
    # oral doses only: the wrapped systems below move "central" (the route-0 target) to the state they read
    ev = make_events([dict(doses=[dict(time=0.0, amt=100.0, route=1), dict(time=5.0, amt=50.0, route=1)],
                           obs=[0.5, 2.0, 5.0, 6.0, 10.0, 24.0])])
    p1 = {k: v[:1] for k, v in p.items()}
    p1["one"] = torch.ones(1, dtype=DT)
    parts = [solve(_with_eliminated(system, i), p1, ev, **FAST) for i in range(4)]
    expected = torch.tensor([[100.0, 100.0, 150.0, 150.0, 150.0, 150.0]], dtype=DT)
    torch.testing.assert_close(sum(parts), expected, rtol=1e-9, atol=0)
    assert float(parts[3][0, -1]) > 10.0  # something was eliminated


def test_michaelis_menten_lambert_w():
    vm, km, v, dose = np.array([5.0, 20.0, 50.0]), np.array([0.5, 2.0, 10.0]), np.array([10.0, 20.0, 5.0]), 100.0
    t = np.array([0.1, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0])
    ev = make_events([dict(doses=[dict(time=0.0, amt=dose)], obs=list(t))] * 3)
    p = dict(vm=torch.tensor(vm), km=torch.tensor(km), v=torch.tensor(v))
    c = solve(ode_models.michaelis_menten(1, False), p, ev, **TIGHT).numpy()
    c0 = dose / v[:, None]
    k = km[:, None]
    # km·ln(C/C0) + C − C0 = −(vm/v)·t  ⇒  C = km·W((C0/km)·exp((C0 − vm·t/v)/km))
    arg = np.log(c0 / k) + (c0 - vm[:, None] / v[:, None] * t) / k  # log of W's argument (avoid overflow)
    w = np.real(scipy.special.lambertw(np.exp(np.minimum(arg, 700.0))))
    big = arg > 700.0  # W(e^a) ≈ a − log a for huge a (the Newton steps below polish it)
    w[big] = arg[big] - np.log(arg[big])
    for _ in range(3):  # Newton polish of w·e^w = e^arg in log form: log w + w = arg
        w = w - (np.log(w) + w - arg) / (1 / w + 1)
    assert rel_err(c, k * w) < 1e-6


# ---------------------------------------------------------------------------------------------------- 3. transit


def test_transit_zero_is_plain_oral():
    p = [dict(PARAMS[0], mtt=2.0), dict(PARAMS[1], mtt=3.0)]
    ev = make_events([dict(doses=[dict(time=0.0, amt=100.0, route=1), dict(time=12.0, amt=60.0, route=1)],
                           obs=OBS)] * 2)
    c = solve(ode_models.transit(0), stack_params(p), ev, **FAST)
    assert rel_err(c, reference_linear(1, True, p, ev)) < 1e-6
    concentration = _closed_form()
    if concentration is not None:
        cf = concentration({k: v[:, None] for k, v in stack_params(p).items()}, ev, 1, True)
        assert rel_err(c, cf.detach()) < 1e-6


def test_transit_one_bateman_and_three_expm():
    mtt, ka, cl, v, dose = 2.0, 1.3, 1.5, 10.0, 100.0
    t = np.array([0.2, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0])
    ev = make_events([dict(doses=[dict(time=0.0, amt=dose, route=1)], obs=list(t))])
    p = {k: torch.tensor([val], dtype=DT) for k, val in dict(mtt=mtt, ka=ka, cl=cl, v=v).items()}
    # n = 1: chain ktr → ka → k (distinct rates), Bateman: A_3(t) = D·ktr·ka·Σ_i e^{−k_i t}/Π_{j≠i}(k_j − k_i)
    rates = [2.0 / mtt, ka, cl / v]
    bateman = sum(math.prod(rates[:2]) * np.exp(-ki * t) / math.prod(kj - ki for kj in rates if kj != ki)
                  for ki in rates)
    c1 = solve(ode_models.transit(1), p, ev, **TIGHT)[0].numpy()
    assert rel_err(c1, dose * bateman / v) < 1e-6
    # n = 3: repeated rates, matrix exponential
    n, ktr = 3, 4.0 / mtt
    a = np.zeros((n + 2, n + 2))
    for i in range(n + 1):
        a[i, i] = -ktr if i < n else -ka
        a[i + 1, i] = ktr if i < n else ka
    a[n + 1, n + 1] = -cl / v
    ref = np.array([(scipy.linalg.expm(a * ti)[:, 0] * dose)[n + 1] / v for ti in t])
    c3 = solve(ode_models.transit(3), p, ev, **TIGHT)[0].numpy()
    assert rel_err(c3, ref) < 1e-6


# ---------------------------------------------------------------------------------------------------- 4. batching


def test_batched_equals_single_and_padding():
    subjects = complex_subjects()
    plist = [dict(PARAMS[i % 2], f=1.0, tlag=0.0, dur=2.0, rate=20.0) for i in range(len(subjects))]
    system = ode_models.linear(2, True)
    ev = make_events(subjects)
    batched = solve(system, stack_params(plist), ev, **FAST)
    for i, s in enumerate(subjects):
        single = solve(system, stack_params([plist[i]]), make_events([s]), **FAST)[0]
        k = single.shape[0]
        # the adaptive step is shared across the batch, so agreement is to the solver tolerance, not bitwise
        assert rel_err(batched[i, :k], single) < 1e-7
        assert (batched[i, k:] == 0).all()
    # a subject with no doses and one with no observations do not disturb the others
    extra = subjects + [dict(obs=[1.0, 2.0]), dict(doses=[dict(time=0.0, amt=10.0)])]
    ev2 = make_events(extra)
    c2 = solve(system, stack_params(plist + plist[:2]), ev2, **FAST)
    assert rel_err(c2[: len(subjects), : batched.shape[1]][ev.obs_mask], batched[ev.obs_mask]) < 1e-7
    assert (c2[len(subjects):] == 0).all()


def test_params_shapes_and_scalars():
    ev = make_events([dict(doses=[dict(time=0.0, amt=100.0, route=1)], obs=[1.0, 4.0])] * 2)
    system = ode_models.linear(1, True)
    p = stack_params([PARAMS[0]] * 2)
    a = solve(system, p, ev, **FAST)
    b = solve(system, {k: v[:, None] for k, v in p.items()}, ev, **FAST)
    c = solve(system, {k: torch.tensor(float(v[0]), dtype=DT) for k, v in p.items()}, ev, **FAST)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, c, rtol=0, atol=0)
    # gradients stay finite with padded observations/doses and a subject without any dose
    ev = make_events([dict(doses=[dict(time=0.0, amt=100.0, route=1), dict(time=2.0, amt=50.0, rate=-2.0)],
                           obs=[1.0, 4.0, 6.0]), dict(obs=[1.0])])
    q = {k: v.clone().requires_grad_() for k, v in dict(p, dur=torch.full((2,), 1.5, dtype=DT)).items()}
    c = solve(system, q, ev, **FAST)
    assert (c[1] == 0).all()
    grads = dict(zip(q, torch.autograd.grad(c.sum(), list(q.values()), allow_unused=True)))
    assert all(torch.isfinite(grads[k]).all() for k in ("cl", "v", "ka", "dur"))


def _fd_check(system, params, ev, names, h=1e-5):
    """Autograd vs central differences (all subjects perturbed at once: subjects are independent)."""
    p = {k: v.clone().requires_grad_(k in names) for k, v in params.items()}
    w = torch.linspace(0.5, 1.5, ev.obs_time.shape[1], dtype=DT)
    loss = (solve(system, p, ev, **TIGHT) * w).sum(1)
    grads = torch.autograd.grad(loss.sum(), [p[k] for k in names])
    for k, g in zip(names, grads):
        assert torch.isfinite(g).all()
        vals = []
        for sgn in (1, -1):
            q = dict(params)
            q[k] = params[k] * (1 + sgn * h)
            with torch.no_grad():
                vals.append((solve(system, q, ev, **TIGHT) * w).sum(1))
        fd = (vals[0] - vals[1]) / (2 * h * params[k])
        torch.testing.assert_close(g, fd, rtol=1e-5, atol=1e-10, msg=lambda m: f"{k}: {m}")


def test_gradients_match_finite_differences():
    subjects = [dict(doses=[dict(time=0.0, amt=100.0, route=1), dict(time=3.0, amt=50.0, rate=-2.0)],
                     obs=[0.5, 1.0, 3.0, 4.0, 6.0]),
                dict(doses=[dict(time=0.0, amt=100.0, route=1, ss=1, ii=6.0)], obs=[1.0, 4.0, 6.0])]
    p = stack_params([dict(PARAMS[0], tlag=0.4, dur=2.0), dict(PARAMS[1], tlag=0.2, dur=2.0)])
    _fd_check(ode_models.linear(2, True), p, make_events(subjects), ["ka", "tlag", "dur"])


def test_michaelis_menten_steady_state_and_gradients():
    """MM SS=1 (Newton on the interval map) equals repeated dosing; its implicit-function gradient matches FD."""
    system = ode_models.michaelis_menten(1, False)
    p = dict(vm=torch.tensor([20.0, 40.0], dtype=DT), km=torch.tensor([2.0, 5.0], dtype=DT),
             v=torch.tensor([10.0, 20.0], dtype=DT))
    dose = dict(amt=40.0, rate=20.0)
    ss = make_events([dict(doses=[dict(time=0.0, ss=1, ii=8.0, **dose)], obs=[0.5, 2.0, 6.0])] * 2)
    reps = make_events([dict(doses=[dict(time=8.0 * i, **dose) for i in range(12)],
                             obs=[88.5, 90.0, 94.0])] * 2)
    assert rel_err(solve(system, p, ss, **FAST), solve(system, p, reps, **FAST)) < 1e-6
    _fd_check(system, p, ss, ["vm"])


def test_no_steady_state_is_nan():
    system = ode_models.michaelis_menten(1, False)
    p = dict(vm=torch.tensor([4.0, 20.0], dtype=DT), km=torch.tensor([2.0, 5.0], dtype=DT),
             v=torch.tensor([10.0, 20.0], dtype=DT))  # subject 0: 40 per 8 h > vm
    ev = make_events([dict(doses=[dict(time=0.0, amt=40.0, ss=1, ii=8.0)], obs=[1.0, 4.0])] * 2)
    with pytest.warns(RuntimeWarning, match="no steady state"):
        c = solve(system, p, ev, **FAST)
    assert torch.isnan(c[0]).all() and torch.isfinite(c[1]).all()


def test_registry_and_errors():
    from nlmefit.errors import ModelSpecError

    assert ode_models.get("transit_7").n_states == 9
    assert ode_models.SYSTEMS["2cmt_oral_mm"].params == ("vm", "km", "v", "q", "vp", "ka")
    assert set(ode_models.SYSTEMS["3cmt_iv"].params) == {"cl", "v", "q", "vp", "q2", "vp2"}
    with pytest.raises(ModelSpecError):
        ode_models.get("nope")
    ev = make_events([dict(doses=[dict(time=0.0, amt=100.0, rate=-2.0)], obs=[1.0])])
    one = dict(cl=torch.ones(1, dtype=DT), v=torch.ones(1, dtype=DT))
    with pytest.raises(ModelSpecError, match="dur"):
        solve(ode_models.linear(1, False), one, ev)
    with pytest.raises(ModelSpecError, match="adaptive"):
        solve(ode_models.linear(1, False), one, make_events([dict(doses=[dict(time=0.0, amt=1.0)], obs=[1.0])]),
              method="rk4")
    with pytest.raises(ModelSpecError, match="depot"):  # as the closed forms: route 1 needs a depot
        solve(ode_models.linear(1, False), one, make_events([dict(doses=[dict(time=0.0, amt=1.0, route=1)],
                                                                   obs=[1.0])]))
