"""The estimator contract and the registry that ``nlmefit.fit(..., method=NAME)`` dispatches through.

An estimator is an object with its hyperparameters in ``__init__`` (no work there) and

    fit(model, data, init=None, seed=None) -> FitResult

It talks to the model only through :class:`~nlmefit.models.protocol.LatentModel` (plus the capabilities it
declares in ``requires``), and hands the result builder a :class:`~nlmefit.marginal.linearisation.Linearisation`
— the (modes, per-subject −2 log L) pair that the covariance step, residuals and individual estimates use. The
classical estimators' linearisation is their own objective; SAEM, NUTS and VEM pass the FOCE-I one.

Adding an estimator = one module with a subclass decorated ``@register("name")`` + the contract test
(``tests/test_estimator_contract.py`` runs every registry entry).
"""
from __future__ import annotations

import abc
from collections.abc import Callable
from typing import ClassVar

import torch

from nlmefit.errors import ModelSpecError
from nlmefit.marginal.linearisation import Linearisation
from nlmefit.models.data import ObservationData
from nlmefit.models.initial import resolve_initial
from nlmefit.models.parameters import Params
from nlmefit.models.protocol import LatentModel, check_latent_model

__all__ = ["Estimator", "register", "get_estimator", "REGISTRY", "COVARIANCE_KINDS"]

REGISTRY: dict[str, type[Estimator]] = {}
COVARIANCE_KINDS = (None, "sandwich", "r", "s")


class Estimator(abc.ABC):
    """Base class of every estimator (see the module docstring for the contract).

    Subclasses set ``requires`` (capability protocols the model must implement beyond LatentModel) and
    implement :meth:`fit` and :attr:`linearisation`; ``device`` and ``covariance`` are common options."""

    name: ClassVar[str] = "?"
    requires: ClassVar[tuple[type, ...]] = ()
    device: str | torch.device | None = None
    covariance: str | None = None

    @abc.abstractmethod
    def fit(self, model: LatentModel, data, init: Params | dict | None = None, seed: int | None = None):
        """Estimate the population parameters of ``model`` from ``data``; returns a FitResult."""

    @property
    @abc.abstractmethod
    def linearisation(self) -> Linearisation:
        """The (modes, per-subject −2 log L) strategy the result builder and the covariance step use."""

    def bind(self, model: LatentModel, data, init: Params | dict | None = None) -> tuple[LatentModel,
                                                                                         ObservationData]:
        """(model with its starting values, its data on ``self.device``): the first step of every ``fit``. Checks
        the model's capabilities against ``requires`` before any work. ``init``: None (automatic starts for the
        values a library model was not given, the model's own values otherwise), ``"auto"``, ``"model"``, a dict
        of reporting names (they win; the rest as for None) or Params (see :mod:`nlmefit.models.initial`)."""
        check_latent_model(model, self.requires)
        if isinstance(data, ObservationData):
            mdata = data
        else:
            mdata = model.prepare(data, device=self.device)
        model = resolve_initial(model, mdata, init)  # None/"auto"/"model"/dict/Params (nlmefit.models.initial)
        return model, mdata

    def options(self) -> dict:
        """The hyperparameters, as given to ``__init__`` (public attributes)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}


def check_covariance(kind: str | None) -> str | None:
    if kind not in COVARIANCE_KINDS:
        raise ModelSpecError(f"covariance must be 'sandwich', 'r', 's' or None, got {kind!r}")
    return kind


def register(name: str) -> Callable[[type], type]:
    """Class decorator: make an Estimator subclass available as ``method=name``."""
    def deco(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, Estimator)):
            raise TypeError(f"@register({name!r}) needs an Estimator subclass, got {cls!r}")
        REGISTRY[name] = cls
        cls.name = name
        return cls

    return deco


_ALIASES = {"foceinteraction": "focei", "focei": "focei"}


def get_estimator(method: str, **options) -> Estimator:
    """An estimator instance by registry name (case, ``-`` and ``_`` ignored), with ``options``."""
    key = str(method).lower().replace("-", "").replace("_", "")
    key = _ALIASES.get(key, key)
    if key not in REGISTRY:
        raise ModelSpecError(f"unknown estimation method {method!r}; available: {sorted(REGISTRY)}")
    try:
        return REGISTRY[key](**options)
    except TypeError as e:
        raise ModelSpecError(f"method {key!r}: {e}") from None
