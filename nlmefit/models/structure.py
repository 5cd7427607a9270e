"""Structural models: individual parameters + dose/observation events → predicted concentrations.

A structure knows its parameter names and whether it has a depot (oral route); it knows nothing about random
effects, residual error or estimation. Closed forms accept per-observation parameters ([N, J]; time-varying
covariates and IOV are evaluated at each observation and applied to the whole dose history up to it); the ODE path
takes per-subject parameters ([N]).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from nlmefit.errors import ModelSpecError
from nlmefit.pk.closed_form import concentration
from nlmefit.pk.events import Events
from nlmefit.pk.ode import ATOL as ODE_ATOL
from nlmefit.pk.ode import RTOL as ODE_RTOL
from nlmefit.pk.ode import solve

__all__ = ["Structure", "ClosedForm", "OdeStructure", "FunctionStructure", "OPTIONAL_PK_PARAMS"]

#: parameters every structure accepts in addition to its own (bioavailability, lag, modelled duration/rate)
OPTIONAL_PK_PARAMS = ("f", "tlag", "dur", "rate")


class Structure:
    """Base class of the structural models: ``predict(params, events)`` maps the individual parameters
    (``param_names``, each [N] or [N, J]) and the dosing events to the predictions f [N, J] at the observation
    times. ``oral``: the structure has a depot (doses into CMT 1, or every dose when the data have no CMT column,
    go there); ``per_observation``: it accepts parameters that vary by observation ([N, J])."""

    name: str
    param_names: tuple[str, ...]
    oral: bool
    per_observation: bool = True  # can take [N, J] parameters
    #: a prediction costs far more than autograd through it (an ODE solve): estimators may spend autograd work to
    #: save predictions (the classical estimators' warm-start prediction of the modes)
    costly: bool = False

    def predict(self, params: Mapping[str, torch.Tensor], events: Events) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


@dataclass(frozen=True)
class ClosedForm(Structure):
    """Linear 1/2/3-compartment model with IV (bolus/infusion) and optional first-order absorption."""

    ncmt: int
    oral: bool

    def __post_init__(self) -> None:
        if self.ncmt not in (1, 2, 3):
            raise ModelSpecError(f"ncmt must be 1, 2 or 3, got {self.ncmt}")

    @property
    def name(self) -> str:
        return f"{self.ncmt}cmt_{'oral' if self.oral else 'iv'}"

    @property
    def param_names(self) -> tuple[str, ...]:
        extra = {1: [], 2: ["q", "vp"], 3: ["q", "vp", "q2", "vp2"]}[self.ncmt]
        return tuple(["cl", "v"] + extra + (["ka"] if self.oral else []))

    def predict(self, params: Mapping[str, torch.Tensor], events: Events) -> torch.Tensor:
        return concentration(params, events, self.ncmt, self.oral)


@dataclass(frozen=True)
class OdeStructure(Structure):
    """A right-hand side integrated numerically (see :mod:`nlmefit.pk.ode`); per-subject parameters.

    ``rtol``/``atol`` (default nlmixr2 FOCE-I's 5e-6/5e-8, ``atol`` relative to each subject's largest dose;
    tighten with ``dataclasses.replace(structure, rtol=1e-10, atol=1e-12)`` or :meth:`with_tolerance`),
    ``sensitivities`` (``"forward"``: forward sensitivities and a Taylor surrogate; ``"autograd"``: through the
    solver steps) and ``stiff`` (``"auto"``, ``True``, ``False``) go to :func:`nlmefit.pk.ode.solve`.
    """

    system: object  # nlmefit.pk.ode.OdeSystem
    label: str
    params_required: tuple[str, ...]
    rtol: float = ODE_RTOL
    atol: float = ODE_ATOL
    sensitivities: str = "forward"
    stiff: bool | str = "auto"
    per_observation = False
    costly = True

    def __post_init__(self) -> None:
        if not (0 < self.rtol < 1 and 0 < self.atol < 1):
            raise ModelSpecError(f"ODE tolerances must lie in (0, 1), got rtol={self.rtol}, atol={self.atol}")
        if self.sensitivities not in ("forward", "autograd"):
            raise ModelSpecError(f"sensitivities must be 'forward' or 'autograd', got {self.sensitivities!r}")
        if self.stiff not in ("auto", True, False):
            raise ModelSpecError(f"stiff must be 'auto', True or False, got {self.stiff!r}")

    def with_tolerance(self, rtol: float, atol: float | None = None) -> OdeStructure:
        """The same structure solved at ``rtol`` (and ``atol``, default rtol/100)."""
        return dataclasses.replace(self, rtol=rtol, atol=rtol / 100 if atol is None else atol)

    @property
    def name(self) -> str:
        return self.label

    @property
    def oral(self) -> bool:
        return self.system.depot is not None

    @property
    def param_names(self) -> tuple[str, ...]:
        return self.params_required

    def predict(self, params: Mapping[str, torch.Tensor], events: Events) -> torch.Tensor:
        n = events.n_subjects
        return solve(self.system, {k: v.expand(n, 1)[:, 0] for k, v in params.items()}, events,
                     rtol=self.rtol, atol=self.atol, sensitivities=self.sensitivities, stiff=self.stiff)


@dataclass(frozen=True)
class FunctionStructure(Structure):
    """A prediction written directly as a function of time: ``fn(t [N,J], params) -> [N,J]`` (no doses).

    For models like Wang (2007)'s ``10·exp(−ke·t)`` whose dose is part of the formula.
    """

    fn: Callable[[torch.Tensor, Mapping[str, torch.Tensor]], torch.Tensor]
    label: str
    params_required: tuple[str, ...]
    oral: bool = False

    @property
    def name(self) -> str:
        return self.label

    @property
    def param_names(self) -> tuple[str, ...]:
        return self.params_required

    def predict(self, params: Mapping[str, torch.Tensor], events: Events) -> torch.Tensor:
        return self.fn(events.obs_time, params)
