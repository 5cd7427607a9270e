"""The ODE path of the pharmacokinetics: a user right-hand side integrated over the dose/observation events.

An :class:`OdeSystem` is a right-hand side ``rhs(t [N], x [N, S], params {name: [N]}) -> dx/dt [N, S]`` plus the
roles of its states (which one receives oral doses, which one is dosed intravenously and observed, which parameter
is its volume). :func:`solve` integrates it for a batch of subjects and returns concentrations at the observation
times, ``[N, J]``, exactly like the closed forms of :mod:`nlmefit.pk.closed_form`.

Method
------
Every subject's events — dose effects (dose time + ``tlag``), infusion ends, observations and the dose *records*
that may start a new reset epoch — are sorted into one list per subject (ties as in NONMEM: by the records' ``seq``;
a lagged dose effect precedes records at its effect time; infusion ends come last) and padded to a common length E.
The events that *act* on the state (a dose, an infusion start or end, a reset) split each subject's time line into
epochs; the Python loop runs over the epoch index, never over subjects. Epoch e is integrated for all subjects at
once, from each subject's e-th action to its next one, in rescaled time s ∈ [0, 1],

    dx/ds = Δ_e · (rhs(t_e + s·Δ_e, x) + u_e),

with Δ_e the subject's epoch length (0 where it has no such epoch: no change) and u_e the infusion input rates
active on it, by a batched Dormand–Prince 5(4) with a step size *per subject* (Hairer's PI controller); the
observations inside the epoch are read off the method's continuous extension of order 4 at each subject's own
times (:func:`_dopri5_stops`; only the epoch's end is stepped onto). A subject's solution therefore does not depend
on the rest of its batch (batched equals single to rounding). Between epochs the bolus doses are added (amount · ``f``
into the route's state), infusion rates are switched on and off, and reset epochs (EVID 3/4, SS=1) set the state to
zero. When gradients must flow through the steps themselves (``sensitivities="autograd"``, or an event parameter
``f``/``tlag``/``dur``/``rate`` or an SS dose requires grad) the older walk is used instead: one torchdiffeq
``odeint`` per event segment, Δ_k = t_k − t_{k−1}; because the event times enter only through Δ_k and t_{k−1},
gradients with respect to ``tlag``, ``dur`` and ``rate`` flow through the solver like those of any other parameter.

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

Which integrator
----------------
* **Own batched dopri5 for the epochs** (:func:`_dopri5_stops`, ~90 lines): the Dormand–Prince 5(4) pair of
  torchdiffeq's ``dopri5`` with a step size, an error test (max-norm against ``atol + rtol·|x|``) and an accept/reject
  decision per subject, and per-subject output times (dense output). torchdiffeq's ``odeint`` needs one common 1-D time
  grid and one step size for the batch, so it must restart at every observation (one ``odeint`` per segment: an
  initial-step selection and ≥ 1 step per observation interval, ~1.6 ms of Python per step); ``torchode`` has
  per-sample steps and evaluation times but would be a new dependency for what is one loop here. Its stages are one
  matrix product each over a stage buffer (~0.5–0.7 ms a step for 120 subjects, plain rhs included).
* **torchdiffeq** stays for what needs autograd through the steps (above), the steady-state interval map, and other
  ``method=`` names (``bosh3``, ``tsit5``, ...: each observation interval is then its own ``odeint`` as before, with
  ``options=dict(norm=max-norm)`` so that every state of every subject meets the tolerance).
* **Differentiable.** Forward sensitivities by default (below); the ``"autograd"`` mode differentiates through the
  solver's operations (discretise-then-differentiate: the exact gradient of the computed solution). The adjoint
  method would re-integrate backwards (unstable for strongly damped PK systems).

Tolerances, failures, stiffness, derivatives (issue 10)
--------------------------------------------------------
* **Defaults rtol 5e-6, atol 5e-8** — nlmixr2's FOCE-I defaults (``foceiControl(sigdig = 3)``: ODE tolerance
  0.5·10^(−sigdig−2) = 5e-6 relative and absolute, 1.6e-5 for its sensitivity equations; NONMEM ADVAN13 TOL=5–6 is
  the same order). ``atol`` is taken relative to each subject's largest dose amount (so the solve does not depend on
  the amount unit; nlmixr2's 5e-6 absolute is this for a 100-unit dose; sensitivity columns get atol/|p_a| and
  atol/|p_a p_b|). Until 2026-12-01 rxode2's ``rxSolve`` defaults 1e-6/1e-8: on the six MM benchmark sets the FOCE-I
  OFV moved by < 0.002 and stays within 0.001 of a rtol 1e-10 solve (``python -m nlmefit.benchmark.robust``'s
  ``tight`` column), for 10–15 % less time. Tighten with ``rtol=``/``atol=`` here or
  ``OdeStructure.with_tolerance``; the test suite's reference solves use 1e-10/1e-12.
* **Error control on the states only** (CVODES' default ``errconS`` off): the sensitivity columns ride along on the
  steps the states choose. The plain solve (the mode search's line search, without gradients) and the sensitivity
  solve then take the *same* steps and give the same values to rounding, so the Armijo test compares like with like:
  with the sensitivities under error control too (different steps, values differing at the 1e-7 level) the line
  search failed at the end of nearly every mode search and halved 30 times (Bolus_1CPTMM, 20 subjects, 3 outer
  iterations: 449 → 71 plain solves, 20.4 s → 8.7 s). Derivatives stay within 1e-8 (first) and 1e-7 (second order)
  of autograd through the steps at rtol 1e-9 (tests/test_ode_robust.py).
* **Cache of the last solve** (one per kind: plain, sensitivities) keyed on the events *object*, the system and the
  options: a call re-solves only the subjects whose parameters changed — the mode search's converged subjects and
  the line search's accepted ones sit still — and a sensitivity solve serves parameters within 1e-5 relative of its
  expansion point through the Taylor surrogate (value error ~d³, second derivatives ~d): the FOCE-I −2LL at the
  modes (η̃ = η̂ − H⁻¹g) costs no solve. :func:`clear_cache` forgets it.
* **No exception reaches the caller.** A subject whose explicit epoch solve needs more than 500 + 4·(outputs) steps
  or whose step underflows (non-finite state), or torchdiffeq's errors on the per-segment path (``underflow in dt``,
  500 steps per segment), goes — alone, and sticky for the rest of that solve — to the batched L-stable Rosenbrock
  2(3) solver of :mod:`nlmefit.pk.ode_stiff` (per-subject steps, exact state Jacobian by
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

Profile (2 shared cores, load ~2 from other jobs, OMP_NUM_THREADS=1, float64; FOCE-I, covariance=None)
---------------------------------------------------------------------------------------------------------
First version (autograd through the steps, rtol 1e-8): one FOCE-I objective + gradient on theophylline
``1cmt_oral_mm`` took 53.6 s in the η-mode search and 28 s in the −2LL (91 % in autograd backward passes). Forward
sensitivities (:mod:`nlmefit.pk.ode_sens`, rtol 1e-6) cut that to 14.9 s + 2.2 s, but a whole theophylline fit still
did not finish in 30 min: each observation interval was its own ``odeint`` (~1.6 ms of Python a step, ≥ 4 steps an
interval) and the mode search's line search failed on discretisation noise. Bolus_1CPTMM SD, first 20 subjects, 3
outer iterations (6 objective evaluations, 48 Newton iterations), step by step:

==========================================  ======  ============================================================
change                                      wall    what moved
==========================================  ======  ============================================================
per-segment ``odeint`` (start)              94.7 s  471 plain solves × 135 ms (82 steps), 67 sensitivity
                                                    solves × 443 ms; mode search 82.5 s, −2LL 6.6 s
epochs, own dopri5 with per-subject steps   20.4 s  plain 24 ms, sensitivity 132 ms a solve; still 449 plain
error control on the states only             8.7 s  449 → 71 plain solves (no line-search failures on noise)
cache of the last solve (changed rows only)  6.2 s  −2LL 223 → 56 ms an evaluation
==========================================  ======  ============================================================

Whole fits after all changes (``python -m nlmefit.benchmark.robust --sets bolus_1cpt bolus_1cptmm --no-full``, auto
start; the value-only line-search solves served by the sensitivity solve's surrogate, the stages as matrix
products, one dual level per solve):

* **Bolus_1CPTMM SD** (120 subjects, 2280 observations, ``1cmt_iv_mm``): 19.6–22.6 s (two runs of the benchmark;
  34.8 s before the surrogate served the line search), OFV 20957.257 from both starts; its linear counterpart
  Bolus_1CPT SD with ``1cmt_iv`` 0.7–0.9 s in the same runs: **ratio 26–28** (the issue asks ≤ 15). Per fit: 27
  objective evaluations, 131 Newton iterations, 191 sensitivity solves (~72 ms: ~50 steps of 6 augmented-rhs calls
  at 0.25 ms, 3 parameters → 10 columns a state), 161 value-only calls (36 ms, many served from the caches).
  −2LL at the estimates, rtol 1e-6 vs 1e-10: 25136.589595 vs 25136.589601 (difference 6e-6).
* **Theophylline** ``1cmt_oral_mm`` (additive error, package defaults): 67.6 s, converged, OFV 116.803 (vm and km
  drift to ~1e10 with vm/km ≈ CL: the data carry no saturation). 106 objective evaluations, 274 Newton iterations,
  492 sensitivity solves at 116 ms (4 parameters → 15 columns, 0.25 ms an augmented-rhs call). −2LL at the
  estimates, rtol 1e-6 vs 1e-10: difference 8e-6.

Where an Oral_1CPTMM SD fit's time went (120 subjects, 2400 observations, ``1cmt_oral_mm``, 4 η → P = 4, K = 15;
2-core x86_64, torch 2.13 CPU, one thread; cProfile of one auto-start FOCE-I fit, 53 s unprofiled): 98 % in the
η-mode search, none worth naming in the −2LL (its solves are cache hits). 236 sensitivity solves (45 s: ~110 loop
iterations of 6 augmented-rhs calls at 0.21 ms, of which the dual rhs itself 0.07 ms and the rest the building of
the row blocks: concatenations of permuted views and a column ``torch.stack``) and 156 value-only solves (11.7 s,
the line search's trial points; the first search's, at extreme η, hit the step cap and go to Rosenbrock). In steady
state a search costs two sensitivity solves (at the warm start, at the converged η) and one value solve; one search
of the 29 ran to ``max_iter``: a subject cycled between two iterates whose step counts differ by one (102/103), the
line search accepting on the surrogate what the next fresh solve did not confirm (100 sensitivity solves, 11 s).
Changes, same OFV 19889.777 (auto and truth start):

================================================  =====================================================
change                                            Oral_1CPTMM SD FOCE-I (auto start; profile run)
================================================  =====================================================
before                                            53 s (benchmark, load ~1: 70.9 s)
mode search stops a subject whose fresh value      39.4 s with the two below: 135 instead of 233 Newton
does not confirm the step (:mod:`nlmefit.         iterations, 171 sensitivity solves at 161 ms (190)
marginal.modes`)
augmented rhs built column-major ([S, K, N]:       0.21 → 0.16 ms a call (2cmt oral MM, P = 6: 0.48 →
contiguous blocks), library rhs returns            0.40 ms; 1cmt iv MM 0.14 → 0.10 ms)
``stack(cols).T`` (4x cheaper than stacking
columns)
dopri5 loop: scatter of the recorded outputs,      a few % of a value solve
fewer temporaries
================================================  =====================================================

Benchmark after (``--sets bolus_1cpt bolus_1cptmm oral_1cpt oral_1cptmm --no-full``, same machine, load ~0.7):
Bolus_1CPTMM 12.2 s (was ~20 s), Oral_1CPTMM 37.8 s (was 70.9 s), OFVs 20957.257 and 19889.777 from both starts.
The linear counterparts (0.3 and 0.7 s in the same run, themselves sped up meanwhile) put the ratios at 35 and 54:
the issue's 15x is not met. Oral_2CPTMM SD (``--sets oral_2cpt oral_2cptmm``): 75.8 s (was 119.8 s), OFV
19302.411 from both starts, 35x Oral_2CPT's 2.2 s.

**The depot in its integrating-factor coordinate** (``OdeSystem.absorption``, set by the library's oral models):
the solver integrates z = depot·e^{ka·τ} (τ the time since the epoch's start; constant between doses for
first-order absorption) instead of the depot amount, so the depot no longer holds dopri5 at its stability limit
h·ka ≲ 3.3; the absorption reaches the central compartment as the explicit forcing ka·z·e^{−ka·τ}
(:func:`_depot_factor_rhs`; the states at the stops are mapped back with the product rule for the sensitivity
columns, :func:`_depot_from_factor`). An exact change of variables: solutions, first and second derivatives equal
the plain coordinates' to the tight-solve tolerance (``tests/test_ode_speed.py``). One Oral_1CPTMM subject: 87 → 38
steps. The time reaches the right-hand side as a zero-tangent dual (``augmented_rhs(dual_time=True)``): a dual op
with a plain tensor takes torch's Python reference path (~0.35 ms a call, a third of the fit). With the mode
search's step cap (:mod:`nlmefit.marginal.modes`), same machine, one thread, ``--no-full --sets oral_1cpt
oral_1cptmm oral_2cpt oral_2cptmm``: Oral_1CPTMM 37.8 → 21.4 s, Oral_2CPTMM 75.8 → 56.2 s, OFVs 19889.777 and
19302.411 from both starts as before (ratios to the linear sets' 0.7 and 2.1 s: 30 and 27).

What was left before it: the step count — a single subject needs 70–125 dopri5 iterations at rtol 1e-6 (median 90)
for 20 observations over 72 h: the depot (ka ≈ 1/h) holds the explicit steps at its stability limit (h·ka ≲ 3.3)
long after it has emptied, where the controller hunts (accept/reject); a PI controller or a stiffness-aware switch
is the next candidate. A Gauss–Newton η-Hessian during the search (first-order sensitivities only, K = 1 + P) was
*not* done: the steady-state search already needs only two sensitivity solves, and Gauss–Newton converges linearly
(the dropped Σ r/V·∂²f term), so it would need more, cheaper solves plus one second-order solve at the mode for the
FOCE-I pieces — no measured gain to expect. The first search's trial points at extreme η (~4 s in the Rosenbrock
fallback) are now capped (``max_step`` of :func:`nlmefit.marginal.modes.find_modes`).

**Second pass (2026-12-01, same machine, one thread).** A Bolus_1CPTMM fit spent 7.6 of 11.3 s in 143 sensitivity
solves of ~50 dopri5 iterations each: the batch loops as long as its slowest subject, and the observations (20 a
subject) capped the steps while the clipped steps' small error estimates made the I controller overshoot after
them (the median subject 23 steps + 4 rejected, the slowest 42 + 10). Changes and the Bolus_1CPTMM SD FOCE-I time
(auto start; OFV 20957.257 throughout):

==================================================  ======  ===============================================
change                                              fit     what moved
==================================================  ======  ===============================================
before                                              11.3 s  ~52 iterations a solve, 0.13 ms a rhs call
outputs from the continuous extension, not steps    9.2 s   median subject 10 + 4 rejected, slowest 30 + 10
Hairer's PI controller (β = 0.04)                   8.5 s   rejections: median 1, max 7
state kept [S·K, N] (no layout copies), addmm       7.4 s   rhs 0.11 → 0.087 ms, loop 0.7 → 0.39 ms an
stages, make_dual without forward_ad's wrappers,            iteration
one division in the MM elimination
forward-difference D²f (P + M row blocks), the      6.2 s   2cmt_oral_mm rhs 0.62 → 0.30 ms; nlmixr2's FOCE-I
library's oral rhs in the depot coordinate,                 tolerances (~10 %)
rtol/atol 5e-6/5e-8
modes' warm start predicted to first order          4.9 s   (:mod:`nlmefit.estimators.classical`) about one
(implicit function theorem, no new solve)                   sensitivity solve fewer per mode search
derived parameters once a solve (``prepare``), a    3.9 s   no partial re-solves for the Newton-corrected
cache radius of 1e-5, zero-state initial step               modes; infusion epochs 9.3 → 7.1 iterations
==================================================  ======  ===============================================

``python -m nlmefit.benchmark.robust`` after all of them (two runs): the MM sets 7.4–12.7× their linear
counterparts (Bolus_1CPTMM 4.1 s, Bolus_2CPTMM 13.7 s, Infusion_1CPTMM 4.0 s, Infusion_2CPTMM 13.0 s,
Oral_1CPTMM 9.5 s, Oral_2CPTMM 18.6 s in one of them), OFVs unchanged, the tight-tolerance OFVs within 0.001. One
silent failure found on the way: an exception inside the explicit path (a stride-0 dual time for a one-subject
batch) sent those solves to the Rosenbrock fallback — right answers, 5x slower; ``tests/test_ode_speed.py`` now
fails on any fallback of a non-stiff solve.

Earlier measurement (tight tolerances): rtol 1e-10 / atol 1e-12 gives the linear 1–3-compartment systems to ~1e-10
relative against matrix exponentials and closed forms (rtol 1e-8: ~2e-9); ``dopri8`` takes fewer steps but its error
estimate is unreliable there (1e-7 error at rtol 1e-10), hence ``dopri5``.
"""
from __future__ import annotations

import contextlib
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

__all__ = ["OdeSystem", "solve", "clear_cache", "ADAPTIVE_METHODS", "RTOL", "ATOL"]

#: torchdiffeq methods with error control (those accept the max-norm option)
ADAPTIVE_METHODS = frozenset({"dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun", "tsit5"})

_OBS, _REC, _DOSE, _END = 0, 1, 2, 3
_EVENT_PARAMS = ("f", "tlag", "dur", "rate")
_MAX_STEPS = 500  # explicit steps per segment before the segment counts as stiff
#: local error control on the sensitivity columns too (CVODES' errconS); off: on the states only
_ERRCON_SENS = False
#: default tolerances (nlmixr2's FOCE-I: rtol 5e-6; atol 5e-8 relative to each subject's largest dose amount)
RTOL, ATOL = 5e-6, 5e-8
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
    #: name of the first-order absorption rate parameter when the depot obeys d depot/dt = −absorption·depot
    #: between doses (the library's oral models: ``"ka"``); the solver then integrates the depot in the
    #: integrating-factor coordinate (:func:`_depot_factor_rhs`). Only a speed hint: the transform is exact for any
    #: right-hand side.
    absorption: str | None = None
    #: optional: the same right-hand side already written in that coordinate (reading the epoch start
    #: ``p["__t0"]``), as the library's oral models provide — fewer operations than the generic transform of
    #: :func:`_depot_factor_rhs`, which it must equal (``tests/test_ode_speed.py`` checks the library's)
    factor_rhs: Callable[[torch.Tensor, torch.Tensor, Mapping[str, torch.Tensor]], torch.Tensor] | None = None
    #: optional: ``prepare(params) -> params`` adds derived parameters (e.g. q/v) that ``rhs`` reads when present
    #: and computes itself otherwise; the batched dopri5 path calls it once a solve instead of the rhs once a stage
    prepare: Callable[[Mapping[str, torch.Tensor]], dict] | None = None

    def __post_init__(self) -> None:
        if self.absorption is not None and self.depot is None:
            raise ModelSpecError(f"absorption={self.absorption!r} needs a depot state")
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
        self.stiff_rows: torch.Tensor | None = None  # subjects sent to Rosenbrock by an earlier epoch

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
        """dy/ds on a segment, y [N, S, K] (s a scalar or per subject [N]): the torchdiffeq and Rosenbrock paths."""
        rhs, p = self.system.rhs, self.p
        if self.lay is not None:
            return augmented_rhs(rhs, self.lay, p, t0, delta, u.reshape(u.shape[0], -1, self.k)[..., 0])

        def f(s, y):
            return (delta[:, None] * (rhs(t0 + s * delta, y[..., 0], p) + u)).unsqueeze(-1)

        return f

    def _rhs_last(self, t0, delta, u, rhs=None, p=None, dual_time: bool = False):
        """(f, session) for :func:`_dopri5_stops`: ``f(s, y [S·K, N]) -> [S·K, N]``, dy/dt in the subjects-last layout
        *without* the factor ``delta`` (the solver folds it into the step), and the context to hold around the solve.
        ``rhs``/``p`` replace the system's (the depot coordinate); ``prepare`` adds the system's derived parameters."""
        rhs = self.system.rhs if rhs is None else rhs
        p = self.p if p is None else p
        prepare = self.system.prepare
        if self.lay is not None:
            aug = augmented_rhs(rhs, self.lay, p, t0, delta, u.reshape(u.shape[0], -1, self.k)[..., 0],
                                dual_time=dual_time, prepare=prepare)
            return aug.last, aug.session
        if prepare is not None:
            p = prepare(p)
        u_t = u.T if bool((u != 0).any()) else None

        def f(s, y):
            d = rhs(torch.addcmul(t0, s, delta), y.T, p).T
            return d if u_t is None else d + u_t

        return f, contextlib.nullcontext

    def _jac(self, t0, delta):
        rhs, p = self.system.rhs, self.p
        s_ = self.system.n_states
        p_rep = {k: v.detach().repeat(s_) for k, v in p.items()}

        def call(x, c):
            t = c.pop("__t")
            return rhs(t, x, c)

        def jac(s, y):
            t = (t0 + s * delta).detach().repeat(s_)
            return delta.detach()[:, None, None] * state_jacobian(call, y[..., 0].detach(), {**p_rep, "__t": t})

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
            try:
                y3, ok = rosenbrock23(f, jac, x.reshape(n, -1, self.k), self.rtol, atol)
                y = y3.reshape(n, -1)
                bad = bad | ~ok
            except (RuntimeError, ValueError, OverflowError, ZeroDivisionError):  # e.g. a raising user rhs
                y, bad = x, torch.ones_like(bad)
        elif y is None:
            bad = torch.ones_like(bad)
            y = x
        if bool(bad.any()):
            self.n_failed = max(self.n_failed, int(bad.sum()))
            y = torch.where(bad[:, None], torch.full_like(y, math.nan), y)
        return y

    def epoch(self, x, u, t0, delta, t_out, valid) -> tuple[torch.Tensor, torch.Tensor]:
        """Integrate from ``t0`` over ``delta`` [N] with constant input ``u``, recording the state at the times
        ``t_out`` [N, M] (sorted per subject where ``valid``). Returns (states at ``t_out`` [N, M, S·K], end state).

        One explicit solve with per-subject steps that land on every subject's own output times
        (:func:`_dopri5_stops`); where it fails (or ``stiff``), one :meth:`flow` per output interval as before."""
        n, m = t_out.shape
        bad = ~torch.isfinite(x).all(1) | self.bad_params
        if self.stiff is not True and not self.n_stiff and self.method == "dopri5":
            sticky = self.stiff_rows if self.stiff_rows is not None else torch.zeros_like(bad)
            xs = torch.where(bad[:, None], torch.zeros_like(x), x)
            dl = torch.where(bad | sticky, torch.zeros_like(delta), delta).detach()
            pos = dl > 0
            s_out = torch.where(pos[:, None], (t_out.detach() - t0.detach()[:, None]) / torch.where(
                pos, dl, torch.ones_like(dl))[:, None], torch.zeros_like(t_out))
            end = pos.to(x.dtype)[:, None]
            s_out = torch.where(valid, s_out.clamp(0.0, 1.0), end)
            stops = torch.cat([s_out, end], 1)
            k = self.k
            ka_name = self.system.absorption
            factor = ka_name is not None and ka_name in self.p and bool(
                (u.reshape(n, -1, k)[:, self.system.depot, 0] == 0).all())  # no infusion into the depot
            if factor:
                f, session = self._rhs_last(t0, dl, u, self.system.factor_rhs or _depot_factor_rhs(self.system),
                                            {**self.p, "__t0": t0.detach()}, dual_time=True)
            else:
                f, session = self._rhs_last(t0, dl, u)
            err_stride = 1 if _ERRCON_SENS else k
            try:
                with session():
                    ys, ok = _dopri5_stops(f, xs, stops, self.rtol, self.atol, err_stride, _MAX_STEPS + 4 * m, dl)
            except (RuntimeError, ValueError, OverflowError, ZeroDivisionError):  # the user's rhs: stiff path
                ys = xs[:, None, :].expand(n, m + 1, xs.shape[1]).clone()
                ok = torch.zeros_like(bad)
            if factor:  # back from the integrating-factor coordinate: depot = z·e^{−ka·τ}
                ys = _depot_from_factor(ys, stops * dl[:, None], self.p[ka_name], self.system, self.lay)
            if bool(bad.any()):
                self.n_failed = max(self.n_failed, int(bad.sum()))
                ys = torch.where(bad[:, None, None], torch.full_like(ys, math.nan), ys)
            redo = (~ok | sticky) & ~bad
            if bool(redo.any()):  # only these subjects go to the stiff solver (and stay there for this solve)
                self.stiff_rows = sticky | redo
                idx = torch.nonzero(redo)[:, 0]
                atol = self.atol[idx] if torch.is_tensor(self.atol) and self.atol.shape[0] == n else self.atol
                sub = _Integrator(self.system, {k: v[idx] for k, v in self.p.items()}, self.rtol, atol,
                                  self.method, self.lay, self.stiff)
                sub.n_stiff = 1
                r_ys, r_x = sub.epoch(x[idx], u[idx], t0[idx], delta[idx], t_out[idx], valid[idx])
                self.n_failed = max(self.n_failed, sub.n_failed)
                ys = ys.clone()
                ys[idx, :m] = r_ys
                ys[idx, m] = r_x
            return ys[:, :m], ys[:, m]
        recs = []
        t_prev = t0
        for j in range(m):
            tj = torch.where(valid[:, j], t_out[:, j], t_prev)
            x = self.flow(x, u, t_prev, tj - t_prev)
            recs.append(x)
            t_prev = tj
        x = self.flow(x, u, t_prev, t0 + delta - t_prev)
        return (torch.stack(recs, 1) if recs else x.new_zeros(n, 0, x.shape[1])), x

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


def _depot_factor_rhs(system: OdeSystem) -> Callable:
    """The right-hand side in the depot's integrating-factor coordinate z = depot·e^{ka·τ} (τ = t − t₀, the time
    since the epoch's start ``p["__t0"]``; z = depot at τ = 0):

        dz/dt = e^{ka·τ}·(d depot/dt + ka·depot),   the other states unchanged with depot = z·e^{−ka·τ}.

    For first-order absorption z is constant between doses, so the depot no longer limits the explicit step
    (h·ka ≲ 3.3 for dopri5, long after the depot has emptied) and carries no error; the absorption reaches the
    central compartment as the explicit forcing ka·z·e^{−ka·τ}. Exact for any right-hand side (a change of
    variables); forward-mode derivatives in ka flow through e^{−ka·τ} like any parameter's."""
    d, ka_name, rhs = system.depot, system.absorption, system.rhs

    def rhs_z(t: torch.Tensor, x: torch.Tensor, p: Mapping[str, torch.Tensor]) -> torch.Tensor:
        q = {k: v for k, v in p.items() if k != "__t0"}
        ka = q[ka_name]
        e = torch.exp(-ka * (t - p["__t0"]))
        depot = x[:, d] * e
        cols = list(x.unbind(1))
        cols[d] = depot
        dx = rhs(t, torch.stack(cols).T, q)
        dcols = list(dx.unbind(1))
        num = dcols[d] + ka * depot  # 0 for first-order absorption
        dcols[d] = num / e.clamp_min(1e-290)  # e below that only ~700 rate-times into an epoch: the depot is empty
        return torch.stack(dcols).T

    return rhs_z


def _depot_from_factor(ys: torch.Tensor, tau: torch.Tensor, ka: torch.Tensor, system: OdeSystem,
                       lay: SensLayout | None) -> torch.Tensor:
    """States at the stops [N, M, S·K] with the depot row back from z to depot = z·E, E = e^{−ka·τ} (τ [N, M]),
    its sensitivity columns by the product rule: S'_a = S_a·E + z·E_a, T'_ab = T_ab·E + S_a·E_b + S_b·E_a + z·E_ab
    with E_ka = −τE and E_ka,ka = τ²E (the other derivatives of E are 0)."""
    n, m, w = ys.shape
    k = 1 if lay is None else lay.k
    y = ys.reshape(n, m, system.n_states, k)
    E = torch.exp(-ka.detach()[:, None] * tau)  # [N, M]
    z = y[:, :, system.depot, :]  # [N, M, K]
    new = z * E[..., None]
    if lay is not None and system.absorption in lay.names:
        a = lay.names.index(system.absorption)
        P = lay.p
        zv = z[..., 0]
        e_a = -tau * E  # dE/dka
        new[..., 1 + a] = new[..., 1 + a] + zv * e_a
        for mm, (ia, ib) in enumerate(zip(lay.ia, lay.ib)):
            col = 1 + P + mm
            extra = 0.0
            if ib == a:
                extra = extra + z[..., 1 + ia] * e_a
            if ia == a:
                extra = extra + z[..., 1 + ib] * e_a
            if ia == a and ib == a:
                extra = extra + zv * tau * tau * E
            if not isinstance(extra, float):
                new[..., col] = new[..., col] + extra
    y = y.clone()
    y[:, :, system.depot, :] = new
    return y.reshape(n, m, w)


# Dormand–Prince 5(4) (the tableau of torchdiffeq's dopri5 and of Hairer's DOPRI5)
_DP_A = ((1 / 5,), (3 / 40, 9 / 40), (44 / 45, -56 / 15, 32 / 9),
         (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
         (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
         (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84))
_DP_C = (1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_E = (35 / 384 - 5179 / 57600, 0.0, 500 / 1113 - 7571 / 16695, 125 / 192 - 393 / 640,
         -2187 / 6784 + 92097 / 339200, 11 / 84 - 187 / 2100, -1 / 40)
#: PI step-size control of Hairer's DOPRI5: h_new = h·0.9·err^(−(0.2 − 0.75β))·err_old^β
_PI_BETA = 0.04
_PI_EXP = 0.2 - 0.75 * _PI_BETA
#: Dormand–Prince's continuous extension of order 4 (Hairer, Nørsett & Wanner I, II.6; DOPRI5's CONTD5):
#: y(s + θh) = y + h Σ_i b_i(θ) k_i with b_i(θ) = Σ_p _DP_DENSE[p][i] θ^{p+1}; b_i(1) are the 5th-order weights
_DP_DENSE = ((1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
             (-8048581381 / 2820520608, 0.0, 131558114200 / 32700410799, -1754552775 / 470086768,
              127303824393 / 49829197408, -282668133 / 205662961, 40617522 / 29380423),
             (8663915743 / 2820520608, 0.0, -68118460800 / 10900136933, 14199869525 / 1410260304,
              -318862633887 / 49829197408, 2019193451 / 616988883, -110615467 / 29380423),
             (-12715105075 / 11282082432, 0.0, 87487479700 / 32700410799, -10690763975 / 1880347072,
              701980252875 / 199316789632, -1453857185 / 822651844, 69997945 / 29380423))


def _dopri5_stops(f, y0: torch.Tensor, stops: torch.Tensor, rtol: float, atol, err_stride: int,
                  max_steps: int, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dormand–Prince 5(4) for dy/ds = scale·f(s, y) with a step size *per subject*, recording each subject's own
    output points.

    The state is kept subjects-last: ``f(s [N], y [W, N]) -> [W, N]``; ``y0`` [N, W], ``scale`` [N] (the epoch
    lengths), ``stops`` [N, M] sorted in [0, 1], the last one the end of the interval (1, or 0 for a subject with
    nothing to integrate). The steps are the error control's own: only the end is stepped onto, and an output inside
    a step is read off the method's continuous extension of order 4 (:data:`_DP_DENSE`, no extra right-hand side;
    linear in the stages, so sensitivity columns are the derivatives of the interpolated states). Local error
    control per subject in the max-norm over every ``err_stride``-th column (the states of an augmented system
    [N, S·K]) against ``atol + rtol·|y|``, with Hairer's PI step-size controller. Returns the states at the stops
    [N, M, W] and ``ok`` [N]: False for a subject that needs more than ``max_steps`` steps or whose step underflows
    (e.g. a non-finite state); the caller sends those to the stiff solver.

    Why not step onto every output, as the first version did: the outputs then cap the steps (20 observations, 20
    steps at least) and the clipped steps' small error estimates made the controller overshoot after them
    (Bolus_1CPTMM: a median subject 23 steps + 4 rejected, the slowest — which sets the batch's loop count —
    42 + 10; now 10 + 1 and 30 + 7). The states at the outputs differ from the stepped-onto ones by the
    interpolant's error, which the tolerance bounds like the steps' own (``tests/test_ode_speed.py``).
    """
    n, w = y0.shape
    m = stops.shape[1]
    dt, dev = y0.dtype, y0.device
    out = y0[:, None, :].expand(n, m, w).clone()
    recorded = stops <= 0
    done = recorded.all(1)
    if bool(done.all()):  # nothing to integrate (e.g. the empty epoch before a first dose at the first event)
        return out, done
    k_str = err_stride
    atol_t = torch.as_tensor(atol, dtype=dt, device=dev)
    if atol_t.dim() == 2:  # [N, 1] or [N, W] -> subjects last
        atol_t = atol_t.T
        if atol_t.shape[0] > 1 and k_str > 1:
            atol_t = atol_t.reshape(-1, k_str, n)[:, 0]

    def sel(v):  # the error-controlled rows [S, N] of a state [W, N]
        return v if k_str == 1 else v.view(-1, k_str, n)[:, 0]

    end = stops[:, -1]
    s = torch.zeros(n, dtype=dt, device=dev)
    y = y0.T.contiguous()
    k1 = f(s, y)
    # initial step (Hairer, Nørsett & Wanner II.4, per subject), in s
    sc0 = atol_t + rtol * sel(y).abs()
    d0 = (sel(y).abs() / sc0).amax(0)
    d1 = (sel(k1).abs() * scale / sc0).amax(0)
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1.clamp_min(1e-300))
    h0 = h0.clamp_max(1.0)
    k2 = f(s + h0, y + (h0 * scale) * k1)
    d2 = (sel(k2 - k1).abs() * scale / sc0).amax(0) / h0
    dmax = torch.maximum(d1, d2)
    h1 = torch.where(dmax <= 1e-15, torch.maximum(torch.full_like(h0, 1e-6), h0 * 1e-3),
                     (0.01 / dmax.clamp_min(1e-300)) ** (1 / 5))
    # a state at zero (an infusion into empty compartments) gives no scale for h0: Hairer's 100·h0 cap would start
    # at 1e-4 of the epoch and spend ~4 steps growing out of it; start from the derivative estimate h1 instead
    h = torch.where(d0 < 1e-5, h1, torch.minimum(100 * h0, h1)).clamp_max(1.0)
    h = torch.where(torch.isfinite(h) & (h > 0), h, torch.full_like(h, 1e-6))
    failed = torch.zeros_like(done)
    err_old = torch.full_like(h, 1e-4)
    rejected = torch.zeros_like(done)
    kk = torch.empty(7, w * n, dtype=dt, device=dev)  # the stages times the step: h·scale·k_i
    kv = kk.view(7, w, n)
    a_mat = torch.zeros(6, 6, dtype=dt, device=dev)
    for i, row in enumerate(_DP_A):
        a_mat[i, :len(row)] = torch.tensor(row, dtype=dt)
    a_rows = [a_mat[i:i + 1, :i + 1] for i in range(6)]
    e_row = torch.tensor(_DP_E, dtype=dt, device=dev)[None]
    dense = torch.tensor(_DP_DENSE, dtype=dt, device=dev)  # [4, 7]
    powers = torch.arange(1, 5, dtype=dt, device=dev)
    for _ in range(max_steps):
        if bool((done | failed).all()):
            break
        clip = s + h >= end
        hs = torch.where(clip | done, end - s, h)  # done subjects: 0
        hs = torch.where(failed, 0.0, hs)
        hc = hs * scale
        torch.mul(k1, hc, out=kv[0])
        y_row = y.view(1, w * n)
        for i in range(6):  # stage i+2 from the stages so far: one addmm each
            yi = torch.addmm(y_row, a_rows[i], kk[:i + 1]).view(w, n)
            ki = f(torch.add(s, hs, alpha=_DP_C[i]), yi)
            torch.mul(ki, hc, out=kv[i + 1])
        y_new = yi  # the last stage is the 5th-order solution (FSAL)
        err = (e_row @ kk).view(w, n)
        sc = atol_t + rtol * torch.maximum(sel(y).abs(), sel(y_new).abs())
        ratio = (sel(err).abs() / sc).amax(0)
        finite = torch.isfinite(y_new).all(0) & torch.isfinite(ratio)
        moving = ~(done | failed)
        accept = (ratio <= 1) & finite & moving
        # Hairer's PI step-size control (DOPRI5: β = 0.04): shrinks after an accepted step whose error is near the
        # tolerance (the I controller that never shrinks on acceptance was rejected on the next step ~1 time in 3)
        r = ratio.clamp_min(1e-300)
        fac = 0.9 * r ** -_PI_EXP
        grow = torch.where(rejected, 1.0, 10.0)  # no growth right after a reject
        factor = torch.where(accept, torch.minimum(fac * err_old ** _PI_BETA, grow).clamp_min(0.2), fac.clamp(0.2, 1.0))
        factor = torch.where(finite, factor, 0.2)
        err_old = torch.where(accept, r.clamp_min(1e-4), err_old)
        rejected = torch.where(moving, ~accept, rejected)
        s_new = torch.where(accept, torch.where(clip, end, s + hs), s)
        reach = ~recorded & (stops <= s_new[:, None])  # outputs inside the accepted steps
        ri, rj = torch.nonzero(reach, as_tuple=True)
        if ri.numel():
            theta = ((stops[ri, rj] - s[ri]) / hs[ri]).clamp(0.0, 1.0)
            b = (theta[:, None] ** powers) @ dense  # [R, 7]: b_i(θ)
            out[ri, rj] = (y[:, ri] + (kv[:, :, ri] * b.T[:, None, :]).sum(0)).T  # einsum: ~30 µs of parsing
            recorded = recorded | reach
        h = torch.where(moving, hs * factor, h)
        s = s_new
        y = torch.where(accept, y_new, y)
        k1 = torch.where(accept, ki, k1)
        failed = failed | (moving & (h <= 1e-14))  # s lies in [0, 1]: an underflowing step
        done = recorded.all(1)
    return out, done & ~failed


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


def _apply_actions(integ: _Integrator, doses: _Doses, sl: _Slots, act: _Actions, k: int, flags, x, u, no_ss):
    """Reset, steady-state dose, bolus and rate change at sorted event column ``k`` (``flags``: which occur)."""
    s_, dtype = integ.system.n_states, x.dtype
    if flags[1]:
        rs = act.reset[:, k, None]
        x = torch.where(rs, torch.zeros_like(x), x)
        u = torch.where(rs, torch.zeros_like(u), u)
    if flags[2] or flags[3] or flags[4]:
        onehot = torch.nn.functional.one_hot(act.state[:, k], s_).to(dtype)
        if flags[4]:
            x, ok = _steady_state(integ, doses, act, sl, k, x, onehot)
            no_ss = no_ss | ~ok
        if flags[2]:
            x = x + integ.lift(act.bolus[:, k, None] * onehot)
        if flags[3]:
            u = u + integ.lift(act.drate[:, k, None] * onehot)
    return x, u, no_ss


def _run_epochs(integ: _Integrator, doses: _Doses, sl: _Slots, act: _Actions, obs: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The event walk by *epochs*: one solve from each action event (dose, infusion end, reset) to the next,
    recording the observations (``obs`` [N, E]) inside it at each subject's own times. Returns the recorded
    amounts [N, E, K] (0 at other events) and the no-steady-state mask."""
    n, e_n = sl.t.shape
    dtype, device = sl.t.dtype, sl.t.device
    action = act.reset | (act.bolus != 0) | (act.drate != 0) | (act.ss > 0)
    cum = torch.cumsum(action.long(), 1)  # the epoch an event's recorded state belongs to
    n_act = cum[:, -1] if e_n else torch.zeros(n, dtype=torch.long, device=device)
    a_max = int(n_act.max()) if n else 0
    ar = torch.arange(e_n, device=device).expand(n, e_n)
    big = torch.full_like(ar, e_n)
    # index of the e-th action event per subject (e = 1..a_max), e_n where none
    act_idx = [torch.where(action & (cum == e), ar, big).amin(1) for e in range(1, a_max + 1)] if e_n else []
    x = torch.zeros(n, integ.width, dtype=dtype, device=device)
    u = torch.zeros_like(x)
    no_ss = torch.zeros(n, dtype=torch.bool, device=device)
    amounts = torch.zeros(n, e_n, integ.k, dtype=dtype, device=device)
    last = torch.full((n,), max(e_n - 1, 0), dtype=torch.long, device=device)
    for e in range(a_max + 1):
        if e >= 1:
            ke = act_idx[e - 1]
            has = ke < e_n
            kc = torch.where(has, ke, torch.zeros_like(ke))[:, None]
            one = _Actions(*(torch.where(has[:, None], torch.gather(a, 1, kc), torch.zeros_like(torch.gather(
                a, 1, kc))) for a in (act.di, act.reset, act.bolus, act.drate, act.state, act.ss)))
            sl1 = _Slots(sl.perm, torch.gather(sl.t, 1, kc), sl.delta, sl.valid, sl.kind, sl.index)
            flags = [False] + torch.stack([one.reset.any(), (one.bolus != 0).any(), (one.drate != 0).any(),
                                          (one.ss > 0).any()]).tolist()
            x, u, no_ss = _apply_actions(integ, doses, sl1, one, 0, flags, x, u, no_ss)
            start = kc[:, 0]
        else:
            start = torch.zeros(n, dtype=torch.long, device=device)
        stop = act_idx[e] if e < a_max else big[:, 0]
        stop = torch.where(stop < e_n, stop, last)
        t0 = torch.gather(sl.t, 1, start[:, None])[:, 0]
        delta = (torch.gather(sl.t, 1, stop[:, None])[:, 0] - t0).clamp_min(0.0)
        if e >= 1:
            delta = torch.where(act_idx[e - 1] < e_n, delta, torch.zeros_like(delta))
        rec = obs & (cum == e)
        m = int(rec.sum(1).max()) if e_n else 0
        key = torch.where(rec, ar, big)
        order = torch.sort(key, 1).indices[:, :m]
        valid = torch.gather(rec, 1, order)
        t_out = torch.gather(sl.t, 1, order)
        ys, x = integ.epoch(x, u, t0, delta, t_out, valid)
        if m:
            vals = integ.record(ys.reshape(n * m, -1)).reshape(n, m, integ.k)
            vals = torch.where(valid[..., None], vals, torch.zeros_like(vals))
            amounts = amounts.scatter_add(1, torch.where(valid, order, torch.zeros_like(order))[..., None].expand(
                -1, -1, integ.k), vals)
    return amounts, no_ss


def _at_observations(amounts: torch.Tensor, perm: torch.Tensor, j_obs: int) -> torch.Tensor:
    """The recorded amounts [N, E, K] at the observations, in observation order [N, J, K]."""
    inv = torch.argsort(perm, dim=1)[:, :j_obs]  # observations come first in the unsorted event list
    return torch.gather(amounts, 1, inv[:, :, None].expand(-1, -1, amounts.shape[2]))


def _observed(a: torch.Tensor, p: Mapping[str, torch.Tensor], p0: Mapping[str, torch.Tensor] | None, volume: str,
              no_ss: torch.Tensor, obs_mask: torch.Tensor, lay: SensLayout | None) -> torch.Tensor:
    """Concentrations [N, J] in observation order (NaN where no steady state, 0 at padded observations).

    ``a`` [N, J, K]: the central amount at each observation (and its sensitivities at ``p0`` with ``lay``)."""
    if lay is None:
        amount = a[..., 0]
    else:
        amount = taylor_surrogate(a[..., 0], a[..., 1:1 + lay.p], a[..., 1 + lay.p:], lay, p, p0)
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
    5e-6/5e-8 as nlmixr2's FOCE-I; tighten for reference solves). ``sensitivities``: ``"forward"`` (default) carries
    first and second forward sensitivities and returns a Taylor surrogate (exact value, first and second derivatives; no
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
    has_ss = bool((ev.dose_mask & (ev.dose_ss > 0)).any())
    lay = _sens_layout(p, sensitivities, has_ss)
    through_steps = lay is None and torch.is_grad_enabled() and any(v.requires_grad for v in p.values())
    if through_steps:  # autograd through the steps (event times may carry gradients): one solve per segment
        a, no_ss = _solve_rows(system, p, ev, rtol, atol, method, stiff, None, dtype, epochs=False)
        return _observed(a, p, None, system.volume, no_ss, ev.obs_mask, None)
    key = (system, rtol, atol, method, stiff, None if lay is None else lay.names, tuple(sorted(p)))
    names = key[-1]
    pv = torch.stack([p[k].detach() for k in names], 1) if names else torch.zeros(n, 0, dtype=dtype, device=device)
    hit, p0v, a, no_ss = _cache_lookup(key, ev, pv, lay)
    if lay is None and not bool(hit.all()):
        hit, p0v, a, no_ss = _value_from_sensitivities(key, ev, pv, hit, p0v, a, no_ss)
    if not bool(hit.all()):
        miss = torch.nonzero(~hit)[:, 0]
        sub = miss if miss.numel() < n else slice(None)
        a_m, ss_m = _solve_rows(system, {k: v[sub] for k, v in p.items()}, ev.index(sub) if miss.numel() < n
                                else ev, rtol, atol, method, stiff, lay, dtype, epochs=True)
        if a is None:
            a, no_ss, p0v = a_m, ss_m, pv
        else:
            a, no_ss, p0v = a.clone(), no_ss.clone(), p0v.clone()
            a[miss], no_ss[miss], p0v[miss] = a_m, ss_m, pv[miss]
        _CACHE[lay is not None] = (key, ev, p0v, a, no_ss)
    p0 = None if lay is None else {k: p0v[:, i] for i, k in enumerate(names)}
    return _observed(a, p, p0, system.volume, no_ss, ev.obs_mask, lay)


#: the last solve per kind (plain, sensitivities): (key, events, parameter values [N, P], amounts [N, J, K], no_ss)
_CACHE: dict[bool, tuple] = {}
#: a subject's cached sensitivity solve serves parameters within this relative distance: the surrogate's value is
#: off by ~d³, its first derivatives by ~d², its second by ~d = 1e-5 relative — the integration error of the
#: (not error-controlled) sensitivity columns at the default rtol 5e-6 is as large. At 1e-6 the FOCE-I objective's
#: Newton-corrected modes η̃ = η̂ − H⁻¹g (|η̃ − η̂| up to ~1e-5) re-solved a few subjects every evaluation, each such
#: partial solve as slow as a full one (Bolus_1CPTMM 5.0 → 3.9 s, Infusion_2CPTMM 16.9 → 13.8 s)
_CACHE_REL = 1e-5
#: a value-only request is served by the last sensitivity solve's Taylor surrogate within this relative distance
#: (remainder ~ d³ ≈ 1e-12 relative, far below the solver tolerance)
_VALUE_REL = 1e-4


def _cache_lookup(key, ev: Events, pv: torch.Tensor, lay: SensLayout | None):
    """(rows served [N] bool, their expansion points [N, P], amounts [N, J, K], no_ss [N]) from the last solve of
    this kind on the same events object: plain solves reuse identical parameter rows; sensitivity solves reuse
    rows whose differentiated parameters lie within ``_CACHE_REL`` (the Taylor surrogate moves the value and the
    derivatives there to O(d³)) and whose other parameters are identical."""
    none = torch.zeros(pv.shape[0], dtype=torch.bool, device=pv.device)
    entry = _CACHE.get(lay is not None)
    if entry is None or entry[0] != key or entry[1] is not ev or entry[2].shape != pv.shape:
        return none, None, None, None
    _, _, p0v, a, no_ss = entry
    if lay is None:
        hit = (pv == p0v).all(1)
    else:
        names = key[-1]
        tol = torch.tensor([_CACHE_REL if k in lay.names else 0.0 for k in names], dtype=pv.dtype,
                           device=pv.device)
        hit = ((pv - p0v).abs() <= tol * p0v.abs()).all(1)
    return hit, p0v, a, no_ss


def _value_from_sensitivities(key, ev: Events, pv: torch.Tensor, hit, p0v, a, no_ss):
    """A plain (value-only) request served from the last sensitivity solve: rows within ``_VALUE_REL`` of its
    expansion point get the value of its Taylor surrogate. The line search of the η-mode search then sees the same
    smooth local model whose gradient and Hessian the Newton step used, not a fresh solve whose discretisation noise
    (~rtol) exceeds the predicted decrease near the mode."""
    entry = _CACHE.get(True)
    if entry is None or entry[1] is not ev or entry[0][:5] != key[:5] or entry[0][6] != key[6] \
            or entry[2].shape != pv.shape:
        return hit, p0v, a, no_ss
    names, grad_names = key[6], entry[0][5]
    s_p0v, s_a, s_no_ss = entry[2], entry[3], entry[4]
    tol = torch.tensor([_VALUE_REL if k in grad_names else 0.0 for k in names], dtype=pv.dtype, device=pv.device)
    near = ~hit & ((pv - s_p0v).abs() <= tol * s_p0v.abs()).all(1)
    if not bool(near.any()):
        return hit, p0v, a, no_ss
    lay = SensLayout(grad_names)
    pcur = {k: pv[:, i] for i, k in enumerate(names)}
    p0 = {k: s_p0v[:, i] for i, k in enumerate(names)}
    val = taylor_surrogate(s_a[..., 0], s_a[..., 1:1 + lay.p], s_a[..., 1 + lay.p:], lay, pcur, p0)[..., None]
    if a is None:
        a, no_ss, p0v = torch.zeros_like(val), torch.zeros_like(s_no_ss), pv.clone()
    else:
        a, no_ss, p0v = a.clone(), no_ss.clone(), p0v.clone()
    a[near], no_ss[near], p0v[near] = val[near], s_no_ss[near], pv[near]
    return hit | near, p0v, a, no_ss


def clear_cache() -> None:
    """Forget the cached last solves (they are keyed on the events object, the system and the tolerances)."""
    _CACHE.clear()


def _solve_rows(system: OdeSystem, p: Mapping[str, torch.Tensor], ev: Events, rtol: float, atol: float,
                method: str, stiff, lay: SensLayout | None, dtype, epochs: bool):
    """The central amounts (and sensitivities) at the observations [N, J, K] and the no-steady-state mask [N]."""
    n, j_obs = ev.obs_time.shape
    doses = _dose_inputs(system, p, ev, dtype)
    tlag = p.get("tlag", None)
    sl = _sort_events(*_event_list(ev, doses, tlag, dtype))
    act = _slot_actions(ev, doses, sl, tlag is not None)
    p_int = p if lay is None else {k: v.detach() for k, v in p.items()}
    integ = _Integrator(system, p_int, rtol, _tolerance(atol, doses, lay, p, system.n_states), method, lay, stiff)
    k = 1 if lay is None else lay.k
    if sl.t.shape[1] == 0:
        return (torch.zeros(n, j_obs, k, dtype=dtype, device=ev.obs_time.device),
                torch.zeros(n, dtype=torch.bool, device=ev.obs_time.device))
    if epochs:
        amounts, no_ss = _run_epochs(integ, doses, sl, act, sl.valid & (sl.kind == _OBS))
    else:
        out, no_ss = _run_events(integ, doses, sl, act)
        amounts = torch.stack(out, 1)
    return _at_observations(amounts, sl.perm, j_obs), no_ss
