"""Units of the reported parameters, derived from the units the data declare.

The data declare units per column — ``df.attrs["units"] = {"TIME": "h", "AMT": "mg", "DV": "mg/L"}`` in Python
(pandas' per-frame attributes) or ``nlmefit fit ... --units TIME=h --units AMT=mg --units DV=mg/L`` — and the
structural parameters' units follow from their dimension: clearances are volume/time with volume = AMT/DV
(``mg`` / ``mg/L`` → ``L``), volumes are volume, rate constants 1/time, lag times time. Parameters whose
dimension is not known (covariate coefficients, custom models' parameters) get no unit rather than a guess.
"""
from __future__ import annotations

from collections.abc import Mapping

__all__ = ["parameter_units", "normalise_units", "data_units"]

_CLEARANCE = ("cl", "q", "q2", "q3")
_VOLUME = ("v", "v1", "v2", "v3", "vc", "vp", "vp2")
_RATE = ("ka", "k", "ke", "k12", "k21", "k13", "k31")
_TIME = ("tlag", "alag", "dur", "mtt")


def normalise_units(units: Mapping[str, str] | None) -> dict[str, str]:
    """Upper-case column names, stripped unit strings; empty units dropped."""
    out = {}
    for k, v in (units or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ValueError(f"units: expected column name -> unit text, got {k!r}: {v!r}")
        if v.strip():
            out[k.strip().upper()] = v.strip()
    return out


def data_units(data) -> dict[str, str]:
    """The units a DataFrame declares in ``data.attrs["units"]`` (nothing for other inputs)."""
    attrs = getattr(data, "attrs", None)
    return normalise_units(attrs.get("units")) if isinstance(attrs, dict) else {}


def _volume(amt: str | None, dv: str | None) -> str | None:
    if not amt or not dv:
        return None
    if "/" in dv:
        num, den = dv.split("/", 1)
        if num.strip() == amt:  # mg and mg/L: litres
            return den.strip()
    return f"{amt}/({dv})"


def parameter_units(names, units: Mapping[str, str]) -> dict[str, str]:
    """Unit text for each parameter name whose dimension is known, from the declared column units."""
    u = normalise_units(units)
    time, vol = u.get("TIME"), _volume(u.get("AMT"), u.get("DV"))
    out = {}
    for name in names:
        n = str(name).lower()
        if n in _CLEARANCE and vol and time:
            out[name] = f"{vol}/{time}"
        elif n in _VOLUME and vol:
            out[name] = vol
        elif n in _RATE and time:
            out[name] = f"1/{time}"
        elif n in _TIME and time:
            out[name] = time
    return out
