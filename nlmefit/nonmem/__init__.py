"""NONMEM control streams in: ``nlmefit.from_nonmem("run1.mod")`` (needs ``pip install "nlmefit[nonmem]"``).

* :mod:`~nlmefit.nonmem.control_stream` — :func:`from_nonmem`, :class:`NonmemRun` (model, data, method, options,
  NONMEM ↔ nlmefit parameter names), the ``$ESTIMATION`` mapping.
* :mod:`~nlmefit.nonmem.translate` — pharmpy's parsed model → :class:`~nlmefit.models.Model`.
* :mod:`~nlmefit.nonmem.expressions` — the statements' sympy expressions evaluated with torch.
"""
from __future__ import annotations

from nlmefit.nonmem.control_stream import NonmemRun, estimation_settings, from_nonmem
from nlmefit.nonmem.translate import Translation, translate

__all__ = ["from_nonmem", "NonmemRun", "estimation_settings", "translate", "Translation"]
