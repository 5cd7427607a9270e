"""The library of named models, usable from Python (``library.get("1cmt_oral")``) and the CLI.

Every structural parameter is log-normal by default, ``p = θ_p·exp(η_p)``; names: ``cl, v`` (central volume),
``q, vp`` (first peripheral), ``q2, vp2`` (second peripheral), ``ka`` (absorption), ``vm, km`` (Michaelis–Menten).
IV models take bolus or infusion records from the data; oral models dose into the depot (CMT 1; CMT 2 doses go to
the central compartment). Initial values are generic; pass ``theta=``/``omega=``/``sigma=`` to override any of
them.
"""
from __future__ import annotations

from collections.abc import Mapping

from nlmefit.errors import ModelSpecError
from nlmefit.models.model import Model
from nlmefit.models.parameters import Omega, Param
from nlmefit.models.spec import attach_library_spec
from nlmefit.models.structure import ClosedForm, OdeStructure, Structure
from nlmefit.pk.ode_models import michaelis_menten

__all__ = ["NAMES", "get", "structure", "DEFAULT_THETA"]

DEFAULT_THETA = {"cl": 1.0, "v": 10.0, "q": 1.0, "vp": 20.0, "q2": 0.5, "vp2": 50.0, "ka": 1.0, "vm": 10.0,
                 "km": 1.0}

_LINEAR = {f"{n}cmt_{r}": (n, r == "oral") for n in (1, 2, 3) for r in ("iv", "oral")}
_MM = {f"{n}cmt_{r}_mm": (n, r == "oral") for n in (1, 2) for r in ("iv", "oral")}
NAMES: tuple[str, ...] = tuple(_LINEAR) + tuple(_MM)


def structure(name: str) -> Structure:
    """The structural model of a library name."""
    if name in _LINEAR:
        return ClosedForm(*_LINEAR[name])
    if name in _MM:
        ncmt, oral = _MM[name]
        params = ("vm", "km", "v") + (("q", "vp") if ncmt == 2 else ()) + (("ka",) if oral else ())
        return OdeStructure(michaelis_menten(ncmt, oral), name, params)
    raise ModelSpecError(f"unknown model {name!r}; the library has {list(NAMES)}")


def get(
    name: str,
    error: str = "additive",
    theta: Mapping[str, float | Param] | None = None,
    omega: Mapping[str, float] | Omega | None = None,
    sigma: Mapping[str, float | Param] | None = None,
    **kwargs,
) -> Model:
    """A library model with IIV on every structural parameter (variance 0.1) unless ``omega`` says otherwise."""
    st = structure(name)
    th = {p: DEFAULT_THETA[p] for p in st.param_names}
    if theta:
        th.update(theta)
    om = omega if omega is not None else {p: 0.1 for p in st.param_names}
    model = Model(st, th, om, sigma, error=error, name=name, **kwargs)
    attach_library_spec(model, name, error, theta, omega, sigma, kwargs)  # FitResult.from_json rebuilds it
    return model
