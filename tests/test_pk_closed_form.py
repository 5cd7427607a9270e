"""Closed-form PK (nlmefit.pk.closed_form) against textbook formulas, matrix exponentials, superposition and
repeated dosing; lag/F/modelled infusions, event ordering, gradients and padding."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import scipy.integrate
import scipy.linalg
import torch
from pk_events import make_events

from nlmefit.errors import ModelSpecError
from nlmefit.pk.closed_form import concentration, macro_constants
from nlmefit.pk.events import Events

DT = torch.float64

# two parameter sets: well separated phases, and flip-flop absorption (ka below the terminal rate of 1-cmt)
P_A = dict(cl=2.0, v=20.0, q=3.0, vp=40.0, q2=0.8, vp2=60.0, ka=1.2)
P_B = dict(cl=0.7, v=5.0, q=9.0, vp=15.0, q2=0.3, vp2=100.0, ka=0.07)
# fast enough terminal phases for 50 doses every 12 h to reach steady state to < 1e-10
P_SS = [dict(cl=3.0, v=10.0, q=4.0, vp=20.0, q2=1.5, vp2=15.0, ka=0.9),
        dict(cl=6.0, v=12.0, q=2.0, vp=8.0, q2=5.0, vp2=30.0, ka=0.15)]
NAMES = {1: ("cl", "v"), 2: ("cl", "v", "q", "vp"), 3: ("cl", "v", "q", "vp", "q2", "vp2")}
ROUTES = ("bolus", "infusion", "oral")


# ---------------------------------------------------------------------------------------------------- helpers


def params_for(plist: list[dict], ncmt: int, oral: bool, extra=("f", "tlag", "dur", "rate")) -> dict:
    names = NAMES[ncmt] + (("ka",) if oral else ()) + tuple(e for e in extra if e in plist[0])
    return {k: torch.tensor([[p[k]] for p in plist], dtype=DT) for k in names}


def conc(subjects, plist, ncmt, oral, **kw) -> np.ndarray:
    ev = make_events(subjects)
    return concentration(params_for(plist, ncmt, oral), ev, ncmt, oral, **kw).detach().numpy()


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))


def rate_matrix(ncmt: int, oral: bool, p: dict) -> tuple[np.ndarray, int]:
    """K of dx/dt = K x (amounts; depot first when oral), and the index of the central compartment."""
    c = int(oral)
    k = np.zeros((ncmt + c, ncmt + c))
    k[c, c] = -p["cl"] / p["v"]
    if oral:
        k[0, 0], k[c, 0] = -p["ka"], p["ka"]
    for i, (qn, vn) in enumerate((("q", "vp"), ("q2", "vp2"))[: ncmt - 1]):
        per = c + 1 + i
        k[c, c] -= p[qn] / p["v"]
        k[per, c] += p[qn] / p["v"]
        k[c, per] += p[qn] / p[vn]
        k[per, per] -= p[qn] / p[vn]
    return k, c


def expm_conc(ncmt: int, oral: bool, p: dict, doses: list[dict], times) -> np.ndarray:
    """Central concentration by matrix exponentials; ``doses`` dict(time, amt, rate=0 (bolus) or >0, route)
    all count (superposition of the linear ODE), each from its time on."""
    k, c = rate_matrix(ncmt, oral, p)
    s = k.shape[0]
    times = np.asarray(times, dtype=float)
    out = np.zeros(len(times))
    for d in doses:
        b = np.zeros(s)
        b[0 if d.get("route", 0) == 1 else c] = 1.0
        dt = times - d["time"]
        on = dt >= 0
        if not on.any():
            continue
        dt = dt[on]
        if d.get("rate", 0.0) == 0:
            x = scipy.linalg.expm(k[None] * dt[:, None, None]) @ (d["amt"] * b)
        else:  # augmented matrix: the last state is the constant input rate
            dur = d["amt"] / d["rate"]
            m = np.zeros((s + 1, s + 1))
            m[:s, :s], m[:s, s] = k, d["rate"] * b
            x = scipy.linalg.expm(m[None] * np.minimum(dt, dur)[:, None, None])[:, :s, s]
            x = np.einsum("tij,tj->ti", scipy.linalg.expm(k[None] * np.maximum(dt - dur, 0.0)[:, None, None]), x)
        out[on] += x[:, c]
    return out / p["v"]


def expm_repeated(ncmt: int, oral: bool, p: dict, dose: dict, tau: float, n_doses: int, offsets) -> np.ndarray:
    """``expm_conc`` of ``n_doses`` copies of ``dose`` every ``tau`` (the last one at time 0) at times ``offsets``
    (≥ 0), summed dose by dose: after the input ends each term is e^{K·(s − T)}·x_T, one matrix power apart."""
    k, c = rate_matrix(ncmt, oral, p)
    s_ = k.shape[0]
    b = np.zeros(s_)
    b[0 if dose.get("route", 0) == 1 else c] = 1.0
    rate = dose.get("rate", 0.0)
    dur = dose["amt"] / rate if rate else 0.0
    e_tau = scipy.linalg.expm(k * tau)

    def infusing(s):  # state s after the start of an infusion still running
        m = np.zeros((s_ + 1, s_ + 1))
        m[:s_, :s_], m[:s_, s_] = k, rate * b
        return (scipy.linalg.expm(m * s) @ np.r_[np.zeros(s_), 1.0])[:s_]

    x_end = infusing(dur) if rate else dose["amt"] * b
    out = []
    for delta in offsets:
        total, y = np.zeros(s_), None
        for m in range(n_doses):
            s = delta + m * tau
            if rate and s < dur:
                total += infusing(s)
                continue
            y = scipy.linalg.expm(k * (s - dur)) @ x_end if y is None else e_tau @ y
            total += y
        out.append(total[c])
    return np.array(out) / p["v"]


def route_dose(route: str, time: float, amt: float, **kw) -> dict:
    if route == "infusion":
        return dict(time=time, amt=amt, rate=amt / 2.5, **kw)
    return dict(time=time, amt=amt, route=int(route == "oral"), **kw)


TIMES = list(np.concatenate([[0.05, 0.2, 0.5, 1.0, 1.7, 2.4, 2.6, 3.0, 4.5], np.geomspace(6.0, 300.0, 25)]))


# ---------------------------------------------------------------------------------------------------- 1. truth


def test_one_compartment_textbook():
    cl, v, ka, dose = 1.5, 12.0, 0.8, 100.0
    k = cl / v
    t = np.array(TIMES)
    p = [dict(cl=cl, v=v, ka=ka)]
    bolus = conc([dict(doses=[dict(time=0.0, amt=dose)], obs=TIMES)], p, 1, False)[0]
    assert rel_err(bolus, dose / v * np.exp(-k * t)) < 1e-13
    rate, dur = 40.0, 2.5
    inf = conc([dict(doses=[dict(time=0.0, amt=rate * dur, rate=rate)], obs=TIMES)], p, 1, False)[0]
    truth = np.where(t <= dur, rate / cl * (1 - np.exp(-k * t)),
                     rate / cl * (1 - np.exp(-k * dur)) * np.exp(-k * (t - dur)))
    assert rel_err(inf, truth) < 1e-13
    oral = conc([dict(doses=[dict(time=0.0, amt=dose, route=1)], obs=TIMES)], p, 1, True)[0]
    assert rel_err(oral, dose * ka / (v * (ka - k)) * (np.exp(-k * t) - np.exp(-ka * t))) < 1e-12
    # ka = k exactly (the Bateman function's limit D·k·t·e^{−kt}/V) and ka a hair away from it, where the
    # textbook formula cancels catastrophically: exact to ~eps against 50-digit arithmetic
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    for kav in (k, k * (1 + 1e-9), k * (1 - 1e-5), k * 1.01):
        c = conc([dict(doses=[dict(time=0.0, amt=dose, route=1)], obs=TIMES)], [dict(cl=cl, v=v, ka=kav)], 1, True)
        ka_, k_ = mpmath.mpf(kav), mpmath.mpf(cl) / v
        if kav == k:
            truth = [dose * k_ * ti * mpmath.exp(-k_ * ti) / v for ti in map(mpmath.mpf, TIMES)]
        else:
            truth = [dose * ka_ / (v * (ka_ - k_)) * (mpmath.exp(-k_ * ti) - mpmath.exp(-ka_ * ti))
                     for ti in map(mpmath.mpf, TIMES)]
        assert rel_err(c[0], np.array([float(x) for x in truth])) < 1e-13


@pytest.mark.parametrize("ncmt", [1, 2, 3])
@pytest.mark.parametrize("route", ROUTES)
def test_single_dose_vs_matrix_exponential(ncmt, route):
    oral = route == "oral"
    dose = route_dose(route, 1.0, 100.0)
    c = conc([dict(doses=[dose], obs=TIMES)] * 2, [P_A, P_B], ncmt, oral)
    for i, p in enumerate((P_A, P_B)):
        truth = expm_conc(ncmt, oral, p, [dose], TIMES)
        mask = np.array(TIMES) >= 1.0  # an observation at the dose time sees a bolus (dose record first)
        assert rel_err(c[i][mask], truth[mask]) < 1e-10
        assert (c[i][~mask] == 0).all()


def test_macro_constants_vs_eigen():
    for p, ncmt in itertools.product((P_A, P_B, *P_SS), (1, 2, 3)):
        lam, a = macro_constants({k: torch.tensor(p[k], dtype=DT) for k in NAMES[ncmt]}, ncmt)
        k, c = rate_matrix(ncmt, False, p)
        ev = np.sort(-np.linalg.eigvals(k).real)[::-1]
        assert rel_err(lam.numpy(), ev) < 1e-13
        assert abs(float(a.sum()) * p["v"] - 1) < 1e-13  # unit bolus: C(0) = 1/V
    # widely separated phases: every root accurate relative to itself (50-digit roots of the characteristic cubic)
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    for p in (dict(cl=0.01, v=1.0, q=50.0, vp=2.0, q2=0.02, vp2=500.0), P_B,
              dict(cl=100.0, v=1.0, q=0.001, vp=1.0, q2=1e-4, vp2=1.0)):
        lam, a = macro_constants({k: torch.tensor(v, dtype=DT) for k, v in p.items()}, 3)
        m = {k: mpmath.mpf(v) for k, v in p.items()}
        k10, k12, k13 = m["cl"] / m["v"], m["q"] / m["v"], m["q2"] / m["v"]
        k21, k31 = m["q"] / m["vp"], m["q2"] / m["vp2"]
        a2 = k10 + k12 + k13 + k21 + k31
        a1 = k10 * k21 + k10 * k31 + k21 * k31 + k12 * k31 + k13 * k21
        roots = sorted((r.real for r in mpmath.polyroots([1, -a2, a1, -k10 * k21 * k31], maxsteps=200, extraprec=200)),
                       reverse=True)
        assert rel_err(lam.numpy(), np.array([float(r) for r in roots])) < 1e-14
        coef = [(k21 - r) * (k31 - r) / mpmath.fprod(o - r for o in roots if o != r) / m["v"] for r in roots]
        coef = np.array([float(x) for x in coef])
        assert np.abs(a.numpy() - coef).max() < 1e-15 * np.abs(coef).sum()
        # a nearly decoupled peripheral (k31 − λ ≈ 1e-5·k31) costs digits in its tiny coefficient only
        assert rel_err(a.numpy(), coef) < 1e-10


# ---------------------------------------------------------------------------------------------------- 2. superposition


@pytest.mark.parametrize("ncmt", [1, 2, 3])
@pytest.mark.parametrize("route", ROUTES + ("mixed",))
def test_superposition(ncmt, route):
    oral = route in ("oral", "mixed")
    routes = ["bolus", "oral", "infusion"] if route == "mixed" else [route] * 3
    doses = [route_dose(r, t, a) for r, t, a in zip(routes, (0.0, 7.0, 19.0), (100.0, 60.0, 80.0))]
    obs = [0.5, 3.0, 7.5, 8.0, 12.0, 19.5, 21.0, 30.0, 72.0]
    subjects = [dict(doses=doses, obs=obs)] + [dict(doses=[d], obs=obs) for d in doses]
    c = conc(subjects, [P_A] * 4, ncmt, oral)
    assert rel_err(c[0], c[1:].sum(0)) < 1e-13
    assert rel_err(c[0], expm_conc(ncmt, oral, P_A, doses, obs)) < 1e-10


# ---------------------------------------------------------------------------------------------------- 3. steady state

SS_ROUTES = ("bolus", "infusion", "long_infusion", "oral")


def ss_dose(route: str, time: float, **kw) -> dict:
    if route == "infusion":
        return dict(time=time, amt=100.0, rate=25.0, **kw)  # 4 h of a 12 h interval
    if route == "long_infusion":
        return dict(time=time, amt=100.0, rate=100.0 / 30.0, **kw)  # 30 h: three infusions overlap
    return dict(time=time, amt=100.0, route=int(route == "oral"), **kw)


@pytest.mark.parametrize("ncmt", [1, 2, 3])
@pytest.mark.parametrize("route", SS_ROUTES)
def test_steady_state_equals_repeated_doses(ncmt, route):
    oral, tau, t0 = route == "oral", 12.0, 600.0
    obs = [t0 + x for x in (0.5, 2.0, 3.9, 4.1, 6.0, 11.99, 12.0, 15.0, 29.0, 31.0, 60.0)]
    ss = dict(doses=[ss_dose(route, t0, ss=1, ii=tau)], obs=obs)
    repeated = dict(doses=[ss_dose(route, t0 - m * tau) for m in range(50)], obs=obs)
    c = conc([ss, repeated] * 2, [P_SS[0]] * 2 + [P_SS[1]] * 2, ncmt, oral)
    assert rel_err(c[0], c[1]) < 1e-10 and rel_err(c[2], c[3]) < 1e-10
    truth = expm_repeated(ncmt, oral, P_SS[0], ss_dose(route, 0.0), tau, 50, [t - t0 for t in obs])
    assert rel_err(c[0], truth) < 1e-8


@pytest.mark.parametrize("ncmt", [1, 3])
@pytest.mark.parametrize("route", SS_ROUTES)
def test_steady_state_reset_and_add(ncmt, route):
    oral, tau = route == "oral", 12.0
    first = route_dose("oral" if oral else "bolus", 0.0, 80.0)
    obs = [5.0, 20.0, 24.0, 25.0, 31.0, 50.0]
    subjects = [
        dict(doses=[first, ss_dose(route, 24.0, ss=1, ii=tau)], obs=obs),  # SS=1: the first dose stops counting
        dict(doses=[ss_dose(route, 24.0, ss=1, ii=tau)], obs=obs),
        dict(doses=[first, ss_dose(route, 24.0, ss=2, ii=tau)], obs=obs),  # SS=2: added to the current state
        dict(doses=[first], obs=obs),
    ]
    c = conc(subjects, [P_SS[0]] * 4, ncmt, oral)
    before = np.array(obs) < 24.0
    assert rel_err(c[0][~before], c[1][~before]) < 1e-14
    assert rel_err(c[0][before], c[3][before]) < 1e-14  # observations before the SS=1 record see the old epoch
    assert rel_err(c[2], c[1] + c[3]) < 1e-13


def test_steady_state_auc_is_dose_over_cl():
    """AUC over one interval at steady state = F·dose/CL (linear PK), by Simpson on a fine grid."""
    grid = list(np.linspace(0.0, 12.0, 1201))
    for ncmt, route in itertools.product((1, 2, 3), SS_ROUTES):
        oral = route == "oral"
        p = dict(P_SS[1], f=0.7)
        c = conc([dict(doses=[ss_dose(route, 0.0, ss=1, ii=12.0)], obs=grid)], [p], ncmt, oral)[0]
        auc = scipy.integrate.simpson(c, x=np.array(grid))
        assert abs(auc / (0.7 * 100.0 / p["cl"]) - 1) < 1e-6, (ncmt, route)


# ------------------------------------------------------------------------------------------------ 4. lag, F, modelled


@pytest.mark.parametrize("ncmt", [1, 2, 3])
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("ss", [0, 1])
def test_lag_and_bioavailability(ncmt, route, ss):
    oral = route == "oral"
    obs = [0.3, 1.0, 1.5, 2.0, 3.0, 6.0, 14.0, 20.0]
    kw = dict(ss=1, ii=12.0) if ss else {}
    lagged = dict(doses=[route_dose(route, 0.5, 100.0, **kw)], obs=obs)
    c = conc([lagged], [dict(P_A, f=0.6, tlag=0.7)], ncmt, oral)[0]
    # F scales the amount; a data infusion keeps its rate, so lasts F times as long
    shifted = route_dose(route, 1.2, 60.0, **kw)
    if route == "infusion":
        shifted["rate"] = 100.0 / 2.5
    ref = conc([dict(doses=[shifted], obs=obs)], [P_A], ncmt, oral)[0]
    assert rel_err(c, ref) < 1e-13
    assert (c[np.array(obs) < 1.2] == 0).all()


@pytest.mark.parametrize("ncmt", [1, 2, 3])
def test_modelled_duration_and_rate(ncmt):
    obs = [0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0]
    p = dict(P_A, f=0.8, dur=2.5, rate=30.0)
    c = conc([dict(doses=[dict(time=0.0, amt=100.0, rate=-2.0)], obs=obs),
              dict(doses=[dict(time=0.0, amt=100.0, rate=-1.0)], obs=obs)], [p, p], ncmt, False)
    # −2: duration dur, rate F·amt/dur; −1: rate R, duration F·amt/R
    assert rel_err(c[0], expm_conc(ncmt, False, P_A, [dict(time=0.0, amt=80.0, rate=80.0 / 2.5)], obs)) < 1e-10
    assert rel_err(c[1], expm_conc(ncmt, False, P_A, [dict(time=0.0, amt=80.0, rate=30.0)], obs)) < 1e-10


# ---------------------------------------------------------------------------------------------------- 5. ordering


def test_ordering_same_time_and_resets():
    p = [dict(cl=2.0, v=10.0)] * 3
    same = [dict(doses=[dict(time=5.0, amt=100.0)], obs=[5.0, 6.0]),
            dict(doses=[dict(time=5.0, amt=100.0, obs_first=True)], obs=[5.0, 6.0]),
            dict(doses=[dict(time=0.0, amt=100.0), dict(time=20.0, amt=50.0)], obs=[10.0, 16.0, 20.0, 22.0],
                 resets=[15.0])]
    c = conc(same, p, 1, False)
    assert c[0, 0] == pytest.approx(10.0, rel=1e-15)  # dose record first: seen at Δ = 0
    assert c[1, 0] == 0.0 and c[1, 1] == pytest.approx(10.0 * math.exp(-0.2), rel=1e-14)
    assert c[2, 0] == pytest.approx(10.0 * math.exp(-2.0), rel=1e-14)
    assert c[2, 1] == 0.0  # reset at 15 cuts the first dose
    assert c[2, 2] == pytest.approx(5.0, rel=1e-15) and c[2, 3] == pytest.approx(5.0 * math.exp(-0.4), rel=1e-14)
    # lag: the dose record precedes the observation, but its effect starts only at t + tlag (seen at exactly t + tlag)
    c = conc([dict(doses=[dict(time=5.0, amt=100.0)], obs=[5.0, 5.5, 6.0, 7.0])], [dict(cl=2.0, v=10.0, tlag=1.0)],
             1, False)[0]
    assert c[0] == 0.0 and c[1] == 0.0 and c[2] == pytest.approx(10.0, rel=1e-15)


def test_errors():
    ev = make_events([dict(doses=[dict(time=0.0, amt=10.0, rate=5.0, route=1)], obs=[1.0])])
    p = params_for([P_A], 1, True)
    with pytest.raises(ModelSpecError, match="depot"):
        concentration(p, ev, 1, True)
    ev = make_events([dict(doses=[dict(time=0.0, amt=10.0, route=1)], obs=[1.0])])
    with pytest.raises(ModelSpecError, match="oral"):
        concentration(params_for([P_A], 1, False), ev, 1, False)
    ev = make_events([dict(doses=[dict(time=0.0, amt=10.0, rate=-2.0)], obs=[1.0])])
    with pytest.raises(ModelSpecError, match="dur"):
        concentration(params_for([P_A], 1, False), ev, 1, False)
    with pytest.raises(ModelSpecError, match="vp"):
        concentration(params_for([P_A], 1, False), ev, 2, False)
    with pytest.raises(ModelSpecError, match="ncmt"):
        concentration(params_for([P_A], 1, False), ev, 4, False)


# ---------------------------------------------------------------------------------------------------- 6. gradients


def grad_case(route: str, ss: int) -> tuple[list[dict], tuple[str, ...]]:
    """Two subjects; every dose kind of the route, with and without SS."""
    obs = [0.9, 2.2, 4.0, 7.5, 13.0]
    kw = dict(ss=ss, ii=6.0) if ss else {}
    if route == "infusion":
        doses = [dict(time=0.0, amt=50.0, rate=20.0, **kw), dict(time=0.5, amt=40.0, rate=-2.0, **kw),
                 dict(time=1.0, amt=30.0, rate=-1.0, **kw)]
        extra = ("f", "tlag", "dur", "rate")
    else:
        doses = [dict(time=0.0, amt=50.0, route=int(route == "oral"), **kw), dict(time=3.0, amt=30.0)]
        extra = ("f", "tlag")
    if ss == 2:
        doses = [dict(time=-1.0, amt=20.0, route=int(route == "oral"))] + doses[:1] + doses[1:]
    subj = [dict(doses=doses, obs=obs), dict(doses=doses[:1], obs=obs[:3])]
    return subj, extra


@pytest.mark.parametrize("ncmt", [1, 2, 3])
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("ss", [0, 1, 2])
def test_gradcheck(ncmt, route, ss):
    oral = route == "oral"
    subj, extra = grad_case(route, ss)
    ev = make_events(subj)
    base = dict(P_A, f=0.8, tlag=0.3, dur=7.0 if ss else 2.0, rate=15.0)  # dur 7 > ii 6: overlapping at SS
    names = NAMES[ncmt] + (("ka",) if oral else ()) + extra
    vals = [torch.tensor([[base[k]], [base[k] * 1.1]], dtype=DT, requires_grad=True) for k in names]

    def fn(*xs):
        return concentration(dict(zip(names, xs)), ev, ncmt, oral)

    assert torch.autograd.gradcheck(fn, vals, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("ss", [0, 1])
def test_gradcheck_ka_equal_to_elimination(ss):
    """At ka = k exactly the oral solution is a limit; value and gradient stay exact (no 0/0)."""
    ev = make_events([dict(doses=[dict(time=0.0, amt=100.0, route=1, ss=ss, ii=12.0)], obs=[1.0, 5.0, 30.0])])
    vals = [torch.tensor([[x]], dtype=DT, requires_grad=True) for x in (1.5, 12.0, 0.125)]
    fn = lambda *xs: concentration(dict(zip(("cl", "v", "ka"), xs)), ev, 1, True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, vals, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_torch_func_jacobian():
    """Works under torch.func transforms (per-subject Jacobians for FOCE-type linearisation)."""
    ev = make_events([dict(doses=[dict(time=0.0, amt=100.0, route=1, ss=1, ii=12.0),
                                  dict(time=3.0, amt=20.0, rate=10.0)], obs=[1.0, 5.0, 30.0])] * 2)
    base = params_for([P_A, P_B], 3, True)
    jac = torch.func.jacrev(lambda cl: concentration({**base, "cl": cl}, ev, 3, True))(base["cl"])
    cl = base["cl"].clone().requires_grad_(True)
    ref = torch.stack([torch.autograd.grad(concentration({**base, "cl": cl}, ev, 3, True)[i, j], cl)[0]
                       for i in range(2) for j in range(3)]).reshape(2, 3, 2, 1)
    torch.testing.assert_close(jac, ref, rtol=1e-14, atol=0)


def test_gradcheck_per_observation_params():
    subj, _ = grad_case("oral", 1)
    ev = make_events(subj)
    j = ev.obs_time.shape[1]
    names = NAMES[2] + ("ka", "f")
    vals = [(torch.tensor([[P_A.get(k, 0.9)]], dtype=DT) * (1 + 0.05 * torch.arange(j, dtype=DT))).expand(2, j)
            .clone().requires_grad_(True) for k in names]
    assert torch.autograd.gradcheck(lambda *xs: concentration(dict(zip(names, xs)), ev, 2, True), vals)
    # a per-observation parameter applies to the whole dose history of its observation
    c = concentration(dict(zip(names, vals)), ev, 2, True)
    for jj in range(j):
        cj = concentration({k: v[:, jj:jj + 1] for k, v in zip(names, vals)}, ev, 2, True)
        torch.testing.assert_close(c[:, jj], cj[:, jj], rtol=1e-15, atol=0)


# ---------------------------------------------------------------------------------------------------- 7. padding


@pytest.mark.parametrize("ncmt", [1, 2, 3])
def test_batch_with_padding(ncmt):
    subjects = [
        dict(doses=[dict(time=0.0, amt=100.0, route=1), dict(time=12.0, amt=50.0, rate=25.0)], obs=[1.0, 5.0, 13.0]),
        dict(doses=[dict(time=0.0, amt=100.0, ss=1, ii=12.0, rate=10.0)], obs=[0.5, 1.0, 2.0, 6.0, 11.0, 30.0]),
        dict(doses=[dict(time=2.0, amt=70.0, route=1, ss=1, ii=8.0), dict(time=3.0, amt=30.0),
                    dict(time=9.0, amt=20.0, rate=-2.0)], obs=[2.5]),
        dict(doses=[dict(time=0.0, amt=10.0)], obs=[]),
    ]
    plist = [dict(P_A, f=0.9, tlag=0.2, dur=1.5), dict(P_B, f=1.0, tlag=0.0, dur=2.0),
             dict(P_SS[0], f=0.5, tlag=0.4, dur=3.0), dict(P_SS[1], f=1.0, tlag=0.0, dur=1.0)]
    ev = make_events(subjects)
    p = params_for(plist, ncmt, True)
    p = {k: v.clone().requires_grad_(True) for k, v in p.items()}
    c = concentration(p, ev, ncmt, True)
    assert (c[~ev.obs_mask] == 0).all()
    for i, s in enumerate(subjects):
        one = concentration({k: v[i:i + 1] for k, v in p.items()}, make_events([s]), ncmt, True)
        k = len(s["obs"])
        torch.testing.assert_close(c[i, :k], one[0, :k], rtol=1e-15, atol=0)
    # padding is never looked at: hostile padded values (far times, SS with negative II, modelled rates) change nothing
    c.sum().backward()
    assert all(torch.isfinite(v.grad).all() for v in p.values())
    far = dict(obs_time=torch.where(ev.obs_mask, ev.obs_time, torch.full_like(ev.obs_time, -1e9)),
               dose_time=torch.where(ev.dose_mask, ev.dose_time, torch.full_like(ev.dose_time, 1e9)),
               dose_ii=torch.where(ev.dose_mask, ev.dose_ii, torch.full_like(ev.dose_ii, -5.0)),
               dose_rate=torch.where(ev.dose_mask, ev.dose_rate, torch.full_like(ev.dose_rate, -2.0)),
               dose_ss=torch.where(ev.dose_mask, ev.dose_ss, torch.full_like(ev.dose_ss, 1)))
    ev2 = Events(**{**ev.__dict__, **far})
    p2 = {k: v.detach().clone().requires_grad_(True) for k, v in p.items()}
    c2 = concentration(p2, ev2, ncmt, True)
    torch.testing.assert_close(c2, c.detach(), rtol=0, atol=0)
    c2.sum().backward()
    assert all(torch.isfinite(v.grad).all() for v in p2.values())


def test_float32_and_scalar_params():
    subjects = [dict(doses=[dict(time=0.0, amt=100.0, route=1, ss=1, ii=12.0)], obs=[1.0, 4.0, 11.0])]
    ev = make_events(subjects)
    p64 = params_for([P_SS[0]], 3, True)
    c64 = concentration(p64, ev, 3, True)
    c32 = concentration({k: v.float() for k, v in p64.items()}, ev.to(dtype=torch.float32), 3, True)
    assert c32.dtype == torch.float32
    assert rel_err(c32.numpy(), c64.numpy()) < 1e-4
    scal = concentration({k: torch.tensor(float(v), dtype=DT) for k, v in p64.items()}, ev, 3, True)
    torch.testing.assert_close(scal, c64, rtol=1e-15, atol=0)
    flat = concentration({k: v[:, 0] for k, v in p64.items()}, ev, 3, True)  # [N] means per subject
    torch.testing.assert_close(flat, c64, rtol=0, atol=0)


def test_unused_parameters_stay_in_graph():
    """ka without depot doses and dur/rate without infusions get a zero gradient, not 'unused in the graph'."""
    ev = make_events([dict(doses=[dict(time=0.0, amt=100.0)], obs=[1.0, 2.0])])
    p = {k: v.requires_grad_(True) for k, v in params_for([dict(P_A, dur=2.0, rate=3.0, f=0.5, tlag=0.1)], 2,
                                                           True).items()}
    grads = dict(zip(p, torch.autograd.grad(concentration(p, ev, 2, True).sum(), list(p.values()))))
    assert all(float(grads[k].abs().sum()) == 0 for k in ("ka", "dur", "rate"))
    assert all(float(grads[k].abs().sum()) > 0 for k in ("cl", "v", "q", "vp", "f", "tlag"))


# ------------------------------------------------------------------------------------- 8. dose-anchored evaluation


def _anchored_cases():
    """Multiple-dose subjects (fewer dose slots than observations) mixing bolus and depot doses, SS=1 resets, SS=2
    additions, EVID 3 resets, a dose at an observation's time (dose first and observation first), lag and F."""
    obs = [0.0, 0.5, 2.0, 6.0, 12.0, 13.0, 24.0, 25.0, 30.0, 48.0, 49.5, 60.0, 72.0, 96.0]
    return [
        dict(doses=[dict(time=12.0 * k, amt=100.0, route=1) for k in range(5)], obs=obs),
        dict(doses=[dict(time=0.0, amt=100.0), dict(time=12.0, amt=60.0, route=1),
                    dict(time=24.0, amt=80.0, route=1, ss=1, ii=12.0), dict(time=48.0, amt=50.0, obs_first=True)],
             obs=obs),
        dict(doses=[dict(time=0.0, amt=70.0, route=1), dict(time=6.0, amt=70.0, route=1, ss=2, ii=6.0),
                    dict(time=30.0, amt=40.0)], obs=obs, resets=[25.0]),
        dict(doses=[dict(time=24.0, amt=30.0, route=1, ss=1, ii=24.0), dict(time=48.0, amt=30.0, route=1)],
             obs=obs[:9]),
    ]


@pytest.mark.parametrize("ncmt", [1, 2, 3])
@pytest.mark.parametrize("extra", [(), ("f", "tlag")])
def test_anchored_equals_per_observation_superposition(ncmt, extra, monkeypatch):
    """The O(D² + J) dose-anchored evaluation (used when there are fewer dose slots than observations and the
    parameters are per subject) equals the O(J·D) per-observation one: values, gradients and second derivatives
    to rounding (1e-12 relative; the two sum the same terms in a different order)."""
    import nlmefit.pk.closed_form as cf

    subjects = _anchored_cases()
    plist = [dict(P_A, f=0.8, tlag=0.7), dict(P_B, f=0.6, tlag=1.3), dict(P_SS[0], f=1.0, tlag=0.5),
             dict(P_SS[1], f=0.9, tlag=0.0)]
    names = NAMES[ncmt] + ("ka",) + extra
    ev = make_events(subjects)
    d = cf._design(ev, DT)
    p0 = {k: v for k, v in params_for(plist, ncmt, True).items() if k in names}
    assert cf._anchored_applies(p0, d, ev)

    def derivs(fast: bool):
        monkeypatch.setattr(cf, "_anchored_applies", (lambda *a: True) if fast else (lambda *a: False))
        p = {k: v.clone().requires_grad_(True) for k, v in p0.items()}
        c = concentration(p, make_events(subjects), ncmt, True)
        w = torch.linspace(0.5, 1.5, c.numel(), dtype=DT).reshape(c.shape)
        g = torch.autograd.grad((c * w).sum(), list(p.values()), create_graph=True)
        gsum = sum(x.sum() for x in g)
        h = torch.autograd.grad(gsum, list(p.values()))
        return c.detach(), torch.cat([x.detach().flatten() for x in g]), torch.cat([x.flatten() for x in h])

    c_fast, g_fast, h_fast = derivs(True)
    c_slow, g_slow, h_slow = derivs(False)
    assert (c_slow > 0).any() and (c_slow == 0).any()  # the cases reach both: counted doses and none
    torch.testing.assert_close(c_fast, c_slow, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g_fast, g_slow, rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(h_fast, h_slow, rtol=1e-10, atol=1e-12)


def test_anchored_used_only_where_it_applies():
    import nlmefit.pk.closed_form as cf

    subjects = _anchored_cases()
    ev = make_events(subjects)
    p = params_for([P_A] * 4, 2, True)
    d = cf._design(ev, DT)
    assert cf._anchored_applies(p, d, ev)
    j = ev.obs_time.shape[1]
    per_obs = {**p, "cl": p["cl"].expand(4, j)}
    assert not cf._anchored_applies(per_obs, d, ev)  # per-observation parameters: the general path
    inf = make_events(subjects + [dict(doses=[dict(time=0.0, amt=10.0, rate=5.0)], obs=[1.0])])
    assert not cf._anchored_applies(p, cf._design(inf, DT), inf)  # infusions: the general path
    one = make_events([dict(doses=[dict(time=0.0, amt=10.0)], obs=[1.0, 2.0, 3.0])])
    assert not cf._anchored_applies(p, cf._design(one, DT), one)  # one dose slot: nothing to gain
    shuffled = Events(**{**ev.__dict__, "dose_time": ev.dose_time.flip(-1)})
    assert not cf._anchored_applies(p, cf._design(shuffled, DT), shuffled)  # slots out of time order
