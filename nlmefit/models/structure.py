"""Structural models: individual parameters + dose/observation events → predicted concentrations.

A structure knows its parameter names and whether it has a depot (oral route); it knows nothing about random
effects, residual error or estimation. Closed forms accept per-observation parameters ([N, J]; time-varying
covariates and IOV are evaluated at each observation and applied to the whole dose history up to it); the ODE path
takes per-subject parameters ([N]).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from nlmefit.errors import ModelSpecError
from nlmefit.pk.closed_form import concentration
from nlmefit.pk.events import Events
from nlmefit.pk.ode import solve

__all__ = ["Structure", "ClosedForm", "OdeStructure", "FunctionStructure", "OPTIONAL_PK_PARAMS"]

#: parameters every structure accepts in addition to its own (bioavailability, lag, modelled duration/rate)
OPTIONAL_PK_PARAMS = ("f", "tlag", "dur", "rate")


class Structure:
    name: str
    param_names: tuple[str, ...]
    oral: bool
    per_observation: bool = True  # can take [N, J] parameters

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
    """A right-hand side integrated numerically (see :mod:`nlmefit.pk.ode`); per-subject parameters."""

    system: object  # nlmefit.pk.ode.OdeSystem
    label: str
    params_required: tuple[str, ...]
    rtol: float = 1e-8
    atol: float = 1e-10
    per_observation = False

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
                     rtol=self.rtol, atol=self.atol)


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
