"""Regular dose trains in closed form: n doses every τ summed as geometric series, not dose by dose.

For a linear model the central concentration after a unit bolus is Σ_k A_k e^{−λ_k t}. A train of n doses of
amount D at s, s + τ, …, with m(t) the number of doses given by t (the first one at t = s included, a later
one at exactly t not: NONMEM/Panel order of ADDL doses) and Δ(t) = t − (s + (m−1)τ) the time since the
latest one, gives

    bolus:  C(t) = D Σ_k A_k e^{−λ_k Δ} G_m(λ_k),                    G_m(x) = (1 − e^{−x m τ})/(1 − e^{−x τ})
    depot:  C(t) = F D k_a Σ_k A_k [e^{−λ_k Δ} G_m(λ_k) − e^{−k_a Δ} G_m(k_a)] / (k_a − λ_k)

so the cost is O(times × exponentials) per train instead of O(times × doses × exponentials). It is the fast path
of counterfactual simulation (many subjects sharing one regimen); estimation keeps the general per-dose
superposition of :mod:`nlmefit.pk.closed_form`, which also covers infusions, steady state and resets.
When k_a and λ_k agree to 1e−7 relative, k_a is moved by that amount (error ≤ ~1e−7 relative in those terms).
Agreement with the per-dose closed form is tested to 1e−10 (``tests/test_pk_trains.py``).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from nlmefit.pk.macro import PK_PARAMS, macro_constants

__all__ = ["DoseTrain", "train_concentration"]

_NEAR = 1e-7


@dataclass(frozen=True)
class DoseTrain:
    """``n`` doses of ``amount`` every ``interval`` from ``start``, into the depot (``depot=True``) or the central
    compartment as a bolus."""

    start: float
    interval: float
    n: int
    amount: float
    depot: bool


def _inv_den(x: torch.Tensor, tau: float) -> torch.Tensor:
    """1/(1 − e^{−x τ}) (per subject and exponential; 0 where x τ underflows, handled by the caller's limit)."""
    den = -torch.expm1(-x * tau)
    return torch.where(den > 1e-300, 1 / torch.where(den > 1e-300, den, torch.ones_like(den)), torch.zeros_like(den))


def train_concentration(params: Mapping[str, torch.Tensor], trains: Sequence[DoseTrain], times: torch.Tensor,
                        ncmt: int, amount_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Central concentration [S, T] at ``times`` [T] for per-subject parameters ``params`` ([S, 1] or scalars:
    ``cl``, ``v`` (+ ``q``, ``vp``, …), ``ka`` for depot doses, optional ``f`` and ``tlag``); ``amount_scale``
    [S] multiplies every amount (mg/kg regimens).

    With Δ the time since the latest dose and Δ' = Δ + mτ the time since the (virtual) dose before the first,
    e^{−xΔ} G_m(x) = (e^{−xΔ} − e^{−xΔ'})/(1 − e^{−xτ}): two exponentials per rate and time, and no dose
    (m = 0) is Δ = Δ' = 0, which gives exactly 0."""
    lam, a_coef = macro_constants({k: params[k] for k in PK_PARAMS[ncmt]}, ncmt)  # [S, 1, K]
    t = times[None, :]  # [1, T]
    f = params.get("f")
    lag = params.get("tlag")
    conc = None
    for tr in trains:  # a regimen has a handful of phases
        rel = t - tr.start if lag is None else t - tr.start - lag
        tau = float(tr.interval) if tr.n > 1 else 1.0
        # doses given before t: an implied (k ≥ 1) dose at exactly t comes after the observation, as the
        # Panel orders ADDL doses; the train's first dose (a dose record) comes before it
        kf = rel / tau
        kr = torch.round(kf)
        m = torch.where((kf - kr).abs() < 1e-9, kr, torch.ceil(kf))
        m = torch.where(rel >= -1e-12 * tau, torch.clamp(m, min=1, max=tr.n), torch.zeros_like(m))
        delta = torch.where(m > 0, torch.clamp(rel - (m - 1) * tau, min=0.0), torch.zeros_like(rel))
        d0, d1 = delta[..., None], (delta + m * tau)[..., None]  # [·, T, 1]: design-only unless there is a lag
        amt = tr.amount if f is None else tr.amount * f[..., None]
        if tr.depot:
            ka = params["ka"][..., None]
            near = (ka - lam).abs() <= _NEAR * torch.maximum(ka, lam)
            ka_k = torch.where(near, ka * (1 + _NEAR), ka).expand_as(lam)
            c_lam = a_coef * amt * ka_k / (ka_k - lam) * _inv_den(lam, tau)  # [S, 1, K]
            c_ka = a_coef * amt * ka_k / (ka_k - lam) * _inv_den(ka_k, tau)
            resp = c_lam * (torch.exp(-lam * d0) - torch.exp(-lam * d1)) \
                - c_ka * (torch.exp(-ka_k * d0) - torch.exp(-ka_k * d1))
        else:
            resp = (a_coef * amt * _inv_den(lam, tau)) * (torch.exp(-lam * d0) - torch.exp(-lam * d1))
        c = resp.sum(-1) if resp.shape[-1] > 1 else resp[..., 0]
        conc = c if conc is None else conc + c
    if amount_scale is not None:
        conc = conc * amount_scale[:, None]
    return conc
