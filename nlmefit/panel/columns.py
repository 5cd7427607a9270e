"""Canonical NONMEM column names, case-insensitive matching and the user's column map."""
from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

from nlmefit.errors import DataError

__all__ = ["CANONICAL", "REQUIRED", "resolve_columns", "is_reserved_label"]

#: Every column name the panel understands, in output order.
CANONICAL: tuple[str, ...] = ("ID", "TIME", "DV", "AMT", "EVID", "MDV", "CMT", "RATE", "DUR", "II", "ADDL", "SS",
                              "CENS", "LIMIT", "LLOQ", "OCC", "DVID")
#: Columns that must always be present (DV too unless ``require_dv=False``).
REQUIRED: tuple[str, ...] = ("ID", "TIME")


def resolve_columns(df: pd.DataFrame, column_map: Mapping[str, str] | None = None) -> dict[str, object]:
    """Map canonical names to the user's column labels.

    ``column_map`` keys are canonical names in any case (``id``, ``time``, ``dv``...), values the user's column
    labels (matched exactly). Every other canonical name is matched case-insensitively against the frame's
    string column labels. Returns ``{canonical: user_label}`` for the columns present.
    """
    column_map = dict(column_map or {})
    labels = list(df.columns)
    if len(set(map(repr, labels))) != len(labels):
        dup = sorted({repr(c) for c in labels if labels.count(c) > 1})
        raise DataError(f"the DataFrame has duplicate column labels {dup}; expected unique column names")
    out: dict[str, object] = {}
    for key, user in column_map.items():
        canon = str(key).upper()
        if canon not in CANONICAL:
            raise DataError(f"column map: unknown canonical column {key!r}; expected one of "
                            f"{[c.lower() for c in CANONICAL]}")
        if user not in labels:
            raise DataError(f"column map: {key}={user!r} but the DataFrame has no column {user!r} "
                            f"(columns: {labels})")
        if user in out.values():
            raise DataError(f"column map: column {user!r} is mapped to two canonical names")
        out[canon] = user
    lowered: dict[str, list] = {}
    for c in labels:
        if isinstance(c, str):
            lowered.setdefault(c.strip().lower(), []).append(c)
    for canon in CANONICAL:
        if canon in out:
            continue
        found = [c for c in lowered.get(canon.lower(), []) if c not in out.values()]
        if len(found) > 1:
            raise DataError(f"column {canon}: several columns match case-insensitively ({found}); rename one or "
                            f"pass {canon.lower()}=... to say which one to use")
        if found:
            out[canon] = found[0]
    return out


def is_reserved_label(label: object) -> bool:
    """True when a column label spells a canonical name (it is never taken as a covariate automatically)."""
    return isinstance(label, str) and label.strip().upper() in CANONICAL
