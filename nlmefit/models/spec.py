"""Model specifications saved with a result, so that ``FitResult.from_json(path)`` can rebuild the model.

A specification is a JSON-safe dict:

* ``{"kind": "library", "name": "1cmt_oral", "error": ..., "dvid": ..., "theta": ..., "omega": ..., "sigma": ...,
  "covariates": ..., "iov": ...}`` for :func:`nlmefit.library.get` models (recorded by ``library.get`` itself);
* ``{"kind": "reference", "ref": "package.module:object"}`` or ``"path/file.py:object"`` for a custom model: the
  object is a Model or a function returning one (recorded by the CLI, or by :func:`attach_reference`);
* ``{"kind": "python", "ref": null}`` for a model built in Python with no importable reference (cannot be rebuilt).

Every specification also carries ``hash``, a digest of the parameter-model source (the ``params=`` function's
source code and the covariate formulas); a rebuilt model whose hash differs is not used, because the estimates
belong to the other parameter model.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import os
from collections.abc import Mapping
from typing import Any

from nlmefit.models.model import Model
from nlmefit.models.parameters import Omega, Param

__all__ = ["SPEC_VERSION", "attach_library_spec", "attach_reference", "spec_of", "param_model_hash",
           "load_reference", "restore"]

SPEC_VERSION = 1
_ATTR = "_nlmefit_spec"


def _num(x: float) -> float | None:
    return float(x) if math.isfinite(float(x)) else None


def _value_to_json(v) -> Any:
    if isinstance(v, Param):
        return {"init": _num(v.init), "lower": _num(v.lower), "upper": _num(v.upper), "fixed": bool(v.fixed)}
    return float(v)


def _value_from_json(v) -> float | Param:
    if isinstance(v, Mapping):
        lo = -math.inf if v.get("lower") is None else float(v["lower"])
        hi = math.inf if v.get("upper") is None else float(v["upper"])
        return Param(float(v["init"]), lower=lo, upper=hi, fixed=bool(v.get("fixed", False)))
    return float(v)


def _omega_to_json(om) -> dict | None:
    if om is None:
        return None
    if isinstance(om, Omega):
        fixed = om.fixed if isinstance(om.fixed, bool) else sorted(om.fixed)
        return {"variances": {k: float(v) for k, v in om.variances.items()},
                "blocks": [list(b) for b in om.blocks],
                "cov": [[a, b, float(c)] for (a, b), c in dict(om.cov).items()], "fixed": fixed}
    return {"variances": {k: _value_to_json(v) for k, v in dict(om).items()}}


def _omega_from_json(obj):
    if obj is None:
        return None
    var = {k: _value_from_json(v) for k, v in obj["variances"].items()}
    if "blocks" not in obj:
        return var
    return Omega(var, blocks=[tuple(b) for b in obj.get("blocks", [])],
                 cov={(a, b): float(c) for a, b, c in obj.get("cov", [])}, fixed=obj.get("fixed", False))


def attach_library_spec(model, name: str, error, theta, omega, sigma, kwargs: Mapping) -> None:
    """Record how ``library.get`` built ``model`` (nothing is recorded for a ``params=`` function)."""
    extra = dict(kwargs)
    unknown = set(extra) - {"dvid", "covariates", "iov"}
    if unknown or not isinstance(error, str):
        return
    cov = extra.get("covariates")
    spec = {"kind": "library", "name": name, "error": error, "dvid": extra.get("dvid"),
            "theta": None if theta is None else {k: _value_to_json(v) for k, v in dict(theta).items()},
            "omega": _omega_to_json(omega),
            "sigma": None if sigma is None else {k: _value_to_json(v) for k, v in dict(sigma).items()},
            "covariates": None if cov is None else {k: (list(v) if isinstance(v, (list, tuple)) else str(v))
                                                    for k, v in dict(cov).items()},
            "iov": _omega_to_json(extra.get("iov"))}
    setattr(model, _ATTR, spec)


def attach_reference(model, ref: str):
    """Record that ``model`` is rebuilt by importing ``ref`` (``package.module:object`` or ``file.py:object``)."""
    setattr(model, _ATTR, {"kind": "reference", "ref": ref})
    return model


def _fn_source(fn) -> str:
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        code = getattr(fn, "__code__", None)
        return code.co_code.hex() if code is not None else repr(fn)


def param_model_hash(model) -> str:
    """sha256 (16 hex digits) of the parameter-model source: the ``params=`` function and the covariate terms."""
    parts = [str(getattr(getattr(model, "structure", None), "name", "") or type(model).__qualname__)]
    fn = getattr(model, "params_fn", None)
    if callable(fn):
        parts.append(_fn_source(fn))
    parts += [f"{t.param}~{t.expr}" for t in getattr(model, "terms", None) or []]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def spec_of(model) -> dict | None:
    """The specification to save with a result of ``model`` (None without a model)."""
    if model is None:
        return None
    spec = dict(getattr(model, _ATTR, None) or {"kind": "python", "ref": None})
    spec["version"] = SPEC_VERSION
    spec["hash"] = param_model_hash(model)
    return spec


def load_reference(ref: str):
    """The Model that ``ref`` names (``package.module:object`` or ``path/file.py:object``); the object may be a
    Model or a function returning one. Raises ValueError saying what is wrong."""
    if ":" not in ref:
        raise ValueError(f"model reference {ref!r} is not of the form module:object or file.py:object")
    where, obj = ref.rsplit(":", 1)
    if where.endswith(".py"):
        if not os.path.exists(where):
            raise ValueError(f"model file {where!r} does not exist")
        mod_spec = importlib.util.spec_from_file_location("nlmefit_user_model", where)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)  # the user's own model file, named when the model was fitted
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise ValueError(f"cannot import {where!r} ({e})") from None
    if not hasattr(module, obj):
        raise ValueError(f"{where} has no object {obj!r}")
    m = getattr(module, obj)
    if not isinstance(m, Model):
        if not (inspect.isfunction(m) or inspect.isclass(m)):
            raise ValueError(f"{ref} is neither a nlmefit Model nor a function returning one")
        m = m()
    if not isinstance(m, Model):
        raise ValueError(f"{ref} is not a nlmefit Model (got {type(m).__name__})")
    return m


def restore(spec: Mapping | None):
    """(model, None) when ``spec`` can be rebuilt, else (None, the reason)."""
    if not spec:
        return None, "the result has no model specification (written by an older nlmefit)"
    kind = spec.get("kind")
    try:
        if kind == "library":
            from nlmefit.models import library  # local: library imports this module (it records its specs)

            kw = {k: spec[k] for k in ("dvid",) if spec.get(k) is not None}
            if spec.get("covariates"):
                kw["covariates"] = dict(spec["covariates"])
            if spec.get("iov"):
                kw["iov"] = _omega_from_json(spec["iov"])
            th = spec.get("theta")
            sg = spec.get("sigma")
            model = library.get(spec["name"], error=spec.get("error") or "additive",
                                theta=None if th is None else {k: _value_from_json(v) for k, v in th.items()},
                                omega=_omega_from_json(spec.get("omega")),
                                sigma=None if sg is None else {k: _value_from_json(v) for k, v in sg.items()}, **kw)
        elif kind == "reference":
            model = load_reference(str(spec.get("ref")))
            attach_reference(model, str(spec.get("ref")))
        elif kind == "python":
            return None, ("the model was built in Python without an importable reference; pass model=... "
                          "(or save it with nlmefit.models.spec.attach_reference(model, 'module:object'))")
        else:
            return None, f"unknown model specification kind {kind!r}"
    except Exception as e:  # a model that no longer builds: say why instead of failing to read the result
        return None, f"the saved model specification cannot be rebuilt: {e}"
    want = spec.get("hash")
    got = param_model_hash(model)
    if want and want != got:
        return None, (f"the parameter model of {spec.get('ref') or spec.get('name')} changed since the fit "
                      f"(source hash {got} != saved {want}); pass model=... to use it anyway")
    return model, None
