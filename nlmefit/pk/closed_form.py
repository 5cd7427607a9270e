"""Closed-form concentrations of the linear 1/2/3-compartment models by superposition over doses.

One code path for every number of compartments: the central unit-bolus response is ``Σ_k A_k e^{−λ_k t}``
(:func:`nlmefit.pk.macro.macro_constants`), and every dose contributes, per exponential term (rate λ, coefficient A)
and with Δ = t_obs − t_dose − tlag:

* bolus into the central compartment: ``A·e^{−λΔ}``;
* first-order absorption from the depot: ``A·ka·(e^{−λΔ} − e^{−kaΔ})/(ka − λ)``;
* zero-order infusion of rate R and duration T: ``A·R/λ·(1 − e^{−λ·min(Δ,T)})·e^{−λ·max(Δ−T,0)}``;

scaled by the bioavailability ``f``. A steady-state dose (``dose_ss`` 1 or 2, interval τ = ``dose_ii``) contributes
the sum of itself and all its implied predecessors τ, 2τ, ... earlier, valid for every Δ ≥ 0:

* bolus: ``A·e^{−λΔ}·w(λ)`` with ``w(k) = 1/(1 − e^{−kτ})``;
* oral: ``A·ka·[u(λ) − u(ka)]/(ka − λ)`` with ``u(k) = e^{−kΔ}·w(k)``;
* infusion: with n = #{m ≥ 0 : Δ + mτ < T} implied infusions still running (any T, also T > τ),
  ``A·R/λ·[Σ_{m<n}(1 − e^{−λ(Δ+mτ)}) + (1 − e^{−λT})·e^{−λ(Δ+nτ−T)}·w(λ)]``.

The reset of SS=1 and the addition of SS=2 need nothing here: they are the epoch mask of
:meth:`nlmefit.pk.events.Events.contributes`. A dose counts for an observation when that mask is true and Δ ≥ 0
(a lag time can push Δ below zero; an effect at exactly Δ = 0 is seen, as on the ODE path).

Numerics
--------
* The absorption term is evaluated as the divided difference ``D(λ, ka; s) = (e^{−λs} − e^{−kas})/(ka − λ)
  = e^{−min(λ,ka)s}·s·φ(|ka − λ|s)`` with ``φ(x) = (1 − e^{−x})/x`` (``expm1``; a Taylor series near 0). It is
  exact to machine precision for every ka, including ka = λ (where it is ``s·e^{−λs}``), never overflows, and its
  gradient is finite there. The steady-state oral term uses the same divided differences:
  ``[u(λ) − u(ka)]/(ka − λ) = D(λ,ka;Δ)·w(λ) + e^{−kaΔ}·D(λ,ka;τ)·w(λ)·w(ka)``.
* ``1 − e^{−x}`` is always ``−expm1(−x)``; all exponents are ≤ 0.
* Masked entries (padding, doses after the observation, other epochs, Δ < 0) are evaluated at safe arguments
  (Δ = τ = T = R = 1) and dropped with ``torch.where``, so no gradient is ever NaN.

Doses (NONMEM conventions, as on the ODE path :func:`nlmefit.pk.ode.solve`): the amount is ``f·amt``; a data
infusion (``dose_rate`` > 0) keeps its rate and lasts ``f·amt/rate``; ``dose_rate`` −1 takes the rate from
``params['rate']`` (duration ``f·amt/rate``), −2 the duration from ``params['dur']`` (rate ``f·amt/dur``).
Tensors are ``[N, J, D, ncmt]`` (observations × doses × exponentials); memory is O(J·D) per subject.

Multiple-dose data (fewer dose slots than observation slots, per-subject parameters, no infusion) take the
dose-anchored evaluation instead (:func:`_anchored`): the same sums evaluated at the doses (the state just after each
dose, over the P ≤ D(D+1)/2 counted dose pairs) and carried to each observation from its last counted dose, O(P + J)
per subject. Same values and derivatives to rounding (tested to 1e-12). Measured (FOCE-I from automatic starts, one
thread, 2-core x86_64): full Oral_1CPT (120 subjects, 58 observation and 8–12 dose slots) 7.6 → 2.4 s, full
Oral_2CPT 8.6 → 7.1 s, i.e. 3.3× and 3.2× their single-dose subsets (≈ 3× the observations).

Graph size matters more than arithmetic for small problems (every per-subject Hessian is q backward passes through
this graph): data-only tensors are built once per :class:`Events` (``Events.memo``), φ's Taylor branch enters the
graph only when an argument is below 1e-3 (safe arguments of masked entries are 1, and an observation at its dose's
time gets φ(1) times s = 0), and each dose kind's response is computed only when the data have such doses — 76 → 56
autograd nodes for theophylline's η-objective, FOCE-I fit with covariance step 0.60 → 0.45 s.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from nlmefit.errors import ModelSpecError
from nlmefit.pk.events import Events
from nlmefit.pk.macro import PK_PARAMS, macro_constants

__all__ = ["concentration", "macro_constants"]

_TAYLOR_X = 1e-3  # below this, φ(x) = (1 − e^{−x})/x by its Taylor series (error < x⁵/720 ≈ 1e-18)


def _phi(x: torch.Tensor) -> torch.Tensor:
    """(1 − e^{−x})/x for x ≥ 0, accurate (value and gradient) at and near 0."""
    small = x < _TAYLOR_X
    if not bool(small.any()):  # the usual case: no Taylor branch in the graph (a third of this term's nodes)
        return -torch.expm1(-x) / x
    xs = torch.where(small, torch.ones_like(x), x)
    big = -torch.expm1(-xs) / xs
    xt = torch.where(small, x, torch.zeros_like(x))
    taylor = 1 - xt / 2 * (1 - xt / 3 * (1 - xt / 4 * (1 - xt / 5)))
    return torch.where(small, taylor, big)


def _divdiff(a: torch.Tensor, b: torch.Tensor, s: torch.Tensor, s_phi: torch.Tensor | None = None) -> torch.Tensor:
    """(e^{−a s} − e^{−b s})/(b − a) for s ≥ 0, stable for every a, b (including a = b: s·e^{−a s}).

    ``s_phi``: a constant (no-gradient) copy of ``s`` with its zeros replaced by 1, for φ's argument. The result
    has the factor s, so at s = 0 its value and its derivatives in a and b are 0 whatever φ gets; without the
    zeros φ needs no Taylor branch (an observation at the dose time would otherwise bring it into every graph)."""
    lo = torch.minimum(a, b)
    # |a − b| as max − min: abs's double backward runs through a Python decomposition in torch (≈0.4 ms a call,
    # 20 % of a theophylline FOCE-I fit's per-subject Hessians); max − min has the same value and derivatives
    return torch.exp(-lo * s) * s * _phi((torch.maximum(a, b) - lo) * (s if s_phi is None else s_phi))


def _as_param(x, dtype, device, n: int) -> torch.Tensor:
    """A parameter as a 0-d or 2-d tensor broadcastable to [N, J]: a 1-d one of length N is per subject ([N, 1]),
    any other 1-d one per observation ([1, J])."""
    t = torch.as_tensor(x)
    t = t.to(dtype=dtype, device=device)
    if t.dim() == 1:
        t = t[:, None] if t.shape[0] == n else t[None, :]
    if t.dim() > 2:
        raise ModelSpecError(f"closed-form parameters must be broadcastable to [N, J]; got shape {tuple(t.shape)}")
    return t


def concentration(params: Mapping[str, torch.Tensor], events: Events, ncmt: int, oral: bool) -> torch.Tensor:
    """Central-compartment concentration ``[N, J]`` at ``events.obs_time`` (0 at padded observations).

    ``params`` maps names to tensors broadcastable to ``[N, J]`` (per-observation parameters, applied to the whole
    dose history of their observation; ``[N, 1]`` or ``[N]`` for per-subject ones; a 1-d tensor of length N is
    always read as per subject): ``cl``, ``v``; ``q``, ``vp`` (ncmt ≥ 2); ``q2``, ``vp2`` (ncmt = 3); ``ka`` (oral);
    optional ``f`` (bioavailability, default 1), ``tlag`` (default 0), ``dur`` (doses with ``dose_rate`` −2) and
    ``rate`` (doses with ``dose_rate`` −1). Route-1 doses go into the depot (``oral=True`` only); route-0 doses into
    the central compartment (bolus or infusion). Differentiable in every parameter.
    """
    if ncmt not in PK_PARAMS:
        raise ModelSpecError(f"ncmt must be 1, 2 or 3, got {ncmt}")
    ev = events
    dtype = ev.obs_time.dtype if ev.obs_time.is_floating_point() else torch.get_default_dtype()
    device = ev.obs_time.device
    n = ev.obs_time.shape[0]
    need = list(PK_PARAMS[ncmt]) + (["ka"] if oral else [])
    missing = [k for k in need if k not in params]
    if missing:
        raise ModelSpecError(f"the {ncmt}-compartment {'oral' if oral else 'IV'} closed form needs the parameters "
                             f"{need}; missing {missing}")
    p = {k: _as_param(v, dtype, device, n) for k, v in params.items()
         if k in need or k in ("f", "tlag", "dur", "rate")}

    d = events.memo(f"closed_form:{dtype}", lambda: _design(events, dtype))
    if d.bad_inf:
        raise ModelSpecError("infusions into the depot (dose_route 1 with a nonzero RATE) are not supported by the "
                             "closed-form models; dose them into the central compartment or use the ODE path")
    if d.any_route1 and not oral:
        raise ModelSpecError("doses into the depot (dose_route 1) need an oral model (oral=True)")
    if d.any_rate_mod and "rate" not in p:
        raise ModelSpecError("the data has RATE=-1 (modelled rate) but the parameters have no 'rate'")
    if d.any_dur_mod and "dur" not in p:
        raise ModelSpecError("the data has RATE=-2 (modelled duration) but the parameters have no 'dur'")
    if d.bad_ii:
        raise ModelSpecError("steady-state doses (SS=1/2) need an interval II > 0")

    if _anchored_applies(p, d, events):
        return _anchored(p, events, ncmt, oral, dtype)

    def per_dose(x: torch.Tensor) -> torch.Tensor:  # [N, J'] parameter → [N, J', 1]; scalars stay scalars
        return x[..., None] if x.dim() == 2 else x

    amt = d.amt * per_dose(p["f"]) if "f" in p else d.amt  # [N, J', D]
    if "tlag" in p:
        delta = d.delta - per_dose(p["tlag"])
        mask = d.contrib & (delta >= 0)
        dt = torch.where(mask, delta, torch.ones_like(delta))[..., None]  # [N, J, D, 1], safe Δ = 1
    else:
        mask, dt = d.mask, d.dt
    ss4, tau, any_ss = d.ss4, d.tau, d.any_ss

    lam, a_coef = macro_constants({k: p[k] for k in PK_PARAMS[ncmt]}, ncmt)  # [N?, J'?, K]
    lam = lam[..., None, :] if lam.dim() >= 2 else lam  # [N, J', 1, K]
    a_coef = a_coef[..., None, :] if a_coef.dim() >= 2 else a_coef
    if any_ss:
        w_lam = 1 / -torch.expm1(-lam * tau)  # [N, 1|J', D, K]

    # one response per dose kind, combined with torch.where only where the data mix kinds
    resp = None
    if d.any_bolus:  # bolus into the central compartment (also the default for non-infusion route-0 doses)
        e_lam = torch.exp(-lam * dt)  # [N, J, D, K]
        resp = e_lam * torch.where(ss4, w_lam, torch.ones_like(w_lam)) if any_ss else e_lam
        resp = amt[..., None] * resp

    used = set(PK_PARAMS[ncmt]) | {"f", "tlag"}
    if oral and d.any_route1:
        used.add("ka")
        ka = per_dose(p["ka"])[..., None]  # [N, J', 1, 1]
        kdiff = _divdiff(lam, ka, dt, None if "tlag" in p else d.dt_phi)
        if any_ss:
            w_ka = 1 / -torch.expm1(-ka * tau)
            ss_extra = torch.exp(-ka * dt) * _divdiff(lam, ka, tau) * w_lam * w_ka
            kdiff = torch.where(ss4, kdiff * w_lam + ss_extra, kdiff)
        oral_resp = amt[..., None] * ka * kdiff
        resp = oral_resp if resp is None else torch.where(d.route1[:, None, :, None], oral_resp, resp)

    if d.any_inf:
        used |= {"rate", "dur"}
        ones_d = torch.ones_like(d.dr)
        rate = torch.where(d.data_inf, d.dr, ones_d)[:, None, :]  # [N, 1, D]
        if "rate" in p:
            rate = torch.where(d.rate_mod[:, None, :], per_dose(p["rate"]), rate)
        dur = amt / rate
        if "dur" in p:
            dur_p = torch.where(d.dur_mod[:, None, :], per_dose(p["dur"]), ones_d[:, None, :])
            rate = torch.where(d.dur_mod[:, None, :], amt / dur_p, rate)
            dur = torch.where(d.dur_mod[:, None, :], dur_p, dur)
        inf3 = d.is_inf[:, None, :]
        rate = torch.where(inf3, rate, ones_d[:, None, :])[..., None]  # safe R, T: [N, J', D, 1]
        dur = torch.where(inf3, dur, ones_d[:, None, :])[..., None]
        r_over = rate / lam
        during = torch.minimum(dt, dur)
        single = -torch.expm1(-lam * during) * torch.exp(-lam * torch.clamp(dt - dur, min=0))
        if any_ss:
            # n = #{m ≥ 0: Δ + mτ < T}: implied infusions (this one included) still running at Δ (piecewise constant)
            n_run = torch.clamp(torch.ceil((dur - dt).detach() / tau), min=0)
            m_run = torch.clamp(n_run - 1, min=0)
            zero = torch.zeros((), dtype=dtype, device=device)
            first = torch.where(n_run >= 1, -torch.expm1(-lam * dt), zero)
            earlier = m_run - torch.exp(-lam * (dt + tau)) * -torch.expm1(-lam * m_run * tau) * w_lam
            tail = -torch.expm1(-lam * dur) * torch.exp(-lam * torch.clamp(dt + n_run * tau - dur, min=0)) * w_lam
            single = torch.where(ss4, first + earlier + tail, single)
        inf_resp = r_over * single
        resp = inf_resp if resp is None else torch.where(d.is_inf[:, None, :, None], inf_resp, resp)

    if resp is None:  # no dose at all: every concentration is 0
        resp = torch.zeros_like(dt)
    terms = torch.where(mask[..., None], a_coef * resp, torch.zeros((), dtype=dtype, device=device))
    conc = terms.sum((-1, -2))  # padded observations have no contributing dose: 0
    # parameters this batch's doses do not need (ka without depot doses, dur/rate without infusions) stay in the
    # graph with a zero gradient, so torch.autograd.grad over them does not fail for such a shard
    return _keep_in_graph(conc, p, used)


def _keep_in_graph(conc: torch.Tensor, p: Mapping[str, torch.Tensor], used: set[str]) -> torch.Tensor:
    """Parameters this batch's doses do not need (ka without depot doses, dur/rate without infusions) stay in the
    graph with a zero gradient, so torch.autograd.grad over them does not fail for such a shard."""
    never = torch.zeros((), dtype=torch.bool, device=conc.device)
    zero = torch.zeros((), dtype=conc.dtype, device=conc.device)
    for k in sorted(set(p) - used):
        conc = conc + torch.where(never, p[k], zero)
    return conc


# ---------------------------------------------------------------------------------------------- anchored doses
def _anchored_applies(p: Mapping[str, torch.Tensor], d: _Design, ev: Events) -> bool:
    """The dose-anchored evaluation applies (and pays) when every parameter is per subject, there is no infusion,
    the dose slots are in time order and there are fewer dose slots than observation slots (D² + J < J·D)."""
    n_dose, n_obs = ev.dose_time.shape[-1], ev.obs_time.shape[-1]
    if d.any_inf or not (2 <= n_dose < n_obs) or not d.doses_sorted:
        return False
    return all(v.dim() == 0 or v.shape[-1] == 1 for v in p.values())


@dataclass(frozen=True)
class _Anchors:
    """Data-only tensors of the dose-anchored evaluation (``Events.memo``): the pairs (a, i) of dose slots with dose
    i counted in the state just after dose a (i ≤ a, same reset epoch, both real), packed per subject and padded
    to the largest count P (≤ D(D+1)/2; a reset or SS=1 dose shortens it)."""

    anchor: torch.Tensor  # [N, P] a (0 at padding)
    valid: torch.Tensor  # [N, P, 1] a real pair
    s: torch.Tensor  # [N, P, 1] t_a − t_i (1 at padding)
    s_phi: torch.Tensor  # s with its zeros replaced by 1 (see _divdiff)
    amt: torch.Tensor  # [N, P, 1] amount of dose i (0 at padding)
    route1: torch.Tensor  # [N, P, 1] dose i into the depot
    ss: torch.Tensor  # [N, P, 1] dose i at steady state
    tau: torch.Tensor  # [N, P, 1] its interval (1 if none)


def _anchors(ev: Events, d: _Design, dtype: torch.dtype) -> _Anchors:
    n, n_dose = ev.dose_time.shape
    idx = torch.arange(n_dose, device=ev.dose_time.device)
    dm, ep, t = ev.dose_mask, ev.dose_epoch, ev.dose_time.to(dtype)
    mask = ((idx[None, :, None] >= idx[None, None, :]) & dm[:, :, None] & dm[:, None, :]
            & (ep[:, :, None] == ep[:, None, :])).reshape(n, n_dose * n_dose)
    n_pairs = max(int(mask.sum(-1).amax()), 1)
    sel = torch.sort(mask.to(torch.int8), dim=-1, descending=True, stable=True).indices[:, :n_pairs]
    valid = torch.gather(mask, 1, sel)
    anchor, dose = torch.where(valid, sel // n_dose, 0), torch.where(valid, sel % n_dose, 0)

    def take(x: torch.Tensor, fill) -> torch.Tensor:  # per-dose [N, D] → per pair [N, P, 1]
        return torch.where(valid, torch.gather(x, 1, dose), fill)[..., None]

    s = torch.where(valid, torch.gather(t, 1, anchor) - torch.gather(t, 1, dose), 1.0)[..., None]
    return _Anchors(anchor, valid[..., None], s, torch.where(s == 0, torch.ones_like(s), s),
                    take(d.amt[:, 0, :], 0.0), take(d.route1, False), take(d.ss4[:, 0, :, 0], False),
                    take(d.tau[:, 0, :, 0], 1.0))


def _last_dose(mask: torch.Tensor, delta: torch.Tensor, lag: torch.Tensor | None):
    """Per observation: the last dose that counts (index [N, J]), whether there is one, and the time since its
    effect Δ [N, J, 1] (1 where there is none)."""
    n_dose = mask.shape[-1]
    idx = torch.where(mask, torch.arange(n_dose, device=mask.device), -1).amax(-1)
    valid = idx >= 0
    idx = idx.clamp(min=0)
    dlt = torch.gather(delta, -1, idx[..., None])
    if lag is not None:
        dlt = dlt - lag[..., None]
    return idx, valid, torch.where(valid[..., None], dlt, torch.ones((), dtype=delta.dtype, device=delta.device))


def _anchored(p: Mapping[str, torch.Tensor], ev: Events, ncmt: int, oral: bool, dtype: torch.dtype) -> torch.Tensor:
    """The superposition evaluated at the doses, then carried to the observations: O(P + J) per subject (P ≤ D(D+1)/2
    counted dose pairs).

    A linear model's state after dose a (at its effect time t_a + tlag) is, per exponential k, three sums over the
    doses i ≤ a of a's reset epoch (s = t_a − t_i; a steady-state dose i contributes its implied predecessors too,
    with the same w(x) = 1/(1 − e^{−xτ}) as above):

    * central from boluses ``B_k = Σ f·amt_i·e^{−λ_k s}·[w(λ_k)]``,
    * depot ``G = Σ f·amt_i·e^{−k_a s}·[w(k_a)]``,
    * central from the depot ``E_k = Σ f·amt_i·(D(λ_k,k_a;s)·[w(λ_k)] + [e^{−k_a s}·D(λ_k,k_a;τ)·w(λ_k)·w(k_a)])``;

    an observation Δ after the effect of its last counted dose a then sees
    ``C = Σ_k A_k·(e^{−λ_k Δ}·(B_k + k_a E_k) + k_a·D(λ_k,k_a;Δ)·G)``, because
    D(λ,k_a;s+Δ) = e^{−λΔ}·D(λ,k_a;s) + e^{−k_a s}·D(λ,k_a;Δ) (the divided difference of the propagated state).
    Equal to the per-observation superposition to rounding (tests/test_pk_closed_form.py); the doses counted for
    an observation are always those of its epoch up to its last counted dose, so its epoch rules carry over."""
    d = ev.memo(f"closed_form:{dtype}", lambda: _design(ev, dtype))
    an = ev.memo(f"closed_form_anchors:{dtype}", lambda: _anchors(ev, d, dtype))
    lag = p.get("tlag")
    if lag is None:
        mask = d.mask
    else:
        mask = d.contrib & ((d.delta - lag.detach()[..., None]) >= 0)  # as the general path
    idx, valid, dlt = _last_dose(mask, d.delta, lag)  # [N, J], [N, J], [N, J, 1]

    lam, a_coef = macro_constants({k: p[k] for k in PK_PARAMS[ncmt]}, ncmt)  # [N, 1, K] or [K]
    amt = an.amt  # [N, P, 1]
    if "f" in p:
        f = p["f"]
        amt = amt * (f[..., None] if f.dim() else f)
    ss, tau = an.ss, an.tau
    zero = torch.zeros((), dtype=dtype, device=lam.device)
    if d.any_ss:
        w_lam = 1 / -torch.expm1(-lam * tau)  # [N, P, K]
    n_dose, n_obs = ev.dose_time.shape[-1], idx.shape[-1]

    def state(per_pair: torch.Tensor) -> torch.Tensor:
        """Σ over the counted doses of each anchor, carried to each observation's last dose: [N, P, K'] → [N, J, K']."""
        nn, kk = per_pair.shape[0], per_pair.shape[-1]
        at_dose = torch.zeros(nn, n_dose, kk, dtype=per_pair.dtype, device=per_pair.device)
        # the events may be shared by all subjects (N = 1 there, as for simulated regimens): index ops do not broadcast
        at_dose = at_dose.scatter_add(1, an.anchor[..., None].expand(nn, -1, kk), per_pair)
        return torch.gather(at_dose, 1, idx[..., None].expand(nn, n_obs, kk))

    used = set(PK_PARAMS[ncmt]) | {"f", "tlag"}
    e_obs = torch.exp(-lam * dlt)  # [N, J, K]
    central = None  # B + k_a E at each observation's last dose, [N, J, K]
    if d.any_bolus:
        resp = torch.exp(-lam * an.s)
        if d.any_ss:
            resp = resp * torch.where(ss, w_lam, torch.ones_like(w_lam))
        central = state(torch.where(an.valid & ~an.route1, amt * resp, zero))
    conc = None
    if oral and d.any_route1:
        used.add("ka")
        ka = p["ka"]
        ka3 = ka[..., None] if ka.dim() else ka  # [N, 1, 1]
        depot = an.valid & an.route1
        g = torch.exp(-ka3 * an.s)  # [N, P, 1]
        e = _divdiff(lam, ka3, an.s, an.s_phi)  # [N, P, K]
        if d.any_ss:
            w_ka = 1 / -torch.expm1(-ka3 * tau)
            e = torch.where(ss, e * w_lam + g * _divdiff(lam, ka3, tau) * w_lam * w_ka, e)
            g = torch.where(ss, g * w_ka, g)
        g_obs = state(torch.where(depot, amt * g, zero))  # [N, J, 1]
        from_depot = ka3 * state(torch.where(depot, amt * e, zero))  # [N, J, K]
        central = from_depot if central is None else central + from_depot
        dphi = None if lag is not None else ev.memo(f"closed_form_dphi:{dtype}",
                                                    lambda: torch.where(dlt == 0, torch.ones_like(dlt), dlt))
        conc = ka3 * _divdiff(lam, ka3, dlt, dphi) * g_obs
    if central is not None:
        conc = e_obs * central if conc is None else conc + e_obs * central
    if conc is None:
        conc = torch.zeros_like(e_obs)
    conc = (a_coef * conc).sum(-1)
    conc = torch.where(valid, conc, zero)
    return _keep_in_graph(conc, p, used)


@dataclass(frozen=True)
class _Design:
    """The data-only tensors of the superposition, built once per :class:`Events` (``Events.memo``)."""

    dm: torch.Tensor  # [N, D] real doses
    dr: torch.Tensor  # [N, D] dose_rate
    route1: torch.Tensor  # [N, D] into the depot
    data_inf: torch.Tensor
    rate_mod: torch.Tensor
    dur_mod: torch.Tensor
    is_inf: torch.Tensor
    amt: torch.Tensor  # [N, 1, D] amounts (0 at padding)
    contrib: torch.Tensor  # [N, J, D] epoch/order mask
    delta: torch.Tensor  # [N, J, D] t_obs − t_dose
    mask: torch.Tensor  # contrib & Δ ≥ 0 (no lag)
    dt: torch.Tensor  # [N, J, D, 1] safe Δ (no lag)
    dt_phi: torch.Tensor  # dt with its zeros (a dose at the observation's time) replaced by 1: see _divdiff
    ss4: torch.Tensor  # [N, 1, D, 1] steady-state doses
    tau: torch.Tensor  # [N, 1, D, 1] safe interval
    bad_inf: bool
    any_route1: bool
    any_rate_mod: bool
    any_dur_mod: bool
    bad_ii: bool
    any_inf: bool
    any_ss: bool
    any_bolus: bool  # route-0 doses that are not infusions
    doses_sorted: bool  # real dose slots in (time, seq) order within each subject


def _design(ev: Events, dtype: torch.dtype) -> _Design:
    dm = ev.dose_mask
    dr = ev.dose_rate.to(dtype)
    route1 = dm & (ev.dose_route == 1)
    data_inf, rate_mod, dur_mod = dm & (dr > 0), dm & (dr == -1), dm & (dr == -2)
    is_inf = data_inf | rate_mod | dur_mod
    ss = dm & (ev.dose_ss > 0)
    ii = ev.dose_ii.to(dtype)
    flags = torch.stack([(route1 & (dr != 0)).any(), route1.any(), rate_mod.any(), dur_mod.any(),
                         (ss & ~(ii > 0)).any(), (is_inf & ~route1).any(), ss.any(),
                         (dm & ~route1 & ~is_inf).any()]).tolist()
    amt = torch.where(dm, ev.dose_amt.to(dtype), torch.zeros_like(dr))[:, None, :]
    contrib = ev.contributes()
    delta = ev.obs_time.to(dtype)[:, :, None] - ev.dose_time.to(dtype)[:, None, :]
    mask = contrib & (delta >= 0)
    dt = torch.where(mask, delta, torch.ones_like(delta))[..., None]  # safe Δ = 1: away from φ's Taylor branch
    dt_phi = torch.where(dt == 0, torch.ones_like(dt), dt)
    t, q = ev.dose_time.to(dtype), ev.dose_seq
    pair = dm[:, 1:] & dm[:, :-1]
    in_order = (t[:, 1:] > t[:, :-1]) | ((t[:, 1:] == t[:, :-1]) & (q[:, 1:] > q[:, :-1]))
    later_real = dm[:, 1:] & ~dm[:, :-1]  # a real dose after a padded slot: not the Panel's layout
    doses_sorted = bool((~pair | in_order).all()) and not bool(later_real.any())
    ss4 = ss[:, None, :, None]
    tau = torch.where(ss, ii, torch.ones_like(ii))[:, None, :, None]
    return _Design(dm, dr, route1, data_inf, rate_mod, dur_mod, is_inf, amt, contrib, delta, mask, dt, dt_phi, ss4,
                   tau, *flags, doses_sorted)
