"""Panel data: validated, padded per-subject arrays built from a NONMEM-style DataFrame.

See docs/data.md for the record format (EVID/MDV, ADDL/II, SS, RATE/DUR, CENS/LLOQ, OCC, covariates).
"""
from __future__ import annotations

from nlmefit.panel.columns import CANONICAL
from nlmefit.panel.panel import Panel

__all__ = ["Panel", "CANONICAL"]
