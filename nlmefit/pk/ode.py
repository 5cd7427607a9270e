"""The ODE path of the pharmacokinetics: a user right-hand side integrated over the dose/observation events.

An :class:`OdeSystem` is a right-hand side ``rhs(t [N], x [N, S], params {name: [N]}) -> dx/dt [N, S]`` plus the
roles of its states (which one receives oral doses, which one is dosed intravenously and observed, which parameter
is its volume). :func:`solve` integrates it for a batch of subjects and returns concentrations at the observation
times, ``[N, J]``, exactly like the closed forms of :mod:`nlmefit.pk.closed_form`.

Method
------
Every subject's events — dose effects (dose time + ``tlag``), infusion ends, observations and the dose *records*
that may start a new reset epoch — are sorted into one list per subject (ties as in NONMEM: by the records' ``seq``;
a lagged dose effect precedes records at its effect time; infusion ends come last) and padded to a common length E
with zero-length segments. The Python loop runs over the event index k, never over subjects: segment k is integrated
for all subjects at once in rescaled time s ∈ [0, 1],

    dx/ds = Δ_k · (rhs(t_{k-1} + s·Δ_k, x) + u_k),

with Δ_k = t_k − t_{k−1} per subject (0 for padding: no change) and u_k the infusion input rates active on the
segment. Because the event times enter only through Δ_k and t_{k−1}, gradients with respect to ``tlag``, ``dur`` and
``rate`` flow through the solver like those of any other parameter. Between segments the bolus doses are added
(amount · ``f`` into the route's state), infusion rates are switched on and off, reset epochs (EVID 3/4, SS=1) set the
state to zero, and the central amount is recorded at observation events.

Steady state (``dose_ss`` 1: reset the state to the periodic one, 2: add it) needs the periodic pre-dose state x* of
the interval map Φ: x ↦ state one dosing interval after (x + dose), evaluated by integrating one interval from the
dose time (batched over subjects; infusions longer than the interval overlap as they would after infinitely many
doses, and the still-running earlier infusions get their own end events). The iteration stops when the pre-dose
state changes by less than 1e-12 relative over one interval (at most 1000 intervals). Plain repetition
x ← Φ(x) contracts by e^{−λ_min·II} per interval — hundreds of intervals for a slow terminal phase — so each
interval is used as a Newton step instead: ∂Φ/∂x comes from central differences computed *inside the same batched
solve* (the 2S perturbed copies share the adaptive steps of the base copy, so they difference one smooth discrete
map: ~1e-9 relative). Newton is exact after one step for a linear system and converges quadratically otherwise; a
plain fixed-point step is taken when a Newton step fails to reduce the change. The iteration runs without autograd;
one last differentiable Newton step from the converged state, x* = x₀ + (I − J)⁻¹(Φ(x₀; θ) − x₀), carries the
implicit-function-theorem derivative dx*/dθ = (I − J)⁻¹ ∂Φ/∂θ. A subject whose state grows without bound (e.g. a
Michaelis–Menten dose rate above vm) has no steady state: its concentrations are NaN, with a warning.

A lag time shifts dose effects, not the records: an SS=1 record resets the state at its own time, so an
observation between the record and the lagged dose sees 0 (as in :mod:`nlmefit.pk.closed_form`).

Why torchdiffeq rather than a hand-written integrator
---------------------------------------------------
* **Tolerance control.** ``odeint`` with adaptive Dormand–Prince 5(4) (``dopri5``) controls the local error against
  ``atol + rtol·|x|``; with ``options=dict(norm=max-norm)`` the step is accepted only if *every* state of *every*
  subject meets the tolerance (the default RMS norm would let one badly resolved subject hide among many easy ones).
  That is what makes the ODE path agree with the closed forms to 1e-6 relative and better. A fixed-step RK4 would
  need the step size guessed per problem and gives no error guarantee.
* **Batched.** The state is one ``[N, S]`` tensor; a step costs the same number of Python operations for 1 or
  100 000 subjects, and runs on GPU unchanged. The shared step size is driven by the hardest subject, which is the
  price of batching; zero-length (padding) segments cost nothing.
* **Differentiable.** Forward sensitivities by default (below); the ``"autograd"`` mode differentiates through the
  solver's operations (discretise-then-differentiate: the exact gradient of the computed solution). The adjoint
  method would re-integrate backwards (unstable for strongly damped PK systems).
* **Maintained.** torchdiffeq is the reference ODE library for PyTorch (stable API, used by many packages), offers
  other adaptive solvers by name (``method=``: ``bosh3``, ``tsit5``, ...); it has no implicit solver, hence the
  Rosenbrock fallback below.

Tolerances, failures, stiffness, derivatives (issue 10)
--------------------------------------------------------
* **Defaults rtol 1e-6, atol 1e-8** — rxode2's ``rxSolve`` defaults (liblsoda; NONMEM ADVAN13 TOL=6 is ~1e-6
  relative). ``atol`` is taken relative to each subject's largest dose amount (so the solve does not depend on the
  amount unit; sensitivity columns get atol/|p_a| and atol/|p_a p_b|). Tighten with ``rtol=``/``atol=`` here or
  ``OdeStructure.with_tolerance``; the test suite's reference solves use 1e-10/1e-12.
* **No exception reaches the caller.** torchdiffeq's errors (``underflow in dt``, the step limit of 500 explicit
  steps per segment, non-finite states) send the segment — and, sticky, the rest of that solve — to the batched
  L-stable Rosenbrock 2(3) solver of :mod:`nlmefit.pk.ode_stiff` (per-subject steps, exact state Jacobian by
  forward AD). Subjects that fail there too, or have non-finite parameters, get NaN concentrations while the others
  are solved: the FOCE-I objective is then not finite, the η-mode search stops that subject, and the outer line
  search backs off (the classical estimator maps a non-finite objective to 1e20). ``stiff=True`` uses Rosenbrock
  from the start, ``stiff=False`` never (failure → NaN).
* **Forward sensitivities** (:mod:`nlmefit.pk.ode_sens`, default ``sensitivities="forward"``): when autograd is on
  and parameters require grad (and none of ``f``, ``tlag``, ``dur``, ``rate`` does, and there is no SS dose), the
  solve integrates the state with its first and second parameter sensitivities and returns a Taylor surrogate whose
  value, gradient and Hessian are exact (to the tolerance) and whose third derivatives are 0; no backward pass runs
  through the solver. FOCE-I needs second order: the η-Hessian of the mode search and the θ-derivative of ∂f/∂η in
  the outer gradient (checked: double-backward through the solve is what the estimators do). Otherwise autograd
  through the steps, as before.

Profile (2 shared cores, OMP_NUM_THREADS=1, float64; FOCE-I at the initial values, ``1cmt_oral_mm``):

=================================  =====================================  ===================================
                                   before (autograd, rtol 1e-8)           after (forward sens., rtol 1e-6)
=================================  =====================================  ===================================
theophylline (12 subjects)         η-mode search 53.6 s (110 segment      η-mode search 14.9 s; −2LL + grad
                                   solves); −2LL 19.6 s + backward 8.5 s  2.2 s (solve 1.4 s, backward 0.008 s)
                                   (91 % of it in autograd backward       OFV 416.05786153 (before
                                   passes: Jacobians by double vjp,       416.05786144); 117 dopri5 steps per
                                   Hessian rows); 326 dopri5 steps per    solve, 5.5 ms a step (6 augmented
                                   solve at ~3 ms a step                  rhs calls at ~0.6 ms)
Bolus_1CPTMM SD (20 subjects)      η-mode search 52.1 s; −2LL 8.0 s +     see docs/models.md
                                   backward 3.6 s
=================================  =====================================  ===================================

The first and second directional derivatives of the user's right-hand side come from one single-level
``torch.autograd.forward_ad`` pass on a batch of (P + 2M)·N rows (0.3 ms; nested ``torch.func.jvp`` + ``vmap`` took
3.5–4.4 ms a call, plain rhs 0.07 ms). What is left is the per-step Python overhead of the explicit solver over
many short segments (one ``odeint`` per observation interval). Next: one solve per dose interval with per-subject
output times and per-subject steps (torchode's design; here the shared max-norm step costs arithmetic, not Python
calls, so it matters less on CPU than the number of segments).

Earlier measurement (tight tolerances): rtol 1e-10 / atol 1e-12 gives the linear 1–3-compartment systems to ~1e-10
relative against matrix exponentials and closed forms (rtol 1e-8: ~2e-9); ``dopri8`` takes fewer steps but its error
estimate is unreliable there (1e-7 error at rtol 1e-10), hence ``dopri5``.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torchdiffeq import odeint

from nlmefit.errors import ModelSpecError
from nlmefit.pk.events import Events
from nlmefit.pk.ode_sens import SensLayout, augmented_rhs, taylor_surrogate
from nlmefit.pk.ode_stiff import full_jacobian_fd, rosenbrock23, state_jacobian

__all__ = ["OdeSystem", "solve", "ADAPTIVE_METHODS", "RTOL", "ATOL"]

#: torchdiffeq methods with error control (those accept the max-norm option)
ADAPTIVE_METHODS = frozenset({"dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun", "tsit5"})

_OBS, _REC, _DOSE, _END = 0, 1, 2, 3
_EVENT_PARAMS = ("f", "tlag", "dur", "rate")
_MAX_STEPS = 500  # explicit steps per segment before the segment counts as stiff
#: default tolerances (rxode2's rtol 1e-6, atol 1e-8; atol relative to each subject's largest dose amount)
RTOL, ATOL = 1e-6, 1e-8
_SS_TOL = 1e-12
_SS_MAX_INTERVALS = 1000


@dataclass(frozen=True)
class OdeSystem:
    """A PK right-hand side and the roles of its states.

    ``rhs(t [N], x [N, S], params {name: [N]}) -> dx/dt [N, S]`` (amounts per time unit). Doses with route 1 (oral)
    go into ``depot`` (an error for a system without one, as for the closed forms), route-0 doses (bolus and
    infusion) into ``central``; the concentration is ``x[:, central] /
    params[volume]``. ``params`` lists the parameter names the right-hand side reads (documentation and checks).
    """

    n_states: int
    rhs: Callable[[torch.Tensor, torch.Tensor, Mapping[str, torch.Tensor]], torch.Tensor]
    depot: int | None
    central: int
    volume: str = "v"
    names: tuple[str, ...] = ()
    params: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.n_states < 1:
            raise ModelSpecError(f"an ODE system needs at least one state, got n_states={self.n_states}")
        for role, idx in (("central", self.central), ("depot", self.depot)):
            if idx is not None and not 0 <= idx < self.n_states:
                raise ModelSpecError(f"{role} state index {idx} is outside 0..{self.n_states - 1}")
        if not self.names:
            object.__setattr__(self, "names", tuple(f"x{i}" for i in range(self.n_states)))
        elif len(self.names) != self.n_states:
            raise ModelSpecError(f"{len(self.names)} state names for {self.n_states} states")


def _maxnorm(t: torch.Tensor) -> torch.Tensor:
    return t.abs().max()


def _per_subject(params: Mapping[str, torch.Tensor], n: int, dtype, device) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in params.items():
        v = torch.as_tensor(v).to(dtype=dtype, device=device)
        if v.dim() == 2 and v.shape[1] == 1:
            v = v[:, 0]
        if v.dim() > 1 or (v.dim() == 1 and v.shape[0] not in (1, n)):
            raise ModelSpecError(f"ODE parameter {k!r} must be per subject ([N] or [N, 1] with N={n}), "
                                 f"got shape {tuple(v.shape)}")
        out[k] = v.expand(n) if v.dim() == 0 or v.shape[0] != n else v
    return out


class _Integrator:
    """Integrates segments of per-subject length for the whole batch (rescaled time s ∈ [0, 1]).

    The state is [N, S·K]: K = 1 for the plain solve, 1 + P + M columns per state with forward sensitivities
    (``lay``, see :mod:`nlmefit.pk.ode_sens`). ``atol`` [N, 1] or [N, S·K] (already scaled per subject). A segment
    first goes to torchdiffeq's explicit ``method``; an exception (step underflow, step limit), a non-finite result,
    or ``stiff=True`` sends the whole batch to the batched Rosenbrock solver (:mod:`nlmefit.pk.ode_stiff`, per-subject
    steps); subjects that fail there too (or enter with a non-finite state) come out NaN — never an exception.
    """

    def __init__(self, system: OdeSystem, p: Mapping[str, torch.Tensor], rtol: float, atol, method: str,
                 lay: SensLayout | None = None, stiff: bool | str = "auto"):
        self.system, self.p, self.rtol, self.atol, self.method = system, p, rtol, atol, method
        self.lay, self.stiff = lay, stiff
        self.k = 1 if lay is None else lay.k
        self.width = system.n_states * self.k
        self.options = dict(norm=_maxnorm, max_num_steps=_MAX_STEPS)
        self.n_stiff = 0  # segments that needed the Rosenbrock fallback
        self.n_failed = 0  # subjects set to NaN by a failed solve

    def with_params(self, p: Mapping[str, torch.Tensor], repeat: int) -> _Integrator:
        """The same integrator for ``repeat`` stacked copies of the batch with parameters ``p`` (plain state)."""
        atol = self.atol.repeat(repeat, 1) if torch.is_tensor(self.atol) else self.atol
        return _Integrator(self.system, p, self.rtol, atol, self.method, None, self.stiff)

    def lift(self, v: torch.Tensor) -> torch.Tensor:
        """A state-space vector [N, S] (dose, input rate) as an increment of the integrated state [N, S·K]."""
        if self.k == 1:
            return v
        out = torch.zeros(*v.shape, self.k, dtype=v.dtype, device=v.device)
        out[..., 0] = v
        return out.reshape(v.shape[0], self.width)

    def record(self, x: torch.Tensor) -> torch.Tensor:
        """What an observation keeps of the state: the central amount and its sensitivities, [N, K]."""
        return x.reshape(x.shape[0], self.system.n_states, self.k)[:, self.system.central, :]

    def _rhs(self, t0, delta, u) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """dy/ds on a segment, y [N, S, K] (s a scalar or per subject [N])."""
        rhs, p = self.system.rhs, self.p
        if self.lay is not None:
            return augmented_rhs(rhs, self.lay, p, t0, delta, u.reshape(u.shape[0], -1, self.k)[..., 0])

        def f(s, y):
            return (delta[:, None] * (rhs(t0 + s * delta, y[..., 0], p) + u)).unsqueeze(-1)

        return f

    def _jac(self, t0, delta):
        rhs, p = self.system.rhs, self.p
        s_ = self.system.n_states
        p_rep = {k: v.detach().repeat(s_) for k, v in p.items()}

        def jac(s, y):
            t = (t0 + s * delta).detach().repeat(s_)
            return delta.detach()[:, None, None] * state_jacobian(lambda x: rhs(t, x, p_rep), y[..., 0].detach())

        return jac

    def _explicit(self, f, y0: torch.Tensor) -> torch.Tensor | None:
        n = y0.shape[0]
        s = torch.tensor([0.0, 1.0], dtype=y0.dtype, device=y0.device)

        def flat(t, y):
            return f(t, y.reshape(n, -1, self.k)).reshape(n, -1)

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                y = odeint(flat, y0, s, rtol=self.rtol, atol=self.atol, method=self.method, options=self.options)[-1]
        except (AssertionError, RuntimeError, ValueError, OverflowError, ZeroDivisionError):
            return None
        return y if bool(torch.isfinite(y).all()) else None

    def flow(self, x, u, t0, delta):
        """The state after a segment of length ``delta`` [N] from ``t0`` [N] with constant input ``u`` [N, S·K]."""
        bad = ~torch.isfinite(x).all(1) | self.bad_params
        if bool(bad.any()):  # failed subjects sit the segment out (their zero-length segment costs nothing)
            x = torch.where(bad[:, None], torch.zeros_like(x), x)
            delta = torch.where(bad, torch.zeros_like(delta), delta)
        f = self._rhs(t0, delta, u)
        y = None if self.stiff is True or self.n_stiff else self._explicit(f, x)
        if y is None and self.stiff is not False:
            self.n_stiff += 1  # sticky: the later segments of this solve go to Rosenbrock directly
            n = x.shape[0]
            atol = self.atol.reshape(n, -1, self.k) if torch.is_tensor(self.atol) and self.atol.shape[1] > 1 \
                else (self.atol[:, :, None] if torch.is_tensor(self.atol) else self.atol)
            jac = self._jac(t0, delta) if self.lay is None else (lambda s, y, f=f: full_jacobian_fd(f, s, y))
            y3, ok = rosenbrock23(f, jac, x.reshape(n, -1, self.k), self.rtol, atol)
            y = y3.reshape(n, -1)
            bad = bad | ~ok
        elif y is None:
            bad = torch.ones_like(bad)
            y = x
        if bool(bad.any()):
            self.n_failed = max(self.n_failed, int(bad.sum()))
            y = torch.where(bad[:, None], torch.full_like(y, math.nan), y)
        return y

    @property
    def bad_params(self) -> torch.Tensor:
        """Subjects with a non-finite parameter (their states are NaN, the others are solved)."""
        if not hasattr(self, "_bad_params"):
            n = next(iter(self.p.values())).shape[0] if self.p else 0
            bad = torch.zeros(n, dtype=torch.bool)
            for v in self.p.values():
                bad = bad.to(v.device) | ~torch.isfinite(v.detach())
            self._bad_params = bad
        return self._bad_params


def _periodic(integ: _Integrator, t0, bolus, rate, dur, ii, active, x_like) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-dose periodic state x* = Φ(x*) of repeated doses every ``ii`` (subjects where ``active``; others 0).

    Returns x* [N, S] and ``ok`` [N] (False where no steady state was found; x* is 0 there so that the batch goes on).

    One interval from the dose: bolus ``bolus`` [N, S] at its start; infusions of rate ``rate`` [N, S] (per dose) and
    duration ``dur`` [N] overlap when dur > ii: (K+1) of them run on [0, r), K on [r, ii) with dur = K·ii + r.
    Newton iteration on Φ(x) − x. ∂Φ/∂x is taken by central differences *inside one batched solve*: the 2S
    perturbed copies share the base copy's adaptive steps, so the differences are those of one smooth discrete map
    (error O(h²) + rounding/h, ~1e-9 relative with h = 1e-6·|x|), at the cost of a wider batch rather than S
    backward passes through the solver (several times slower) or forward-mode AD (which falls back to slow
    decompositions in torch).
    """
    n, s_ = x_like.shape
    dt = x_like.dtype
    ii_ = torch.where(active, ii, torch.ones_like(ii))
    k = torch.floor(dur.detach() / ii_)
    r = dur - k * ii_
    d1 = torch.where(active, r, torch.zeros_like(r))
    d2 = torch.where(active, ii_ - r, torch.zeros_like(r))
    u1, u2 = (k + 1)[:, None] * rate, k[:, None] * rate
    bolus = torch.where(active[:, None], bolus, torch.zeros_like(bolus))
    eye = torch.eye(s_, dtype=dt, device=x_like.device).expand(n, s_, s_)
    any1 = bool((d1.detach() > 0).any())

    def phi(ig, x, t0, d1, d2, u1, u2, bolus):
        y = x + bolus
        if any1:
            y = ig.flow(y, u1, t0, d1)
        return ig.flow(y, u2, t0 + d1, d2)

    m = 2 * s_ + 1
    frozen = integ.with_params({k: v.detach().repeat(m) for k, v in integ.p.items()}, m)
    args_rep = [v.detach().repeat(m, *([1] * (v.dim() - 1))) for v in (t0, d1, d2, u1, u2, bolus)]
    dose_scale = (bolus.abs().amax(1) + (u1 * d1[:, None] + u2 * d2[:, None]).abs().amax(1)).detach()
    with torch.no_grad():
        x = torch.zeros(n, s_, dtype=dt, device=x_like.device)
        done, good = ~active, ~active
        prev_rel = torch.full((n,), math.inf, dtype=dt, device=x.device)
        for _ in range(_SS_MAX_INTERVALS):
            h = 1e-6 * torch.maximum(x.abs().amax(1), dose_scale).clamp_min(1e-30)
            hh = h[:, None, None] * eye  # [N, S(perturbation), S]
            xs = torch.cat([x, (x[:, None, :] + hh).transpose(0, 1).reshape(s_ * n, s_),
                            (x[:, None, :] - hh).transpose(0, 1).reshape(s_ * n, s_)])
            ys = phi(frozen, xs, *args_rep)
            y = ys[:n]
            yp = ys[n:n + s_ * n].reshape(s_, n, s_)
            ym = ys[n + s_ * n:].reshape(s_, n, s_)
            jac = ((yp - ym) / (2 * h[None, :, None])).permute(1, 2, 0)  # [N, out, in]
            a = torch.where(active[:, None, None], eye - jac, eye)
            res = y - x
            scale = y.abs().amax(1).clamp_min(torch.finfo(dt).tiny)
            rel = res.abs().amax(1) / scale
            stalled = (rel >= 0.5 * prev_rel) & (rel < 1e3 * max(integ.rtol, _SS_TOL))
            # an accumulation ratio of 1e6 (half-life ~7e5 intervals) means no steady state (e.g. saturated MM)
            diverged = ~torch.isfinite(rel) | (scale > 1e6 * dose_scale.clamp_min(1e-30))
            good = good | (~done & ~diverged & ((rel < _SS_TOL) | stalled))
            done = done | good | diverged
            if bool(done.all()):
                break
            newton_ok = rel <= prev_rel  # else a plain fixed-point step x <- Φ(x)
            step = torch.linalg.solve(a, res.unsqueeze(-1)).squeeze(-1)
            x_new = torch.where(newton_ok[:, None], x + step, y)
            x = torch.where(done[:, None], x, x_new)
            prev_rel = torch.where(done, prev_rel, rel)
    needs_grad = torch.is_grad_enabled() and (
        any(v.requires_grad for v in integ.p.values())
        or any(v.requires_grad for v in (t0, d1, d2, u1, u2, bolus)))
    if needs_grad:  # one differentiable Newton step: dx*/dθ = (I − J)⁻¹ ∂Φ/∂θ (implicit function theorem)
        res = phi(integ, x, t0, d1, d2, u1, u2, bolus) - x
    x_star = x + torch.linalg.solve(a, res.unsqueeze(-1)).squeeze(-1)
    ok = good | ~active
    return torch.where(active[:, None] & ok[:, None], x_star, torch.zeros_like(x_star)), ok


@dataclass(frozen=True)
class _Doses:
    """Per-dose inputs [N, D] of the event loop (f·amt already applied)."""

    bolus: torch.Tensor  # bolus amount (0 for infusions)
    rate: torch.Tensor  # infusion rate (0 for boluses)
    dur: torch.Tensor  # infusion duration (0 for boluses)
    is_inf: torch.Tensor  # bool: an infusion (data rate, modelled rate or modelled duration)
    ss: torch.Tensor  # SS flag (0 off the dose mask)
    ii: torch.Tensor  # dosing interval
    state: torch.Tensor  # index of the state that receives the dose
    t_eff: torch.Tensor  # effect time: dose time + tlag
    n_prior: torch.Tensor  # earlier implied SS infusions still running at an SS dose


@dataclass(frozen=True)
class _Slots:
    """The per-subject event list [N, E] sorted by time and tie, with the permutation that sorted it."""

    perm: torch.Tensor
    t: torch.Tensor  # event times (padding repeats the last valid time)
    delta: torch.Tensor  # segment length ending at each event
    valid: torch.Tensor
    kind: torch.Tensor  # _OBS, _REC, _DOSE or _END
    index: torch.Tensor  # index into the observation or dose arrays


@dataclass(frozen=True)
class _Actions:
    """What happens at each sorted event [N, E]: resets, boluses, rate changes and steady-state doses."""

    di: torch.Tensor  # dose index of the event (0 where none)
    reset: torch.Tensor
    bolus: torch.Tensor
    drate: torch.Tensor
    state: torch.Tensor
    ss: torch.Tensor


def _gather(a: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``a`` [N, K] at ``index`` [N, E] along dim 1 (zeros when K = 0)."""
    return torch.gather(a, 1, index) if a.shape[1] else torch.zeros(index.shape, dtype=a.dtype, device=index.device)


def _check_inputs(system: OdeSystem, p: Mapping[str, torch.Tensor], method: str) -> None:
    """ModelSpecError for a missing volume parameter or a method without error control."""
    if system.volume not in p:
        raise ModelSpecError(f"the ODE system reads its concentration as amount/{system.volume!r}, "
                             f"which is not among the parameters {sorted(p)}")
    if method not in ADAPTIVE_METHODS:
        raise ModelSpecError(f"method {method!r}: the ODE path needs an adaptive torchdiffeq method "
                             f"({sorted(ADAPTIVE_METHODS)}); a fixed-step one would take one step per event segment")


def _infusions(p: Mapping[str, torch.Tensor], dm: torch.Tensor, dr: torch.Tensor,
               amt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rates, durations and the infusion mask [N, D] of data (rate > 0), modelled-rate and modelled-duration doses."""
    data_inf, rate_mod, dur_mod = dm & (dr > 0), dm & (dr == -1), dm & (dr == -2)
    is_inf = data_inf | rate_mod | dur_mod
    if bool(rate_mod.any()) and "rate" not in p:
        raise ModelSpecError("the data has RATE=-1 (modelled rate) but the parameters have no 'rate'")
    if bool(dur_mod.any()) and "dur" not in p:
        raise ModelSpecError("the data has RATE=-2 (modelled duration) but the parameters have no 'dur'")
    ones_d = torch.ones_like(dr)
    rate_d = torch.where(data_inf, dr, ones_d)
    if "rate" in p:
        rate_d = torch.where(rate_mod, p["rate"][:, None].expand_as(dr), rate_d)
    dur_d = amt / rate_d
    if "dur" in p:
        dur_p = p["dur"][:, None].expand_as(dr)
        dur_safe = torch.where(dur_mod, dur_p, ones_d)
        rate_d = torch.where(dur_mod, amt / dur_safe, rate_d)
        dur_d = torch.where(dur_mod, dur_p, dur_d)
    rate_d = torch.where(is_inf, rate_d, torch.zeros_like(dr))
    dur_d = torch.where(is_inf, dur_d, torch.zeros_like(dr))
    return rate_d, dur_d, is_inf


def _route_states(system: OdeSystem, ev: Events) -> torch.Tensor:
    """The state each dose goes into [N, D]: the depot for oral doses (route 1), else the central state."""
    route_state = torch.full_like(ev.dose_route, system.central)
    if system.depot is not None:
        route_state = torch.where(ev.dose_route == 1, torch.full_like(route_state, system.depot), route_state)
    elif bool((ev.dose_mask & (ev.dose_route == 1)).any()):
        raise ModelSpecError("doses into the depot (dose_route 1) need an ODE system with a depot state")
    return route_state


def _dose_inputs(system: OdeSystem, p: Mapping[str, torch.Tensor], ev: Events, dtype) -> _Doses:
    """Per-dose amounts, rates, durations, SS flags, target states and effect times."""
    dm = ev.dose_mask
    dr = ev.dose_rate.to(dtype)
    f_bio = p["f"] if "f" in p else torch.ones(dr.shape[0], dtype=dtype, device=ev.obs_time.device)
    amt = torch.where(dm, ev.dose_amt.to(dtype), torch.zeros_like(dr)) * f_bio[:, None]
    rate_d, dur_d, is_inf = _infusions(p, dm, dr, amt)
    bolus_d = torch.where(is_inf, torch.zeros_like(amt), amt)
    ss_d = torch.where(dm, ev.dose_ss, torch.zeros_like(ev.dose_ss))
    ii_d = ev.dose_ii.to(dtype)
    if bool(((ss_d > 0) & ~(ii_d > 0)).any()):
        raise ModelSpecError("steady-state doses (SS=1/2) need an interval II > 0 on the ODE path")
    route_state = _route_states(system, ev)
    tlag = p.get("tlag", None)
    t_eff = ev.dose_time.to(dtype) + (tlag[:, None] if tlag is not None else 0.0)
    # infusions of earlier implied SS doses still running at an SS dose: m·II < dur, m = 1..n_prior
    ii_safe = torch.where(ss_d > 0, ii_d, torch.ones_like(dr))
    n_prior = torch.where((ss_d > 0) & is_inf, torch.ceil(dur_d.detach() / ii_safe) - 1, torch.zeros_like(dr))
    n_prior = n_prior.clamp_min(0)
    return _Doses(bolus_d, rate_d, dur_d, is_inf, ss_d, ii_d, route_state, t_eff, n_prior)


def _event_list(ev: Events, doses: _Doses, tlag: torch.Tensor | None, dtype) -> list[torch.Tensor]:
    """Unsorted events [N, E]: times, ties, kinds, validity and source indices (observations first)."""
    device = ev.obs_time.device
    n, j_obs = ev.obs_time.shape
    d_dose = ev.dose_time.shape[1]
    k_max = int(doses.n_prior.max()) if doses.n_prior.numel() else 0
    times, ties, kinds, valid, idx = [], [], [], [], []
    ar_j = torch.arange(j_obs, device=device).expand(n, j_obs)
    ar_d = torch.arange(d_dose, device=device).expand(n, d_dose)

    def add(t, tie, kind, ok, index):
        times.append(t)
        ties.append(tie.to(dtype))
        kinds.append(torch.full(t.shape, kind, dtype=torch.int64, device=device))
        valid.append(ok)
        idx.append(index)

    dm, t_eff = ev.dose_mask, doses.t_eff
    add(ev.obs_time.to(dtype), ev.obs_seq, _OBS, ev.obs_mask, ar_j)
    if tlag is not None:
        add(ev.dose_time.to(dtype), ev.dose_seq, _REC, dm, ar_d)
        eff_tie = torch.where((tlag.detach() > 0)[:, None], torch.full_like(ev.dose_seq, -1), ev.dose_seq)
        add(t_eff, eff_tie, _DOSE, dm, ar_d)
    else:
        add(t_eff, ev.dose_seq, _DOSE, dm, ar_d)
    if bool(doses.is_inf.any()):
        end_tie = torch.full_like(ev.dose_seq, 2 ** 62)
        add(t_eff + doses.dur, end_tie, _END, doses.is_inf, ar_d)
        for m in range(1, k_max + 1):
            add(t_eff + doses.dur - m * doses.ii, end_tie, _END, doses.is_inf & (doses.n_prior >= m), ar_d)
    return [torch.cat(c, 1) for c in (times, ties, kinds, valid, idx)]


def _sort_events(t_all: torch.Tensor, tie_all: torch.Tensor, kind_all: torch.Tensor, valid_all: torch.Tensor,
                 idx_all: torch.Tensor) -> _Slots:
    """Sort each subject's events by time, then tie (invalid ones last), and compute the segment lengths."""
    big = float(2 ** 62)
    key_t = torch.where(valid_all, t_all.detach(), torch.full_like(t_all, math.inf))
    key_tie = torch.where(valid_all, tie_all, torch.full_like(tie_all, big))
    o1 = torch.sort(key_tie, dim=1, stable=True).indices
    o2 = torch.sort(torch.gather(key_t, 1, o1), dim=1, stable=True).indices
    perm = torch.gather(o1, 1, o2)
    t_s = torch.gather(t_all, 1, perm)
    v_s = torch.gather(valid_all, 1, perm)
    k_s = torch.gather(kind_all, 1, perm)
    i_s = torch.gather(idx_all, 1, perm)
    last = (v_s.sum(1) - 1).clamp_min(0)
    t_s = torch.where(v_s, t_s, torch.gather(t_s, 1, last[:, None]))
    delta = torch.cat([torch.zeros_like(t_s[:, :1]), t_s[:, 1:] - t_s[:, :-1]], 1)
    return _Slots(perm, t_s, delta, v_s, k_s, i_s)


def _slot_actions(ev: Events, doses: _Doses, sl: _Slots, lagged: bool) -> _Actions:
    """Resets (new epoch at a record), boluses, rate changes and SS doses at each sorted event."""
    j_obs, d_dose = ev.obs_time.shape[1], ev.dose_time.shape[1]
    v_s, k_s, i_s = sl.valid, sl.kind, sl.index
    is_dose_ev = v_s & ((k_s == _DOSE) | (k_s == _END) | (k_s == _REC))
    di = torch.where(is_dose_ev, i_s, torch.zeros_like(i_s)).clamp_max(max(d_dose - 1, 0))
    oi = torch.where(v_s & (k_s == _OBS), i_s, torch.zeros_like(i_s)).clamp_max(max(j_obs - 1, 0))
    is_rec = v_s & ((k_s == _OBS) | (k_s == _REC) | ((k_s == _DOSE) & (not lagged)))
    rec_epoch = torch.where(k_s == _OBS, _gather(ev.obs_epoch, oi), _gather(ev.dose_epoch, di))
    rec_epoch = torch.where(is_rec, rec_epoch, torch.full_like(rec_epoch, -1))
    cur_epoch = torch.cummax(rec_epoch, 1).values  # epochs never decrease in data order
    prev_epoch = torch.cat([torch.full_like(cur_epoch[:, :1], -1), cur_epoch[:, :-1]], 1)
    reset = is_rec & (rec_epoch != prev_epoch) & (prev_epoch >= 0)
    applies = v_s & ((k_s == _DOSE) | (k_s == _END)) & (_gather(ev.dose_epoch, di) == cur_epoch)
    dose_ap = applies & (k_s == _DOSE)
    end_ap = applies & (k_s == _END)
    bolus_s = torch.where(dose_ap, _gather(doses.bolus, di), torch.zeros_like(sl.t))
    r_s = _gather(doses.rate, di)
    drate_s = torch.where(dose_ap, r_s * (1 + _gather(doses.n_prior, di)),
                          torch.where(end_ap, -r_s, torch.zeros_like(r_s)))
    route_s = _gather(doses.state, di)
    ss_s = torch.where(dose_ap, _gather(doses.ss, di), torch.zeros_like(di))
    return _Actions(di, reset, bolus_s, drate_s, route_s, ss_s)


def _steady_state(integ: _Integrator, doses: _Doses, act: _Actions, sl: _Slots, k: int, x: torch.Tensor,
                  onehot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The state after the SS doses at event k (SS=1 replaces it, SS=2 adds the periodic state) and ``ok`` [N]."""
    ssk = act.ss[:, k]
    dk = act.di[:, k:k + 1]
    x_ss, ok = _periodic(integ, sl.t[:, k], _gather(doses.bolus, dk)[:, 0, None] * onehot,
                         _gather(doses.rate, dk)[:, 0, None] * onehot, _gather(doses.dur, dk)[:, 0],
                         _gather(doses.ii, dk)[:, 0], ssk > 0, x)
    x = torch.where((ssk == 1)[:, None], x_ss, torch.where((ssk == 2)[:, None], x + x_ss, x))
    return x, ok


def _run_events(integ: _Integrator, doses: _Doses, sl: _Slots, act: _Actions) -> tuple[list[torch.Tensor],
                                                                                        torch.Tensor]:
    """Walk the sorted events for the whole batch: central amounts [N] per event and the no-steady-state mask."""
    n, e_n = sl.t.shape
    s_, dtype, device = integ.system.n_states, sl.t.dtype, sl.t.device
    # host-side flags: one synchronisation for the whole loop
    flags = torch.stack([(sl.delta.detach() > 0).any(0), act.reset.any(0), (act.bolus != 0).any(0),
                         (act.drate != 0).any(0), (act.ss > 0).any(0)]).tolist()
    x = torch.zeros(n, integ.width, dtype=dtype, device=device)
    u = torch.zeros(n, integ.width, dtype=dtype, device=device)
    no_ss = torch.zeros(n, dtype=torch.bool, device=device)
    out = []
    for k in range(e_n):
        if flags[0][k]:
            x = integ.flow(x, u, sl.t[:, k - 1], sl.delta[:, k])
        if flags[1][k]:
            rs = act.reset[:, k, None]
            x = torch.where(rs, torch.zeros_like(x), x)
            u = torch.where(rs, torch.zeros_like(u), u)
        if flags[2][k] or flags[3][k] or flags[4][k]:
            onehot = torch.nn.functional.one_hot(act.state[:, k], s_).to(dtype)
            if flags[4][k]:
                x, ok = _steady_state(integ, doses, act, sl, k, x, onehot)
                no_ss = no_ss | ~ok
            if flags[2][k]:
                x = x + integ.lift(act.bolus[:, k, None] * onehot)
            if flags[3][k]:
                u = u + integ.lift(act.drate[:, k, None] * onehot)
        out.append(integ.record(x))
    return out, no_ss


def _observed(amounts: torch.Tensor, perm: torch.Tensor, p: Mapping[str, torch.Tensor], volume: str,
              no_ss: torch.Tensor, obs_mask: torch.Tensor, lay: SensLayout | None) -> torch.Tensor:
    """Concentrations [N, J] in observation order (NaN where no steady state, 0 at padded observations).

    ``amounts`` [N, E, K]: the central amount per event (and its sensitivities with ``lay``)."""
    j_obs = obs_mask.shape[1]
    inv = torch.argsort(perm, dim=1)[:, :j_obs]  # observations come first in the unsorted event list
    a = torch.gather(amounts, 1, inv[:, :, None].expand(-1, -1, amounts.shape[2]))
    if lay is None:
        amount = a[..., 0]
    else:
        amount = taylor_surrogate(a[..., 0], a[..., 1:1 + lay.p], a[..., 1 + lay.p:], lay, p)
    conc = amount / p[volume][:, None]
    if bool(no_ss.any()):
        warnings.warn(f"{int(no_ss.sum())} subject(s) reach no steady state (an accumulation ratio above 1e6 or "
                      f"{_SS_MAX_INTERVALS} dosing intervals without convergence: input faster than the maximal "
                      f"elimination?); their concentrations are NaN", RuntimeWarning, stacklevel=3)
        conc = torch.where(no_ss[:, None], torch.full_like(conc, math.nan), conc)
    return torch.where(obs_mask, conc, torch.zeros_like(conc))


def _sens_layout(p: Mapping[str, torch.Tensor], sensitivities: str, has_ss: bool) -> SensLayout | None:
    """The forward-sensitivity layout when it applies: autograd on, some parameter requires grad, and none of the
    event parameters (``f``, ``tlag``, ``dur``, ``rate``: they move doses and event times) nor an SS dose."""
    if sensitivities == "autograd" or not torch.is_grad_enabled() or has_ss:
        return None
    names = tuple(k for k, v in p.items() if v.requires_grad)
    if not names or any(k in _EVENT_PARAMS for k in names):
        return None
    return SensLayout(names)


def _tolerance(atol: float, doses: _Doses, lay: SensLayout | None, p: Mapping[str, torch.Tensor],
               n_states: int) -> torch.Tensor:
    """Absolute tolerance per subject (and per sensitivity column): ``atol`` × the subject's largest dose amount
    (bolus amount or infusion amount), divided by |p_a| (|p_a·p_b|) for the first (second) sensitivities."""
    n = doses.bolus.shape[0]
    amounts = torch.cat([doses.bolus, doses.rate * doses.dur], 1).detach().abs()
    scale = amounts.amax(1) if amounts.shape[1] else torch.ones(n, dtype=amounts.dtype, device=amounts.device)
    scale = torch.where(torch.isfinite(scale) & (scale > 0), scale, torch.ones_like(scale))
    base = (atol * scale)[:, None]
    if lay is None:
        return base
    pv = torch.stack([p[k].detach().abs() for k in lay.names], -1).clamp_min(1e-300)  # [N, P]
    cols = torch.cat([torch.ones_like(pv[:, :1]), 1 / pv, 1 / (pv[:, lay.ia] * pv[:, lay.ib])], 1)  # [N, K]
    tol = base[:, :, None] * cols[:, None, :]  # [N, 1, K]
    return tol.expand(n, n_states, lay.k).reshape(n, -1).clamp_max(1e300)


def solve(
    system: OdeSystem,
    params: Mapping[str, torch.Tensor],
    events: Events,
    *,
    rtol: float = RTOL,
    atol: float = ATOL,
    method: str = "dopri5",
    sensitivities: str = "forward",
    stiff: bool | str = "auto",
) -> torch.Tensor:
    """Concentrations ``[N, J]`` at the observation times (0 at padded observations).

    ``params`` holds per-subject tensors ([N], [N, 1] or scalars) named as the right-hand side expects, plus the
    optional ``f`` (bioavailability, multiplies every dose), ``tlag`` (shifts every dose's effect), ``dur`` (duration
    of doses with ``dose_rate`` −2) and ``rate`` (rate of doses with ``dose_rate`` −1). A data infusion (rate > 0)
    keeps its rate and lasts f·amt/rate (NONMEM). The state starts at zero at each subject's first event.

    ``rtol``/``atol``: local error control, ``atol`` relative to each subject's largest dose amount (defaults
    1e-6/1e-8 as rxode2; tighten for reference solves). ``sensitivities``: ``"forward"`` (default) carries first and
    second forward sensitivities and returns a Taylor surrogate (exact value, first and second derivatives; no
    backward pass through the solver), ``"autograd"`` differentiates through the solver steps. ``stiff``: ``"auto"``
    (explicit ``method``, Rosenbrock where it fails), ``True`` (Rosenbrock only), ``False`` (no fallback). A solve
    that fails for a subject gives NaN concentrations for that subject, never an exception.
    """
    if sensitivities not in ("forward", "autograd"):
        raise ModelSpecError(f"sensitivities must be 'forward' or 'autograd', got {sensitivities!r}")
    if stiff not in ("auto", True, False):
        raise ModelSpecError(f"stiff must be 'auto', True or False, got {stiff!r}")
    ev = events
    dtype = ev.obs_time.dtype if ev.obs_time.is_floating_point() else torch.get_default_dtype()
    device = ev.obs_time.device
    n, j_obs = ev.obs_time.shape
    p = _per_subject(params, n, dtype, device)
    _check_inputs(system, p, method)
    doses = _dose_inputs(system, p, ev, dtype)
    tlag = p.get("tlag", None)
    sl = _sort_events(*_event_list(ev, doses, tlag, dtype))
    act = _slot_actions(ev, doses, sl, tlag is not None)
    lay = _sens_layout(p, sensitivities, bool((act.ss > 0).any()))
    p_int = p if lay is None else {k: v.detach() for k, v in p.items()}
    integ = _Integrator(system, p_int, rtol, _tolerance(atol, doses, lay, p, system.n_states), method, lay, stiff)
    out, no_ss = _run_events(integ, doses, sl, act)
    if not out:
        return torch.zeros(n, j_obs, dtype=dtype, device=device)
    return _observed(torch.stack(out, 1), sl.perm, p, system.volume, no_ss, ev.obs_mask, lay)
