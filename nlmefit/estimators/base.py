"""Estimator base class and the registry that ``nlmefit.fit(..., method=NAME)`` dispatches through.

An estimator is an object with its hyperparameters in ``__init__`` and ``fit(model, data, init=None) ->
FitResult``. Adding one = one module defining a subclass decorated with ``@register("name")`` + tests.
"""
from __future__ import annotations

from typing import Callable

from nlmefit.errors import ModelSpecError

__all__ = ["Estimator", "register", "get_estimator", "REGISTRY"]

REGISTRY: dict[str, type] = {}


class Estimator:
    name: str = "?"

    def fit(self, model, data, init=None):  # pragma: no cover - interface
        raise NotImplementedError

    def bind(self, model, data, init=None):
        """(model with ``init`` as its initial values, ModelData on ``self.device``): the common first step of
        every ``fit``."""
        from nlmefit.models.model import ModelData
        from nlmefit.models.parameters import Params

        mdata = data if isinstance(data, ModelData) else model.prepare(data, device=getattr(self, "device", None))
        if init is not None:
            p_init = init if isinstance(init, Params) else model.parameters.params_from_dict(init)
            model = model.with_initial(p_init)
        return model, mdata

    def options(self) -> dict:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}


def register(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        REGISTRY[name] = cls
        cls.name = name
        return cls

    return deco


def get_estimator(method: str, **options) -> Estimator:
    key = method.lower().replace("-", "").replace("_", "")
    aliases = {"foceinteraction": "focei", "fo": "fo", "foce": "foce", "focei": "focei", "laplace": "laplace", "agq": "agq", "saem": "saem"}
    key = aliases.get(key, key)
    if key not in REGISTRY:
        raise ModelSpecError(f"unknown estimation method {method!r}; available: {sorted(REGISTRY)}")
    try:
        return REGISTRY[key](**options)
    except TypeError as e:
        raise ModelSpecError(f"method {key!r}: {e}") from None
