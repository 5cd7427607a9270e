"""Dose and observation events as padded tensors: the one input format of every PK solver.

All tensors share the leading subject dimension N. Observations are padded to J per subject, doses to D.

Ordering rule (NONMEM): a dose contributes to an observation when both lie in the same reset *epoch*
(EVID 3/4 and SS=1 doses start a new epoch) and the dose comes first: ``dose_time < obs_time``, or equal times
with ``dose_seq < obs_seq`` (``seq`` is the record's position after sorting; doses implied by ADDL come after
every record at the same time). Lag time shifts a dose's effect, not this data-ordering mask.

``dose_rate``: 0 = bolus; > 0 = zero-order infusion at that rate (duration amt/rate); -1 = rate modelled
(parameter ``rate``); -2 = duration modelled (parameter ``dur``). ``dose_dur`` holds amt/rate for data infusions.
``dose_route``: 0 = into the central compartment, 1 = into the depot (first-order absorption).
``dose_ss``: 0 none, 1 steady state with reset, 2 steady state added; ``dose_ii`` the interval for SS.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

__all__ = ["Events"]

#: id(events) -> (weak reference, memo); outside the object so that ``Events(**ev.__dict__)`` still works
_MEMOS: dict[int, tuple[weakref.ref, dict[str, Any]]] = {}


@dataclass(frozen=True)
class Events:
    obs_time: torch.Tensor  # [N, J] float
    obs_mask: torch.Tensor  # [N, J] bool (False = padding)
    obs_seq: torch.Tensor  # [N, J] int64
    obs_epoch: torch.Tensor  # [N, J] int64
    dose_time: torch.Tensor  # [N, D] float
    dose_amt: torch.Tensor  # [N, D] float
    dose_rate: torch.Tensor  # [N, D] float
    dose_dur: torch.Tensor  # [N, D] float
    dose_ss: torch.Tensor  # [N, D] int64
    dose_ii: torch.Tensor  # [N, D] float
    dose_route: torch.Tensor  # [N, D] int64
    dose_mask: torch.Tensor  # [N, D] bool
    dose_seq: torch.Tensor  # [N, D] int64
    dose_epoch: torch.Tensor  # [N, D] int64

    @property
    def n_subjects(self) -> int:
        return self.obs_time.shape[0]

    def to(self, device=None, dtype=None) -> Events:
        """Move to ``device``; floating tensors are cast to ``dtype`` when given."""
        out = {}
        for f in fields(self):
            t = getattr(self, f.name)
            if t.is_floating_point() and dtype is not None:
                t = t.to(device=device, dtype=dtype)
            else:
                t = t.to(device=device)
            out[f.name] = t
        return replace(self, **out)

    def index(self, idx: torch.Tensor | slice) -> Events:
        """The events of a subset of subjects (a shard)."""
        return replace(self, **{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    def memo(self, key: str, build: Callable[[], Any]) -> Any:
        """``build()``, computed once per Events object and kept on it (the tensors of an Events are never changed
        in place: :meth:`to` and :meth:`index` make new objects with empty memos). Solvers keep their data-only
        design tensors here, so that an objective evaluated hundreds of times on one data set builds them once."""
        entry = _MEMOS.get(id(self))
        if entry is None or entry[0]() is not self:
            entry = _MEMOS[id(self)] = (weakref.ref(self), {})
            weakref.finalize(self, _MEMOS.pop, id(self), None)
        memo = entry[1]
        if key not in memo:
            memo[key] = build()
        return memo[key]

    def contributes(self) -> torch.Tensor:
        """[N, J, D] bool: dose d counts towards observation j (same epoch, dose first, both real)."""
        ot, dt = self.obs_time[:, :, None], self.dose_time[:, None, :]
        before = (dt < ot) | ((dt == ot) & (self.dose_seq[:, None, :] < self.obs_seq[:, :, None]))
        same = self.dose_epoch[:, None, :] == self.obs_epoch[:, :, None]
        return before & same & self.dose_mask[:, None, :] & self.obs_mask[:, :, None]
