"""A library of PK right-hand sides for :func:`nlmefit.pk.ode.solve` (parameters per subject, ``{name: [N]}``).

* :func:`linear` — the 1–3-compartment mammillary model (``cl, v`` + ``q, vp`` + ``q2, vp2``, oral: ``ka``); it has
  closed forms, so it is the yardstick of the ODE path.
* :func:`michaelis_menten` — the same with saturable elimination ``vm·C/(km + C)``, C = central/v, instead of
  ``cl·C`` (``vm`` an amount per time unit, ``km`` a concentration); it tends to :func:`linear` with
  ``cl = vm/km`` when ``km ≫ C``.
* :func:`transit` — oral absorption through ``n`` transit compartments, ``ktr = (n + 1)/mtt``, into the depot, then
  ``ka`` into a 1-compartment central compartment with linear elimination (``mtt, ka, cl, v``).

``SYSTEMS`` holds ready-made systems by name (``"2cmt_oral"``, ``"1cmt_iv_mm"``, ``"transit_3"``, ...);
:func:`get` also builds ``transit_<n>`` for any n.

The mammillary systems carry two speed hints for the batched solver (:class:`nlmefit.pk.ode.OdeSystem`):
``prepare`` computes q/v, q/vp, cl/v or km·v once a solve (the right-hand side reads them when present and computes
them itself otherwise), and the oral ones a ``factor_rhs`` written in the depot's integrating-factor coordinate.
Both equal the plain right-hand side in value and forward derivative (``tests/test_ode_speed.py``).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from nlmefit.errors import ModelSpecError
from nlmefit.pk.ode import OdeSystem

__all__ = ["linear", "michaelis_menten", "transit", "SYSTEMS", "get"]

Params = Mapping[str, torch.Tensor]


def _mammillary(ncmt: int, oral: bool, elimination: Callable[[torch.Tensor, Params], torch.Tensor],
                elim_params: tuple[str, ...], derived: Callable[[Params], dict]) -> OdeSystem:
    if ncmt not in (1, 2, 3):
        raise ModelSpecError(f"ncmt must be 1, 2 or 3, got {ncmt}")
    o = 1 if oral else 0
    c = o  # central index

    def make(factor: bool):
        def rhs(t: torch.Tensor, x: torch.Tensor, p: Params) -> torch.Tensor:
            v = p["v"]
            a_c = x[:, c]
            dc = -elimination(a_c, p)
            cols = []
            if oral:
                ka = p["ka"]
                if factor:  # x[:, 0] is z = depot·e^{ka·τ}, constant between doses (see OdeSystem.factor_rhs)
                    absorbed = ka * x[:, 0] * torch.exp(ka * (p["__t0"] - t))
                    cols.append(x[:, 0] - x[:, 0])  # dz/dt = 0 (a zero with the state's dual tangent)
                else:
                    absorbed = ka * x[:, 0]
                    cols.append(-absorbed)
                dc = dc + absorbed
            periph = []
            for i, (qn, vn) in enumerate((("q", "vp"), ("q2", "vp2"))[: ncmt - 1]):
                k_out, k_in = p.get(f"__{qn}_v"), p.get(f"__{qn}_{vn}")  # q/v, q/vp: from prepare() if given
                k_out = p[qn] / v if k_out is None else k_out
                k_in = p[qn] / p[vn] if k_in is None else k_in
                flow = k_out * a_c - k_in * x[:, c + 1 + i]  # net flow central → peripheral
                dc = dc - flow
                periph.append(flow)
            cols.append(dc)
            cols.extend(periph)
            return torch.stack(cols).T  # [N, S] as a view of [S, N]: stacking rows is ~4x cheaper than columns

        return rhs

    def prepare(p: Params) -> dict:
        """The rate constants of the distribution flows and the elimination's derived parameter, once a solve."""
        out = dict(p)
        for qn, vn in (("q", "vp"), ("q2", "vp2"))[: ncmt - 1]:
            out[f"__{qn}_v"] = p[qn] / p["v"]
            out[f"__{qn}_{vn}"] = p[qn] / p[vn]
        out.update(derived(p))
        return out

    names = (("depot",) if oral else ()) + ("central",) + ("periph1", "periph2")[: ncmt - 1]
    params = elim_params + ("v",) + ("q", "vp", "q2", "vp2")[: 2 * (ncmt - 1)] + (("ka",) if oral else ())
    return OdeSystem(n_states=ncmt + o, rhs=make(False), depot=0 if oral else None, central=c, volume="v",
                     names=names, params=params, absorption="ka" if oral else None,
                     factor_rhs=make(True) if oral else None, prepare=prepare)


def linear(ncmt: int, oral: bool) -> OdeSystem:
    """Linear mammillary model: elimination ``cl·C``; parameters ``cl, v`` (+ ``q, vp``, ``q2, vp2``, ``ka``)."""
    def elim(a, p):
        k = p.get("__k")
        return (p["cl"] / p["v"] if k is None else k) * a

    return _mammillary(ncmt, oral, elim, ("cl",), lambda p: {"__k": p["cl"] / p["v"]})


def michaelis_menten(ncmt: int, oral: bool) -> OdeSystem:
    """Saturable elimination ``vm·C/(km + C)``; parameters ``vm, km, v`` (+ ``q, vp``, ``q2, vp2``, ``ka``)."""

    def elim(a, p):  # vm·C/(km + C) with C = a/v, written with one division (a dual division costs ~7 µs)
        kmv = p.get("__kmv")
        return p["vm"] * a / ((p["km"] * p["v"] if kmv is None else kmv) + a)

    return _mammillary(ncmt, oral, elim, ("vm", "km"), lambda p: {"__kmv": p["km"] * p["v"]})


def transit(n_transit: int) -> OdeSystem:
    """Oral absorption through ``n_transit`` compartments (``ktr = (n+1)/mtt``) → depot (``ka``) → central (``cl/v``).

    Oral doses (route 1) enter the first transit compartment (the depot itself when ``n_transit`` is 0, the plain
    first-order absorption model, where ``mtt`` is unused); route-0 doses enter the central compartment.
    """
    if n_transit < 0:
        raise ModelSpecError(f"the number of transit compartments must be >= 0, got {n_transit}")
    nt = n_transit
    depot, central = nt, nt + 1

    def rhs(t: torch.Tensor, x: torch.Tensor, p: Params) -> torch.Tensor:
        cols = []
        inflow = None
        if nt:
            ktr = (nt + 1) / p["mtt"]
            for i in range(nt):
                out = ktr * x[:, i]
                cols.append(-out if inflow is None else inflow - out)
                inflow = out
        absorbed = p["ka"] * x[:, depot]
        cols.append(-absorbed if inflow is None else inflow - absorbed)
        cols.append(absorbed - p["cl"] / p["v"] * x[:, central])
        return torch.stack(cols).T  # [N, S] as a view of [S, N] (see _mammillary)

    names = tuple(f"transit{i + 1}" for i in range(nt)) + ("depot", "central")
    return OdeSystem(n_states=nt + 2, rhs=rhs, depot=0, central=central, volume="v", names=names,
                     params=("mtt", "ka", "cl", "v"))


SYSTEMS: dict[str, OdeSystem] = {}
for _n in (1, 2, 3):
    for _oral in (False, True):
        _r = "oral" if _oral else "iv"
        SYSTEMS[f"{_n}cmt_{_r}"] = linear(_n, _oral)
        SYSTEMS[f"{_n}cmt_{_r}_mm"] = michaelis_menten(_n, _oral)
for _n in range(6):
    SYSTEMS[f"transit_{_n}"] = transit(_n)
del _n, _oral, _r


def get(name: str) -> OdeSystem:
    """The system of a name in :data:`SYSTEMS`, or ``transit_<n>`` for any n >= 0."""
    if name in SYSTEMS:
        return SYSTEMS[name]
    if name.startswith("transit_") and name[len("transit_"):].isdigit():
        return transit(int(name[len("transit_"):]))
    raise ModelSpecError(f"unknown ODE system {name!r}; known: {sorted(SYSTEMS)} (and transit_<n>)")
