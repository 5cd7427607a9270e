"""Micro- and macro-constants of the linear mammillary 1/2/3-compartment models.

The central-compartment amount after a unit bolus into the central compartment is ``Σ_k v·A_k·e^{−λ_k t}``
(so ``Σ_k A_k e^{−λ_k t}`` is the concentration), where λ_k are the eigenvalues of the (negated) rate matrix and

    A_k = Π_m (k_m1 − λ_k) / Π_{l≠k} (λ_l − λ_k) / v        (m over the peripheral compartments),

with the micro-constants k10 = cl/v, k12 = q/v, k21 = q/vp, k13 = q2/v, k31 = q2/vp2.

Eigenvalues, one code path for every ncmt (the same formulas as NONMEM ADVAN1/3/11; Abuhelwa, Foster & Upton 2015,
"ADVAN-style analytical solutions for common pharmacokinetic models", J Pharmacol Toxicol Methods 73:42):

* 1 compartment: λ = k10.
* 2 compartments: the roots of λ² − (k10+k12+k21)λ + k10·k21. The discriminant is written as
  (k10+k12−k21)² + 4·k12·k21 (never negative, no cancellation), the large root is (s + √disc)/2 and the small one
  k10·k21/λ₁ (Vieta; the textbook (s − √disc)/2 loses all its digits when the phases are far apart).
* 3 compartments: the roots of λ³ − a₂λ² + a₁λ − a₀ (a₂ = Σλ, a₁ = Σλλ', a₀ = Πλ = k10·k21·k31). The
  trigonometric formula for three real roots gives starting values only: it is accurate relative to the *largest*
  root, and when two roots are close the arccos near ±1 costs half the digits (errors ~√eps·λ₁). Three Newton steps
  on the cubic (Horner form) then make the largest and the smallest root accurate to machine precision relative to
  themselves, and the middle one is a₀/(λ₁λ₃) (Vieta; no cancellation). The starting values are computed without
  autograd: derivatives come from the Newton steps alone, which at convergence give the implicit-function derivative
  −(∂P/∂θ)/P'(λ) (and never meet the infinite slope of arccos at ±1).

Roots are returned in decreasing order (α ≥ β ≥ γ). Repeated eigenvalues (e.g. k10 = k21 with q → 0) make the
A_k formula singular; they do not occur for positive parameters with distinct phases and are not guarded against.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from nlmefit.errors import ModelSpecError

__all__ = ["micro_constants", "macro_constants", "PK_PARAMS"]

_NEWTON_STEPS = 3

#: required structural parameters per number of compartments
PK_PARAMS = {1: ("cl", "v"), 2: ("cl", "v", "q", "vp"), 3: ("cl", "v", "q", "vp", "q2", "vp2")}


def micro_constants(params: Mapping[str, torch.Tensor], ncmt: int) -> tuple[torch.Tensor, list[torch.Tensor],
                                                                              list[torch.Tensor]]:
    """``(k10, [k12, k13][:ncmt-1], [k21, k31][:ncmt-1])`` broadcast to a common shape."""
    if ncmt not in PK_PARAMS:
        raise ModelSpecError(f"ncmt must be 1, 2 or 3, got {ncmt}")
    missing = [k for k in PK_PARAMS[ncmt] if k not in params]
    if missing:
        raise ModelSpecError(f"a {ncmt}-compartment model needs the parameters {list(PK_PARAMS[ncmt])}; "
                             f"missing {missing}")
    ps = torch.broadcast_tensors(*(torch.as_tensor(params[k]) for k in PK_PARAMS[ncmt]))
    cl, v = ps[0], ps[1]
    k_out = [ps[2 + 2 * i] / v for i in range(ncmt - 1)]  # k12, k13
    k_in = [ps[2 + 2 * i] / ps[3 + 2 * i] for i in range(ncmt - 1)]  # k21, k31
    return cl / v, k_out, k_in


def _eigenvalues(k10: torch.Tensor, k_out: list[torch.Tensor], k_in: list[torch.Tensor]) -> torch.Tensor:
    ncmt = len(k_in) + 1
    if ncmt == 1:
        return k10[..., None]
    if ncmt == 2:
        (k12,), (k21,) = k_out, k_in
        s = k10 + k12 + k21
        d = k10 + k12 - k21
        root = torch.sqrt(d * d + 4 * k12 * k21)
        alpha = 0.5 * (s + root)
        return torch.stack([alpha, k10 * k21 / alpha], -1)
    (k12, k13), (k21, k31) = k_out, k_in
    a2 = k10 + k12 + k13 + k21 + k31
    a1 = k10 * k21 + k10 * k31 + k21 * k31 + k12 * k31 + k13 * k21
    a0 = k10 * k21 * k31
    with torch.no_grad():  # starting values: the trigonometric formula (derivatives come from the Newton steps)
        c = a2 / 3
        p = a1 - a2 * c  # depressed cubic t³ + p t + q = 0 with λ = t + a2/3
        q = -2 * c * c * c + a1 * c - a0
        r = torch.sqrt(torch.clamp(-p / 3, min=torch.finfo(p.dtype).tiny))
        phi = torch.acos(torch.clamp(-q / (2 * r * r * r), -1.0, 1.0)) / 3
        ext = torch.stack([c + 2 * r * torch.cos(phi), c + 2 * r * torch.cos(phi - 4 * math.pi / 3)], -1)
    # Newton on the extreme roots, P(λ) = λ³ − a2 λ² + a1 λ − a0 in Horner form
    a2_, a1_, a0_ = a2[..., None], a1[..., None], a0[..., None]
    lam = ext
    for _ in range(_NEWTON_STEPS):
        pv = ((lam - a2_) * lam + a1_) * lam - a0_
        dp = (3 * lam - 2 * a2_) * lam + a1_
        ok = dp != 0
        lam = lam - torch.where(ok, pv, torch.zeros_like(pv)) / torch.where(ok, dp, torch.ones_like(dp))
    alpha, gamma = lam[..., 0], lam[..., 1]
    return torch.stack([alpha, a0 / (alpha * gamma), gamma], -1)  # middle root from the product of the roots


def macro_constants(params: Mapping[str, torch.Tensor], ncmt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lam [..., ncmt], A [..., ncmt])``: the central concentration after a unit bolus into the central compartment
    is ``Σ_k A_k exp(−lam_k t)``. ``...`` is the broadcast shape of the structural parameters (cl, v[, q, vp[, q2,
    vp2]]); ``lam`` is in decreasing order."""
    k10, k_out, k_in = micro_constants(params, ncmt)
    v = torch.as_tensor(params["v"]).expand_as(k10)
    lam = _eigenvalues(k10, k_out, k_in)
    coef = []
    for k in range(ncmt):
        lk = lam[..., k]
        num = torch.ones_like(lk)
        for kin in k_in:
            num = num * (kin - lk)
        den = torch.ones_like(lk)
        for other in range(ncmt):
            if other != k:
                den = den * (lam[..., other] - lk)
        coef.append(num / den)
    return lam, torch.stack(coef, -1) / v[..., None]
