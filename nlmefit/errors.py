"""The exceptions nlmefit raises at its boundaries.

Every error a user can trigger with bad input is one of these, raised before any tensor work starts, with a
message that names the column, subject ID, TIME or parameter involved and what was expected.
"""
from __future__ import annotations

__all__ = ["DataError", "ModelSpecError", "EstimationError"]


class DataError(ValueError):
    """The DataFrame (or CSV) does not follow the NONMEM event-record conventions nlmefit expects."""


class ModelSpecError(ValueError):
    """A model specification is inconsistent (unknown parameter, bad bounds, data the model cannot use)."""


class EstimationError(RuntimeError):
    """An estimator could not produce a result (non-finite objective at the initial values, etc.)."""
