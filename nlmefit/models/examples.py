"""Published example models, written with the public API (and used by the reference tests and the CLI).

* :func:`pheno_real` — NONMEM's ``pheno_real.mod`` (phenobarbital in neonates), a ``$PK``-style parameter
  function: ``TVCL = θ1·WGT``, ``TVV = θ2·WGT·(1 + θ3 if APGR < 5)``, ``CL = TVCL·exp(η1)``, ``V = TVV·exp(η2)``,
  proportional error with initial SIGMA = 0.0130865 (a variance; nlmefit's ``sigma_prop`` is its square root).
* :func:`wang2007` — the toy model of Wang (2007): ``f = 10·exp(−ke·t)``, ``ke = tke·exp(η)``, all FIXED.
"""
from __future__ import annotations

import math

import torch

from nlmefit.models.error import get_error_model
from nlmefit.models.model import Model
from nlmefit.models.parameters import Omega, Param, fix
from nlmefit.models.structure import ClosedForm, FunctionStructure

__all__ = ["pheno_real", "wang2007", "EXAMPLES"]


def _pheno_params(theta, eta, cov):
    tvcl = theta["tvcl"] * cov["WGT"]
    tvv = theta["tvv"] * cov["WGT"]
    tvv = torch.where(cov["APGR"] < 5, tvv * (1 + theta["apgr_v"]), tvv)
    return {"cl": tvcl * torch.exp(eta["cl"]), "v": tvv * torch.exp(eta["v"])}


def pheno_real() -> Model:
    """pheno_real with NONMEM's initial estimates and bounds."""
    return Model(
        ClosedForm(1, oral=False),
        theta={"tvcl": Param(0.00469307, lower=0.0), "tvv": Param(1.00916, lower=0.0),
               "apgr_v": Param(0.1, lower=-0.99)},
        omega={"cl": 0.0309626, "v": 0.031128},
        sigma={"prop": math.sqrt(0.0130865)},
        error="proportional",
        params=_pheno_params,
        name="pheno_real",
    )


def _wang_f(t, p):
    return 10.0 * torch.exp(-p["ke"] * t)


def wang2007(error: str = "proportional") -> Model:
    """Wang (2007) at its fixed values: tke = 0.5, ω² = 0.04, every σ = √0.1."""
    sd = math.sqrt(0.1)
    st = FunctionStructure(_wang_f, "wang2007", ("ke",))
    sigma = {k: fix(sd) for k in get_error_model(error).sigma_names}
    return Model(st, {"ke": fix(0.5)}, Omega({"ke": 0.04}, fixed=True), sigma, error=error, name="wang2007")


EXAMPLES = {"pheno_real": pheno_real, "wang2007": wang2007}
