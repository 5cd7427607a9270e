"""Validation of a saved result (``result.json``) before it is turned into a FitResult.

A truncated, empty or hand-edited file is refused with a :class:`ResultSchemaError` (a ValueError) that names
the file, the key and what is wrong with it, instead of a JSONDecodeError or KeyError from deep inside
:meth:`FitResult.from_dict`.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

__all__ = ["ResultSchemaError", "SUPPORTED_VERSIONS", "validate_result", "load_result_json"]

SUPPORTED_VERSIONS = (1, 2)


class ResultSchemaError(ValueError):
    """A saved result that cannot be read: what is wrong, and where."""


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


_KIND = {
    "str": (lambda x: isinstance(x, str), "a string"),
    "int": (_is_int, "an integer"),
    "nonneg_int": (lambda x: _is_int(x) and x >= 0, "a non-negative integer"),
    "num": (_is_num, "a number"),
    "num?": (lambda x: x is None or _is_num(x), "a number or null"),
    "int?": (lambda x: x is None or _is_int(x), "an integer or null"),
    "str?": (lambda x: x is None or isinstance(x, str), "a string or null"),
    "bool": (lambda x: isinstance(x, bool), "true or false"),
    "dict": (lambda x: isinstance(x, dict), "an object {...}"),
    "dict?": (lambda x: x is None or isinstance(x, dict), "an object {...} or null"),
    "list": (lambda x: isinstance(x, list), "a list [...]"),
    "strlist": (lambda x: isinstance(x, list) and all(isinstance(v, str) for v in x), "a list of strings"),
}

#: key -> kind, for keys every result has
REQUIRED = {"method": "str", "estimates": "dict", "ofv": "num?", "loglik": "num?", "n_subjects": "nonneg_int",
            "n_obs": "nonneg_int", "n_estimated": "nonneg_int", "converged": "bool", "n_iter": "nonneg_int",
            "elapsed_s": "num?"}
#: key -> kind, for keys that may be absent (or null where the kind allows it)
OPTIONAL = {"options": "dict", "fixed": "strlist", "messages": "list", "seed": "int?", "versions": "dict",
            "model": "str", "eta_names": "strlist", "covariance_ok": "bool", "covariance_kind": "str?",
            "covariance_message": "str", "condition_number": "num?", "eta_shrinkage": "dict?",
            "epsilon_shrinkage": "num?", "likelihoods": "dict?", "phases": "dict?", "acceptance": "dict?",
            "weights": "dict?", "source": "dict?", "model_spec": "dict?", "se": "dict?",
            "initial": "dict?", "warnings": "list"}
#: keys holding a table {"columns": [...], "index": [...], "data": [[...], ...]} (or null); predictions and
#: individual estimates may instead be {"file": "<stem>.<key>.npz", "columns": [...], "rows": n} (a large table
#: written beside the JSON)
FRAMES = ("covariance", "individual_estimates", "predictions", "traces", "mcmc")


def _describe(x: Any) -> str:
    text = json.dumps(x)[:40] if not isinstance(x, float) or math.isfinite(x) else repr(x)
    return f"{type(x).__name__} {text}"


def _check_frame(name: str, obj: Any, where: str) -> None:
    if obj is None:
        return
    if isinstance(obj, dict) and "file" in obj and name in ("predictions", "individual_estimates"):
        f = obj["file"]  # a table written beside the JSON: a plain file name in the same folder
        if not isinstance(f, str) or not f.endswith(".npz") or f != os.path.basename(f) or f.startswith("."):
            raise ResultSchemaError(f"{where}: {name}.file should be the name of an .npz file beside it, got "
                                    f"{_describe(f)}")
        if not isinstance(obj.get("columns"), list) or not _is_int(obj.get("rows")):
            raise ResultSchemaError(f"{where}: {name} (in {f}) should list its columns and number of rows")
        return
    if not isinstance(obj, dict):
        raise ResultSchemaError(f"{where}: {name!r} should be a table {{columns, index, data}} or null, "
                                f"got {_describe(obj)}")
    for k in ("columns", "index", "data"):
        if not isinstance(obj.get(k), list):
            raise ResultSchemaError(f"{where}: {name}.{k} should be a list, got "
                                    f"{'nothing' if k not in obj else _describe(obj[k])}")
    ncol, rows = len(obj["columns"]), obj["data"]
    if len(rows) != len(obj["index"]):
        raise ResultSchemaError(f"{where}: {name} has {len(rows)} data rows but {len(obj['index'])} index labels")
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != ncol:
            got = len(row) if isinstance(row, list) else _describe(row)
            raise ResultSchemaError(f"{where}: {name}.data row {i} should be a list of {ncol} values, got {got}")


def validate_result(d: Any, where: str = "result") -> int:
    """Check a result dict (as read from JSON); return its schema version. Raises ResultSchemaError."""
    if not isinstance(d, dict):
        raise ResultSchemaError(f"{where}: expected a JSON object with the fit's results, got {type(d).__name__}")
    version = d.get("schema_version", 1)
    if not _is_int(version) or version not in SUPPORTED_VERSIONS:
        raise ResultSchemaError(f"{where}: result schema version {version!r} is not supported (this nlmefit reads "
                                f"{', '.join(map(str, SUPPORTED_VERSIONS))}); refit with this version")
    if version == 1 and d.get("extra") is not None and not isinstance(d.get("extra"), dict):
        raise ResultSchemaError(f"{where}: 'extra' should be an object, got {_describe(d['extra'])}")
    missing = [k for k in REQUIRED if k not in d]
    if missing:
        raise ResultSchemaError(f"{where}: required key(s) {', '.join(map(repr, missing))} missing (truncated or "
                                f"edited file?)")
    for table, required in ((REQUIRED, True), (OPTIONAL, False)):
        for key, kind in table.items():
            if key not in d or (not required and d[key] is None and kind in ("dict", "strlist", "list", "str")):
                continue
            ok, what = _KIND[kind]
            if not ok(d[key]):
                raise ResultSchemaError(f"{where}: {key!r} should be {what}, got {_describe(d[key])}")
    for k, v in d["estimates"].items():
        if v is not None and not _is_num(v):
            raise ResultSchemaError(f"{where}: estimate {k!r} should be a number or null, got {_describe(v)}")
    for name in FRAMES:
        _check_frame(name, d.get(name), where)
    tr = d.get("traces")
    if version >= 2 and tr is not None and "iteration" not in tr["columns"]:
        raise ResultSchemaError(f"{where}: traces has no 'iteration' column")
    return version


def load_result_json(path: str | os.PathLike) -> dict:
    """Read and validate ``path``; ResultSchemaError for a missing, empty, truncated or malformed file."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise ResultSchemaError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ResultSchemaError(f"{path}: is a folder, not a result file") from None
    except UnicodeDecodeError:
        raise ResultSchemaError(f"{path}: not a text (JSON) file") from None
    if not text.strip():
        raise ResultSchemaError(f"{path}: the file is empty (an interrupted write?); refit to recreate it")
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ResultSchemaError(f"{path}: not valid JSON at line {e.lineno} column {e.colno} ({e.msg}); the file "
                                f"is truncated or was edited") from None
    validate_result(d, where=path)
    return d

