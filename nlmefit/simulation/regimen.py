"""Dosing regimens as data: :class:`Phase` (one block of equally spaced doses) and :class:`Regimen` (phases in
time order), with a compact string grammar (``Regimen.parse``, ``str``; see
:mod:`nlmefit.simulation.regimen_grammar` and docs/regimens.md) and NONMEM dose records (``to_records``).

Times are in hours; amounts keep their unit (``mg``, ``g``, ``ug``, ``ng``, each optionally ``/kg``) until records
are made, where they become mg (per-kg amounts times the subject's weight).

>>> r = Regimen.parse("1000 mg loading then 500 mg q12h x14, infusion 1h")
>>> str(r)
'1000 mg infusion over 1h loading then 500 mg infusion over 1h q12h x14'
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from nlmefit._html import object_html
from nlmefit.errors import ModelSpecError
from nlmefit.simulation.regimen_grammar import MASS_ALIASES, MASS_UNITS, format_regimen, parse_regimen

__all__ = ["Phase", "Regimen", "ROUTES", "UNITS"]

ROUTES = ("bolus", "infusion", "oral")
_ROUTE_ALIASES = {"iv": "bolus", "iv bolus": "bolus", "po": "oral", "inf": "infusion", "iv infusion": "infusion"}
UNITS = tuple(m + s for s in ("", "/kg") for m in MASS_UNITS)


def _positive(name: str, v: Any, allow_none: bool = False, allow_zero: bool = False) -> float | None:
    if v is None and allow_none:
        return None
    ok = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
    if ok:
        v = float(v)
        ok = math.isfinite(v) and (v >= 0 if allow_zero else v > 0)
    if not ok:
        want = "a finite number ≥ 0" if allow_zero else "a positive finite number"
        raise ModelSpecError(f"{name}: expected {want}{' or None' if allow_none else ''}, got {v!r}")
    return v


@dataclass(frozen=True)
class Phase:
    """``n_doses`` doses of ``amount`` ``unit`` every ``interval`` hours from ``start`` (None: right after the
    previous phase, resolved by :class:`Regimen`). Infusions take exactly one of ``duration`` (h) or ``rate``
    (``unit`` per hour); ``lag`` (h) delays every dose of the phase (records and dose times use start + lag)."""

    amount: float
    unit: str = "mg"
    route: str = "bolus"
    duration: float | None = None
    rate: float | None = None
    interval: float | None = None
    n_doses: int = 1
    start: float | None = None
    lag: float = 0.0

    def __post_init__(self):
        s = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen)
        s("amount", _positive("amount", self.amount))
        unit = str(self.unit).strip().lower().replace(" ", "")
        mass, _, per = unit.partition("/")
        unit = MASS_ALIASES.get(mass, mass) + ("/" + per if per else "")
        if unit not in UNITS:
            raise ModelSpecError(f"unit: expected one of {', '.join(UNITS)}, got {self.unit!r}")
        s("unit", unit)
        route = _ROUTE_ALIASES.get(str(self.route).strip().lower(), str(self.route).strip().lower())
        if route not in ROUTES:
            raise ModelSpecError(f"route: expected one of {', '.join(ROUTES)}, got {self.route!r}")
        s("route", route)
        s("duration", _positive("duration", self.duration, allow_none=True))
        s("rate", _positive("rate", self.rate, allow_none=True))
        if route == "infusion" and (self.duration is None) == (self.rate is None):
            raise ModelSpecError("duration/rate: expected exactly one of duration (h) or rate "
                                 f"({unit} per h) for an infusion, got "
                                 f"{'neither' if self.duration is None else 'both'}")
        if route != "infusion" and (self.duration is not None or self.rate is not None):
            raise ModelSpecError(f"duration/rate: expected none for route {route!r} (only infusions have a "
                                 f"duration or rate)")
        s("interval", _positive("interval", self.interval, allow_none=True))
        n = self.n_doses
        if isinstance(n, bool) or not isinstance(n, (int, float, np.integer, np.floating)) or not (
                math.isfinite(n) and n == int(n) and 1 <= n <= 1_000_000):
            raise ModelSpecError(f"n_doses: expected a whole number from 1 to 1000000, got {n!r}")
        s("n_doses", int(n))
        if self.n_doses > 1 and self.interval is None:
            raise ModelSpecError(f"interval: expected a dosing interval > 0 (h) when n_doses > 1, got None "
                                 f"(n_doses = {self.n_doses})")
        s("start", _positive("start", self.start, allow_none=True, allow_zero=True))
        s("lag", _positive("lag", 0.0 if self.lag is None else self.lag, allow_zero=True))

    @property
    def per_kg(self) -> bool:
        return self.unit.endswith("/kg")

    @property
    def mg_factor(self) -> float:
        """mg per unit of ``amount`` (per kg for per-kg units)."""
        return MASS_UNITS[self.unit.split("/")[0]]

    @property
    def infusion_duration(self) -> float:
        """Hours each dose takes to enter (0 for bolus and oral)."""
        if self.route != "infusion":
            return 0.0
        return self.duration if self.duration is not None else self.amount / self.rate

    @property
    def last_dose(self) -> float:
        """Nominal time of the phase's last dose (lag not included)."""
        return self.start + (self.n_doses - 1) * (self.interval or 0.0)


def _default_start(k: int, prev: Phase | None, cur: Phase) -> float:
    if prev is None:
        return 0.0
    if prev.interval is not None:
        return prev.start + prev.n_doses * prev.interval
    if cur.interval is not None:  # after a single (loading) dose: one maintenance interval later
        return prev.start + cur.interval
    err = ModelSpecError(f"phase {k + 1}: start: expected an explicit start time ('at T' or 'start T:'): the "
                         f"previous phase is a single dose without an interval and this phase has none either")
    err.phase = k
    raise err


@dataclass(frozen=True, repr=False)
class Regimen:
    """Dosing phases in time order; ``label`` (default: the canonical string) names it in tables and is not part
    of equality. Build from phases, :meth:`parse`, :meth:`loading_maintenance` or :meth:`repeated`."""

    phases: tuple[Phase, ...]
    label: str | None = field(default=None, compare=False)

    def __post_init__(self):
        phases = tuple(self.phases) if not isinstance(self.phases, Phase) else (self.phases,)
        if not phases:
            raise ModelSpecError("phases: expected at least one dosing phase, got none")
        out: list[Phase] = []
        defaults = []
        for k, p in enumerate(phases):
            if not isinstance(p, Phase):
                raise ModelSpecError(f"phase {k + 1}: expected a Phase, got {type(p).__name__}")
            prev = out[-1] if out else None
            if p.start is None:
                p = dataclasses.replace(p, start=_default_start(k, prev, p))
                defaults.append(True)
            else:
                try:
                    defaults.append(p.start == _default_start(k, prev, p))
                except ModelSpecError:
                    defaults.append(False)
            if prev is not None and not (p.start > prev.last_dose and p.start + p.lag > prev.last_dose + prev.lag):
                err = ModelSpecError(
                    f"phase {k + 1}: start: expected a time after the previous phase's last dose at "
                    f"{prev.last_dose:g} h (lag {prev.lag:g} h), got {p.start:g} h (lag {p.lag:g} h): phases "
                    f"overlap or are out of order")
                err.phase = k
                raise err
            out.append(p)
        object.__setattr__(self, "phases", tuple(out))
        object.__setattr__(self, "_start_is_default", tuple(defaults))
        if self.label is None:
            object.__setattr__(self, "label", str(self))

    # ---- construction
    @classmethod
    def parse(cls, text: str, label: str | None = None) -> Regimen:
        """Parse the regimen grammar (docs/regimens.md); errors name the position and token."""
        if isinstance(text, Regimen):
            return text
        parsed = parse_regimen(text)
        phases = []
        for k, pp in enumerate(parsed):
            try:
                phases.append(Phase(**pp.fields))
            except ModelSpecError as e:
                raise ModelSpecError(f"regimen {text!r}: phase {k + 1} at position {pp.pos} ({pp.snippet!r}): "
                                     f"{e}") from None
        try:
            return cls(tuple(phases), label=label)
        except ModelSpecError as e:
            k = getattr(e, "phase", 0)
            raise ModelSpecError(f"regimen {text!r}: at position {parsed[k].pos} ({parsed[k].snippet!r}): "
                                 f"{e}") from None

    @classmethod
    def coerce(cls, obj: Regimen | str) -> Regimen:
        """A Regimen from a Regimen or a string."""
        return obj if isinstance(obj, Regimen) else cls.parse(obj)

    @classmethod
    def repeated(cls, amount: float, interval: float | None = None, n_doses: int = 1, *, unit: str = "mg",
                 route: str = "bolus", duration: float | None = None, rate: float | None = None,
                 start: float = 0.0, lag: float = 0.0, label: str | None = None) -> Regimen:
        """One phase: ``n_doses`` doses every ``interval`` h from ``start``."""
        return cls((Phase(amount, unit, route, duration, rate, interval, n_doses, start, lag),), label=label)

    @classmethod
    def loading_maintenance(cls, loading: float, amount: float, interval: float, n_doses: int, *,
                            unit: str = "mg", route: str = "bolus", duration: float | None = None,
                            rate: float | None = None, start: float = 0.0, lag: float = 0.0,
                            label: str | None = None) -> Regimen:
        """A ``loading`` dose at ``start``, then ``n_doses`` maintenance doses of ``amount`` every ``interval`` h
        from ``start + interval`` (same unit, route and infusion duration or rate)."""
        first = Phase(loading, unit, route, duration, rate, None, 1, start, lag)
        return cls((first, Phase(amount, unit, route, duration, rate, interval, n_doses, None, lag)), label=label)

    def with_label(self, label: str) -> Regimen:
        return dataclasses.replace(self, label=label)

    # ---- text
    def __str__(self) -> str:
        return format_regimen(self.phases, self._start_is_default)

    def __repr__(self) -> str:
        s = str(self)
        return f"Regimen({s!r})" if self.label == s else f"Regimen({s!r}, label={self.label!r})"

    def _repr_html_(self) -> str:
        doses = pd.DataFrame(self.dose_times(), columns=["TIME", "AMT", "RATE"])
        return object_html(f"Regimen: {self.label}", [str(self), f"{self.n_doses} doses"],
                           [("doses (h, amount, rate)", doses)], max_rows=12)

    # ---- dose times
    @property
    def n_doses(self) -> int:
        return sum(p.n_doses for p in self.phases)

    def dose_times(self, weight: float | None = None) -> np.ndarray:
        """[n_doses, 3] float array of (time, amount, rate) per dose, in time order: time in h (lag included),
        amount in mg — mg/kg for per-kg phases unless ``weight`` (kg) is given — and rate in the same amount
        unit per h (0 for bolus and oral)."""
        rows = []
        for p in self.phases:
            amt, rate = self._amount_rate(p, weight)
            t = p.start + p.lag + np.arange(p.n_doses) * (p.interval or 0.0)
            rows.append(np.column_stack([t, np.full(p.n_doses, amt), np.full(p.n_doses, rate)]))
        return np.concatenate(rows)

    @staticmethod
    def _amount_rate(p: Phase, weight: float | None) -> tuple[float, float]:
        amt = p.amount * p.mg_factor
        if p.per_kg and weight is not None:
            amt = amt * weight
        if p.route != "infusion":
            return amt, 0.0
        if p.duration is not None:
            return amt, amt / p.duration
        rate = p.rate * p.mg_factor
        return amt, rate * weight if (p.per_kg and weight is not None) else rate

    def last_interval(self) -> float | None:
        """τ of the last phase (the steady-state window is ``[end_time() − τ, end_time()]``); None if unset."""
        return self.phases[-1].interval

    def end_time(self) -> float:
        """End of the regimen: the last phase's last dose + lag + τ (one full dosing interval after it); for a
        last phase without an interval, its last dose + lag + infusion duration."""
        p = self.phases[-1]
        return p.last_dose + p.lag + (p.interval if p.interval is not None else p.infusion_duration)

    # ---- NONMEM records
    def to_records(self, ids: Sequence | None = None, n_subjects: int = 1, covariates: pd.DataFrame | None = None,
                   weight_col: str = "WT", *, cmt: int | None = None, iv_cmt: int = 1,
                   oral_cmt: int = 1) -> pd.DataFrame:
        """NONMEM dose records (ID, TIME, AMT, EVID=1, MDV=1, CMT, RATE, II, ADDL) for every subject, one record per
        phase (ADDL = n_doses − 1, II = τ), AMT in mg and RATE in mg/h (0 for bolus/oral).

        Subjects: ``ids``, else the IDs of ``covariates`` (its ``ID`` column, or 1..len), else 1..``n_subjects``.
        Per-kg amounts use ``covariates[weight_col]`` (the subject's first row; rows in ID order when there is no
        ID column). Compartments: oral doses → ``oral_cmt``, bolus and infusion → ``iv_cmt``; ``cmt`` overrides
        both. For oral models with a depot (CMT 1), IV doses go to the central compartment: pass ``iv_cmt=2``.
        """
        ids = self._subject_ids(ids, n_subjects, covariates)
        weights = self._weights(ids, covariates, weight_col) if any(p.per_kg for p in self.phases) else None
        cols: dict[str, list] = {c: [] for c in ("ID", "TIME", "AMT", "EVID", "MDV", "CMT", "RATE", "II", "ADDL")}
        for i, sid in enumerate(ids):
            w = None if weights is None else weights[i]
            for p in self.phases:
                amt, rate = self._amount_rate(p, w)
                c = cmt if cmt is not None else (oral_cmt if p.route == "oral" else iv_cmt)
                for k, v in zip(cols, (sid, p.start + p.lag, amt, 1, 1, int(c), rate,
                                       p.interval if p.n_doses > 1 else 0.0, p.n_doses - 1)):
                    cols[k].append(v)
        out = pd.DataFrame(cols)
        return out.astype({"TIME": float, "AMT": float, "EVID": int, "MDV": int, "CMT": int, "RATE": float,
                           "II": float, "ADDL": int})

    @staticmethod
    def _subject_ids(ids, n_subjects: int, covariates) -> list:
        if ids is not None:
            ids = list(ids)
        elif covariates is not None:
            idc = _find_col(covariates, "ID")
            ids = list(pd.unique(covariates[idc])) if idc is not None else list(range(1, len(covariates) + 1))
        else:
            if isinstance(n_subjects, bool) or not isinstance(n_subjects, (int, np.integer)) or n_subjects < 1:
                raise ModelSpecError(f"n_subjects: expected a positive integer, got {n_subjects!r}")
            ids = list(range(1, int(n_subjects) + 1))
        ids = [x.item() if isinstance(x, np.generic) else x for x in ids]
        if not ids:
            raise ModelSpecError("ids: expected at least one subject ID, got none")
        if len(set(map(repr, ids))) != len(ids):
            raise ModelSpecError(f"ids: expected distinct subject IDs, got {ids[:20]}")
        return ids

    @staticmethod
    def _weights(ids: list, covariates, weight_col: str) -> np.ndarray:
        if covariates is None:
            raise ModelSpecError(f"covariates: expected a table with a {weight_col!r} column (weight in kg): the "
                                 f"regimen has per-kg doses")
        wc = _find_col(covariates, weight_col)
        if wc is None:
            raise ModelSpecError(f"covariates: column {weight_col!r} (weight_col) not found; columns are "
                                 f"{list(covariates.columns)}")
        idc = _find_col(covariates, "ID")
        if idc is None:
            if len(covariates) != len(ids):
                raise ModelSpecError(f"covariates: expected an ID column or one row per subject ({len(ids)}), got "
                                     f"{len(covariates)} rows")
            wt = dict(zip(ids, covariates[wc].tolist()))
        else:
            first = covariates.drop_duplicates(subset=idc, keep="first")
            wt = dict(zip(first[idc].tolist(), first[wc].tolist()))
        out = []
        for sid in ids:
            if sid not in wt:
                raise ModelSpecError(f"covariates: no row for ID {sid} (column {idc}): per-kg doses need its "
                                     f"{wc}")
            v = pd.to_numeric(pd.Series([wt[sid]]), errors="coerce").iloc[0]
            if not (np.isfinite(v) and v > 0):
                raise ModelSpecError(f"column {wc}, ID {sid}: expected a positive weight (kg), got {wt[sid]!r}")
            out.append(float(v))
        return np.asarray(out)


def _find_col(df: pd.DataFrame, name: str) -> Any:
    """The column of ``df`` spelled ``name`` (exactly, else case-insensitively), or None."""
    if name in df.columns:
        return name
    hits = [c for c in df.columns if str(c).lower() == name.lower()]
    return hits[0] if len(hits) == 1 else None
