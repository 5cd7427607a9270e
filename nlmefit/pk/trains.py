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

from dataclasses import dataclass
from typing import Mapping, Sequence

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


def _geometric(x: torch.Tensor, m: torch.Tensor, tau: float) -> torch.Tensor:
    """G_m(x) = Σ_{k<m} e^{−x k τ} = (1 − e^{−x m τ})/(1 − e^{−x τ}) (m for x τ → 0)."""
    den = -torch.expm1(-x * tau)
    safe = den > 1e-300
    return torch.where(safe, -torch.expm1(-x * m * tau) / torch.where(safe, den, torch.ones_like(den)), m)


def train_concentration(params: Mapping[str, torch.Tensor], trains: Sequence[DoseTrain], times: torch.Tensor,
                        ncmt: int, amount_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Central concentration [S, T] at ``times`` [T] for per-subject parameters ``params`` ([S, 1] or scalars:
    ``cl``, ``v`` (+ ``q``, ``vp``, …), ``ka`` for depot doses, optional ``f`` and ``tlag``); ``amount_scale``
    [S] multiplies every amount (mg/kg regimens)."""
    lam, a_coef = macro_constants({k: params[k] for k in PK_PARAMS[ncmt]}, ncmt)  # [S, 1, K]
    t = times[None, :]  # [1, T]
    f = params.get("f")
    lag = params.get("tlag")
    conc = torch.zeros(torch.broadcast_shapes(lam.shape[:-1], t.shape), dtype=times.dtype, device=times.device)
    for tr in trains:  # a regimen has a handful of phases
        rel = t - tr.start if lag is None else t - tr.start - lag
        tau = float(tr.interval) if tr.n > 1 else 1.0
        # doses given before t: an implied (k ≥ 1) dose at exactly t comes after the observation, as the
        # Panel orders ADDL doses; the train's first dose (a dose record) comes before it
        kf = rel / tau
        kr = torch.round(kf)
        m = torch.where((kf - kr).abs() < 1e-9, kr, torch.ceil(kf))
        m = torch.where(rel >= -1e-12 * tau, torch.clamp(m, min=1, max=tr.n), torch.zeros_like(m))
        delta = torch.clamp(rel - (m - 1) * tau, min=0.0)
        on = m > 0
        mk, dk = m[..., None], delta[..., None]
        g_lam = _geometric(lam, mk, tau)
        e_lam = torch.exp(-lam * dk) * g_lam
        if tr.depot:
            ka = params["ka"][..., None]
            near = (ka - lam).abs() <= _NEAR * torch.maximum(ka, lam)
            ka_k = torch.where(near, ka * (1 + _NEAR), ka).expand_as(lam)
            e_ka = torch.exp(-ka_k * dk) * _geometric(ka_k, mk, tau)
            resp = ka_k * (e_lam - e_ka) / (ka_k - lam)
        else:
            resp = e_lam
        c = (a_coef * resp).sum(-1) * tr.amount
        if f is not None:
            c = c * f
        conc = conc + torch.where(on, c, torch.zeros_like(c))
    if amount_scale is not None:
        conc = conc * amount_scale[:, None]
    return conc
